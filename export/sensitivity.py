"""Where a full-int8 export loses accuracy: the model's parts ranked by what keeping each one in float buys.

    import zoo
    from export.sensitivity import int8_sensitivity, markdown

    model = zoo.load("mobilenet_v2")
    rows = int8_sensitivity(model, representative_data=calib, verify_data=x, calibration="percentile")
    print(markdown(rows))      # baseline first, then the parts, largest SQNR gain first

One all-int8 export (the baseline), then one export per part (`stem`, `stages_0`, ..., `head`; or deeper module
paths such as `stages_5/block_0`, to look inside a part that stands out) with that part's ops kept float
(`to_tflite(int8_keep_float=...)`), each verified against JAX on the same inputs. A part's gain is the
output SQNR of its export minus the baseline's: the int8 noise that part adds, as the rest of the network passes it
on. Keeping a part float leaves its input and output quantized (the tensors that cross into int8 neighbours), so the
gain counts the rounding inside the part only.

Read it like TF's QuantizationDebugger, at the level of the model's structure: one part far ahead of the others is a
local problem (an activation range that equalization or a range method fixes, or a part to keep float or to retrain
quantization-aware); gains spread evenly over the parts mean the noise is everywhere, which only quantization-aware
training reduces. Every row is a full export, so this takes (parts + 1) times an int8 export.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass

import numpy as np

from export.tflite import DEFAULT_INT8_KEEP_FLOAT, _resolve_model, resolve_keep_float, to_tflite

BASELINE = "(none: all int8)"


@dataclass(frozen=True)
class PartSensitivity:
    part: str  # module path kept float; BASELINE for the all-int8 export
    params: int  # parameters inside the part
    sqnr_db: float  # output SQNR against JAX on the verify inputs
    gain_db: float  # sqnr_db minus the baseline's
    top1_agreement: float
    float_islands: int  # float runs between int8 ops in this export
    size_mb: float


def model_parts(module, variables, input_shape) -> tuple[str, ...]:
    """The model's top-level submodules that hold parameters, in call order (e.g. stem, stages_0, ..., head)."""
    import flax.linen as nn
    import jax

    order: list[str] = []

    def record(next_fun, args, kwargs, ctx):
        path = ctx.module.path
        if path and path[0] not in order:
            order.append(path[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables,
                       jax.ShapeDtypeStruct(tuple(input_shape), np.float32))
    return tuple(p for p in order if p in variables["params"])


def _part_pattern(part: str) -> str:
    # Tensor names and variable paths both carry the module path as "/part/...".
    return "/" + re.escape(part) + "/"


def parts_pattern(parts, keep: str | None = None) -> str | None:
    """The `int8_keep_float` regex that keeps `parts` (module paths) float, on top of `keep`."""
    return "|".join(p for p in (keep, *(_part_pattern(part) for part in parts)) if p) or None


def _module_paths(variables) -> tuple[str, ...]:
    """Every module path that holds parameters, at any depth ("stages_5", "stages_5/block_0", ...)."""
    import jax

    paths: dict[str, None] = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
        keys = [str(getattr(k, "key", k)) for k in path][:-1]  # without the parameter's own name
        for depth in range(1, len(keys) + 1):
            paths["/".join(keys[:depth])] = None
    return tuple(paths)


def check_parts(parts, top_level: tuple[str, ...], variables) -> tuple[str, ...]:
    """`parts` as given, once each is known to be a module path of the model (else close matches are named) whose
    "/part/" pattern matches no deeper module as well."""
    parts = tuple(parts)
    if not parts:
        raise ValueError(f"parts is empty; choose from {', '.join(top_level)} (or pass parts=None for all)")
    paths = _module_paths(variables)
    for p in parts:
        if p not in paths:
            same_depth = [q for q in paths if q.count("/") == str(p).count("/")]
            close = difflib.get_close_matches(str(p), same_depth, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown part {p!r}: not a module path of the model (its top-level parts are "
                             f"{', '.join(top_level)}; deeper ones look like 'stages_1/block_0'){hint}")
    for q in paths:  # "/part/" must not also match a module deeper in the tree, whose ops it would keep float too
        for p in parts:
            if f"/{q}/".find(f"/{p}/", 1) > 0:
                raise ValueError(f"part {p!r} also names a nested module ({q}); its ops cannot be told apart by name")
    return parts


def _check_baseline(baseline, module, variables, x) -> None:
    """The given all-int8 result must have been verified on these inputs against this model."""
    from export.parity import _reference

    if getattr(baseline, "quantization", None) != "int8" or baseline.reference is None:
        raise ValueError("baseline must be the result of a full-int8 to_tflite export with verify_data")
    if len(baseline.reference) != len(x) or not np.allclose(baseline.reference, _reference(module, variables, x),
                                                             rtol=1e-5, atol=1e-5):
        raise ValueError(f"baseline was verified on other inputs or another model ({len(baseline.reference)} "
                         f"reference outputs, {len(x)} verify inputs here); export it with the same verify_data")


def int8_sensitivity(model_or_module, variables=None, *, representative_data, verify_data, verify_labels=None,
                     parts=None, cfg=None, baseline=None, progress: bool = True,
                     **export_options) -> list[PartSensitivity]:
    """Rows for the all-int8 export and for each part kept float (see the module doc), largest gain first.

    representative_data / verify_data: as for `to_tflite` (float NHWC, preprocessed like the model's input); the
        verify inputs should be real images, since the gains are measured on them.
    parts: module paths to try: top-level names (default: every one, `model_parts`) or deeper paths such as
        "stages_5/block_0", to look inside a part that stands out.
    baseline: the all-int8 `to_tflite` result for the same model, options and verify_data, if the caller already
        made it (as `zoo export --sensitivity` does); it stands in for the first row's export.
    export_options: passed to every `to_tflite` call (e.g. `calibration="percentile"`, `input_hw`,
        `equalization=False`); a given `int8_keep_float` stays float in every row, the part is added to it.
    """
    if "quantization" in export_options or "out" in export_options:
        raise ValueError("int8_sensitivity always makes full-int8 exports and writes no files; drop quantization=/out=")
    if representative_data is None or verify_data is None:
        raise ValueError("int8_sensitivity needs representative_data (calibration) and verify_data (the inputs the "
                         "SQNR is measured on)")
    module, variables, cfg, _, name = _resolve_model(model_or_module, variables, cfg, None,
                                                     export_options.pop("name", None), progress)
    x = np.asarray(verify_data)
    if x.ndim != 4:
        raise ValueError(f"verify_data must be a float NHWC batch, got shape {x.shape}")
    available = model_parts(module, variables, (1, *x.shape[1:]))
    parts = check_parts(available if parts is None else parts, available, variables)
    keep = resolve_keep_float(export_options.pop("int8_keep_float", DEFAULT_INT8_KEEP_FLOAT), module, variables,
                              (1, *x.shape[1:]))

    def export(part: str | None):
        pattern = parts_pattern((part,) if part else (), keep)
        return to_tflite(module, variables, quantization="int8", representative_data=representative_data,
                         verify_data=x, verify_labels=verify_labels, cfg=cfg, name=name, int8_keep_float=pattern,
                         progress=False, **export_options)

    def row(part: str, res, base_sqnr: float) -> PartSensitivity:
        import jax

        tree = variables["params"]
        for key in ([] if part == BASELINE else part.split("/")):
            tree = tree[key]
        n = 0 if part == BASELINE else sum(int(np.size(a)) for a in jax.tree.leaves(tree))
        v = res.verification
        return PartSensitivity(part, n, round(v.sqnr_db, 2), round(v.sqnr_db - base_sqnr, 2),
                               round(v.top1_agreement, 4), len(res.ops.float_islands), round(res.size_bytes / 1e6, 3))

    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    if baseline is not None:
        _check_baseline(baseline, module, variables, x)
    say(f"int8 sensitivity of {name}: {len(parts) + (baseline is None)} exports on {len(x)} input(s)")
    base = export(None) if baseline is None else baseline
    if export_options.get("int8_split_top_row", "auto") == "auto":  # every row with the baseline's row split
        export_options["int8_split_top_row"] = base.metadata["int8_split_top_row"]
    base_sqnr = base.verification.sqnr_db
    say(f"[1/{len(parts) + 1}] all int8: SQNR {base_sqnr:.2f} dB, top-1 agreement {base.verification.top1_agreement:.1%}")
    rows = []
    for k, part in enumerate(parts, 2):
        r = row(part, export(part), base_sqnr)
        say(f"[{k}/{len(parts) + 1}] {part} float: SQNR {r.sqnr_db:.2f} dB ({r.gain_db:+.2f}), top-1 agreement "
            f"{r.top1_agreement:.1%}")
        rows.append(r)
    return [row(BASELINE, base, base_sqnr)] + sorted(rows, key=lambda r: -r.gain_db)


def markdown(rows: list[PartSensitivity]) -> str:
    head = ("| kept float | params | SQNR dB | gain dB | top-1 agreement | float islands | MB |\n"
            "|---|---|---|---|---|---|---|\n")
    return head + "".join(f"| {r.part} | {r.params:,} | {r.sqnr_db:.2f} | {r.gain_db:+.2f} | {r.top1_agreement:.1%} | "
                          f"{r.float_islands} | {r.size_mb:.2f} |\n" for r in rows)
