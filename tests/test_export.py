"""Export to TFLite: argument and data checks, parity failures, ops, metadata, predict, CLI (tier 4 `export`).

Small models at 64x64 with random weights (`export.weights.random_variables`, no init compile) keep this file near a
minute; every model and the quantized families are in test_export_models.py (slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import zoo
from export import ExportParityError, UnsupportedOpsError, predict_tflite, to_tflite
from export import ops_report
from export.metadata import read as read_metadata
from export.metadata import sidecar_path
from export.weights import random_variables
from zoo.registry import get_entry

SMALL = "mobilenetv3_small_050"
HW = (64, 64)


@pytest.fixture(scope="module")
def small():
    """(module, variables, cfg) of a small MobileNetV3 (hard-swish, SE with hard-sigmoid) at 64x64."""
    module = zoo.create_model(SMALL)
    return module, random_variables(module, (1, *HW, 3)), get_entry(SMALL).cfg.replace(input_size=HW)


def _export(small, **kw):
    module, variables, cfg = small
    return to_tflite(module, variables, cfg=cfg, progress=False, **kw)


def _only(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(quantization="int4"), ValueError, "unsupported quantization"),
    (dict(quantization="int8"), ValueError, "needs representative_data"),
    (dict(int8_io=True), ValueError, "int8_io"),
    (dict(quantization="fp16", representative_data=np.zeros((1, 64, 64, 3), np.float32)), ValueError, "only used"),
    (dict(batch=0), ValueError, "batch"),
])
def test_bad_arguments_raise_before_any_work(small, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        _export(small, out=tmp_path / "m.tflite", **kwargs)
    assert _only(tmp_path) == []


@pytest.mark.parametrize("data, error, match", [
    (np.zeros((4, 32, 32, 3), np.float32), ValueError, r"shape \(4, 32, 32, 3\)"),
    (np.zeros((4, 64, 64, 1), np.float32), ValueError, "3 channels"),
    (np.zeros((4, 64, 64, 3), np.uint8), TypeError, "model.preprocess"),
    (np.zeros((0, 64, 64, 3), np.float32), ValueError, "empty"),
    ([], ValueError, "empty"),
    (iter([]), ValueError, "empty"),
    (np.full((2, 64, 64, 3), np.nan, np.float32), ValueError, "NaN"),
    ("photos/", TypeError, "not a path"),
])
def test_bad_calibration_data_is_rejected(small, tmp_path, data, error, match):
    with pytest.raises(error, match=match):
        _export(small, quantization="int8", representative_data=data, out=tmp_path / "m.tflite")
    assert _only(tmp_path) == []


def test_fp32_export_verifies_writes_model_and_sidecar(small, tmp_path):
    out = tmp_path / "sub" / "m.tflite"
    res = _export(small, out=out)
    assert res.path == out and out.read_bytes() == res.content
    assert _only(out.parent) == ["m.tflite", "m.tflite.json"]  # no temp files left behind
    # builtin ops only; depthwise convs exported natively; hard-swish kept as one op in float graphs
    assert not res.ops.unsupported and res.ops.ops["DEPTHWISE_CONV_2D"] > 0 and res.ops.ops["HARD_SWISH"] > 0
    assert res.delegate.partitions == 1 and not res.delegate.not_delegated
    v = res.verification
    assert v.data == "random" and v.num_inputs == 8 and v.max_abs_diff <= 1e-4 and v.top1_agreement == 1.0
    meta = read_metadata(out)
    assert meta["input_hw"] == [64, 64] and meta["quantization"] == "fp32" and meta["model"] == SMALL
    assert meta["mean"] == list(small[2].mean) and meta["interpolation"] == small[2].interpolation
    assert meta["input"]["dtype"] == "float32" and meta["input"]["shape"] == [1, 64, 64, 3]
    assert meta["labels"] is None  # a bare module without ImageNet weights
    # the sidecar describes exactly these bytes
    out.write_bytes(res.content[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="sha256"):
        read_metadata(out)


def test_params_as_constants_or_arguments_give_the_same_folded_graph(tmp_path):
    module = zoo.create_model("mobilenetv2_050")
    variables = random_variables(module, (1, *HW, 3))
    cfg = get_entry("mobilenetv2_050").cfg
    a = to_tflite(module, variables, cfg=cfg, input_hw=HW, progress=False, params="constants")
    b = to_tflite(module, variables, cfg=cfg, input_hw=HW, progress=False, params="arguments")
    assert a.ops.ops == b.ops.ops
    # BatchNorm folded into the convolutions, ReLU6 fused: no MUL, no standalone activation ops
    assert set(a.ops.ops) <= {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "PAD", "SUM", "FULLY_CONNECTED", "RESHAPE"}
    np.testing.assert_allclose(a.outputs, b.outputs, atol=1e-5)


def test_parity_failure_raises_with_numbers_and_writes_nothing(small, tmp_path, monkeypatch):
    import export.parity as parity

    real = parity._run_exported

    def off_by(*a):  # an exported file whose logits are 0.01 off, while JAX fp32 itself is close to float64
        outputs, delegate = real(*a)
        return outputs + 0.01, delegate

    monkeypatch.setattr(parity, "_run_exported", off_by)
    with pytest.raises(ExportParityError, match=r"differs from JAX by up to 0\.01.*tolerance.*JAX fp32 itself") as e:
        _export(small, out=tmp_path / "m.tflite")
    report = e.value.report
    assert report is not None and report.max_abs_diff == pytest.approx(0.01, rel=1e-3)
    assert report.jax_fp32_error < 1e-4 and report.tflite_fp64_error == pytest.approx(0.01, rel=1e-2)
    assert _only(tmp_path) == []


def test_agreement_threshold_for_quantized_exports(small, tmp_path):
    with pytest.raises(ExportParityError, match="agrees with JAX on top-1"):
        _export(small, quantization="fp16", min_agreement=1.01, out=tmp_path / "m.tflite")
    assert _only(tmp_path) == []


def test_flex_and_custom_ops_are_errors_unless_allowed(small, tmp_path, monkeypatch):
    import export.tflite as tfl

    real = ops_report.analyze

    def with_flex(content):
        r = real(content)
        return ops_report.OpsReport({**r.ops, "FlexErf": 1}, {"FlexErf": 1}, {}, {}, r.inputs, r.outputs,
                                    r.num_subgraphs, r.weight_bytes, r.quantized_activations)

    monkeypatch.setattr(tfl.ops_report, "analyze", with_flex)
    with pytest.raises(UnsupportedOpsError, match="FlexErf") as e:
        _export(small, out=tmp_path / "m.tflite")
    assert e.value.ops == {"FlexErf": 1}
    assert _only(tmp_path) == []


def test_int8_hard_swish_is_rewritten_for_xnnpack(small):
    """Full int8 with HARD_SWISH leaves one builtin-kernel island per activation; the rewrite keeps one partition."""
    data = np.random.default_rng(1).standard_normal((8, *HW, 3)).astype(np.float32)
    plain = _export(small, quantization="int8", representative_data=data, int8_friendly_activations=False)
    assert plain.ops.ops["HARD_SWISH"] > 0 and plain.delegate.not_delegated.get("HARD_SWISH", 0) > 0
    assert plain.delegate.partitions > 1
    fast = _export(small, quantization="int8", representative_data=data, int8_io=True)
    assert "HARD_SWISH" not in fast.ops.ops and fast.delegate.partitions == 1
    assert fast.ops.quantized_activations and not fast.ops.float_islands
    assert fast.ops.inputs[0].dtype == "INT8" and fast.ops.inputs[0].scale > 0  # int8 I/O with its parameters
    assert fast.verification.data == "calibration"


def test_float_islands_are_found():
    # QUANTIZE(in) -> CONV(int8) -> DEQUANTIZE -> RSQRT(float) -> QUANTIZE -> CONV(int8) -> DEQUANTIZE(out)
    ttype = ["FLOAT32", "INT8", "INT8", "FLOAT32", "FLOAT32", "INT8", "INT8", "FLOAT32", "INT8"]
    is_const = [False] * 8 + [True]
    nodes = [("QUANTIZE", [0], [1]), ("CONV_2D", [1, 8], [2]), ("DEQUANTIZE", [2], [3]), ("RSQRT", [3], [4]),
             ("QUANTIZE", [4], [5]), ("CONV_2D", [5, 8], [6]), ("DEQUANTIZE", [6], [7])]
    assert ops_report._float_islands(nodes, ttype, is_const) == [("RSQRT",)]


def test_stablehlo_target_is_one_tensorflow_reads():
    from export.trace import _version_tuple, stablehlo_versions

    v = stablehlo_versions()
    assert _version_tuple(v["target"]) <= _version_tuple(v["tf_reads"])
    assert _version_tuple(v["target"]) <= _version_tuple(v["jax_default"])


def test_predict_tflite_matches_the_jax_model(photos, tmp_path, offline_cache):
    """Real ImageNet weights (offline package): the exported model classifies photos as the JAX model does."""
    model = zoo.load("tf_efficientnet_lite0", progress=False)
    images = [photos["chelsea"], photos["coffee"]]
    out = tmp_path / "lite0.tflite"
    res = to_tflite(model, verify_data=model.preprocess(images), out=out, progress=False)
    assert res.verification.max_abs_diff <= 1e-4
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["name"] == "tf_efficientnet_lite0.in1k_pkg" and len(meta["labels"]) == 1000
    got, want = predict_tflite(out, images, top_k=3), model.predict(images, top_k=3)
    assert [g[0][0] for g in got] == [w[0][0] for w in want]
    assert got[0][0][0] in ("tabby", "tiger cat", "Egyptian cat") and got[1][0][0] in ("espresso", "cup")
    np.testing.assert_allclose([p for _, p in got[0]], [p for _, p in want[0]], atol=1e-4)


def test_cli_export_bench_and_predict(photos, tmp_path, capsys):
    from PIL import Image

    from zoo_cli import main

    out = tmp_path / "m.tflite"
    assert main(["export", "--model", SMALL, "--random-weights", "--input-size", "64", "64", "--out", str(out),
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "verified on 8 random input(s)" in text and "XNNPACK: 1 partition(s)" in text and out.is_file()

    # int8 from a folder of images; wrong use is one readable line
    folder = tmp_path / "calib"
    folder.mkdir()
    for name, img in photos.items():
        Image.fromarray(img).save(folder / f"{name}.png")
    out8 = tmp_path / "m8.tflite"
    assert main(["export", "--model", SMALL, "--random-weights", "--input-size", "64", "64", "-q", "int8",
                 "--calibration", str(folder), "--int8-io", "--out", str(out8), "--quiet"]) == 0
    assert read_metadata(out8)["input"]["dtype"] == "int8"
    assert read_metadata(out8)["equalization"] is True and read_metadata(out8)["bias_correction"] is True
    assert main(["export", "--model", SMALL, "--random-weights", "--input-size", "64", "64", "-q", "int8",
                 "--calibration", str(folder), "--no-equalization", "--no-bias-correction", "--out", str(out8),
                 "--sensitivity", "head", "--quiet"]) == 0
    assert read_metadata(out8)["equalization"] is False and read_metadata(out8)["bias_correction"] is False
    ranked = (tmp_path / "m8.sensitivity.csv").read_text().splitlines()  # all int8, then the head kept float
    assert len(ranked) == 3 and ranked[0].startswith("part,") and ranked[2].startswith("head,")
    assert "| head |" in (tmp_path / "m8.sensitivity.md").read_text()
    assert main(["export", "--model", SMALL, "--random-weights", "-q", "fp16", "--sensitivity"]) == 2
    assert "--sensitivity ranks" in capsys.readouterr().err
    assert main(["export", "--model", SMALL, "--random-weights", "-q", "fp16", "--split-top-row", "stages_5/"]) == 2
    assert "full-int8 rewrite" in capsys.readouterr().err

    # parts kept float by name, or as few as a target needs (export.mixed)
    int8 = ["export", "--model", SMALL, "--random-weights", "--input-size", "64", "64", "-q", "int8",
            "--calibration", str(folder), "--no-equalization", "--no-bias-correction", "--out", str(out8), "--quiet"]
    assert main(int8 + ["--keep-float", "head", "--split-top-row", "stages_[34]/"]) == 0  # with rows split too
    assert "/head/" in read_metadata(out8)["int8_keep_float"] and read_metadata(out8)["float_islands"]
    assert read_metadata(out8)["int8_split_top_row"] == "stages_[34]/"
    assert "split by rows: stages_[34]/" in capsys.readouterr().out
    assert main(int8 + ["--keep-float", "auto", "--min-sqnr", "0"]) == 0  # all int8 meets it
    assert "kept float: nothing" in capsys.readouterr().out and not read_metadata(out8)["float_islands"]
    for extra, message in [(["--keep-float", "auto"], "needs a target"),
                           (["--keep-float", "haed"], "did you mean head"),
                           (["--min-sqnr", "20"], "target of --keep-float auto")]:
        assert main(int8 + extra) == 2
        assert message in capsys.readouterr().err
    assert main(["export", "--model", SMALL, "--random-weights", "-q", "int8", "--out", str(out8)]) == 2
    assert "needs --calibration" in capsys.readouterr().err

    csv = tmp_path / "lat.csv"
    assert main(["bench", str(out), str(out8), "--threads", "1,2", "--runs", "5", "--warmup", "1",
                 "--csv", str(csv)]) == 0
    lines = csv.read_text().splitlines()
    assert len(lines) == 1 + 4 and "median_ms" in lines[0]
    table = capsys.readouterr().out
    assert "| m8 | tflite | int8 | 2 |" in table

    assert main(["predict", "--tflite", str(out), "--top-k", "2", str(folder / "chelsea.png")]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].endswith(f"({SMALL}, m.tflite)") and shown[1].lstrip().startswith("1. ")


def test_fp32_tolerance_falls_back_to_the_models_own_float_rounding():
    """A logit difference above atol passes only when JAX's own fp32 result is as far from float64 (verify.py)."""
    import dataclasses

    from export import verify

    ref = np.array([[4.0, 1.0, -2.0]] * 4)
    out = ref + 3e-4
    report = verify.compare(ref, out, "fp32", atol=1e-4, rtol=0.0)
    assert not report.passed
    sensitive = dataclasses.replace(report, jax_fp32_error=2.5e-4, tflite_fp64_error=3.5e-4)
    assert sensitive.passed and verify.check(sensitive) is sensitive and "float64" in sensitive.summary()
    worse = dataclasses.replace(report, jax_fp32_error=1e-5, tflite_fp64_error=3e-4)
    with pytest.raises(ExportParityError, match="JAX fp32 itself"):
        verify.check(worse)


def test_reference_logits_are_computed_once_per_model_and_inputs():
    """Exports of one model on the same verify inputs share the JAX logits; new numbers (even in the same arrays,
    changed in place) are computed afresh."""
    import jax

    from export.parity import _reference
    from planted import planted_nets

    module, clean, _, _, x = planted_nets()
    first = _reference(module, clean, x)
    again = _reference(module, jax.tree.map(np.copy, clean), x.copy())  # other objects, the same numbers
    assert again is first and not first.flags.writeable
    clean["params"]["head"]["bias"][0] += 1.0
    changed = _reference(module, clean, x)
    assert changed is not first and np.allclose(changed[:, 0], first[:, 0] + 1.0, atol=1e-5)
    np.testing.assert_array_equal(_reference(module, clean, x[:8]), changed[:8])
