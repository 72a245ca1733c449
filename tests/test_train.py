"""The training loop on a tiny model: configs, data, errors before training, the step's contract, reporting.

End-to-end runs with real pretrained models are in test_train_recipe.py (slow); 8 devices and SIGKILL-resume run in
subprocesses in test_train_parallel.py and test_train_resume.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import train
from train.augment import mix_batch, randaugment, random_resized_crop
from train.config import ConfigError, apply_overrides
from train.data import DataError, Loader
from train.sources import ArraySource, FolderSource
from train.transforms import Transform
from test_train_support import ROOT, random_digits, subprocess_env, tiny_config, tiny_model


@pytest.fixture(scope="module")
def digits():
    return random_digits(256)


def _leaves(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


# ---- config ------------------------------------------------------------------------------------------------------

def test_overrides_parse_by_field_type():
    cfg = apply_overrides(train.TrainConfig(), [
        "optim.lr=3e-3", "steps=12", "data.rrc_scale=0.5,1", "optim.lr_groups=^head/=10,stages_6/=2",
        "data.eval_split=none", "data.hflip=false", "distill.features=stages_4:stages_4", "model.num_classes=7",
        "task.label_smoothing=0.1", "task.mixup_alpha=0.2"])
    assert cfg.task.kind == "classification" and cfg.task.label_smoothing == 0.1 and cfg.task.mixup_alpha == 0.2
    assert cfg.optim.lr == 3e-3 and cfg.steps == 12 and cfg.data.rrc_scale == (0.5, 1.0)
    assert cfg.optim.lr_groups == {"^head/": 10.0, "stages_6/": 2.0}
    assert cfg.data.eval_split is None and cfg.data.hflip is False and cfg.model.num_classes == 7
    assert cfg.distill.features == ("stages_4:stages_4",)
    assert train.config.from_dict(train.config.to_dict(cfg)) == cfg


def test_shipped_configs_state_their_promise():
    from train.configs import PRESETS, describe, get_config

    for name in PRESETS:
        cfg = get_config(name)
        assert train.config.from_dict(train.config.to_dict(cfg)) == cfg
        text = describe(name)
        for part in ("Command:", "Hardware:", "Time:", "Result:" if "imagenet" not in name else "Expected:"):
            assert part in text, (name, part)


def test_unknown_or_bad_config_keys_are_clear_errors(capsys):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*Did you mean optim.lr.*Valid keys: "
                                          r"model.name"):
        apply_overrides(train.TrainConfig(), ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="cannot read 'fast' as float"):
        apply_overrides(train.TrainConfig(), ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        apply_overrides(train.TrainConfig(), ["steps"])
    from zoo_cli import main

    assert main(["train", "--config", "mnist5k_lite0", "--set", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.lrr'" in err and "optim.freeze" in err
    assert main(["train", "--config", "nope", "--print-config"]) == 2
    assert "shipped configs: " in capsys.readouterr().err


def test_cli_prints_resolved_config(capsys):
    from zoo_cli import main

    assert main(["train", "--config", "mnist5k_lite0", "--lr", "0.002", "--set", "optim.freeze=", "--scratch",
                 "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["optim"]["lr"] == 0.002 and cfg["optim"]["freeze"] == "" and cfg["model"]["pretrained"] is False


# ---- data --------------------------------------------------------------------------------------------------------

def _transform(train_mode=True, **kw):
    return Transform(size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3, channels=3, train=train_mode,
                     rrc_scale=(0.3, 1.0), randaugment_ops=2, **kw)


def test_batches_are_a_function_of_seed_and_step_and_split_across_hosts(digits):
    src = ArraySource(*digits)
    one = Loader(src, _transform(), 32, seed=3)
    again = Loader(src, _transform(), 32, seed=3)
    np.testing.assert_array_equal(one.batch(5)["image"], again.batch(5)["image"])
    assert not np.array_equal(one.batch(5)["image"], one.batch(6)["image"])
    assert not np.array_equal(one.batch(5)["image"], Loader(src, _transform(), 32, seed=4).batch(5)["image"])
    hosts = [Loader(src, _transform(), 32, seed=3, process_index=i, process_count=2).batch(5) for i in range(2)]
    for key in ("image", "label"):
        np.testing.assert_array_equal(np.concatenate([h[key] for h in hosts]), one.batch(5)[key])
    # prefetching threads give the same batches as direct calls, in order
    got = list(one.iterate(3, 7))
    for k, b in zip(range(3, 7), got):
        np.testing.assert_array_equal(b["image"], one.batch(k)["image"])
    # evaluation covers every example once, padding the last batch with mask 0
    ev = list(Loader(ArraySource(digits[0][:40], digits[1][:40]), _transform(False), 16).eval_batches())
    assert [int(b["valid"].sum()) for b in ev] == [16, 16, 8]


def test_augmentations_are_deterministic_and_well_formed():
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    a = random_resized_crop(img, (16, 12), np.random.default_rng(1))
    b = random_resized_crop(img, (16, 12), np.random.default_rng(1))
    assert a.size == (12, 16) and np.array_equal(np.asarray(a), np.asarray(b))
    r1 = randaugment(img, 3, 9, np.random.default_rng(2))
    r2 = randaugment(img, 3, 9, np.random.default_rng(2))
    assert np.array_equal(np.asarray(r1), np.asarray(r2))
    x = np.random.default_rng(0).normal(size=(8, 6, 6, 3)).astype(np.float32)
    y = np.arange(8) % 4
    for kw in ({"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}):
        mixed, soft = mix_batch(x, y, 4, np.random.default_rng(0), smoothing=0.1, **kw)
        assert mixed.shape == x.shape and soft.shape == (8, 4)
        np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-6)


# ---- errors before training --------------------------------------------------------------------------------------

def test_bad_inputs_fail_before_training(tmp_path, digits):
    images, labels = digits
    cfg = tiny_config(tmp_path / "run", 2)
    bad = labels.copy()
    bad[7] = 12
    with pytest.raises(DataError, match=r"label\(s\) outside \[0, 10\), e.g. label 12 at index 7"):
        train.Trainer(cfg, model=tiny_model(), train_data=(images, bad))
    with pytest.raises(DataError, match=r"images have 4 channel\(s\) but the model expects 3"):
        rgba = np.concatenate([images, images[..., :1]], -1)
        train.Trainer(cfg, model=tiny_model(), train_data=(rgba, labels))
    with pytest.raises(DataError, match=r"1 channel\(s\) but the model expects 3: set data.gray_to_rgb=true"):
        train.Trainer(cfg, model=tiny_model(), train_data=(images[..., 0], labels))
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    cfg.data.source = f"folder:{tmp_path / 'empty'}"
    with pytest.raises(DataError, match="no images found in .*empty: expected one subfolder per class"):
        train.Trainer(cfg, model=tiny_model())
    with pytest.raises(DataError, match="image folder not found"):
        FolderSource(tmp_path / "missing")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_checkpoint_from_another_model_is_refused(tmp_path, digits):
    images, labels = digits
    cfg = tiny_config(tmp_path / "run", 1, tensorboard=False)
    train.fit(cfg, model=tiny_model(), train_data=(images, labels))
    cfg.steps = 3
    with pytest.raises(train.CheckpointError, match=r"shape differs for .*head/kernel \(16, 10\) vs \(16, 4\)"):
        train.Trainer(cfg, model=tiny_model(num_classes=4), train_data=(images, labels % 4))
    other = tiny_model()
    other = other.__class__(other.module, other.variables, other.cfg.replace(name="tiny_v2"))
    with pytest.raises(train.CheckpointError, match="written for model 'tiny' .* this run builds 'tiny_v2'"):
        train.Trainer(cfg, model=other, train_data=(images, labels))


# ---- the step and the loop ---------------------------------------------------------------------------------------

def test_fit_learns_reports_and_reloads(tmp_path, digits):
    images, labels = digits
    cfg = tiny_config(tmp_path / "run", 24, eval_every=12, log_every=4, plot=True)
    result = train.fit(cfg, model=tiny_model(), train_data=(images[:192], labels[:192]),
                       eval_data=(images[192:], labels[192:]))
    hist = result.history
    trains = [r for r in hist if r["split"] == "train"]
    assert [r["step"] for r in trains] == [4, 8, 12, 16, 20, 24]
    for key in ("loss", "accuracy", "lr", "grad_norm", "param_norm", "update_norm", "images_per_sec"):
        assert all(np.isfinite(r[key]) for r in trains), key
    assert trains[-1]["loss"] < trains[0]["loss"]
    assert [r["step"] for r in hist if r["split"] == "eval"] == [12, 24]
    assert result.metrics["accuracy"] > 0.3  # 10 classes: chance is 0.1
    run = tmp_path / "run"
    assert (run / "curves.png").stat().st_size > 1000 and (run / "config.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["12", "24"]
    # the reloaded best checkpoint predicts like the returned model (EMA weights in both)
    best = train.load_run(run, model=tiny_model())
    x = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(best(x)), np.asarray(result.model(x)), atol=1e-5)
    metrics = train.evaluate(result.model, (images[192:], labels[192:]), batch_size=16)
    assert metrics["accuracy"] == pytest.approx(result.metrics["accuracy"])
    # TensorBoard can read the event file
    tf = pytest.importorskip("tensorflow")
    events = list((run / "tb").glob("events.out.tfevents.*"))
    tags = {v.tag for f in events for e in tf.compat.v1.train.summary_iterator(str(f)) for v in e.summary.value}
    assert {"train/loss", "train/lr", "eval/accuracy"} <= tags


def test_freezing_lr_groups_bn_and_ema(tmp_path, digits):
    images, labels = digits
    model = tiny_model()
    cfg = tiny_config(tmp_path / "run", 4, tensorboard=False, checkpoint_every=0)
    cfg.optim.freeze = r"^stem/"
    cfg.optim.lr_groups = {r"^head/": 0.0}
    trainer = train.Trainer(cfg, model=model, train_data=(images, labels), eval_data=(images[:32], labels[:32]))
    assert "stem/kernel" not in trainer.trainable and "head/kernel" in trainer.trainable
    before = _leaves(jax.device_get(trainer.state))
    after_eval = (trainer.evaluate(), _leaves(jax.device_get(trainer.state)))[1]
    for k in before:  # evaluation changes nothing (BN uses running statistics)
        np.testing.assert_array_equal(before[k], after_eval[k])
    after = _leaves(jax.device_get(trainer.run().state))
    same = lambda k: np.array_equal(before[k], after[k])  # noqa: E731
    assert same(".params['stem']['kernel']")  # frozen
    assert same(".params['head']['kernel']") and same(".params['head']['bias']")  # lr multiplier 0
    assert not same(".params['stages_0']['conv']['kernel']")  # trained
    assert not same(".model_state['batch_stats']['bn']['mean']")  # BN statistics move in training
    assert not same(".ema_params['stages_0']['conv']['kernel']")
    assert not any(k.startswith(".opt_state") and "stem" in k for k in after)  # no optimizer state when frozen


def test_gradient_accumulation_equals_the_full_batch(tmp_path, digits):
    images, labels = digits
    finals = []
    for accum in (1, 4):
        cfg = tiny_config(tmp_path / f"a{accum}", 3, tensorboard=False)
        cfg.optim.optimizer, cfg.optim.accum_steps, cfg.optim.ema_decay = "sgd", accum, 0.0
        cfg.data.random_resized_crop = False
        r = train.fit(cfg, model=tiny_model(bn=False, dropout=0.0), train_data=(images, labels))
        finals.append(_leaves(jax.device_get(r.state.params)))
    for k in finals[0]:
        np.testing.assert_allclose(finals[0][k], finals[1][k], atol=2e-6, err_msg=k)


def test_non_finite_loss_stops_naming_the_step(tmp_path, digits):
    images, labels = digits
    cfg = tiny_config(tmp_path / "run", 30, tensorboard=False, log_every=5, checkpoint_every=5)
    cfg.optim.optimizer, cfg.optim.lr, cfg.optim.schedule, cfg.optim.ema_decay = "sgd", 1e12, "constant", 0.0
    with pytest.raises(train.NonFiniteError, match=r"training loss is (nan|inf) at step \d+ \(first non-finite "
                                                   r"value among steps \d+-\d+\).*(last checkpoint is step|no "
                                                   r"checkpoint)"):
        train.fit(cfg, model=tiny_model(), train_data=(images, labels))


def test_distillation_logits_and_features(tmp_path, digits):
    images, labels = digits
    cfg = tiny_config(tmp_path / "run", 3, tensorboard=False)
    student = tiny_model()
    teacher = tiny_model(seed=1)
    task = train.Distillation(train.Classification(10), teacher, student.cfg, temperature=2.0, alpha=0.7,
                              features=("stages_0:stages_0",), teacher_image_size=24)
    result = train.fit(cfg, model=student, train_data=(images, labels), task=task)
    last = [r for r in result.history if r["split"] == "train"][-1]
    assert last["kd_loss"] > 0 and last["feature_loss"] > 0 and "task_loss" in last
    adapter = result.state.task_params["distill"]["adapter_0"]["kernel"]
    assert adapter.shape == (16, 16)
    assert not np.array_equal(np.asarray(adapter), np.asarray(task.init_params(None)["distill"]["adapter_0"]
                                                                 ["kernel"]))
    with pytest.raises(ValueError, match="student features are stages_0"):
        train.Distillation(train.Classification(10), teacher, student.cfg, features=("stages_9:stages_0",))
    with pytest.raises(ValueError, match="teacher .* predicts 4 classes and the student 10"):
        train.Distillation(train.Classification(10), tiny_model(num_classes=4), student.cfg)


def test_tfds_source_under_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = tiny_config(tmp_path / "run", 2, tensorboard=False)
    cfg.data.source, cfg.data.eval_split, cfg.data.batch_size = "tfds:mnist", "test", 8
    with tfds.testing.mock_data(num_examples=24):
        result = train.fit(cfg, model=tiny_model(in_chans=1))
    assert int(result.state.step) == 2 and 0.0 <= result.metrics["accuracy"] <= 1.0


def test_image_folder_with_splits(tmp_path, digits):
    images, labels = digits
    root = tmp_path / "digits"
    train.write_image_folder(images[:64], labels[:64], root / "train")
    train.write_image_folder(images[64:96], labels[64:96], root / "test")
    src = FolderSource(root / "train")
    assert src.class_names == tuple(str(k) for k in range(10)) and len(src) == 64
    cfg = tiny_config(tmp_path / "run", 2, tensorboard=False)
    cfg.data.source = str(root)
    result = train.fit(cfg, model=tiny_model())
    assert result.metrics and len(train.read_metrics(tmp_path / "run")) == 3


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path):
    """RLIMIT_FSIZE makes every file write past a size fail with EFBIG, as a full disk would (root ignores chmod)."""
    script = f"""
