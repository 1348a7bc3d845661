"""What loading one source produced: its examples and a report of what happened to its
records (tokenize builds them; the tokenised cache stores and restores them)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class DataReport:
    """What loading one source did. Lengths are tokens per example (a pair: its longer side).

    raw_lengths: every tokenized record, before truncation (what max_length is chosen from).
    lengths: the kept examples, after truncation.
    num_dropped_too_long counts both drop mode and prompts that fill max_length; the latter
    are also in num_prompt_too_long. num_no_trained_tokens: records dropped because nothing of
    them would be trained (their loss mask is all 0). num_too_large: records over
    max_record_bytes, dropped unread (`first_too_large`: the location of the first). errors:
    (location, message) of the first invalid records.
    """
    source: str
    num_records: int = 0
    num_examples: int = 0
    format_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    num_truncated: int = 0
    num_dropped_too_long: int = 0
    num_prompt_too_long: int = 0
    num_no_trained_tokens: int = 0
    num_too_large: int = 0
    first_too_large: str = ""
    num_skipped: int = 0
    errors: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    raw_lengths: list[int] = dataclasses.field(default_factory=list)
    lengths: list[int] = dataclasses.field(default_factory=list)
    num_tokens: int = 0  # tokens of the kept examples (a pair: both sequences)
    num_trained_tokens: int = 0  # of which trained (loss mask 1)
    seconds: float = 0.0  # time to read and tokenise (0 when read from a cache)
    cache: str = ""  # the tokenised cache folder it was read from or written to, if any

    def count_outcome(self, fmt: str, example, status: str) -> bool:
        """Counts one tokenised record (`process_record`'s format, example and status): its
        format, and why it was dropped or whether it was truncated. True when it is kept."""
        self.format_counts[fmt] = self.format_counts.get(fmt, 0) + 1
        if example is None:
            self.num_no_trained_tokens += status == "no_trained_tokens"
            self.num_dropped_too_long += status != "no_trained_tokens"
            self.num_prompt_too_long += status == "prompt_too_long"
            return False
        self.num_truncated += status == "truncated"
        return True

    def summary(self) -> str:
        """One line: what training gets from this source (the run logs it; check-data prints it)."""
        return (f"{self.num_examples} examples of {self.num_records} records, {self.num_tokens} tokens "
                f"({self.num_trained_tokens} trained), {self.num_truncated} truncated, "
                f"{self.num_dropped_too_long} dropped as too long, "
                + (f"{self.num_no_trained_tokens} dropped with no trained token, "
                   if self.num_no_trained_tokens else "")
                + (f"{self.num_too_large} dropped over data.max_record_bytes (the first: "
                   f"{self.first_too_large}), " if self.num_too_large else "")
                + f"{self.num_skipped} invalid")


@dataclasses.dataclass
class ExampleSet:
    """Tokenized examples of one source (`example.index` = the record's index in it) and its report."""
    examples: list
    report: DataReport
