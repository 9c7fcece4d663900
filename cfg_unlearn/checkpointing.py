"""Crash-safe checkpoints and exact resume.

* :class:`AtomicCheckpointIO` writes a checkpoint to a temp file in the target's
  directory, flushes and fsyncs it, ``os.replace``-s it onto the target and fsyncs the
  directory: a process killed during a save leaves the previous file (``last.ckpt``)
  whole and loadable. Lightning's own local save goes through an fsspec transaction
  whose temp file lives in the *system* temp dir: when that is another filesystem
  (a tmpfs ``/tmp``, a scratch disk) the final ``shutil.move`` is a copy into the
  target, which a kill leaves truncated, and nothing is fsynced.
  ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` with a full save through the
  checkpoint IO, so it is covered; ``save_last="link"`` replaces the link with
  ``os.remove`` + ``os.symlink`` (or a copy) outside the IO, which
  :class:`AtomicModelCheckpoint` makes atomic too.
* :class:`ExactResume` makes a run killed mid-epoch and resumed from its checkpoint end
  with the weights of an uninterrupted run. Lightning 2.6 resumes the loops' counters
  (``batch_idx`` and ``global_step`` continue at the saved position) but not a plain
  ``DataLoader``: the resumed epoch starts again at the loader's first batch, so the
  batches before the checkpoint are trained on twice and as many at the end of the
  epoch never (the loop stops at the epoch's batch count). The callback records, in every
  checkpoint, the batches done in the current epoch, the epoch, the state of the
  loader's ``torch.Generator`` at the start of the epoch's permutation and the global
  RNG states; on resume the train loader replays the same permutation from the same
  generator state and skips the batches already trained on (indices only: nothing is
  loaded or collated), and the RNGs are restored before the first resumed step.
* :class:`FinalLastCheckpoint`: ``last.ckpt`` holds the final weights. Lightning 2.6's
  ``ModelCheckpoint(save_last=True)`` writes it at train end only if it never wrote one,
  so with ``every_n_train_steps: 20`` a 102-step run left ``last.ckpt`` at step 100,
  older than the model just evaluated, validated or exported from it.
* :func:`install_checkpointing` wires them into a constructed ``Trainer``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import pickle
import random
import re
import shutil
import time
import uuid
import warnings
import weakref
from typing import Any, Callable

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset

from cfg_unlearn.utils import TMP_SUFFIX, atomic_open, fsync_dir

__all__ = [
    "AtomicCheckpointIO",
    "AtomicModelCheckpoint",
    "ExactResume",
    "atomic_symlink",
    "atomic_torch_save",
    "install_checkpointing",
]

#: Lightning's warning on every mid-epoch resume of a loader it cannot see is stateful;
#: silenced while :class:`ExactResume` resumes one exactly.
_NOT_RESUMABLE_WARNING = r"You're resuming from a checkpoint that ended before the epoch ended"


# ============================================================================ atomic writes


def _temp_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\..+{re.escape(TMP_SUFFIX)}$")


def remove_stale_temp_files(path: str | os.PathLike, older_than_s: float) -> list[str]:
    """Delete the temp files of ``path`` (``.<name>.*.tmp`` next to it; folders too, the
    temp folders of sharded saves) last modified more than ``older_than_s`` seconds ago:
    what a save killed by SIGKILL leaves behind (an exception cleans up after itself).
    Returns the removed paths."""
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    pattern, cutoff, removed = _temp_pattern(name), time.time() - older_than_s, []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if pattern.match(entry.name):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        if entry.is_dir(follow_symlinks=False):
                            shutil.rmtree(entry.path)
                        else:
                            os.unlink(entry.path)
                        removed.append(entry.path)
    return removed


def sharded_temp_path(path: str | os.PathLike, token: str) -> str:
    """Where a sharded (folder) checkpoint for ``path`` is written before it is renamed
    there (:func:`cfg_unlearn.utils.publish_dir`): a hidden sibling, same filesystem,
    cleaned by :func:`remove_stale_temp_files` if the save is killed."""
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(directory, f".{name}.{token}{TMP_SUFFIX}")


def register_checkpoint_types() -> None:
    """Importing these registers the config types a checkpoint's hyperparameters hold
    (``LoraSettings``, ``WorldConfig``) as safe for ``torch.load(weights_only=True)``."""
    import importlib

    for name in ("cfg_unlearn.module", "cfg_unlearn.data.datamodule"):
        importlib.import_module(name)


def remote_code_refusal(model: Any, how: str) -> str:
    """The end of the refusal of a checkpoint trained with ``model.trust_remote_code``
    (rebuilding it runs its model folder's code): ``how`` names the command's own switch."""
    return (f"was trained with model.trust_remote_code=True, which runs the modelling code of its model {model!r}; "
            f"a checkpoint cannot turn that on by itself: {how} if you trust that code")


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """A checkpoint file as data, never code (``weights_only=True``: a pickle that would
    run a function is refused), memory-mapped so that reading its keys reads no tensor;
    read plainly where mapping fails (Windows, some network disks, the legacy non-zip
    format). Raises what the plain read raises."""
    register_checkpoint_types()
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:  # refused as data: a plain read would load every tensor first, then refuse
        raise
    except Exception:  # noqa: BLE001 - the plain read below says what is wrong, if anything
        return torch.load(path, map_location="cpu", weights_only=True)


def atomic_torch_save(obj: Any, path: str | os.PathLike, *, fsync: bool = True) -> None:
    """``torch.save(obj, path)`` so that ``path`` holds the old file or the new one, never
    part of one: serialise into ``.<name>.<random>.tmp`` in the same directory, flush,
    fsync, ``os.replace`` onto ``path`` and fsync the directory. The temp file is removed
    on any exception (KeyboardInterrupt included). Streams to disk: no second in-memory
    copy of the checkpoint. The file's mode is what a plain ``open`` would leave."""
    with atomic_open(os.path.abspath(os.fspath(path)), "wb", fsync=fsync) as fh:
        torch.save(obj, fh)


def atomic_symlink(target: str, linkpath: str | os.PathLike) -> None:
    """Point ``linkpath`` at ``target`` (relative to the link's directory, like
    ``os.symlink``) atomically: the link is made under a temp name and renamed over
    ``linkpath``, so a reader finds the old link/file or the new link, never nothing.
    Where symlinks are not allowed, an atomic copy of the target is made instead."""
    linkpath = os.path.abspath(os.fspath(linkpath))
    directory, name = os.path.split(linkpath)
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    try:
        try:
            os.symlink(target, tmp)
        except OSError:  # e.g. Windows without the privilege: copy, as Lightning does
            source = target if os.path.isabs(target) else os.path.join(directory, target)
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, linkpath)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` whose local saves are
    atomic and durable (:func:`atomic_torch_save`). Remote paths (``s3://`` ...) keep
    Lightning's fsspec transaction. Loading and removal are unchanged.

    Args:
        fsync: fsync the file and its directory (off only for throwaway runs on slow disks).
        stale_temp_after_s: after a successful save, delete temp files of the same target
            older than this (left by a save killed with SIGKILL); None keeps them.
    """

    def __init__(self, fsync: bool = True, stale_temp_after_s: float | None = 600.0):
        super().__init__()
        self.fsync, self.stale_temp_after_s = fsync, stale_temp_after_s

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                "`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg"
                f" is not supported for `{self.__class__.__name__}`."
            )
        from fsspec.implementations.local import LocalFileSystem

        fs = get_filesystem(path)
        if not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path)
        local = fs._strip_protocol(str(path))
        atomic_torch_save(checkpoint, local, fsync=self.fsync)
        if self.stale_temp_after_s is not None:
            remove_stale_temp_files(local, self.stale_temp_after_s)


class AtomicModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``save_last="link"`` swaps ``last.ckpt`` atomically
    (Lightning removes the old link, then creates the new one). With ``save_last=True``
    (a full save through the checkpoint IO) it behaves exactly like ``ModelCheckpoint``."""

    @staticmethod
    def _link_checkpoint(trainer: "L.Trainer", filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            if os.path.isdir(linkpath) and not os.path.islink(linkpath):
                shutil.rmtree(linkpath)
            atomic_symlink(os.path.relpath(filepath, os.path.dirname(os.path.abspath(linkpath))), linkpath)
        trainer.strategy.barrier()


#: what :class:`FinalLastCheckpoint` puts in ``ModelCheckpoint._last_checkpoint_saved``
#: under fast_dev_run, until teardown
FAST_DEV_RUN_MARK = "<none: fast_dev_run>"


def save_last_checkpoints(trainer: "L.Trainer") -> None:
    """Save every ``save_last`` checkpoint callback's last checkpoint now, through its own
    save (paths, version counter, atomic IO): before an error from a callback that runs
    ahead of them is raised. A failure here is logged, never raised over that error."""
    saved = False
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.save_last and not trainer.fast_dev_run:
            try:
                cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
                saved = True
            except Exception as e:  # noqa: BLE001 - the caller's error is the one to raise
                rank_zero_warn(f"could not save the last checkpoint before the error ({type(e).__name__}: {e})")
    if saved:
        rank_zero_warn(f"saved the last checkpoint at step {trainer.global_step} before raising the error")


class FinalLastCheckpoint(Callback):
    """At the end of training, every ``ModelCheckpoint`` with ``save_last`` whose last
    save is older than the final step saves ``last.ckpt`` once more (see the module
    docstring). It goes through the callback's own save, so its paths, version counter
    and atomic IO are the usual ones."""

    def __init__(self):
        self._marked: list[ModelCheckpoint] = []

    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        # resumed from a callback's own last.ckpt whose folder is spelled otherwise now (a
        # relative logger save_dir given absolute, a moved run folder): Lightning restores
        # last_model_path only for the same folder string, and otherwise wrote this run's
        # last checkpoints to last-v1.ckpt beside the stale last.ckpt (which validate and
        # export then read). Claiming it lets the callback overwrite it, as on a plain resume
        ckpt = trainer.ckpt_path
        if not ckpt:
            return
        for cb in trainer.checkpoint_callbacks:
            if not (isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath) or cb.last_model_path:
                continue
            name = cb.format_checkpoint_name(cb._monitor_candidates(trainer), cb.CHECKPOINT_NAME_LAST)
            # exists, not isfile: an FSDP sharded checkpoint is a folder
            mine = os.path.exists(ckpt) and os.path.exists(name) and os.path.samefile(name, ckpt)
            # rank 0 decides for all: ranks that disagreed (node-local disks) would run the
            # save's file_exists broadcasts a different number of times, and hang
            if trainer.strategy.broadcast(mine, src=0):
                cb.last_model_path = name

    def on_train_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if trainer.fast_dev_run:
            # Lightning 2.6's ModelCheckpoint.on_train_end saves last.ckpt whenever none was
            # saved, without its own fast_dev_run check: a smoke test wrote
            # ./checkpoints/last.ckpt (10 MB for the tiny model) into the working directory.
            # Its on_train_end runs after this one (install_checkpointing puts this first);
            # teardown takes the mark back, or a reused callback would link last.ckpt to it
            self._marked = [cb for cb in trainer.checkpoint_callbacks
                            if isinstance(cb, ModelCheckpoint) and cb.save_last and not cb._last_checkpoint_saved]
            for cb in self._marked:
                cb._last_checkpoint_saved = FAST_DEV_RUN_MARK
            return
        for cb in trainer.checkpoint_callbacks:
            if (isinstance(cb, ModelCheckpoint) and cb.save_last and cb._last_checkpoint_saved
                    and not cb._should_skip_saving_checkpoint(trainer)):
                cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))

    def teardown(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        for cb in self._marked:
            if cb._last_checkpoint_saved == FAST_DEV_RUN_MARK:
                cb._last_checkpoint_saved = ""
        self._marked = []


# ============================================================================ exact resume


def _generators(loader: DataLoader) -> list[torch.Generator]:
    """The distinct ``torch.Generator`` objects that decide a loader's order: the
    loader's own (``DataLoader(generator=...)``) and its sampler's/batch sampler's."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    found: dict[int, torch.Generator] = {}
    for obj in (loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator):
            found.setdefault(id(g), g)
    return list(found.values())


