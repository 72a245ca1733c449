"""Post-training int8 with calibrated ranges (export.ptq*), the model comparison table and `zoo compare` / `zoo ptq`.

Fast tests use a random-weight MobileNetV2-0.5 at 64x64 calibrated on crops of the offline photos; the acceptance
test (slow) quantizes the real tf_efficientnet_lite0 weights and checks top-1 agreement with the float model on the
crops of tests/test_export_models.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_export_models import _crops

import zoo
from export import ptq
from export.compare import CompareRow, compare_tflite, labelled_images, markdown, write_csv
from export.ptq_ranges import Histogram, choose_range, mse_range, percentile_range, quantization_mse, sqnr_db
from export.ptq_tflite import activation_ranges, calibrated_tensors
from export import to_tflite
from export.weights import random_variables
from zoo.preprocess import preprocess
from zoo.registry import get_entry

HW = 64


# ------------------------------------------------------------------------------------------- range search (synthetic)
def _hist(x: np.ndarray, bins: int = 2048) -> Histogram:
    h = Histogram(x.min(), x.max(), bins)
    h.add(x)
    return h


def test_clipping_methods_beat_minmax_on_a_tensor_with_outliers():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(200_000), [40.0, -35.0, 60.0]]).astype(np.float32)  # 3 outliers
    h = _hist(x)
    mm, pc, ms = (choose_range(h, m) for m in ("minmax", "percentile", "mse"))
    assert mm == (pytest.approx(-35.0), pytest.approx(60.0))
    assert mm[0] <= pc[0] < 0 < pc[1] <= mm[1] and mm[0] <= ms[0] < 0 < ms[1] <= mm[1]
    # MSE minimizes the error over all values, outliers included; percentile sacrifices the outliers for the bulk
    s_mm, s_ms = sqnr_db(x, *mm), sqnr_db(x, *ms)
    assert s_ms > s_mm + 1.0, (s_mm, s_ms)
    bulk = x[:-3]
    assert sqnr_db(bulk, *pc) > sqnr_db(bulk, *mm) + 15 and sqnr_db(bulk, *ms) > sqnr_db(bulk, *mm) + 2
    # the MSE search lands at (near) the optimum: a dense scan of symmetric ranges does no better
    best = max(sqnr_db(x, -c, c) for c in np.linspace(1.0, 60.0, 300))
    assert s_ms >= best - 0.1, (s_ms, best)


def test_ranges_without_outliers_stay_put_and_relu_outputs_keep_zero():
    x = np.random.default_rng(1).uniform(-1.0, 3.0, 100_000).astype(np.float32)  # nothing to clip
    h = _hist(x)
    lo, hi = mse_range(h)
    assert lo == pytest.approx(x.min(), rel=0.05) and hi == pytest.approx(x.max(), rel=0.05)
    assert sqnr_db(x, lo, hi) >= sqnr_db(x, x.min(), x.max()) - 0.1
    relu = np.maximum(np.random.default_rng(2).standard_normal(100_000), 0).astype(np.float32)
    for method in ("percentile", "mse"):
        assert choose_range(_hist(relu), method)[0] == 0.0


def test_expected_error_matches_simulated_int8_error():
    x = np.random.default_rng(3).laplace(size=300_000).astype(np.float32)
    h = _hist(x)
    for lo, hi in ((-3.0, 3.0), (-6.0, 8.0)):
        scale = (hi - lo) / 255
        zero = np.round(-128 - lo / scale)
        deq = (np.clip(np.round(x / scale + zero), -128, 127) - zero) * scale
        assert float(quantization_mse(h, lo, hi)) == pytest.approx(float(np.mean((x - deq) ** 2)), rel=0.05)


def test_percentile_range_cuts_the_requested_share():
    x = np.random.default_rng(4).standard_normal(1_000_000).astype(np.float32)
    lo, hi = percentile_range(_hist(x), 99.0)
    assert np.mean(x > hi) == pytest.approx(0.01, abs=0.002) and np.mean(x < lo) == pytest.approx(0.01, abs=0.002)


def test_unknown_method_and_bad_histograms_are_named():
    with pytest.raises(ValueError, match="minmax, percentile, mse"):
        choose_range(_hist(np.ones(3, np.float32)), "kl")
    with pytest.raises(ValueError, match="empty"):
        choose_range(Histogram(0.0, 1.0), "mse")
    with pytest.raises(ValueError, match="percentile must be"):
        percentile_range(_hist(np.arange(10, dtype=np.float32)), 30.0)


# ------------------------------------------------------------------------------------------ a small model end to end
@pytest.fixture(scope="module")
def small(photos):
    """Random-weight MobileNetV2-0.5 at 64x64, calibration crops and distinct verification crops."""
    cfg = get_entry("mobilenetv2_050").cfg.replace(input_size=(HW, HW))
    module = zoo.create_model("mobilenetv2_050")
    variables = random_variables(module, (1, HW, HW, 3))
    calib, _ = _crops(photos, 11, 6, lo=0.4)
    test, labels = _crops(photos, 12, 4)
    return module, variables, cfg, preprocess(calib, cfg), preprocess(test, cfg), labels


@pytest.fixture(scope="module")
def calibrated(quantized):
    """The converter's calibrated (float, min/max carrying) flatbuffer of the small model, and its batches."""
    return quantized["calibrated"]


