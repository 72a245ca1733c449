"""What an exported file computes: its signatures (named functions of the model) and their named outputs.

A signature is a JAX function `fn(module, variables, *inputs)` of fixed input shapes, traced over the model's (deploy
form) module and variables; it returns one array or a dict of arrays. A dict's keys become the TFLite signature's
output names, which TensorFlow orders by name; nested dicts are flattened with "/" (`{"det": {"boxes": b}}` is the
output "det/boxes"). One export writes one signature (`serving_default`, the model's own forward on "images") or
several in one file:

    to_tflite(model, signatures={"stage_0": (lambda m, v, x: m.apply(v, x, method="stage0"), (1, 32, 32, 3)),
                                 "stage_1": (stage1_fn, {"features": (1, 8, 8, 16)})})

Signature names must be identifiers (the converter names each signature after its traced function). This module
checks specs and outputs before any tracing, and reads the signatures back from a flatbuffer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

DEFAULT_KEY = "serving_default"  # what the converter calls the signature of a one-function file
DEFAULT_INPUT = "images"  # the model's own forward
INPUT = "input"  # the input of a signature given with one shape
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Signature:
    """One function of an exported file: `fn(module, variables, *inputs)`, inputs in the order of `inputs`."""

    fn: Callable
    inputs: dict[str, tuple[int, ...]]  # input name -> full shape, batch first

    @property
    def batch(self) -> int:
        return next(iter(self.inputs.values()))[0]


def _shape(shape, where: str) -> tuple[int, ...]:
    try:
        out = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        out = ()
    if not out or any(d < 1 for d in out) or any(isinstance(d, bool) for d in shape):
        raise ValueError(f"{where}: an input shape is a tuple of positive ints, batch first (e.g. (1, 32, 32, 3)); "
                         f"got {shape!r}")
    return out


def _name(name, what: str) -> str:
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"{what} {name!r} is not an identifier: use letters, digits and '_' (e.g. 'stage_0')")
    return name


def signature(fn: Callable, inputs, where: str) -> Signature:
    """`(fn, shape)` or `(fn, {input name: shape})` -> a checked `Signature`."""
    if not callable(fn):
        raise TypeError(f"{where}: expected (fn, input_shape) with fn(module, variables, *inputs), got "
                        f"{type(fn).__name__} as fn")
    if isinstance(inputs, Mapping):
        if not inputs:
            raise ValueError(f"{where}: no inputs; give {{name: shape}} with at least one entry")
        named = {_name(k, f"{where}: input name"): _shape(v, where) for k, v in inputs.items()}
    else:
        named = {INPUT: _shape(inputs, where)}
    batches = {s[0] for s in named.values()}
    if len(batches) != 1:
        raise ValueError(f"{where}: every input needs the same batch size (first dimension), got "
                         f"{ {k: s[0] for k, s in named.items()} }")
    return Signature(fn, named)


def resolve(signatures: Mapping) -> dict[str, Signature]:
    """`to_tflite(signatures=...)`: a dict name -> `(fn, shape | {input: shape})` or `Signature`, checked."""
    if not isinstance(signatures, Mapping) or not signatures:
        raise TypeError("signatures must be a non-empty dict: name -> (fn, input_shape), with "
                        "fn(module, variables, *inputs)")
    out = {}
    for key, spec in signatures.items():
        where = f"signature {_name(key, 'signature name')!r}"
        if isinstance(spec, Signature):
            out[key] = spec
        elif isinstance(spec, tuple) and len(spec) == 2:
            out[key] = signature(spec[0], spec[1], where)
        else:
            raise TypeError(f"{where}: expected (fn, input_shape) or (fn, {{input: shape}}), got {spec!r}")
    return out


def flatten_outputs(out, where: str = "the model"):
    """One array stays itself; a dict (nested dicts flattened with "/") becomes {name: array} sorted by name, the
    order of the file's outputs. Anything else, a non-array value, or two keys giving one name raises."""
    if not isinstance(out, Mapping):
        if _is_array(out):
            return out
        hint = (" - return a dict naming them, e.g. {'features': f, 'logits': y}"
                if isinstance(out, (tuple, list)) else "")
        raise TypeError(f"{where} returns a {type(out).__name__}; an export needs one array or a dict of named "
                        f"arrays{hint}")
    flat: dict[str, object] = {}
    origin: dict[str, str] = {}

    def walk(d: Mapping, prefix: str, path: str) -> None:
        if not d:
            raise ValueError(f"{where} returns an empty dict{' at ' + path if path else ''}: nothing to export")
        for k, v in d.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool) or str(k) == "":
                raise TypeError(f"{where}: output key {k!r}{' in ' + path if path else ''} is not a non-empty "
                                "string; output names are the dict's keys")
            name, here = f"{prefix}{k}", f"{path}[{k!r}]"
            if isinstance(v, Mapping):
                walk(v, name + "/", here)
                continue
            if not _is_array(v):
                raise TypeError(f"{where}: output {here} is a {type(v).__name__}, not an array; every output of an "
                                "export is an array")
            if name in flat:
                raise ValueError(f"{where}: outputs {origin[name]} and {here} are both named {name!r} (nested keys "
                                 "join with '/'); rename one")
            flat[name], origin[name] = v, here
    walk(out, "", "")
    return {k: flat[k] for k in sorted(flat)}