def _generator_states(loader: DataLoader) -> list[torch.Tensor]:
    return [g.get_state() for g in _generators(loader)]


def _set_generator_states(loader: DataLoader, states: list[torch.Tensor]) -> bool:
    gens = _generators(loader)
    if len(gens) != len(states):
        return False
    for g, s in zip(gens, states):
        g.set_state(s)
    return True


def _set_sampler_epoch(loader: DataLoader, epoch: int) -> None:
    """``set_epoch`` on the loader's samplers, as Lightning's fit loop does at every epoch
    start: done again here in case the resumed iterator is drawn before that (Lightning
    prefetches a batch in ``setup_data`` when the loader has no length)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    seen: dict[int, Any] = {}
    for obj in (getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        if obj is not None and callable(getattr(obj, "set_epoch", None)):
            seen.setdefault(id(obj), obj)
    for obj in seen.values():
        obj.set_epoch(epoch)


def _reuses_iterator(loader: DataLoader) -> bool:
    """A loader whose later epochs reset one iterator (persistent workers) instead of
    creating a new one, which draws a base seed from the generator first."""
    return bool(loader.persistent_workers and loader.num_workers > 0)


class _PositionedIndexSampler:
    """The index (batch) sampler of a loader made resumable by :class:`ExactResume`: at the start
    of each pass (the point where a shuffling sampler draws its permutation) it lets the
    owning :class:`ExactResume` restore the generators and the sampler epoch of a resumed
    epoch, records the generator states, and skips the batches already trained on."""

    def __init__(self, inner: Any, loader: DataLoader):
        self.inner, self.loader = inner, loader

    def __len__(self) -> int:  # the full epoch: Lightning counts resumed batches itself
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:  # batch_size, drop_last, sampler ... of the wrapped one
        if name in ("inner", "loader"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __iter__(self):  # a generator: runs at the first next(), not at iter()
        loader = self.loader
        owner = type(loader)._resume_owner
        skip = owner._on_pass_start(loader) if owner is not None else 0
        loader.__dict__["_resume_epoch_start_generators"] = _generator_states(loader)
        loader.__dict__["_resume_exhausted"] = False
        it = iter(self.inner)
        for _ in range(skip):
            if next(it, _END) is _END:
                break
        yield from it
        loader.__dict__["_resume_exhausted"] = True


_END = object()


def _resumable_subclass(base: type, owner: "ExactResume") -> type:
    """``base`` (a ``DataLoader`` class) with the hooks :class:`ExactResume` needs. A
    direct subclass with the methods in its own namespace, not a mixin: CPython (3.11
    at least) refuses ``__class__`` assignment from ``DataLoader`` to a mixin-first subclass.
    ``iter(loader)`` tells the owner (which may restore the generators) and the index
    sampler is wrapped in a :class:`_PositionedIndexSampler`. Lightning re-instantiates a
    loader as ``type(loader)(...)`` (e.g. to add a distributed sampler), which keeps it."""

    def __iter__(self):
        if type(self)._resume_owner is not None:
            type(self)._resume_owner._on_iter(self)
        return base.__iter__(self)

    def _index_sampler(self):
        inner = base._index_sampler.__get__(self, type(self))
        cached = self.__dict__.get("_resume_index_sampler")
        if cached is None or cached.inner is not inner:
            cached = _PositionedIndexSampler(inner, self)
            self.__dict__["_resume_index_sampler"] = cached  # not via __setattr__ (Lightning records those)
        return cached

    namespace = {"__iter__": __iter__, "_index_sampler": property(_index_sampler), "_resume_owner": owner,
                 "_resume_base": base, "__module__": __name__, "__doc__": base.__doc__}
    return type(f"Resumable{base.__name__}", (base,), namespace)


def _rng_state() -> dict[str, Any]:
    import numpy as np

    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # plain types only: checkpoints are loaded with torch.load(weights_only=True)
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype("int64")),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


class ExactResume(Callback):
    """Resume a fit from a mid-epoch (or end-of-epoch) checkpoint so that it continues
    exactly where the interrupted run was: same remaining batches in the same order,
    same sampler epoch, same generator and RNG states. With deterministic kernels and
    the module's own randomness seeded by position (the conditioning masks are a pure
    function of seed, epoch and sample id), the resumed run ends with the weights of an
    uninterrupted one.

    Put it in the trainer's callbacks (or call :func:`install_checkpointing`) for the
    run that writes the checkpoints *and* the run that resumes. It handles one train
    ``DataLoader`` over a map-style dataset (the ``PairDataModule`` case), returned by
    the datamodule's or module's ``train_dataloader`` or passed to ``fit``. Other
    shapes (several loaders, an ``IterableDataset``) are left alone with a warning.

    Not covered: randomness inside the data pipeline (augmentations in ``__getitem__``
    or the collate function), and a ``RandomSampler`` without a generator (it seeds
    itself from the global RNG each epoch); give shuffling samplers a seeded generator
    or a (seed, epoch) permutation.

    Args:
        restore_rng: also save the torch (CPU and CUDA), numpy and Python RNG states
            per rank and restore them before the first resumed batch, for dropout and
            other model-side randomness.
    """

    def __init__(self, restore_rng: bool = True):
        self.restore_rng = restore_rng
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._trainer: L.Trainer | None = None
        self._classes: dict[type, type] = {}
        self._loader_ref: Callable[[], Any] | None = None  # weakref to the loader feeding training
        self._pending: dict[str, Any] | None = None  # data position of the resumed checkpoint
        self._pending_rng: list[dict[str, Any]] | None = None
        self._patched: tuple[Any, str, bool, Any] | None = None
        self._warned: set[str] = set()
        self._filter: tuple | None = None
        # (global step, epoch, fit loop state) at the end of the last training batch
        self._batch_end: tuple[int, int, dict[str, Any]] | None = None
        # the same, plus (batches done in the epoch, RNG state), at the end of the last
        # batch that stepped the optimizer: where a checkpoint written mid-accumulation resumes
        self._step_end: tuple[int, int, dict[str, Any], int, dict[str, Any]] | None = None

    def __getstate__(self) -> dict[str, Any]:  # picklable (ddp_spawn): runtime state is rebuilt
        return {"restore_rng": self.restore_rng}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.restore_rng = state["restore_rng"]
        self._init_runtime()

    # ------------------------------------------------------------------ loader wiring

    def _warn_once(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            rank_zero_warn(f"ExactResume: {msg}")

    def _resumable_class(self, cls: type) -> type:
        cls = cls.__dict__.get("_resume_base", cls)  # another owner's resumable class: its base
        if cls not in self._classes:
            self._classes[cls] = _resumable_subclass(cls, self)
        return self._classes[cls]

    def _convert(self, loaders: Any) -> Any:
        """Make the train loader(s) in ``loaders`` resumable, in place; returns ``loaders``."""
        from lightning.pytorch.utilities import CombinedLoader

        flat = loaders.flattened if isinstance(loaders, CombinedLoader) else [loaders]
        if len(flat) != 1 or not isinstance(flat[0], DataLoader):
            self._warn_once("exact mid-epoch resume needs exactly one train DataLoader; left as is")
            return loaders
        loader = flat[0]
        if isinstance(loader.dataset, IterableDataset):
            self._warn_once("an IterableDataset cannot be skipped by index; make it stateful for exact resume")
            return loaders
        if getattr(type(loader), "_resume_owner", None) is not self:
            object.__setattr__(loader, "__class__", self._resumable_class(type(loader)))
        return loaders

    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        source = getattr(trainer.fit_loop, "_data_source", None)
        instance, name = getattr(source, "instance", None), getattr(source, "name", "train_dataloader")
        if isinstance(instance, (L.LightningModule, L.LightningDataModule)):
            original = getattr(instance, name)

            @functools.wraps(original)
            def train_dataloader(*args: Any, **kwargs: Any) -> Any:
                return self._convert(original(*args, **kwargs))

            self._patched = (instance, name, name in instance.__dict__, instance.__dict__.get(name))
            setattr(instance, name, train_dataloader)
        elif instance is not None:
            self._convert(instance)

    def teardown(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        if self._patched is not None:
            obj, name, had, old = self._patched
            if had:
                setattr(obj, name, old)
            else:
                with contextlib.suppress(AttributeError):
                    delattr(obj, name)
            self._patched = None
        self._pending = self._pending_rng = None
        self._remove_filter()

    def _on_iter(self, loader: DataLoader) -> None:
        """``iter(loader)``: remember the loader; an end-of-epoch resume restores the
        generators here, before the iterator draws its base seed (as the uninterrupted
        run's new iterator for the next epoch did)."""
        self._loader_ref = weakref.ref(loader)
        p = self._pending_for(loader)
        if p is not None and p["epoch_done"] and not _reuses_iterator(loader):
            self._restore_generators(loader, p["generators"])
            # a loader without a generator (the data module's) draws that base seed from
            # the global RNG: restored at the first batch, after it, every dropout mask of
            # the resumed run was one draw off the uninterrupted run's (LoRA's dropout)
            self._restore_pending_rng()

    def _pending_for(self, loader: DataLoader) -> dict[str, Any] | None:
        p = self._pending
        if p is not None and p["length"] != len(loader):
            if p["epoch_done"]:
                self._warn_once(f"the train loader has {len(loader)} batches, the checkpoint's had {p['length']} "
                                "(another batch_size, data or number of processes): its shuffling state is not "
                                "restored")
            else:
                self._warn_once(
                    f"the train loader has {len(loader)} batches, the checkpoint's had {p['length']} (another "
                    f"batch_size, data or number of processes), so epoch {p['epoch']} cannot continue where it "
                    f"stopped ({p['batches_done']} batches in): Lightning restarts the data from the top and ends the "
                    "epoch after the batches it counts as left, so some pairs of this epoch train twice and others "
                    "not at all. For an exact resume, resume with the checkpoint's batch_size and data, or from an "
                    "end-of-epoch checkpoint")
            return None
        return p

    def _on_pass_start(self, loader: DataLoader) -> int:
        """Start of a pass over the index sampler; returns the batches to skip."""
        p = self._pending_for(loader)
        if p is None:
            return 0
        if p["epoch_done"]:
            if _reuses_iterator(loader):  # the uninterrupted run reset its iterator: no base-seed draw
                self._restore_generators(loader, p["generators"])
            return 0
        _set_sampler_epoch(loader, p["epoch"])
        self._restore_generators(loader, p["epoch_start_generators"])
        return p["batches_done"]

    def _restore_generators(self, loader: DataLoader, states: list[torch.Tensor]) -> None:
        if not _set_generator_states(loader, states):
            self._warn_once("the train loader's generators differ from the checkpoint's; shuffling not restored")

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"version": 1}
        trainer = self._trainer
        loader = self._loader_ref() if self._loader_ref is not None else None
        if trainer is None:
            return state
        if loader is not None:
            done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
            total = trainer.num_training_batches
            exhausted = bool(loader.__dict__.get("_resume_exhausted", False))
            epoch_done = bool(done >= total or (total == float("inf") and exhausted))
            stopped = self._stopped_mid_epoch(trainer, epoch_done)
            window = self._window_start(trainer, epoch_done)
            if window is not None:
                done = window[3]
            state.update(
                epoch=stopped[1] if stopped else int(trainer.current_epoch),
                batches_done=done,
                epoch_done=epoch_done,
                length=len(loader),
                epoch_start_generators=list(loader.__dict__.get("_resume_epoch_start_generators", [])),
                generators=_generator_states(loader),
            )
        if self.restore_rng:
            window = self._window_start(trainer, state.get("epoch_done", True))
            state["rng"] = self._gather_rng(trainer, None if window is None else window[4])
        return state

    @staticmethod
    def _batches_done(trainer: "L.Trainer") -> int:
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    @staticmethod
    def _accumulating(trainer: "L.Trainer", done: int) -> bool:
        """Whether the epoch's first ``done`` batches end inside an accumulation window
        (Lightning steps every ``accumulate_grad_batches`` batches and at the epoch's last)."""
        return done % trainer.accumulate_grad_batches != 0 and done != trainer.num_training_batches

    def _window_start(self, trainer: "L.Trainer", epoch_done: bool
                      ) -> tuple[int, int, dict[str, Any], int, dict[str, Any]] | None:
        """The last optimizer step's batch end when a checkpoint is written half-way
        through a gradient-accumulation window (a validation or a ``max_time`` stop
        between its batches): the window's gradient is not in the checkpoint, so the
        resumed run replays the window from its first batch. None at a step boundary."""
        done = self._batches_done(trainer)
        if epoch_done or not self._accumulating(trainer, done):
            return None
        snap = self._step_end
        start = done - done % trainer.accumulate_grad_batches
        if snap is None or snap[:2] != (trainer.global_step, trainer.current_epoch) or snap[3] != start or start == 0:
            self._warn_once("a checkpoint written half-way through the epoch's first accumulation window resumes "
                            "after the batches it accumulated, without their gradient: not an exact resume")
            return None
        return snap

    def _stopped_mid_epoch(self, trainer: "L.Trainer", epoch_done: bool) -> tuple[int, int, dict[str, Any]] | None:
        """The last batch end's (step, epoch, fit loop state) when the epoch loop has
        ended (its epoch counted as processed) before the epoch's batches all ran, with
        no batch since: a fit stopped mid-epoch by max_steps, max_time or should_stop."""
        current = trainer.fit_loop.epoch_progress.current
        ended = current.processed == current.started > 0
        snap = self._batch_end
        if epoch_done or not ended or snap is None or snap[0] != trainer.global_step:
            return None
        return snap

    def on_save_checkpoint(self, trainer: "L.Trainer", pl_module: "L.LightningModule",
                           checkpoint: dict[str, Any]) -> None:
        # a fit stopped mid-epoch has its epoch counted as processed (at the epoch-end
        # hooks) and then completed (at train end) by the time a checkpoint is written
        # there: Lightning's train-end last.ckpt, FinalLastCheckpoint's, or an epoch-end
        # save. Lightning resumes such a checkpoint with the *next* epoch, skipping the rest
        # of this one; the loops' state of the last batch end (what a checkpoint written
        # at that batch holds) resumes it exactly
        stopped = None
        if checkpoint.get("callbacks", {}).get(self.state_key, {}).get("epoch_done") is False:
            stopped = self._window_start(trainer, False) or self._stopped_mid_epoch(trainer, False)
        loops = checkpoint.get("loops")
        if stopped is None or not isinstance(loops, dict) or "fit_loop" not in loops:
            return
        loops["fit_loop"] = copy.deepcopy(stopped[2])
        checkpoint["epoch"] = stopped[1]

    @staticmethod
    def _gather_rng(trainer: "L.Trainer", mine: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        mine = _rng_state() if mine is None else mine
        dist = torch.distributed
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            out: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(out, mine)
            return out
        return [mine]

    def on_load_checkpoint(self, trainer: "L.Trainer", pl_module: "L.LightningModule",
                           checkpoint: dict[str, Any]) -> None:
        # a mid-epoch resume point is an optimizer step's end (a mid-window checkpoint
        # holds its window's start): the step end a mid-window checkpoint of *this* run
        # falls back to until its first step, which it had none of, so it kept the
        # batches' position without their gradient
        state = checkpoint.get("callbacks", {}).get(self.state_key, {})
        loops = checkpoint.get("loops")
        if isinstance(loops, dict) and isinstance(loops.get("fit_loop"), dict):
            _start_next_epoch_afresh(loops["fit_loop"])
        if state.get("epoch_done") is not False or not isinstance(loops, dict) or "fit_loop" not in loops:
            return
        mine: dict[str, Any] = {}
        if self.restore_rng:
            rng = state.get("rng")
            if not rng or len(rng) != trainer.world_size:  # not restored either (warned at the first batch)
                return
            mine = rng[trainer.global_rank]
        self._step_end = (int(checkpoint["global_step"]), int(checkpoint["epoch"]), copy.deepcopy(loops["fit_loop"]),
                          int(state["batches_done"]), mine)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict) if "batches_done" in state_dict else None
        self._pending_rng = state_dict.get("rng") if self.restore_rng else None
        if self._pending is not None and not self._pending["epoch_done"]:
            self._add_filter()

    def _add_filter(self) -> None:
        if self._filter is None:
            from lightning.pytorch.utilities.warnings import PossibleUserWarning

            warnings.filterwarnings("ignore", message=_NOT_RESUMABLE_WARNING, category=PossibleUserWarning)
            self._filter = warnings.filters[0]

    def _remove_filter(self) -> None:
        if self._filter is not None:
            with contextlib.suppress(ValueError):
                warnings.filters.remove(self._filter)
                getattr(warnings, "_filters_mutated", lambda: None)()
            self._filter = None

    # ------------------------------------------------------------------ the first resumed batch

    def on_train_batch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        self._restore_pending_rng()

    def _restore_pending_rng(self) -> None:
        """The checkpoint's RNG states, once: at the resumed iterator's creation after an
        epoch's end, else at the first resumed batch (a mid-epoch state is a step's end)."""
        rng, self._pending_rng = self._pending_rng, None
        trainer = self._trainer
        if rng is None or trainer is None:
            return
        if len(rng) != trainer.world_size:
            self._warn_once(f"the checkpoint has RNG states of {len(rng)} processes, this run has "
                            f"{trainer.world_size}: RNG states not restored")
            return
        _set_rng_state(rng[trainer.global_rank])

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # the resumed iterator has been created and has fetched its first batch: done
        self._pending = None
        self._remove_filter()
        self._batch_end = (trainer.global_step, trainer.current_epoch, trainer.fit_loop.state_dict())
        done = self._batches_done(trainer)
        if not self._accumulating(trainer, done):  # this batch stepped the optimizer
            self._step_end = (*self._batch_end, done, _rng_state() if self.restore_rng else {})


