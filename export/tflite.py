"""`to_tflite`: a zoo model -> a verified .tflite (fp32, fp16, dynamic-range int8 or full int8) with its sidecar.

Path: jax2tf native serialization (`export.trace`) -> `tf.lite.TFLiteConverter.from_concrete_functions`, which
legalizes the StableHLO into builtin TFLite ops and folds BatchNorm into the convolutions -> op report
(`export.ops_report`) -> verification in the LiteRT interpreter against JAX (`export.verify`) -> atomic write of the
model and its `model.tflite.json` sidecar (`export.metadata`), only once everything passed.
"""

from __future__ import annotations

import dataclasses

import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from export import calibration as calib_io
from export import metadata, ops_report, row_split, verify
from export.errors import ExportError, UnsupportedOpsError
from export.rewrites import INT8_ACTIVATIONS

QUANTIZATIONS = ("fp32", "fp16", "dynamic", "int8")
_ALIASES = {None: "fp32", "fp32": "fp32", "float32": "fp32", "none": "fp32", "fp16": "fp16", "float16": "fp16",
            "dynamic": "dynamic", "int8": "int8"}
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-5  # relative to the largest |logit|; see export.verify
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
RangeHook = Callable[[bytes, list], bytes]


@dataclass
class ExportResult:
    """What an export produced and how it checked out. `content` is the .tflite flatbuffer."""

    name: str
    quantization: str
    input_shape: tuple[int, int, int, int]
    content: bytes = field(repr=False)
    path: Path | None
    ops: ops_report.OpsReport = field(repr=False)
    delegate: object | None  # runtime.DelegateReport: XNNPACK partitions of the verifying interpreter
    verification: verify.VerifyReport | None
    metadata: dict = field(repr=False)
    timings: dict[str, float] = field(default_factory=dict)
    outputs: np.ndarray | None = field(default=None, repr=False)  # exported model's outputs on the verify inputs
    reference: np.ndarray | None = field(default=None, repr=False)  # JAX's on the same inputs

    @property
    def size_bytes(self) -> int:
        return len(self.content)

    def summary(self) -> str:
        b, h, w, c = self.input_shape
        where = f" -> {self.path}" if self.path else ""
        total = sum(self.timings.values())
        lines = [f"{self.name}{where}: {self.quantization}, {self.size_bytes / 1e6:.2f} MB, input {h}x{w}x{c}, "
                 f"batch {b} (exported in {total:.1f} s: "
                 + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()) + ")",
                 self.ops.summary()]
        if self.delegate is not None:
            lines.append(self.delegate.summary())
        if self.verification is not None:
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


def _tensor_names(content: bytes) -> list[str]:
    from export.ops_report import _schema

    model = _schema().Model.GetRootAs(content, 0)
    names = []
    for si in range(model.SubgraphsLength()):
        g = model.Subgraphs(si)
        names += [(g.Tensors(i).Name() or b"").decode() for i in range(g.TensorsLength())]
    return names


def int8_float_pattern(module, variables=None, input_shape=None) -> str | None:
    """The "auto" `int8_keep_float`: a regex over the module paths of every layer whose kind the layer-kinds table
    keeps float in int8 files (None when the model has none). `variables` may be None (abstract init)."""
    import jax
    import jax.numpy as jnp

    from compress.fold_bn import default_input_shape
    from zoo.layers import kinds

    x = jax.ShapeDtypeStruct(tuple(input_shape or default_input_shape(module)), jnp.float32)
    if variables is None:
        variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)
    return kinds.float_in_int8_pattern(module, variables, x)


def resolve_keep_float(keep_float: str | None, module, variables, input_shape) -> str | None:
    """`int8_keep_float` as a regex: "auto" becomes `int8_float_pattern`, anything else is returned as given."""
    return int8_float_pattern(module, variables, input_shape) if keep_float == "auto" else keep_float


def wants_float(variables, keep_float: str | None) -> bool:
    """Whether any module path of the model matches `keep_float` (so the int8 export keeps some ops in float)."""
    import jax

    if not keep_float:
        return False
    pat = re.compile(keep_float)
    for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]:
        keys = "/".join(str(getattr(k, "key", k)) for k in path)
        if pat.search("/" + keys + "/"):
            return True
    return False


