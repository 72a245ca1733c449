"""Deploy form: `deploy(model) -> model`, the network a device runs, computing what the training form computes.

Two steps, each a pure pass:
1. `reparameterize`: every layer whose kind (`zoo.layers.kinds`) has a `reparameterize` function gets its deploy
   variables from it (multi-branch blocks of MobileOne/RepViT/FastViT style -> one conv; Linear+BatchNorm -> one
   Dense), and the model is rebuilt with `deploy=True`, which those layers read to build their deploy form.
2. BatchNorm folding of the rest (`compress.fold_bn`: conv and linear layers followed by a BatchNorm).

    import zoo
    from compress.deploy import deploy, deploy_checked

    model = zoo.load("mobileone_s0")
    fast = deploy(model)                       # fewer parameters, one conv per block, no BatchNorm
    fast = deploy_checked(model, x)            # same, and both forms run on x and must agree

The exporter applies step 1 before tracing; the TFLite converter folds BatchNorm itself.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from compress.fold_bn import FoldError, checked, default_input_shape, find_conv_bn_pairs, fold_bn
from zoo.abstract import abstract_variables, structure_trace
from zoo.layers import kinds

__all__ = ["deploy", "deploy_checked", "reparameterize", "reparameterize_variables", "deploy_param_count"]


def _reparam_layers(module: nn.Module, variables, x) -> list[tuple[tuple[str, ...], nn.Module]]:
    """(path, module) of every layer with a `reparameterize` kind, outermost first (an inner one inside a
    re-parameterized layer is that layer's business)."""
    found: list[tuple[tuple[str, ...], nn.Module]] = []

    def record(next_fun, args, kwargs, ctx):
        if ctx.method_name == "__call__":
            kind = kinds.kind_of(ctx.module)
            path = tuple(ctx.module.path)
            inside = any(path[:len(p)] == p for p, _ in found)
            if kind is not None and kind.reparameterize is not None and not inside:
                found.append((path, ctx.module.clone(parent=None)))
        out = next_fun(*args, **kwargs)
        if ctx.method_name == "__call__":
            kinds.check_known(ctx.module, "deploy")
        return out

    with nn.intercept_methods(record), structure_trace():
        jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, x)
    return found


def _subtree(tree: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _set_subtree(tree: dict, path: tuple[str, ...], value) -> dict:
    """A copy of `tree` with the subtree at `path` replaced (removed when `value` is None)."""
    if not path:
        return value
    out = dict(tree)
    head, rest = path[0], path[1:]
    if not rest:
        if value is None:
            out.pop(head, None)
        else:
            out[head] = value
        return out
    out[head] = _set_subtree(tree.get(head, {}), rest, value)
    return out


def reparameterize_variables(module: nn.Module, variables: dict, input_shape=None) -> tuple[dict, int]:
    """The deploy-form variables of every re-parameterizable layer (the rest unchanged), and how many layers."""
    x = jax.ShapeDtypeStruct(tuple(input_shape or default_input_shape(module)), jnp.float32)
    layers = _reparam_layers(module, variables, x)
    out = {k: v for k, v in variables.items()}
    for path, layer in layers:
        local = {col: sub for col in variables if (sub := _subtree(variables[col], path)) is not None}
        new = kinds.kind_of(layer).reparameterize(layer, jax.device_get(local))
        for col in set(out) | set(new):
            out[col] = _set_subtree(out.get(col, {}), path, new.get(col))
    return {k: v for k, v in out.items() if k == "params" or v}, len(layers)


def _as_deploy_module(module: nn.Module) -> nn.Module:
    if not any(f.name == "deploy" for f in dataclasses.fields(module)):
        raise FoldError(f"{type(module).__name__} has re-parameterizable layers but no `deploy` field to build their "
                        "deploy form with")
    return module.clone(deploy=True)


def _check_structure(module: nn.Module, variables: dict, input_shape) -> None:
    """The deploy module's own parameters must be exactly the converted ones (names and shapes)."""
    want = traverse_util.flatten_dict(abstract_variables(module, tuple(input_shape)), sep="/")
    got = traverse_util.flatten_dict(variables, sep="/")
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    shapes = sorted(k for k in set(want) & set(got) if tuple(want[k].shape) != tuple(np.shape(got[k])))
    if missing or extra or shapes:
        raise FoldError(f"re-parameterized variables do not fit the deploy module: missing {missing[:5]}, "
                        f"unexpected {extra[:5]}, mis-shaped {shapes[:5]}")


def reparameterize(module: nn.Module, variables: dict, *, input_shape=None) -> tuple[nn.Module, dict]:
    """Step 1 alone: `(module, variables) -> (deploy module, variables)`; unchanged when nothing re-parameterizes."""
    if getattr(module, "deploy", False):
        return module, variables
    shape = tuple(input_shape or default_input_shape(module))
    new_vars, n = reparameterize_variables(module, variables, shape)
    if n == 0:
        return module, variables
    new_module = _as_deploy_module(module)
    _check_structure(new_module, new_vars, shape)
    return new_module, jax.device_put(new_vars)


def _deploy_pass(module: nn.Module, variables: dict, input_shape=None) -> tuple[nn.Module, dict]:
    module, variables = reparameterize(module, variables, input_shape=input_shape)
    if variables.get("batch_stats") and find_conv_bn_pairs(module, None, input_shape):
        module, variables = fold_bn(module, variables, input_shape=input_shape)
    return module, variables


def deploy(model, *, input_shape=None):
    """The deploy form of a `zoo.Model` (or of `(module, variables)`): re-parameterized, BatchNorm folded."""
    if isinstance(model, tuple):
        return _deploy_pass(*model, input_shape=input_shape)
    module, variables = _deploy_pass(model.module, model.variables, input_shape=input_shape)
    return dataclasses.replace(model, module=module, variables=variables)


def deploy_checked(model, inputs, *, atol: float = 1e-4, rtol: float = 1e-4):
    """`deploy`, with both forms run on `inputs` (eval mode): outputs must agree within `atol + rtol * max|y|`."""
    x = np.asarray(inputs)
    shape = (1, *x.shape[1:])
    run = checked(lambda m, v: _deploy_pass(m, v, shape), x, atol=atol, rtol=rtol)
    if isinstance(model, tuple):
        return run(*model)
    module, variables = run(model.module, model.variables)
    return dataclasses.replace(model, module=module, variables=variables)


def deploy_param_count(module: nn.Module, input_shape) -> int:
    """Parameters of the deploy form, from shapes alone: the deploy module's parameters with every BatchNorm that
    follows a weight layer folded (its scale and shift gone, a bias added where the layer had none)."""
    if any(f.name == "deploy" for f in dataclasses.fields(module)):
        module = module.clone(deploy=True)
    params = traverse_util.flatten_dict(abstract_variables(module, tuple(input_shape))["params"], sep="/")
    total = sum(int(np.prod(v.shape)) for v in params.values())
    for conv, bn, _ in find_conv_bn_pairs(module, None, input_shape):
        total -= sum(int(np.prod(params[k].shape)) for k in (f"{bn}/scale", f"{bn}/bias") if k in params)
        if f"{conv}/bias" not in params:
            total += int(params[f"{conv}/kernel"].shape[-1])
    return total