def _start_next_epoch_afresh(fit_loop: dict[str, Any]) -> None:
    """A checkpoint written after an epoch completed (the train-end save of a fit that
    max_steps, max_epochs or should_stop ended at an epoch's last batch) still holds that
    epoch's batch counters at its end. Resumed with ``max_steps`` set, Lightning 2.6 ran
    the next epoch with them: no batch, the epoch counted done, the fit ended (max_steps
    4 then 6 on 2 batches an epoch trained nothing, and the third epoch was lost). The
    counters of the epoch to come start at 0, as Lightning's own ``reset_on_run`` sets
    them for a new epoch."""
    epochs = fit_loop.get("epoch_progress", {}).get("total", {})
    if not epochs or len({epochs.get(k) for k in ("ready", "started", "processed", "completed")}) != 1:
        return  # an epoch under way (or not yet started): its counters are its own
    for key in ("epoch_loop.batch_progress", "epoch_loop.scheduler_progress"):
        progress = fit_loop.get(key)
        if isinstance(progress, dict) and isinstance(progress.get("current"), dict):
            progress["current"] = {k: 0 for k in progress["current"]}
            if "is_last_batch" in progress:
                progress["is_last_batch"] = False
    optim = fit_loop.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {})
    for part in optim.values():
        if isinstance(part, dict) and isinstance(part.get("current"), dict):
            part["current"] = {k: 0 for k in part["current"]}


