"""Command line: ``python train.py fit|validate --config ...`` (LightningCLI), also run
as ``cfg-unlearn fit|validate`` by the console script (:mod:`cfg_unlearn.console`)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import shlex
import signal
import sys
import warnings

from typing import Any, Collection, Optional

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cfg_unlearn.callbacks import (
    GuidanceEval,
    LoggerSaveConfigCallback,
    claim_run_version,
    planned_run_dir,
    previous_run_files,
    refuse_taken_run_dir,
    resumes_run,
)
from cfg_unlearn.checkpointing import install_checkpointing
# console_main: the entry point that launchers of installs before console.py import from here
from cfg_unlearn.console import (  # noqa: F401
    NOT_STARTED,
    TRAINER_SUBCOMMANDS,
    console_main,
    lightning_interrupted,
    quiet_third_party_warnings,
)
from cfg_unlearn.data.datamodule import PairDataModule
from cfg_unlearn.module import UnlearnModule
from cfg_unlearn.utils import (NOT_TORCH_SAVE, ConfigError, TrainingDiverged, checkpoints_in, is_torch_save_file,
                               nearest_existing, short_usage)


class UnlearnCLI(LightningCLI):
    """LightningCLI with the model's name linked into the data module (one model path:
    the tokenizer always matches the model), optimizers injected, not auto-built, and a
    top-level ``eval`` section for :class:`~cfg_unlearn.callbacks.GuidanceEval`, so that
    ``--eval.scales '[1, 2, 3]'`` rescores a checkpoint without editing a callback list.
    ``eval: null`` (the default when a config has no ``eval``) turns it off."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in TRAINER_SUBCOMMANDS}

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model", "data.tokenizer")
        # Optional[...] rather than add_lightning_class_args: it can be switched off
        parser.add_argument(
            "--eval", type=Optional[GuidanceEval], default=None,
            help="GuidanceEval: leak rate / accuracy per guidance scale (null: off)",
        )

    def parse_arguments(self, parser, args) -> None:
        # jsonargparse names a bad key of a config file without the file or its line
        explain_parse_errors(parser, sys.argv[1:] if args is None else args if isinstance(args, list) else [])
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        seed = (self.config[sub] if sub else self.config).get("seed_everything")
        # Lightning checks the range only when it seeds, with a traceback through the CLI
        if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed < 2**32:
            raise ConfigError(f"seed_everything must be in 0 .. {2**32 - 1} (numpy's seed range), got {seed}")

    def _parse_ckpt_path(self) -> None:
        """LightningCLI (2.6) replaces the model's arguments with the checkpoint's
        hyperparameters, so ``validate --ckpt_path C --model.beta 5`` would score with the
        checkpoint's beta without a word (Lightning-AI/pytorch-lightning#21455). Keep
        that (the weights were trained with them), but name every value the config and
        command line gave that the checkpoint replaced: a value equal to the default may
        have been given on purpose (``--model.beta 0.1`` against a checkpoint trained at
        0.5), and which ones were typed cannot be told from the parsed config."""
        sub = self.config.get("subcommand")
        if sub:  # before Lightning's torch.load of it (every rank sees the same file)
            check_ckpt_path(self.config[sub].get("ckpt_path"))
        before = _flat(self.config[sub].get("model")) if sub else {}
        super()._parse_ckpt_path()
        if not before:
            return
        after = _flat(self.config[sub].get("model"))
        if after.get("trust_remote_code") and not before.get("trust_remote_code"):
            # a checkpoint is data: it may not turn on running its model folder's code
            from cfg_unlearn.checkpointing import remote_code_refusal

            raise ConfigError(f"--ckpt_path {self.config[sub].get('ckpt_path')}: the checkpoint "
                              + remote_code_refusal(after.get("model"), "add --model.trust_remote_code true"))
        lost = _replaced(before, after)
        if lost:
            rank_zero_warn(f"--ckpt_path: the checkpoint's hyperparameters replace {', '.join(lost)}; "
                           "the model is rebuilt as it was trained")
        ckpt = _checkpoint_file(self.config[sub].get("ckpt_path"))
        _locate_trained_model(self.config[sub], ckpt)
        other = _other_instructions(self.config[sub].get("data"), ckpt)
        if other:
            rank_zero_warn(f"--ckpt_path: the model was trained with {', '.join(other)}; this run conditions on "
                           "the configured instruction (give the checkpoint's with --data.system_prompt / "
                           "--data.uncond_system_prompt to score it as trained)")
        if sub == "fit":
            moved = _other_data(self.config[sub].get("data"), ckpt)
            if moved:
                rank_zero_warn(f"--ckpt_path: this fit resumes on other data than the checkpoint's run: "
                               f"{', '.join(moved)}. The epoch's position, the dropout draws and a precomputed "
                               "reference refer to the pairs of that run; resume with its data settings to continue "
                               "it, or start a new fit from its weights (cfg-unlearn export, then --model.model)")
            ignored = _restored_over(self.config[sub].get("model"), ckpt)
            if ignored:
                rank_zero_warn("--ckpt_path: a resumed fit restores the optimizer and learning-rate schedule from "
                               "the checkpoint, so " + ", ".join(f"model.{key}.init_args.{name}={value!r} "
                                                                 f"(checkpoint: {was!r})"
                                                                 for key, name, value, was in ignored)
                               + " take no effect; the run's config.yaml records the checkpoint's values")
                for key, name, _, was in ignored:  # what the run trains with, not what was typed
                    self.config[sub]["model"][key]["init_args"][name] = was

    def _run_subcommand(self, subcommand: str) -> None:
        """Check the run directory before the trainer opens its logger, and remove the
        directory a failed run created if it holds nothing but the config this run saved."""
        trainer = self.trainer
        saver = next((c for c in trainer.callbacks if isinstance(c, LoggerSaveConfigCallback)), None)
        env = getattr(trainer.strategy, "cluster_environment", None)  # none for a single device
        # processes started by SLURM/torchrun run this each on their own: a check that
        # failed on one rank only would leave the others waiting for it forever, so they
        # keep only the setup-time check, which every rank makes together
        alone = not (env is not None and env.creates_processes_externally and env.world_size() > 1)
        writes_run = saver is not None and not trainer.fast_dev_run
        # one process: its version folder claimed before anything reads the logger's version
        # (under DDP each rank's logger would list the folders after rank 0 claimed one)
        claimed_below = claim_run_version(trainer) if writes_run and trainer.world_size == 1 else None
        path = planned_run_dir(trainer) if writes_run else None
        existed = path is None or (os.path.exists(path) and claimed_below is None)
        # the folders a failed run leaves empty go too: the version's, and its logger's
        # `name` folder (and save_dir) where this run created them
        first_existing = claimed_below if claimed_below is not None else nearest_existing(path)
        ckpt = self.config_init[subcommand].get("ckpt_path")
        # a fit resumes into a taken run folder only when the checkpoint is that run's own
        resumes_here = subcommand == "fit" and resumes_run(ckpt, path, trainer)
        try:  # (a refusal too removes a version folder claimed above)
            if alone:
                check_ckpt_path(ckpt, trainer.strategy)
                if ckpt == "last" and path is not None:
                    check_last_checkpoint(trainer, subcommand, path)
                if path is not None and not resumes_here and trainer.is_global_zero:
                    refuse_taken_run_dir(path, previous_run_files(path), subcommand)
            if resumes_here and trainer.is_global_zero:
                keep_csv_metrics(trainer)
            # what train_main's stop message reads the checkpoints of
            _RUNNING.update(trainer=trainer, ckpt_path=ckpt)
            super()._run_subcommand(subcommand)
        except BaseException:
            if not existed and trainer.is_global_zero:
                remove_if_only_config(path, ours=saver.already_saved)
                remove_empty_parents(path, first_existing)
            raise

    def instantiate_trainer(self, **kwargs):
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as e:
            # the Trainer's own refusals (no GPU for `accelerator: gpu`, `strategy: fsdp` on
            # the CPU, `devices: 0`, an unknown strategy name) are setting errors, not crashes
            raise ConfigError(f"trainer: {e}") from e
        install_checkpointing(trainer)  # atomic checkpoint writes + exact mid-epoch resume
        warn_uploaded_checkpoints(trainer)
        drop_unset_wandb_anonymous(trainer)
        evaluator = self._get(self.config_init, "eval")
        if evaluator is not None:
            # first, so its metrics are logged before checkpoint callbacks read them
            trainer.callbacks.insert(0, evaluator)
        return trainer


