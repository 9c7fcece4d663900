"""GuidanceEval: decode held-out leak probes and utility questions with classifier-free
guidance, per scale and space, and log leak rate, PII rate and accuracy.

Why it is shaped like this:

* Every number comes from the one decoding engine (:mod:`cfg_unlearn.guidance`) that
  users call, so what is measured is what ships.
* Utility is decoded **with the same guidance** as the leak probes (the seed paper
  scored MMLU without it).
* Under DDP/FSDP each rank decodes its shard; shards are padded to one length (padding
  is decoded, never scored) and decoding uses a synchronised stop, so every rank runs
  the same forwards; the metrics keep summed counts, so the reduced values equal a
  single-process run exactly.
* Sample tables are redacted (every known PII value of the probe set plus detector
  hits) unless ``redact_samples=False``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from cfg_unlearn.checkpointing import save_last_checkpoints
from cfg_unlearn.data.schema import EvalRecord, PIIItem, prompt_text, read_eval_records
from cfg_unlearn.data.world import World, WorldConfig
from cfg_unlearn.guidance import SPACES, answer_logprobs, check_guidance, generate
from cfg_unlearn.metrics import (
    DEFAULT_PII_TYPES,
    OTHER,
    AnswerAccuracy,
    LeakRate,
    PIIRate,
    ReferencePerplexity,
    answer_matches,
)
from cfg_unlearn.pii import (
    PARTIAL_MIN_CHARS,
    NERDetector,
    Redactor,
    contains_value,
    contains_value_or_fragment,
    is_name_type,
)
from cfg_unlearn.prompts import SAFETY_INSTRUCTION
from cfg_unlearn.strategies import forward_outside_step
from cfg_unlearn.utils import (ConfigError, TrainingDiverged, atomic_write, check_input_file, dataclass_from, eval_mode,
                               nearest_existing, same_path)

log = logging.getLogger(__name__)

#: ``hit``: a leak row's answer holds a whole true value (a question row's: the right
#: answer); ``partial_hit`` (leak rows): a whole value or a piece of one the prompt does
#: not show, as ``partial_leak_rate`` counts it (the redacted answer cannot show which)
SAMPLE_COLUMNS = ["space", "g", "kind", "id", "prompt", "answer", "target", "hit", "partial_hit"]


def metric_key(name: str, g: float, space: str) -> str:
    """``eval@g=2.0/leak_rate`` for log space (the default), ``eval@g=2.0/prob/leak_rate``
    for probability space: the scale comes before the first ``/`` because W&B groups
    panels into sections by that prefix, so each guidance scale gets its own section
    (leak rate, per-type leak rates, PII rate and accuracy side by side). Run-level keys
    (``eval/seconds``, ``eval/n_leak_targets``, ``eval/n_questions``,
    ``eval/trained_step``, the ``eval/samples`` table) stay under ``eval/``."""
    space_part = "" if space == "logprob" else f"{space}/"
    return f"eval@g={float(g)!r}/{space_part}{name}"


def subsample(records: list, n: int | None, seed: int = 0) -> list:
    """A seeded random subset of ``n`` records in their original order (all of them when
    ``n`` is None). Random rather than every k-th: probe sets cycle through PII types,
    and a stride would alias onto a few of them."""
    if n is None or n >= len(records):
        return list(records)
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


def shard(items: list, rank: int, world_size: int) -> tuple[list, int]:
    """``(this rank's items, how many are real)``: round-robin, padded with repeats of
    the first item so that every rank decodes the same number of prompts."""
    mine = items[rank::world_size]
    per_rank = math.ceil(len(items) / world_size)
    return mine + [items[0]] * (per_rank - len(mine)), len(mine)


def log_at_step(trainer, results: dict[str, float]) -> None:
    """``results`` straight to the loggers at this exact step (``self.log`` from a batch
    hook would repeat the value at later steps, or drop it between ``log_every_n_steps``,
    and on_train_end allows none), and into callback_metrics so that ModelCheckpoint /
    EarlyStopping (ordered after the callback) can monitor it."""
    for logger in trainer.loggers:  # with the epoch, as Lightning adds it to what it logs
        logger.log_metrics({**results, "epoch": trainer.current_epoch}, step=trainer.global_step)
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in results.items()})


def fit_tokenizer(trainer, pl_module, loaded=None):
    """The tokenizer a callback decodes with: the data module's (already loaded, linked to
    the model's name), else ``loaded`` (one this function gave before), else the model's own."""
    tok = getattr(trainer.datamodule, "tokenizer", None) or loaded
    if tok is None:
        from cfg_unlearn.models import load_tokenizer

        tok = load_tokenizer(pl_module.model_name)
    return tok


class GuidanceEval(Callback):
    """Leak rate, PII rate and accuracy per guidance scale, during fit and in ``validate``;
    and, for questions with a ``reference`` answer, its perplexity under the same guidance.

    Args:
        scales: guidance scales to decode with (1 = plain decoding).
        spaces: ``logprob`` and/or ``prob``; ``g = 1`` is decoded once for all spaces.
        probes_file: leak-probe JSONL (``{"id", "prompt", "pii": [{"type", "value"}]}``).
        qa_file: utility-question JSONL (``{"id", "prompt", "answer"}``, optional
            ``"reference"``: a full benign answer whose perplexity is logged).
        world: take probes and questions from this synthetic world. Default, when no file
            is given: the data module's ``world``.
        max_probes: evaluate a fixed random subset of this many probes (None: all).
        max_questions: the same for utility questions.
        every_n_train_steps: also evaluate every N optimizer steps during fit (0: never).
        on_validation: evaluate at the end of every validation epoch (and in ``validate``);
            in a fit that never validates, at the end of every training epoch instead.
        system_prompt: the conditioning instruction for prompts without their own.
            Default: the data module's ``system_prompt``, else the safety instruction.
        uncond_system_prompt: the unconditioned branch's instruction (None blanks it).
            Default: the data module's ``uncond_system_prompt``.
        max_new_tokens: tokens decoded per answer.
        batch_size: prompts per decoding batch.
        log_samples: leak-probe rows per (space, scale) in the sample table (half as many
            question rows); 0 disables the table.
        samples_every: write the sample table at every N-th evaluation of this process,
            the first included (1: every one). Each table is a file (a CSV, or under W&B a
            table file plus a new artifact version, two more files staged outside the run
            under ``WANDB_DATA_DIR``), so a long run that evaluates often may want fewer.
        redact_samples: redact PII in sample tables. Turning it off puts raw PII in logs.
        ner_model: local path of a token-classification model that adds NER detections
            to the PII rate (optional; regex detectors always run).
        progress: show a progress bar while decoding.
    """

    def __init__(
        self,
        scales: Sequence[float] = (1.0, 2.0),
        spaces: Sequence[str] = ("logprob",),
        probes_file: str | None = None,
        qa_file: str | None = None,
        world: WorldConfig | None = None,
        max_probes: int | None = None,
        max_questions: int | None = None,
        every_n_train_steps: int = 0,
        on_validation: bool = True,
        system_prompt: str | None = None,
        uncond_system_prompt: str | None = None,
        max_new_tokens: int = 32,
        batch_size: int = 32,
        log_samples: int = 8,
        samples_every: int = 1,
        redact_samples: bool = True,
        ner_model: str | None = None,
        progress: bool = False,
    ):
        super().__init__()
        if not scales:
            raise ConfigError("GuidanceEval needs at least one guidance scale")
        bad = [s for s in spaces if s not in SPACES]
        if bad or not spaces:
            raise ConfigError(f"spaces must be a non-empty subset of {SPACES}, got {list(spaces)}")
        if every_n_train_steps < 0:
            raise ConfigError(f"every_n_train_steps must be >= 0, got {every_n_train_steps}")
        for name, val in (("max_probes", max_probes), ("max_questions", max_questions)):
            if val is not None and val < 0:
                raise ConfigError(f"{name} must be >= 0 or None, got {val}")
        for name, val, least in (("max_new_tokens", max_new_tokens, 1), ("batch_size", batch_size, 1),
                                 ("log_samples", log_samples, 0), ("samples_every", samples_every, 1)):
            if val < least:  # 0 new tokens would score every probe as a safe empty answer
                raise ConfigError(f"{name} must be >= {least}, got {val}")
        for s in scales:
            try:
                check_guidance(float(s), spaces[0])
            except ValueError as e:
                raise ConfigError(f"GuidanceEval scales {list(scales)}: {e}") from None
        self.scales = list(dict.fromkeys(float(s) for s in scales))  # [2, 2.0] decoded g=2 twice
        self.spaces = list(dict.fromkeys(spaces))
        self.probes_file, self.qa_file, self.world = probes_file, qa_file, dataclass_from(world, WorldConfig, "world")
        self.max_probes, self.max_questions = max_probes, max_questions
        self.every_n_train_steps, self.on_validation = every_n_train_steps, on_validation
        self.system_prompt, self.uncond_system_prompt = system_prompt, uncond_system_prompt
        # as given: None takes each run's data module's (setup), so a reused callback follows it
        self._given_prompts = (system_prompt, uncond_system_prompt)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.log_samples, self.redact_samples = log_samples, redact_samples
        self.samples_every, self._evaluations = samples_every, 0
        self.ner_model, self.progress = ner_model, progress
        if not redact_samples:
            rank_zero_warn("GuidanceEval(redact_samples=False): sample tables will contain raw PII")
        self.probes: list[EvalRecord] = []
        self.questions: list[EvalRecord] = []
        self.known: list[PIIItem] = []
        self._own_ids: set[str] = set()
        self._last: tuple[int, dict[str, float]] | None = None  # (global step, results) of the last run
        self._own_tokenizer = None
        self._ner: NERDetector | None = None
        self._redactor: Redactor | None = None

    # ------------------------------------------------------------------ setup

    def runs(self) -> list[tuple[str, float]]:
        """The (space, scale) pairs decoded; g = 1 once, as it is the same in every space."""
        out = [(self.spaces[0], 1.0)] if 1.0 in self.scales else []
        return out + [(sp, g) for sp in self.spaces for g in self.scales if g != 1.0]

    def load_eval_sets(self, datamodule: Any = None) -> None:
        self._own_ids = set()  # the ids the synthetic world made (no personal data in them)
        if self.probes_file or self.qa_file:
            check_input_file("eval.probes_file", self.probes_file)
            check_input_file("eval.qa_file", self.qa_file)
            self.probes = read_eval_records(self.probes_file, "probe")[0] if self.probes_file else []
            self.questions = read_eval_records(self.qa_file, "qa")[0] if self.qa_file else []
            # a file given but empty would turn its half of the evaluation off without a word
            # (a review: no leak_rate was logged, exit 0)
            for setting, path, records, what in (("probes_file", self.probes_file, self.probes, "leak probes"),
                                                 ("qa_file", self.qa_file, self.questions, "questions")):
                if path and not records:
                    raise ConfigError(f"eval.{setting} {path}: holds no {what}; leave {setting} out to evaluate "
                                      "without them")
            self.known = list(dict.fromkeys(p for r in self.probes for p in (*r.pii, *r.context_pii)))
        else:
            config = self.world or getattr(datamodule, "world", None)
            if config is None:
                raise ConfigError(
                    "GuidanceEval needs probes_file and/or qa_file, or a synthetic world "
                    "(its `world` argument or the data module's): with your own pairs pass "
                    "--eval.probes_file/--eval.qa_file, or --eval null to train without it"
                )
            world = World(config)
            self.probes, self.questions, self.known = world.probe_records(), world.qa_records(), world.known_pii()
            self._own_ids = {r.id for r in (*self.probes, *self.questions)}
        # the training data's people too: a model answers with values no probe asks for
        data_pii = datamodule.known_pii() if callable(getattr(datamodule, "known_pii", None)) else ()
        self.known = list(dict.fromkeys([*self.known, *data_pii]))
        self._redactor = None  # built for this known set when a table first needs it
        self._check_type_labels()
        #: (probes, questions) before max_probes / max_questions took a subset
        self.available = (len(self.probes), len(self.questions))
        self.probes = subsample(self.probes, self.max_probes)
        self.questions = subsample(self.questions, self.max_questions)
        if not self.probes and not self.questions:
            raise ConfigError("GuidanceEval has no leak probes and no questions to evaluate")

    def _check_type_labels(self) -> None:
        """Refuse a probe whose PII type is a known value or a word of a known name (type
        and value swapped, ``{"type": "Lee", "value": "ORG"}``): types name metrics
        (``leak_rate/LEE``) and the sample tables' target column, logged as they are. A
        type that merely shares a word with a value ("CITY" beside "Mexico City") is fine."""
        taken = {k.value.casefold() for k in self.known}
        taken |= {w.casefold() for k in self.known if is_name_type(k.type) for w in k.value.split()}
        for r in self.probes:
            for i, p in enumerate(r.pii):
                if p.type.casefold() in taken:
                    raise ConfigError(f"{r.source or 'a leak probe'}: field 'pii[{i}].type': is a known PII value or "
                                      "a word of a known name (type and value swapped?): types name metrics and "
                                      "sample columns, which are logged as they are")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if sum(isinstance(c, GuidanceEval) for c in trainer.callbacks) > 1:
            # the same eval@g=... keys, sample files and table: the second overwrote the first
            raise ConfigError("more than one GuidanceEval in this run: their eval@g=... metrics, sample files and "
                              "W&B table would overwrite each other; use one (its probes_file can hold every probe)")
        if stage == "validate" and trainer.limit_val_batches == 0:
            # Lightning then skips the whole validation loop, hooks included: nothing is scored
            raise ConfigError("validate with limit_val_batches=0 runs no validation, so GuidanceEval would score "
                             "nothing; use limit_val_batches=1 to score guidance beside one batch of loss")
        self._last = None  # results of an earlier fit (a reused callback) are not this model's
        self._context_checked = False
        dm = trainer.datamodule
        self.load_eval_sets(dm)
        given, given_uncond = self._given_prompts
        self.system_prompt = given if given is not None else getattr(dm, "system_prompt", None) or SAFETY_INSTRUCTION
        self.uncond_system_prompt = (given_uncond if given_uncond is not None
                                     else getattr(dm, "uncond_system_prompt", None))
        self._own_tokenizer = None  # an earlier run's model's
        seen = {p.type.upper() for r in self.probes for p in r.pii}
        types = list(DEFAULT_PII_TYPES) + sorted(seen - set(DEFAULT_PII_TYPES) - {OTHER})
        self._ner = NERDetector(self.ner_model) if self.ner_model else None
        self._redactor = None
        self.leak, self.pii_rate, self.accuracy = LeakRate(types), PIIRate(ner=self._ner), AnswerAccuracy()
        self.partial_leak = LeakRate(types, partial_min_chars=PARTIAL_MIN_CHARS)
        self.reference_ppl = ReferencePerplexity()
        rank_zero_info(f"GuidanceEval: {self.scored_sets()}; runs {[f'{sp}@g={g:g}' for sp, g in self.runs()]}")

    def scored_sets(self) -> str:
        """``"150 of 300 leak probes (max_probes), 64 questions"``: what is scored, and
        what a subset left out (a user's own probe file is subsampled too)."""
        parts = []
        for n, total, what, knob in ((len(self.probes), self.available[0], "leak probes", "max_probes"),
                                     (len(self.questions), self.available[1], "questions", "max_questions")):
            parts.append(f"{n} of {total} {what} ({knob})" if n < total else f"{n} {what}")
        return ", ".join(parts)

    def check_context(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse, before training, a probe or question that does not fit the model's
        context with ``max_new_tokens``: ``generate`` would refuse it at the first
        evaluation, possibly hours in, and on one rank only (each decodes its shard),
        leaving the others waiting in a collective. Every rank checks every record."""
        from cfg_unlearn.guidance import answer_overflow_message, answer_token_ids, encode_prompts, first_overflow, \
            overflow_message
        from cfg_unlearn.models import context_limit

        if self._context_checked:
            return
        limit = context_limit(pl_module.model)
        if limit is None:
            return
        tok = self._tokenizer(trainer, pl_module)
        records = [("leak probe", i, r) for i, r in enumerate(self.probes)]
        records += [("question", i, r) for i, r in enumerate(self.questions)]
        messages = [self._messages(r) for _, _, r in records]
        # a reference answer is read after its prompt, with the end token training appends
        at = [j for j, (_, _, r) in enumerate(records) if r.reference is not None]
        references = dict(zip(at, answer_token_ids(pl_module.model, tok, [records[j][2].reference for j in at])))
        sides = [("prompt", encode_prompts(tok, messages))]
        if any(g != 1.0 for _, g in self.runs()):
            sides.append(("unconditioned prompt", encode_prompts(tok, messages, blank_system=True,
                                                                 replacement_system=self.uncond_system_prompt)))
        for side, encoded in sides:
            j = first_overflow(encoded, self.max_new_tokens, limit)
            if j is not None:
                kind, i, rec = records[j]
                where = rec.source or f"{kind} {i}"  # not its id: ids can be personal (an e-mail)
                raise ConfigError(f"GuidanceEval: {where}: the {side} "
                                  + overflow_message(len(encoded[j]), self.max_new_tokens, limit))
            for j, answer in references.items():
                if len(encoded[j]) + len(answer) > limit:
                    kind, i, rec = records[j]
                    raise ConfigError(f"GuidanceEval: {rec.source or f'{kind} {i}'}: the {side} with its reference "
                                      "answer " + answer_overflow_message(len(encoded[j]) + len(answer), limit))
        self._context_checked = True

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer, pl_module) -> None:
        self.check_context(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.check_context(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n, step = self.every_n_train_steps, trainer.global_step
        if n and step > 0 and step % n == 0 and (self._last is None or self._last[0] != step):
            log_at_step(trainer, self._evaluate_or_save(trainer, pl_module))

    def on_train_end(self, trainer, pl_module) -> None:
        # a fit that stops mid-epoch (max_steps, max_time) gets no final validation: the
        # model it ends with would go unscored, silently
        step = trainer.global_step
        if (self.on_validation or self.every_n_train_steps) and step > 0 and (
                self._last is None or self._last[0] != step):
            rank_zero_info(f"GuidanceEval: the fit ended at step {step} with no evaluation there; scoring it")
            log_at_step(trainer, self._evaluate_or_save(trainer, pl_module))

    def _evaluate_or_save(self, trainer, pl_module) -> dict[str, float]:
        """:meth:`evaluate`; if it fails during a fit (out of memory), every checkpoint
        callback's last checkpoint is saved first, then the error is raised. This callback
        runs before them (its metrics feed their monitors), so they had saved nothing:
        the run's weights were lost. Under several processes the error is raised alone: a
        checkpoint save is a collective, and the other ranks wait in the decoding's own
        (a failure on one GPU hung the whole run)."""
        try:
            return self.evaluate(trainer, pl_module)
        except TrainingDiverged:
            raise  # NaN weights: the last checkpoint they would replace is the one to keep
        except Exception:
            if trainer.state.fn == "fit" and trainer.world_size == 1:
                save_last_checkpoints(trainer)
            elif trainer.state.fn == "fit":
                rank_zero_warn("GuidanceEval failed on this rank of a multi-process fit: no last checkpoint is "
                               "saved (it would wait for the other ranks, which wait in the decoding)")
            raise

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.on_validation or trainer.sanity_checking:
            return
        self._evaluate_and_log(trainer, pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.on_validation and self._fit_without_validation(trainer):
            rank_zero_info("GuidanceEval: this fit runs no validation (no validation pairs, or "
                           "limit_val_batches=0); it evaluates at the end of every training epoch instead")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.on_validation and self._fit_without_validation(trainer):
            self._evaluate_and_log(trainer, pl_module)

    @staticmethod
    def _fit_without_validation(trainer) -> bool:
        """Whether this fit never validates: no validation data (an empty or missing
        loader, the data module's ``val_dataset`` None) or ``limit_val_batches=0``. Then
        ``on_validation`` moves to the end of each training epoch, or it would never run."""
        if not trainer.enable_validation:
            return True
        if getattr(trainer.datamodule, "val_dataset", True) is None:
            return True
        return bool(trainer.num_val_batches) and sum(trainer.num_val_batches) == 0

    def _evaluate_and_log(self, trainer, pl_module) -> None:
        fitting = trainer.state.fn == "fit"
        if fitting and self._last is not None and self._last[0] == trainer.global_step:
            results = self._last[1]  # already evaluated and logged at this step (every_n_train_steps)
        else:
            results = self._evaluate_or_save(trainer, pl_module)
            if fitting:  # to the loggers at global_step, like every other evaluation and its
                # sample table (during a fit Lightning logs validation values one step earlier)
                log_at_step(trainer, results)
        # through Lightning: callback_metrics for monitors, and (validate) the loggers at
        # its step and the metrics trainer.validate returns. The values are already reduced
        # and equal on every rank; sync_dist averages equal numbers and keeps Lightning's
        # epoch-level check quiet
        pl_module.log_dict(results, sync_dist=True, logger=not fitting)

    # ------------------------------------------------------------------ evaluation

    def _tokenizer(self, trainer, pl_module):
        tok = fit_tokenizer(trainer, pl_module, self._own_tokenizer)
        if tok is not getattr(trainer.datamodule, "tokenizer", None):
            self._own_tokenizer = tok
        return tok

    def _messages(self, rec: EvalRecord) -> list[dict[str, str]]:
        system = rec.system or self.system_prompt  # as the data module renders training prompts
        return ([{"role": "system", "content": system}] if system else []) + [dict(m) for m in rec.prompt]

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Decode this rank's shard for every (space, scale), reduce the metrics over
        ranks (a collective: every rank calls it) and return them as floats."""
        t0 = time.perf_counter()
        model, tok = pl_module.model, self._tokenizer(trainer, pl_module)
        items = [("leak", r) for r in self.probes] + [("qa", r) for r in self.questions]
        mine, n_real = shard(items, trainer.global_rank, trainer.world_size)
        prompts = [self._messages(r) for _, r in mine]
        # sharded on their own, so every rank scores as many (forwards are collectives under FSDP)
        referenced = [r for r in self.questions if r.reference is not None]
        refs, n_refs = shard(referenced, trainer.global_rank, trainer.world_size) if referenced else ([], 0)
        results: dict[str, float] = {}
        # (run, kind, index in `items`, row): the table keeps the first rows of the whole
        # list, whichever rank decoded them
        samples: list[tuple[int, int, int, list[Any]]] = []
        where = [trainer.global_rank + i * trainer.world_size for i in range(n_real)]  # shard's round-robin
        for run, (space, g) in enumerate(self.runs()):
            with forward_outside_step(trainer.strategy):
                answers = generate(
                    model, tok, prompts, uncond_system=self.uncond_system_prompt, guidance_scale=g, space=space,
                    max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                    sync_ranks=trainer.world_size > 1, progress=self.progress and trainer.is_global_zero,
                )
            real = list(zip(where, mine[:n_real], answers[:n_real]))
            leak_at = [i for i, (kind, _), _ in real if kind == "leak"]
            qa_at = [i for i, (kind, _), _ in real if kind == "qa"]
            leak = [(r, a) for _, (kind, r), a in real if kind == "leak"]
            qa = [(r, a) for _, (kind, r), a in real if kind == "qa"]
            for m in (self.leak, self.partial_leak, self.pii_rate, self.accuracy, self.reference_ppl):
                # the perplexity's float64 sum stays on the CPU on Apple's MPS, which has no
                # float64 (one device there: nothing to reduce across ranks)
                on_mps = m is self.reference_ppl and pl_module.device.type == "mps"
                m.to("cpu" if on_mps else pl_module.device)
                m.reset()
            self.leak.update([a for _, a in leak], [r.pii for r, _ in leak])
            self.partial_leak.update([a for _, a in leak], [r.pii for r, _ in leak],
                                     shown=[prompt_text(r.prompt) for r, _ in leak])
            self.pii_rate.update([a for _, a in leak])
            self.accuracy.update([a for _, a in qa], [r.answers for r, _ in qa])
            # compute() is collective: reduce even when this rank's shard holds one kind only
            computed = {**self.leak.compute(), **self.pii_rate.compute(), **self.accuracy.compute()}
            partial = float(self.partial_leak.compute()["leak_rate"])
            named = {}
            if self.probes:
                named.update({k: float(v) for k, v in computed.items() if k.startswith(("leak_rate", "pii_"))})
                named["partial_leak_rate"] = partial
            if self.questions:
                named.update(accuracy=float(computed["accuracy"]), exact_match=float(computed["exact_match"]))
            if referenced:
                with forward_outside_step(trainer.strategy):
                    scored = answer_logprobs(
                        model, tok, [self._messages(r) for r in refs], [r.reference for r in refs],
                        uncond_system=self.uncond_system_prompt, guidance_scale=g, space=space,
                        batch_size=self.batch_size)
                self.reference_ppl.update(scored[:n_refs])
                named["perplexity"] = float(self.reference_ppl.compute()["perplexity"])  # a collective
            # g = 1 is decoded once, and every space's curve gets that point
            for sp in self.spaces if g == 1.0 else [space]:
                results.update({metric_key(name, g, sp): v for name, v in named.items()})
            # _sample_rows keeps the first rows of each kind, in order: their places in `items`
            at = leak_at[: self.log_samples] + qa_at[: self.log_samples // 2]
            samples += [(run, int(row[2] == "qa"), i, row) for i, row in zip(at, self._sample_rows(space, g, leak, qa))]
        samples = self._first_samples(trainer, samples)
        results["eval/n_leak_targets"] = float(sum(len(r.pii) for r in self.probes))
        results["eval/n_questions"] = float(len(self.questions))
        results["eval/seconds"] = time.perf_counter() - t0
        step, of_checkpoint = self._trained_step(trainer, pl_module)
        # a standalone validate logs at Lightning's step 0 whichever checkpoint it scores:
        # this says which (the sample file's name), and can be a dashboard's x axis
        results["eval/trained_step"] = float(step)
        self._last = (trainer.global_step, results)
        log_dir = run_dir(trainer)  # a broadcast under DDP: every rank must ask
        if trainer.is_global_zero:
            if self._evaluations % self.samples_every == 0:
                self._write_samples(trainer, samples, Path(log_dir), step)
            rank_zero_info(self.summary(results, step, of_checkpoint))
        self._evaluations += 1
        return results

    @staticmethod
    def _trained_step(trainer, pl_module) -> tuple[int, bool]:
        """The training step the scored weights reached, and whether it is a restored
        checkpoint's: in a fit, ``global_step``; in a standalone ``validate``, where
        Lightning's step is 0, the restored checkpoint's own step, or the step an earlier
        fit of the module ended at."""
        if trainer.state.fn != "fit":
            restored = getattr(pl_module, "checkpoint_step", None)
            if restored is not None:
                return restored, True
            trained = getattr(pl_module, "trained_step", None)
            if trained is not None:
                return trained, False
        return trainer.global_step, False

    def summary(self, results: dict[str, float], step: int, of_checkpoint: bool = False) -> str:
        parts = []
        for space, g in self.runs():
            cells = [f"{name} {results[metric_key(name, g, space)]:.3f}"
                     for name in ("leak_rate", "partial_leak_rate", "accuracy", "perplexity", "pii_rate")
                     if metric_key(name, g, space) in results]
            parts.append(f"{space}@g={g:g}: " + ", ".join(cells))
        where = f"of the checkpoint at training step {step}" if of_checkpoint else f"step {step}"
        return f"GuidanceEval {where} ({results['eval/seconds']:.1f} s): " + " | ".join(parts)

    # ------------------------------------------------------------------ samples

    def _safe(self, text: str) -> str:
        if not self.redact_samples:
            return text
        if self._redactor is None:  # prepared once per known set: a training set's values can be 100,000s
            self._redactor = Redactor(self.known, ner=self._ner)
        return self._redactor(text)

    def _safe_id(self, rec: EvalRecord) -> str:
        """A sample row's id: the synthetic world's own ids as they are (they hold no
        personal data; redacted, "probe-0003-address" became "probe-[LOC]-address", 0003
        being 4 digits of a house number, and the row could not be traced to its probe);
        a file's ids redacted like the rest (an id can be an e-mail address), with the
        record's ``file:line`` where that changed it."""
        if rec.id in self._own_ids:
            return rec.id
        shown = self._safe(rec.id)
        return f"{shown} ({Path(rec.source).name})" if shown != rec.id and rec.source else shown

    def _sample_rows(self, space: str, g: float, leak: list, qa: list) -> list[list[Any]]:
        """Rows of the first ``log_samples`` probes and ``log_samples // 2`` questions
        of ``leak`` and ``qa`` (``(record, answer)`` lists), in their order."""
        rows = []
        for r, answer in leak[: self.log_samples]:
            hit = any(contains_value(answer, p.value, p.type) for p in r.pii)
            shown = prompt_text(r.prompt)
            partial = any(contains_value_or_fragment(answer, p.value, p.type, shown=shown) for p in r.pii)
            target = ", ".join(f"[{p.type}]" if self.redact_samples else p.value for p in r.pii)
            rows.append([space, g, "leak", self._safe_id(r), self._safe(r.prompt[-1]["content"]),
                         self._safe(answer), target, hit, partial])
        for r, answer in qa[: self.log_samples // 2]:
            hit = answer_matches(answer, r.answers)[1]
            rows.append([space, g, "qa", self._safe_id(r), self._safe(r.prompt[-1]["content"]),
                         self._safe(answer), self._safe(" | ".join(r.answers)), hit, None])
        return rows

    def _first_samples(self, trainer: L.Trainer, rows: list[tuple[int, int, int, list[Any]]]) -> list[list[Any]]:
        """The sample table: per run, the first ``log_samples`` probes and first
        ``log_samples // 2`` questions of the evaluation sets, gathered from every rank
        (a collective under several processes: rank 0 alone showed its own shard, half
        the rows on 2 GPUs, and other probes than one process showed)."""
        dist = torch.distributed
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        rows = sorted(rows, key=lambda r: r[:3])
        out, taken = [], {}
        for run, kind, _, row in rows:
            n = taken.get((run, kind), 0)
            if n < (self.log_samples if kind == 0 else self.log_samples // 2):
                out.append(row)
                taken[(run, kind)] = n + 1
        return out

    def _write_samples(self, trainer: L.Trainer, rows: list[list[Any]], log_dir: Path, step: int) -> None:
        """The sample table: to W&B at Lightning's step (beside the metrics it logs; W&B
        steps only go forward), else ``eval_samples/step_<step>.csv``, ``step`` being the
        training step of the scored weights (:meth:`_trained_step`). None under
        ``fast_dev_run``, which writes no logs (with no logger the run directory would be
        the current one)."""
        if not rows or trainer.fast_dev_run:
            return
        from lightning.pytorch.loggers import WandbLogger

        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        for lg in wandb_loggers:
            lg.log_table(key="eval/samples", columns=SAMPLE_COLUMNS, data=rows, step=trainer.global_step)
        if wandb_loggers:
            return
        out_dir = log_dir / "eval_samples"
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(SAMPLE_COLUMNS)
        writer.writerows(rows)
        path = out_dir / f"step_{step:07d}.csv"
        atomic_write(path, buf.getvalue())
        log.info("GuidanceEval samples: %s", path)


# ---------------------------------------------------------------------- the resolved config


#: the resolved config's file name among a W&B run's files (W&B writes its own config.yaml)
WANDB_CONFIG_FILE = "lightning_config.yaml"


def log_resolved_config(trainer: L.Trainer, config_yaml: str) -> None:
    """Send the resolved LightningCLI config (``parser.dump`` of it) to every W&B logger of
    ``trainer``: as the run config's ``config`` entry (a nested dict, so runs can be
    filtered and compared on any field; under one key, because the module's own
    hyperparameters are logged at the top level and ``model`` would collide) and as the
    file ``lightning_config.yaml`` among the run's files, which ``--config`` accepts as
    it is. (``config.yaml`` goes to the run's directory: :class:`LoggerSaveConfigCallback`.)
    Call on rank zero only (a logger's experiment exists only there)."""
    import yaml
    from lightning.pytorch.loggers import WandbLogger

    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            lg.log_hyperparams({"config": yaml.safe_load(config_yaml)})
            run_dir = getattr(lg.experiment, "dir", None)
            # WANDB_MODE=disabled gives a run whose directory was never created
            if run_dir and Path(run_dir).is_dir():
                # a plain write: W&B uploads what lies in its run directory, a temp file included
                (Path(run_dir) / WANDB_CONFIG_FILE).write_text(config_yaml, encoding="utf-8")


def run_dir(trainer: L.Trainer) -> str:
    """The directory of this run, where ModelCheckpoint puts ``checkpoints/``: the first
    logger's ``save_dir/name/version`` (a CSV or TensorBoard logger's ``log_dir``; with a
    WandbLogger ``runs/<project>/<run id>``, not its ``save_dir``, which every run shares),
    or ``default_root_dir`` without a logger. A broadcast: every rank must call it."""
    return trainer.strategy.broadcast(_run_path(trainer))


def planned_run_dir(trainer: L.Trainer) -> str | None:
    """:func:`run_dir` before the fit starts, without a collective and without opening
    the logger (a CSVLogger deletes the ``metrics.csv`` it finds when it opens): None
    when a W&B run has no id yet (a fresh id: a directory of its own)."""
    if trainer.loggers and type(trainer.loggers[0]).__name__ == "WandbLogger" and trainer.loggers[0].version is None:
        return None
    return _run_path(trainer)


def claim_run_version(trainer: L.Trainer) -> str | None:
    """Give the first logger (CSV, TensorBoard) a version folder of its own when its
    version is unset: made here with ``os.mkdir``, which one process wins. The logger
    picks max(version_N) + 1 by listing the folders, so the runs of a sweep started
    together picked the same one: two of three were refused as taken after loading
    their model, and with ``--ckpt_path last`` all three wrote into one folder. Returns
    the folder above the claimed one that existed before (a failed run removes what it
    created up to there), or None when nothing was claimed (a pinned version, W&B, a
    remote ``save_dir``)."""
    lg = trainer.loggers[0] if trainer.loggers else None
    if lg is None or not hasattr(lg, "_get_next_version") or getattr(lg, "_version", 0) is not None:
        return None
    root = os.path.expanduser(str(lg.root_dir))
    if "://" in root:
        return None
    existing = nearest_existing(root)
    os.makedirs(root, exist_ok=True)
    version = lg._get_next_version()
    while True:
        try:
            os.mkdir(os.path.join(root, f"version_{version}"))
        except FileExistsError:  # another run took it first
            version += 1
            continue
        lg._version = version
        return existing


def _run_path(trainer: L.Trainer) -> str:
    """The path :func:`run_dir` and :func:`planned_run_dir` name, on this rank."""
    if not trainer.loggers:
        return trainer.default_root_dir
    lg = trainer.loggers[0]
    version = lg.version if isinstance(lg.version, str) else f"version_{lg.version}"
    # "~/runs" as the logger's file system reads it: config.yaml went to a literal ./~/runs
    # while the checkpoints went to $HOME/runs
    return os.path.join(os.path.expanduser(lg.save_dir or trainer.default_root_dir), str(lg.name), version)


def resumes_run(ckpt: Any, run_path: str | Path | None, trainer: L.Trainer) -> bool:
    """Whether a fit with ``--ckpt_path ckpt`` resumes the run of ``run_path``, and so may
    write into that folder when it is taken: a name Lightning resolves itself (``last``,
    ``hpc``, ``registry...``) or a remote file (as before: no folder to compare), or a
    checkpoint in the run folder, its ``checkpoints`` folder (a link to scratch storage
    followed or not) or a checkpoint callback's own ``dirpath``. Another run's checkpoint
    resumed into a pinned, taken version folder replaced that run's config.yaml."""
    if not ckpt:
        return False
    name = str(ckpt)
    if run_path is None or name in ("last", "best", "hpc") or name.startswith("registry") or "://" in name:
        return True
    file = os.path.expanduser(name)
    folders = [str(run_path), os.path.join(str(run_path), "checkpoints")]
    folders += [str(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    # folders compared as folders, not spellings: on a case-insensitive disk (macOS,
    # Windows) "Runs/tiny/..." is in "runs/tiny"; a linked `checkpoints` is seen through
    # the link (realpath) or as spelled (abspath)
    parents = {p for resolve in (os.path.abspath, os.path.realpath) for p in Path(resolve(file)).parents}
    return any(same_path(parent, folder) for parent in parents for folder in folders)


def refuse_taken_run_dir(path: str | Path, taken: list[str], stage: str = "fit") -> None:
    """The error for a run directory that :func:`previous_run_files` found taken; only a
    ``fit`` can resume into it (a ``validate`` given ``--ckpt_path`` was told to add it)."""
    if not taken:
        return
    if stage != "fit":
        way_out = " or remove the directory"
    elif any(t.endswith(".ckpt") for t in taken):  # not a killed save's temp file
        way_out = ", remove the directory, or resume that run with --ckpt_path"
    else:
        way_out = " or remove the directory (it holds no checkpoint to resume: that run stopped before its first)"
    raise ConfigError(f"{path} holds another run ({', '.join(taken[:3])}{', ...' if len(taken) > 3 else ''}); "
                      "writing there would replace it. Pick a new --trainer.logger.init_args.version (or let the "
                      f"logger choose one){way_out}")


def previous_run_files(path: str | Path) -> list[str]:
    """What a run directory already holds of another run: its ``config.yaml`` and its
    checkpoints (file names relative to ``path``)."""
    path = Path(path)
    found = ["config.yaml"] if (path / "config.yaml").is_file() else []
    ckpts = path / "checkpoints"
    if ckpts.is_dir():
        found += sorted(str(f.relative_to(path)) for f in ckpts.iterdir())
    return found


class LoggerSaveConfigCallback(SaveConfigCallback):
    """LightningCLI's :class:`SaveConfigCallback`, with three changes:

    * ``config.yaml`` goes to the run's directory (:func:`run_dir`, beside
      ``checkpoints/``). Lightning's goes to ``trainer.log_dir``, which with a
      WandbLogger is its ``save_dir``: every run replaced the one before's.
    * A directory that holds another run (a reused ``--trainer.logger.init_args.version``
      or ``id``) is refused unless the fit resumes that run from one of its own
      checkpoints (:func:`resumes_run`): writing there replaced that run's
      ``config.yaml`` and ``last.ckpt`` without a word.
    * The resolved config also goes to W&B (:func:`log_resolved_config`).

    Pass it as ``LightningCLI(save_config_callback=LoggerSaveConfigCallback)``."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        path = run_dir(trainer)
        resuming = stage == "fit" and resumes_run(self.config.get("ckpt_path"), path, trainer)
        taken = previous_run_files(path) if trainer.is_global_zero and not resuming else []
        refuse_taken_run_dir(path, trainer.strategy.broadcast(taken), stage)
        if trainer.is_global_zero:
            if self.save_to_log_dir:
                os.makedirs(path, exist_ok=True)
                target = os.path.join(path, self.config_filename)
                if self.multifile:  # one file per sub-config given as a file: jsonargparse's own writer
                    self.parser.save(self.config, target, skip_unset=False, overwrite=True, multifile=True)
                    with open(target, "rb") as fh:  # (in whatever encoding it wrote)
                        atomic_write(target, self.launch_line().encode() + fh.read())
                else:  # UTF-8 and whole: parser.save wrote in the locale's encoding (cp1252 on Windows:
                    # a Cyrillic instruction failed and left an empty file; a German one was written so
                    # that the run's own config.yaml was then refused as not UTF-8)
                    atomic_write(target, self.resolved_config())
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def resolved_config(self) -> str:
        """The resolved config as YAML, under a first line that says which folder the run
        was launched from: relative paths in it (data files, ``tiny:`` models) start there,
        which the file did not otherwise record (a review: ``validate --config
        run/config.yaml`` from elsewhere found none of them)."""
        return self.launch_line() + self.parser.dump(self.config, skip_unset=False)

    @staticmethod
    def launch_line() -> str:
        # a folder name's undecodable bytes escaped (a surrogate cannot be written as UTF-8), and
        # a line break in it too (the rest of the name would be read as YAML)
        folder = os.fsencode(os.getcwd()).decode("utf-8", "backslashreplace")
        folder = folder.replace("\n", "\\n").replace("\r", "\\r")
        return f"# launched from {folder}: relative paths below start there\n"

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        log_resolved_config(trainer, self.resolved_config())


class ProgressEval(Callback):
    """``cfg-unlearn demo --compare``'s scorer: ``score(model)`` after the first few
    optimizer steps and after every epoch, so how fast a method collapses shows in the
    numbers (gradient ascent within a few steps, NPO more slowly), not only where it ends."""

    def __init__(self, score, early_steps: tuple[int, ...] = (2, 4, 8)):
        self.score, self.early_steps, self.rows = score, early_steps, []

    def _record(self, trainer, pl_module):
        if self.rows and self.rows[-1]["step"] == trainer.global_step:
            return
        with eval_mode(pl_module.model):
            self.rows.append({"step": trainer.global_step, **self.score(pl_module.model)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.early_steps:
            self._record(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._record(trainer, pl_module)


class StopWhenForgotten(Callback):
    """Stop unlearning once the model stops leaking on its own forget data.

    Every ``every_n_train_steps`` optimizer steps, each training pair's prompt is decoded
    greedily under its instruction (g=1: the conditioned model alone) and the share of
    the pairs' ``pii`` values found in the answers is logged as ``forget/leak_rate``; at
    or below ``threshold`` the fit stops after that step. A fixed number of epochs
    unlearns one world too little and another too far (the demo's seed 2 leaked on 0.094
    of its held-out probes after three epochs and was at 0.028 six steps later; a
    world half as large again lost utility in the third epoch), while the forget
    prompts' leak rate follows the held-out one closely. Only the forget data is read:
    no retain set, no held-out probes.

    Under DDP/FSDP each rank decodes its shard of the pairs and the counts are summed
    over the ranks, so every rank measures the same rate and they stop together.
    ``max_epochs``/``max_steps`` still cap the fit, and Lightning does not stop before
    ``min_steps``/``min_epochs``; ``stopped_at`` holds the step the latest fit stopped
    at, or None, and ``history`` that fit's every check. ``history`` is saved in the
    checkpoints, so a resumed fit keeps the checks made before it (Lightning matches the
    saved state by ``pairs_file``, ``threshold`` and ``every_n_train_steps``); a resumed
    fit that trains on past an earlier stop has ``stopped_at`` None until it stops again.

    Args:
        pairs_file: the training pairs' JSONL (``data.train_file``): their prompts and
            ``pii`` are what must no longer come out.
        threshold: stop when the leak rate is at most this (0: no value at all).
        every_n_train_steps: how often to decode them (each check decodes every pair, the
            ranks a shard each).
        system_prompt: the instruction for pairs without their own ``system``
            (default: the data module's ``system_prompt``, as training renders them,
            else the safety instruction).
        max_new_tokens: tokens decoded per answer.
        batch_size: prompts per decoding batch.
    """

    def __init__(self, pairs_file: str, threshold: float = 0.03, every_n_train_steps: int = 3,
                 system_prompt: str | None = None, max_new_tokens: int = 32, batch_size: int = 64):
        super().__init__()
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"StopWhenForgotten: threshold must be in [0, 1], got {threshold}")
        if every_n_train_steps < 1 or max_new_tokens < 1 or batch_size < 1:
            raise ConfigError("StopWhenForgotten: every_n_train_steps, max_new_tokens and batch_size must be >= 1, "
                              f"got {every_n_train_steps}, {max_new_tokens} and {batch_size}")
        self.pairs_file, self.threshold, self.every = pairs_file, threshold, every_n_train_steps
        self.system_prompt = system_prompt
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.pairs: list = []
        #: ``(step, leak rate)`` of every check, and the step the fit stopped at
        self.history: list[tuple[int, float]] = []
        self.stopped_at: int | None = None
        self._checked_step = -1
        self._own_tokenizer = None
        #: a checkpoint's ``history``, kept until its fit starts (see load_state_dict)
        self._restored: list[tuple[int, float]] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._restored = None  # a validate's checkpoint is not the next fit's
        if stage != "fit":
            return
        # a callback reused for another fit reports that fit alone, with its tokenizer
        self.history, self.stopped_at, self._checked_step, self._own_tokenizer = [], None, -1, None
        if self.pairs:
            return
        from cfg_unlearn.data.schema import read_pairs

        check_input_file("StopWhenForgotten.pairs_file", self.pairs_file)
        # read as the data module reads its pairs: a row it skips (on_error: skip) is no
        # error here either, and is counted
        dm = getattr(trainer, "datamodule", None)
        pairs, stats = read_pairs(self.pairs_file, **{k: getattr(dm, k) for k in ("max_chars", "on_error")
                                                      if hasattr(dm, k)})
        if stats.skipped:
            rank_zero_warn(f"StopWhenForgotten: {stats.skipped} row(s) of {self.pairs_file} skipped as the data "
                           "module skips them; their prompts are not checked")
        self.pairs = [p for p in pairs if p.pii]
        if not self.pairs:
            raise ConfigError(f"StopWhenForgotten: no pair of {self.pairs_file} names the pii its rejected answer "
                              "leaks, so there is nothing to check")

    def _instruction(self, trainer) -> str:
        if self.system_prompt is not None:
            return self.system_prompt
        return getattr(trainer.datamodule, "system_prompt", None) or SAFETY_INSTRUCTION

    @property
    def state_key(self) -> str:
        # two of them in one trainer (two files, or two thresholds) keep their own records
        return self._generate_state_key(pairs_file=self.pairs_file, threshold=self.threshold, every=self.every)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(check) for check in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # taken up when a fit starts: validate and test restore callbacks too, and their
        # checkpoint's record must not replace the latest fit's
        self._restored = [(int(step), float(rate)) for step, rate in state_dict.get("history", [])]

    def on_train_start(self, trainer, pl_module) -> None:
        if self._restored is not None:
            self.history, self._restored = self._restored, None
            # the checkpoint's step was checked: its other accumulated batches, which a
            # resume replays, must not check it again
            self._checked_step = self.history[-1][0] if self.history else -1

    def forget_leak_rate(self, trainer, pl_module) -> float:
        """The share of the pairs' ``pii`` values the model writes, decoding their prompts
        (this rank's shard; the counts summed over ranks, a collective)."""
        mine, n_real = shard(self.pairs, trainer.global_rank, trainer.world_size)
        prompts = [[{"role": "system", "content": p.system}, *p.prompt] if p.system else list(p.prompt)
                   for p in mine]
        tok = self._own_tokenizer = fit_tokenizer(trainer, pl_module, self._own_tokenizer)
        with eval_mode(pl_module.model), forward_outside_step(trainer.strategy):
            answers = generate(pl_module.model, tok, prompts, system=self._instruction(trainer),
                               max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                               sync_ranks=trainer.world_size > 1)
        # the held-out leak rate's own metric, on the model's device (NCCL reduces CUDA
        # tensors), the shard's padding rows left out; the ratio of the summed counts in
        # float64, so that 9 of 180 is 0.05, not float32's 0.05000000075
        leak = LeakRate(sync_on_compute=False).to(pl_module.device)
        leak.update(answers[:n_real], [p.pii for p in mine[:n_real]])
        with leak.sync_context(should_sync=trainer.world_size > 1):
            return int(leak.hits.sum()) / int(leak.totals.sum())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # once per optimizer step (accumulated batches share one), every N of them
        if step == 0 or step % self.every or step == self._checked_step:
            return
        self._checked_step = step
        rate = self.forget_leak_rate(trainer, pl_module)
        self.history.append((step, rate))
        log_at_step(trainer, {"forget/leak_rate": rate})
        if trainer.strategy.reduce_boolean_decision(rate <= self.threshold, all=True):
            self.stopped_at = step
            trainer.should_stop = True
            rank_zero_info(f"StopWhenForgotten: the forget prompts' leak rate is {rate:.3f} (at most "
                           f"{self.threshold}) after step {step}; stopping")
