"""The first lines of the bundled quickstart data as files: tokenising all of it costs seconds."""

from pathlib import Path

from jaxft.data.assets import quickstart_file


def quickstart_head(folder: Path, name: str, lines: int) -> Path:
    """A copy of the first `lines` records of quickstart file `name`, in `folder`."""
    path = Path(folder) / name
    path.write_text("\n".join(quickstart_file(name).read_text().splitlines()[:lines]) + "\n")
    return path


def sft_data(folder: Path, train_lines: int, eval_lines: int = 16) -> dict:
    """{"data.train": ..., "data.eval": ...} overrides of the first lines of the SFT data."""
    return {"data.train": str(quickstart_head(folder, "sft_train.jsonl", train_lines)),
            "data.eval": str(quickstart_head(folder, "sft_eval.jsonl", eval_lines))}
