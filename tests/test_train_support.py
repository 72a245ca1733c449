"""Shared pieces of the train tests: a tiny model (scenic's fake-model pattern) and a script entry point that runs a
short training in a subprocess (for the 8-device and SIGKILL tests). Run as a script:

    python tests/test_train_support.py WORKDIR STEPS [--devices N] [--sleep S] [--dump FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(num_classes: int = 10, size: int = 16, in_chans: int = 3, bn: bool = True, dropout: float = 0.1,
               seed: int = 0):
    """A zoo.Model around a 3-layer CNN with BatchNorm and dropout, named feature maps and a `head` classifier."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import zoo
    from zoo.config import FeatureInfo, ModelCfg

    class Tiny(nn.Module):
        num_classes: int = 10
        use_bn: bool = True
        drop: float = 0.1

        @nn.compact
        def __call__(self, x, train: bool = False, features: bool = False):
            x = nn.Conv(8, (3, 3), strides=2, use_bias=not self.use_bn, name="stem")(x)  # no bias before BN
            if self.use_bn:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
            x = _Block(16, name="stages_0")(x)
            if features:  # the backbone's dict (zoo.models.heads)
                return {"stages_0": x, "pre_logits": x.mean((1, 2))}
            x = x.mean((1, 2))
            x = nn.Dropout(self.drop, deterministic=not train)(x)
            return nn.Dense(self.num_classes, name="head")(x)

    class _Block(nn.Module):
        features: int

        @nn.compact
        def __call__(self, x):
            return nn.relu(nn.Conv(self.features, (3, 3), strides=2, name="conv")(nn.relu(x)))

    module = Tiny(num_classes, bn, dropout)
    cfg = ModelCfg(name="tiny", family="test", input_size=(size, size), in_chans=in_chans, num_classes=num_classes,
                   mean=(0.5,) * in_chans, std=(0.5,) * in_chans, crop_pct=1.0, classifier="head",
                   feature_info=(FeatureInfo("stages_0", 4, 16),))
    # numpy init: compiling a jax.random init costs seconds on XLA:CPU (threefry), the whole test budget here
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, in_chans)))
    rng = np.random.default_rng(seed)

    def init(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0, 1 / np.sqrt(fan_in), leaf.shape), leaf.dtype)
        if name.endswith("['scale']") or name.endswith("['var']"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(init, shapes)
    return zoo.Model(module, variables, cfg)


def random_digits(n: int = 256, size: int = 20, num_classes: int = 10, channels: int = 3, seed: int = 0):
    """Noisy images whose class is their tint (a fixed palette), so a pooled tiny CNN can learn them in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    palette = np.random.default_rng(1234).integers(40, 215, (num_classes, channels))
    noise = rng.normal(0, 25, (n, size, size, channels))
    images = np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels


def tiny_config(workdir, steps: int, **changes):
    import train

    cfg = train.TrainConfig(workdir=str(workdir), steps=steps, log_every=1, progress=False, plot=False)
    cfg.data.batch_size = 16
    cfg.data.workers = 1
    cfg.data.hflip = False
    cfg.data.rrc_scale = (0.5, 1.0)
    cfg.optim.lr = 3e-3
    cfg.optim.ema_decay = 0.9
    # a few steps on tiny images: compiling is the cost, and one grouped conv compiles ~2x faster than the CPU
    # default's shifted slices (which run faster on real sizes)
    cfg.depthwise_impl = "native"
    for k, v in changes.items():
        section, _, name = k.rpartition("__")
        setattr(getattr(cfg, section) if section else cfg, name, v)
    return cfg


def run_script(workdir: str, steps: int, checkpoint_every: int, sleep: float, dump: str | None) -> None:
    import time

    import jax

    import train

    images, labels = random_digits()
    cfg = tiny_config(workdir, steps, checkpoint_every=checkpoint_every, tensorboard=False)
    cfg.async_checkpoints = True
    trainer = train.Trainer(cfg, model=tiny_model(), train_data=(images, labels))
    if sleep:  # slow each step down so a kill lands mid-run (and mid-save)
        inner = trainer._train_step
        trainer._train_step = lambda *a: (time.sleep(sleep), inner(*a))[1]
    result = trainer.run()
    if dump:
        flat = {jax.tree_util.keystr(path): np.asarray(v)
                for path, v in jax.tree_util.tree_leaves_with_path(jax.device_get(result.state))}
        np.savez(dump, **flat)
    print(f"DEVICES {jax.device_count()} STEP {int(result.state.step)}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("steps", type=int)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--dump")
    a = p.parse_args()
    run_script(a.workdir, a.steps, a.checkpoint_every, a.sleep, a.dump)


def subprocess_env(devices: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    env["ZOO_OFFLINE"] = "1"
    return env


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
