"""Crash-safe checkpoints and exact resume (``cfg_unlearn.checkpointing``).

* A save that dies half-way (an exception, or SIGKILL) leaves the previous checkpoint
  byte-identical and loadable, and no temp file behind (SIGKILL: one that ``last``
  lookup ignores and a later save removes).
* A fit killed mid-epoch (or between epochs) and resumed from ``last.ckpt`` ends with
  exactly the weights of an uninterrupted fit: the real module and data module on the
  tiny model, conditioning dropout 0.5, AdamW + WarmupCosine, shuffling on.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, TensorDataset

from cfg_unlearn.checkpointing import (
    AtomicCheckpointIO,
    AtomicModelCheckpoint,
    ExactResume,
    FinalLastCheckpoint,
    atomic_torch_save,
    install_checkpointing,
    remove_stale_temp_files,
    sharded_temp_path,
)
from cfg_unlearn.data.datamodule import PairDataModule
from cfg_unlearn.data.world import WorldConfig
from cfg_unlearn.module import UnlearnModule
from cfg_unlearn.schedules import WarmupCosine
from cfg_unlearn.utils import publish_dir

ROOT = Path(__file__).resolve().parents[1]


def _temps(directory: Path) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir() if p.name.endswith(".tmp"))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ====================================================================== atomic writes


def test_atomic_save_round_trips_with_normal_permissions_and_no_temp_files(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "last.ckpt"  # the directory is created
    io.save_checkpoint({"state_dict": {"w": torch.arange(5.0)}, "epoch": 3}, path)
    loaded = io.load_checkpoint(path, weights_only=True)
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(5.0)) and loaded["epoch"] == 3
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()
    assert _temps(path.parent) == []
    with pytest.raises(TypeError):
        io.save_checkpoint({}, path, storage_options={"x": 1})


def test_remote_paths_keep_lightnings_fsspec_save():
    import fsspec

    io = AtomicCheckpointIO()
    path = "memory://cfg-unlearn-test-resume/last.ckpt"
    io.save_checkpoint({"a": torch.ones(2)}, path)
    try:
        with fsspec.open(path, "rb") as fh:
            assert torch.equal(torch.load(fh, weights_only=True)["a"], torch.ones(2))
    finally:
        fsspec.filesystem("memory").rm("/cfg-unlearn-test-resume", recursive=True)


class _Died(BaseException):
    """Stands in for the process dying (not an Exception: nothing may swallow it)."""


def _partial_torch_save(real_save, exc):
    def save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint " * 4096)  # ~100 kB of a zip that never ends
        raise exc

    return save


@pytest.mark.parametrize("failure", ["torch.save raises OSError", "torch.save dies", "fsync fails", "replace fails"])
def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch, failure):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.full((64, 64), 1.0)}, "global_step": 1}, path)
    before = path.read_bytes()
    with monkeypatch.context() as m:
        if failure == "torch.save raises OSError":
            m.setattr(torch, "save", _partial_torch_save(torch.save, OSError(28, "No space left on device")))
        elif failure == "torch.save dies":
            m.setattr(torch, "save", _partial_torch_save(torch.save, _Died()))
        elif failure == "fsync fails":
            m.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "I/O error")))
        else:
            m.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError(18, "cross-device")))
        with pytest.raises((OSError, _Died)):
            io.save_checkpoint({"state_dict": {"w": torch.full((64, 64), 2.0)}, "global_step": 2}, path)
    assert path.read_bytes() == before  # byte-identical
    loaded = io.load_checkpoint(path, weights_only=True)
    assert loaded["global_step"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.full((64, 64), 1.0))
    assert _temps(tmp_path) == []


_KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch
    from cfg_unlearn.checkpointing import AtomicCheckpointIO
    path, marker = sys.argv[1], sys.argv[2]
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(256, 256)}, path)
    real = torch.save
    def slow_save(obj, f, *a, **k):
        f.write(b"x" * 1_000_000)
        f.flush()
        open(marker, "w").close()  # half written: kill me now
        time.sleep(120)
    torch.save = slow_save
    io.save_checkpoint({"global_step": 2, "w": torch.zeros(256, 256)}, path)
""")


