"""`to_tflite`: a zoo model -> a verified .tflite (fp32, fp16, dynamic-range int8 or full int8) with its sidecar.

Path: jax2tf native serialization (`export.trace`) -> `tf.lite.TFLiteConverter.from_concrete_functions`, which
legalizes the StableHLO into builtin TFLite ops and folds BatchNorm into the convolutions (`export.convert`) -> op
report (`export.ops_report`) -> verification of every signature in the LiteRT interpreter against JAX
(`export.parity`, with the task's `export.verify.OutputCheck`) -> atomic write of the model and its
`model.tflite.json` sidecar (`export.metadata`), only once everything passed. A file holds the model's forward
(outputs named by the keys of a dict it returns) or several signatures (`export.signatures`). The model's task
(`ModelCfg.task`) says what its forward exports and how it is checked: a segmentation model's file holds its main
per-pixel logits, checked by pixel agreement and mIoU (`export.segmentation`).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export import calibration as calib_io
from export import metadata, ops_report, parity, row_split
from export import detection as det
from export import segmentation as seg
from export import signatures as sigs
from export.broadcast_resize import broadcast_as_resize
from export.convert import RangeHook, calibration_samples, convert
from export.errors import UnsupportedOpsError
from export.parity import _reference  # noqa: F401 - where callers have found the cached JAX reference
from export.rewrites import FLOAT_ACTIVATIONS, INT8_ACTIVATIONS, INT8_FLOAT_SCOPE, relu_before_concatenate
from export.verify import DEFAULT_ATOL, DEFAULT_RTOL
from zoo.abstract import abstract_variables

QUANTIZATIONS = ("fp32", "fp16", "dynamic", "int8")
_ALIASES = {None: "fp32", "fp32": "fp32", "float32": "fp32", "none": "fp32", "fp16": "fp16", "float16": "fp16",
            "dynamic": "dynamic", "int8": "int8"}
DEFAULT_NUM_VERIFY = 8
# Module paths kept in float by full-int8 exports: LayerNorm and attention of transformer blocks (MobileViT). In int8
# they ruin accuracy and fall off XNNPACK: a random-weight MobileViT-XXS at 128x128 went from -0.9 dB output SQNR,
# 66% top-1 agreement and 52 delegate partitions (ADD, RSQRT, BATCH_MATMUL, SOFTMAX on builtin kernels) to 9.9 dB,
# 89% and 1 partition, and ran faster (4.6 -> 3.8 ms), with them in float.
# "auto": the layers whose kind keeps float in int8 (zoo.layers.kinds: LayerNorm, softmax attention), by module path.
DEFAULT_INT8_KEEP_FLOAT = "auto"
# How full-int8 activation ranges are chosen from the calibration data: the converter's own min/max, or replaced
# before quantization by percentile clipping or the int8 MSE-optimal range (export.ptq_ranges).
CALIBRATIONS = ("minmax", "percentile", "mse")


@dataclass
class ExportResult:
    """What an export produced and how it checked out. `content` is the .tflite flatbuffer."""

    name: str
    quantization: str
    input_shape: tuple[int, ...]  # the (first) signature's first input, batch first
    content: bytes = field(repr=False)
    path: Path | None
    ops: ops_report.OpsReport = field(repr=False)
    delegate: object | None  # runtime.DelegateReport: XNNPACK partitions of the verifying interpreter
    verification: object | None  # the (first) signature's check report: verify.VerifyReport for classification
    metadata: dict = field(repr=False)
    timings: dict[str, float] = field(default_factory=dict)
    # exported model's outputs on the verify inputs, and JAX's: an array, or a dict by output name for several
    # outputs; for a file of several signatures, a dict by signature key of those
    outputs: np.ndarray | dict | None = field(default=None, repr=False)
    reference: np.ndarray | dict | None = field(default=None, repr=False)
    verifications: dict[str, object] = field(default_factory=dict, repr=False)  # signature key -> check report
    signatures: dict[str, dict] = field(default_factory=dict, repr=False)  # key -> {"inputs", "outputs"}: TensorInfo

    @property
    def size_bytes(self) -> int:
        return len(self.content)

    def summary(self) -> str:
        shape = self.input_shape
        where = f" -> {self.path}" if self.path else ""
        total = sum(self.timings.values())
        inp = (f"input {shape[1]}x{shape[2]}x{shape[3]}, batch {shape[0]}" if len(shape) == 4
               else f"input {list(shape)}")
        lines = [f"{self.name}{where}: {self.quantization}, {self.size_bytes / 1e6:.2f} MB, {inp} (exported in "
                 f"{total:.1f} s: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()) + ")",
                 self.ops.summary()]
        if self.delegate is not None:
            lines.append(self.delegate.summary())
        if len(self.verifications) > 1:
            lines += [f"signature {k}: {r.summary()}" for k, r in self.verifications.items()]
        elif self.verification is not None:
            lines.append(self.verification.summary())
        return "\n".join(lines)


def check_quantization(quantization) -> str:
    key = quantization.lower() if isinstance(quantization, str) else quantization
    if key not in _ALIASES:
        raise ValueError(f"unsupported quantization {quantization!r}; choose None (fp32), 'fp16', 'dynamic' or 'int8'")
    return _ALIASES[key]


class _Progress:
    def __init__(self, enabled: bool, name: str):
        self.enabled, self.name, self.t0 = enabled, name, time.perf_counter()
        self.timings: dict[str, float] = {}
        self._stage, self._start = None, None

    def stage(self, key: str, message: str) -> None:
        self.end()
        self._stage, self._start = key, time.perf_counter()
        if self.enabled:
            print(f"[export {self.name}] {message}", file=sys.stderr, flush=True)

    def end(self) -> None:
        if self._stage is not None:
            self.timings[self._stage] = time.perf_counter() - self._start
            self._stage = None


def _resolve_model(model_or_module, variables, cfg, labels, name, progress):
    """(module, variables, cfg, labels, name) from a zoo.Model, a model name or a bare linen module."""
    import flax.linen as nn

    import zoo

    if isinstance(model_or_module, str):
        model_or_module = zoo.load(model_or_module, progress=progress)
    if isinstance(model_or_module, zoo.Model):
        m = model_or_module
        return (m.module, m.variables if variables is None else variables, cfg or m.cfg,
                labels if labels is not None else m.labels, name or m.name)
    if not isinstance(model_or_module, nn.Module):
        raise TypeError("expected a zoo.Model, a model name or a flax linen Module, got "
                        f"{type(model_or_module).__name__}")
    if variables is None:
        raise ValueError("a bare module needs its variables: to_tflite(module, variables, ...)")
    return model_or_module, variables, cfg, labels, name or (cfg.name if cfg else type(model_or_module).__name__)


def _check_out(out) -> Path | None:
    if out is None:
        return None
    path = Path(out).expanduser()
    if path.is_dir():
        raise ValueError(f"out={str(out)!r} is a directory; give a file name such as model.tflite")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _versions(target: str | None) -> dict:
    import jax

    import zoo

    out = {"zoo": zoo.__version__, "jax": jax.__version__, "stablehlo_target": target}
    for mod in ("tensorflow", "ai_edge_litert"):
        m = sys.modules.get(mod)
        out[mod] = getattr(m, "__version__", None) if m else None
    if out["ai_edge_litert"] is None:
        try:
            from importlib.metadata import version

            out["ai_edge_litert"] = version("ai-edge-litert")
        except Exception:  # pragma: no cover
            pass
    return out


def int8_float_pattern(module, variables=None, input_shape=None) -> str | None:
    """The "auto" `int8_keep_float`: a regex over the module paths of every layer whose kind the layer-kinds table
    keeps float in int8 files (None when the model has none). `variables` may be None (abstract init)."""
    import jax
    import jax.numpy as jnp

    from compress.fold_bn import default_input_shape
    from zoo.layers import kinds

    x = jax.ShapeDtypeStruct(tuple(input_shape or default_input_shape(module)), jnp.float32)
    if variables is None:
        variables = abstract_variables(module, x.shape)
    return kinds.float_in_int8_pattern(module, variables, x)


def resolve_keep_float(keep_float: str | None, module, variables, input_shape) -> str | None:
    """`int8_keep_float` as a regex: "auto" becomes `int8_float_pattern` and the activations traced float
    (`export.rewrites.INT8_FLOAT_SCOPE`), anything else is returned as given."""
    if keep_float != "auto":
        return keep_float
    import jax
    import jax.numpy as jnp

    from compress.fold_bn import default_input_shape
    from export.rewrites import INT8_FLOAT_ACTIVATIONS, activations_used

    x = jax.ShapeDtypeStruct(tuple(input_shape or default_input_shape(module)), jnp.float32)
    if variables is None:
        variables = abstract_variables(module, x.shape)
    layers = int8_float_pattern(module, variables, x.shape)
    # activations kept float by their int8 form (GELU) have no parameters: their scope is named here when used
    floated = activations_used(module, variables, x) & INT8_FLOAT_ACTIVATIONS
    parts = [p for p in (layers, f"(^|/){INT8_FLOAT_SCOPE}/" if floated else None) if p]
    return "|".join(parts) or None


def wants_float(variables, keep_float: str | None) -> bool:
    """Whether any module path of the model matches `keep_float` (so the int8 export keeps some ops in float)."""
    import jax

    if not keep_float:
        return False
    if f"{INT8_FLOAT_SCOPE}/" in keep_float:  # activations traced float (no parameters of their own)
        return True
    pat = re.compile(keep_float)
    for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]:
        keys = "/".join(str(getattr(k, "key", k)) for k in path)
        if pat.search("/" + keys + "/"):
            return True
    return False


def _bias_corrected(module, variables, calib: np.ndarray, q: str, keep_float: str | None) -> dict:
    """The variables the file is made from when bias correction is on: kernels the converter quantizes put on its int8
    grid, biases corrected (`compress.bias_correction`); layers kept in float, and in dynamic-range mode the small
    kernels the converter leaves float, are left alone."""
    from compress.bias_correction import DYNAMIC_MIN_ELEMENTS, correct_bias

    _, corrected = correct_bias(module, variables, calib, exclude=keep_float or "",
                                min_elements=DYNAMIC_MIN_ELEMENTS if q == "dynamic" else 0)
    return corrected


def _has_tiled_depthwise(variables) -> bool:
    """Whether any depthwise kernel (HWIO, one input channel per group) has more taps than XNNPACK runs fast."""
    import jax

    from zoo.layers.conv import XNNPACK_MAX_DEPTHWISE_TAPS

    return any(getattr(leaf, "ndim", 0) == 4 and leaf.shape[2] == 1 and leaf.shape[3] > 1
               and leaf.shape[0] * leaf.shape[1] > XNNPACK_MAX_DEPTHWISE_TAPS
               for leaf in jax.tree_util.tree_leaves(variables.get("params", {})))


def _calibration_name(calibration) -> str:
    return calibration.lower() if isinstance(calibration, str) else getattr(calibration, "__name__", "custom")


def resolve_calibration(calibration, q: str) -> RangeHook | None:
    """`to_tflite(calibration=...)` -> the hook that rewrites calibrated ranges, or None for the converter's min/max.

    A method name ("percentile", "mse"; see `export.ptq_ranges`) or a callable `(calibrated_tflite: bytes,
    batches: list of model-sized float arrays) -> bytes` that returns the calibrated (still float) flatbuffer with
    new per-tensor min/max.
    """
    if callable(calibration):
        if q != "int8":
            raise ValueError(f"a calibration hook is only used by quantization='int8' (got {q!r})")
        return calibration
    if not isinstance(calibration, str) or calibration.lower() not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}; choose one of {', '.join(CALIBRATIONS)} (or a "
                         "callable that rewrites the calibrated ranges)")
    method = calibration.lower()
    if method == "minmax":
        return None
    if q != "int8":
        raise ValueError(f"calibration={method!r} only applies to quantization='int8' (got {q!r})")
    from export.ptq_tflite import range_hook

    return range_hook(method)


def _write_atomic(path: Path, content: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_tflite(
    model_or_module,
    variables=None,
    *,
    quantization: str | None = None,
    representative_data=None,
    input_hw: tuple[int, int] | None = None,
    batch: int = 1,
    int8_io: bool = False,
    allow_flex: bool = False,
    out: str | os.PathLike | None = None,
    verify_data=None,
    verify_labels=None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    params: str = "constants",
    min_agreement: float | None = None,
    int8_friendly_activations: bool = True,
    int8_keep_float: str | None = DEFAULT_INT8_KEEP_FLOAT,
    int8_split_top_row: str | None = "auto",
    calibration: str | RangeHook = "minmax",
    dynamic_float_depthwise: bool = True,
    bias_correction: bool = True,
    equalization: bool = True,
    cfg=None,
    labels=None,
    name: str | None = None,
    signatures=None,
    check=None,
    progress: bool = True,
) -> ExportResult:
    """Export a model to TFLite, verify it against JAX in the LiteRT interpreter, and write it (atomically) to `out`.

    model_or_module: a `zoo.Model` (from `zoo.load`), a model name (`"mobilenet_v2"`, loaded with its default
        weights), or a linen module together with `variables` (and `cfg`, a `zoo.ModelCfg`, for the metadata).
        With `cfg.task == "segmentation"` the file's one output is the main per-pixel logits (N, H, W, classes);
        an auxiliary head (DeepLabV3's) is left out of the graph (`export.segmentation`).
    quantization: None (fp32), "fp16" (fp16 weights, float compute), "dynamic" (int8 weights, float activations,
        int8 compute where kernels exist) or "int8" (full integer; needs `representative_data`).
    representative_data: calibration inputs for "int8": a float NHWC array (normalized like the model's input, e.g.
        `model.preprocess(images)`) or an iterable of such batches; a few hundred real images is typical. Optional
        for "dynamic", where it is used for `bias_correction` only.
    input_hw: exported input size (default: the model's `cfg.input_size`). `batch`: fixed batch size of the graph.
    int8_io: with "int8", int8 input and output tensors (their scale and zero point go to the sidecar) instead of
        float ones with QUANTIZE/DEQUANTIZE inside the graph.
    allow_flex: permit Flex (SELECT_TF_OPS) and custom ops, which otherwise raise `UnsupportedOpsError`.
    out: where to write the .tflite (and `<out>.json`); nothing is written unless verification passes.
    verify_data / verify_labels: inputs (float NHWC) and optional class labels to verify on; by default the first
        8 calibration samples for "int8", else 8 deterministic random normal inputs.
    atol, rtol: fp32 tolerance on the logits' max absolute difference, `atol + rtol * max|JAX logits|`, raising
        `ExportParityError` beyond it (rtol=0 for a purely absolute bound).
    params: "constants" (weights embedded in the StableHLO module; faster) or "arguments" (passed as tf.Variables
        the converter freezes); the same graph either way (see `export.trace`).
    min_agreement: top-1 agreement (0..1) a quantized export must reach, raising `ExportParityError` below it;
        None only reports it. For a segmentation model: the per-pixel agreement of the argmax labelling.
    int8_friendly_activations: for "int8", trace hard-swish as MUL/ADD/MUL and a ReLU after a concatenation on
        its parts, which XNNPACK runs in int8 (see `export.rewrites`); False keeps the HARD_SWISH and RELU ops.
        Float exports always trace the exact GELU as one rational function XNNPACK runs.
    int8_keep_float: regex over module paths (e.g. "/attn/") whose ops stay float in an "int8" export (float
        islands, reported); "auto" (default): the layers whose kind keeps float (`zoo.layers.kinds`: LayerNorm,
        softmax attention). None quantizes everything.
    int8_split_top_row: for "int8", a regex over module paths (e.g. "stages_5/") of inverted-residual blocks whose
        residual stream is carried as two int8 tensors, first row and other rows, each with its own scale: the same
        function, for streams whose outliers sit on the border (see `export.row_split`; MobileNetV2: "stages_5/").
        "auto" (the default): the stages whose stream's first row is >= 3x larger than its other rows on
        `representative_data` (often none: no split; never for a quantization-aware model); None: no split. The
        sidecar records the stages split.
    calibration: for "int8", how activation ranges are set from `representative_data`: "minmax" (the converter's
        observed min/max), "percentile" (clip the 0.01% tails) or "mse" (the range minimizing each tensor's int8
        quantization error), see `export.ptq_ranges`; or a callable rewriting the calibrated flatbuffer.
    dynamic_float_depthwise: for "dynamic", keep depthwise weights float so XNNPACK runs those ops (it has no
        hybrid depthwise kernel; see `export.rewrites.float_depthwise_weights`).
    bias_correction: with `representative_data` ("int8", or "dynamic" when given), export the model with its kernels
        on the int8 grid and each layer's bias corrected for the mean error that rounding causes
        (`compress.bias_correction`); the file is still verified against the model as given.
    equalization: for "int8", first move per-channel scales across ReLU/ReLU6 pairs and residual streams so that
        each activation tensor's channels share its per-tensor int8 range better (`compress.equalize`; exact on
        `representative_data`). The scales move into BatchNorm: a model without BatchNorm, or whose forward returns
        a dict, is left as it is.
    signatures: instead of the model's forward, the file's signatures: a dict name -> `(fn, input_shape)` or
        `(fn, {input name: shape})`, `fn(module, variables, *inputs)` traced over the deploy-form module and its
        variables, shapes batch first (`export.signatures`; `input_hw` and `batch` then come from the shapes). Data
        arguments then take, per signature, an array (one input) or a dict by input name, and with several
        signatures a dict by signature name: `representative_data` for every signature ("int8"), `verify_data` for
        any (random normal inputs for the rest). The forward's own rewrites (equalization, bias correction, row
        split, custom calibration ranges of several inputs) are not applied to signatures.
    check: how each signature is verified (`export.verify.OutputCheck`), or a dict of them by signature name. By
        default `ClassificationCheck` (with `atol`, `rtol`, `min_agreement`, `verify_labels`) for one output,
        `SegmentationCheck` (`atol`, `rtol`, `min_agreement` as the pixel agreement) for a segmentation model's
        forward, and `PerOutputCheck` (`atol`, `rtol`) for several outputs. A model or signature returning a dict
        of arrays exports those as named outputs (ordered by name); the runner and `ExportResult.outputs` return
        them as a dict.
    """
    q = check_quantization(quantization)
    if int8_io and q != "int8":
        raise ValueError("int8_io=True needs quantization='int8'")
    if q == "int8" and representative_data is None:
        raise ValueError("quantization='int8' needs representative_data: float NHWC inputs normalized like the model's "
                         "(e.g. model.preprocess(images)) to calibrate activation ranges")
    if q not in ("int8", "dynamic") and representative_data is not None:
        raise ValueError(f"representative_data is only used by quantization='int8' or 'dynamic' (got {q!r}); pass "
                         "verify_data to verify on your inputs")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    ranges = resolve_calibration(calibration, q)
    if int8_split_top_row not in (None, "auto"):
        if q != "int8":
            raise ValueError(f"int8_split_top_row is an int8 rewrite; quantization is {q!r}")
        row_split.check_pattern(int8_split_top_row)
    functions = sigs.resolve(signatures) if signatures is not None else None
    if functions is not None:
        sigs.check_signature_options(functions, input_hw=input_hw, batch=batch, split=int8_split_top_row,
                                     ranges=ranges, labels=verify_labels)
    out_path = _check_out(out)

    module, variables, cfg, labels, name = _resolve_model(model_or_module, variables, cfg, labels, name, progress)
    import zoo

    if functions is not None:
        input_hw = input_hw or sigs.image_hw(functions)
    if cfg is None:
        if input_hw is None and functions is None:
            raise ValueError("a bare module needs input_hw=(H, W) (or cfg=ModelCfg(...))")
        cfg = zoo.ModelCfg(name=name, family="")
    hw = tuple(int(v) for v in (input_hw or cfg.input_size))
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"input_hw must be (H, W) with positive sizes, got {input_hw!r}")
    cfg = cfg.replace(input_size=hw)
    shape = (batch, *hw, cfg.in_chans)
    forward = functions is None
    task = cfg.task if forward else None  # signatures are the caller's functions, checked by their outputs
    left_out = ()
    if task == seg.TASK:  # the main logits only: the other heads are training aids (export.segmentation)
        module, variables, left_out = seg.main_output(module, variables)
    if task == det.TASK:  # boxes after decoding and NMS, not raw anchors (export.detection)
        det.check_quantization(q)
        module = det.detections(module, cfg)
    if forward:
        functions = {sigs.DEFAULT_KEY: sigs.Signature(parity.model_forward, {sigs.DEFAULT_INPUT: shape})}
    names = {k: sigs.output_names(f.fn, module, variables, f, f"{name}'s forward" if forward else f"signature {k!r}")
             for k, f in functions.items()}  # bad outputs fail here, before any pass or minutes of tracing
    # Deploy form first: multi-branch blocks become one conv (BatchNorm folding is the converter's own step).
    from compress.deploy import reparameterize

    module, variables = reparameterize(module, variables, input_shape=(1, *shape[1:]))
    calib, vdata, sources = sigs.prepare_data(functions, representative_data, verify_data, q, DEFAULT_NUM_VERIFY)
    checks = parity.resolve_checks(check, names, sources, {k: len(next(iter(v.values()))) for k, v in vdata.items()},
                                   atol=atol, rtol=rtol, min_agreement=min_agreement, labels=verify_labels,
                                   task=task)
    first = next(iter(functions))
    images = calib[first][sigs.DEFAULT_INPUT] if forward and calib else None  # the forward's calibration images

    prog = _Progress(progress, name)
    prog.stage("trace", f"tracing with jax2tf ({len(functions)} signatures)" if not forward else
               f"tracing with jax2tf ({hw[0]}x{hw[1]}, batch {batch}, native depthwise)")
    from export.trace import import_tf, stablehlo_versions, trace_functions

    tf = import_tf()
    if q == "int8":
        int8_keep_float = resolve_keep_float(int8_keep_float, module, variables, shape if forward else None)
    keep = int8_keep_float if (q == "int8" and wants_float(variables, int8_keep_float)) else None
    # a quantization-aware model (its `quant_stats` collection) already trained its kernels and biases for int8
    trained = "quant_stats" in variables
    corrected = bias_correction and images is not None and not trained
    # scales move into BatchNorm (nothing to equalize without one); compress.equalize checks one output array
    equalized = (equalization and q == "int8" and forward and not trained and bool(variables.get("batch_stats"))
                 and names[first] is None)
    export_variables = variables  # the same module with corrected variables, so the graph keeps its names
    if equalized:
        prog.stage("equalize", f"equalizing activation ranges on {len(images)} inputs")
        from compress.equalize import equalize_activations

        _, export_variables = equalize_activations(module, variables, images)
    if corrected:
        prog.stage("bias", f"correcting biases for int8 weights on {len(images)} inputs")
        export_variables = _bias_corrected(module, export_variables, images, q, keep)
    if int8_split_top_row == "auto":  # not for a quantization-aware model: it trained its own quantization points
        auto = q == "int8" and forward and not trained
        int8_split_top_row = row_split.border_heavy_stages(module, export_variables, images) if auto else None
    int8_friendly = q == "int8" and int8_friendly_activations
    acts = INT8_ACTIVATIONS if int8_friendly else (FLOAT_ACTIVATIONS if q != "int8" else None)
    traced_module = module
    if not trained and _has_tiled_depthwise(export_variables):
        # such a conv is traced as a sum of smaller ones (`zoo.layers.conv.depthwise_tiles`), and the converter
        # folds a BatchNorm only into a conv it directly follows: fold it here (exact), into the convs' bias
        from compress.fold_bn import fold_bn

        traced_module, export_variables = fold_bn(module, export_variables, input_shape=(1, *shape[1:]))
    traced = {k: (sigs.flat_fn(f.fn, traced_module), f.inputs) for k, f in functions.items()}
    if int8_friendly:  # a ReLU after a concatenation moves onto the parts
        traced = {k: (relu_before_concatenate(fn), inputs) for k, (fn, inputs) in traced.items()}
    resizes: dict = {}  # filled while tracing
    if task == seg.TASK:  # ASPP's pooled branch as RESIZE_BILINEAR, not BROADCAST_TO (export.broadcast_resize)
        traced = {k: (broadcast_as_resize(fn, resizes), inputs) for k, (fn, inputs) in traced.items()}
    if int8_split_top_row is not None:
        apply, acts = row_split.split_apply(traced[first][0], int8_split_top_row, acts)
        traced[first] = (apply, traced[first][1])
    holder, concretes = trace_functions(traced, export_variables, activations=acts, params=params)
    count = sum(len(next(iter(c.values()))) for c in calib.values())
    prog.stage("convert", f"converting to TFLite ({q}" + (f", calibrating on {count} inputs" if q == "int8" else "")
               + ")")
    samples = calibration_samples(calib, {k: f.batch for k, f in functions.items()}) if q == "int8" else None
    # a ranges hook runs the calibrated file on its one input (checked by sigs.check_signature_options)
    batches = calib_io.chunks(next(iter(calib[first].values())), functions[first].batch) if ranges else None
    content = convert(tf, holder, concretes, q, samples, batches, int8_io, allow_flex, progress, keep, ranges)
    if q == "dynamic" and dynamic_float_depthwise:
        from export.rewrites import float_depthwise_weights

        content, _ = float_depthwise_weights(content)
    if len(functions) == 1 and first != sigs.DEFAULT_KEY:  # the converter names a lone signature serving_default
        content = sigs.rename(content, sigs.DEFAULT_KEY, first)

    prog.stage("verify", f"checking ops and verifying {len(functions)} signature(s) on "
               f"{', '.join(sorted(set(sources.values())))} inputs in LiteRT")
    report = ops_report.analyze(content)
    if report.stablehlo_ops:
        raise UnsupportedOpsError(f"the converted graph contains STABLEHLO_* ops that no LiteRT CPU kernel runs: "
                                  f"{report.stablehlo_ops}", report.stablehlo_ops)
    if (report.flex_ops or report.custom_ops) and not allow_flex:
        bad = {**report.flex_ops, **report.custom_ops}
        raise UnsupportedOpsError(f"the converted graph needs Flex/custom ops {bad}, which stock LiteRT cannot run; "
                                  "pass allow_flex=True to accept them", bad)
    verified = parity.verify_file(content, functions, module, variables, vdata, checks, q, bool(report.flex_ops))
    file_signatures = sigs.read(content)
    result = verified.reports[first]

    meta = metadata.build(name=name, cfg=cfg, labels=labels, quantization=q, int8_io=int8_io,
                          batch=functions[first].batch, input_hw=hw, ops=report, verification=result, content=content,
                          versions=_versions(stablehlo_versions()["target"]),
                          calibration=_calibration_name(calibration) if q == "int8" else None,
                          bias_correction=corrected, equalization=equalized, int8_keep_float=keep,
                          int8_split_top_row=int8_split_top_row, signatures=file_signatures,
                          checks={k: (checks[k], verified.reports[k], sources[k]) for k in functions},
                          task=cfg.task if forward else None,
                          segmentation=seg.sidecar(left_out, resizes.get("resizes", 0), report)
                          if task == seg.TASK else None)
    if task == det.TASK:
        meta["detection"] = det.sidecar(module, det.anchor_count(module, variables, shape), report)
    if out_path is not None:
        prog.stage("write", f"writing {out_path}")
        import json

        side = metadata.sidecar_path(out_path)
        _write_atomic(side, json.dumps(meta, indent=1).encode())
        _write_atomic(out_path, content)
    prog.end()
    one = len(functions) == 1
    res = ExportResult(name, q, next(iter(functions[first].inputs.values())), content, out_path, report,
                       verified.delegate, result, meta, prog.timings,
                       verified.outputs[first] if one else verified.outputs,
                       verified.references[first] if one else verified.references, verified.reports,
                       file_signatures)
    if progress:
        print(res.summary(), file=sys.stderr, flush=True)
    return res
