"""mkdocs hook: the Configs page's key table, generated at build time from the config schema.

A page holding the line `<!-- config-keys -->` gets, in its place, one table per config section
(key, type, default, meaning): the rows of `jaxft.config.key_table()` ({"key": "train.steps",
"default": 0, "type": "int", "doc": "..."} for every key, from the frozen dataclasses of
jaxft/config/schema.py) under each section's doc (`jaxft.config.section_docs()`). A key added to
the schema shows up here without editing the page.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MARKER = "<!-- config-keys -->"
ROOT = Path(__file__).resolve().parents[1]


def _config_module():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import jaxft.config

    return jaxft.config


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(value) -> str:
    text = json.dumps(value) if isinstance(value, (str, bool)) or value is None else repr(value)
    return f"`{text}`"


def key_table_markdown() -> str:
    config = _config_module()
    rows = list(config.key_table())
    section_docs = config.section_docs() if hasattr(config, "section_docs") else {}
    out, section = [f"*Generated from `jaxft.config.key_table()` when this site was built: {len(rows)} keys.*"], None
    for row in rows:
        head = row["key"].split(".", 1)[0]
        if head != section:
            section = head
            out += ["", f"### {section}", ""]
            if section_docs.get(section):
                out += [_cell(section_docs[section]), ""]
            out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        out.append(f"| `{row['key']}` | {row.get('type', '')} | {_default(row['default'])} | {_cell(row.get('doc', ''))} |")
    return "\n".join(out) + "\n"


def on_page_markdown(markdown, page, config, files):
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, key_table_markdown())
