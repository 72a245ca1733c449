"""Running a .tflite model with the LiteRT interpreter (`ai_edge_litert`), float in and float out.

Only `ai_edge_litert.interpreter.Interpreter` is used: TensorFlow's deprecated `tf.lite.Interpreter` with its default
XNNPACK delegate gave wrong full-int8 results on this stack (FINDINGS). The LiteRT interpreter applies XNNPACK by
default; `xnnpack=False` runs the builtin reference-free kernels instead (for comparisons).

`LiteRTRunner.run` takes a float NHWC batch of any length: it feeds the model's fixed batch size chunk by chunk
(padding the last chunk), quantizes the input when the model has int8/uint8 input and dequantizes the output, so the
caller always sees float logits.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _interpreter_cls():
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ModuleNotFoundError as e:  # pragma: no cover - depends on the install
        raise ModuleNotFoundError(
            "running .tflite models needs the LiteRT runtime: pip install ai-edge-litert", name=e.name
        ) from None
    return Interpreter, OpResolverType


@dataclass(frozen=True)
class DelegateReport:
    """How the XNNPACK delegate covered the graph: `partitions` DELEGATE nodes and the ops left to builtin kernels."""

    partitions: int
    delegated_ops: int
    total_ops: int
    not_delegated: dict[str, int]  # op name -> count of ops that run on builtin (non-XNNPACK) kernels

    def summary(self) -> str:
        rest = ", ".join(f"{k} x{v}" for k, v in sorted(self.not_delegated.items(), key=lambda kv: -kv[1]))
        return (f"XNNPACK: {self.partitions} partition(s), {self.delegated_ops}/{self.total_ops} ops delegated"
                + (f"; on builtin kernels: {rest}" if rest else ""))


class LiteRTRunner:
    """One LiteRT interpreter over a model file or bytes, with float-in/float-out batching."""

    def __init__(self, model: str | os.PathLike | bytes, num_threads: int | None = None, xnnpack: bool = True):
        Interpreter, OpResolverType = _interpreter_cls()
        kwargs = dict(num_threads=num_threads)
        if not xnnpack:
            kwargs["experimental_op_resolver_type"] = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        if isinstance(model, (bytes, bytearray)):
            self.interpreter = Interpreter(model_content=bytes(model), **kwargs)
        else:
            path = Path(model)
            if not path.is_file():
                raise FileNotFoundError(f"no such model file: {path}")
            self.interpreter = Interpreter(model_path=str(path), **kwargs)
        self.interpreter.allocate_tensors()
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"expected a model with one input and one output, got {len(inputs)} and {len(outputs)}")
        self.input, self.output = inputs[0], outputs[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.input["shape"])

    @property
    def batch(self) -> int:
        return self.input_shape[0]

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        dtype = self.input["dtype"]
        if dtype == np.float32:
            return x.astype(np.float32)
        scale, zero = self.input["quantization"]
        info = np.iinfo(dtype)
        return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)

    def dequantize_output(self, y: np.ndarray) -> np.ndarray:
        if self.output["dtype"] == np.float32:
            return y
        scale, zero = self.output["quantization"]
        return (y.astype(np.float32) - zero) * scale

    def invoke(self, x: np.ndarray) -> np.ndarray:
        """One call on exactly one model-sized batch, in the model's own input dtype; the raw output."""
        self.interpreter.set_tensor(self.input["index"], x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"])

    def run(self, x: np.ndarray) -> np.ndarray:
        """Float NHWC batch of any length -> float outputs, chunked to the model's batch size."""
        x = np.asarray(x, np.float32)
        want = self.input_shape
        if x.ndim != len(want) or x.shape[1:] != want[1:]:
            raise ValueError(f"model input is {want} (batch, H, W, C); got an array of shape {x.shape}")
        b, outs = self.batch, []
        for start in range(0, len(x), b):
            chunk = x[start:start + b]
            n = len(chunk)
            if n < b:  # pad the last chunk by repeating its last sample
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, axis=0)])
            outs.append(self.dequantize_output(self.invoke(self.quantize_input(chunk)))[:n])
        return np.concatenate(outs) if outs else np.zeros((0,), np.float32)

    def delegate_report(self) -> DelegateReport:
        """Partitions of the default (XNNPACK) delegate and the ops it left out, read from the interpreter's nodes.

        After delegation the interpreter keeps the original nodes and appends one DELEGATE node per partition. A
        partition's original nodes are found by walking back from the DELEGATE node's outputs to its inputs.
        """
        it = self.interpreter
        details = it._get_ops_details()  # noqa: SLF001 - the only way the Python API exposes nodes
        delegates = [d for d in details if d["op_name"] == "DELEGATE"]
        originals = [d for d in details if d["op_name"] != "DELEGATE"]
        producer = {}
        for d in originals:
            for t in d["outputs"]:
                producer[int(t)] = d
        covered: set[int] = set()
        for d in delegates:
            boundary = {int(t) for t in d["inputs"]}
            stack = [int(t) for t in d["outputs"]]
            seen: set[int] = set()
            while stack:
                t = stack.pop()
                if t in seen or t in boundary or t not in producer:
                    continue
                seen.add(t)
                node = producer[t]
                if node["index"] in covered:
                    continue
                covered.add(node["index"])
                stack.extend(int(i) for i in node["inputs"] if i >= 0)
        left = Counter(d["op_name"] for d in originals if d["index"] not in covered)
        return DelegateReport(len(delegates), len(covered), len(originals), dict(left))
