"""mkdocs hook: the Configs page's key table, generated at build time from the config schema.

A page holding the line `<!-- config-keys -->` gets, in its place, one table per config section
(key, default, meaning). The rows come from `jaxft.config.key_table()` (a list of
{"key": "train.steps", "default": ..., "doc": "..."}, built from the schema); a jaxft without it
falls back to `jaxft.config.base_config()`'s keys and defaults, with each key's comments in
jaxft/config.py as its meaning. Either way a key added to the schema shows up here unedited.
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import sys
import textwrap
import tokenize
from pathlib import Path

MARKER = "<!-- config-keys -->"
ROOT = Path(__file__).resolve().parents[1]


def _comments_by_key(source: str) -> dict[str, str]:
    """name -> its comments in base_config's source, in source order: for a key
    (`c.train.steps = 0`: "train.steps") the comment lines right above it and the one at the end
    of its line; for a section (`c.mesh = ConfigDict()`: "mesh") the lines above it."""
    comments = {}  # line number -> (comment text, whether the line holds only the comment)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), tok.line.strip().startswith("#"))
    func = next(n for n in ast.walk(ast.parse(source))
                if isinstance(n, ast.FunctionDef) and n.name == "base_config")
    docs = {}
    for node in func.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target = ast.unparse(node.targets[0])
        if not target.startswith("c.") or target.count(".") not in (1, 2):
            continue
        above, line = [], node.lineno - 1
        while line in comments and comments[line][1]:
            above.insert(0, comments[line][0])
            line -= 1
        end = comments.get(node.end_lineno)
        after = [end[0]] if end and not end[1] else []
        docs[target[2:]] = " ".join(above + after)
    return docs


def _fallback_rows(config_module) -> list[dict]:
    base = config_module.base_config()
    docs = _comments_by_key(textwrap.dedent(inspect.getsource(config_module.base_config)))
    keys = [k for k in docs if "." in k]
    keys += sorted(f"{s}.{k}" for s, v in base.items() for k in v if f"{s}.{k}" not in docs)
    rows = []
    for key in keys:
        section, name = key.split(".")
        rows.append({"key": key, "default": base[section][name], "doc": docs.get(key, ""),
                     "section_doc": docs.get(section, "")})
    return rows


def key_rows() -> tuple[list[dict], str]:
    """The rows and where they came from."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import jaxft.config as config_module

    if hasattr(config_module, "key_table"):
        return list(config_module.key_table()), "jaxft.config.key_table()"
    return _fallback_rows(config_module), "jaxft.config.base_config() and its comments"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(value) -> str:
    text = json.dumps(value) if isinstance(value, (str, bool)) or value is None else repr(value)
    return f"`{_cell(text)}`"


def key_table_markdown() -> str:
    rows, source = key_rows()
    out, section = [f"*Generated from `{source}` when this site was built: {len(rows)} keys.*", ""], None
    for row in rows:
        head = row["key"].split(".", 1)[0]
        if head != section:
            section = head
            out += ["", f"### {section}", ""]
            if row.get("section_doc"):
                out += [row["section_doc"], ""]
            out += ["| key | default | meaning |", "|---|---|---|"]
        out.append(f"| `{row['key']}` | {_default(row['default'])} | {_cell(row.get('doc', ''))} |")
    return "\n".join(out) + "\n"


def on_page_markdown(markdown, page, config, files):
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, key_table_markdown())
