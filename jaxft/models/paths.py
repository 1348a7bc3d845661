"""Reading and writing one leaf of a nested params dict by its state path (a key tuple)."""

from __future__ import annotations


def get_path(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple, value) -> None:
    """Sets tree[path] = value, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