def warn_uploaded_checkpoints(trainer: Any) -> None:
    """A WandbLogger with ``log_model`` on uploads the run's checkpoints as W&B
    artifacts: the model before or during unlearning, whose weights can reproduce the
    PII being removed. An opt-in (the preset keeps it off), so a warning, as
    ``redact_samples: false`` gets."""
    for lg in trainer.loggers:
        if type(lg).__name__ == "WandbLogger" and getattr(lg, "_log_model", False):
            rank_zero_warn(f"trainer.logger: WandbLogger(log_model={lg._log_model!r}) uploads the checkpoints as W&B "
                           "artifacts; their weights are the model before or during unlearning and can reproduce "
                           "the PII being removed (set log_model: false unless that W&B project may hold the data)")


def drop_unset_wandb_anonymous(trainer: Any) -> None:
    """Lightning's WandbLogger passes ``anonymous=None`` to ``wandb.init`` when it was
    not set, and W&B (0.31) warns that the setting has no effect whenever it is
    passed at all: "The anonymous setting has no effect" on every run. Left out unless
    the user set it, so that line says something when it appears. Before the run starts
    (the logger creates it on first use)."""
    for lg in trainer.loggers:
        init = getattr(lg, "_wandb_init", None) if type(lg).__name__ == "WandbLogger" else None
        if isinstance(init, dict) and "anonymous" in init and init["anonymous"] is None:
            del init["anonymous"]


def lightning_resolves(ckpt: Any) -> bool:
    """Whether ``--ckpt_path`` is a name Lightning resolves to a file itself (``last``,
    ``best``, ``hpc``, ``registry[:...]``), not a path."""
    return str(ckpt) in ("last", "best", "hpc") or str(ckpt).startswith("registry")