import resource, signal, sys
sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT)!r}]
import train
from test_train_support import random_digits, tiny_config, tiny_model
images, labels = random_digits()
cfg = tiny_config({str(tmp_path / 'run')!r}, 4, checkpoint_every=2, tensorboard=False, log_every=100)
train.fit(cfg, model=tiny_model(), train_data=(images, labels))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
cfg.steps = 8
try:
    train.fit(cfg, model=tiny_model(), train_data=(images, labels))
except train.CheckpointError as e:
    print("ERROR", e)
"""
    out = subprocess.run([sys.executable, "-c", script], env=subprocess_env(1), capture_output=True, text=True,
                         timeout=300)
    assert "ERROR could not write step 6" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "File too large" in out.stdout and "the previous checkpoint (step 4) is intact" in out.stdout
    done = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert done == ["2", "4"]
    restored = train.load_run(tmp_path / "run", which="latest", model=tiny_model())
    assert restored.variables["params"]["head"]["kernel"].shape == (16, 10)


def test_cli_trains_and_evaluates_a_zoo_model_in_bfloat16(tmp_path, digits, capsys, monkeypatch):
    """The command-line path end to end with a registered model (bf16 compute, classifier only, from scratch)."""
    from zoo_cli import main

    monkeypatch.setenv("ZOO_OFFLINE", "1")
    images, labels = digits
    root = tmp_path / "data"
    train.write_image_folder(images[:64], labels[:64], root / "train")
    train.write_image_folder(images[64:80], labels[64:80], root / "test")
    run = tmp_path / "run"
    args = ["train", "--model", "mobilenetv3_small_050", "--scratch", "--data", f"folder:{root}", "--steps", "2",
            "--image-size", "32", "--batch-size", "8", "--workdir", str(run), "--no-progress",
            "--set", "model.dtype=bfloat16", "--set", "optim.trainable=^head/", "--set", "log_every=1",
            "--set", 'model.kwargs={"bn_eps": 0.001}', "--set", "depthwise_impl=native"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and 0.0 <= summary["accuracy"] <= 1.0
    assert main(["eval", "--workdir", str(run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["accuracy"] == pytest.approx(summary["accuracy"])
    model = train.load_run(run)  # rebuilt from the recorded create_model arguments, the family-specific one too
    assert model.cfg.input_size == (32, 32) and model.module.dtype == jax.numpy.bfloat16
    assert model.module.bn_eps == 0.001


def test_a_recorded_model_argument_the_model_no_longer_takes_is_named():
    from train.checkpoint import CheckpointError
    from train.loop import _create_recorded

    with pytest.raises(CheckpointError, match=r"create_model arguments \{'exits': 3\}.*does not take"):
        _create_recorded("mobilenetv3_small_050", {"exits": 3}, num_classes=10)


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd", "rmsprop", "lamb"])
def test_optimizers_and_schedules(optimizer):
    import jax.numpy as jnp

    from train.config import OptimConfig
    from train.optim import decay_mask, make_optimizer, make_schedule

    cfg = OptimConfig(optimizer=optimizer, lr=0.1, warmup_steps=10, clip_grad_norm=1.0)
    cosine = make_schedule(cfg, 100)
    assert float(cosine(0)) == 0.0 and float(cosine(10)) == pytest.approx(0.1) and float(cosine(100)) < 1e-6
    onecycle = make_schedule(OptimConfig(lr=0.1, schedule="onecycle", onecycle_pct_start=0.25), 100)
    assert float(onecycle(25)) == pytest.approx(0.1) and float(onecycle(0)) == pytest.approx(0.004)
    stairs = make_schedule(OptimConfig(lr=0.1, schedule="exponential", decay_rate=0.5, decay_every_steps=10), 100)
    assert float(stairs(9)) == pytest.approx(0.1) and float(stairs(10)) == pytest.approx(0.05)
    params = {"w": jnp.ones((3, 3)), "b": jnp.ones(3)}
    tx = make_optimizer(cfg, cosine, decay_mask({k: v.shape for k, v in params.items()}, cfg),
                        {"w": 1.0, "b": 10.0})
    grads = {"w": jnp.full((3, 3), 100.0), "b": jnp.full(3, 100.0)}  # clipped to norm 1
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(np.isfinite(np.asarray(u)).all() for u in updates.values())
    with pytest.raises(ConfigError, match="optim.optimizer must be"):
        make_optimizer(OptimConfig(optimizer="adagrad"), cosine, {}, {})
    # no decay on biases and norms (unless asked), nor on position embeddings, tokens and attention bias tables
    shapes = {"a/kernel": (3, 3), "a/bias": (3,), "tokens/pos_embed": (1, 5, 8), "tokens/cls_token": (1, 1, 8),
              "attn/attention_biases": (2, 9)}
    assert decay_mask(shapes, cfg) == {"a/kernel": True, "a/bias": False, "tokens/pos_embed": False,
                                       "tokens/cls_token": False, "attn/attention_biases": False}
    assert decay_mask(shapes, OptimConfig(decay_norm_and_bias=True))["a/bias"]
    assert not decay_mask(shapes, OptimConfig(decay_norm_and_bias=True))["tokens/pos_embed"]


def test_compression_hooks_and_state_ride_along(tmp_path, digits):
    """A sparsity-style hook: masks live in TrainState.compression and are re-applied after every update."""
    import jax.numpy as jnp

    images, labels = digits
    mask = (np.arange(16 * 10).reshape(16, 10) % 2).astype(np.float32)

    def apply_mask(params, compression):
        head = {**params["head"], "kernel": params["head"]["kernel"] * compression["head_mask"]}
        return {**params, "head": head}, {**compression, "updates": compression["updates"] + 1}

    cfg = tiny_config(tmp_path / "run", 3, tensorboard=False)
    result = train.fit(cfg, model=tiny_model(), train_data=(images, labels), hooks=[apply_mask],
                       compression={"head_mask": jnp.asarray(mask), "updates": jnp.zeros((), jnp.int32)})
    kernel = np.asarray(result.state.params["head"]["kernel"])
    assert np.all(kernel[mask == 0] == 0) and np.any(kernel[mask == 1] != 0)
    assert int(result.state.compression["updates"]) == 3
    restored, _ = train.Checkpoints(tmp_path / "run").restore(jax.device_get(result.state))
    assert int(restored.compression["updates"]) == 3  # checkpointed with the rest


def test_mixup_cutmix_randaugment_and_smoothing_train(tmp_path, digits):
    images, labels = digits
    cfg = tiny_config(tmp_path / "run", 3, tensorboard=False)
    cfg.task.mixup_alpha, cfg.task.cutmix_alpha, cfg.task.label_smoothing = 0.4, 1.0, 0.1
    cfg.data.randaugment_ops, cfg.data.hflip = 2, True
    result = train.fit(cfg, model=tiny_model(), train_data=(images, labels))
    assert all(np.isfinite(r["loss"]) for r in result.history)
    batch = train.Trainer(cfg, model=tiny_model(), train_data=(images, labels)).loader.batch(0)
    assert batch["label"].shape == (16, 10) and np.allclose(batch["label"].sum(1), 1.0)
