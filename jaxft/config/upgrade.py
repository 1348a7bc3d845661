"""The one upgrade step for a saved run config (WORKDIR/config.json, a checkpoint's meta) written by
an older jaxft: every key that did not exist then is filled with the value that reproduces what
that run did, so a resumed, exported or evaluated old run reads every key as an attribute."""

from __future__ import annotations

import copy
from typing import Any, Mapping

from jaxft.config.schema import SECTIONS, keys

# Keys added after runs were saved whose default is not what those runs did: the value that
# reproduces the old behaviour (every other missing key takes its schema default, which is
# what the code did before the key existed).
OLD_VALUES: dict[str, Any] = {
    "model.scan_layers": False,  # runs before the key looped over unstacked layers
}

# Values older configs wrote that mean something else now.
OLD_SPELLINGS: dict[str, dict[Any, Any]] = {
    "model.remat": {True: "full", False: "none"},  # a bool before the remat policies
}


def upgrade(saved: Mapping[str, Any]) -> dict[str, Any]:
    """`saved` (a saved config's dict) with every key of the schema: missing sections and keys
    filled from OLD_VALUES or the schema defaults, old spellings (OLD_SPELLINGS) rewritten.
    Keys the schema does not know are kept (`jaxft.config.typed` names them). A current
    config comes back equal."""
    config = {name: dict(section) if isinstance(section, Mapping) else section
              for name, section in copy.deepcopy(dict(saved)).items()}
    for dotted, field in keys():
        name, key = dotted.split(".")
        section = config.setdefault(name, {})
        if not isinstance(section, dict):
            continue  # not a section: typed() names it
        if key not in section:
            section[key] = OLD_VALUES.get(dotted, field.default)
        spellings = OLD_SPELLINGS.get(dotted, {})
        value = section[key]
        if isinstance(value, bool) and value in spellings:
            section[key] = spellings[value]
    return {name: config[name] for name in [*SECTIONS, *(k for k in config if k not in SECTIONS)]}


def from_saved(saved: Mapping[str, Any], source: str):
    """The typed Config of a saved config (`upgrade`d first); a ConfigError names `source`
    (e.g. "WORKDIR/config.json") and the key when a value has the wrong type."""
    from jaxft.config.schema import typed
    from jaxft.errors import ConfigError

    try:
        return typed(upgrade(saved))
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}. Restore the file from a copy, or start again in a new "
                          "--workdir") from None
