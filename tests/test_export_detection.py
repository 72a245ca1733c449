"""A detection model through the exporter, its runner and the command line: SSDLite on MobileNetV3-Large.

At 128x128 (522 anchors), random weights (the COCO weights are a download); BatchNorm statistics from 16 crops of
skimage's photos (`export.weights.calibrate_batch_stats`), and the class predictors' kernels scaled by 4
(`CLS_SCALE`) so that a random network is confident on some crops: on the 8 verification crops JAX finds 191
detections scoring >= 0.3 (on 4 of the crops; none on the other 4), so matching is exercised on many boxes and NMS
has overlapping candidates to suppress. The file holds decoding and NMS (`export.detection`): builtin ops only, the
NMS loop one WHILE op, the network one XNNPACK partition (3 small ones more in the box decoding).

Measured on 2 cores (AMD EPYC, native depthwise, `quick_compile`), the 8 crops, JAX's detections >= 0.3:
fp32 191/191 matched at IoU >= 0.9 (mean IoU 1.0000, score differences <= 3e-6); dynamic-range int8 190/191 at IoU
>= 0.5 (99.5%, mean IoU 0.982, score differences up to 0.156, mean 0.033), held to `DYNAMIC_MIN_MATCHED`.
"""

from __future__ import annotations

import contextlib
import json

import jax
import numpy as np
import pytest
from PIL import Image

import zoo
import zoo_cli
from export import to_tflite
from export.detect import TFLiteDetector, detector_input, load_rgb
from export.metadata import read as read_metadata
from export.verify import DetectionReport
from export.weights import calibrate_batch_stats, random_variables
from zoo.layers.conv import depthwise_impl
from zoo.preprocess import preprocess
from zoo.registry import get_entry

from photo_crops import photo_crops
from quick_compile import quick_compile

SSD = "ssdlite320_mobilenet_v3_large"
HW = (128, 128)
CLS_SCALE = 4.0
DYNAMIC_MIN_MATCHED = 0.95  # measured 99.5% (module doc)


@contextlib.contextmanager
def _jax_side():
    with depthwise_impl("native"), quick_compile():
        yield


@pytest.fixture(scope="module")
def ssd(photos):
    """(module, variables, cfg at 128x128, 8 verification crops)."""
    cfg = get_entry(SSD).cfg.replace(input_size=HW)
    module = zoo.create_model(SSD)
    with _jax_side():
        variables = calibrate_batch_stats(module, random_variables(module, (1, *HW, 3)),
                                          preprocess(photo_crops(photos, 2, 4)[0], cfg))
    variables = jax.tree_util.tree_map(np.asarray, variables)
    for i in range(6):  # confident classes on some crops (module doc)
        conv = variables["params"]["ssd"][f"cls_{i}"]["conv"]
        conv["kernel"] = conv["kernel"] * CLS_SCALE
    return module, variables, cfg, preprocess(photo_crops(photos, 0, 2)[0], cfg)


@pytest.fixture(scope="module")
def ssd_fp32(ssd, tmp_path_factory):
    module, variables, cfg, x = ssd
    out = tmp_path_factory.mktemp("det") / "ssd.tflite"
    with _jax_side():
        return to_tflite(module, variables, cfg=cfg, verify_data=x, out=out, progress=False)


@pytest.fixture(scope="module")
def two_photos(photo_files):
    return [photo_files["chelsea"], photo_files["astronaut"]]


def test_fp32_file_matches_every_jax_detection(ssd_fp32):
    res = ssd_fp32
    v = res.verification
    print(f"\n{res.summary()}")
    assert isinstance(v, DetectionReport) and v.passed and v.num_inputs == 8
    assert v.reference_detections >= 50 and v.matched == v.reference_detections and v.extra == 0
    assert v.mean_iou >= 0.999 and v.max_score_diff <= 1e-4
    assert not res.ops.custom_ops and not res.ops.flex_ops and not res.ops.stablehlo_ops
    assert res.ops.ops.get("WHILE") == 1 and "STABLEHLO_SCATTER" not in res.ops.ops
    meta = read_metadata(res.path)
    det = meta["detection"]
    assert meta["task"] == "detection" and meta["check"] == "detection"
    assert det["anchors"] == 522 and det["settings"]["max_detections"] == 300 and det["tail_ops"]["WHILE"] == 1
    assert res.outputs["boxes"].shape == (8, 300, 4) and res.outputs["classes"].dtype == np.int32
    # the network (backbone, extra blocks, predictors) is the first partition: it reads the input image
    assert res.delegate.partitions <= 4


