"""Nested variable trees <-> flat `"a/b/c"` keys: the one naming that checkpoints, masks and reports share."""

from __future__ import annotations

from typing import Any

from flax import traverse_util


def flatten(tree) -> dict[str, Any]:
    """{"stem/conv/kernel": leaf, ...} of a nested dict (empty for an empty or None tree)."""
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()} if tree else {}


def unflatten(flat: dict[str, Any]) -> dict:
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()}) if flat else {}
