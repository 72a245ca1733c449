"""Pretrained weights by name: find the checkpoint (local file, installed package, cache, download), convert it once
to zoo names, and cache the result as safetensors so later loads need neither torch-format reading nor conversion."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from zoo.config import PretrainedCfg, WeightSource
from zoo.convert import convert_state_dict
from zoo.weights.download import cache_dir, download, hf_hub_url, is_offline, sha256_file
from zoo.weights.layouts import is_zoo_named
from zoo.weights.errors import ChecksumError, DownloadError, OfflineError, WeightsError
from zoo.weights.package_source import package_file
from zoo.weights.torch_reader import load_state_dict, save_safetensors_atomic

_LOCAL = ("file", "package")


def _download_dest(source: WeightSource) -> Path:
    if source.kind == "hf_hub":
        return cache_dir() / "hub" / source.location.replace("/", "--") / source.filename
    name = Path(urllib.parse.urlsplit(source.location).path).name
    return cache_dir() / "downloads" / name


def _check_local(path: Path, source: WeightSource) -> Path:
    if source.sha256:
        digest = sha256_file(path)
        if not digest.startswith(source.sha256.lower()):
            raise ChecksumError(f"sha256 mismatch for {path}: expected {source.sha256}, got {digest}")
    return path


def resolve_local(source: WeightSource) -> Path | None:
    """The file of a local source, or None when it is not present (a corrupt file raises)."""
    if source.kind == "file":
        path = Path(source.location).expanduser()
        return _check_local(path, source) if path.is_file() else None
    if source.kind == "package":
        try:
            return _check_local(package_file(source.location, source.filename), source)
        except ChecksumError:
            raise
        except WeightsError:  # not installed
            return None
    return None


def fetch_checkpoint(pcfg: PretrainedCfg, *, progress: bool = True) -> tuple[Path, WeightSource]:
    """The checkpoint file of `pcfg`: local sources and cached downloads first, then the network (unless offline)."""
    for source in pcfg.sources:
        if source.kind in _LOCAL and (path := resolve_local(source)) is not None:
            return path, source
    remote = [s for s in pcfg.sources if s.kind not in _LOCAL]
    for source in remote:
        dest = _download_dest(source)
        if dest.is_file():
            return download(_url(source), dest, sha256=source.sha256, progress=progress), source
    hints = "; ".join(s.describe() for s in pcfg.sources)
    if is_offline() or not remote:
        raise OfflineError(
            f"weights '{pcfg.tag}' are not available offline (sources: {hints}). Unset ZOO_OFFLINE to download, "
            f"install the package source where one is listed, set ZOO_CACHE_DIR to a cache that holds them, or "
            f"pass weights=<local file> to zoo.load."
        )
    errors = []
    for source in remote:
        try:
            return download(_url(source), _download_dest(source), sha256=source.sha256, progress=progress), source
        except (DownloadError, ChecksumError) as e:
            errors.append(f"{source.describe()}: {e}")
    raise DownloadError("could not fetch weights from any source:\n  " + "\n  ".join(errors))


def _url(source: WeightSource) -> str:
    return hf_hub_url(source.location, source.filename) if source.kind == "hf_hub" else source.location


def converted_cache_path(model_name: str, tag: str) -> Path:
    safe = re.sub(r"[^\w.-]", "_", f"{model_name}.{tag}")
    return cache_dir() / "converted" / f"{safe}.safetensors"


def load_converted(
    model_name: str, pcfg: PretrainedCfg, rename, target_shapes: dict, *, cache: bool = True, progress: bool = True
) -> dict[str, np.ndarray]:
    """Flat zoo-named arrays for `model_name.tag`, converted once and (with `cache`) kept as safetensors."""
    cached = converted_cache_path(model_name, pcfg.tag) if cache else None
    if cached is not None and cached.is_file():
        arrays = load_file(cached)
        if set(arrays) == set(target_shapes) and all(arrays[k].shape == target_shapes[k] for k in arrays):
            return arrays
    path, _ = fetch_checkpoint(pcfg, progress=progress)
    state_dict = load_state_dict(path)
    if is_zoo_named(state_dict):
        arrays = dict(state_dict)  # already in zoo names (e.g. a file written by this library)
    else:
        arrays = convert_state_dict(state_dict, rename, target_shapes)
    if cached is not None:
        save_safetensors_atomic(arrays, cached, metadata={"source": str(path), "tag": pcfg.tag, "layout": pcfg.layout})
    return arrays