def test_sigkill_mid_save_keeps_last_ckpt_and_the_leftover_is_ignored_then_cleaned(tmp_path):
    path, marker = tmp_path / "last.ckpt", tmp_path / "writing"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path), str(marker)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the writer never started its second save"
            time.sleep(0.05)
        before = path.read_bytes()
        (leftover,) = _temps(tmp_path)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert path.read_bytes() == before
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["w"], torch.ones(256, 256))
    # SIGKILL cannot clean up: the temp file stays, but `ckpt_path="last"` never picks it
    assert _temps(tmp_path) == [leftover]
    assert ModelCheckpoint(dirpath=tmp_path)._find_last_checkpoints(None) == {os.path.normpath(path)}
    # a later save removes stale leftovers of its own target (old enough to be dead), not fresh ones
    fresh = tmp_path / ".last.ckpt.fresh.tmp"
    fresh.write_bytes(b"another writer")
    old = time.time() - 3600
    os.utime(tmp_path / leftover, (old, old))
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, path)
    assert _temps(tmp_path) == [fresh.name]
    assert remove_stale_temp_files(path, older_than_s=-1) == [str(fresh)]


@pytest.mark.parametrize("old", ["none", "folder", "file"])
def test_a_finished_sharded_folder_is_swapped_into_place_whole(tmp_path, old):
    """A sharded checkpoint is a folder: it is written under a temp name and renamed onto
    the target, an older checkpoint there (a folder, or a single-file one) set aside and
    deleted, so the target holds one save or the other, never a mix."""
    path = tmp_path / "last.ckpt"
    if old == "folder":
        path.mkdir()
        (path / "__0_0.distcp").write_bytes(b"old shard")
        (path / "meta.pt").write_bytes(b"old meta")
    elif old == "file":
        path.write_bytes(b"old single file")
    tmp = Path(sharded_temp_path(path, "abc"))
    assert tmp.parent == tmp_path and tmp.name == ".last.ckpt.abc.tmp"
    tmp.mkdir()
    (tmp / "__0_0.distcp").write_bytes(b"new shard")
    (tmp / "meta.pt").write_bytes(b"new meta")
    publish_dir(tmp, path, overwrite=True)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == {"__0_0.distcp": b"new shard", "meta.pt": b"new meta"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # nothing set aside is left


def test_stale_temp_folders_of_killed_sharded_saves_are_removed(tmp_path):
    path = tmp_path / "last.ckpt"
    dead = Path(sharded_temp_path(path, "dead"))
    dead.mkdir()
    (dead / "__0_0.distcp").write_bytes(b"half")
    old = time.time() - 3600
    os.utime(dead, (old, old))
    live = Path(sharded_temp_path(path, "live"))
    live.mkdir()
    assert remove_stale_temp_files(path, older_than_s=600) == [str(dead)]
    assert not dead.exists() and live.is_dir()


def test_link_mode_last_checkpoint_is_swapped_atomically(tmp_path, monkeypatch):
    trainer = types.SimpleNamespace(is_global_zero=True, strategy=types.SimpleNamespace(barrier=lambda *a: None))
    for step in (1, 2):
        atomic_torch_save({"global_step": step}, tmp_path / f"step={step}.ckpt")
    last = tmp_path / "last.ckpt"
    atomic_torch_save({"global_step": 0}, last)  # a regular file first: replaced by the link
    AtomicModelCheckpoint._link_checkpoint(trainer, str(tmp_path / "step=1.ckpt"), str(last))
    assert last.is_symlink() and os.readlink(last) == "step=1.ckpt"
    AtomicModelCheckpoint._link_checkpoint(trainer, str(tmp_path / "step=2.ckpt"), str(last))
    assert os.readlink(last) == "step=2.ckpt" and torch.load(last, weights_only=True)["global_step"] == 2
    # no symlinks allowed: an atomic copy instead
    monkeypatch.setattr(os, "symlink", lambda *a, **k: (_ for _ in ()).throw(OSError(1, "not permitted")))
    AtomicModelCheckpoint._link_checkpoint(trainer, str(tmp_path / "step=1.ckpt"), str(last))
    assert not last.is_symlink() and torch.load(last, weights_only=True)["global_step"] == 1
    assert _temps(tmp_path) == []


def test_install_checkpointing_swaps_the_plain_io_and_adds_exact_resume_once(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[ckpt], enable_progress_bar=False)
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
    install_checkpointing(install_checkpointing(trainer))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    resumers = [cb for cb in trainer.callbacks if isinstance(cb, ExactResume)]
    assert len(resumers) == 1 and trainer.callbacks.index(resumers[0]) < trainer.callbacks.index(ckpt)

    class MyIO(TorchCheckpointIO):
        pass

    custom = L.Trainer(accelerator="cpu", devices=1, logger=False, plugins=[MyIO()], enable_progress_bar=False)
    install_checkpointing(custom, exact_resume=False)
    assert type(custom.strategy.checkpoint_io) is MyIO  # a user's own IO is left alone
    assert not any(isinstance(cb, ExactResume) for cb in custom.callbacks)



def test_last_ckpt_holds_the_final_weights_when_the_step_interval_misses_the_end(tmp_path, tiny_model_dir):
    """Lightning 2.6 writes last.ckpt at train end only if it never wrote one: saving
    every 4 steps, a 6-step run left it at step 4, older than the model it had just
    trained (configs/tiny.yaml: step 100 of 102). Installed, it is at step 6."""
    spec = f"tiny:{tiny_model_dir}"
    module = UnlearnModule(model=spec, optimizer=partial(torch.optim.AdamW, lr=1e-2))
    data = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=6, callbacks=[ckpt], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    install_checkpointing(install_checkpointing(trainer))
    assert sum(isinstance(cb, FinalLastCheckpoint) for cb in trainer.callbacks) == 1
    trainer.fit(module, datamodule=data)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False, map_location="cpu")
    assert trainer.global_step == 6 and saved["global_step"] == 6
    for name, w in module.state_dict().items():
        assert torch.equal(saved["state_dict"][name], w), name
    assert sorted(f.name for f in tmp_path.iterdir()) == ["last.ckpt"]  # replaced, not versioned


