"""The measured LiteRT latency shipped with the package: every row names a registered model and holds plausible figures,
`zoo.model_info` reports it, and the benchmark's `--publish` merges new rows into the table without losing others."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

import zoo
from zoo import measured

ROOT = Path(__file__).resolve().parents[1]


def shipped_rows() -> list[dict]:
    with open(ROOT / "zoo" / measured.TABLE, newline="") as f:
        return list(csv.DictReader(f))


def load_bench():
    spec = importlib.util.spec_from_file_location("export_latency", ROOT / "bench" / "export_latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_table_names_registered_models_with_plausible_figures():
    rows = shipped_rows()
    assert rows, "zoo/data/tflite_latency.csv ships with the package"
    names = set(zoo.list_models(task="classification"))
    for row in rows:
        assert row["model"] in names, f"{row['model']} is measured but not registered"
        assert 0.1 < float(row["fp32_ms"]) < 10_000 and int(row["threads"]) >= 1 and row["cpu"] and row["date"]
        if row["int8_ms"]:
            assert 0.1 < float(row["int8_ms"]) < 10_000 and int(row["int8_partitions"]) >= 1


def test_model_info_reports_the_shipped_latency():
    row = shipped_rows()[0]
    lat = zoo.model_info(row["model"])["tflite_latency"]
    assert lat["fp32_ms"] == float(row["fp32_ms"]) and lat["threads"] == int(row["threads"])
    assert lat["res"] == int(row["res"]) and lat["cpu"] == row["cpu"]
    unmeasured = next((n for n in zoo.list_models(task="classification") if n not in {r["model"] for r in shipped_rows()}), None)
    if unmeasured:
        assert measured.tflite_latency(unmeasured) is None


@pytest.mark.parametrize("first_int8", ["4.5", ""])  # an int8 file LiteRT could not run is published as fp32 only
def test_publish_merges_rows_and_keeps_the_others(tmp_path, first_int8):
    bench = load_bench()
    path = tmp_path / "latency.csv"
    row = lambda name, fp32, int8: {"model": name, "res": 224, "fp32_1t": fp32, "int8_1t": int8,  # noqa: E731
                                    "int8_parts": 1 if int8 else ""}
    bench.publish([row("a", 10.0, first_int8), row("b", 20.0, 8.0)], (1, 2), path)
    bench.publish([row("a", 11.0, 5.0)], (1, 2), path)
    with open(path, newline="") as f:
        got = {r["model"]: r for r in csv.DictReader(f)}
    assert sorted(got) == ["a", "b"] and not path.with_suffix(".tmp").exists()
    assert (got["a"]["fp32_ms"], got["a"]["int8_ms"], got["b"]["fp32_ms"]) == ("11.0", "5.0", "20.0")
    assert tuple(got["a"]) == measured.FIELDS and got["a"]["threads"] == "1"
