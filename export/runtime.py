"""Running a .tflite model with the LiteRT interpreter (`ai_edge_litert`), float in and float out.

Only `ai_edge_litert.interpreter.Interpreter` is used: TensorFlow's deprecated `tf.lite.Interpreter` with its default
XNNPACK delegate gave wrong full-int8 results on this stack (FINDINGS). The LiteRT interpreter applies XNNPACK by
default; `xnnpack=False` runs the builtin reference-free kernels instead (for comparisons).

`LiteRTRunner.run` takes a float NHWC batch of any length: it feeds the model's fixed batch size chunk by chunk
(padding the last chunk), quantizes the input when the model has int8/uint8 input and dequantizes the output, so the
caller always sees float logits.

Files with several outputs or signatures (`export.signatures`): a runner runs one signature (`signature=`, needed
when the file has several; `signatures()` lists them), takes one array or a dict by input name, and returns a dict
by output name (in the file's order) when the signature has several outputs, one array when it has one.
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
    """One LiteRT interpreter over a model file or bytes, running one of its signatures with float-in/float-out
    batching."""

    def __init__(self, model: str | os.PathLike | bytes, num_threads: int | None = None, xnnpack: bool = True,
                 signature: str | None = None):
        Interpreter, OpResolverType = _interpreter_cls()
        kwargs = dict(num_threads=num_threads)
        if not xnnpack:
            kwargs["experimental_op_resolver_type"] = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        if isinstance(model, (bytes, bytearray)):
            interpreter = Interpreter(model_content=bytes(model), **kwargs)
        else:
            path = Path(model)
            if not path.is_file():
                raise FileNotFoundError(f"no such model file: {path}")
            interpreter = Interpreter(model_path=str(path), **kwargs)
        self._attach(interpreter, signature)

    @classmethod
    def from_interpreter(cls, interpreter, signature: str | None = None) -> "LiteRTRunner":
        """A runner over an interpreter made elsewhere (TensorFlow's, for files with Flex ops)."""
        runner = cls.__new__(cls)
        runner._attach(interpreter, signature)
        return runner

    def _attach(self, interpreter, signature: str | None) -> None:
        self.interpreter = interpreter
        interpreter.allocate_tensors()
        listed = interpreter.get_signature_list()
        if signature is None and len(listed) > 1:
            raise ValueError(f"the model has signatures {sorted(listed)}: choose one with signature=")
        if signature is not None and signature not in listed:
            raise ValueError(f"the model has no signature {signature!r}; it has {sorted(listed) or 'none'}")
        self.signature = signature if signature is not None else next(iter(listed), None)
        if self.signature is not None and (len(listed) > 1 or len(listed[self.signature]["outputs"]) > 1
                                           or len(listed[self.signature]["inputs"]) > 1):
            self._runner = interpreter.get_signature_runner(self.signature)
            self.inputs = dict(self._runner.get_input_details())
            self.outputs = dict(self._runner.get_output_details())
        else:  # one input and one output: the interpreter's own tensors (what timing code sets directly)
            self._runner = None
            ins, outs = interpreter.get_input_details(), interpreter.get_output_details()
            if len(ins) != 1 or len(outs) != 1:
                raise ValueError(f"a model without signatures needs one input and one output, got {len(ins)} and "
                                 f"{len(outs)}")
            names = listed.get(self.signature, {"inputs": [ins[0]["name"]], "outputs": [outs[0]["name"]]})
            self.inputs, self.outputs = {names["inputs"][0]: ins[0]}, {names["outputs"][0]: outs[0]}
        self.input = next(iter(self.inputs.values())) if len(self.inputs) == 1 else None
        self.output = next(iter(self.outputs.values())) if len(self.outputs) == 1 else None

    def signatures(self) -> dict[str, dict[str, list[str]]]:
        """Every signature of the file: key -> {"inputs": [names], "outputs": [names]}."""
        return self.interpreter.get_signature_list()

    def _one(self, details, what: str) -> dict:
        if details is None:
            raise ValueError(f"signature {self.signature!r} has several {what}s {list(getattr(self, what + 's'))}; "
                             "use run() with a dict by name")
        return details

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self._one(self.input, "input")["shape"])

    @property
    def batch(self) -> int:
        return int(next(iter(self.inputs.values()))["shape"][0])

    def quantize_input(self, x: np.ndarray, details: dict | None = None) -> np.ndarray:
        details = details or self._one(self.input, "input")
        dtype = details["dtype"]
        if dtype == np.float32:
            return x.astype(np.float32)
        scale, zero = details["quantization"]
        info = np.iinfo(dtype)
        return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)

    def dequantize_output(self, y: np.ndarray, details: dict | None = None) -> np.ndarray:
        details = details or self._one(self.output, "output")
        if details["dtype"] == np.float32:
            return y
        scale, zero = details["quantization"]
        if scale == 0:  # not quantized (e.g. an integer output of the model itself)
            return y
        return (y.astype(np.float32) - zero) * scale

    def invoke(self, x: np.ndarray) -> np.ndarray:
        """One call on exactly one model-sized batch, in the model's own input dtype; the raw output."""
        inp, out = self._one(self.input, "input"), self._one(self.output, "output")
        if self._runner is not None:
            return self._runner(**{next(iter(self.inputs)): x})[next(iter(self.outputs))]
        self.interpreter.set_tensor(inp["index"], x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(out["index"])

    def prepared_call(self, x: np.ndarray):
        """A zero-argument function that runs the model on `x` (one model-sized batch in the input's dtype), for
        timing: the input is set once where the interpreter's own tensors are used. A file with several outputs
        (a detector's boxes, scores, classes, count) runs through its signature runner, which holds the interpreter,
        so that every call goes through the runner (it also sets the input and copies the outputs, a few hundred
        microseconds at most)."""
        if self._runner is not None:
            feed = {next(iter(self.inputs)): x}
            return lambda: self._runner(**feed)
        self.interpreter.set_tensor(self._one(self.input, "input")["index"], x)
        return self.interpreter.invoke

    def _call(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._runner is not None:
            return self._runner(**feed)
        return {next(iter(self.outputs)): self.invoke(next(iter(feed.values())))}

    def run(self, x) -> np.ndarray | dict[str, np.ndarray]:
        """Float inputs (one array, or a dict by input name) with any number of samples -> float outputs (one array,
        or a dict by output name), chunked to the model's batch size."""
        feed = x if isinstance(x, dict) else {next(iter(self.inputs)): x} if len(self.inputs) == 1 else None
        if feed is None or set(feed) != set(self.inputs):
            raise ValueError(f"signature {self.signature!r} takes inputs {list(self.inputs)}; give "
                             + ("one array" if len(self.inputs) == 1 else "a dict by input name")
                             + (f", got keys {sorted(feed)}" if isinstance(x, dict) else ""))
        feed = {k: np.asarray(v, np.float32) for k, v in feed.items()}
        for k, v in feed.items():
            want = tuple(int(d) for d in self.inputs[k]["shape"])
            if v.ndim != len(want) or v.shape[1:] != want[1:]:
                named = f"input {k!r} " if len(self.inputs) > 1 else ""
                layout = " (batch, H, W, C)" if len(want) == 4 else ""
                raise ValueError(f"model {named}is {want}{layout}; got an array of shape {v.shape}")
        n_all = {len(v) for v in feed.values()}
        if len(n_all) != 1:
            raise ValueError(f"inputs have different numbers of samples: { {k: len(v) for k, v in feed.items()} }")
        total, b = n_all.pop(), self.batch
        outs: dict[str, list] = {k: [] for k in self.outputs}
        for start in range(0, total, b):
            chunk, n = {}, 0
            for k, v in feed.items():
                c = v[start:start + b]
                n = len(c)
                if n < b:  # pad the last chunk by repeating its last sample
                    c = np.concatenate([c, np.repeat(c[-1:], b - n, axis=0)])
                chunk[k] = self.quantize_input(c, self.inputs[k])
            got = self._call(chunk)
            for k in self.outputs:
                outs[k].append(self.dequantize_output(got[k], self.outputs[k])[:n])
        result = {k: np.concatenate(v) if v else np.zeros((0,), np.float32) for k, v in outs.items()}
        return next(iter(result.values())) if len(result) == 1 else result

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
