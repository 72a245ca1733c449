"""What an export of a segmentation model computes, how it is checked and what its sidecar says.

A segmentation model (`ModelCfg.task == "segmentation"`, `zoo.models.segmentation`) returns `{"out": logits}`, plus
`"aux"` where it has an auxiliary head (DeepLabV3's FCN head on the stride-8 map). The auxiliary head is a training
aid (torchvision's `aux_loss`); inference reads `out` alone. So the file holds the main logits only: `main_output`
rebuilds the model without its other heads (their variables dropped too, so they are never traced and cost nothing
in the file) and wraps it in `MainOutput`, whose forward is the `out` logits as one array, (N, H, W, classes) at the
input size. The file's output is then one tensor, as a classifier file's is, and every pass of the exporter
(equalization, bias correction, keep-float choices) sees a model of one output. To export the other heads too, pass
`signatures={"serving_default": (lambda m, v, x: m.apply(v, x), shape)}`: named outputs, each checked on its own.

Verification (`export.verify.SegmentationCheck`, chosen by `export.parity.resolve_checks` from the task): per-pixel
argmax agreement and mIoU of the file's labelling against JAX's, and the logits' SQNR; fp32 logits within the
classification tolerance. The bilinear upsamplings (`zoo.layers.resize`) are traced as composites that the converter
lowers to one RESIZE_BILINEAR op each; ASPP's pooling branch, a broadcast, is traced as one more
(`export.broadcast_resize`). `sidecar` records how many were traced and how many RESIZE_BILINEAR ops the file has, so
a converter that lowered them otherwise shows there.
"""

from __future__ import annotations

import flax.linen as nn

TASK = "segmentation"
MAIN = "out"  # the key of the main logits in a segmentation model's outputs


class MainOutput(nn.Module):
    """A segmentation model's main logits (`model(x)["out"]`) as its one output, in the model's own parameter scope
    (the variables keep their paths)."""

    model: nn.Module
    key: str = MAIN

    def setup(self):
        nn.share_scope(self, self.model)

    def __call__(self, x, train: bool = False):
        return self.model(x, train=train)[self.key]


def main_output(module: nn.Module, variables: dict) -> tuple[nn.Module, dict, tuple[str, ...]]:
    """`(MainOutput(module without its other heads), variables without theirs, names of the heads left out)`.

    A `TaskModel` names its heads and keeps each one's variables under its name; another module is only wrapped
    (its other outputs are computed, then dropped by the trace)."""
    heads = getattr(module, "heads", None)
    if not heads or not any(name == MAIN for name, _ in heads):
        return MainOutput(module), variables, ()
    left_out = tuple(name for name, _ in heads if name != MAIN)
    if left_out:
        module = module.clone(heads=tuple((n, h) for n, h in heads if n == MAIN))
        variables = {col: {k: v for k, v in tree.items() if k not in left_out} for col, tree in variables.items()}
    return MainOutput(module), variables, left_out


def sidecar(left_out: tuple[str, ...], traced: int, ops) -> dict:
    """The sidecar's `segmentation` entry: which output the file holds, the heads left out, and the bilinear resizes
    traced (`export.broadcast_resize` counts them) and found in the file (`ops`: its `export.ops_report.OpsReport`)."""
    return {"output": MAIN, "heads_left_out": list(left_out),
            "bilinear_resizes": {"traced": traced, "RESIZE_BILINEAR": ops.ops.get("RESIZE_BILINEAR", 0)}}

