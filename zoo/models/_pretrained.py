"""Short constructors for the pretrained records in the family files."""

from __future__ import annotations

import re

from zoo.config import PretrainedCfg, WeightSource

_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,})\.pth?$")


def url_source(url: str) -> WeightSource:
    """A release URL; torch-hub file names end in the first hex digits of the file's sha256."""
    m = _HASH_IN_NAME.search(url)
    return WeightSource("url", url, sha256=m.group(1) if m else None)


def timm_weights(model: str, tag: str, url: str = "", **fields) -> PretrainedCfg:
    """Weights published by timm: its safetensors on the Hugging Face hub first, the original release URL second."""
    sources = [WeightSource("hf_hub", f"timm/{model}.{tag}", "model.safetensors")]
    if url:
        sources.append(url_source(url))
    fields.setdefault("license", "apache-2.0")
    fields.setdefault("origin", "https://github.com/huggingface/pytorch-image-models")
    return PretrainedCfg(tag=tag, sources=tuple(sources), layout="timm", **fields)


def torchvision_weights(tag: str, url: str, *, local: tuple[WeightSource, ...] = (), **fields) -> PretrainedCfg:
    """Weights published by torchvision; `local` sources (e.g. a package carrying the same file) are tried first."""
    fields.setdefault("license", "bsd-3-clause")
    fields.setdefault("origin", "https://github.com/pytorch/vision")
    return PretrainedCfg(tag=tag, sources=(*local, url_source(url)), layout="torchvision", **fields)

# Release folders of timm's original .pth files (the hub's safetensors are tried first).
REL = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/"
REL_HF = "https://github.com/huggingface/pytorch-image-models/releases/download/v0.1-weights/"
REL_TRESNET = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-tresnet/"
