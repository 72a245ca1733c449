"""What an export of a detection model computes, how it is checked and what its sidecar says.

A detection model (`ModelCfg.task == "detection"`) returns raw per-anchor outputs (`cls_logits` and box codes); its
family module (`zoo.models.<family>`: `ssdlite`, `gfl_lite`) turns them into boxes with `postprocess(outputs,
image_size, settings)` under jit: box decoding, scores, per-class top-k candidates, greedy NMS
(`zoo.layers.nms`, a `fori_loop`) and the best `max_detections` rows padded to a static count. The file holds all
of it (`Detections`), so a caller gets boxes, not anchors, and needs no custom op (no `TFLite_Detection_PostProcess`,
no Flex): four outputs, ordered by name, batch first, D = `settings.max_detections`:

    boxes   (N, D, 4) float32, x0 y0 x1 y1 in input pixels     classes (N, D) int32 (the family's label ids)
    scores  (N, D) float32, decreasing                          valid   (N, D) bool (rows past the detections: False)

The NMS loop's bookkeeping is traced as selections (`zoo.layers.nms`: builtin EQUAL and SELECT_V2, no scatter).
The converter lowers the NMS loop to a WHILE op with its condition and body as subgraphs, the candidate selection to
TOPK_V2 and GATHER_ND; those run on LiteRT's builtin kernels after the network's XNNPACK partition (a few small
partitions more cover parts of the box decoding).
`sidecar` records the op counts of that tail, the settings, the anchor count and the output names.

Full int8 is refused (`check_quantization`): TensorFlow's calibrator crashes (a segmentation fault, TensorFlow
2.21.0) on the first calibration sample of a graph with the NMS WHILE loop, whether the post-processing is kept float
(a float island traced under `export.rewrites.INT8_FLOAT_SCOPE`) or not. Dynamic-range int8 (int8 weights, the
post-processing has none) and fp16 export. For a full-int8 network, export the raw outputs
(`signatures={"serving_default": (lambda m, v, x: m.apply(v, x), shape)}`) and run the family's `postprocess` on
them.

Settings: the family's defaults (`zoo.models.<family>.DETECTION`), or others by passing `detections(module, cfg,
settings)` to `to_tflite` in place of the module. A higher score threshold applied to the file's output gives what a
file exported with it would give: greedy NMS visits by decreasing score, so boxes below a threshold never suppress
those above it.

Verification (`export.verify.DetectionCheck`, chosen by `export.parity.resolve_checks` from the task): the file's
detections matched one to one to JAX's (same class, best IoU first).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import flax.linen as nn

TASK = "detection"
OUTPUTS = ("boxes", "classes", "scores", "valid")
# ops of the post-processing (not those of the network), counted for the sidecar
TAIL_OPS = ("WHILE", "TOPK_V2", "GATHER_ND", "GATHER", "SOFTMAX", "LOGISTIC", "EXP")


def family_postprocess(cfg) -> tuple[Callable, Any]:
    """`(postprocess, default settings)` of a detection model's family module (`zoo.models.<cfg.family>`)."""
    try:
        fam = importlib.import_module(f"zoo.models.{cfg.family}")
    except ModuleNotFoundError:
        fam = None
    if fam is None or not hasattr(fam, "postprocess") or not hasattr(fam, "DETECTION"):
        raise ValueError(f"{cfg.name}: its family {cfg.family!r} has no zoo.models.{cfg.family}.postprocess and "
                         "DETECTION settings to export the detections with")
    return fam.postprocess, fam.DETECTION


class Detections(nn.Module):
    """A detection model followed by its family's post-processing at `image_size`, in the model's own parameter
    scope (the variables keep their paths): `{"boxes", "classes", "scores", "valid"}` (see the module doc)."""

    model: nn.Module
    postprocess: Callable
    image_size: tuple[int, int]
    settings: Any

    def setup(self):
        nn.share_scope(self, self.model)

    def __call__(self, x, train: bool = False):
        d = self.postprocess(self.model(x, train=train), tuple(self.image_size), self.settings)
        return {"boxes": d["boxes"], "classes": d["labels"], "scores": d["scores"], "valid": d["valid"]}


def detections(module: nn.Module, cfg, settings=None) -> Detections:
    """`module` with its family's post-processing at `cfg.input_size` (`settings`: the family's defaults when None).
    A `Detections` module is returned as it is (its image size must be the export's)."""
    if isinstance(module, Detections):
        if tuple(module.image_size) != tuple(cfg.input_size):
            raise ValueError(f"the detections were set up for {tuple(module.image_size)} inputs, the export is at "
                             f"{tuple(cfg.input_size)}: pass input_hw={tuple(module.image_size)}")
        return module
    post, defaults = family_postprocess(cfg)
    return Detections(module, post, tuple(int(v) for v in cfg.input_size), defaults if settings is None else settings)


def check_quantization(quantization: str) -> None:
    """Raise for a quantization a detection file cannot have (full int8: see the module doc)."""
    if quantization == "int8":
        raise ValueError("a detection file holds its NMS loop (a WHILE op), on which TensorFlow's int8 calibrator "
                         "crashes: export it with quantization='dynamic' or 'fp16', or export the raw outputs in "
                         "int8 with signatures=... and run the family's postprocess on them")


def anchor_count(module: Detections, variables, shape) -> int:
    """How many anchors (or anchor-free locations) the raw outputs have at input `shape`, from shapes alone."""
    import jax
    import jax.numpy as jnp

    raw = jax.eval_shape(lambda v, x: module.model.apply(v, x), variables,
                         jax.ShapeDtypeStruct(tuple(shape), jnp.float32))
    return int(raw["cls_logits"].shape[1])


def sidecar(module: Detections, anchors: int, ops) -> dict:
    """The sidecar's `detection` entry: output names, the post-processing settings and image size, the anchor count,
    and the ops of the post-processing found in the file (`ops`: its `export.ops_report.OpsReport`)."""
    import dataclasses

    s = module.settings
    settings = dataclasses.asdict(s) if dataclasses.is_dataclass(s) else dict(s)
    return {"outputs": list(OUTPUTS), "box_format": "xyxy input pixels", "image_size": list(module.image_size),
            "postprocess": f"{module.postprocess.__module__}.{module.postprocess.__name__}",
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
            "anchors": anchors, "tail_ops": {k: ops.ops[k] for k in TAIL_OPS if ops.ops.get(k)}}
