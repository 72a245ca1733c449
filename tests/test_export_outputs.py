"""Export of what other tasks produce: named outputs, several signatures per file, checks supplied by the task.

Tiny linen modules at 16x16-32x32 (a two-head detector-like net, a two-stage early-exit cascade), so every test here
stays within seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from export import ExportParityError, LiteRTRunner, to_tflite
from export import parity
from export.metadata import read as read_metadata
from export.verify import ClassificationCheck, OutputsReport, PerOutputCheck, SegmentationCheck, mean_iou
from zoo.layers.conv import Conv2d


class TwoHeads(nn.Module):
    """Boxes per position and class scores per image, the shape of a detection head's outputs (zoo layers: export
    passes ask the layer-kinds table about every parameter-holding layer)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = nn.BatchNorm(use_running_average=not train, name="bn")(Conv2d(8, 3, name="stem")(x))
        y = nn.relu(y)
        return {"scores": nn.Dense(3, name="cls")(y.mean((1, 2))), "boxes": Conv2d(4, 1, use_bias=True, name="box")(y)}


class Cascade(nn.Module):
    """Two stages with an exit each: stage_k(features) -> (features, logits)."""

    def setup(self):
        self.stem = Conv2d(8, 3, stride=2, use_bias=True)
        self.exit0 = nn.Dense(5)
        self.body = Conv2d(16, 3, stride=2, use_bias=True)
        self.exit1 = nn.Dense(5)

    def stage0(self, x):
        f = nn.relu(self.stem(x))
        return {"features": f, "logits": self.exit0(f.mean((1, 2)))}

    def stage1(self, f):
        g = nn.relu(self.body(f))
        return {"features": g, "logits": self.exit1(g.mean((1, 2)))}

    def __call__(self, x, train: bool = False):
        return self.stage1(self.stage0(x)["features"])["logits"]


def _init(module, shape):
    return module.init(jax.random.key(0), jnp.zeros(shape, jnp.float32))


