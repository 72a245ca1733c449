"""The zoo table's bookkeeping (bench/zoo_table.py): the Pareto front, static columns, and the files it writes.
Its timings are measured by running it, never here."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_table():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("zoo_table", ROOT / "bench" / "zoo_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pareto_front_keeps_models_no_other_beats_on_both_axes():
    table = load_table()
    points = [(1.0, 60.0, "fast"), (2.0, 59.0, "dominated"), (2.0, 70.0, "mid"), (3.0, 70.0, "tie_slower"),
              (5.0, 75.0, "best"), (0.5, 40.0, "fastest")]
    assert table.pareto(points) == ["fastest", "fast", "mid", "best"]


def test_static_columns_agree_with_model_info():
    import zoo

    table = load_table()
    row = table.static_columns("mobileone_s0")  # re-parameterizes: the deploy form has fewer parameters
    info = zoo.model_info("mobileone_s0")
    assert row["params_m"] == round(info["params"] / 1e6, 3) and row["deploy_params_m"] < row["params_m"]
    assert row["macs_g"] == round(info["macs"] / 1e9, 3) and row["res"] == 224 and row["family"] == "mobileone"
    assert row["top1"] == max(t["top1"] for t in info["pretrained"] if t.get("top1"))


def test_rows_markdown_and_plot_are_written(tmp_path):
    table = load_table()
    rows = []
    for i, (name, fam) in enumerate([("a", "x"), ("b", "x"), ("c", "y")]):
        row = {k: "" for k in table.FIELDS}
        row.update(model=name, family=fam, res=224, params_m=1.0 + i, deploy_params_m=1.0 + i, macs_g=0.1 * (i + 1),
                   top1=70.0 + i, fp32_1t=2.0 + i, fp32_2t=1.5 + i, fp16_1t=2.0 + i, int8_1t=1.0 + i, int8_2t=0.8 + i,
                   int8_vs_fp32_1t=0.5, fp32_mb=4.0, int8_mb=1.0, int8_parts=1, fp32_peak_pct_1t=20.0,
                   int8_peak_pct_1t=15.0)
        rows.append(row)
    path = tmp_path / "t.csv"
    table.write_rows(rows, path)
    with open(path, newline="") as f:
        assert [r["model"] for r in csv.DictReader(f)] == ["a", "b", "c"]
    rates = {("fp32", 1): 50e9, ("int8", 1): 100e9}
    md = table.markdown(rows, rates, "test CPU")
    assert md.startswith("Measured on test CPU") and md.count("\n| ") == 4  # header + 3 rows
    png = table.plot(rows, tmp_path / "t.png")
    assert png is not None and png.stat().st_size > 10_000