def test_fast_dev_run_saves_no_last_ckpt_and_leaves_a_reused_callback_as_it_was(tmp_path, tiny_model_dir):
    """Lightning 2.6's ModelCheckpoint.on_train_end saved last.ckpt under fast_dev_run
    (into ./checkpoints unless a dirpath is given). The mark that stops it must not
    outlive the run: the same callback in a real fit then linked last.ckpt to it."""
    spec = f"tiny:{tiny_model_dir}"
    data = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4)
    ckpt = AtomicModelCheckpoint(dirpath=tmp_path, save_last="link", every_n_train_steps=1000)

    def trainer(**kw):
        t = L.Trainer(accelerator="cpu", devices=1, callbacks=[ckpt], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, **kw)
        return install_checkpointing(t)

    trainer(fast_dev_run=1).fit(UnlearnModule(model=spec), datamodule=data)
    assert list(tmp_path.iterdir()) == [] and not ckpt._last_checkpoint_saved
    trainer(max_steps=3).fit(UnlearnModule(model=spec), datamodule=data)
    assert torch.load(tmp_path / "last.ckpt", weights_only=False, map_location="cpu")["global_step"] == 3


def test_cli_trainer_is_wired_for_atomic_saves_and_exact_resume(tmp_path, monkeypatch):
    from cfg_unlearn.cli import cli_main

    monkeypatch.setattr(sys, "argv", ["train.py"])
    cli = cli_main(["--config", str(ROOT / "configs/tiny.yaml"), "--trainer.default_root_dir", str(tmp_path)],
                   run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(cb, ExactResume) for cb in cli.trainer.callbacks)


# ====================================================================== exact resume: the real module


class _Kill(Exception):
    """The run dies here."""


class _KillAt(Callback):
    """Dies before the optimizer step ``step`` (0-based), i.e. after ``step`` steps."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise _Kill(f"killed before step {self.step}")


class _StopAt(Callback):
    """Asks the trainer to stop after ``step`` steps, as EarlyStopping and the max_time
    Timer do (``trainer.should_stop``): the epoch loop ends after that batch."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


class _Record(Callback):
    """(epoch, batch_idx, pair ids) of every training batch."""

    def __init__(self):
        self.seen: list[tuple[int, int, tuple[str, ...]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.current_epoch, batch_idx, tuple(batch["id"])))