def _rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _files(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


@pytest.fixture(scope="module")
def heads():
    module = TwoHeads()
    return module, _init(module, (1, 16, 16, 3))


SIGNATURES = {
    "stage_0": (lambda m, v, x: m.apply(v, x, method="stage0"), (1, 32, 32, 3)),
    "stage_1": (lambda m, v, f: m.apply(v, f, method="stage1"), {"features": (1, 16, 16, 8)}),
}


def test_two_outputs_export_fp32_with_their_names(heads, tmp_path):
    module, variables = heads
    out = tmp_path / "det.tflite"
    res = to_tflite(module, variables, input_hw=(16, 16), out=out, progress=False)
    names = [t.name for t in res.signatures["serving_default"]["outputs"]]
    assert names == ["boxes", "scores"]  # the dict's keys, ordered by name
    v = res.verification
    assert isinstance(v, OutputsReport) and v.passed and list(v.outputs) == names
    assert all(s.max_abs_diff <= s.tolerance for s in v.outputs.values())
    x = _rand((3, 16, 16, 3), seed=1)
    got = LiteRTRunner(out).run(x)
    want = module.apply(variables, x)
    assert list(got) == names and got["boxes"].shape == (3, 16, 16, 4)
    for k in names:
        np.testing.assert_allclose(got[k], want[k], atol=1e-4)
    meta = read_metadata(out)
    assert meta["check"] == "per-output" and set(meta["verification"]["outputs"]) == set(names)
    assert [t["name"] for t in meta["signatures"]["serving_default"]["outputs"]] == names
    assert meta["output"]["name"] == "boxes" and meta["input"]["name"] == "images"


def test_two_outputs_export_int8_calibrated_on_one_input(heads, tmp_path):
    module, variables = heads
    out = tmp_path / "det8.tflite"
    res = to_tflite(module, variables, input_hw=(16, 16), quantization="int8", int8_io=True,
                    representative_data=_rand((16, 16, 16, 3), seed=2), out=out, progress=False)
    v = res.verification
    assert v.quantization == "int8" and list(v.outputs) == ["boxes", "scores"] and v.atol is None
    assert all(s.sqnr_db > 25 for s in v.outputs.values())  # quantized (35-44 dB here), the same function
    assert all(t.dtype == "INT8" and t.scale > 0 for t in res.signatures["serving_default"]["outputs"])
    got = LiteRTRunner(out).run(_rand((2, 16, 16, 3), seed=3))  # int8 tensors in and out, floats for the caller
    want = module.apply(variables, _rand((2, 16, 16, 3), seed=3))
    assert set(got) == {"boxes", "scores"} and got["scores"].dtype == np.float32
    np.testing.assert_allclose(got["boxes"], want["boxes"], atol=0.1 * float(np.abs(want["boxes"]).max()))


def test_two_signatures_in_one_file_run_and_verified_each(tmp_path, monkeypatch):
    module = Cascade()
    variables = _init(module, (1, 32, 32, 3))
    out = tmp_path / "cascade.tflite"
    check = {"stage_1": ClassificationCheck(output="logits")}
    res = to_tflite(module, variables, signatures=SIGNATURES, check=check, out=out, progress=False)
    assert list(res.verifications) == ["stage_0", "stage_1"] and res.input_shape == (1, 32, 32, 3)
    assert isinstance(res.verifications["stage_0"], OutputsReport)
    assert res.verifications["stage_1"].top1_agreement == 1.0  # classification of the named logits
    meta = read_metadata(out)
    assert {k: [t["name"] for t in s["inputs"]] for k, s in meta["signatures"].items()} == {
        "stage_0": ["input"], "stage_1": ["features"]}
    assert [t["name"] for t in meta["signatures"]["stage_1"]["outputs"]] == ["features", "logits"]
    assert meta["signatures"]["stage_1"]["check"] == "classification"

    with pytest.raises(ValueError, match="choose one with signature="):
        LiteRTRunner(out)
    x = _rand((2, 32, 32, 3), seed=4)
    first = LiteRTRunner(out, signature="stage_0").run(x)
    second = LiteRTRunner(out, signature="stage_1").run({"features": first["features"]})
    want = module.apply(variables, x)
    np.testing.assert_allclose(second["logits"], want, atol=1e-4)

    real = parity._run_exported

    def stage_1_off(content, x, flex, signature=None):  # only the second signature's file output is wrong
        got, delegate = real(content, x, flex, signature)
        if signature == "stage_1":
            got = {**got, "features": got["features"] + 0.01}
        return got, delegate

    monkeypatch.setattr(parity, "_run_exported", stage_1_off)
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(ExportParityError, match="signature 'stage_1'.*features"):
        to_tflite(module, variables, signatures=SIGNATURES, out=bad / "c.tflite", progress=False)
    assert _files(bad) == []


def test_one_named_signature_keeps_its_name():
    """The converter calls a lone signature serving_default; the file says what the caller named it."""
    module = Cascade()
    variables = _init(module, (1, 32, 32, 3))
    res = to_tflite(module, variables, signatures={"stage_0": SIGNATURES["stage_0"]}, progress=False)
    assert list(res.signatures) == ["stage_0"] and set(res.outputs) == {"features", "logits"}
    runner = LiteRTRunner(res.content)
    assert runner.signature == "stage_0" and list(runner.signatures()) == ["stage_0"]
    x = _rand((2, 32, 32, 3), seed=6)
    np.testing.assert_allclose(runner.run(x)["logits"], module.apply(variables, x, method="stage0")["logits"],
                               atol=1e-4)


def test_two_signatures_int8_each_calibrated_on_its_own_inputs():
    module = Cascade()
    variables = _init(module, (1, 32, 32, 3))
    x = _rand((8, 32, 32, 3), seed=5)
    features = np.asarray(module.apply(variables, x, method="stage0")["features"])
    with pytest.raises(ValueError, match=r"every signature; missing \['stage_1'\]"):
        to_tflite(module, variables, signatures=SIGNATURES, quantization="int8",
                  representative_data={"stage_0": x}, progress=False)
    res = to_tflite(module, variables, signatures=SIGNATURES, quantization="int8",
                    representative_data={"stage_0": x, "stage_1": {"features": features}}, progress=False)
    assert {k: s["data"] for k, s in res.metadata["signatures"].items()} == {"stage_0": "calibration",
                                                                               "stage_1": "calibration"}
    assert all(s.sqnr_db > 25 for r in res.verifications.values() for s in r.outputs.values())
    got = LiteRTRunner(res.content, signature="stage_1").run({"features": features})
    assert got["logits"].shape == (8, 5)


@dataclass(frozen=True)
class BoxesInside:
    """A task's own check: every box coordinate of the file within `limit` of JAX's."""

    limit: float
    name: str = "boxes-inside"

    def compare(self, reference, output, quantization):
        err = float(np.abs(reference["boxes"] - output["boxes"]).max())
        return _BoxReport(err, self.limit)


@dataclass(frozen=True)
class _BoxReport:
    max_box_error: float
    limit: float

    @property
    def passed(self) -> bool:
        return self.max_box_error <= self.limit

    def summary(self) -> str:
        return f"boxes within {self.max_box_error:.3g} of JAX (limit {self.limit:g})"

    def as_dict(self) -> dict:
        return {"max_box_error": self.max_box_error, "limit": self.limit}


def test_the_task_supplies_the_check(heads, tmp_path):
    module, variables = heads
    out = tmp_path / "det.tflite"
    res = to_tflite(module, variables, input_hw=(16, 16), quantization="fp16", check=BoxesInside(0.05), out=out,
                    progress=False)
    meta = read_metadata(out)
    assert meta["check"] == "boxes-inside" and meta["verification"] == res.verification.as_dict()
    for p in tmp_path.iterdir():
        p.unlink()
    with pytest.raises(ExportParityError, match=r"boxes within .* \(limit 0\)"):
        to_tflite(module, variables, input_hw=(16, 16), quantization="fp16", check=BoxesInside(0.0), out=out,
                  progress=False)
    assert _files(tmp_path) == []
    with pytest.raises(TypeError, match="OutputCheck"):
        to_tflite(module, variables, input_hw=(16, 16), check=lambda r, o, q: True, progress=False)
    with pytest.raises(ValueError, match=r"outputs \['boxes', 'scores'\]: a ClassificationCheck compares one"):
        to_tflite(module, variables, input_hw=(16, 16), check=ClassificationCheck(), out=out, progress=False)
    with pytest.raises(ValueError, match="verify_labels are read by a ClassificationCheck"):
        to_tflite(module, variables, input_hw=(16, 16), verify_labels=np.zeros(8, int), out=out, progress=False)
    assert _files(tmp_path) == []


def test_segmentation_check_on_per_pixel_logits(heads, tmp_path):
    """The boxes output read as 4-class per-pixel logits: the file labels the pixels as JAX does."""
    module, variables = heads
    res = to_tflite(module, variables, input_hw=(16, 16), quantization="fp16", out=tmp_path / "seg.tflite",
                    check=SegmentationCheck(output="boxes", min_pixel_agreement=0.9), progress=False)
    v = res.verification
    assert v.output == "boxes" and v.pixel_agreement >= 0.9 and 0.9 <= v.miou <= 1.0 and v.logits.tolerance is None
    assert read_metadata(tmp_path / "seg.tflite")["check"] == "segmentation"
    # the numbers: 2 of 4 pixels relabelled
    a = np.zeros((1, 2, 2, 3))
    a[..., 0] = 1.0
    b = a.copy()
    b[0, 0, :, 2] = 2.0
    report = SegmentationCheck(min_miou=0.6).compare({"y": a}, {"y": b}, "int8")
    assert report.pixel_agreement == 0.5 and report.miou == pytest.approx(0.25) and not report.passed
    assert mean_iou(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])) == pytest.approx((1 / 2 + 2 / 3) / 2)