def _convert(tf, holder, concrete, q: str, calib: np.ndarray | None, batch: int, int8_io: bool, allow_flex: bool,
             progress: bool, keep_float: str | None = None, ranges: RangeHook | None = None) -> bytes:
    conv = tf.lite.TFLiteConverter.from_concrete_functions([concrete], holder)
    ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if q != "fp32":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if q == "fp16":
        conv.target_spec.supported_types = [tf.float16]
    if q == "int8":
        batches = calib_io.chunks(calib, batch)

        def representative():
            it = batches
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(batches, desc="calibrating", unit="batch", leave=False)
            for x in it:
                yield [x]

        conv.representative_dataset = representative
        ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            conv.inference_input_type = tf.int8
            conv.inference_output_type = tf.int8
    if allow_flex:
        ops = ops + [tf.lite.OpsSet.SELECT_TF_OPS]
    conv.target_spec.supported_ops = ops
    try:
        if q == "int8" and (keep_float or ranges is not None):
            return _quantize_two_step(tf, conv, keep_float, int8_io, ranges, calib_io.chunks(calib, batch))
        return conv.convert()
    except ExportError:
        raise
    except Exception as e:  # the converter raises ConverterError / RuntimeError with pages of MLIR diagnostics
        text = str(e).strip()
        hint = ""
        if "deserialize portable artifact" in text or "neither a custom op nor a flex op" in text:
            hint = (" (the StableHLO in the exported module is newer than this TensorFlow reads; see "
                    "export.trace.stablehlo_versions())")
        elif q == "int8" and ("quantiz" in text.lower()):
            hint = " (an op has no int8 kernel; try quantization='dynamic' or report the op)"
        first = "\n".join(text.splitlines()[:12])
        raise ExportError(f"TFLite conversion ({q}) failed{hint}:\n{first}") from e


def _quantize_two_step(tf, conv, keep_float: str | None, int8_io: bool, ranges: RangeHook | None,
                       batches: list[np.ndarray]) -> bytes:
    """Full-int8 conversion in two steps - calibrate, then quantize - as the converter does internally, with two
    things possible in between: `ranges(calibrated, batches)` replaces the calibrated activation min/max (see
    `resolve_calibration`), and ops whose output tensor names (the flax module paths) match `keep_float` stay float
    (the converter's own deny-list, what TF's QuantizationDebugger does for selective quantization)."""
    try:
        from tensorflow.lite.python import convert as tfl_convert
        from tensorflow.lite.python import util as tfl_util
    except ImportError as e:  # pragma: no cover - a future TF
        raise ExportError(f"this TensorFlow has no two-step quantization entry point ({e}); pass "
                          "int8_keep_float=None and calibration='minmax'") from e
    conv._experimental_calibrate_only = True  # noqa: SLF001
    calibrated = conv.convert()
    if ranges is not None:
        calibrated = ranges(calibrated, batches)
    nodes = []
    if keep_float:
        pat = re.compile(keep_float)
        nodes = sorted({n for n in _tensor_names(calibrated) if pat.search(n)})
    model = tfl_convert.mlir_quantize(calibrated, input_data_type=tf.float32, output_data_type=tf.float32,
                                      denylisted_nodes=nodes)
    if int8_io:
        model = tfl_util.modify_model_io_type(model, tf.int8, tf.int8)
    return model


def _bias_corrected(module, variables, calib: np.ndarray, q: str, keep_float: str | None) -> dict:
    """The variables the file is made from when bias correction is on: kernels the converter quantizes put on its int8
    grid, biases corrected (`compress.bias_correction`); layers kept in float, and in dynamic-range mode the small
    kernels the converter leaves float, are left alone."""
    from compress.bias_correction import DYNAMIC_MIN_ELEMENTS, correct_bias

    _, corrected = correct_bias(module, variables, calib, exclude=keep_float or "",
                                min_elements=DYNAMIC_MIN_ELEMENTS if q == "dynamic" else 0)
    return corrected


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


_REFERENCE_FNS: dict = {}
_REFERENCE_OUTPUTS: dict = {}  # (function key, digest of variables and inputs) -> logits, a few recent ones


