"""Mixed int8: the planted part (see test_sensitivity) is the one kept float, and only when the target needs it."""

from __future__ import annotations

import pytest
from planted import HW, planted_nets

from export import ExportParityError
from export.metadata import read as read_metadata
from export.mixed import mixed_int8

OPTIONS = dict(input_hw=HW, equalization=False, progress=False)  # equalization would undo the plant


@pytest.fixture(scope="module")
def nets():
    return planted_nets()


def test_the_planted_part_stays_float_and_the_file_records_it(nets, tmp_path):
    module, _, planted, calib, x = nets
    out = tmp_path / "mixed.tflite"
    res = mixed_int8(module, planted, representative_data=calib, verify_data=x, min_sqnr_db=30, out=out, **OPTIONS)
    print("\n" + "\n".join(f"{k}: {s} dB, {a:.1%}" for k, s, a in res.tried))
    assert res.kept_float == ("body_1",) and res.export.path == out
    assert res.export.verification.sqnr_db >= 30 and len(res.export.ops.float_islands) == 1
    assert [k for k, _, _ in res.tried] == [(), ("body_1",)] and res.tried[0][1] < 10
    assert not res.all_int8.ops.float_islands and round(res.all_int8.verification.sqnr_db, 2) == res.tried[0][1]
    assert res.ranking[1].part == "body_1"
    meta = read_metadata(out)  # the sidecar describes these bytes, float pattern included
    assert "/body_1/" in meta["int8_keep_float"] and meta["quantization"] == "int8"
    assert out.read_bytes() == res.export.content


def test_all_int8_is_kept_when_it_meets_the_target(nets):
    module, clean, _, calib, x = nets
    res = mixed_int8(module, clean, representative_data=calib, verify_data=x, min_sqnr_db=30, min_agreement=0.9,
                     **OPTIONS)
    assert res.kept_float == () and res.ranking == [] and len(res.tried) == 1 and res.all_int8 is res.export
    assert res.export.verification.sqnr_db >= 30 and not res.export.ops.float_islands


def test_an_unreachable_target_names_every_try_and_writes_nothing(nets, tmp_path):
    module, _, planted, calib, x = nets
    out = tmp_path / "never.tflite"
    with pytest.raises(ExportParityError, match=r"up to 2 float part\(s\) meets SQNR >= 200.0 dB.*all int8: .*"
                                                r"body_1: .*body_1, .*train quantization-aware") as e:
        mixed_int8(module, planted, representative_data=calib, verify_data=x, min_sqnr_db=200, max_float_parts=2,
                   out=out, **OPTIONS)
    print(e.value)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "needs a target"),
    (dict(min_agreement=95), r"fraction in \(0, 1\]"),
    (dict(min_sqnr_db=20, max_float_parts=0), "positive int"),
    (dict(min_sqnr_db=20, quantization="int8"), "chooses quantization"),
    (dict(min_sqnr_db=20, representative_data=None), "needs representative_data"),
    (dict(min_sqnr_db=20, out="."), "is a directory"),
])
def test_bad_arguments_name_the_problem(nets, kwargs, match):
    module, clean, _, calib, x = nets
    with pytest.raises(ValueError, match=match):
        mixed_int8(module, clean, **{**dict(representative_data=calib, verify_data=x, **OPTIONS), **kwargs})

