"""What an export of a detection model computes, how it is checked and what its sidecar says.

A detection model (`ModelCfg.task == "detection"`) returns raw per-anchor outputs (`cls_logits` and box codes); its
family module (`zoo.models.<family>`: `ssdlite`, `gfl_lite`) turns them into boxes with `postprocess(outputs,
image_size, settings)` under jit: box decoding, scores, per-class top-k candidates, greedy NMS
(`zoo.layers.nms`, a `fori_loop`) and the best `max_detections` rows padded to a static count. The file holds all
of it (`Detections`), so a caller gets boxes, not anchors, and needs no custom op (no `TFLite_Detection_PostProcess`,
no Flex): four outputs, ordered by name, batch first, D = `settings.max_detections`:

    boxes   (N, D, 4) float32, x0 y0 x1 y1 in input pixels     classes (N, D) int32 (the family's label ids)
    scores  (N, D) float32, decreasing                          valid   (N, D) bool (rows past the detections: False)

The NMS loop records each visited candidate with `keep.at[..., i].set(kept)`, a StableHLO scatter the converter
leaves as STABLEHLO_SCATTER (no LiteRT kernel); `slice_set_as_select` traces every such one-index scatter as the
same selection, `where(iota == i, update, keep)`, which becomes builtin EQUAL and SELECT_V2. The converter lowers
the NMS loop to a WHILE op with its condition and body as subgraphs, the candidate selection to TOPK_V2 and
GATHER_ND; those run on LiteRT's builtin kernels after the network's XNNPACK partition (a few small partitions more
cover parts of the box decoding).
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


def _one_index_axis(eqn) -> int | None:
    """The axis of a scatter that overwrites one index of one axis with a whole slice (`a.at[..., i].set(u)`), or
    None for any other equation."""
    if eqn.primitive.name != "scatter" or eqn.params.get("update_jaxpr") is not None:
        return None
    dn = eqn.params["dimension_numbers"]
    operand, index, update = (v.aval for v in eqn.invars)
    if (index.shape != (1,) or len(dn.inserted_window_dims) != 1 or dn.operand_batching_dims
            or tuple(dn.scatter_dims_to_operand_dims) != tuple(dn.inserted_window_dims)):
        return None
    ax = dn.inserted_window_dims[0]
    if tuple(dn.update_window_dims) != tuple(range(update.ndim)) or \
            update.shape != operand.shape[:ax] + operand.shape[ax + 1:]:
        return None
    return ax


def _select(operand, index, update, ax: int):
    """`operand` with `update` at `index[0]` along `ax` (an index out of range changes nothing: FILL_OR_DROP)."""
    import jax
    import jax.numpy as jnp

    at = jax.lax.broadcasted_iota(jnp.int32, operand.shape, ax) == index[0].astype(jnp.int32)
    return jnp.where(at, jnp.expand_dims(update, ax).astype(operand.dtype), operand)


def _has_one_index_set(jaxpr) -> bool:
    return any(_one_index_axis(e) is not None or any(_has_one_index_set(s.jaxpr) for s in _subjaxprs(e.params))
               for e in jaxpr.eqns)


def _subjaxprs(params) -> list:
    from jax.extend.core import ClosedJaxpr

    return [s for p in params.values() for s in (p if isinstance(p, (tuple, list)) else (p,))
            if isinstance(s, ClosedJaxpr)]


def _rewritten(closed):
    """A ClosedJaxpr with its one-index scatters (nested ones too) traced as selections."""
    import jax

    if not _has_one_index_set(closed.jaxpr):
        return closed
    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in closed.in_avals]
    return jax.make_jaxpr(lambda *args: _evaluate(closed, args))(*avals)


def _evaluate(closed, args) -> list:
    """Run `closed` on `args`, equation by equation (keeping each one's name stack), with the substitution."""
    from jax._src import source_info_util  # as export.broadcast_resize: each equation keeps its name stack
    from jax.extend.core import ClosedJaxpr, Literal

    jaxpr = closed.jaxpr
    env = dict(zip(jaxpr.constvars, closed.consts))
    env.update(zip(jaxpr.invars, args))
    read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        with source_info_util.user_context(eqn.source_info.traceback, name_stack=(
                source_info_util.current_name_stack() + eqn.source_info.name_stack)), eqn.ctx.manager:
            ax = _one_index_axis(eqn)
            if ax is not None:
                outs = [_select(*invals, ax)]
            else:
                params = {k: _rewritten(v) if isinstance(v, ClosedJaxpr) else
                          tuple(_rewritten(s) if isinstance(s, ClosedJaxpr) else s for s in v)
                          if type(v) is tuple and _subjaxprs({k: v}) else v for k, v in eqn.params.items()}
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
                outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def slice_set_as_select(fn: Callable) -> Callable:
    """`fn` with every one-index scatter (`a.at[..., i].set(u)`, in loop bodies too) computed as a selection: the
    same values, builtin TFLite ops instead of STABLEHLO_SCATTER (module doc)."""
    import jax

    def run(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        if not _has_one_index_set(closed.jaxpr):
            return fn(*args)
        outs = _evaluate(closed, jax.tree_util.tree_leaves(args))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return run