def _digest(variables, x: np.ndarray) -> str:
    """A content hash of the variables and inputs (~0.1 s for 256 images at 224x224): a cached reference is reused only
    for the same numbers, whatever object holds them."""
    import hashlib

    import jax

    h = hashlib.blake2b(digest_size=16)
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(f"x:{x.dtype}:{x.shape}".encode())
    h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def _reference(module, variables, x: np.ndarray) -> np.ndarray:
    """JAX logits of the model as the caller runs it: no export rewrites, and the depthwise formulation in effect
    (`zoo.layers.conv.depthwise_impl`; on CPU by default the shifted-slice one, which gives the exported native
    convolution's numbers up to float rounding).

    The jitted function is kept per (module, formulation), so exporting one model several times (fp32, fp16, int8;
    `export.mixed` and `export.sensitivity` export it up to a dozen times) compiles the reference once per input shape,
    and its logits on the same variables and inputs are computed once (a forward pass of 256 images at 224x224 takes
    ~10 s on 2 CPU cores). Wrapping the export in `depthwise_impl("native")` compiles faster (fewer ops) but runs
    depthwise convolutions slowly on XLA:CPU: worth it for a few small verification inputs.
    """
    import jax

    from zoo.layers.conv import resolved_depthwise_impl

    key = (module, resolved_depthwise_impl())
    try:
        fn = _REFERENCE_FNS.get(key)
    except TypeError:  # an unhashable module
        fn, key = None, None
    if fn is None:
        fn = jax.jit(lambda v, x: module.apply(v, x, train=False))
        if key is not None:
            if len(_REFERENCE_FNS) >= 8:
                _REFERENCE_FNS.pop(next(iter(_REFERENCE_FNS)))
            _REFERENCE_FNS[key] = fn
    if key is None:
        return np.asarray(fn(variables, x), np.float32)
    out_key = (key, _digest(variables, x))
    out = _REFERENCE_OUTPUTS.get(out_key)
    if out is None:
        out = np.asarray(fn(variables, x), np.float32)
        out.setflags(write=False)  # shared by every export that verifies on these inputs
        if len(_REFERENCE_OUTPUTS) >= 4:
            _REFERENCE_OUTPUTS.pop(next(iter(_REFERENCE_OUTPUTS)))
        _REFERENCE_OUTPUTS[out_key] = out
    return out


def _reference_float64(module, variables, x: np.ndarray) -> np.ndarray:
    """The JAX logits computed in float64 throughout (a yardstick for fp32 rounding; compiled only when needed)."""
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)
                           else a, variables)
        out = jax.jit(lambda v, x: module.apply(v, x, train=False))(v64, jnp.asarray(x, jnp.float64))
        return np.asarray(out, np.float64)