class Returns(nn.Module):
    kind: str

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = Conv2d(4, 1, name="conv")(x)
        return {
            "not_array": {"boxes": y, "version": "v1"},
            "collide": {"det": {"boxes": y}, "det/boxes": y * 2},
            "tuple": (y, y.mean((1, 2))),
            "empty": {},
        }[self.kind]


@pytest.mark.parametrize("kind, error, match", [
    ("not_array", TypeError, r"output \['version'\] is a str, not an array"),
    ("collide", ValueError, r"\['det'\]\['boxes'\] and \['det/boxes'\] are both named 'det/boxes'"),
    ("tuple", TypeError, "return a dict naming them"),
    ("empty", ValueError, "empty dict"),
])
def test_bad_outputs_are_named_before_tracing(kind, error, match, tmp_path):
    module = Returns(kind)
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
    with pytest.raises(error, match=match):
        to_tflite(module, variables, input_hw=(16, 16), out=tmp_path / "m.tflite", progress=False)
    assert _files(tmp_path) == []


def test_per_output_check_numbers():
    ref = {"a": np.array([[1.0, -2.0]]), "b": np.array([[10.0]])}
    out = {"a": ref["a"] + 1e-5, "b": ref["b"] + 1e-3}
    report = PerOutputCheck().compare(ref, out, "fp32")
    assert report.outputs["a"].within_tolerance and not report.outputs["b"].within_tolerance and not report.passed
    assert "b [1, 1]: max |diff| 0.001" in report.summary()
    quant = PerOutputCheck(min_sqnr_db=30).compare(ref, out, "int8")
    assert quant.passed and quant.outputs["b"].sqnr_db == pytest.approx(80.0, abs=0.1)
    with pytest.raises(ExportParityError, match="returns outputs"):
        PerOutputCheck().compare(ref, {"a": out["a"]}, "fp32")


def test_litert_detection_postprocess_counts_as_builtin(heads):
    """A custom op that LiteRT's own resolver runs (SSD post-processing) is not an unsupported custom op; others are."""
    import flatbuffers

    from export import ops_report

    module, variables = heads
    content = to_tflite(module, variables, input_hw=(16, 16), progress=False).content
    s = ops_report._schema()

    def with_custom(code: bytes) -> bytes:
        model = s.ModelT.InitFromObj(s.Model.GetRootAs(content, 0))
        oc = s.OperatorCodeT()
        oc.builtinCode = oc.deprecatedBuiltinCode = s.BuiltinOperator.CUSTOM
        oc.customCode = code
        model.operatorCodes.append(oc)
        model.subgraphs[0].operators[-1].opcodeIndex = len(model.operatorCodes) - 1
        builder = flatbuffers.Builder(len(content) + 1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    post = ops_report.analyze(with_custom(b"TFLite_Detection_PostProcess"))
    assert post.ops["TFLite_Detection_PostProcess"] == 1 and not post.custom_ops and not post.unsupported
    other = ops_report.analyze(with_custom(b"MyNms"))
    assert other.custom_ops == {"MyNms": 1} and other.unsupported == {"MyNms": 1}
