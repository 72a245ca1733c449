"""What a .tflite flatbuffer contains: an op histogram, unsupported ops, I/O types and float islands.

Parsed with the flatbuffer schema module that ships with `ai_edge_litert` (no TensorFlow needed), through the
reader API so that weight buffers are never copied.

Float island: in a model whose activations are quantized, a run of float ops entered through a DEQUANTIZE of a
quantized activation and left through a QUANTIZE - the converter's fallback for an op it could not quantize. Each
costs two conversions and usually a delegate partition, so the report lists them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

_QUANT_TYPES = ("INT8", "UINT8", "INT16", "INT4")
# Custom ops whose kernels LiteRT's builtin op resolver registers itself: they run on a stock runtime, so they count
# as builtin (SSD-style detection heads end in this one).
LITERT_CUSTOM_BUILTINS = frozenset({"TFLite_Detection_PostProcess"})


def _schema():
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ModuleNotFoundError:  # pragma: no cover - TensorFlow's copy of the same generated module
        from tensorflow.lite.python import schema_py_generated as schema
    return schema


def _enum_names(cls) -> dict[int, str]:
    return {v: k for k, v in vars(cls).items() if not k.startswith("_") and isinstance(v, int)}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # TFLite type name: FLOAT32, INT8, ...
    scale: float | None = None  # per-tensor quantization, when quantized
    zero_point: int | None = None

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype.lower(),
                "scale": self.scale, "zero_point": self.zero_point}


@dataclass(frozen=True)
class OpsReport:
    ops: dict[str, int]  # op name (CUSTOM ops by their custom code) -> count, in order of first appearance
    flex_ops: dict[str, int]
    custom_ops: dict[str, int]  # custom ops other than Flex and LITERT_CUSTOM_BUILTINS
    stablehlo_ops: dict[str, int]  # STABLEHLO_* builtins: no CPU interpreter kernel runs them
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    num_subgraphs: int
    weight_bytes: int
    quantized_activations: bool  # some op produces an int8/uint8/int16 activation
    float_islands: tuple[tuple[str, ...], ...] = ()  # op names of each island, in graph order
    op_output_types: dict[str, int] = field(default_factory=dict)  # activation dtype -> number of ops producing it

    @property
    def num_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def unsupported(self) -> dict[str, int]:
        return {**self.flex_ops, **self.custom_ops, **self.stablehlo_ops}

    def histogram(self) -> str:
        return ", ".join(f"{k} x{v}" for k, v in sorted(self.ops.items(), key=lambda kv: (-kv[1], kv[0])))

    def summary(self) -> str:
        lines = [f"ops: {self.num_ops} in {self.num_subgraphs} subgraph(s): {self.histogram()}"]
        io = lambda ts: ", ".join(f"{t.dtype.lower()}{list(t.shape)}" + (  # noqa: E731
            f" (scale {t.scale:.6g}, zero point {t.zero_point})" if t.scale is not None else "") for t in ts)
        lines.append(f"input: {io(self.inputs)}; output: {io(self.outputs)}")
        if self.unsupported:
            lines.append(f"unsupported by builtin LiteRT: {self.unsupported}")
        if self.quantized_activations:
            if self.float_islands:
                isl = "; ".join(" -> ".join(i) for i in self.float_islands)
                lines.append(f"float islands in the quantized graph: {len(self.float_islands)}: {isl}")
            else:
                lines.append("float islands: none (all activations between input and output stay quantized)")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "ops": self.ops, "num_ops": self.num_ops, "flex_ops": self.flex_ops, "custom_ops": self.custom_ops,
            "stablehlo_ops": self.stablehlo_ops, "inputs": [t.as_dict() for t in self.inputs],
            "outputs": [t.as_dict() for t in self.outputs], "weight_bytes": self.weight_bytes,
            "quantized_activations": self.quantized_activations,
            "float_islands": [list(i) for i in self.float_islands],
        }


def analyze(content: bytes) -> OpsReport:
    """Parse a .tflite flatbuffer."""
    s = _schema()
    if len(content) < 8 or content[4:8] != b"TFL3":
        raise ValueError("not a TFLite flatbuffer (missing the TFL3 identifier)")
    model = s.Model.GetRootAs(content, 0)
    op_names = _enum_names(s.BuiltinOperator)
    type_names = _enum_names(s.TensorType)
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        name = op_names.get(code, f"BUILTIN_{code}")
        if name == "CUSTOM":
            name = (oc.CustomCode() or b"").decode() or "CUSTOM"
        codes.append(name)

    def const(buffer_index: int) -> bool:
        if buffer_index <= 0 or buffer_index >= model.BuffersLength():
            return False
        b = model.Buffers(buffer_index)
        return b.DataLength() > 0 or b.Offset() > 1

    weight_bytes = 0
    for i in range(1, model.BuffersLength()):
        b = model.Buffers(i)
        weight_bytes += b.DataLength() or (b.Size() if b.Offset() > 1 else 0)

    ops: Counter[str] = Counter()
    out_types: Counter[str] = Counter()
    islands: list[tuple[str, ...]] = []
    quantized_acts = False
    g0 = None
    for si in range(model.SubgraphsLength()):
        g = model.Subgraphs(si)
        g0 = g0 or g
        tensors = [g.Tensors(t) for t in range(g.TensorsLength())]
        ttype = [type_names.get(t.Type(), str(t.Type())) for t in tensors]
        is_const = [const(t.Buffer()) for t in tensors]
        nodes = []
        for oi in range(g.OperatorsLength()):
            op = g.Operators(oi)
            name = codes[op.OpcodeIndex()]
            ops[name] += 1
            ins = [int(t) for t in op.InputsAsNumpy()] if op.InputsLength() else []
            outs = [int(t) for t in op.OutputsAsNumpy()] if op.OutputsLength() else []
            nodes.append((name, ins, outs))
            for t in outs:
                out_types[ttype[t]] += 1
                if ttype[t] in _QUANT_TYPES and name != "QUANTIZE":
                    quantized_acts = True
        if quantized_acts:
            islands += _float_islands(nodes, ttype, is_const)

    def io(indices) -> tuple[TensorInfo, ...]:
        infos = []
        for t in indices:
            tensor = g0.Tensors(int(t))
            q = tensor.Quantization()
            scale = zero = None
            if q is not None and q.ScaleLength() == 1:
                scale, zero = float(q.Scale(0)), int(q.ZeroPoint(0))
            shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
            infos.append(TensorInfo((tensor.Name() or b"").decode(), shape, type_names.get(tensor.Type(), "?"),
                                    scale, zero))
        return tuple(infos)

    inputs = io(g0.InputsAsNumpy()) if g0 is not None and g0.InputsLength() else ()
    outputs = io(g0.OutputsAsNumpy()) if g0 is not None and g0.OutputsLength() else ()
    flex = {k: v for k, v in ops.items() if k.startswith("Flex")}
    stablehlo = {k: v for k, v in ops.items() if k.startswith("STABLEHLO_")}
    custom = {k: v for k, v in ops.items() if k not in flex and k not in stablehlo and k not in op_names.values()
              and k not in LITERT_CUSTOM_BUILTINS}
    return OpsReport(dict(ops), flex, custom, stablehlo, inputs, outputs, model.SubgraphsLength(), int(weight_bytes),
                     quantized_acts, tuple(islands), dict(out_types))


def _float_islands(nodes, ttype, is_const) -> list[tuple[str, ...]]:
    """Runs of float ops between a DEQUANTIZE of a quantized activation and a QUANTIZE back (see module doc)."""
    consumers: dict[int, list[int]] = {}
    for i, (_, ins, _) in enumerate(nodes):
        for t in ins:
            consumers.setdefault(t, []).append(i)
    float_op = [name not in ("QUANTIZE", "DEQUANTIZE") and any(ttype[t] == "FLOAT32" for t in outs)
                for name, _, outs in nodes]
    seen: set[int] = set()
    islands = []
    for i, (name, ins, outs) in enumerate(nodes):
        if name != "DEQUANTIZE" or not ins or is_const[ins[0]] or ttype[ins[0]] not in _QUANT_TYPES:
            continue
        # flood the float ops downstream of this activation DEQUANTIZE
        members, requant, stack = [], False, [c for t in outs for c in consumers.get(t, [])]
        while stack:
            j = stack.pop()
            if nodes[j][0] == "QUANTIZE":
                requant = True
                continue
            if not float_op[j] or j in seen:
                continue
            seen.add(j)
            members.append(j)
            stack.extend(c for t in nodes[j][2] for c in consumers.get(t, []))
        if members and requant:
            islands.append(tuple(nodes[j][0] for j in sorted(members)))
    return islands


def dtype_of(info: TensorInfo) -> np.dtype:
    return np.dtype(info.dtype.lower())
