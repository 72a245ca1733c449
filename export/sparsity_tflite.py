"""Whether sparsity survives export: the constant weights of a .tflite's convolutions and fully connected layers.

TFLite stores CONV_2D filters as OHWI, DEPTHWISE_CONV_2D as (1, H, W, C) and FULLY_CONNECTED as (out, in): the last
axis is the one N:M groups run along (input channels; channels for depthwise). The converter folds BatchNorm by
scaling each output channel, and int8 weights are symmetric (zero point 0), so zeros stay zeros.

    res = export.to_tflite(model, quantization="int8", representative_data=x)
    rows = check_tflite_n_m(res.content, "2:4")
    assert all(r.ok for r in rows if r.ok is not None)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compress.sparsity_masks import n_m_group_nonzeros, parse_n_m

WEIGHT_OPS = ("CONV_2D", "FULLY_CONNECTED")
_NUMPY = {"FLOAT32": np.float32, "FLOAT16": np.float16, "INT8": np.int8, "UINT8": np.uint8, "INT16": np.int16,
          "INT32": np.int32}


@dataclass(frozen=True)
class TfliteKernel:
    name: str  # the weight tensor's name in the flatbuffer
    op: str  # CONV_2D, FULLY_CONNECTED or DEPTHWISE_CONV_2D
    dtype: str  # stored type: FLOAT32, FLOAT16 (fp16 export, behind a DEQUANTIZE), INT8, ...
    values: np.ndarray = field(repr=False)  # float32, dequantized; exactly 0 where the stored value is the zero point

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def module(self) -> str | None:
        """The flax module path the weights came from ("stages_1/block_0/conv_pw"), read from the name jax2tf gives
        the fused tensor ("jit(<lambda>)/MobileNet/stages_1/block_0/conv_pw/conv_general_dilated;..."); None when
        the name does not say."""
        for part in self.name.split(";"):
            for op in ("/conv_general_dilated", "/dot_general"):
                if part.endswith(op):
                    segs = part[:-len(op)].split("/")
                    return "/".join(segs[2:] if segs[0].startswith("jit(") else segs) or None
        return None


@dataclass(frozen=True)
class TfliteNMRow:
    name: str
    module: str | None  # flax module path, when the tensor name tells (see TfliteKernel.module)
    op: str
    shape: tuple[int, ...]
    dtype: str
    sparsity: float
    groups: int  # groups of M along the last axis (0 when M does not divide it)
    bad_groups: int  # groups with more than N non-zeros
    ok: bool | None  # None: M does not divide the last axis (a layer N:M does not cover, such as an RGB stem)


def _schema():
    from export.ops_report import _schema as schema

    return schema()


def tflite_kernels(content: bytes, ops=WEIGHT_OPS) -> list[TfliteKernel]:
    """The constant weight tensors (input 1) of every op named in `ops`, in graph order, read from the flatbuffer."""
    s = _schema()
    if len(content) < 8 or content[4:8] != b"TFL3":
        raise ValueError("not a TFLite flatbuffer (missing the TFL3 identifier); pass ExportResult.content or the "
                         "bytes of a .tflite file")
    names = {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(s.TensorType).items() if not k.startswith("_")}
    model = s.Model.GetRootAs(content, 0)
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        codes.append(names.get(max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode()), "?"))

    def data(tensor) -> np.ndarray | None:
        b = model.Buffers(tensor.Buffer()) if 0 < tensor.Buffer() < model.BuffersLength() else None
        if b is None:
            return None
        if b.DataLength() > 0:
            raw = b.DataAsNumpy().tobytes()
        elif b.Offset() > 1:  # large models keep buffers after the flatbuffer
            raw = content[b.Offset():b.Offset() + b.Size()]
        else:
            return None
        kind = types.get(tensor.Type(), "?")
        if kind not in _NUMPY:
            return None
        shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
        q = np.frombuffer(raw, _NUMPY[kind]).reshape(shape)
        quant = tensor.Quantization()
        if kind.startswith(("INT", "UINT")) and quant is not None and quant.ScaleLength():
            dim = quant.QuantizedDimension() if quant.ScaleLength() > 1 else 0
            bshape = [1] * q.ndim
            if quant.ScaleLength() > 1:
                bshape[dim] = -1
            scale = quant.ScaleAsNumpy().reshape(bshape)
            zero = quant.ZeroPointAsNumpy().reshape(bshape) if quant.ZeroPointLength() else 0
            return ((q.astype(np.int64) - zero) * scale).astype(np.float32)
        return q.astype(np.float32)

    out = []
    for gi in range(model.SubgraphsLength()):
        g = model.Subgraphs(gi)
        producer = {}
        for oi in range(g.OperatorsLength()):
            op = g.Operators(oi)
            for t in (op.OutputsAsNumpy() if op.OutputsLength() else []):
                producer[int(t)] = op
        for oi in range(g.OperatorsLength()):
            op = g.Operators(oi)
            name = codes[op.OpcodeIndex()]
            if name not in ops or op.InputsLength() < 2:
                continue
            idx = int(op.Inputs(1))
            tensor = g.Tensors(idx)
            values = data(tensor)
            src = producer.get(idx)
            if values is None and src is not None and codes[src.OpcodeIndex()] == "DEQUANTIZE":
                tensor = g.Tensors(int(src.Inputs(0)))  # fp16 (or int8) weights dequantized at load time
                values = data(tensor)
            if values is not None:
                out.append(TfliteKernel((tensor.Name() or b"").decode(), name, types.get(tensor.Type(), "?"), values))
    return out


def check_tflite_n_m(content: bytes, n_m="2:4", ops=WEIGHT_OPS) -> list[TfliteNMRow]:
    """Per weight tensor of `ops`: whether every group of M along the last axis holds at most N non-zeros."""
    n, m = parse_n_m(n_m)
    rows = []
    for k in tflite_kernels(content, ops):
        v = k.values
        sparsity = float(1.0 - np.count_nonzero(v) / v.size) if v.size else 0.0
        groups = bad = 0
        ok = None
        if v.ndim and v.shape[-1] % m == 0:
            counts = n_m_group_nonzeros(v, m, -1)
            groups, bad = int(counts.size), int((counts > n).sum())
            ok = bad == 0
        rows.append(TfliteNMRow(k.name, k.module, k.op, k.shape, k.dtype, sparsity, groups, bad, ok))
    return rows