def check_ckpt_path(ckpt: Any, strategy: Any = None) -> None:
    """A local ``--ckpt_path`` that does not exist is one line, before the trainer runs
    (Lightning's own error is a traceback). Names Lightning resolves itself (``last``,
    ``best``, ``hpc``, ``registry...``) and remote URLs are left to it. A directory is a
    checkpoint only when sharded, and then only for a ``strategy`` that loads shards
    (Lightning's load of a directory is a traceback after the model has loaded). A file
    must be one ``torch.save`` wrote, whole."""
    if not ckpt or lightning_resolves(ckpt) or "://" in str(ckpt):
        return
    path = os.path.expanduser(str(ckpt))  # fsspec, which loads it, expands "~"
    if not os.path.exists(path):
        raise ConfigError(f"--ckpt_path {ckpt}: no such checkpoint")
    if os.path.isdir(path):
        from cfg_unlearn.export import DCP_METADATA, LIGHTNING_SHARDED_META

        # torch.distributed (FSDP, model parallel) or DeepSpeed ("latest" and checkpoint/) shards
        sharded = (any(os.path.isfile(os.path.join(path, n)) for n in (DCP_METADATA, LIGHTNING_SHARDED_META, "latest"))
                   or os.path.isdir(os.path.join(path, "checkpoint")))
        if not sharded:
            inside = checkpoints_in(path)
            raise ConfigError(f"--ckpt_path {ckpt} is a directory, not a checkpoint" + (
                f" (give one of its checkpoints: {', '.join(inside)})" if inside else ""))
        if strategy is not None and not _loads_sharded(strategy):
            raise ConfigError(f"--ckpt_path {ckpt} is a sharded checkpoint: load it with the sharding strategy "
                              f"it was saved with (this run uses {type(strategy).__name__}), or make one file of an "
                              "FSDP one with `cfg-unlearn export`")
    elif not is_torch_save_file(path):
        raise ConfigError(f"--ckpt_path {ckpt}: {NOT_TORCH_SAVE}")


def _loads_sharded(strategy) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy))


def check_last_checkpoint(trainer, subcommand: str, run_path: str) -> None:
    """``--ckpt_path last`` looks for a last checkpoint in this run's checkpoint folders
    only, and every run gets a new version folder: ``fit --ckpt_path last`` meant to
    resume yesterday's run trained from scratch, and ``validate --ckpt_path last`` scored
    the untrained model, each after one warning whose hint (``save_last=True``) was
    already set. Refuse both when another version folder of the same logger holds a last
    checkpoint, naming it; a first ``fit`` with nothing anywhere still starts fresh (the
    set-and-forget use Lightning keeps it a warning for). Candidates are found as
    Lightning finds them (``last.ckpt``, ``last-v1.ckpt``; an ``OnExceptionCheckpoint``'s
    file; a link counts only if its target exists)."""
    from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

    checkpoints = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    if any("://" in str(cb.dirpath or run_path) for cb in checkpoints):
        return  # a remote folder: Lightning's to resolve
    found = {cb.ckpt_path for cb in trainer.callbacks if isinstance(cb, OnExceptionCheckpoint)}
    for cb in checkpoints:
        found |= cb._find_last_checkpoints(trainer)
    if any(os.path.exists(p) for p in found if p):
        return
    others = []
    if trainer.loggers:  # version folders beside this run's (without a logger, run_path is no version folder)
        root = os.path.dirname(run_path)
        for version in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            folder = os.path.join(root, version, "checkpoints")
            if os.path.isdir(folder):
                others += [os.path.join(folder, n) for n in os.listdir(folder)
                           if _is_last_checkpoint(n) and os.path.exists(os.path.join(folder, n))]
    if os.path.isfile(os.path.join(run_path, "config.yaml")):
        # a pinned version folder of an earlier run without a last checkpoint: it kept
        # others (save_last off), or stopped before its first
        folders = {str(cb.dirpath) for cb in checkpoints if cb.dirpath} | {os.path.join(run_path, "checkpoints")}
        kept = [os.path.join(f, n) for f in folders if os.path.isdir(f) for n in os.listdir(f) if n.endswith(".ckpt")]
        if kept:
            raise ConfigError(f"--ckpt_path last: {run_path} holds an earlier run's checkpoints but no last one: pass "
                              f"one of them to --ckpt_path (the latest is {max(kept, key=os.path.getmtime)})")
        elsewhere = f" (the latest last checkpoint of another run: {max(others, key=os.path.getmtime)})" if others else ""
        anew = "remove that folder to start the run anew, or " if subcommand == "fit" else ""
        raise ConfigError(f"--ckpt_path last: {run_path} holds an earlier run but no checkpoint of it (it stopped "
                          f"before saving one): {anew}pass a checkpoint's path to --ckpt_path{elsewhere}")
    if others:
        latest = max(others, key=os.path.getmtime)
        raise ConfigError(f"--ckpt_path last: this run's folder {run_path} holds no last checkpoint (each run gets a "
                          f"new version folder); the latest one is {latest}: pass that path to --ckpt_path, or pin "
                          "--trainer.logger.init_args.version to resume a run in its own folder")
    if subcommand != "fit":
        raise ConfigError(f"--ckpt_path last: no last checkpoint for this run ({run_path}); {subcommand} would score "
                          "the untrained model. Pass a checkpoint's path")


def _is_last_checkpoint(name: str) -> bool:
    """Lightning's test for a last checkpoint's file name (``last.ckpt``, ``last-v2.ckpt``)."""
    import re

    from lightning.pytorch.callbacks import ModelCheckpoint

    stem, ext = os.path.splitext(name)
    return ext == ModelCheckpoint.FILE_EXTENSION and bool(re.match(rf"^{ModelCheckpoint.CHECKPOINT_NAME_LAST}(-(\d+))?",
                                                                    stem))