def _run_exported(content: bytes, x: np.ndarray, flex: bool):
    """Outputs of the exported model in LiteRT (+ its XNNPACK report); Flex models need TF's interpreter."""
    from export.runtime import LiteRTRunner

    if not flex:
        runner = LiteRTRunner(content)
        return runner.run(x), runner.delegate_report()
    import tensorflow as tf  # only TF's interpreter links the Flex delegate; XNNPACK off (FINDINGS: wrong int8)

    builtin = tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = tf.lite.Interpreter(model_content=content, experimental_op_resolver_type=builtin)
    it.allocate_tensors()
    runner = LiteRTRunner.__new__(LiteRTRunner)
    runner.interpreter = it
    runner.input, runner.output = it.get_input_details()[0], it.get_output_details()[0]
    return runner.run(x), None


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
    progress: bool = True,
) -> ExportResult:
    """Export a model to TFLite, verify it against JAX in the LiteRT interpreter, and write it (atomically) to `out`.

    model_or_module: a `zoo.Model` (from `zoo.load`), a model name (`"mobilenet_v2"`, loaded with its default
        weights), or a linen module together with `variables` (and `cfg`, a `zoo.ModelCfg`, for the metadata).
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
        None only reports it.
    int8_friendly_activations: for "int8", trace hard-swish as MUL/ADD/MUL, which XNNPACK runs in int8
        (see `export.rewrites`); False keeps the HARD_SWISH op.
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
        `representative_data`).
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
    out_path = _check_out(out)

    module, variables, cfg, labels, name = _resolve_model(model_or_module, variables, cfg, labels, name, progress)
    import zoo

    if cfg is None:
        if input_hw is None:
            raise ValueError("a bare module needs input_hw=(H, W) (or cfg=ModelCfg(...))")
        cfg = zoo.ModelCfg(name=name, family="")
    hw = tuple(int(v) for v in (input_hw or cfg.input_size))
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"input_hw must be (H, W) with positive sizes, got {input_hw!r}")
    cfg = cfg.replace(input_size=hw)
    shape = (batch, *hw, cfg.in_chans)
    # Deploy form first: multi-branch blocks become one conv (BatchNorm folding is the converter's own step).
    from compress.deploy import reparameterize

    module, variables = reparameterize(module, variables, input_shape=(1, *shape[1:]))

    calib = None
    if representative_data is not None:
        calib = calib_io.as_float_batch(representative_data, shape, "representative_data")
    if verify_data is not None:
        vdata, source = calib_io.as_float_batch(verify_data, shape, "verify_data"), "caller"
    elif q == "int8":
        vdata, source = calib[:DEFAULT_NUM_VERIFY], "calibration"
    else:
        vdata = np.random.default_rng(0).standard_normal((DEFAULT_NUM_VERIFY, *shape[1:])).astype(np.float32)
        source = "random"
    if verify_labels is not None and len(np.asarray(verify_labels).reshape(-1)) != len(vdata):
        raise ValueError(f"verify_labels has {len(np.asarray(verify_labels).reshape(-1))} labels for {len(vdata)} "
                         "verify_data inputs")

    prog = _Progress(progress, name)
    prog.stage("trace", f"tracing with jax2tf ({hw[0]}x{hw[1]}, batch {batch}, native depthwise)")
    from export.trace import import_tf, stablehlo_versions, trace_concrete_function

    tf = import_tf()
    if q == "int8":
        int8_keep_float = resolve_keep_float(int8_keep_float, module, variables, shape)
    keep = int8_keep_float if (q == "int8" and wants_float(variables, int8_keep_float)) else None
    # a quantization-aware model (its `quant_stats` collection) already trained its kernels and biases for int8
    trained = "quant_stats" in variables
    corrected = bias_correction and calib is not None and not trained
    equalized = equalization and q == "int8" and not trained
    export_variables = variables  # the same module with corrected variables, so the graph keeps its names
    if equalized:
        prog.stage("equalize", f"equalizing activation ranges on {len(calib)} inputs")
        from compress.equalize import equalize_activations

        _, export_variables = equalize_activations(module, variables, calib)
    if corrected:
        prog.stage("bias", f"correcting biases for int8 weights on {len(calib)} inputs")
        export_variables = _bias_corrected(module, export_variables, calib, q, keep)
    if int8_split_top_row == "auto":  # not for a quantization-aware model: it trained its own quantization points
        auto = q == "int8" and not trained
        int8_split_top_row = row_split.border_heavy_stages(module, export_variables, calib) if auto else None
    acts = INT8_ACTIVATIONS if (q == "int8" and int8_friendly_activations) else None
    apply = lambda v, x: module.apply(v, x, train=False)  # noqa: E731
    if int8_split_top_row is not None:
        apply, acts = row_split.split_apply(apply, int8_split_top_row, acts)
    holder, concrete = trace_concrete_function(apply, export_variables, shape, activations=acts, params=params)
    prog.stage("convert", f"converting to TFLite ({q}" + (f", calibrating on {len(calib)} inputs" if q == "int8"
                                                          else "") + ")")
    content = _convert(tf, holder, concrete, q, calib, batch, int8_io, allow_flex, progress, keep, ranges)
    if q == "dynamic" and dynamic_float_depthwise:
        from export.rewrites import float_depthwise_weights

        content, _ = float_depthwise_weights(content)

    prog.stage("verify", f"checking ops and verifying on {len(vdata)} {source} input(s) in LiteRT")
    report = ops_report.analyze(content)
    if report.stablehlo_ops:
        raise UnsupportedOpsError(f"the converted graph contains STABLEHLO_* ops that no LiteRT CPU kernel runs: "
                                  f"{report.stablehlo_ops}", report.stablehlo_ops)
    if (report.flex_ops or report.custom_ops) and not allow_flex:
        bad = {**report.flex_ops, **report.custom_ops}
        raise UnsupportedOpsError(f"the converted graph needs Flex/custom ops {bad}, which stock LiteRT cannot run; "
                                  "pass allow_flex=True to accept them", bad)
    outputs, delegate = _run_exported(content, vdata, bool(report.flex_ops))
    reference = _reference(module, variables, vdata)
    result = verify.compare(reference, outputs, q, data=source, atol=atol if q == "fp32" else None, rtol=rtol,
                            min_agreement=min_agreement if q != "fp32" else None, labels=verify_labels)
    if q == "fp32" and not result.passed:  # is the model itself that sensitive to fp32 rounding? (verify.py)
        ref64 = _reference_float64(module, variables, vdata)
        result = dataclasses.replace(result, jax_fp32_error=float(np.abs(reference - ref64).max()),
                                     tflite_fp64_error=float(np.abs(outputs.reshape(ref64.shape) - ref64).max()))
    verify.check(result)

    meta = metadata.build(name=name, cfg=cfg, labels=labels, quantization=q, int8_io=int8_io, batch=batch,
                          input_hw=hw, ops=report, verification=result, content=content,
                          versions=_versions(stablehlo_versions()["target"]),
                          calibration=_calibration_name(calibration) if q == "int8" else None,
                          bias_correction=corrected, equalization=equalized, int8_keep_float=keep,
                          int8_split_top_row=int8_split_top_row)
    if out_path is not None:
        prog.stage("write", f"writing {out_path}")
        import json

        side = metadata.sidecar_path(out_path)
        _write_atomic(side, json.dumps(meta, indent=1).encode())
        _write_atomic(out_path, content)
    prog.end()
    res = ExportResult(name, q, shape, content, out_path, report, delegate, result, meta, prog.timings, outputs,
                       reference)
    if progress:
        print(res.summary(), file=sys.stderr, flush=True)
    return res
