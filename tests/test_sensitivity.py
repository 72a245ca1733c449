"""int8 sensitivity by part: an activation channel planted 1000x wider than its neighbours is found in its part."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from planted import HW, planted_nets

from export import to_tflite
from export.sensitivity import BASELINE, check_parts, int8_sensitivity, markdown, model_parts


@pytest.fixture(scope="module")
def nets():
    return planted_nets()


def test_parts_are_the_top_level_modules_in_call_order(nets):
    module, clean, *_ = nets
    assert model_parts(module, clean, (1, *HW, 3)) == ("stem", "body_0", "body_1", "head")


def test_the_part_with_the_planted_channel_gains_most(nets):
    module, clean, planted, calib, x = nets
    # equalization off: it would move the planted scale back out of the activation (compress.equalize)
    options = dict(representative_data=calib, verify_data=x, input_hw=HW, equalization=False, progress=False)
    clean_sqnr = to_tflite(module, clean, quantization="int8", **options).verification.sqnr_db
    rows = int8_sensitivity(module, planted, **options)
    print(f"\nclean all-int8 SQNR {clean_sqnr:.1f} dB; planted:\n" + markdown(rows))
    base, best, rest = rows[0], rows[1], rows[2:]
    assert base.part == BASELINE and base.gain_db == 0 and base.float_islands == 0
    assert base.sqnr_db <= clean_sqnr - 10  # the plant is what int8 suffers from
    assert best.part == "body_1" and best.float_islands == 1 and best.sqnr_db >= clean_sqnr - 3
    assert best.gain_db >= 10 and all(r.gain_db <= 3 for r in rest)
    assert [r.gain_db for r in rows[1:]] == sorted((r.gain_db for r in rows[1:]), reverse=True)
    for r in rows:
        assert r.sqnr_db == pytest.approx(base.sqnr_db + r.gain_db, abs=0.02)
    assert best.params == sum(np.size(a) for a in jax.tree.leaves(planted["params"]["body_1"]))


def test_deeper_parts_keep_their_border_tensors_int8(nets):
    """`body_1/expand` kept float still hands the planted tensor to `mix` in int8: only the whole block recovers."""
    module, _, planted, calib, x = nets
    rows = int8_sensitivity(module, planted, representative_data=calib, verify_data=x, input_hw=HW,
                            parts=("body_1/expand", "body_1"), equalization=False, progress=False)
    by_part = {r.part: r for r in rows}
    assert [r.part for r in rows] == [BASELINE, "body_1", "body_1/expand"]
    assert by_part["body_1"].gain_db >= 10 and by_part["body_1/expand"].gain_db <= 3
    assert by_part["body_1/expand"].params == 16 * 32 + 32


def test_a_given_baseline_stands_in_for_the_first_export(nets, monkeypatch):
    import export.sensitivity as sensitivity

    module, _, planted, calib, x = nets
    options = dict(representative_data=calib, input_hw=HW, equalization=False, progress=False)
    base = to_tflite(module, planted, quantization="int8", verify_data=x, **options)
    calls = []
    monkeypatch.setattr(sensitivity, "to_tflite", lambda *a, **k: calls.append(k) or to_tflite(*a, **k))
    rows = int8_sensitivity(module, planted, verify_data=x, parts=("body_1",), baseline=base, **options)
    assert len(calls) == 1 and "/body_1/" in calls[0]["int8_keep_float"]  # only the part's own export
    assert rows[0].part == BASELINE and rows[0].sqnr_db == round(base.verification.sqnr_db, 2)
    assert rows[1].gain_db >= 10
    with pytest.raises(ValueError, match="verified on other inputs"):
        int8_sensitivity(module, planted, verify_data=x[:8], parts=("body_1",), baseline=base, **options)
    fp16 = to_tflite(module, planted, quantization="fp16", verify_data=x, input_hw=HW, progress=False)
    with pytest.raises(ValueError, match="full-int8"):
        int8_sensitivity(module, planted, verify_data=x, parts=("body_1",), baseline=fp16, **options)


def test_a_part_named_like_a_nested_module_is_refused():
    variables = {"params": {"head": {"kernel": np.zeros(2)}, "body": {"head": {"kernel": np.zeros(2)}}}}
    assert check_parts(("body/head",), ("body", "head"), variables) == ("body/head",)
    with pytest.raises(ValueError, match=r"part 'head' also names a nested module \(body/head\)"):
        check_parts(("head",), ("body", "head"), variables)


@pytest.mark.parametrize("kwargs, match", [
    (dict(parts=("body1",)), r"unknown part 'body1'.*did you mean body_1"),
    (dict(parts=("body_1/expnd",)), r"unknown part 'body_1/expnd'.*did you mean body_1/expand"),
    (dict(parts=()), "parts is empty"),
    (dict(quantization="fp16"), "full-int8"),
    (dict(representative_data=None), "needs representative_data"),
])
def test_bad_arguments_name_the_problem(nets, kwargs, match):
    module, clean, _, calib, x = nets
    with pytest.raises(ValueError, match=match):
        int8_sensitivity(module, clean, **{**dict(representative_data=calib, verify_data=x, input_hw=HW, progress=False),
                                           **kwargs})