def keep_csv_metrics(trainer) -> None:
    """A fit resumed into its own directory: Lightning's CSVLogger starts ``metrics.csv``
    anew when it opens the directory (deleting the rows logged before the resume), so
    those rows are moved to ``metrics.<n>.csv`` beside it first."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in trainer.loggers:
        if not isinstance(logger, CSVLogger):
            continue
        old = os.path.join(logger.log_dir, "metrics.csv")
        if not os.path.isfile(old):
            continue
        n = 1
        while os.path.exists(os.path.join(logger.log_dir, f"metrics.{n}.csv")):
            n += 1
        os.replace(old, os.path.join(logger.log_dir, f"metrics.{n}.csv"))
        # ... so Lightning's "previous log files will be deleted" is no longer true
        warnings.filterwarnings("ignore", message=r".*Previous log files in this directory will be deleted")
        rank_zero_info(f"resuming in {logger.log_dir}: the metrics logged before are kept in metrics.{n}.csv; "
                       "metrics.csv holds those from here on")


def remove_if_only_config(path: str, ours: bool) -> None:
    """Remove a run directory a failed run created when all it holds is empty folders or,
    when this run saved its config there (``ours``), ``config.yaml``/``hparams.yaml``:
    left behind, it shifted the version numbers and its ``config.yaml`` blocked reusing
    that version's name. Anything else (metrics, checkpoints, the config of another run
    that took the same version at the same moment) is kept."""
    import shutil

    if not os.path.isdir(path):
        return
    allowed = ("config.yaml", "hparams.yaml") if ours else ()
    for root, _, files in os.walk(path):
        if any(f not in allowed or root != path for f in files):
            return
    shutil.rmtree(path, ignore_errors=True)


def remove_empty_parents(path: str, stop: str | None) -> None:
    """Remove the empty folders above ``path`` up to, not including, ``stop`` (the
    nearest one that existed before the run)."""
    parent = os.path.dirname(path)
    while stop is not None and parent and os.path.abspath(parent) != os.path.abspath(stop):
        try:
            os.rmdir(parent)  # only an empty one
        except OSError:
            return
        parent = os.path.dirname(parent)


def _locate_trained_model(config, ckpt: dict[str, Any] | None) -> None:
    """The checkpoint's ``model`` replaced the configured one; a relative path given in
    another folder is no directory from here: take the absolute path the checkpoint
    recorded at training, as ``export`` does (the tokenizer, linked to the model,
    follows). A run from another folder failed with "no such local directory", and a
    relative ``tiny:`` model was built anew there."""
    from cfg_unlearn.export import base_model_name
    from cfg_unlearn.tiny import absolute_model_name

    model = config.get("model")
    name = model.get("model") if model is not None and ckpt is not None else None
    if not isinstance(name, str) or absolute_model_name(name) is not None:
        return
    where = base_model_name(ckpt)
    if where == name:
        return  # a hub id, or recorded nowhere that exists: loading it says so
    rank_zero_warn(f"--ckpt_path: the checkpoint's model {name!r} is no directory from here; using {where}")
    model["model"] = where
    data = config.get("data")
    if data is not None and data.get("tokenizer") == name:
        data["tokenizer"] = where


def _checkpoint_file(ckpt_path: Any) -> dict[str, Any] | None:
    """The checkpoint at ``ckpt_path``, memory-mapped (its tensors are not read); None
    when it is no readable file (a sharded directory, ``last``, a path that does not
    exist: Lightning says so itself)."""
    if not isinstance(ckpt_path, str) or not os.path.isfile(ckpt_path):
        return None
    from cfg_unlearn.checkpointing import load_checkpoint_file

    try:
        return load_checkpoint_file(ckpt_path)
    except Exception:  # noqa: BLE001 - Lightning's own load reports an unreadable checkpoint
        return None


def _replaced(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The flattened ``model.*`` values the checkpoint changed, as ``"model.beta=5
    (checkpoint: 0.1)"``. A key that became a group (``lora: null`` against a LoRA
    checkpoint's ``lora.r``, ``lora.alpha``, ...) counts as changed too."""
    out = []
    for key, value in before.items():
        if key in after:
            was = after[key]
        else:
            nested = {k[len(key) + 1:]: v for k, v in after.items() if k.startswith(key + ".")}
            was = nested or None
        if was != value:
            out.append(f"model.{key}={value!r} (checkpoint: {was!r})")
    return out


def _other_instructions(data: Any, ckpt: dict[str, Any] | None) -> list[str]:
    """The instructions (``data.system_prompt``, ``data.uncond_system_prompt``) this run
    is configured with that differ from those the checkpoint's data module trained with,
    as ``"data.system_prompt='...' (configured: '...')"``."""
    saved = (ckpt or {}).get("datamodule_hyper_parameters")
    if not isinstance(data, Namespace) or not isinstance(saved, dict):
        return []
    return [f"data.{key}={saved[key]!r} (configured: {data.get(key)!r})"
            for key in ("system_prompt", "uncond_system_prompt") if key in saved and data.get(key) != saved[key]]


#: the data module settings that decide which pairs a fit trains on, and how they are encoded
_DATA_KEYS = ("train_file", "val_file", "world", "tokenizer", "max_length", "nll_span", "val_fraction", "seed",
              "batch_size", "max_chars", "on_error")