def _is_array(v) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype") and not isinstance(v, (str, bytes))


def output_names(fn: Callable, module, variables, sig: Signature, where: str) -> tuple[str, ...] | None:
    """The output names of `fn` (None for a single array), found by abstract evaluation: errors before tracing."""
    import jax
    import jax.numpy as jnp

    specs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in sig.inputs.values()]
    # flattened inside: jax would fail on its own (and less clearly) sorting a dict with mixed key types
    out = jax.eval_shape(lambda v, *xs: flatten_outputs(fn(module, v, *xs), where), variables, *specs)
    return tuple(out) if isinstance(out, dict) else None


def flat_fn(fn: Callable, module) -> Callable:
    """`fn` as `(variables, *inputs) -> array | {name: array}` (nested outputs flattened), what is traced and run."""
    return lambda v, *xs: flatten_outputs(fn(module, v, *xs))


def read(content: bytes) -> dict[str, dict[str, list]]:
    """The signatures of a .tflite flatbuffer: key -> {"inputs": [TensorInfo], "outputs": [TensorInfo]}, each
    TensorInfo named by its signature name (the file's order: outputs sorted by name)."""
    from export.ops_report import _enum_names, _schema

    s = _schema()
    model = s.Model.GetRootAs(content, 0)
    types = _enum_names(s.TensorType)
    out = {}
    for i in range(model.SignatureDefsLength()):
        sd = model.SignatureDefs(i)
        g = model.Subgraphs(sd.SubgraphIndex())

        def infos(n, get, g=g):
            return [_info(g.Tensors(get(j).TensorIndex()), get(j).Name().decode(), types) for j in range(n)]
        out[sd.SignatureKey().decode()] = {"inputs": infos(sd.InputsLength(), sd.Inputs),
                                           "outputs": infos(sd.OutputsLength(), sd.Outputs)}
    return out


def _info(tensor, name: str, types):
    from export.ops_report import TensorInfo

    q = tensor.Quantization()
    scale = zero = None
    if q is not None and q.ScaleLength() == 1:
        scale, zero = float(q.Scale(0)), int(q.ZeroPoint(0))
    shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
    return TensorInfo(name, shape, types.get(tensor.Type(), "?"), scale, zero)


def rename(content: bytes, old: str, new: str) -> bytes:
    """The flatbuffer with signature `old` called `new` (the converter names a one-function file's signature
    `serving_default` whatever the function is called)."""
    import flatbuffers

    from export.ops_report import _schema

    s = _schema()
    model = s.ModelT.InitFromObj(s.Model.GetRootAs(content, 0))
    found = [sd for sd in model.signatureDefs or [] if (sd.signatureKey or b"").decode() == old]
    if len(found) != 1:
        raise ValueError(f"the file has no single signature {old!r} to rename")
    found[0].signatureKey = new
    builder = flatbuffers.Builder(len(content) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def as_inputs(data, sig: Signature, what: str) -> dict[str, np.ndarray]:
    """Data for one signature -> {input name: float32 array (N, *shape[1:])}: an array (one-input signatures) or a
    dict by input name; every input the same N >= 1. Images (4-D inputs) get the image checks of
    `export.calibration.as_float_batch`."""
    from export import calibration as calib_io

    if not isinstance(data, Mapping):
        if len(sig.inputs) != 1:
            raise TypeError(f"{what}: the signature has inputs {list(sig.inputs)}; give a dict by input name")
        data = {next(iter(sig.inputs)): data}
    unknown, missing = sorted(set(data) - set(sig.inputs)), [k for k in sig.inputs if k not in data]
    if unknown or missing:
        raise ValueError(f"{what}: inputs are {list(sig.inputs)}; got {sorted(data)}"
                         + (f" (unknown {unknown})" if unknown else "") + (f" (missing {missing})" if missing else ""))
    out = {}
    for name, shape in sig.inputs.items():
        where = f"{what}[{name!r}]" if len(sig.inputs) > 1 else what
        if len(shape) == 4:
            out[name] = calib_io.as_float_batch(data[name], shape, where)
            continue
        arr = np.asarray(data[name])
        if arr.dtype == object or not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"{where} must be a float array, got dtype {arr.dtype}")
        if arr.ndim == len(shape) - 1:
            arr = arr[None]
        if arr.shape[1:] != shape[1:] or len(arr) == 0:
            raise ValueError(f"{where} has shape {arr.shape}; expected (N, {', '.join(map(str, shape[1:]))}), N >= 1")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{where} contains NaN or infinite values")
        out[name] = arr.astype(np.float32, copy=False)
    if len({len(a) for a in out.values()}) != 1:
        raise ValueError(f"{what}: inputs have different numbers of samples {({k: len(a) for k, a in out.items()})}")
    return out