EPOCHS = 3  # 22 training pairs, batches of 4: 6 steps an epoch, 18 in all


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls: a second intra-op thread only adds contention on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _fit(spec: str, root: Path, *, kill_at: int | None = None, ckpt_path: str | None = None, exact: bool = True,
         every_step: bool | None = True, stop_at: int | None = None, accumulate: int = 1, kill_batch: int | None = None,
         extra: list | None = None, batch_size: int = 4, max_steps: int = -1):
    """One fit of the tiny model; returns (module, trainer, recorder). Killed runs return
    after the kill; every run (killed or resumed) writes its checkpoints into ``root``.
    ``every_step``: last.ckpt after every step (True), at every epoch end (False), or only
    at the end of the fit (None)."""
    L.seed_everything(0, verbose=False)
    module = UnlearnModule(model=spec, cond_dropout=0.5, optimizer=partial(torch.optim.AdamW, lr=1e-3),
                           lr_scheduler=partial(WarmupCosine, warmup_steps=3, min_ratio=0.1))
    data = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=batch_size,
                          max_length=128)
    record = _Record()
    # every step: save_top_k=0 and a step interval write last.ckpt after each step. Per
    # epoch: save_top_k=1 (Lightning 2.6 writes last.ckpt at an epoch end only when it
    # wrote a top-k checkpoint there; save_top_k=0 alone writes it at the end of fit only)
    callbacks = [record, ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0, every_n_train_steps=1)
                 if every_step else ModelCheckpoint(dirpath=root, save_last=True, save_top_k=1)
                 if every_step is False else ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)]
    if kill_at is not None:
        callbacks.append(_KillAt(kill_at))
    if kill_batch is not None:
        callbacks.append(_KillAtBatch(kill_batch))
    if stop_at is not None:
        callbacks.append(_StopAt(stop_at))
    callbacks += extra or []
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=EPOCHS, callbacks=callbacks, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                        num_sanity_val_steps=0, accumulate_grad_batches=accumulate, max_steps=max_steps)
    install_checkpointing(trainer, exact_resume=exact)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except _Kill:
        assert kill_at is not None or kill_batch is not None
    return module, trainer, record


@pytest.fixture(scope="module")
def spec(tiny_model_dir):
    return f"tiny:{tiny_model_dir}"


@pytest.fixture(scope="module")
def uninterrupted(spec, tmp_path_factory):
    module, trainer, record = _fit(spec, tmp_path_factory.mktemp("full"))
    assert trainer.global_step == 6 * EPOCHS and trainer.num_training_batches == 6
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    return {k: v.clone() for k, v in module.state_dict().items()}, record.seen, lr


