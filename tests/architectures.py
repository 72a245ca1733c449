"""Which registered models are the same graph up to sizes: family lists for the tests come from the registry.

Width and depth multipliers change channel counts and repeats, never which ops a network traces to, so a check of
what the exporter or a pass does with each kind of op needs one model per distinct architecture, not per name. Two
models are the same architecture when they belong to the same family and their jaxprs (of init, which runs inference on a small input)
use the same set of op signatures: the primitive, and for convolutions whether they are dense, depthwise or grouped
otherwise, and whether their padding is symmetric (PyTorch's) or not (TensorFlow's "SAME"). A new family or variant enters every test that uses
these lists without editing them.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp

import zoo
from zoo.abstract import structure_trace
from zoo.registry import get_entry

SIGNATURE_HW = (64, 64)  # small, and divisible by every family's largest stride


def families() -> dict[str, list[str]]:
    """family -> its registered names (registry order)."""
    out: dict[str, list[str]] = {}
    for name in zoo.list_models(task="classification"):
        out.setdefault(get_entry(name).cfg.family, []).append(name)
    return out


def smallest(names: list[str]) -> str:
    """The member with the fewest parameters (abstract shapes only; no compile)."""
    return min(names, key=lambda n: (_summary(n)[0], n))


def op_signature(name: str) -> frozenset:
    return _summary(name)[1]


def _op_token(eqn, constant: set) -> tuple:
    if eqn.primitive.name == "conv_general_dilated":
        if eqn.invars[1] in constant:  # a fixed filter (a blur pool), not a weight layer
            return ("fixed_conv",)
        groups = eqn.params["feature_group_count"]
        kernel = eqn.invars[1].aval.shape
        per_group_in = kernel[eqn.params["dimension_numbers"].rhs_spec[1]]
        kind = "dense" if groups == 1 else "depthwise" if per_group_in == 1 else "grouped"
        symmetric = all(lo == hi for lo, hi in eqn.params["padding"])
        return ("conv", kind, symmetric)
    return (eqn.primitive.name,)


@functools.cache
def _summary(name: str) -> tuple[int, frozenset]:
    """(parameter count, op signature) of one model from one trace of its init, which runs the forward pass too: the
    signature is taken from the ops computed from the image, not the initializers'. Kept on disk for the other test
    processes (`_SummaryCache`)."""
    cached = _CACHE.get(name)
    if cached is not None:
        return cached
    module = zoo.create_model(name)
    x = jax.ShapeDtypeStruct((1, *SIGNATURE_HW, 3), jnp.float32)
    # the key is an input, so that weights drawn from it are not taken for constants; depthwise convolutions as the
    # exported graph has them (one op), not as the CPU default's shifted slices
    with structure_trace():
        jaxpr, (_, variables) = jax.make_jaxpr(lambda key, x: module.init_with_output(key, x),
                                               return_shape=True)(jax.random.key(0), x)
    tokens: set[tuple] = set()

    def walk(j, constant: set, data: set) -> None:
        """`constant`: the variables computed from constants only; `data`: those computed from the image (the
        forward pass; the initializers compute from the key alone)."""
        for eqn in j.eqns:
            from_data = any(v in data for v in eqn.invars if not isinstance(v, jex_core.Literal))
            if from_data:
                tokens.add(_op_token(eqn, constant))
                data.update(eqn.outvars)
            if all(isinstance(v, jex_core.Literal) or v in constant for v in eqn.invars):
                constant.update(eqn.outvars)
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if from_data and hasattr(inner, "eqns"):  # a nested call on the image: all of it is the forward's
                    walk(inner, set(getattr(inner, "constvars", ())), set(inner.invars))

    walk(jaxpr.jaxpr, set(jaxpr.jaxpr.constvars), {jaxpr.jaxpr.invars[1]})
    summary = (sum(int(a.size) for a in jax.tree_util.tree_leaves(variables["params"])), frozenset(tokens))
    _CACHE.put(name, summary)
    return summary


class _SummaryCache:
    """Per-model summaries shared by the test processes of one checkout (xdist workers, export subprocesses): files
    under .pytest_cache, keyed by the zoo's sources and the jax/flax versions, each written atomically."""

    def __init__(self):
        import hashlib
        from importlib.metadata import version

        root = Path(zoo.__file__).resolve().parent
        digest = hashlib.sha256(f"{version('jax')} {version('flax')} {SIGNATURE_HW}".encode())
        for path in sorted(root.rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
        self.dir = root.parent / ".pytest_cache" / "architectures" / digest.hexdigest()[:16]

    def get(self, name: str) -> tuple[int, frozenset] | None:
        try:
            count, tokens = json.loads((self.dir / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None
        return count, frozenset(tuple(t) for t in tokens)

    def put(self, name: str, summary: tuple[int, frozenset]) -> None:
        count, tokens = summary
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / f".{name}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps([count, sorted(list(t) for t in tokens)]))
            os.replace(tmp, self.dir / f"{name}.json")
        except OSError:  # a read-only checkout: every process computes its own
            pass


_CACHE = _SummaryCache()


def distinct_architectures(names: list[str]) -> dict[str, list[str]]:
    """representative -> the names with its family and op signature; the representative is the smallest."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        groups.setdefault((get_entry(name).cfg.family, op_signature(name)), []).append(name)
    return {smallest(members): members for members in groups.values()}
