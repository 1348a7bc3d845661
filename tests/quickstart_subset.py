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


def tiny_model_folder(folder: Path, *, seed: int = 1) -> Path:
    """A one-layer tiny model (random weights, `seed`) saved with the bundled tokenizer, its
    special tokens in the config: a Hugging Face folder for eval, sampling and iterate tests."""
    from jaxft.data.from_config import load_bundled_tokenizer
    from jaxft.models import create_model, get_preset, save_hf

    tok = load_bundled_tokenizer()
    cfg = get_preset("tiny").replace(num_layers=1, bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    save_hf(create_model(cfg, seed=seed), folder, tokenizer=tok)
    return Path(folder)