def _assert_same_run(uninterrupted, resumed_module, resumed_trainer, resumed_record, resumed_from_step):
    weights, seen, lr = uninterrupted
    assert resumed_trainer.global_step == 6 * EPOCHS
    # the resumed run trained on exactly the batches the uninterrupted run had left, in order
    assert resumed_record.seen == seen[resumed_from_step:]
    state = resumed_module.state_dict()
    assert state.keys() == weights.keys()
    differ = [k for k in weights if not torch.equal(state[k], weights[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    assert resumed_trainer.optimizers[0].param_groups[0]["lr"] == lr


@pytest.mark.parametrize("kill_at", [3, 9], ids=["epoch0-mid", "epoch1-mid"])
def test_mid_epoch_resume_ends_with_the_weights_of_an_uninterrupted_run(spec, uninterrupted, tmp_path, kill_at,
                                                                        recwarn):
    _, killed, _ = _fit(spec, tmp_path, kill_at=kill_at)
    assert killed.global_step == kill_at
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)  # loadable the way resume loads it
    assert ckpt["global_step"] == kill_at and ckpt["epoch"] == kill_at // 6
    module, trainer, record = _fit(spec, tmp_path, ckpt_path=str(tmp_path / "last.ckpt"))
    _assert_same_run(uninterrupted, module, trainer, record, kill_at)
    # Lightning's "your dataloader is not resumable" warning is not true here, so not shown
    assert not [w for w in recwarn if "dataloader is not resumable" in str(w.message)]


class _KillAtBatch(Callback):
    """Dies before training batch ``n`` (0-based, counted over epochs; 6 an epoch)."""

    def __init__(self, n: int):
        self.n = n

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch * 6 + batch_idx == self.n:
            raise _Kill(f"killed before batch {self.n}")


@pytest.fixture(scope="module")
def uninterrupted_accumulating(spec, tmp_path_factory):
    module, trainer, record = _fit(spec, tmp_path_factory.mktemp("full-acc"), accumulate=2)
    assert trainer.global_step == 3 * EPOCHS and len(record.seen) == 6 * EPOCHS
    return module.state_dict(), record.seen, trainer.optimizers[0].param_groups[0]["lr"]


@pytest.mark.parametrize("kill_batch", [4, 5, 9], ids=["epoch0-window-start", "epoch0-mid-window",
                                                       "epoch1-mid-window"])
def test_mid_epoch_resume_with_gradient_accumulation(spec, uninterrupted_accumulating, tmp_path, kill_batch):
    """Two batches per optimizer step (3 steps an epoch). Killed at the start of a window
    or half-way through one (its accumulated gradient dies with the process), the fit
    resumes from the checkpoint of the last optimizer step, replays that window whole,
    and ends with the uninterrupted run's weights."""
    weights, seen, lr = uninterrupted_accumulating
    _, killed, _ = _fit(spec, tmp_path, kill_batch=kill_batch, accumulate=2)
    step = kill_batch // 2
    assert killed.global_step == step
    module, trainer, record = _fit(spec, tmp_path, ckpt_path=str(tmp_path / "last.ckpt"), accumulate=2)
    assert trainer.global_step == 3 * EPOCHS
    assert record.seen == seen[2 * step:]  # the batches left, the killed window's first included
    state = module.state_dict()
    differ = [k for k in weights if not torch.equal(state[k], weights[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    assert trainer.optimizers[0].param_groups[0]["lr"] == lr


class _SaveAfterBatch(Callback):
    """Writes ``path`` at the end of training batch ``n`` (0-based, counted over epochs),
    as a validation's ModelCheckpoint does between the batches of an accumulation window."""

    def __init__(self, n: int, path: Path):
        self.n, self.path = n, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch * 6 + batch_idx == self.n:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("batch", [4, 10], ids=["epoch0", "epoch1"])
def test_a_checkpoint_written_mid_accumulation_replays_its_window(spec, uninterrupted_accumulating, tmp_path, batch):
    """A checkpoint written after the first batch of a two-batch window (a validation
    there) resumed after that batch, without its gradient: the next batch made the step
    alone, and the weights differed from an uninterrupted run's (max 2.4e-3, no warning).
    It now holds the loop and RNG state of the window's start, and the window is replayed."""
    weights, seen, lr = uninterrupted_accumulating
    mid = tmp_path / "mid.ckpt"
    _fit(spec, tmp_path, kill_batch=batch + 1, accumulate=2, extra=[_SaveAfterBatch(batch, mid)])
    assert torch.load(mid, weights_only=True)["global_step"] == batch // 2
    module, trainer, record = _fit(spec, tmp_path / "resumed", ckpt_path=str(mid), accumulate=2)
    assert record.seen == seen[batch:]  # the window's first batch again, then the rest
    state = module.state_dict()
    differ = [k for k in weights if not torch.equal(state[k], weights[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    assert trainer.optimizers[0].param_groups[0]["lr"] == lr


def test_a_resumed_runs_own_mid_window_checkpoint_before_its_first_step_replays_the_window(
        spec, uninterrupted_accumulating, tmp_path, recwarn):
    """Resumed from a mid-window checkpoint, the run replays the window; a second
    mid-window checkpoint written before that window's step (a validation at the same
    batch again) found no step end in this process, said "not an exact resume" and held
    the state after the batch without its gradient: resuming from it ended 5e-3 off.
    The resumed checkpoint's own position is now that step end."""
    weights, seen, lr = uninterrupted_accumulating
    mid, mid2 = tmp_path / "mid.ckpt", tmp_path / "mid2.ckpt"
    _fit(spec, tmp_path / "a", kill_batch=5, accumulate=2, extra=[_SaveAfterBatch(4, mid)])
    _fit(spec, tmp_path / "b", ckpt_path=str(mid), kill_batch=5, accumulate=2, extra=[_SaveAfterBatch(4, mid2)])
    assert not [w for w in recwarn if "not an exact resume" in str(w.message)]
    module, trainer, record = _fit(spec, tmp_path / "c", ckpt_path=str(mid2), accumulate=2)
    assert record.seen == seen[4:]
    state = module.state_dict()
    differ = [k for k in weights if not torch.equal(state[k], weights[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    assert trainer.optimizers[0].param_groups[0]["lr"] == lr


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.parametrize("move", [False, True], ids=["relative-then-absolute", "run-folder-moved"])
def test_resuming_a_last_ckpt_under_another_spelling_of_its_folder_overwrites_it(spec, tmp_path, monkeypatch, move):
    """The logger's save_dir given relative at first (as configs/tiny.yaml does) and
    absolute on resume, or the run folder moved: Lightning restores last_model_path only
    for the same checkpoint-folder string, so the resumed run wrote last-v1.ckpt and
    left last.ckpt at the kill's step, which validate and export then read silently."""
    from lightning.pytorch.loggers import CSVLogger

    monkeypatch.chdir(tmp_path)

    def fit(save_dir, ckpt_path=None, kill_at=None):
        L.seed_everything(0, verbose=False)
        module = UnlearnModule(model=spec, optimizer=partial(torch.optim.AdamW, lr=1e-3))
        data = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4, max_length=128)
        callbacks = [ModelCheckpoint(save_last=True, save_top_k=0, every_n_train_steps=1)]
        callbacks += [_KillAt(kill_at)] if kill_at is not None else []
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, callbacks=callbacks, enable_progress_bar=False,
                            logger=CSVLogger(save_dir, name="tiny", version=0), enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0)
        install_checkpointing(trainer)
        try:
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        except _Kill:
            pass
        return trainer

    fit("runs", kill_at=3)
    if move:
        os.rename(tmp_path / "runs", tmp_path / "moved")
    ckpts = tmp_path / ("moved" if move else "runs") / "tiny" / "version_0" / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 3
    trainer = fit(str(tmp_path / ("moved" if move else "runs")), ckpt_path=str(ckpts / "last.ckpt"))
    assert trainer.global_step == 6
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 6


def test_a_sharded_last_ckpt_folder_under_another_spelling_is_claimed_too(tmp_path, monkeypatch):
    """FSDP's sharded last.ckpt is a folder; the claim above checked for a file, so a
    moved sharded run still wrote last-v1.ckpt beside the stale last.ckpt."""
    from types import SimpleNamespace

    from cfg_unlearn.checkpointing import FinalLastCheckpoint

    monkeypatch.chdir(tmp_path)
    claimed = {}
    for kind in ("file", "folder"):
        ckpts = tmp_path / kind / "checkpoints"
        ckpts.mkdir(parents=True)
        last = ckpts / "last.ckpt"
        if kind == "file":
            last.write_bytes(b"")
        else:
            last.mkdir()
            (last / ".metadata").write_bytes(b"")
        cb = ModelCheckpoint(dirpath=ckpts, save_last=True, save_top_k=0)
        trainer = SimpleNamespace(ckpt_path=os.path.relpath(last), checkpoint_callbacks=[cb], callback_metrics={},
                                  current_epoch=0, global_step=0,
                                  strategy=SimpleNamespace(broadcast=lambda x, src=0: x))
        FinalLastCheckpoint().on_train_start(trainer, None)
        claimed[kind] = cb.last_model_path
    assert claimed == {"file": str(tmp_path / "file" / "checkpoints" / "last.ckpt"),
                       "folder": str(tmp_path / "folder" / "checkpoints" / "last.ckpt")}


def test_a_mid_epoch_resume_with_another_batch_size_says_what_it_does(spec, tmp_path):
    """It said only "data position not restored", while the epoch restarted its data
    from the top and ended after the batches counted as left."""
    _fit(spec, tmp_path, kill_at=3)
    with pytest.warns(UserWarning, match=r"the train loader has 11 batches, the checkpoint's had 6 .*epoch 0 cannot "
                                         r"continue where it stopped \(3 batches in\).*some pairs of this epoch train "
                                         r"twice and others not at all"):
        _fit(spec, tmp_path / "resumed", ckpt_path=str(tmp_path / "last.ckpt"), batch_size=2)


def test_a_checkpoint_written_in_an_epochs_first_window_says_it_is_not_exact(spec, tmp_path):
    mid = tmp_path / "mid.ckpt"
    with pytest.warns(UserWarning, match="first accumulation window .* not an exact resume"):
        _fit(spec, tmp_path, kill_batch=7, accumulate=2, extra=[_SaveAfterBatch(6, mid)])



@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_a_fit_stopped_mid_epoch_resumes_where_it_stopped(spec, uninterrupted, tmp_path):
    """EarlyStopping or max_time (``should_stop``) ends the fit mid-epoch, and Lightning
    counts that epoch as processed and completed before last.ckpt is written at train
    end: resuming used to start the *next* epoch's order at the same batch index,
    skipping the rest of this one. Stopped after step 3 (epoch 0, Lightning's own
    train-end save: no last.ckpt yet), resumed and stopped after step 9 (epoch 1,
    FinalLastCheckpoint's save: last.ckpt is from the epoch end at step 6), then resumed
    to the end: the weights of an uninterrupted run. (A max_steps stop resumes at the
    right batch too, but is a different run: the schedule was fitted to its max_steps.)"""
    for stop_at, ckpt in ((3, None), (9, str(tmp_path / "last.ckpt"))):
        _, stopped, _ = _fit(spec, tmp_path, every_step=False, stop_at=stop_at, ckpt_path=ckpt)
        assert stopped.global_step == stop_at
        saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
        assert saved["global_step"] == stop_at and saved["epoch"] == stop_at // 6
        assert saved["callbacks"]["ExactResume"]["epoch"] == stop_at // 6
    module, trainer, record = _fit(spec, tmp_path, every_step=False, ckpt_path=str(tmp_path / "last.ckpt"))
    _assert_same_run(uninterrupted, module, trainer, record, 9)


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize("stop", ["should_stop", "max_steps"])
def test_a_fit_stopped_at_an_epochs_last_batch_resumes_with_the_next_epoch(spec, uninterrupted, tmp_path, stop):
    """Stopped after step 12, the last batch of epoch 1 (by should_stop, or by max_steps
    12), last.ckpt written at the fit's end only: it holds a completed epoch with its
    batch counter still at the end. Resumed with max_steps set (18), Lightning ran epoch
    2 with that counter: no batch trained, and last.ckpt was overwritten as epoch 3 (an
    audit: max_steps 4, then 6, on 2 batches an epoch trained nothing, the third epoch
    lost). (The max_steps-12 run is another run: its schedule was fitted to 12 steps;
    its resumed steps must still be the third epoch's batches.)"""
    _, stopped, _ = _fit(spec, tmp_path, every_step=None, **({"stop_at": 12} if stop == "should_stop" else
                                                             {"max_steps": 12}))
    assert stopped.global_step == 12
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 12  # the train-end save
    module, trainer, record = _fit(spec, tmp_path, every_step=None, ckpt_path=str(tmp_path / "last.ckpt"),
                                   max_steps=6 * EPOCHS)
    if stop == "should_stop":
        _assert_same_run(uninterrupted, module, trainer, record, 12)
    else:
        assert trainer.global_step == 6 * EPOCHS
        assert record.seen == uninterrupted[1][12:]  # the third epoch's batches, in its order


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize("exact", [True, False], ids=["ExactResume", "plain-Lightning"])
def test_end_of_epoch_resume_ends_with_the_weights_of_an_uninterrupted_run(spec, uninterrupted, tmp_path, exact):
    """Saved by ModelCheckpoint's end-of-epoch path, killed before the third epoch. With
    the data module's (seed, epoch) permutation Lightning alone resumes this exactly;
    ExactResume must not change that."""
    _fit(spec, tmp_path, kill_at=12, exact=exact, every_step=False)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 12
    module, trainer, record = _fit(spec, tmp_path, ckpt_path=str(tmp_path / "last.ckpt"), exact=exact,
                                   every_step=False)
    _assert_same_run(uninterrupted, module, trainer, record, 12)


def test_killed_during_a_checkpoint_save_resumes_from_the_previous_one(spec, uninterrupted, tmp_path, monkeypatch):
    """The run dies inside the save of step 10: ``last.ckpt`` is still step 9's, whole,
    and ``ckpt_path="last"`` (which a stray temp file must not fool) resumes exactly."""
    real_save, calls, before = torch.save, [], {}

    def dying_save(obj, f, *args, **kwargs):
        calls.append(obj.get("global_step"))
        if obj.get("global_step") == 10:
            before["bytes"] = (tmp_path / "last.ckpt").read_bytes()
            f.write(b"PK\x03\x04" + b"\0" * 50_000)
            raise _Died()
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(_Died):
        _fit(spec, tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    assert calls[-1] == 10
    assert (tmp_path / "last.ckpt").read_bytes() == before["bytes"]
    assert _temps(tmp_path) == []
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 9
    (tmp_path / ".last.ckpt.stray.tmp").write_bytes(b"garbage")  # as a SIGKILL would leave it
    module, trainer, record = _fit(spec, tmp_path, ckpt_path="last")
    _assert_same_run(uninterrupted, module, trainer, record, 9)


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_without_exact_resume_lightning_restarts_the_epochs_data_from_the_top(spec, uninterrupted, tmp_path):
    """Why ExactResume exists (Lightning 2.6, plain DataLoader): killed after batch 2 of
    epoch 1, the resumed run counts on from batch_idx 3 but takes its batches from the
    top of epoch 1's permutation: batches 0-2 are trained on twice, 3-5 never. If this
    starts failing, Lightning has learnt to resume such loaders and the callback may be
    redundant."""
    _fit(spec, tmp_path, kill_at=9, exact=False)
    module, trainer, record = _fit(spec, tmp_path, ckpt_path=str(tmp_path / "last.ckpt"), exact=False)
    _, seen, _ = uninterrupted
    assert [s[:2] for s in record.seen] == [s[:2] for s in seen[9:]]  # the same (epoch, batch_idx) ...
    assert [s[2] for s in record.seen[:3]] == [s[2] for s in seen[6:9]]  # ... but epoch 1's batches 0-2 again
    assert not all(torch.equal(module.state_dict()[k], v) for k, v in uninterrupted[0].items())


# ====================================================================== exact resume: generators, workers, dropout


class _DropoutNet(L.LightningModule):
    """A model whose steps use the global RNG (dropout) and a loader shuffled by a
    ``torch.Generator`` (the common ``DataLoader(shuffle=True, generator=g)``)."""

    def __init__(self, num_workers: int, generator: bool = True):
        super().__init__()
        self.num_workers, self.generator = num_workers, generator
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        x, y, i = batch
        self.seen.append(i.tolist())
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        x = torch.linspace(-1, 1, 22 * 8).view(22, 8)
        ds = TensorDataset(x, x.sum(1, keepdim=True).sin(), torch.arange(22))
        if not self.generator:  # as the data module's: its iterator's base seed comes from the global RNG
            return DataLoader(ds, batch_size=4, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        g = torch.Generator().manual_seed(1234)
        return DataLoader(ds, batch_size=4, shuffle=True, generator=g, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)


def _fit_dropout(root: Path, num_workers: int, kill_at: int | None = None, ckpt_path: str | None = None,
                 generator: bool = True):
    L.seed_everything(0, verbose=False)
    model = _DropoutNet(num_workers, generator)
    callbacks = [ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0, every_n_train_steps=1)]
    if kill_at is not None:
        callbacks.append(_KillAt(kill_at))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=3, callbacks=callbacks, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    install_checkpointing(trainer)
    try:
        trainer.fit(model, ckpt_path=ckpt_path)
    except _Kill:
        pass
    return model


@pytest.mark.parametrize("num_workers", [0, 2], ids=["in-process", "2-persistent-workers"])
@pytest.mark.parametrize("generator", [True, False], ids=["generator-shuffled", "no-generator"])
def test_generator_shuffled_loader_and_dropout_resume_exactly(tmp_path, num_workers, generator):
    """A user review: a LoRA run (dropout 0.01) resumed from an end-of-epoch checkpoint
    ended 0.006 off the uninterrupted run: the data module's loader has no generator, so
    its new iterator drew its base seed from the global RNG before that was restored."""
    full = _fit_dropout(tmp_path / "full", num_workers, generator=generator)
    for kill_at in (9, 12):  # mid-epoch 1; end of epoch 1 (saved after its last batch)
        root = tmp_path / f"kill{kill_at}"
        _fit_dropout(root, num_workers, kill_at=kill_at, generator=generator)
        resumed = _fit_dropout(root, num_workers, ckpt_path=str(root / "last.ckpt"), generator=generator)
        assert resumed.seen == full.seen[kill_at:], kill_at
        for k, v in full.state_dict().items():
            assert torch.equal(resumed.state_dict()[k], v), (kill_at, k)


@pytest.mark.parametrize("new_total", [10, 20])
def test_warmup_cosine_resumes_on_this_runs_budget(new_total):
    """A checkpoint restores the step count and the optimizer's lr; the total is this
    run's: the same budget resumes the same curve exactly, a larger one (a max_steps stop
    resumed with more steps) continues on the new curve instead of sitting at the floor."""
    def make(total):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = WarmupCosine(opt, warmup_steps=2, min_ratio=0.1)
        sched.set_total_steps(total)
        return opt, sched

    opt, sched = make(10)
    for _ in range(8):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 6 / 8)))
    opt2, sched2 = make(new_total)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == 8 and sched2.total_steps == new_total
    expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 6 / (new_total - 2)))
    assert opt2.param_groups[0]["lr"] == pytest.approx(expected) and sched2.get_last_lr() == [opt2.param_groups[0]["lr"]]
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / (new_total - 2))))
    if new_total == 10:
        assert opt2.param_groups[0]["lr"] == sched._factor(9)  # bit-identical to the uninterrupted curve


def test_warmup_cosine_says_when_the_checkpoints_curve_overrides_the_configured_one(caplog):
    """warmup_steps/min_ratio are resumed state like the optimizer's: a resumed run that
    configured others keeps the checkpoint's, and is told (API users get no CLI warning)."""
    def make(warmup, min_ratio):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return WarmupCosine(opt, warmup_steps=warmup, min_ratio=min_ratio, total_steps=10)

    saved = make(2, 0.1).state_dict()
    with caplog.at_level("INFO"):
        same = make(2, 0.1)
        same.load_state_dict(saved)
    assert "resumed with the checkpoint's" not in caplog.text
    with caplog.at_level("INFO"):
        other = make(5, 0.3)
        other.load_state_dict(saved)
    assert (other.warmup_steps, other.min_ratio) == (2, 0.1)
    assert ("WarmupCosine: resumed with the checkpoint's warmup_steps=2 (configured 5), "
            "min_ratio=0.1 (configured 0.3)") in caplog.text
