"""Sparsity: masks hit their targets, N:M groups hold on a real model, through training and in the exported TFLite."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from compress.sparsity import Rule, Sparsifier, check_n_m, format_sparsity_report, sparsity_report
from export.sparsity_tflite import check_tflite_n_m
from compress.sparsity_masks import global_magnitude_masks, magnitude_mask, n_m_mask
from compress.sparsity_report import total_sparsity
from test_train_support import random_digits, tiny_config, tiny_model
from zoo.tree import flatten


@pytest.fixture(scope="module")
def lite0():
    import zoo

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZOO_OFFLINE", "1")
        return zoo.load("tf_efficientnet_lite0", progress=False)


def _params(shapes: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    flat = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    out: dict = {}
    for k, v in flat.items():
        node = out
        *parents, leaf = k.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _selected_sparsity(params, sp: Sparsifier) -> float:
    flat = flatten(params)
    sel = [np.asarray(flat[s.path]) for s in sp.select(params)]
    return 1.0 - sum(np.count_nonzero(a) for a in sel) / sum(a.size for a in sel)


# ---- masks -------------------------------------------------------------------------------------------------------

def test_magnitude_masks_hit_the_target_and_prune_the_smallest():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 3, 16, 24)).astype(np.float32)
    for s in (0.0, 0.3, 0.5, 0.9):
        keep = np.asarray(magnitude_mask(w, s))
        assert keep.size - keep.sum() == round(s * w.size)
        if 0 < s:
            assert np.abs(w[keep]).min() >= np.abs(w[~keep]).max()
    # global: one threshold across layers of different scales, so the small-scale layer loses more
    ws = [rng.normal(size=(64, 32)).astype(np.float32) * 0.1, rng.normal(size=(1, 1, 32, 48)).astype(np.float32)]
    keeps = [np.asarray(k) for k in global_magnitude_masks(ws, 0.6)]
    total = sum(w.size for w in ws)
    assert sum(k.size - k.sum() for k in keeps) == round(0.6 * total)
    kept = np.concatenate([np.abs(w[k]) for w, k in zip(ws, keeps)])
    pruned = np.concatenate([np.abs(w[~k]) for w, k in zip(ws, keeps)])
    assert kept.min() >= pruned.max()
    assert 1 - keeps[0].mean() > 0.9 > 0.4 > 1 - keeps[1].mean()


def test_n_m_masks_keep_the_largest_of_every_group():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 3, 16, 8)).astype(np.float32)
    for n, m in ((2, 4), (1, 4), (2, 8)):
        keep = np.asarray(n_m_mask(w, n, m, axis=2))
        pruned = w * keep
        assert check_n_m(pruned, n, m, axis=2) and not check_n_m(w, n, m, axis=2)
        groups = np.moveaxis(np.abs(w), 2, -1).reshape(3, 3, 8, 16 // m, m)
        kgroups = np.moveaxis(keep, 2, -1).reshape(3, 3, 8, 16 // m, m)
        assert (kgroups.sum(-1) == n).all()
        # the kept ones are the n largest of their group
        nth = np.sort(groups, axis=-1)[..., m - n][..., None]
        assert (groups[kgroups] >= np.broadcast_to(nth, groups.shape)[kgroups]).all()
    # the check looks along the axis it is given: 2:4 along input channels is not 2:4 along outputs
    pruned = w * np.asarray(n_m_mask(w, 2, 4, axis=2))
    assert not check_n_m(pruned, 2, 4, axis=3)
    with pytest.raises(ValueError, match=r"M=4 does not divide axis 0 \(size 3\) of shape \(3, 3, 16, 8\)"):
        check_n_m(w, 2, 4, axis=0)


def test_per_layer_targets_and_depthwise_choice():
    params = _params({"a/kernel": (64, 32), "b/kernel": (1, 1, 32, 64), "dw/kernel": (3, 3, 1, 32),
                      "b/bias": (64,)})
    sp = Sparsifier(0.5, rules=[Rule("^a/", target=0.9), "kernel$"], scope="layer")
    flat = flatten(sp.apply(params))
    assert 1 - np.count_nonzero(flat["a/kernel"]) / flat["a/kernel"].size == pytest.approx(0.9, abs=1e-3)
    for k in ("b/kernel", "dw/kernel"):
        assert 1 - np.count_nonzero(flat[k]) / flat[k].size == pytest.approx(0.5, abs=1e-3)
    np.testing.assert_array_equal(flat["b/bias"], params["b"]["bias"])  # not selected, untouched
    biases_too = flatten(Sparsifier(0.5, rules=["^b/"], scope="layer").apply(params))  # any float parameter
    assert np.count_nonzero(biases_too["b/bias"]) == 32
    # N:M leaves depthwise kernels out by default; include_depthwise groups their channels (the last axis)
    default = {s.path for s in Sparsifier("2:4", min_size=0).select(params)}
    assert default == {"a/kernel", "b/kernel"}
    with_dw = {s.path: s.axis for s in Sparsifier("2:4", min_size=0, include_depthwise=True).select(params)}
    assert with_dw["dw/kernel"] == 3
    pruned = flatten(Sparsifier("2:4", min_size=0, include_depthwise=True).apply(params))
    assert check_n_m(pruned["dw/kernel"], 2, 4, axis=3) and check_n_m(pruned["b/kernel"], 2, 4, axis=2)
    assert check_n_m(pruned["a/kernel"], 2, 4, axis=0)  # Dense (in, out): groups along the inputs


# ---- a real model ------------------------------------------------------------------------------------------------

def test_2_4_on_every_selected_kernel_of_a_real_model(lite0):
    params = lite0.variables["params"]
    sp = Sparsifier("2:4")
    selected = {s.path for s in sp.select(params)}
    kernels = [p for p in flatten(params) if p.endswith("kernel")]
    expected = {p for p in kernels if p.startswith("head/") or "conv_pw" in p} - {"stages_0/block_0/conv_pw/kernel"}
    assert selected == expected  # every pointwise / head kernel; not the RGB stem, depthwise or the tiny first pw
    pruned = sp.apply(params)
    rows = {r.path: r for r in sparsity_report(pruned)}
    assert set(rows) == set(kernels)
    for path in selected:
        assert rows[path].n_m_ok is True and rows[path].sparsity >= 0.5, path
    assert rows["stem/conv/kernel"].n_m_ok is None  # 3 input channels: no 2:4 groups
    assert rows["stages_1/block_1/conv_dw/kernel"].n_m_ok is False  # dense: the check can fail
    before, after = flatten(params), flatten(pruned)
    for path in set(before) - selected:
        np.testing.assert_array_equal(before[path], after[path])
    text = format_sparsity_report(list(rows.values()))
    assert "| stages_6/block_0/conv_pwl/kernel | 1x1x1152x320 | 184,320 | 368,640 | 50.0% | yes |" in text
    assert f"{len(selected)}/" in text.splitlines()[-1]


@pytest.mark.slow
def test_2_4_survives_tflite_export_fp32_and_int8(lite0):
    import export

    sp = Sparsifier("2:4")
    params = lite0.variables["params"]
    modules = {s.path.rsplit("/", 1)[0] for s in sp.select(params)}
    model = dataclasses.replace(lite0, variables={**lite0.variables, "params": sp.apply(params)})
    x = np.random.default_rng(0).normal(size=(8, 64, 64, 3)).astype(np.float32)
    for q in (None, "int8"):
        res = export.to_tflite(model, quantization=q, input_hw=(64, 64), representative_data=x if q else None,
                               progress=False)
        rows = {r.module: r for r in check_tflite_n_m(res.content, "2:4")}
        assert modules <= set(rows), sorted(modules - set(rows))
        for mod in modules:
            r = rows[mod]
            assert r.ok is True and r.bad_groups == 0 and r.sparsity >= 0.5, (q, r)
            assert r.dtype == ("INT8" if q else "FLOAT32")
        assert rows["head/fc"].op == "FULLY_CONNECTED" and rows["head/fc"].shape == (1000, 1280)
        assert rows["stages_0/block_0/conv_pw"].ok is False  # left dense (too small), and the check sees it
        assert rows["stem/conv"].ok is None


# ---- schedules and training --------------------------------------------------------------------------------------

def test_polynomial_schedule_in_the_hook():
    params = _params({"a/kernel": (32, 64), "b/kernel": (3, 3, 16, 32)})
    sp = Sparsifier(0.8, min_size=0, schedule="polynomial", begin_step=2, end_step=10, frequency=3,
                    initial_sparsity=0.2)
    state = sp.init(params)
    assert _selected_sparsity(sp.apply(params, state), sp) == 0  # nothing pruned before begin_step
    hook = jax.jit(sp.hook)
    rng = np.random.default_rng(0)
    zeros_before = None
    last = 0.0
    for t in range(1, 15):
        params = jax.tree.map(lambda p: p + rng.normal(size=p.shape).astype(np.float32) * 0.01, params)
        params, state = hook(params, state)
        if t in (2, 5, 8, 10):  # begin, every 3 steps, and end_step off the grid
            last = float(sp.sparsity_at(t))
        assert int(state["sparsity"]["step"]) == t
        assert _selected_sparsity(params, sp) == pytest.approx(last, abs=1e-3), t
        zeros = {k: np.asarray(v) == 0 for k, v in flatten(params).items()}
        if zeros_before is not None:  # pruned weights never come back
            assert all((zeros[k] | ~zeros_before[k]).all() for k in zeros)
        zeros_before = zeros
    assert last == pytest.approx(0.8) and sp.sparsity_at(2) == pytest.approx(0.2)
    # Zhu & Gupta: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3
    assert float(sp.sparsity_at(5)) == pytest.approx(0.8 + (0.2 - 0.8) * (1 - 3 / 8) ** 3)
    # one-shot from a later step: dense until then, the target from that update on
    once = Sparsifier(0.5, min_size=0, begin_step=3)
    state = once.init(params)
    hook = jax.jit(once.hook)
    for t in range(1, 6):
        params = jax.tree.map(lambda p: p + rng.normal(size=p.shape).astype(np.float32) * 0.01, params)
        params, state = hook(params, state)
        assert _selected_sparsity(params, once) == pytest.approx(0.5 if t >= 3 else 0.0, abs=1e-3), t


def test_fit_keeps_2_4_after_every_update_and_checkpoints_masks(tmp_path):
    import train
    from train import parallel

    images, labels = random_digits(128)
    model = tiny_model()
    sp = Sparsifier("2:4", min_size=0)
    params = model.variables["params"]
    selected = {s.path: s.axis for s in sp.select(params)}
    assert set(selected) == {"stages_0/conv/kernel", "head/kernel"}  # the stem has 3 input channels
    cfg = tiny_config(tmp_path / "run", 4, tensorboard=False)
    trainer = train.Trainer(cfg, model=model, train_data=(images, labels), hooks=[sp.hook],
                            compression=sp.init(params))
    state = trainer.state
    prev = flatten(jax.device_get(state.params))
    for step in range(4):
        batch = parallel.global_batch(trainer.loader.batch(step), trainer.shardings[1])
        state, _ = trainer.step(state, batch, trainer.rng)
        now = flatten(jax.device_get(state.params))
        for path, axis in selected.items():
            assert check_n_m(now[path], 2, 4, axis), (step, path)
            assert np.count_nonzero(now[path]) == now[path].size // 2
            if step:  # zeros stay zero, and the kept weights train
                assert (now[path][prev[path] == 0] == 0).all()
                assert not np.array_equal(now[path], prev[path])
        prev = now
    assert int(state.compression["sparsity"]["step"]) == 4
    trainer.ckpt.save(4, state, trainer._meta(4))
    trainer.ckpt.wait()
    restored, _ = train.Checkpoints(tmp_path / "run").restore(jax.device_get(state))
    for path in selected:
        np.testing.assert_array_equal(flatten(restored.compression["sparsity"]["masks"])[path],
                                      flatten(jax.device_get(state.compression["sparsity"]["masks"]))[path])


def test_fit_gradual_schedule_reaches_its_target(tmp_path):
    import train

    images, labels = random_digits(128)
    model = tiny_model()
    sp = Sparsifier.from_config("unstructured", target=0.7, schedule="polynomial", begin_step=1, end_step=4,
                                frequency=1, min_size=0, rules=("stages_0/conv/kernel", "head/kernel"))
    result = train.fit(tiny_config(tmp_path / "run", 6, tensorboard=False), model=model,
                       train_data=(images, labels), hooks=[sp.hook], compression=sp.init(model.variables["params"]))
    params = result.state.params
    assert _selected_sparsity(params, sp) == pytest.approx(0.7, abs=1e-3)
    rows = sparsity_report(params, sp.rules)
    assert total_sparsity(rows) == pytest.approx(0.7, abs=1e-3)
    # the EMA weights (what result.model holds) average dense history: re-apply the final masks to them
    ema = result.model.variables["params"]
    assert _selected_sparsity(ema, sp) < 0.7
    assert _selected_sparsity(sp.apply(ema, result.state.compression), sp) >= 0.7 - 1e-3


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_bad_input_is_a_clear_error_before_any_work(lite0):
    params = lite0.variables["params"]
    with pytest.raises(ValueError, match=r"rule 'stages_.*/conv_pwx/kernel' matches no parameter; paths look like: "
                                         r"head/conv/kernel"):
        Sparsifier("2:4", rules=["stages_.*/conv_pw/kernel", "stages_.*/conv_pwx/kernel"]).select(params)
    with pytest.raises(ValueError, match=r"M=4 does not divide axis 2 \(size 3\) of stem/conv/kernel with shape "
                                         r"\(3, 3, 3, 32\)"):
        Sparsifier("2:4", rules=["^stem/conv/kernel"]).init(params)
    with pytest.raises(ValueError, match=r"M=4 does not divide axis 2 \(size 1\) of "
                                         r"stages_0/block_0/conv_dw/kernel .*depthwise kernel: .*axis=-1"):
        Sparsifier("2:4", rules=["conv_dw/kernel"]).select(params)
    assert Sparsifier("2:4", rules=[("conv_dw/kernel", -1)]).select(params)  # the fix the message names
    for bad in (1.0, -0.1, 1.5, "lots"):
        with pytest.raises(ValueError, match=r"sparsity"):
            Sparsifier(bad)
    with pytest.raises(ValueError, match=r"initial_sparsity=1.2 is outside \[0, 1\)"):
        Sparsifier(0.5, schedule="polynomial", end_step=10, initial_sparsity=1.2)
    with pytest.raises(ValueError, match=r"target of rule 'a'=1.0 is outside"):
        Sparsifier(0.5, rules=[Rule("a", target=1.0)], scope="layer")
    for spec in ("4:2", "0:4", "2-4", "2:4:8"):
        with pytest.raises(ValueError, match="N:M"):
            Sparsifier(spec)
    with pytest.raises(ValueError, match=r"needs end_step > begin_step"):
        Sparsifier(0.5, schedule="polynomial")
    with pytest.raises(ValueError, match=r"N:M sparsity \(2:4\) is one-shot"):
        Sparsifier("2:4", schedule="polynomial", end_step=10)
    with pytest.raises(ValueError, match=r"scope must be one of"):
        Sparsifier(0.5, scope="channel")
    with pytest.raises(ValueError, match=r"compress.sparsity must be 'N:M'"):
        Sparsifier.from_config("0.5")
    with pytest.raises(ValueError, match=r"not a valid regular expression"):
        Sparsifier(0.5, rules=["conv_pw(["])
    with pytest.raises(ValueError, match=r"no 'sparsity' entry: .*compression=sparsifier.init\(params\)"):
        Sparsifier(0.5).hook(params, {})
    with pytest.raises(ValueError, match="not a TFLite flatbuffer"):
        check_tflite_n_m(b"not a model")


def test_from_config_and_describe():
    sp = Sparsifier.from_config("2:4", rules=("conv_pw/kernel",))
    assert sp == Sparsifier("2:4", rules=[Rule("conv_pw/kernel")]) and sp.n_m == (2, 4) and sp.target == 0.5
    params = _params({"s/conv_pw/kernel": (1, 1, 64, 32), "stem/kernel": (3, 3, 3, 16)})
    text = Sparsifier("2:4", min_size=0).describe(params)
    assert "N:M 2:4, one-shot at step 0: 1 parameters (2,048 weights)" in text
    assert "skipped stem/kernel: axis 2 (size 3) not divisible by M=4" in text