def test_each_method_chooses_ranges_within_minmax(calibrated):
    content, batches = calibrated
    tensors = calibrated_tensors(content)
    by_method = {m: activation_ranges(content, batches, m) for m in ("minmax", "percentile", "mse")}
    assert all(r.chosen == r.calibrated for r in by_method["minmax"])
    for method in ("percentile", "mse"):
        ranges = by_method[method]
        assert {r.index for r in ranges} == set(tensors)
        for r in ranges:
            lo, hi = r.chosen
            assert r.calibrated[0] <= lo <= 0.0 <= hi <= r.calibrated[1] or r.kept, r
            if r.kept and r.kept.startswith("same range as the input"):
                assert r.chosen == next(q.chosen for q in ranges if q.index == r.source), r
            elif r.kept:
                assert r.chosen == r.calibrated
        free = [r for r in ranges if not r.kept]
        assert len(free) >= 10 and np.mean([r.chosen != r.calibrated for r in free]) >= 0.6, method
        kept = {r.kept for r in ranges if r.kept}
        assert "graph input/output" in kept  # image and logits keep the converter's range
    clipped = [r for r in by_method["percentile"] if not r.kept]
    assert np.mean([r.chosen[1] < r.calibrated[1] for r in clipped]) > 0.5


def _activation_scales(content: bytes, names: set[str]) -> dict[str, float]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=content)
    return {t["name"]: float(t["quantization"][0]) for t in it.get_tensor_details()
            if t["name"] in names and t["dtype"] == np.int8}


@pytest.fixture(scope="module")
def quantized(small, tmp_path_factory):
    """Full-int8 exports of the small model per method, and its fp32 export, written with their sidecars."""
    module, variables, cfg, calib, test, _ = small
    d = tmp_path_factory.mktemp("ptq")
    out = {m: ptq.quantize(module, calib, m, variables=variables, cfg=cfg, verify_data=test, progress=False,
                           out=d / f"small_{m}.tflite") for m in ("percentile", "mse")}

    def capture(content, batches):  # the two-step path with the converter's ranges untouched: plain min/max
        out["calibrated"] = (content, batches)
        return content

    out["minmax"] = to_tflite(module, variables, cfg=cfg, quantization="int8", representative_data=calib,
                              calibration=capture, verify_data=test, progress=False)
    out["fp32"] = to_tflite(module, variables, cfg=cfg, verify_data=test, out=d / "small_fp32.tflite",
                            progress=False)
    return out


@pytest.mark.parametrize("method", ["percentile", "mse"])
def test_quantize_gives_a_full_int8_model_with_tighter_scales(calibrated, quantized, method):
    names = {n for n, _ in calibrated_tensors(calibrated[0]).values()}
    base, res = quantized["minmax"], quantized[method]
    assert res.ops.quantized_activations and not res.ops.float_islands and not res.ops.unsupported
    s_base, s_new = _activation_scales(base.content, names), _activation_scales(res.content, names)
    common = set(s_base) & set(s_new)
    assert len(common) >= len(names) // 2
    assert all(s_new[n] <= s_base[n] * (1 + 1e-5) for n in common)
    assert sum(s_new[n] < s_base[n] * 0.99 for n in common) >= 10
    assert res.verification.sqnr_db >= base.verification.sqnr_db - 1.0, (res.verification, base.verification)


def test_bad_input_is_refused_before_any_work(small):
    module, variables, cfg, calib, _, _ = small
    kw = {"variables": variables, "cfg": cfg, "progress": False}
    with pytest.raises(ValueError, match="minmax, percentile, mse"):
        ptq.quantize(module, calib, "kl", **kw)
    with pytest.raises(ValueError, match="minmax, percentile, mse"):
        to_tflite(module, variables, cfg=cfg, quantization="int8", representative_data=calib, calibration="kl")
    with pytest.raises(ValueError, match="only applies to quantization='int8'"):
        to_tflite(module, variables, cfg=cfg, quantization="fp16", calibration="mse")
    with pytest.raises(TypeError, match="uint8 pixels"):
        ptq.quantize(module, (calib * 50).astype(np.uint8), "mse", **kw)
    with pytest.raises(ValueError, match=r"expected \(N, 64, 64, 3\)"):
        ptq.quantize(module, calib[:, :32], "mse", **kw)
    with pytest.raises(ValueError, match="empty"):
        ptq.quantize(module, calib[:0], "mse", **kw)
    with pytest.raises(TypeError, match="sets calibration itself"):
        ptq.quantize(module, calib, "mse", calibration="minmax", **kw)


