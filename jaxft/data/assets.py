"""Paths of the files jaxft ships: the bundled tokenizer and the quickstart data."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
QUICKSTART_DIR = ASSETS_DIR / "quickstart"
BUNDLED_TOKENIZER_DIR = ASSETS_DIR / "tokenizer"  # trained by `python -m jaxft.quickstart.tokenizer`


def quickstart_file(name: str) -> Path:
    """A bundled quickstart data file (sft_train.jsonl, sft_eval.jsonl, pref_train.jsonl, pref_eval.jsonl)."""
    return QUICKSTART_DIR / name
