"""Checkpoints of a run with orbax-checkpoint, wrapped once.

`workdir/checkpoints/<step>/` keeps the last N states (async saves: training goes on while the arrays are written),
`workdir/best/<step>/` the one with the best evaluation metric. Each holds `state` (the TrainState pytree) and `meta`
(JSON: model, config, class names, step, metrics). orbax writes into a temporary directory and renames it when
complete, so a run killed at any moment leaves only whole checkpoints, and a failed write (disk full, read-only
filesystem) leaves the previous one as it was.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from zoo.tree import flatten

log = logging.getLogger("train")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or does not fit this run."""


class Checkpoints:
    def __init__(self, workdir: str | Path, *, keep: int = 2, async_save: bool = True, read_only: bool = False):
        self.workdir = Path(workdir).expanduser().absolute()
        self.async_save = async_save
        self._pending: dict[int, int] = {}  # manager id -> step being written in the background
        try:
            self.latest = self._manager("checkpoints", keep, read_only)
            self.best = self._manager("best", 1, read_only)
        except OSError as e:
            raise CheckpointError(f"cannot create checkpoint directories in {self.workdir}: {e}") from e

    def _manager(self, name: str, keep: int, read_only: bool) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep,
                                               save_interval_steps=0 if read_only else 1,
                                               enable_async_checkpointing=self.async_save,
                                               create=not read_only, read_only=read_only,
                                               cleanup_tmp_directories=not read_only)
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        with _quiet_absl(read_only):  # "directory is read only" is what we asked for
            return ocp.CheckpointManager(self.workdir / name, options=options, item_handlers=handlers)

    def _which(self, which: str) -> ocp.CheckpointManager:
        if which not in ("latest", "best"):
            raise ValueError(f"which must be 'latest' or 'best', not {which!r}")
        return self.latest if which == "latest" else self.best

    def latest_step(self, which: str = "latest") -> int | None:
        return self._which(which).latest_step()

    def save(self, step: int, state, meta: dict, *, best: bool = False) -> None:
        """Start writing `state` at `step` (and as the best one). A failure of the previous async save raises here."""
        for manager in [self.latest] + ([self.best] if best else []):
            self._finish(manager)
            if manager.latest_step() == step:
                continue
            self._pending[id(manager)] = step
            try:
                manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                           meta=ocp.args.JsonSave(_jsonable(meta))), force=True)
            except Exception as e:  # noqa: BLE001  (orbax, tensorstore and OS errors all mean the same here)
                raise self._error(manager, e) from e

    def wait(self) -> None:
        """Block until pending saves are on disk; raise CheckpointError if one failed."""
        for manager in (self.latest, self.best):
            self._finish(manager)

    def _finish(self, manager) -> None:
        try:
            manager.wait_until_finished()
            if hasattr(manager, "check_for_errors"):
                manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._error(manager, e) from e
        self._pending.pop(id(manager), None)

    def _error(self, manager, e: Exception) -> CheckpointError:
        step = self._pending.pop(id(manager), None)
        try:
            done = [s for s in manager.all_steps() if s != step]
        except Exception:  # noqa: BLE001
            done = []
        prev = f"the previous checkpoint (step {max(done)}) is intact" if done else "no earlier checkpoint exists"
        what = f"step {step}" if step is not None else "a checkpoint"
        return CheckpointError(f"could not write {what} to {manager.directory} ({type(e).__name__}: {e}); {prev}")

    def read_meta(self, step: int | None = None, which: str = "latest") -> dict:
        manager = self._which(which)
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no {which} checkpoint in {self.workdir}")
        return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def param_shapes(self, step: int, which: str = "latest") -> dict[str, tuple]:
        tree = self._which(which).item_metadata(step)["state"]
        tree = getattr(tree, "tree", tree)
        return {k: tuple(v.shape) for k, v in flatten(dict(tree["params"])).items()}

    def restore(self, abstract_state, step: int | None = None, which: str = "latest") -> tuple[Any, dict]:
        """(state, meta) at `step` (default: the newest), restored into `abstract_state`'s types and shardings."""
        manager = self._which(which)
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no {which} checkpoint in {self.workdir}")
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 meta=ocp.args.JsonRestore()))
        return restored.state, dict(restored.meta)

    def restore_raw(self, step: int | None = None, which: str = "latest") -> dict:
        """The saved state as plain nested dicts, without a target structure (for reading weights back)."""
        manager = self._which(which)
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no {which} checkpoint in {self.workdir}")
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state

    def close(self) -> None:
        for manager in (self.latest, self.best):
            manager.close()


def check_compatible(ckpt: Checkpoints, step: int, meta: dict, model_meta: dict, params, which: str = "latest"):
    """Raise, naming both, when the checkpoint was written for another model or classifier size."""
    theirs = meta.get("model", {})
    if theirs.get("name") and theirs.get("name") != model_meta.get("name"):
        raise CheckpointError(
            f"the checkpoint in {ckpt.workdir} (step {step}) was written for model '{theirs.get('name')}' "
            f"({theirs.get('num_classes')} classes), but this run builds '{model_meta.get('name')}' "
            f"({model_meta.get('num_classes')} classes); use another workdir or the same model")
    saved = ckpt.param_shapes(step, which)
    want = {k: tuple(v.shape) for k, v in flatten(params).items()}
    missing = sorted(set(want) - set(saved))
    extra = sorted(set(saved) - set(want))
    shape = sorted(k for k in set(want) & set(saved) if want[k] != saved[k])
    if missing or extra or shape:
        parts = []
        if shape:
            parts.append("shape differs for " + ", ".join(f"{k} {saved[k]} vs {want[k]}" for k in shape[:5]))
        if missing:
            parts.append("missing in the checkpoint: " + ", ".join(missing[:5]))
        if extra:
            parts.append("not in this model: " + ", ".join(extra[:5]))
        raise CheckpointError(f"the checkpoint in {ckpt.workdir} (step {step}) does not fit model "
                              f"'{model_meta.get('name')}': " + "; ".join(parts))


@contextlib.contextmanager
def _quiet_absl(enabled: bool):
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    if enabled:
        absl_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_log.setLevel(level)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def abstract(tree, sharding=None):
    """ShapeDtypeStructs of `tree` (optionally with `sharding`): the restore target."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding or getattr(a, "sharding",
                                                                                                       None)), tree)