# ============================================================================ wiring


def install_checkpointing(trainer: "L.Trainer", *, exact_resume: bool = True,
                          restore_rng: bool = True) -> "L.Trainer":
    """Atomic checkpoint writes, exact resume and a final ``last.ckpt`` on a constructed
    ``Trainer`` (idempotent): a plain ``TorchCheckpointIO`` is replaced by
    :class:`AtomicCheckpointIO` (custom or wrapping IOs, and strategies that save without
    one, are left alone); an :class:`ExactResume` and a :class:`FinalLastCheckpoint`
    are added before the checkpoint callbacks unless there."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
    callbacks = trainer.callbacks
    # before the checkpoint callbacks (Lightning ordered them last when the trainer was built)
    if exact_resume and not any(isinstance(cb, ExactResume) for cb in callbacks):
        callbacks.insert(_first_checkpoint(callbacks), ExactResume(restore_rng=restore_rng))
    if not any(isinstance(cb, FinalLastCheckpoint) for cb in callbacks):
        callbacks.insert(_first_checkpoint(callbacks), FinalLastCheckpoint())
    return trainer


def _first_checkpoint(callbacks: list[Callback]) -> int:
    return next((i for i, cb in enumerate(callbacks) if isinstance(cb, Checkpoint)), len(callbacks))
