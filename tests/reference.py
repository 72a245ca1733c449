"""Reference models and counts, from ../shared/reference when listed there, else from timm/torchvision live."""

from __future__ import annotations

import csv
import functools
import importlib
import json
from pathlib import Path

import numpy as np

from export import weights

class LazyModule:
    """A module imported on first attribute access: test files name `torch` at the top, yet only the tests that use
    it (the `parity` and `reference` tiers) import it."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)


torch = LazyModule("torch")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


@functools.cache
def shared_counts() -> dict[str, dict]:
    out = {}
    timm_csv = SHARED / "timm_counts.csv"
    if timm_csv.is_file():
        for row in csv.DictReader(timm_csv.open()):
            out[f"timm:{row['model']}"] = {"params": int(row["params"]), "macs": float(row["macs_conv_matmul"]),
                                           "res": int(row["res"])}
    tv = SHARED / "torchvision_counts.jsonl"
    if tv.is_file():
        for line in tv.read_text().splitlines():
            if line.startswith("{"):
                d = json.loads(line)
                out[f"torchvision:{d['model']}"] = {"params": d["params"], "macs": d["macs"], "res": d["size"]}
    return out


def twin_model(twin: str, fused_attention: bool = True):
    """The reference PyTorch module (random weights, eval mode) for 'timm:<name>' or 'torchvision:<name>'.

    `fused_attention=False` builds timm's attention as explicit matmuls (read when a module is built): torch's
    FlopCounterMode has no formula for the CPU kernel of `scaled_dot_product_attention` and would count it as zero.
    """
    import torch

    torch.manual_seed(0)
    lib, name = twin.split(":")
    if lib == "timm":
        import timm
        from timm.layers import config as timm_config

        before = timm_config._USE_FUSED_ATTN
        timm_config.set_fused_attn(fused_attention and bool(before))
        try:
            # ImageNet-1k heads, as the zoo registers every classifier: some names default to another head
            # (tiny_vit_*_224: the 21,841 classes of its ImageNet-22k tag)
            model = timm.create_model(name, pretrained=False, num_classes=1000)
        finally:
            timm_config._USE_FUSED_ATTN = before
    else:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
    return model.eval()


def live_counts(twin: str, res: int) -> dict:
    """Parameters and conv/matmul MACs (torch FlopCounterMode total / 2) of the twin at `res`."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = twin_model(twin, fused_attention=False)
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, 3, res, res))
    return {"params": params, "macs": counter.get_total_flops() / 2, "res": res}


def reference_counts(twin: str, res: int) -> dict:
    ref = shared_counts().get(twin)
    if ref is not None and ref["res"] == res:
        return ref
    return live_counts(twin, res)


def perturb_batchnorm(model, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine params, so a conversion mistake in them shows up in the logits.

    The per-channel gain weight / sqrt(var) stays near 1: deep nets then keep the activation scale of a trained
    model instead of growing through 30+ layers until float32 rounding alone exceeds the parity tolerance.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                gain = torch.rand(m.num_features, generator=g) * 0.4 + 0.8
                m.weight.copy_(gain * torch.sqrt(m.running_var + m.eps))
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def calibrate_batchnorm(model, x_nchw) -> None:
    """Running statistics of every BatchNorm set to its input's statistics on `x` (one forward in train mode).

    Keeps every BN output at the scale `perturb_batchnorm`'s affine parameters give it, whatever the architecture:
    where a block sums several BN branches (MobileOne: 2-6, over 40+ blocks), fixed statistics let activations grow
    ~3x per block to ~1e7, and float32 logits of any implementation then differ by ~1e-4. The affine parameters keep
    their perturbed values, so a conversion mistake in them still shows.

    A BatchNorm that sees fewer than `MIN_SAMPLES` values per channel (a classifier's BatchNorm over the pooled
    features of two images, as LeViT's) keeps the statistics it had: taken from two nearly equal vectors, the variance
    is ~1e-3 and dividing by it amplifies every rounding error (LeViT-256: twin fp32 off its float64 by 2e-2).
    """
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in bns]
    samples: dict[int, int] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: samples.__setitem__(id(mod), args[0].numel()
                                                                               // mod.num_features)) for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, that batch's statistics
    model.train()
    with torch.no_grad():
        model(x_nchw)
    for m, (momentum, mean, var), hook in zip(bns, saved, hooks):
        hook.remove()
        m.momentum = momentum
        if samples.get(id(m), 0) < MIN_SAMPLES:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
    model.train(was_training)


MIN_SAMPLES = 16  # values per channel below which `calibrate_batchnorm` leaves a BatchNorm's statistics alone


def scale_classifier_to_trained_spread(model, x_nchw, target_std: float = 3.0, logits=None) -> None:
    """Rescale the last Linear so logits on `x` have the spread of a trained ImageNet model (std ~3). `logits`: the
    model's output on `x` where the caller has it already.

    Random-init heads give logits with std 15-40, where float32 rounding alone (torch fp32 vs fp64) differs by
    ~1e-4: a 1e-4 tolerance only tests the conversion when logits have a realistic scale.
    """
    import torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if logits is None:
        with torch.inference_mode():
            logits = model(x_nchw)
    std = float(logits.std())
    with torch.no_grad():
        linears[-1].weight.mul_(target_std / std)
        linears[-1].bias.mul_(target_std / std)


def converted_timm_twin(twin, name: str, x: np.ndarray, folder: Path):
    """(zoo model, timm logits, timm stage maps NHWC): a timm module's outputs on the NHWC images `x` (its
    `forward_intermediates` stages), and zoo model `name` loaded from its state dict through a file in `folder` (the
    path a user's timm checkpoint takes)."""
    import torch

    import zoo

    x_nchw = torch.from_numpy(x.transpose(0, 3, 1, 2))
    with torch.inference_mode():
        logits = twin(x_nchw).numpy()
        _, stages = twin.forward_intermediates(x_nchw)
    path = Path(folder) / "twin.pth"
    torch.save(twin.state_dict(), path)
    model = zoo.load(name, weights=str(path), layout="timm", progress=False)
    return model, logits, [s.numpy().transpose(0, 2, 3, 1) for s in stages]


def random_images(n: int, hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *hw, 3)).astype(np.float32)


# Variables of the right structure from numpy's RNG (no init compile, 10+ s per model on XLA:CPU). Kernels are
# N(0, 1/fan_in): the tests' tolerances were set on activations that neither grow nor shrink with depth.
random_variables = functools.partial(weights.random_variables, kernel_gain=1.0)


def calibrated_random_model(name: str, hw: tuple[int, int], n: int = 16, seed: int = 0):
    """(module, variables, inputs): zoo model `name` with random weights and BatchNorm statistics set from `n` random
    inputs (BN outputs ~N(0, 1) on them, as in a trained network), for passes that need realistic activations."""
    import zoo
    from export.weights import calibrate_batch_stats

    module = zoo.create_model(name)
    x = np.random.default_rng(seed).standard_normal((n, *hw, 3)).astype(np.float32) * 0.5 + 0.3
    return module, calibrate_batch_stats(module, random_variables(module, (1, *hw, 3)), x), x


def jit_logits(module, variables, x) -> np.ndarray:
    """`module.apply(variables, x)` in inference mode, jitted, as float64 numpy."""
    import jax

    return np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x), np.float64)
