"""XLA compiling without its costly optimizations, for tests whose time goes to compiling small programs.

A per-model test (a parity check, a training step, a deploy-form check at 64x64) compiles a whole network to run it
once or twice on a few images: XLA's optimizations, chiefly LLVM's at -O2, then cost more than they save. JAX's
`jax_disable_most_optimizations` compiles at -O0 without LLVM's expensive passes: the same results up to float
rounding (no fused multiply-adds), compiles ~30% faster for a training step, and runs ~1.7x slower (EfficientNet-Lite0
training step at 96x96, shifted depthwise: 2.1 s against 1.2 s) - so the tests that train or run many images keep the
default. Measured on 2 cores: smoke and deploy-form tests of six families 316 -> 223 s, parity and counts of 19
models 210 -> 185 s.
"""

from __future__ import annotations

import contextlib

FLAG = "jax_disable_most_optimizations"
# the same for subprocesses (read by JAX when it starts)
ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


@contextlib.contextmanager
def quick_compile(enabled: bool = True):
    """Programs compiled inside compile without most optimizations, or with them all (`enabled=False`: what a bar
    measured under the defaults needs); read at compile time, restored after."""
    import jax

    before = jax.config.values[FLAG]
    jax.config.update(FLAG, bool(enabled))
    try:
        yield
    finally:
        jax.config.update(FLAG, before)
