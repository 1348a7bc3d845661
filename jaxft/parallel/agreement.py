"""Hosts that disagree are an error at start-up, not a hang or a silent divergence.

Every process of a multi-host run must run the same jaxft, the same config and read the same
model, tokenizer and data. `check_hosts_agree(config)` digests each of those on every host,
gathers the digests, and on any difference raises on every host the same error naming the
hosts and the fields that differ from process 0 (this host's values are in the message).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import json
from pathlib import Path

import jax
import numpy as np

from jaxft.errors import ConfigError

HEAD_BYTES = 2**20  # data files are compared by size and a hash of their first MiB
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                    "special_tokens_map.json", "chat_template.jinja", "qwen.tiktoken")


def _file_summary(path: Path) -> str:
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()[:16]
    return f"{path} ({path.stat().st_size} bytes, first MiB {head})"


def _data_files(spec: str) -> list[str]:
    """Every local file behind a data spec (mixtures "a.jsonl=0.3,b.jsonl=0.7", globs, folders);
    hub dataset names as they are."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        source = part.rsplit("=", 1)[0] if "=" in part else part
        matches = sorted(glob.glob(source)) or [source]
        for m in matches:
            p = Path(m)
            if p.is_dir():
                out += [_file_summary(f) for f in sorted(p.rglob("*")) if f.is_file()]
            elif p.is_file():
                out.append(_file_summary(p))
            else:
                out.append(f"{m} (not a local file)")
    return out


def _folder_files(folder: str, names=None) -> list[str]:
    if not folder or not Path(folder).is_dir():
        return [f"{folder or '(none)'} (not a local folder)"]
    files = sorted(f for f in Path(folder).iterdir() if f.is_file() and (names is None or f.name in names))
    return [_file_summary(f) for f in files]


def host_fingerprint(config) -> dict[str, str]:
    """{field: this host's value} for everything the hosts of one run must share."""
    try:
        version = importlib.metadata.version("jaxft")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    model = config.model.path
    tokenizer = config.model.tokenizer or model
    return {
        "jaxft version": version,
        "config": hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest(),
        "model": "; ".join(_folder_files(model, {"config.json", "model.safetensors.index.json"})) if model
        else f"preset {config.model.preset}",
        "tokenizer": "; ".join(_folder_files(tokenizer, _TOKENIZER_FILES)) if tokenizer else "bundled",
        "data.train": "; ".join(_data_files(config.data.train)),
        "data.eval": "; ".join(_data_files(config.data.eval)),
    }


def _digest(value: str) -> np.ndarray:
    return np.frombuffer(hashlib.sha256(value.encode()).digest()[:16], np.uint8)


def disagreements(digests: np.ndarray, fields) -> list[tuple[int, str]]:
    """(process, field) for every field whose digest differs from process 0's. digests: [P, F, 16]."""
    return [(p, field) for p in range(1, digests.shape[0]) for f, field in enumerate(fields)
            if not np.array_equal(digests[p, f], digests[0, f])]


def check_hosts_agree(config) -> None:
    """Raises on every host if any host's fingerprint differs from process 0's (no-op on one host)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    mine = host_fingerprint(config)
    local = np.stack([_digest(v) for v in mine.values()])  # [F, 16]
    digests = np.asarray(multihost_utils.process_allgather(local))  # [P, F, 16]
    bad = disagreements(digests, list(mine))
    if not bad:
        return
    by_host: dict[int, list[str]] = {}
    for p, field in bad:
        by_host.setdefault(p, []).append(field)
    where = "; ".join(f"process {p} differs in {', '.join(fields)}" for p, fields in sorted(by_host.items()))
    here = jax.process_index()
    mine_text = "; ".join(f"{f} = {mine[f]}" for f in sorted({f for _, f in bad}))
    raise ConfigError(
        f"the hosts of this run disagree with process 0: {where}. Every host must run the same jaxft "
        f"and config on the same model, tokenizer and data files (same paths, same contents). "
        f"On this host (process {here}): {mine_text}"
    )


__all__ = ["check_hosts_agree", "disagreements", "host_fingerprint"]
