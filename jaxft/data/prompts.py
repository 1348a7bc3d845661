"""Prompt records for online DPO (`dpo.online`): read, encoded once, drawn in a seeded order.

A prompt record holds a "prompt" (a string or a message list), or "messages" whose trailing
assistant turns are dropped (an SFT record's reference answer is not part of the prompt), plus
whatever fields its rewards read ("answer", "test", ...). Prompts are encoded as the DPO data
path encodes the prompt of a pair (`jaxft.data.encode.Encoder.prompt`: strings with the
tokenizer's leading special tokens, messages under the chat template with the generation
prompt), so a sampled completion appended to them is the sequence offline DPO would train on.

`PromptIterator` hands out the global batch of `batch_size` prompts a step, the same on every
host: the prompts, concatenated epoch after epoch, each epoch in the order of a permutation
seeded by (train.seed, epoch). Its state is the number of batches handed out, so a resumed
run continues with exactly the prompts an uninterrupted one would have had.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any

import numpy as np

from jaxft import errors
from jaxft.data.data_error import DataError
from jaxft.data.encode import Encoder

log = logging.getLogger("jaxft")

STATE_KIND = "prompts"
STATE_VERSION = 1


def prompt_of(record: dict):
    """A prompt record's prompt: "prompt" (a string or messages), else "messages" without
    trailing assistant turns (an SFT or eval record's reference answer is not part of it)."""
    if "prompt" in record:
        return record["prompt"]
    messages = list(record.get("messages") or [])
    while messages and messages[-1].get("role") == "assistant":
        messages.pop()
    if not messages:
        raise ValueError(f"a prompt record needs 'prompt' or 'messages'; this one has {sorted(record)}")
    return messages


def read_prompt_records(source: str, key: str, *, max_record_bytes: int = 0) -> list[tuple[str, dict]]:
    """(location, record) of every record of `source`, each with a prompt; errors name `key`,
    the file and the line."""
    from jaxft.data.sources import read_records

    records = []
    for location, record in read_records(source, max_record_bytes=max_record_bytes):
        if isinstance(record, Exception):
            raise record
        if not isinstance(record, dict):
            raise DataError(location, f"a prompt record is a JSON object, got {type(record).__name__} ({key})")
        try:
            prompt_of(record)
        except ValueError as err:
            raise DataError(location, f"{err} ({key})") from None
        records.append((location, record))
    if not records:
        raise DataError(source, f"no records ({key})")
    return records


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """One step's prompts (the global batch, the same on every host): the records as read (the
    rewards read their fields), their token ids, and their indices among the loaded prompts."""
    records: list[dict]
    prompt_ids: list[list[int]]
    indices: list[int]


class PromptIterator:
    """Infinite, deterministic, resumable stream of `PromptBatch`es of `batch_size` prompts.

    Prompts longer than data.max_length less the tokens sampled are dropped at load
    (`load_prompts`), counted and logged. The tokens and padding of the pair batches are the
    step's to report (it builds them): `real_tokens` and `padding_fraction` here stay 0.
    """

    def __init__(self, records: list[dict], prompt_ids: list[list[int]], *, batch_size: int, seed: int,
                 max_length: int = 0, source: str = "", dropped: int = 0):
        if not records:
            raise DataError(source, "no prompt fits (data.max_length less dpo.online_max_new_tokens); "
                                    f"{dropped} prompts too long")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.records, self.prompt_ids = records, prompt_ids
        self.batch_size, self.seed, self.source, self.dropped = batch_size, seed, source, dropped
        self.max_length = max_length
        h = hashlib.blake2b(digest_size=12)
        for ids in prompt_ids:
            h.update(np.asarray([len(ids), *ids], np.int64).tobytes())
        h.update(json.dumps(records, sort_keys=True, default=str).encode())
        self._data = {"source": source, "num_prompts": len(records), "hash": h.hexdigest()}
        self._batches = 0
        self._orders: dict[int, np.ndarray] = {}

    # -- the stream ------------------------------------------------------------------------

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed & 0x7FFFFFFF, epoch]).permutation(len(self.records))
        return self._orders[epoch]

    def batch_at(self, batch: int) -> PromptBatch:
        """The `batch`-th batch (0-based) of the stream."""
        n = len(self.records)
        picks = [(batch * self.batch_size + k) for k in range(self.batch_size)]
        indices = [int(self._order(p // n)[p % n]) for p in picks]
        return PromptBatch([self.records[i] for i in indices], [self.prompt_ids[i] for i in indices], indices)

    def __iter__(self):
        return self

    def __next__(self) -> PromptBatch:
        out = self.batch_at(self._batches)
        self._batches += 1
        return out

    def device_batch(self, host: PromptBatch, mesh) -> tuple[PromptBatch, int]:
        """What the prefetcher hands the step (`jaxft.parallel.prefetch`): the prompts stay on
        the host, the step samples from them; rows are at most data.max_length long."""
        return host, self.max_length

    # -- progress -------------------------------------------------------------------------

    real_tokens = 0  # the step reports its pair batches' tokens (`jaxft.loop.hooks.Window`)
    padding_fraction = 0.0

    @property
    def epoch(self) -> int:
        return self._batches * self.batch_size // len(self.records)

    @property
    def dataset_epochs(self) -> dict[str, int]:
        return {self.source: self.epoch}

    def batches_per_epoch(self) -> int:
        return max(1, -(-len(self.records) // self.batch_size))

    # -- state -----------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        return {"kind": STATE_KIND, "version": STATE_VERSION, "batches": self._batches,
                "settings": {"batch_size": self.batch_size, "seed": self.seed}, "data": dict(self._data)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores `get_state()` output; ValueError naming what changed (the prompts, the batch
        settings, or a checkpoint of an offline run)."""
        if state.get("kind") != STATE_KIND:
            raise errors.DataError("cannot resume: the checkpoint's data state is an offline run's (pairs), not online "
                            "DPO's prompts (dpo.online); use a new workdir")
        if state.get("version") != STATE_VERSION:
            raise errors.DataError(f"prompt iterator state version {state.get('version')} is not {STATE_VERSION}")
        settings = {"batch_size": self.batch_size, "seed": self.seed}
        changed = [f"{k}: {state['settings'].get(k)!r} -> {v!r}" for k, v in settings.items()
                   if state["settings"].get(k) != v]
        saved = state["data"]
        if saved["num_prompts"] != self._data["num_prompts"]:
            changed.append(f"source {self.source!r}: {saved['num_prompts']} -> {self._data['num_prompts']} prompts")
        elif saved["hash"] != self._data["hash"]:
            changed.append(f"source {self.source!r}: the same {saved['num_prompts']} prompts, other records or "
                           "tokens (an edited record, or another tokenizer or chat template)")
        if changed:
            raise errors.DataError("cannot resume the prompt iterator: the prompts or batch settings changed since the "
                            f"checkpoint ({'; '.join(changed)}). Resume with the original ones or start a new workdir.")
        self._batches = int(state["batches"])


def load_prompts(source: str, tokenizer, *, batch_size: int, seed: int, max_length: int, max_new_tokens: int,
                 chat_template: str | None = None, max_record_bytes: int = 0) -> PromptIterator:
    """The `PromptIterator` of `source` (data.train of an online DPO run): prompts of at most
    `max_length - max_new_tokens` tokens, so that a prompt and its completion fit a row."""
    max_prompt_length = max_length - max_new_tokens
    encoder = Encoder(tokenizer, chat_template)
    records, ids, dropped = [], [], 0
    for location, record in read_prompt_records(source, "data.train", max_record_bytes=max_record_bytes):
        prompt_ids = encoder.prompt(prompt_of(record), location)
        if len(prompt_ids) > max_prompt_length:
            dropped += 1
            continue
        records.append(record)
        ids.append(prompt_ids)
    if dropped:
        log.warning("%s: %d of %d prompts dropped: longer than %d tokens (data.max_length less "
                    "dpo.online_max_new_tokens)", source, dropped, dropped + len(records), max_prompt_length)
    return PromptIterator(records, ids, batch_size=batch_size, seed=seed, max_length=max_length, source=source,
                          dropped=dropped)
