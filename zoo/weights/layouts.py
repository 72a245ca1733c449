"""Which library wrote a checkpoint (timm, torchvision, efficientnet_pytorch, ...), recognized from its keys.

A user's file for `tf_efficientnet_lite0` may be timm's own or the efficientnet_pytorch package's; the default tag's
layout says nothing about it. Every layout the model reads is tried on the file's names and shapes, and the one that
maps the whole file onto the model wins.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from zoo.convert import convert_state_dict
from zoo.weights.errors import WeightsMismatchError


def is_zoo_named(state_dict: Mapping[str, np.ndarray]) -> bool:
    """A file written by this library: its keys are already `params/...` and `batch_stats/...`."""
    return bool(state_dict) and all(k.startswith(("params/", "batch_stats/")) for k in state_dict)


def recognize_layout(state_dict: Mapping[str, np.ndarray], renames: Mapping[str, Callable],
                     target: Mapping[str, tuple[int, ...]], source: str) -> str:
    """The layout in `renames` whose key map fits every entry of `state_dict` onto `target`, covering the most of it.

    When none fits, the error of the layout that came closest is raised (it names the parameters that do not fit).
    """
    fits, failures = [], []
    for layout, rename in renames.items():
        try:
            arrays = convert_state_dict(state_dict, rename, target)
        except WeightsMismatchError as e:
            failures.append((str(e).count("\n"), layout, e))
            continue
        fits.append((len(arrays), layout))
    if fits:
        return max(fits)[1]
    _, layout, error = min(failures)
    raise WeightsMismatchError(f"{source} fits none of the layouts {sorted(renames)} this model reads; "
                               f"closest ('{layout}'): {error}")