def test_latency_benchmark_runs_a_detection_file(ssd, ssd_fp32):
    """A file with several outputs runs through its signature runner, which holds the interpreter: the benchmark
    times calls through it (the interpreter's own invoke refuses to run while the runner holds it), on a photo crop
    (a detector's NMS time depends on the image) and on random values."""
    from export.latency import benchmark_many

    crop = ssd[3][:1]
    for x in (crop, None):
        (lat,) = benchmark_many({"ssd": ssd_fp32.path}, threads=(1,), runs=2, warmup=1, x=x)
        assert lat.model == "ssd" and lat.quantization == "fp32" and lat.runs == 2 and lat.median_ms > 0
        assert lat.partitions == ssd_fp32.delegate.partitions
    with pytest.raises(ValueError, match=r"shape \(1, 64, 128, 3\); ssd takes \(1, 128, 128, 3\)"):
        benchmark_many({"ssd": ssd_fp32.path}, threads=(1,), runs=1, warmup=0, x=crop[:, :64])


def test_dynamic_file_matches_most_detections(ssd):
    module, variables, cfg, x = ssd
    with _jax_side():
        res = to_tflite(module, variables, cfg=cfg, quantization="dynamic", verify_data=x,
                        min_agreement=DYNAMIC_MIN_MATCHED, progress=False)
    v = res.verification
    print(f"\n{v.summary()}")
    assert v.passed and v.reference_detections >= 50 and v.matched_fraction >= DYNAMIC_MIN_MATCHED
    assert v.min_iou == 0.5 and v.mean_iou >= 0.9


def test_full_int8_is_refused_before_tracing(ssd):
    module, variables, cfg, x = ssd
    with pytest.raises(ValueError, match="int8 calibrator crashes"):
        to_tflite(module, variables, cfg=cfg, quantization="int8", representative_data=x, progress=False)


def test_runner_maps_the_file_detections_to_photo_pixels(ssd, ssd_fp32, two_photos):
    """The file's own rows (verified against JAX above) on the whole photo resized, scaled back by its size."""
    from export.runtime import LiteRTRunner

    _, _, cfg, _ = ssd
    found = TFLiteDetector(ssd_fp32.path).detect([str(p) for p in two_photos], score_threshold=0.01)
    rgb = [load_rgb(p) for p in two_photos]
    raw = LiteRTRunner(ssd_fp32.path).run(detector_input(rgb, HW, cfg.mean, cfg.std))
    for i, (dets, im) in enumerate(zip(found, rgb)):
        h, w = im.shape[:2]
        rows = np.flatnonzero(raw["valid"][i] & (raw["scores"][i] >= 0.01))
        assert [d.label for d in dets] == raw["classes"][i][rows].tolist()
        assert rows.size > 0
        scale = [w / HW[1], h / HW[0], w / HW[1], h / HW[0]]
        np.testing.assert_allclose(np.reshape([d.box for d in dets], (-1, 4)), raw["boxes"][i][rows] * scale,
                                   rtol=1e-5, atol=1e-3)
        for d in dets:
            assert -1e-3 <= d.box[0] <= d.box[2] <= w + 1e-3 and -1e-3 <= d.box[1] <= d.box[3] <= h + 1e-3


def test_zoo_detect_writes_boxes_and_json(ssd_fp32, two_photos, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["detect", "--tflite", str(ssd_fp32.path), *map(str, two_photos), "--out", str(out), "--quiet",
            "--score-threshold", "0.01"]
    assert zoo_cli.main(argv) == 0
    expected = TFLiteDetector(ssd_fp32.path).detect([str(p) for p in two_photos], score_threshold=0.01)
    for path, dets in zip(two_photos, expected):
        record = json.loads((out / f"{path.stem}.json").read_text())
        assert record["size"] == list(load_rgb(path).shape[:2])
        assert [d["label"] for d in record["detections"]] == [d.label for d in dets]
        with Image.open(out / f"{path.stem}.png") as img:
            assert img.size == Image.open(path).size
    capsys.readouterr()
    assert zoo_cli.main(["predict", "--tflite", str(ssd_fp32.path), str(two_photos[0])]) == 0
    assert "detection(s) with score >= 0.3" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["detect", "--out", "{tmp}", "{img}"], "needs --model NAME[.tag] or --tflite"),
    (["detect", "--model", SSD, "--tflite", "{file}", "--out", "{tmp}", "{img}"], "(one of them)"),
    (["detect", "--model", "mobilenet_v2", "--out", "{tmp}", "{img}"], "is a classification model"),
    (["detect", "--tflite", "{tmp}/none.tflite", "--out", "{tmp}", "{img}"], "no model file"),
    (["detect", "--tflite", "{file}", "--out", "{tmp}", "{tmp}/none.png"], "no such image file"),
    (["detect", "--tflite", "{file}", "--out", "{tmp}", "--score-threshold", "2", "{img}"], "between 0 and 1"),
])
def test_zoo_detect_bad_input(ssd_fp32, two_photos, tmp_path, capsys, argv, message):
    fill = {"tmp": str(tmp_path), "img": str(two_photos[0]), "file": str(ssd_fp32.path)}
    assert zoo_cli.main([a.format(**fill) for a in argv]) == 2
    assert message in capsys.readouterr().err
