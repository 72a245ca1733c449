"""Verifying an exported file: every signature run in LiteRT and by JAX on the same inputs, compared by its check.

`verify_file` runs each signature of the converted bytes (`export.runtime.LiteRTRunner`, or TensorFlow's interpreter
for Flex ops), computes the JAX reference of the same function on the original variables, hands both, as dicts by
output name, to the signature's `export.verify.OutputCheck`, and raises `ExportParityError` on the first that fails.
An fp32 file that fails gets a second look against float64 JAX when its check can use one (`with_float64`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from export import signatures as sigs
from export import verify
from export.errors import ExportParityError

_REFERENCE_FNS: dict = {}
_REFERENCE_OUTPUTS: dict = {}  # (function key, digest of variables and inputs) -> outputs, a few recent ones


def model_forward(module, variables, x):
    """The model's own forward in inference mode: the function of a file's default signature."""
    return module.apply(variables, x, train=False)


def _digest(variables, x) -> str:
    """A content hash of the variables and inputs (~0.1 s for 256 images at 224x224): a cached reference is reused only
    for the same numbers, whatever object holds them."""
    import hashlib

    import jax

    h = hashlib.blake2b(digest_size=16)
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    for a in (x if isinstance(x, tuple) else (x,)):
        h.update(f"x:{a.dtype}:{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _frozen(out):
    if isinstance(out, dict):
        return {k: _frozen(v) for k, v in out.items()}
    a = np.asarray(out, np.float32)
    a.setflags(write=False)  # shared by every export that verifies on these inputs
    return a


def _reference(module, variables, x, fn=model_forward):
    """JAX outputs of `fn(module, variables, *x)` (one array, or a dict flattened as the file's outputs) as the
    caller runs it: no export rewrites, and the depthwise formulation in effect (`zoo.layers.conv.depthwise_impl`; on
    CPU by default the shifted-slice one, which gives the exported native convolution's numbers up to float rounding).

    The jitted function is kept per (module, function, formulation), so exporting one model several times (fp32,
    fp16, int8; `export.mixed` and `export.sensitivity` export it up to a dozen times) compiles the reference once per
    input shape, and its outputs on the same variables and inputs are computed once (a forward pass of 256 images at
    224x224 takes ~10 s on 2 CPU cores). Wrapping the export in `depthwise_impl("native")` compiles faster (fewer ops)
    but runs depthwise convolutions slowly on XLA:CPU: worth it for a few small verification inputs.
    """
    import jax

    from zoo.layers.conv import resolved_depthwise_impl

    xs = x if isinstance(x, tuple) else (x,)
    key = (module, fn, resolved_depthwise_impl())
    try:
        jitted = _REFERENCE_FNS.get(key)
    except TypeError:  # an unhashable module
        jitted, key = None, None
    if jitted is None:
        jitted = jax.jit(sigs.flat_fn(fn, module))
        if key is not None:
            if len(_REFERENCE_FNS) >= 8:
                _REFERENCE_FNS.pop(next(iter(_REFERENCE_FNS)))
            _REFERENCE_FNS[key] = jitted
    if key is None:
        return _frozen(jitted(variables, *xs))
    out_key = (key, _digest(variables, x))
    out = _REFERENCE_OUTPUTS.get(out_key)
    if out is None:
        out = _frozen(jitted(variables, *xs))
        if len(_REFERENCE_OUTPUTS) >= 4:
            _REFERENCE_OUTPUTS.pop(next(iter(_REFERENCE_OUTPUTS)))
        _REFERENCE_OUTPUTS[out_key] = out
    return out


def _reference_float64(module, variables, xs: tuple, fn=model_forward):
    """The JAX outputs computed in float64 throughout (a yardstick for fp32 rounding; compiled only when needed).
    Depthwise convolutions as shifted slices on CPU: XLA:CPU has no fast float64 kernel for the native grouped
    convolution (~100x slower; EfficientViT-M0 at 128x128: 20 s), and the formulations compute the same function."""
    import jax
    import jax.numpy as jnp

    from zoo.layers.conv import depthwise_impl, resolved_depthwise_impl

    impl = "shifted" if jax.default_backend() == "cpu" else resolved_depthwise_impl()
    with jax.enable_x64(True), depthwise_impl(impl):
        v64 = jax.device_put(jax.tree.map(lambda a: np.asarray(a, np.float64) if np.issubdtype(np.asarray(a).dtype,
                                                                                              np.floating) else a,
                                          variables))
        out = jax.jit(sigs.flat_fn(fn, module))(v64, *(jnp.asarray(a, jnp.float64) for a in xs))
        return jax.tree.map(lambda a: np.asarray(a, np.float64), out)


def _run_exported(content: bytes, x, flex: bool, signature: str | None = None):
    """Outputs of one signature of the exported model in LiteRT (+ its XNNPACK report); Flex models need TF's
    interpreter."""
    from export.runtime import LiteRTRunner

    if not flex:
        runner = LiteRTRunner(content, signature=signature)
        return runner.run(x), runner.delegate_report()
    import tensorflow as tf  # only TF's interpreter links the Flex delegate; XNNPACK off (FINDINGS: wrong int8)

    builtin = tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = tf.lite.Interpreter(model_content=content, experimental_op_resolver_type=builtin)
    return LiteRTRunner.from_interpreter(it, signature).run(x), None


def _named(out, names: list[str]) -> dict:
    return dict(out) if isinstance(out, dict) else {names[0]: out}


def resolve_checks(check, names: dict[str, tuple[str, ...] | None], sources: dict[str, str],
                   counts: dict[str, int], *, atol: float, rtol: float, min_agreement: float | None,
                   labels, task: str | None = None) -> dict[str, verify.OutputCheck]:
    """`to_tflite(check=...)` -> a check per signature key. None: by the model's `task` for its forward with one
    output: `SegmentationCheck` for "segmentation" (min_agreement as the per-pixel agreement), `DetectionCheck` for
    "detection" (its four outputs; min_agreement as the fraction of JAX's detections matched), else
    `ClassificationCheck` (with the export's atol, rtol, min_agreement and verify labels); `PerOutputCheck` for
    several outputs."""
    if isinstance(check, dict):
        unknown = sorted(set(check) - set(names))
        if unknown:
            raise ValueError(f"check names signatures {unknown} the export does not have ({', '.join(names)})")
    out = {}
    for key, outputs in names.items():
        c = check.get(key) if isinstance(check, dict) else check
        if c is None:
            single = outputs is None or len(outputs) == 1
            if task == "detection":  # the file's boxes after NMS (export.detection)
                c = verify.DetectionCheck(min_matched=min_agreement)
            elif single and task == "segmentation":
                c = verify.SegmentationCheck(min_pixel_agreement=min_agreement, atol=atol, rtol=rtol)
            else:
                c = (verify.ClassificationCheck(atol, rtol, min_agreement, labels) if single
                     else verify.PerOutputCheck(atol, rtol))
        if labels is not None and not isinstance(c, verify.ClassificationCheck):
            raise ValueError(f"verify_labels are read by a ClassificationCheck; signature {key!r} is checked by "
                             f"{getattr(c, 'name', type(c).__name__)!r}: drop them or pass "
                             "check=ClassificationCheck(output=..., labels=...)")
        if not isinstance(c, verify.OutputCheck):
            raise TypeError(f"check for {key!r} is a {type(c).__name__}; give an export.verify.OutputCheck: an "
                            "object with a name and compare(reference, output, quantization) -> report")
        if isinstance(c, verify.ClassificationCheck):
            picked = c.output if c.output is not None else (outputs[0] if outputs and len(outputs) == 1 else None)
            if outputs is None and c.output is not None:
                raise ValueError(f"signature {key!r} returns one array; ClassificationCheck(output={c.output!r}) "
                                 "names one of a dict's outputs: drop output=")
            if outputs is not None and picked not in outputs:  # said now, not after minutes of converting
                raise ValueError(f"signature {key!r} has outputs {list(outputs)}: a ClassificationCheck compares one "
                                 "logits output; name it with ClassificationCheck(output=...) or check every output "
                                 "with PerOutputCheck()")
            if c.data is None:
                c = dataclasses.replace(c, data=sources[key])
            if c.labels is None and labels is not None:
                c = dataclasses.replace(c, labels=labels)
            if c.labels is not None and len(np.asarray(c.labels).reshape(-1)) != counts[key]:
                raise ValueError(f"verify_labels has {len(np.asarray(c.labels).reshape(-1))} labels for "
                                 f"{counts[key]} verify_data inputs")
        out[key] = c
    return out


@dataclass
class Verified:
    """Per signature key: the check's report, the exported model's outputs and JAX's (an array for one output, a
    dict by name for several); the XNNPACK report of the first signature's interpreter."""

    reports: dict[str, object]
    outputs: dict[str, object]
    references: dict[str, object]
    delegate: object | None


def verify_file(content: bytes, functions: dict[str, sigs.Signature], module, variables,
                data: dict[str, dict[str, np.ndarray]], checks: dict[str, verify.OutputCheck], quantization: str,
                flex: bool) -> Verified:
    """Run and check every signature `key` of `content` (its JAX function `functions[key]`) on `data[key]`; raise
    `ExportParityError` naming the numbers at the first that fails."""
    listed = sigs.read(content)
    result = Verified({}, {}, {}, None)
    for key, sig in functions.items():
        inputs = data[key]
        feed = inputs if len(inputs) > 1 else next(iter(inputs.values()))
        out, delegate = _run_exported(content, feed, flex, key if len(listed) > 1 else None)
        xs = tuple(inputs.values())
        ref = _reference(module, variables, xs if len(xs) > 1 else xs[0], sig.fn)
        names = [t.name for t in listed[key]["outputs"]] if key in listed else ["output_0"]
        ref_d, out_d = _named(ref, names), _named(out, names)
        check = checks[key]
        report = check.compare(ref_d, out_d, quantization)
        if quantization == "fp32" and not report.passed and hasattr(check, "with_float64"):
            ref64 = _named(_reference_float64(module, variables, xs, sig.fn), names)
            report = check.with_float64(report, ref_d, ref64, out_d)
        try:
            verify.check(report)
        except ExportParityError as e:
            if len(functions) > 1 and e.args:  # say which signature failed
                e.args = (f"signature {key!r}: {e.args[0]}", *e.args[1:])
            raise
        result.reports[key], result.outputs[key], result.references[key] = report, out, ref
        result.delegate = result.delegate if result.delegate is not None else delegate
    return result