# ------------------------------------------------------------------------------------------------- comparison + CLI
@pytest.fixture(scope="module")
def exports(quantized):
    return quantized["fp32"], quantized["mse"]


def test_compare_table_on_two_exports(small, exports, tmp_path):
    _, _, _, _, test, labels = small
    fp32, int8 = exports
    rows = compare_tflite({"float": fp32.path, "ptq-int8": int8}, test, labels % 2, runs=5)
    assert [r.model for r in rows] == ["float", "ptq-int8"] and all(isinstance(r, CompareRow) for r in rows)
    assert rows[0].agreement == 1.0 and rows[0].sqnr_db == float("inf") and rows[0].quantization == "fp32"
    assert rows[1].quantization == "int8" and rows[1].size_mb < rows[0].size_mb / 2
    top_f = fp32.outputs.argmax(-1)  # fp32 export outputs on `test` = the reference's
    assert rows[1].agreement == pytest.approx(np.mean(int8.outputs.argmax(-1) == top_f))
    assert rows[0].accuracy == pytest.approx(np.mean(top_f == labels % 2))
    assert all(r.latency_ms > 0 and r.threads == 1 and r.images == len(test) for r in rows)
    table = markdown(rows)
    assert table.splitlines()[0].startswith("| model | quantization | accuracy | top-1 agreement with float")
    assert len(table.splitlines()) == 4
    text = write_csv(rows, tmp_path / "rows.csv").read_text().splitlines()
    assert text[0].startswith("model,quantization,images,accuracy,agreement") and len(text) == 3
    with pytest.raises(ValueError, match="takes inputs of shape"):
        compare_tflite({"float": fp32.path}, test[:, :32, :32])
    with pytest.raises(ValueError, match="3 labels for"):
        compare_tflite({"float": fp32.path}, test, labels[:3])


def test_cli_compare_reads_a_class_folder(photos, exports, tmp_path, capsys):
    from PIL import Image

    from zoo_cli import main

    fp32, int8 = exports
    root = tmp_path / "photos"
    for name, img in photos.items():
        (root / name).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(img[k * 50:k * 50 + 300, k * 40:k * 40 + 300]).save(root / name / f"{k}.png")
    images, labels, names = labelled_images(root)
    assert len(images) == 8 and names == tuple(sorted(photos)) and list(labels) == [0, 0, 1, 1, 2, 2, 3, 3]
    md = tmp_path / "t.md"
    assert main(["compare", str(fp32.path), str(int8.path), "--data", str(root), "--runs", "3", "--md", str(md)]) == 0
    out = capsys.readouterr().out
    assert "| small_fp32 | fp32 |" in out and "| small_mse | int8 |" in out and md.read_text() in out
    assert main(["compare", str(fp32.path), "--data", str(tmp_path / "missing")]) == 2
    assert "no such data" in capsys.readouterr().err


def test_mnist5k_source_has_labels():
    images, labels, names = labelled_images("mnist5k", limit=50)
    assert len(images) == 50 and images[0].shape == (28, 28) and images[0].dtype == np.uint8
    assert names == tuple(str(i) for i in range(10)) and set(labels) == set(range(10))


# ----------------------------------------------------------------------------- acceptance: real weights, real photos
@pytest.mark.slow
def test_cli_ptq_real_lite0_agrees_with_float_on_photo_crops(photos, tmp_path, capsys, monkeypatch):
    """Compression acceptance: PTQ-int8 of the real tf_efficientnet_lite0 agrees with the float model's top-1 on
    >= 90% of the crops of the offline photos that tests/test_export_models.py verifies on (calibrated on distinct
    crops)."""
    from zoo_cli import main

    monkeypatch.setenv("ZOO_OFFLINE", "1")
    cfg = get_entry("tf_efficientnet_lite0").cfg
    crops, _ = _crops(photos, 0, 16)  # the crops of test_export_models.py
    calib, _ = _crops(photos, 1, 8, lo=0.4)  # and its calibration crops
    np.save(tmp_path / "crops.npy", preprocess(crops, cfg))
    np.save(tmp_path / "calib.npy", preprocess(calib, cfg))
    out = tmp_path / "lite0_int8.tflite"
    assert main(["ptq", "--model", "tf_efficientnet_lite0", "--calibration", str(tmp_path / "calib.npy"),
                 "--verify", str(tmp_path / "crops.npy"), "--method", ptq.DEFAULT_METHOD, "--min-agreement", "0.9",
                 "--out", str(out), "--quiet"]) == 0
    v = json.loads((tmp_path / "lite0_int8.tflite.json").read_text())["verification"]
    print(f"\nlite0 PTQ-int8 ({ptq.DEFAULT_METHOD}): {capsys.readouterr().out}")
    assert v["num_inputs"] == 64 and v["quantization"] == "int8"
    assert v["top1_agreement"] >= 0.9
