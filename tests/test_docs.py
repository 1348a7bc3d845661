"""The manual (docs/, mkdocs.yml): its Configs page's key table lists every config key, and the
site builds with `mkdocs build --strict` (no broken link or anchor, no docstring the API pages
cannot render). The build needs the docs extra (`pip install -e ".[docs]"`) and is skipped
without it."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# docs/hooks.py, the mkdocs hook that writes the key table, under a name no other module has
_spec = importlib.util.spec_from_file_location("jaxft_docs_hooks", ROOT / "docs" / "hooks.py")
hooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hooks)


def test_the_configs_page_lists_every_config_key_with_its_default():
    import jaxft.config

    base = jaxft.config.base_config()
    keys = {f"{section}.{key}": value for section, fields in base.items() for key, value in fields.items()}
    table = hooks.on_page_markdown((ROOT / "docs" / "configs.md").read_text(), None, None, None)
    assert hooks.MARKER not in table
    rows = {line.split("|")[1].strip(" `"): line.split("|")[3].strip(" `")
            for line in table.splitlines() if line.startswith("| `")}
    assert rows.keys() == keys.keys()
    assert rows["train.save_every"] == str(keys["train.save_every"])
    assert rows["optim.schedule"] == '"cosine"'


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                    reason='mkdocs is not installed: pip install -e ".[docs]"')
def test_the_manual_builds_strict(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "train.save_every" in (tmp_path / "configs" / "index.html").read_text()
