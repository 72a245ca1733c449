"""Downloads against a loopback HTTP server: caching, truncation, corruption, HTTP errors, offline mode, auth."""

import hashlib
import socket
from pathlib import Path

import numpy as np
import pytest

from zoo.weights import download as dl
from zoo.weights.errors import ChecksumError, DownloadError, OfflineError, WeightsError
from zoo.weights.torch_reader import load_state_dict

from loopback import serve


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> bytes:
    from safetensors.numpy import save_file

    path = tmp_path_factory.mktemp("src") / "w.safetensors"
    rng = np.random.default_rng(0)
    save_file({"conv.weight": rng.standard_normal((8, 3, 3, 3), np.float32),
               "fc.bias": rng.standard_normal(10, np.float32)}, str(path))
    return path.read_bytes()


@pytest.fixture
def server(checkpoint):
    corrupted = bytearray(checkpoint)
    corrupted[len(corrupted) // 2] ^= 0xFF
    routes = {
        "/good.safetensors": (200, checkpoint, None),
        "/truncated.safetensors": (200, checkpoint[: len(checkpoint) // 2], len(checkpoint)),
        "/corrupt.safetensors": (200, bytes(corrupted), None),
    }
    with serve(routes) as srv:
        yield srv


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    for var in ("ZOO_OFFLINE", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    return dl.cache_dir()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_then_cached(server, cache, checkpoint):
    dest = cache / "good.safetensors"
    assert dl.download(server.url + "/good.safetensors", dest, sha256=_sha(checkpoint), progress=True) == dest
    assert dl.sha256_file(dest) == _sha(checkpoint) and sorted(load_state_dict(dest)) == ["conv.weight", "fc.bias"]
    assert len(server.requests) == 1
    dl.download(server.url + "/good.safetensors", dest, sha256=_sha(checkpoint), progress=False)
    dl.download(server.url + "/good.safetensors", dest, sha256=None, progress=False)
    assert len(server.requests) == 1  # served from the cache
    assert [p.name for p in cache.iterdir()] == ["good.safetensors"]


def test_stale_cache_entry_is_replaced(server, cache, checkpoint):
    dest = cache / "good.safetensors"
    dest.write_bytes(b"old contents")
    dl.download(server.url + "/good.safetensors", dest, sha256=_sha(checkpoint).upper(), progress=False)
    assert dest.read_bytes() == checkpoint and len(server.requests) == 1


@pytest.mark.parametrize(
    "route,error,message",
    [
        ("/truncated.safetensors", DownloadError, r"truncated: got \d+ of \d+ bytes"),
        ("/corrupt.safetensors", ChecksumError, "sha256 mismatch.*expected [0-9a-f]{64}, got [0-9a-f]{64}"),
        ("/missing.safetensors", DownloadError, "HTTP 404.*ZOO_CACHE_DIR"),
    ],
)
def test_failures_leave_nothing(server, cache, checkpoint, route, error, message):
    with pytest.raises(error, match=message) as info:
        dl.download(server.url + route, cache / "w.safetensors", sha256=_sha(checkpoint), progress=False)
    assert server.url + route in str(info.value)
    assert list(cache.iterdir()) == []  # neither dest nor a .part-* file


def test_connection_refused(cache):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="Could not download.*To load without network"):
        dl.download(f"http://127.0.0.1:{port}/w.safetensors", cache / "w.safetensors", sha256=None, progress=False, timeout=5)
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize("var,value", [("ZOO_OFFLINE", "1"), ("ZOO_OFFLINE", "True"), ("HF_HUB_OFFLINE", "1")])
def test_offline(server, cache, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    assert dl.is_offline()
    dest = cache / "sub" / "w.safetensors"
    with pytest.raises(OfflineError) as info:
        dl.download(server.url + "/good.safetensors", dest, sha256=None, progress=False)
    message = str(info.value)
    assert str(dest) in message and "ZOO_CACHE_DIR" in message and "sub/w.safetensors" in message
    assert "local file path" in message and "pip-install" in message
    assert server.requests == []
    assert isinstance(info.value, WeightsError)


def test_offline_uses_cache(server, cache, monkeypatch, checkpoint):
    dest = cache / "good.safetensors"
    dest.write_bytes(checkpoint)
    monkeypatch.setenv("ZOO_OFFLINE", "yes")
    assert dl.download(server.url + "/good.safetensors", dest, sha256=_sha(checkpoint), progress=False) == dest
    assert server.requests == []


def test_not_offline_by_default(cache, monkeypatch):
    monkeypatch.setenv("ZOO_OFFLINE", "0")
    assert not dl.is_offline()


def test_hub_token_only_for_hub_host(server, cache, monkeypatch, checkpoint):
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    dl.download(server.url + "/good.safetensors", cache / "a.safetensors", sha256=None, progress=False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)  # now our server is "the Hub"
    dl.download(server.url + "/good.safetensors", cache / "b.safetensors", sha256=None, progress=False)
    assert [auth for _, auth in server.requests] == [None, "Bearer secret-token"]


def test_hf_hub_url(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert dl.hf_hub_url("timm/mobilenetv3_large_100.ra_in1k", "model.safetensors") == (
        "https://huggingface.co/timm/mobilenetv3_large_100.ra_in1k/resolve/main/model.safetensors"
    )
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example/")
    assert dl.hf_hub_url("org/repo", "sub/w.bin", revision="refs/pr/1") == (
        "https://hf-mirror.example/org/repo/resolve/refs%2Fpr%2F1/sub/w.bin"
    )


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("ZOO_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dl.cache_dir() == tmp_path / "xdg" / "zoo" and (tmp_path / "xdg" / "zoo").is_dir()
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dl.cache_dir() == tmp_path / "home" / ".cache" / "zoo"
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "mine"))
    assert dl.cache_dir() == tmp_path / "mine"