def random_inputs(sig: Signature, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`n` deterministic standard-normal samples of every input (verification without caller data)."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal((n, *s[1:])).astype(np.float32) for k, s in sig.inputs.items()}


def check_signature_options(functions: dict[str, Signature], *, input_hw, batch: int, split, ranges,
                            labels) -> None:
    """`to_tflite` options that belong to the model's own forward, refused with `signatures=`."""
    if input_hw is not None or batch != 1:
        raise ValueError("with signatures=, each signature's input shapes give its size and batch: drop input_hw "
                         "and batch")
    if split not in (None, "auto"):
        raise ValueError("int8_split_top_row rewrites the model's own forward; with signatures= pass None")
    if ranges is not None and (len(functions) > 1 or len(next(iter(functions.values())).inputs) > 1):
        raise ValueError("calibration other than 'minmax' rewrites the ranges of a file with one input; a file of "
                         "several signatures or inputs calibrates with 'minmax'")
    if labels is not None and len(functions) > 1:
        raise ValueError("verify_labels are for one classifier; with several signatures give each a check "
                         "(check={name: ClassificationCheck(labels=...)})")


def image_hw(functions: dict[str, Signature]) -> tuple[int, int] | None:
    """(H, W) of the first 4-D input of the first signature that has one (the sidecar's input size)."""
    for sig in functions.values():
        for shape in sig.inputs.values():
            if len(shape) == 4:
                return shape[1], shape[2]
    return None


def _per_signature(data, functions: dict[str, Signature], what: str) -> dict[str, dict[str, np.ndarray]]:
    if data is None:
        return {}
    if len(functions) == 1:
        key, sig = next(iter(functions.items()))
        return {key: as_inputs(data, sig, what)}
    if not isinstance(data, Mapping):
        raise TypeError(f"with several signatures, {what} is a dict by signature name ({', '.join(functions)}) "
                        f"of arrays or dicts by input name; got {type(data).__name__}")
    unknown = sorted(set(data) - set(functions))
    if unknown:
        raise ValueError(f"{what} names signatures {unknown} the export does not have ({', '.join(functions)})")
    return {k: as_inputs(data[k], functions[k], f"{what}[{k!r}]") for k in functions if k in data}


def prepare_data(functions: dict[str, Signature], representative_data, verify_data, quantization: str,
                 num_verify: int):
    """Calibration and verification inputs per signature: (calib, verify, source) dicts by signature key, inputs
    by name. Every signature needs calibration data for "int8"; verification uses the caller's data, else the first
    `num_verify` calibration samples ("int8"), else `num_verify` random normal ones."""
    calib = _per_signature(representative_data, functions, "representative_data")
    missing = [k for k in functions if k not in calib]
    if quantization == "int8" and missing:
        raise ValueError(f"quantization='int8' needs representative_data for every signature; missing {missing}")
    given = _per_signature(verify_data, functions, "verify_data")
    vdata, sources = {}, {}
    for k, sig in functions.items():
        if k in given:
            vdata[k], sources[k] = given[k], "caller"
        elif quantization == "int8":
            vdata[k], sources[k] = {n: x[:num_verify] for n, x in calib[k].items()}, "calibration"
        else:
            vdata[k], sources[k] = random_inputs(sig, num_verify), "random"
    return calib, vdata, sources