def _plain(value: Any) -> Any:
    if isinstance(value, Namespace):
        return {k: _plain(v) for k, v in value.as_dict().items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _same_setting(key: str, now: Any, saved: Any) -> bool:
    if key in ("train_file", "val_file", "tokenizer") and isinstance(now, str) and isinstance(saved, str):
        if os.path.exists(now) and os.path.exists(saved):  # the same file, spelled otherwise
            return os.path.samefile(now, saved)
    return now == saved


def _other_data(data: Any, ckpt: dict[str, Any] | None) -> list[str]:
    """The data settings (:data:`_DATA_KEYS`) of a resumed fit that differ from those its
    checkpoint's data module trained with, as ``"data.world.seed=1 (checkpoint: 0)"``: a
    resume on other data continued silently (ORPO), with the epoch's position and the
    dropout draws of the other data."""
    saved = (ckpt or {}).get("datamodule_hyper_parameters")
    if not isinstance(data, Namespace) or not isinstance(saved, dict):
        return []
    out = []
    for key in _DATA_KEYS:
        if key not in saved:
            continue
        now, was = _plain(data.get(key)), _plain(saved[key])
        if key == "tokenizer" and (now is None or was is None):  # None: the model's own
            continue
        if isinstance(now, dict) and isinstance(was, dict):
            out += [f"data.{key}.{k}={now.get(k)!r} (checkpoint: {was.get(k)!r})"
                    for k in sorted(set(now) | set(was)) if now.get(k) != was.get(k)]
        elif not _same_setting(key, now, was):
            out.append(f"data.{key}={now!r} (checkpoint: {was!r})")
    return out


def _restored_over(model: Any, ckpt: dict[str, Any] | None) -> list[tuple[str, str, Any, Any]]:
    """The ``model.optimizer`` / ``model.lr_scheduler`` arguments configured for a resumed
    fit that differ from the state its checkpoint (:func:`_checkpoint_file`) restores (the
    optimizer's param group: ``lr`` as the schedule's base, ``initial_lr``; the
    scheduler's saved attributes), as ``(key, name, configured, checkpoint's)``, e.g.
    ``("optimizer", "lr", 0.01, 0.0003)``. Empty when nothing differs or there is no
    checkpoint file."""
    if not isinstance(model, Namespace) or ckpt is None:
        return []
    groups = [s.get("param_groups", [{}])[0] for s in ckpt.get("optimizer_states") or [] if isinstance(s, dict)]
    scheds = [s for s in ckpt.get("lr_schedulers") or [] if isinstance(s, dict)]
    out = []
    # with a schedule, the configured lr is its base (initial_lr); without one, the param
    # group's lr is the one the run trains at (a resumed config that drops the schedule)
    base = "initial_lr" if model.get("lr_scheduler") is not None else "lr"
    for key, saved in (("optimizer", groups[0] if groups else None), ("lr_scheduler", scheds[0] if scheds else None)):
        given = model.get(key)
        args = given.get("init_args") if isinstance(given, Namespace) else None
        if saved is None or not isinstance(args, Namespace):
            continue
        for name, value in args.items():
            was = saved.get(base, saved.get("lr")) if name == "lr" else saved.get(name)
            if name == "total_steps" or was is None or value is None:
                continue  # the schedule's total follows this run's budget (WarmupCosine)
            same = tuple(value) == tuple(was) if isinstance(value, (list, tuple)) and isinstance(
                was, (list, tuple)) else value == was
            if not same:
                out.append((key, name, value, was))
    return out


def _flat(ns: Any) -> dict[str, Any]:
    """A jsonargparse Namespace as ``{"optimizer.init_args.lr": ...}``."""
    return dict(ns.items()) if isinstance(ns, Namespace) else {}


def cli_main(args: list[str] | None = None, run: bool = True, prog: str | None = None) -> UnlearnCLI:
    """Entry point of ``train.py``. ``args`` (for tests) replaces ``sys.argv[1:]``; ``prog``
    names the command in usage errors (argparse's default, the script's file name, is
    ``__main__.py`` under ``python -m cfg_unlearn``)."""
    quiet_third_party_warnings()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork
    return UnlearnCLI(
        UnlearnModule,
        PairDataModule,
        auto_configure_optimizers=False,
        # config.yaml beside the run's checkpoints; a directory of another run is refused
        save_config_callback=LoggerSaveConfigCallback,
        seed_everything_default=0,
        # no abbreviated flags: `--seed 3` was taken as --seed_everything, and an
        # abbreviation that works today breaks when a setting with the same prefix is added
        parser_kwargs={"allow_abbrev": False, **({"prog": prog} if prog else {})},
        args=args,
        run=run,
    )


def _check_config_encoding(path: str) -> None:
    """jsonargparse reads a config file in the locale's encoding: on Windows (cp1252) a
    UTF-8 instruction "Keine persönlichen Daten" trained as "Keine persÃ¶nlichen Daten",
    silently, never matching the text chat and export are given. A config with any
    non-ASCII byte is refused there, naming the fix."""
    import codecs
    import locale

    encoding = locale.getpreferredencoding(False)
    if codecs.lookup(encoding).name == "utf-8":
        return
    try:
        with open(path, "rb") as fh:
            ascii_only = fh.read().isascii()
    except OSError:  # unreadable: jsonargparse says so
        return
    if not ascii_only:
        raise ConfigError(f"--config {path}: holds non-ASCII text, and this Python reads config files as {encoding}, "
                          "not UTF-8, so it would be misread; run with PYTHONUTF8=1 (or python -X utf8)")


def config_args(argv: list[str]) -> list[str]:
    """The ``--config``/``-c`` values of ``argv``, in order: files, or inline YAML."""
    values = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith("--config="):
            values.append(arg.split("=", 1)[1])
    return values


def config_file_args(argv: list[str]) -> list[str]:
    """The ``--config``/``-c`` values of ``argv`` that are files, in order. A value that is
    not a file is jsonargparse's (it also takes inline YAML, of any length, and reports
    missing files)."""
    return [path for path in config_args(argv) if os.path.isfile(path)]


def check_config_files(argv: list[str]) -> None:
    """Read every ``--config``/``-c`` file as YAML first, so a syntax error names the file
    (jsonargparse reads the text and names it ``<unicode string>``)."""
    import yaml

    for path in config_file_args(argv):
        _check_config_encoding(path)
        try:
            with open(path, encoding="utf-8") as fh:
                yaml.compose(fh, Loader=yaml.SafeLoader)  # syntax only: values are jsonargparse's to read
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
            ctx = e.context_mark
            context = (f"{e.context} (line {ctx.line + 1}, column {ctx.column + 1})"
                       if e.context and ctx and ctx is not mark else e.context)
            what = "; ".join(x for x in (context, e.problem) if x)
            raise ConfigError(f"--config {where}: not valid YAML: {what}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"--config {path}: not valid YAML: {e}") from None
        except OSError:  # unreadable: jsonargparse says so
            continue


#: jsonargparse's messages for a key no setting has; the key is the last group
_UNKNOWN_KEY = (
    re.compile(r"^Subcommand '[^']+' does not accept option '(?P<key>[^']+)'"),
    re.compile(r"^Group '(?P<group>[^']+)' does not accept option '(?P<key>[^']+)'"),
    re.compile(r"^Option '(?P<key>[^']+)' is not accepted before subcommand"),
)
#: a value it refused ("Parser key "trainer.max_epochs": Expected a <class 'int'> ...")
_PARSER_KEY = re.compile(r'^Parser key "(?P<key>[^"]+)":')
#: ... or an argument its class does not take (an optimizer's ``lrr``)
_CLASS_OPTION = re.compile(r"Option '(?P<key>[^']+)' is not accepted")
#: (``Namespace(class_path='...')`` in a value, ``given class_path '...'`` in a Union's error)
_CLASS_PATH = re.compile(r"class_path[= ]'(?P<path>[\w.]+)'")
_GIVEN_VALUE = re.compile(r"^\s*Given value: (?P<value>.*?)(?:\. Got value: .*)?$", re.MULTILINE)
_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (?P<args>.+)$")


def explain_parse_error(message: str, argv: list[str], settings: Collection[str]) -> str:
    """jsonargparse's parse error with what it leaves out: the config file and line that
    set the key it names, and the nearest setting to a misspelt one (``settings``: the
    parser's keys, as ``trainer.max_epochs``). jsonargparse checks each config file as it
    loads it, so a file's bad value is refused even where the command line gives the
    key too: a file is named where its value is the one the message shows, or where the
    command line does not give the key."""
    import yaml

    first = message.partition("\n")[0]
    m = _UNRECOGNIZED.match(first)
    if m:
        hints = []
        for arg in m["args"].split():
            flag = arg.split("=", 1)[0]
            close = difflib.get_close_matches(flag[2:], settings, n=1) if flag.startswith("--") else []
            hints += [f"--{close[0]} for {flag}"] if close else []
        return f"{message} (did you mean {', '.join(hints)}?)" if hints else message
    for pattern in _UNKNOWN_KEY:
        m = pattern.match(first)
        if m:  # a key no setting has: on the command line that is "unrecognized arguments"
            key = f"{m['group']}.{m['key']}" if "group" in m.groupdict() else m["key"]
            close = difflib.get_close_matches(key, settings, n=1)
            files = ", ".join(_config_line(*s[:2]) for s in _file_settings(argv, key))
            found = ([files] if files else []) + ([f"did you mean '{close[0]}'?"] if close else [])
            return f"{message} ({'; '.join(found)})" if found else message
    m = _PARSER_KEY.match(first)
    if not m:
        return message
    option = _CLASS_OPTION.search(message)
    shown = _GIVEN_VALUE.search(message)
    child = option["key"] if option else None
    sets = _file_settings(argv, m["key"], child)
    same = [s for s in sets if isinstance(s[2], yaml.ScalarNode) and shown and s[2].value == shown["value"]]
    # without a file whose value is the one shown, a file is named only where nothing else
    # can have given it: not the command line, not a --config of inline YAML
    inline = any(not os.path.isfile(value) for value in config_args(argv))
    if not same and not inline and not _given_on_command_line(argv, m["key"], child):
        same = sets
    close = _close_init_arg(option["key"], message) if option else None
    # jsonargparse refuses a file's value as it loads the file: the first one that sets it
    lines = [f"  Set by {_config_line(*same[0][:2])}"] if same else []
    lines += [f"  Did you mean '{close}'?"] if close else []
    return "\n".join([message, *lines])


def _given_on_command_line(argv: list[str], key: str, child: str | None = None) -> bool:
    """Whether ``argv`` gives ``--key`` (``--key V``, ``--key=V``, jsonargparse's
    appending ``--key+=V``) or one below it (``--key.sub V``), with ``child``: one of
    that name below it."""
    for arg in argv:
        flag = arg.partition("=")[0].removesuffix("+")
        if flag == f"--{key}" or flag.startswith(f"--{key}."):
            if child is None or flag.endswith(f".{child}") or flag == f"--{key}":
                return True
    return False


def _config_line(path: str, key_node: Any) -> str:
    return f"--config {path}:{key_node.start_mark.line + 1}"


def _file_settings(argv: list[str], key: str, child: str | None = None) -> list[tuple[str, Any, Any]]:
    """``(file, key node, value node)`` of each ``--config`` file that sets ``key`` (or,
    with ``child``, an argument of that name anywhere below it), in the order given, at
    its top level or under the subcommand's name (a config given before the subcommand)."""
    import yaml

    sub = next((a for a in argv if a in TRAINER_SUBCOMMANDS), None)
    paths = [key.split(".")] + ([[sub, *key.split(".")]] if sub else [])
    sets = []
    for path in config_file_args(argv):
        try:
            with open(path, encoding="utf-8") as fh:
                root = yaml.compose(fh, Loader=yaml.SafeLoader)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        for parts in paths:
            found = _yaml_key(root, parts)
            if found is not None and child is not None:
                found = _yaml_descendant_key(found[1], child)
            if found is not None:
                sets.append((path, *found))
    return sets


def _yaml_key(node: Any, parts: list[str]) -> tuple[Any, Any] | None:
    """The (key, value) nodes of the dotted key ``parts`` in a composed YAML mapping,
    nested (``trainer: {max_epochs: 3}``) or dotted (``trainer.max_epochs: 3``)."""
    import yaml

    if not isinstance(node, yaml.MappingNode):
        return None
    for k, v in node.value:
        if not isinstance(k, yaml.ScalarNode):
            continue
        head = str(k.value).split(".")
        if parts[: len(head)] == head:
            if len(head) == len(parts):
                return k, v
            found = _yaml_key(v, parts[len(head):])
            if found is not None:
                return found
    return None


def _yaml_descendant_key(node: Any, name: str) -> tuple[Any, Any] | None:
    """The first mapping key ``name`` at any depth below ``node`` (an ``init_args``
    argument, or one given in jsonargparse's shorthand without ``init_args``)."""
    import yaml

    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == name:
                return k, v
        children = [v for _, v in node.value]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        return None
    for child in children:
        found = _yaml_descendant_key(child, name)
        if found is not None:
            return found
    return None


def _close_init_arg(name: str, message: str) -> str | None:
    """The nearest argument of the class the message names (``torch.optim.AdamW``)."""
    import importlib
    import inspect

    m = _CLASS_PATH.search(message)
    if not m:
        return None
    module, _, attr = m["path"].rpartition(".")
    try:
        params = inspect.signature(getattr(importlib.import_module(module), attr)).parameters
    except Exception:  # noqa: BLE001 - a hint only: any failure to import or inspect means no hint
        return None
    close = difflib.get_close_matches(name, list(params), n=1)
    return close[0] if close else None


def explain_parse_errors(parser: Any, argv: list[str]) -> None:
    """Make ``parser`` and its subcommands' parsers report errors through
    :func:`explain_parse_error` (jsonargparse then prints the usage and exits as before)."""
    action = getattr(parser, "_subcommands_action", None)
    subparsers = list(getattr(action, "_name_parser_map", {}).values()) if action is not None else []
    # the settings a misspelt key may have meant: the subcommands' (trainer.max_epochs,
    # seed_everything, ckpt_path), not the parsers' own options
    own = {"help", "config", "print_config", "subcommand"}
    settings = sorted({a.dest for p in subparsers or [parser] for a in p._actions
                       if a.dest not in own and not a.dest.startswith("_") and a.dest != argparse.SUPPRESS})
    # jsonargparse parses a config file from inside the file's folder: a relative --config
    # path read from there named another file, or none (a review: no file was named)
    cwd = os.getcwd()
    explained: set[str] = set()  # a subcommand's error is raised again through its parent's
    for p in (parser, *subparsers):
        def error(message: str, ex: Exception | None = None, _report=p.error, p=p) -> None:
            here = os.getcwd()
            try:  # (not contextlib.chdir: Python 3.11's, and 3.10 is supported)
                os.chdir(cwd)
                if message not in explained:
                    message = explain_parse_error(message, argv, settings)
                    explained.add(message)
            except Exception:  # noqa: BLE001 - a hint, never a traceback in place of the usage error
                pass
            finally:
                os.chdir(here)
            if not p.exit_on_error or _jsonargparse_debug():  # an error it catches, or a traceback asked for
                _report(message, ex)
            # the error first and one usage line: jsonargparse prints the usage of every
            # setting (70 lines), then a tip, then the line that says what is wrong
            prog = (getattr(ex, "subcommand_parser", None) or p).prog.replace(" [options]", "")
            sys.stderr.write(f"{prog}: error: {message}\n{short_usage(prog)}")
            raise SystemExit(2)

        p.error = error


def _jsonargparse_debug() -> bool:
    """JSONARGPARSE_DEBUG: jsonargparse raises its errors with their traceback."""
    try:
        from jsonargparse._common import debug_mode_active
    except ImportError:  # a private name: without it, the variable as jsonargparse documents it
        return bool(os.environ.get("JSONARGPARSE_DEBUG"))
    return debug_mode_active()


#: the trainer of the subcommand train_main runs, for its stop message
_RUNNING: dict[str, Any] = {}


def saved_checkpoints_note(trainer: Any, resumed_from: str | None = None) -> str:
    """The end of a stopped fit's message: where its latest checkpoint is, to resume
    from, or that it saved none (a fit stopped before its first checkpoint was told its
    checkpoints were kept, and resuming found none). What the checkpoint callbacks
    themselves recorded, so that another run's files in a shared ``dirpath`` are not
    named; a sharded checkpoint is a directory. ``resumed_from``: the fit's
    ``--ckpt_path``, named when it saved none since. ``trainer`` None: it never started."""
    from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

    if trainer is None:
        return NOT_STARTED
    saved: list[str] = []
    for cb in trainer.callbacks:
        if isinstance(cb, OnExceptionCheckpoint):
            saved.append(cb.ckpt_path)
        elif isinstance(cb, ModelCheckpoint):
            saved += [cb.last_model_path, cb.best_model_path, *cb.best_k_models]
    saved = [f for f in saved if f and "://" not in str(f) and os.path.exists(f)]
    if saved:
        latest = max(saved, key=os.path.getmtime)
        return f"; the checkpoints saved before it are kept (resume with --ckpt_path {shlex.quote(str(latest))})"
    if resumed_from and lightning_resolves(resumed_from):
        # a name, not a file: the one Lightning resolved it to, once the fit got that far
        # (with none found, Lightning started the fit afresh: it resumed from nothing)
        resumed_from = getattr(trainer, "ckpt_path", None)
    if resumed_from:
        return f"; it saved no checkpoint since it resumed from {resumed_from}"
    return "; no checkpoint was saved before it"


def train_main(args: list[str] | None = None, prog: str = "train.py") -> None:
    """``python train.py ...`` (and ``cfg-unlearn fit|validate``): :func:`cli_main`, with
    a malformed data row, a missing model or a setting that cannot work reported as one
    line (``file:line: field 'x': why``; exit status 2, as the other ``cfg-unlearn``
    commands) instead of a traceback through Lightning's loops."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from cfg_unlearn.data.schema import PairFormatError
    from cfg_unlearn.models import ModelNotFoundError

    # Lightning's MisconfigurationException: a setting that cannot work (a
    # LearningRateMonitor with `trainer.logger: false`), raised from inside its loops
    ours = (PairFormatError, ModelNotFoundError, ConfigError, MisconfigurationException)

    def stopped(said: str, signum: int) -> None:
        fit = "fit" in (sys.argv[1:2] if args is None else args[:1])
        note = saved_checkpoints_note(_RUNNING.get("trainer"), _RUNNING.get("ckpt_path")) if fit else ""
        sys.stderr.write(said + note + "\n")
        raise SystemExit(128 + signum) from None

    _RUNNING.clear()
    try:
        if args is not None and args == sys.argv[1:]:
            args = None  # `cfg-unlearn fit ...`: the command line itself (Lightning warns when given both)
        check_config_files(sys.argv[1:] if args is None else args)
        cli_main(args, prog=prog.split(" ")[0])  # "cfg-unlearn fit": the subcommand's parser adds "fit"
    except SIGTERMException:
        # Lightning ends the step, then raises this: a SystemExit with no code, so a fit a
        # scheduler stopped exited 0, as if finished (`fit && export` shipped it)
        stopped(f"{prog}: stopped by SIGTERM at the end of a step", signal.SIGTERM)
    except SystemExit as e:
        if not lightning_interrupted(e):
            raise
        stopped(f"{prog}: interrupted", signal.SIGINT)  # it exited 1, as a failed run does
    except KeyboardInterrupt:  # before Lightning's loop (parsing, loading the model): a traceback
        stopped(f"{prog}: interrupted", signal.SIGINT)
    except ours as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        raise SystemExit(2) from None
    except TrainingDiverged as e:  # not a usage error: the run went wrong
        sys.stderr.write(f"{prog}: error: {e}\n")
        raise SystemExit(1) from None
    except ValueError as e:
        # jsonargparse re-raises an error of a class it instantiates for an Optional[...]
        # argument (--eval) as "Does not validate against any of the Union subtypes ...",
        # a traceback with our message inside; that message is the one to show
        cause = e.__cause__
        while cause is not None and not isinstance(cause, ours):
            cause = cause.__cause__
        if cause is None:
            raise
        sys.stderr.write(f"{prog}: error: {cause}\n")
        raise SystemExit(2) from None
    except Exception as e:  # after ValueError's clause, which it would take
        # W&B's own refusals (no API key, a bad one) when the logger starts: a traceback
        # through Lightning's loops, for what is a setting to fix before the run
        if type(e).__module__.startswith("wandb.errors") and type(e).__name__ in ("UsageError", "AuthenticationError"):
            sys.stderr.write(f"{prog}: error: W&B: {e} (or log without an account: WANDB_MODE=offline, then "
                             "`wandb sync` the run folder; WANDB_MODE=disabled turns it off)\n")
            raise SystemExit(2) from None
        raise


if __name__ == "__main__":  # python -m cfg_unlearn.cli ...: the console script (cfg_unlearn.console)
    console_main()
