"""Saving and loading pruned models: a JSON architecture (base name + channel widths) and safetensors weights.

Nothing is pickled: `pruned.json` names the registered base architecture, the per-block widths, the few module fields
that may differ (classes, input channels, head width, dropout) and the model config (preprocessing); the weights go to
`model.safetensors` under flat names (`params/stages_0/block_0/conv_pw/kernel`). Both files are written through a temp
file and a rename, weights first, and the JSON records the weights' sha256, so a reader never pairs an architecture
with other or partial weights.

    from compress.prune import prune_channels, save_pruned, load_pruned
    save_pruned(prune_channels(zoo.load("tf_efficientnet_lite0"), 0.3), "runs/lite0_p30")
    model = load_pruned("runs/lite0_p30")     # a zoo.Model: model(images), model.predict(...), export, train.fit
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import jax
import numpy as np

import zoo
from compress.prune_arch import base_name, block_widths, check_supported, module_fields, rebuild
from zoo.abstract import abstract_variables
from zoo.config import ModelCfg
from zoo.convert import flatten_variables
from zoo.weights.download import sha256_file
from zoo.weights.merge import merge_variables
from zoo.weights.torch_reader import save_safetensors_atomic

FORMAT = "zoo-pruned/1"
ARCH_FILE = "pruned.json"
WEIGHTS_FILE = "model.safetensors"


def save_pruned(model: zoo.Model, path: str | os.PathLike) -> Path:
    """Write `model` (a pruned, possibly fine-tuned MobileNet-family `zoo.Model`) to the directory `path`.

    Returns the directory. Raises ValueError, before writing anything, when the module is not the registered base
    architecture with other channel widths (e.g. a changed compute dtype, which is not recorded).
    """
    if not isinstance(model, zoo.Model):
        raise TypeError(f"save_pruned expects a zoo.Model, got {type(model).__name__}")
    module = check_supported(model.module, f"model '{model.cfg.name}'")
    base = base_name(model.cfg.name)
    fields = module_fields(module, base)
    arrays = {k: np.asarray(v) for k, v in zip(flatten_variables(model.variables),
                                                jax.tree_util.tree_leaves(model.variables))}
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; save_pruned writes a directory ({ARCH_FILE} + {WEIGHTS_FILE})")
    weights = save_safetensors_atomic(arrays, out / WEIGHTS_FILE, metadata={"format": FORMAT})
    arch = {
        "format": FORMAT,
        "base": base,
        "widths": block_widths(module),
        "module": fields,
        "cfg": dataclasses.asdict(model.cfg),
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(weights)},
    }
    _write_atomic(out / ARCH_FILE, json.dumps(arch, indent=1) + "\n")
    return out


def load_pruned(path: str | os.PathLike) -> zoo.Model:
    """The `zoo.Model` saved by `save_pruned` in directory `path`, rebuilt with `zoo.create_model(base, stages=...)`."""
    root = Path(path).expanduser()
    arch_path = root / ARCH_FILE
    if not arch_path.is_file():
        raise FileNotFoundError(f"no {ARCH_FILE} in {root}: not a directory written by save_pruned")
    try:
        arch = json.loads(arch_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{arch_path} is not valid JSON: {e}") from None
    if not isinstance(arch, dict) or arch.get("format") != FORMAT:
        found = arch.get("format") if isinstance(arch, dict) else type(arch).__name__
        raise ValueError(f"{arch_path}: format {found!r}, expected {FORMAT!r}")
    weights = root / arch["weights"]["file"]
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing (named by {arch_path})")
    if sha256_file(weights) != arch["weights"]["sha256"]:
        raise ValueError(f"{weights} does not hold the weights {arch_path} was saved with (sha256 differs); "
                         "save the model again")
    cfg = ModelCfg.from_dict(arch["cfg"])
    module = rebuild(arch["base"], arch["widths"], arch["module"])
    from safetensors.numpy import load_file

    abstract = abstract_variables(module, (1, 32, 32, module.in_chans))
    variables = merge_variables(abstract, load_file(str(weights)))  # strict: lists missing/extra/mis-shaped arrays
    return zoo.Model(module, jax.device_put(variables), cfg)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".part-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
