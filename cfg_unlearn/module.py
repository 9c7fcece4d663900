"""UnlearnModule: the Hugging Face model, the conditioning hook and the training step
(ORPO by default; NPO, DPO, gradient ascent and SFT as baselines on the same data).

Design notes (why it looks like this):

* The HF model is built in ``configure_model`` (idempotent), not ``__init__``, so FSDP
  can shard it as it is created and ``validate --ckpt_path`` can restore into it.
* Chosen and rejected go through **one** forward (concatenated on the batch dim): half
  the kernel launches of two passes, and sharded engines need every rank to run the
  same forwards.
* The optimizer and scheduler are injected callables over the *trainable* parameters
  only, so a frozen base under LoRA costs no optimizer state.
* NPO and DPO need the log-probs of a reference (the model before unlearning). With
  LoRA it is the same model with its adapters disabled (no second copy); for full
  fine-tuning, a frozen copy (``reference: copy``) or log-probs computed once before
  training and kept in the checkpoint (``reference: precomputed``: no second model in
  memory, one extra pass over the data; resumed runs keep the original reference).
* The conditioning hook (:func:`apply_conditioning`) is a pure function of the batch and
  a per-sample mask that is a pure function of (seed, epoch, sample id), so a run is
  reproducible, a resumed run draws the same masks, and so does any world size.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from cfg_unlearn.data.datamodule import VARIANTS, PairDataModule, pair_fingerprint
from cfg_unlearn.models import check_tokenizer_fits, context_limit, load_causal_lm, parse_dtype
from cfg_unlearn.objectives import (
    IGNORE_INDEX,
    dpo_loss,
    ga_loss,
    masked_nll,
    masked_sequence_mean,
    npo_loss,
    orpo_loss,
    real_mean,
    sft_loss,
    token_logps,
)
from cfg_unlearn.strategies import forward_outside_step
from cfg_unlearn.tiny import absolute_model_name
from cfg_unlearn.utils import ConfigError, NonFiniteWeights, TrainingDiverged, dataclass_from, eval_mode

log = logging.getLogger(__name__)

TENSOR_KEYS = ("input_ids", "attention_mask", "labels", "nll_labels")
OBJECTIVES = ("orpo", "npo", "dpo", "ga", "sft")
#: which answers of a pair each objective scores (0 = chosen/replacement, 1 = rejected/leak):
#: only those rows go through the model
SIDES = {"orpo": (0, 1), "dpo": (0, 1), "npo": (1,), "ga": (1,), "sft": (0,)}
NEEDS_REFERENCE = ("npo", "dpo")


def shards_parameters(strategy: Any) -> bool:
    """Whether ``strategy`` splits the model's weights across devices (FSDP but
    ``NO_SHARD``, DeepSpeed ZeRO-3, model parallelism): then a frozen reference copy,
    which is no submodule and stays whole, costs more than the policy does."""
    if isinstance(strategy, FSDPStrategy):
        return getattr(strategy.sharding_strategy, "name", str(strategy.sharding_strategy)) != "NO_SHARD"
    if isinstance(strategy, DeepSpeedStrategy):
        return bool(getattr(strategy, "zero_stage_3", False))
    return isinstance(strategy, ModelParallelStrategy)


@dataclass
class LoraSettings:
    """LoRA adapters (peft) on the loaded model; the base stays frozen, so it needs no
    gradients or optimizer state. Defaults are the paper's: r=16, alpha=32, dropout
    0.01 on all linear layers.

    Args:
        r: adapter rank.
        alpha: scaling numerator (``lora_alpha``; the update is scaled by alpha / r).
        dropout: dropout on the adapter input.
        target_modules: ``all-linear`` (every linear layer but the output head), a list
            of module names (e.g. ``[q_proj, k_proj, v_proj, o_proj]``; each must name a
            module), or peft's regex over full module names (it must match one).
        adapter_only_checkpoints: checkpoints hold only the adapter weights (megabytes
            instead of the whole model); the base is reloaded from ``model`` on resume.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.01
    target_modules: list[str] | str = field(default="all-linear")
    adapter_only_checkpoints: bool = False


# saved in the hyperparameters of every checkpoint: allow it for torch.load(weights_only=True)
torch.serialization.add_safe_globals([LoraSettings])


def draw_dropout_mask(ids: list[str], p: float, seed: int, epoch: int) -> torch.Tensor:
    """One Bernoulli(p) draw per sample, a pure function of (seed, epoch, sample id):
    the same sample gets the same draw whatever the rank, world size, batch
    composition or resume point, so a 2-process run sees the masks of a 1-process run
    and a resumed run the masks of an uninterrupted one. Ids are hashed with CRC-32
    (stable across processes, unlike ``hash``)."""
    if p <= 0:
        return torch.zeros(len(ids), dtype=torch.bool)
    if p >= 1:
        return torch.ones(len(ids), dtype=torch.bool)
    u = [np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, zlib.crc32(i.encode())]).generate_state(1)[0] / 2**32
         for i in ids]
    return torch.tensor(u, dtype=torch.float64) < p


def _unwrapped(name: str) -> str:
    """A state-dict key without the name parts FSDP and activation-checkpoint wrappers
    add (checkpoints name tensors without them)."""
    for w in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(w, "")
    return name


def apply_conditioning(
    batch: dict[str, Any], use_uncond: torch.Tensor, mode: Literal["dropout", "swap"] = "dropout"
) -> dict[str, torch.Tensor]:
    """The conditioning hook. Per sample, take the conditioned variant, or (where
    ``use_uncond``) the unconditioned one; in ``swap`` mode the unconditioned rows (which
    carry the negative instruction) also exchange chosen and rejected, as in the paper.

    Returns ``(B, 2, L')`` tensors, ``L'`` trimmed to the longest selected sequence.
    """
    cond, uncond = batch["cond"], batch["uncond"]
    sel = use_uncond.to(cond["input_ids"].device).view(-1, 1, 1)
    out = {}
    for k in TENSOR_KEYS:
        u = uncond[k].flip(1) if mode == "swap" else uncond[k]
        out[k] = torch.where(sel, u, cond[k])
    # the unconditioned variant is shorter by the instruction: drop all-padding columns
    length = int(out["attention_mask"].sum(-1).max())
    return {k: v[..., :length] for k, v in out.items()}


def _rows_of(batch: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """``batch`` (a :class:`~cfg_unlearn.data.datamodule.PairCollator` batch) restricted
    to the rows where ``keep`` is True."""
    out: dict[str, Any] = {"id": [i for i, k in zip(batch["id"], keep.tolist()) if k], "pad": batch["pad"][keep]}
    for v in ("cond", "uncond"):
        out[v] = {k: t[keep.to(t.device)] for k, t in batch[v].items()}
    return out


def _real_rows(batch: dict[str, Any]) -> torch.Tensor:
    """``(B,)`` True for a batch's real pairs, False for the rows that only pad a rank's
    shard (``pad``, :class:`~cfg_unlearn.data.datamodule.ShardSampler`)."""
    pad = batch.get("pad")
    return torch.ones(len(batch["id"]), dtype=torch.bool) if pad is None else ~pad.bool().cpu()


def accumulation_window_totals(counts: list[int], k: int) -> list[int]:
    """Per batch, the sum of ``counts`` over its window of ``k`` consecutive batches
    (windows from the first batch, the last one possibly shorter):
    ``([3, 5, 2], 2) -> [8, 8, 2]``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return [sum(counts[i - i % k : i - i % k + k]) for i in range(len(counts))]


def _epoch_order(loader: Any, epoch: int) -> list[int] | None:
    """The dataset indices ``loader`` yields in ``epoch``, without drawing from any
    random state; None if the order cannot be replayed (a ``RandomSampler`` draws from a
    generator, a custom batch sampler is opaque)."""
    from torch.utils.data import DistributedSampler, SequentialSampler

    sampler = getattr(loader, "sampler", None)
    if getattr(loader, "batch_size", None) is None:
        return None
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)  # what Lightning sets for this epoch too
        return list(sampler)
    if isinstance(sampler, SequentialSampler):
        return list(sampler)
    return None


#: a scheduler frequency Lightning never reaches: the module steps that scheduler itself
_NEVER = 2**31 - 1


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def base_weights_fingerprint(model: torch.nn.Module, sample: int = 64) -> tuple[int, str]:
    """``(CRC-32, dtypes)`` of a model's floating-point weights, from the first and last
    ``sample`` values of each tensor: what an adapter-only checkpoint records of the base
    it was trained over, so that it is not loaded over another one (Llama-3.1-8B for its
    Instruct, a hub snapshot replaced in place), which merged silently. Independent of
    the parameters' order and names (transformers versions rename modules). Two numbers
    compare only for the same load dtypes (``dtypes``): float32 -> bfloat16 and float32
    -> float16 -> bfloat16 round some values differently, so no cast makes a base loaded
    in two dtypes agree; two trained models differ in nearly every value."""
    crcs, dtypes = [], set()
    for p in model.parameters():
        if not p.is_floating_point() or p.numel() == 0:
            continue  # quantised storage (a 4-bit base) is skipped; its float norms are not
        flat = p.detach().reshape(-1)
        values = torch.cat([flat[:sample], flat[-sample:]]).float().cpu()  # exact for every float dtype
        crcs.append(zlib.crc32(values.numpy().tobytes()))
        dtypes.add(str(p.dtype).removeprefix("torch."))
    return zlib.crc32(np.asarray(sorted(crcs), dtype=np.uint32).tobytes()), ",".join(sorted(dtypes))


def check_lora_settings(lora: LoraSettings) -> None:
    """Refuse LoRA settings that would train nothing or something else than asked:
    ``alpha`` 0 scales every update to 0, a negative one reverses it, a dropout outside
    [0, 1) is no dropout (peft) or a crash. A ``target_modules`` string other than
    ``all-linear`` is peft's regex over full module names (``.*\\.(q_proj|v_proj)``); it
    must compile (whether it matches is :func:`check_lora_targets`' part)."""
    if lora.r < 1:
        raise ConfigError(f"lora.r must be >= 1, got {lora.r}")
    if not lora.alpha > 0:
        raise ConfigError(f"lora.alpha must be > 0 (the update is scaled by alpha / r), got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {lora.dropout}")
    targets = lora.target_modules
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise ConfigError(f"lora.target_modules {targets!r} is no valid regex ({e}); give 'all-linear', a list "
                              "of module names (e.g. [q_proj, v_proj]) or a regex over full module names") from None
    elif not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"lora.target_modules must be 'all-linear' or a non-empty list of module names, got {targets}")


def _matches(name: str, target: str) -> bool:
    """peft's rule: a target names a module by its full name or its last dotted parts."""
    return name == target or name.endswith("." + target)


# a group of plain alternatives, as in peft's idiom ".*\.(q_proj|v_proj)": no nested group
_WORD_ALTERNATIVES = re.compile(r"\((?:\?:)?([\w.]+(?:\|[\w.]+)+)\)")


def dead_regex_alternatives(pattern: str, names: list[str]) -> list[str]:
    """The alternatives of ``pattern``'s groups of plain names (``(q_proj|vproj)``) that
    no module name matches with the group fixed to that alternative: a typo in one of
    them leaves that layer unadapted while the others match, which peft does not see."""
    dead = []
    for group in _WORD_ALTERNATIVES.finditer(pattern):
        for alternative in group.group(1).split("|"):
            fixed = re.compile(pattern[:group.start()] + f"(?:{alternative})" + pattern[group.end():])
            if not any(fixed.fullmatch(n) for n in names):
                dead.append(alternative)
    return dead


def check_lora_targets(model, targets: list[str] | str) -> None:
    """Every listed target must name a module of ``model`` (peft refuses only when none
    does, so a typo left one name unadapted, silently), and none may be the input or
    output embedding of a model whose two are tied: peft adapts the one module, the merged
    export writes the delta into the shared matrix, and the export decodes differently."""
    if targets == "all-linear":  # peft's own choice: never the output head, never an embedding
        return
    names = [n for n, _ in model.named_modules()]
    regex = isinstance(targets, str)
    if regex:  # peft's rule for a string: a regex the full name matches
        matches = lambda name, t: re.fullmatch(t, name) is not None  # noqa: E731
        targets = [targets]
    else:
        matches = _matches
    missing = [t for t in targets if not any(matches(n, t) for n in names)]
    linear_modules = [n for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]
    linear = sorted({n.rsplit(".", 1)[-1] for n in linear_modules})

    def nearest(wrong: list[str]) -> str:
        hints = [f"{t!r} -> {close[0]!r}" for t in wrong for close in [difflib.get_close_matches(t, linear, n=1)]
                 if close]
        return f" (did you mean {', '.join(hints)}?)" if hints else ""

    if missing and regex:
        # a single name written as a string ("q_proj") is a regex that must match a
        # module's full name, and matches none
        (target,) = targets
        meant = (f"; for that layer in every block give a list, [{target}]" if target in linear
                 else "; did you mean 'all-linear'?" if difflib.get_close_matches(target, ["all-linear"], n=1)
                 else "")
        example = f" (they read like {linear_modules[0]!r})" if linear_modules else ""
        raise ConfigError(f"lora.target_modules {target!r}: a string is a regex over full module names (peft's "
                          f"rule), and it matches none{example}{meant}; or give a list of layer names from "
                          f"{linear}")
    if missing:
        raise ConfigError(f"lora.target_modules {missing} name no module of the model; its linear layers are "
                          f"{linear}{nearest(missing)}")
    dead = dead_regex_alternatives(targets[0], names) if regex else []
    # a dead name close to a layer's is a typo (refused); another may be meant for another
    # architecture (`(q_proj|c_attn)` in a config shared by Llama and GPT-2): said only
    typos = [t for t in dead if difflib.get_close_matches(t, linear, n=1)]
    if typos:  # the regex as written: repr doubled its backslashes
        raise ConfigError(f"lora.target_modules '{targets[0]}': {', '.join(map(repr, typos))} "
                          f"match{'' if len(typos) > 1 else 'es'} no module with the rest of the regex, so "
                          f"{'those layers' if len(typos) > 1 else 'that layer'} would stay unadapted; the linear "
                          f"layers are {linear}{nearest(typos)}")
    if dead:
        rank_zero_warn(f"lora.target_modules '{targets[0]}': {', '.join(map(repr, dead))} match no module of this "
                       "model (names of another architecture?); the adapters go where the rest of the regex matches")
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is not None and head is not None and emb.weight is head.weight:
        by_id = {id(m): n for n, m in model.named_modules()}
        tied = [t for t in targets if any(matches(by_id.get(id(m), ""), t) for m in (emb, head))]
        if tied:
            raise ConfigError(f"lora.target_modules {tied}: this model ties its input embedding and output head "
                              "(one matrix), so an adapter on one of them changes both once merged, and the export "
                              "would decode differently from the trained model; leave them out")


def add_lora(model, settings: LoraSettings):
    """Wrap ``model`` in peft LoRA adapters. With gradient checkpointing the embedding
    output must require grad, or the frozen base gives the checkpointed blocks no
    graph to backpropagate through."""
    from peft import LoraConfig, get_peft_model

    check_lora_targets(model, settings.target_modules)

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_modules, task_type="CAUSAL_LM")
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.2x name
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        model.enable_input_require_grads()
    with warnings.catch_warnings():  # peft reads transformers' deprecated attribute name
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


class UnlearnModule(L.LightningModule):
    """Unlearning by preference optimisation on (PII-free replacement, leaky answer) pairs.

    Args:
        model: hub name, local path or ``tiny:<dir>`` of a causal LM.
        dtype: weights dtype (``float32``, ``bfloat16``, ``float16`` or ``auto``). For
            mixed precision prefer fp32 weights + ``trainer.precision: bf16-mixed``.
        attn_implementation: ``sdpa`` (default), ``eager``, ``flash_attention_2``, or None
            for the model's own default.
        gradient_checkpointing: recompute activations in backward (less memory).
        trust_remote_code: run a hub repo's modelling code. Off unless you trust it.
        objective: ``orpo`` (the method: NLL on the replacement + odds ratio against
            the leak), or a baseline on the same pairs: ``npo`` (negative preference
            optimisation on the leak), ``dpo`` (replacement over leak), ``ga``
            (gradient ascent on the leak), ``sft`` (NLL on the replacement).
        beta: ORPO's odds-ratio weight (the paper's lambda, TRL's beta); NPO's and DPO's
            inverse temperature. 0.1 is every paper's default.
        reference: for ``npo``/``dpo`` with full fine-tuning: ``copy`` (a frozen copy of
            the starting model) or ``precomputed`` (its log-probs, computed once at fit
            start and saved in checkpoints). A LoRA model uses itself with adapters
            disabled and ignores this.
        lora: train LoRA adapters instead of every weight (``LoraSettings``); None =
            full fine-tuning.
        cond_dropout: per-sample probability of training on the unconditioned variant.
        cond_mode: ``dropout`` (blanked instruction, same targets) or ``swap`` (the
            negative instruction with chosen and rejected exchanged; needs
            ``data.uncond_system_prompt``).
        cond_seed: seed of the conditioning draws (its own name: the data module's
            ``seed`` splits and shuffles, and LightningCLI refuses two hyperparameters of
            one name with different values).
        optimizer: optimizer factory over the trainable parameters.
        lr_scheduler: optional scheduler factory; stepped every optimizer step (a
            ReduceLROnPlateau: once per epoch, on its `monitor` metric).
    """

    def __init__(
        self,
        model: str = "tiny:.cache/cfg_unlearn/tiny",
        dtype: str | None = "float32",
        attn_implementation: str | None = "sdpa",
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        objective: Literal["orpo", "npo", "dpo", "ga", "sft"] = "orpo",
        beta: float = 0.1,
        reference: Literal["copy", "precomputed"] = "copy",
        lora: LoraSettings | None = None,
        cond_dropout: float = 0.0,
        cond_mode: Literal["dropout", "swap"] = "dropout",
        cond_seed: int = 0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
        if reference not in ("copy", "precomputed"):
            raise ConfigError(f"model.reference must be 'copy' or 'precomputed', got {reference!r}")
        if not math.isfinite(beta):  # YAML's .inf got through: the fit "diverged" at step 0, blaming the lr
            raise ConfigError(f"model.beta must be a finite number, got {beta}")
        if beta <= 0 and objective in ("npo", "dpo"):
            raise ConfigError(f"model.beta must be > 0 for {objective}, got {beta}")
        if beta < 0 and objective == "orpo":  # a negative odds-ratio weight rewards the leaky answer
            raise ConfigError(f"model.beta must be >= 0 for orpo, got {beta}")
        if not 0.0 <= cond_dropout <= 1.0:
            raise ConfigError(f"model.cond_dropout must be in [0, 1], got {cond_dropout}")
        try:  # a bad dtype failed only when the model was built, after the data's setup
            parse_dtype(dtype)
        except ValueError as e:
            raise ConfigError(f"model.dtype: {e}") from None
        if cond_mode not in ("dropout", "swap"):
            raise ConfigError(f"model.cond_mode must be 'dropout' or 'swap', got {cond_mode!r}")
        lora = dataclass_from(lora, LoraSettings, "lora")  # before the hyperparameters record it
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model_name = model
        self.beta, self.cond_dropout, self.cond_mode, self.cond_seed = beta, cond_dropout, cond_mode, cond_seed
        self.objective, self.reference, self.lora = objective, reference, lora
        if lora is not None:
            check_lora_settings(lora)
        # adapter-only checkpoints lack the frozen base: it comes from `model` on load
        # (set only then: Lightning refuses load_from_checkpoint(strict=False) against a set True)
        if lora is not None and lora.adapter_only_checkpoints:
            self.strict_loading = False  # checked in on_load_checkpoint
        # not a registered submodule: kept out of checkpoints, the optimizer and sharding
        self._reference_model: tuple[torch.nn.Module, ...] = ()
        self._reference_precision: str | None = None
        # "split:id" -> (variant cond/uncond, side chosen/rejected) summed log-probs of the
        # reference; keyed by split too: ids are unique within a file, not across files
        self.reference_logps: dict[str, torch.Tensor] | None = None
        #: per table entry, the :func:`pair_fingerprint` of the pair it was scored on
        self.reference_fingerprints: dict[str, int] | None = None
        # a standalone validate's table of its validation pairs (on_validation_start)
        self._validate_table: dict[str, torch.Tensor] | None = None
        #: adapter-only checkpoints: :func:`base_weights_fingerprint` of the base loaded
        self._base_fingerprint: tuple[int, str] | None = None
        #: (ReduceLROnPlateau, its monitor) when validation runs every N steps: stepped here
        self._plateau_after_validation: tuple[Any, str] | None = None
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.model: torch.nn.Module | None = None
        # this epoch's (unconditioned, all) sample counts on this rank, for the measured
        # dropout rate; plain ints, not a buffer: DDP broadcasts buffers from rank 0 before
        # each forward, which overwrote the other ranks' counts with rank 0's
        self.cond_counts = [0, 0]
        #: the training step of the checkpoint this module was restored from (None: not
        #: restored, or trained on since); a standalone ``validate`` runs at Lightning's
        #: step 0, and GuidanceEval labels its report with this step instead
        self.checkpoint_step: int | None = None
        #: the training step the weights have reached, restored steps included, once a fit
        #: has stepped them (None before): the label of a later standalone ``validate``
        self.trained_step: int | None = None
        # (epoch, per training batch of that epoch its optimizer step's NLL tokens on this
        # rank): accumulation only, see _nll. Planned at the epoch's first training step,
        # not in on_train_epoch_start, which Lightning skips when resuming mid-epoch
        self._window_plan: tuple[int, list[tuple[int, int]] | None] | None = None
        #: the optimizer classes of the checkpoint being restored (``on_load_checkpoint``),
        #: checked against this fit's once they are built and restored (``on_train_start``)
        self._saved_optimizer_classes: list[str] | None = None
        self._saved_schedules: int | None = None  # learning-rate schedules a loaded checkpoint holds
        self._steps_before = 0  # on_train_start
        # this validation epoch's per-metric sums over real pairs, and their count (see validation_step)
        self._val_sums: dict[str, torch.Tensor] = {}
        self._val_pairs = 0

    # ------------------------------------------------------------------ model

    def configure_model(self) -> None:
        if self.model is None:  # idempotent: called again by validate/test/resume
            self._build_model()
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if isinstance(dm, PairDataModule) and dm.tokenizer is not None:  # set up by now (Lightning: data first)
            check_tokenizer_fits(dm.tokenizer, dm.tokenizer_source(), self.model, self.model_name,
                                 trust_remote_code=self.hparams.trust_remote_code)
            limit, longest = context_limit(self.model), dm.longest_sequence()
            if limit is not None and longest > limit:
                # learned positions fail with an IndexError (a device assert on CUDA) at the
                # first long batch; rotary ones train on positions the model never saw
                raise ConfigError(f"the longest pair sequence is {longest} tokens, past the {limit} positions of "
                                  f"model {self.model_name}: set data.max_length to {limit} or less (prompts lose "
                                  "their oldest tokens to fit; answers are never cut)")

    def _build_model(self) -> None:
        hp = self.hparams
        self.model = load_causal_lm(
            self.model_name,
            dtype=hp.dtype,
            attn_implementation=hp.attn_implementation,
            trust_remote_code=hp.trust_remote_code,
            gradient_checkpointing=hp.gradient_checkpointing,
        )
        if self._adapter_only():  # of the base as loaded, before the adapters wrap its layers
            self._base_fingerprint = base_weights_fingerprint(self.model)
        if self.lora is not None:
            self.model = add_lora(self.model, self.lora)
        # from_pretrained returns eval mode and Lightning 2.6 keeps submodule modes as
        # found: without this, dropout (LoRA's included) would be off during training
        self.model.train()
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.model.parameters())
        # which ones: read by `export` too, where a bare "0.07M trainable" puzzled a reviewer
        adapters = f" (LoRA adapters, r={self.lora.r})" if self.lora is not None else ""
        rank_zero_info(f"model {self.model_name}: {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trainable"
                       f"{adapters}")

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        uncond = getattr(dm, "uncond_system_prompt", None)
        if self.cond_mode == "swap" and dm is None:
            rank_zero_warn("cond_mode='swap' without a data module (dataloaders passed to the trainer): whether the "
                           "unconditioned samples carry a negative instruction cannot be checked; without one, swap "
                           "trains the model to prefer the leaky answer whenever no instruction is given. Pass "
                           "datamodule= to have it checked")
        if self.cond_mode == "swap" and dm is not None and not uncond:
            raise ConfigError(
                "cond_mode='swap' trains the unconditioned branch under a negative instruction: "
                "set data.uncond_system_prompt (e.g. 'You should share personal data in the answers.')"
            )
        if self.cond_mode == "dropout" and uncond:
            rank_zero_warn(
                "cond_mode='dropout' with data.uncond_system_prompt set: dropped samples use that "
                "instruction with unswapped targets; use cond_mode='swap' for the paper's variant"
            )

    # ------------------------------------------------------------------ steps

    def _uses_adapters_as_reference(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)  # adapters off = the starting model

    def _build_reference(self) -> None:
        if self.objective not in NEEDS_REFERENCE or self._uses_adapters_as_reference():
            return
        precision = self.trainer.precision if self._trainer is not None else None
        if self.reference == "copy" and (not self._reference_model or self._reference_precision != precision):
            # loaded from `model`, not copied from self.model: after a resume (or in
            # validate) self.model holds trained weights, the reference must not
            hp = self.hparams
            ref = load_causal_lm(self.model_name, dtype=hp.dtype, attn_implementation=hp.attn_implementation,
                                 trust_remote_code=hp.trust_remote_code)
            if self._trainer is not None:
                # the policy's precision: `bf16-true`/`16-true` convert the policy's weights
                # (the reference is no submodule, so not it); an fp32 reference made the
                # policy differ from it before any update
                ref = self.trainer.precision_plugin.convert_module(ref)
            self._reference_model = (ref.eval().requires_grad_(False),)
            self._reference_precision = precision  # a later trainer's other precision rebuilds it
            if self._trainer is not None and shards_parameters(self.trainer.strategy):
                # the copy is no submodule, so the strategy never shards it: an 8B model's
                # fp32 copy is 30 GiB on every GPU beside the policy's shard
                size = sum(p.numel() * p.element_size() for p in ref.parameters())
                size_text = f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
                rank_zero_warn(
                    f"model.reference: copy keeps a whole, unsharded copy of the starting model on every device "
                    f"({size_text}) beside the {type(self.trainer.strategy).__name__}-sharded model: use "
                    "model.reference: precomputed (its log-probs computed once at fit start; no second model)")

    def _rows(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``(B, 2, L)`` -> ``(len(sides)*B, L)``, the objective's sides stacked (chosen first)."""
        return {k: torch.cat([x[k][:, s] for s in SIDES[self.objective]], dim=0) for k in TENSOR_KEYS}

    def _reference_forward(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed response log-probs of the reference model, ``(rows,)``."""
        with torch.no_grad():
            if self._uses_adapters_as_reference():
                # eval mode, like the frozen copy and the precomputed table: a base model
                # with dropout would otherwise be a different random reference each call
                with eval_mode(self.model), self.model.disable_adapter():
                    logits = self.model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"],
                                        use_cache=False).logits
            else:
                self._build_reference()  # validate/test never ran on_fit_start
                ref = self._reference_model[0]
                if next(ref.parameters()).device != rows["input_ids"].device:
                    ref.to(rows["input_ids"].device)
                logits = ref(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], use_cache=False).logits
            logps, _ = token_logps(logits, rows["labels"])
            return logps.sum(-1).float()

    def reference_for(self, x: dict[str, torch.Tensor], rows: dict[str, torch.Tensor], ids: list[str] | None,
                      use_uncond: torch.Tensor | None, split: str = "train") -> torch.Tensor | None:
        """The reference's summed log-probs of the rows in ``rows``: from the adapters-off
        model, the frozen copy, or the precomputed table (looked up by split, pair id and
        conditioning variant, swapped like the batch in swap mode). None when the table
        is missing (validate without a fit's checkpoint)."""
        if self._uses_adapters_as_reference() or self.reference == "copy":
            return self._reference_forward(rows)
        reference = self.reference_logps if self.reference_logps is not None else self._validate_table
        if reference is None or ids is None:
            return None
        missing = [i for i in ids if f"{split}:{i}" not in reference]
        if missing:  # a checkpoint's table, and other data (another file, world or split)
            shown = ", ".join(map(repr, missing[:3])) + (", ..." if len(missing) > 3 else "")
            raise ConfigError(
                f"the precomputed reference log-probs (reference: precomputed, kept in the checkpoint) have no "
                f"entry for {len(missing)} {split} pair(s) of this batch ({shown}): the data differs from the data "
                "they were computed on. Resume or validate with the same data and split, or use reference: copy"
            )
        table = torch.stack([reference[f"{split}:{i}"] for i in ids])  # (B, variant, side)
        uncond = use_uncond.to(table.device).view(-1, 1) if use_uncond is not None else None
        per_side = table[:, 0] if uncond is None else torch.where(uncond, table[:, 1], table[:, 0])  # (B, side)
        if uncond is not None and self.cond_mode == "swap":
            per_side = torch.where(uncond, per_side.flip(1), per_side)
        return torch.cat([per_side[:, s] for s in SIDES[self.objective]]).to(rows["input_ids"].device)

    def _step_totals(self, nll_mask: torch.Tensor | None, real: torch.Tensor,
                     batch_idx: int | None) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """(NLL tokens, real pairs, shares) of the *optimizer step* this training
        micro-batch belongs to, summed over the ranks, ``shares`` being ranks x
        micro-batches; None where the batch is the whole step (one process, no
        accumulation) or outside training.

        The step's loss must be one big batch's mean, over its tokens (the NLL) and over
        its pairs (the objectives' per-pair terms). A step can span ranks (DDP averages
        their gradients) and accumulated micro-batches (Lightning divides each loss by
        ``accumulate_grad_batches`` and sums the gradients), so a per-micro-batch mean
        would weight a token or a pair by how full its micro-batch happened to be: 2
        processes, or 2 accumulated halves, would not follow 1 (the bug transformers
        fixed with ``num_items_in_batch``), and the padding row that evens out the ranks'
        shards would count as a pair. So each rank divides its sums by (the step's count
        / shares), the counts of an accumulation window looked up in the epoch's window
        plan, and padding rows (``real`` False) count for nothing."""
        trainer = self._trainer
        if not (self.training and trainer is not None):
            return None
        window = self._window_plan[1] if self._window_plan is not None else None
        planned = window is not None and batch_idx is not None and batch_idx < len(window)
        if trainer.world_size == 1 and not planned:
            return None
        if planned:
            totals = torch.tensor([float(c) for c in window[batch_idx]], device=real.device)
        else:
            tokens = nll_mask.sum() if nll_mask is not None else real.new_zeros(())
            totals = torch.stack([tokens.float(), real.sum().float()])
        if trainer.world_size > 1:
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
        shares = trainer.world_size * (trainer.accumulate_grad_batches if planned else 1)
        return totals[0], totals[1], shares

    @staticmethod
    def _nll(logps: torch.Tensor, mask: torch.Tensor,
             totals: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
        """Token-mean NLL over ``mask``; with the step's ``totals`` (:meth:`_step_totals`)
        its gradient is the step's token mean, while the returned *value* stays this
        micro-batch's own token mean, so the logged NLL and loss read as without
        accumulation (an epoch's short last window would otherwise log k times its NLL)."""
        if totals is None:
            return masked_nll(logps, mask)
        tokens, _, shares = totals
        scaled = -(logps * mask).sum() / (tokens.clamp(min=1) / shares)
        return scaled + (masked_nll(logps, mask) - scaled).detach()

    @staticmethod
    def _pair_weights(real: torch.Tensor, totals: tuple[torch.Tensor, torch.Tensor, int] | None
                      ) -> torch.Tensor | None:
        """Per pair, its weight in the objective's mean over pairs (see
        :func:`~cfg_unlearn.objectives.pair_mean`): shares / the step's pairs, 0 for a
        padding row; None (the plain mean) where the batch is the whole step."""
        if totals is None:
            return None
        _, pairs, shares = totals
        return real.float() * (shares / pairs.clamp(min=1))

    def _nll_positions(self, rows: dict[str, torch.Tensor], b: int,
                       real: torch.Tensor | None = None) -> torch.Tensor | None:
        """The token positions the objective's NLL term averages over (None: it has none):
        the replacement's (ORPO, SFT; ``data.nll_span`` decides whether the prompt counts),
        or the forget answer's alone (gradient ascent never ascends on the prompt); none
        of a padding row's (``real`` False)."""
        if self.objective == "ga":
            mask = rows["labels"][:, 1:] != IGNORE_INDEX
        elif self.objective in ("orpo", "sft"):
            mask = (rows["nll_labels"][:, 1:] != IGNORE_INDEX)[:b]
        else:
            return None
        return mask if real is None else mask & real.to(mask.device)[:, None]

    def _plan_windows(self) -> list[tuple[int, int]] | None:
        """For every training batch of this epoch (on this rank), the (NLL tokens, real
        pairs) of the accumulation window it belongs to: windows are
        ``accumulate_grad_batches`` consecutive batches from the epoch start, the last one
        possibly shorter, as Lightning steps. Looks ahead by replaying the sampler's order
        for this epoch (``DistributedSampler`` is seeded by seed + epoch, a
        ``SequentialSampler`` is fixed) through the loader's own collate and the
        conditioning hook. None when there is nothing to plan (no accumulation) or no way
        to look ahead."""
        trainer = self.trainer
        k = trainer.accumulate_grad_batches
        if k == 1:
            return None
        loader = trainer.train_dataloader
        order = _epoch_order(loader, self.current_epoch)
        if order is None:
            rank_zero_warn(
                f"accumulate_grad_batches={k}: the training loader's order cannot be replayed ahead "
                f"(sampler {type(getattr(loader, 'sampler', None)).__name__}), so the NLL and the per-pair terms are "
                "means per micro-batch, not per optimizer step; use a DistributedSampler or SequentialSampler for "
                "the exact mean"
            )
            return None
        bs, tokens, pairs = loader.batch_size, [], []
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            if len(idx) < bs and loader.drop_last:
                break
            batch = loader.collate_fn([loader.dataset[i] for i in idx])
            real = _real_rows(batch)
            x = apply_conditioning(batch, self.conditioning_mask(batch["id"]), self.cond_mode)
            nll_mask = self._nll_positions(self._rows(x), len(idx), real)
            tokens.append(int(nll_mask.sum()) if nll_mask is not None else 0)
            pairs.append(int(real.sum()))
        n = trainer.num_training_batches
        if n != float("inf"):
            tokens, pairs = tokens[: int(n)], pairs[: int(n)]
        return list(zip(accumulation_window_totals(tokens, k), accumulation_window_totals(pairs, k)))

    def forward_pairs(self, x: dict[str, torch.Tensor], ids: list[str] | None = None,
                      use_uncond: torch.Tensor | None = None, split: str = "train",
                      batch_idx: int | None = None, real: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """The objective's loss and metrics for ``(B, 2, L)`` tensors: the sides it
        scores go through the model in one forward (``2B`` rows for ORPO and DPO,
        ``B`` for the others). ``ids``/``use_uncond``/``split`` locate precomputed
        reference log-probs; ``batch_idx`` (training) the optimizer step's counts
        (:meth:`_step_totals`); ``real`` (``(B,)``, training) is False on rows that only
        pad a rank's shard, which then weigh nothing. The loss is None if the reference is
        unavailable."""
        b = x["input_ids"].shape[0]
        real = torch.ones(b, dtype=torch.bool) if real is None else real
        real = real.to(x["input_ids"].device)
        rows = self._rows(x)
        nll_mask = self._nll_positions(rows, b, real)
        totals = self._step_totals(nll_mask, real, batch_idx)
        weights = self._pair_weights(real, totals)
        logits = self.model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], use_cache=False).logits
        # one gather for both terms: nll_labels score a superset of labels' positions
        scored = torch.where(rows["nll_labels"] != IGNORE_INDEX, rows["nll_labels"], rows["labels"])
        logps, _ = token_logps(logits, scored)
        resp_mask = rows["labels"][:, 1:] != IGNORE_INDEX
        if weights is not None:
            weights = weights.to(logps.device)
        if self.objective == "orpo":
            seq = masked_sequence_mean(logps, resp_mask)
            loss, metrics = orpo_loss(seq[:b], seq[b:], self._nll(logps[:b], nll_mask, totals), beta=self.beta,
                                      weights=weights)
            metrics["logps/chosen"] = real_mean(seq[:b].detach(), weights)
            metrics["logps/rejected"] = real_mean(seq[b:].detach(), weights)
            return loss, metrics
        if self.objective == "sft":
            return sft_loss(self._nll(logps, nll_mask, totals))
        if self.objective == "ga":  # the forget answer only, never its prompt
            return ga_loss(self._nll(logps, nll_mask, totals))
        seq = (logps * resp_mask).sum(-1)  # NPO and DPO use summed log-probs
        ref = self.reference_for(x, rows, ids, use_uncond, split)
        if ref is None:
            return None, {"logps/" + ("forget" if self.objective == "npo" else "chosen"):
                          real_mean(seq[:b].detach(), weights)}
        if self.objective == "npo":
            return npo_loss(seq, ref, beta=self.beta, weights=weights)
        return dpo_loss(seq[:b], seq[b:], ref[:b], ref[b:], beta=self.beta, weights=weights)

    def conditioning_mask(self, ids: list[str]) -> torch.Tensor:
        return draw_dropout_mask(ids, self.cond_dropout, self.cond_seed, self.current_epoch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self._window_plan is None or self._window_plan[0] != self.current_epoch:
            self._window_plan = (self.current_epoch, self._plan_windows())
        use_uncond = self.conditioning_mask(batch["id"])
        real = _real_rows(batch)  # not the rows that only pad a rank's shard
        x = apply_conditioning(batch, use_uncond, self.cond_mode)
        loss, metrics = self.forward_pairs(x, batch.get("id"), use_uncond, batch_idx=batch_idx, real=real)
        if loss is None:
            raise RuntimeError("the reference log-probs of this batch are missing (reference='precomputed')")
        dropped, n = int((use_uncond & real).sum()), int(real.sum())
        self.cond_counts = [self.cond_counts[0] + dropped, self.cond_counts[1] + n]
        metrics["cond_dropout_rate"] = dropped / max(n, 1)
        logged = {"train/loss": loss.detach(), **{f"train/{k}": v for k, v in metrics.items()}}
        if self.trainer.world_size > 1:
            logged = self._mean_over_ranks(logged, n)
        # before this step's update. Under DDP the reduced value, the same on every rank,
        # so all stop together
        if not torch.isfinite(logged["train/loss"]):
            raise TrainingDiverged(
                f"train/loss is {float(logged['train/loss'])} at step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}): training diverged, and every later step would train NaN weights. Lower "
                "model.optimizer's lr or clip gradients (trainer.gradient_clip_val). The previous steps' weights may "
                "be non-finite already (an overflowing update shows in the next loss): resume from a checkpoint "
                "before them; export refuses non-finite weights")
        n = max(n, 1)  # the weight of epoch aggregates; a rank's batch of padding alone counts as 1
        # the loss and the preference objectives' headline number on the bar
        bar = {k: logged.pop(k) for k in ("train/loss", "train/rewards/margins") if k in logged}
        self.log_dict(bar, prog_bar=True, batch_size=n)
        self.log_dict(logged, batch_size=n)
        return loss

    def _mean_over_ranks(self, values: dict[str, Any], pairs: int) -> dict[str, torch.Tensor]:
        """``values`` (this rank's batch means) averaged over the ranks, each weighted by
        its real pairs, in one all-reduce: under DDP the logged ``train/*`` were rank 0's
        share of the batch alone. Exact for the per-pair means (rewards, log-probs);
        the NLL and the loss are token means, weighted here by pairs, so close to the
        step's value rather than equal to it."""
        keys = sorted(values)
        device = self.device
        stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32, device=device) * pairs for k in keys]
                              + [torch.tensor(float(pairs), device=device)])
        totals = self.trainer.strategy.reduce(stacked, reduce_op="sum")
        return {k: totals[i] / totals[-1].clamp(min=1) for i, k in enumerate(keys)}

    def on_validation_epoch_start(self) -> None:
        self._val_sums, self._val_pairs = {}, 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """``val/*`` (conditioned) and ``val/uncond/*``: each batch's metrics weighted by
        its real pairs, summed over the ranks at the epoch's end
        (:meth:`on_validation_epoch_end`). Rows that only pad a rank's shard (``pad``,
        :class:`~cfg_unlearn.data.datamodule.ShardSampler`) are left out; a batch of
        padding alone still runs, with weight 0, so that every rank has every key."""
        pad = batch.get("pad")
        if pad is not None and pad.any() and not pad.all():
            batch = _rows_of(batch, ~pad)
        n = batch["cond"]["input_ids"].shape[0]
        weight = 0 if pad is not None and pad.all() else n
        for name, flag in (("val", False), ("val/uncond", True)):
            use_uncond = torch.full((n,), flag)
            x = apply_conditioning(batch, use_uncond, self.cond_mode)
            loss, metrics = self.forward_pairs(x, batch.get("id"), use_uncond, split="val")
            if loss is not None:
                metrics["loss"] = loss
            for k, v in metrics.items():
                key = f"{name}/{k}"
                self._val_sums[key] = self._val_sums.get(key, 0) + v.detach().float() * weight
        self._val_pairs += weight

    def on_validation_epoch_end(self) -> None:
        # one all-reduce of every sum and the pair count, in a fixed key order: the exact
        # mean over the real pairs, however they were sharded (Lightning's sync_dist
        # averages the ranks' means, and counted its padding repeats)
        if not self._val_sums:
            return
        keys = sorted(self._val_sums)
        device = self._val_sums[keys[0]].device
        totals = torch.stack([self._val_sums[k] for k in keys]
                             + [torch.tensor(float(self._val_pairs), device=device)])
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        if totals[-1] > 0:
            # equal on every rank by now: "max" syncs them exactly (a mean of equal floats
            # can round), and syncing at all spares Lightning's epoch-level warning
            self.log_dict({k: totals[i] / totals[-1] for i, k in enumerate(keys)}, prog_bar=False, sync_dist=True,
                          reduce_fx="max")
        self._val_sums, self._val_pairs = {}, 0

    # ------------------------------------------------------------------ reference

    def _lacks_table(self) -> bool:
        """The objective compares with a precomputed reference table, and none is here."""
        return (self.objective in NEEDS_REFERENCE and self.reference == "precomputed"
                and not self._uses_adapters_as_reference() and self.reference_logps is None)

    def on_validation_start(self) -> None:
        # a standalone validate (a fit has its table by now): an untrained module is the
        # starting model, so its validation pairs' table can be scored, for this validate
        # only (a later fit scores its own, under its precision and data); trained or
        # restored weights are not the starting model
        if self.trainer.state.fn == "fit":
            return
        if not self._lacks_table():
            if self.reference_logps is not None and self.reference == "precomputed" \
                    and not self._uses_adapters_as_reference():
                self._check_table_covers_data(splits=("val",))  # a checkpoint's table, this validate's data
            return
        dm = getattr(self.trainer, "datamodule", None)
        if self.checkpoint_step is None and self.trained_step is None and hasattr(dm, "reference_dataloaders"):
            self._validate_table = self.compute_reference_logps(splits=("val",))
            return
        if not hasattr(dm, "reference_dataloaders"):
            why = "the table is scored from a PairDataModule, and " + (
                "dataloaders were given" if dm is None else f"the data module is a {type(dm).__name__}")
        else:
            why = "these weights come with no reference table (restored from a checkpoint that holds none, or trained)"
        rank_zero_warn(f"{self.objective} with reference: precomputed, but {why}, so val/loss and the objective's "
                       "terms are left out; validate with reference: copy, which loads the starting model from `model`")

    def on_validation_end(self) -> None:
        if self.trainer.state.fn != "fit":
            self._validate_table = None
        plateau = self._plateau_after_validation
        if plateau is not None and self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            scheduler, monitor = plateau
            value = self.trainer.callback_metrics.get(monitor)
            if value is None:
                raise ConfigError(f"ReduceLROnPlateau watches {monitor}, which this validation did not log; "
                                  f"logged: {', '.join(sorted(self.trainer.callback_metrics)) or 'nothing'}")
            scheduler.step(float(value))

    def _validates_never(self) -> bool:
        """Whether this fit runs no validation: no validation pairs, or no batches of them."""
        trainer = self.trainer
        if trainer.limit_val_batches == 0:
            return True
        dm = getattr(trainer, "datamodule", None)
        return isinstance(dm, PairDataModule) and dm.val_dataset is None

    def on_fit_start(self) -> None:
        self._window_plan = None  # a second fit may accumulate differently
        half = [n for n, p in self.model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
        if half:
            # torch's optimizers keep their state in the parameter's dtype: AdamW's eps
            # (1e-8) is 0 in float16, and a zero gradient made the weights NaN at the first
            # step, silently (model.dtype float16, or trainer.precision 16-true)
            raise ConfigError(
                f"{len(half)} trainable tensor(s) are float16 (model.dtype: float16, or trainer.precision: 16-true), "
                f"e.g. {_unwrapped(half[0])}: float16 weights cannot be trained without float32 master weights "
                "(AdamW's eps rounds to 0 there, and the weights turn NaN). Train float32 weights under "
                "trainer.precision 16-mixed, or use bfloat16")
        bf16 = [n for n, p in self.model.named_parameters() if p.requires_grad and p.dtype == torch.bfloat16]
        if bf16:
            # PEFT makes its adapters float32 over any base, but bf16-true casts the whole
            # module, adapters included: a LoRA user's fix is the precision, not LoRA
            advice = ("keep the adapters float32 with trainer.precision bf16-mixed (the base may stay bfloat16 "
                      "through model.dtype)" if self.lora is not None else
                      "for full fine-tuning keep model.dtype float32 under trainer.precision bf16-mixed, or train "
                      "LoRA adapters (PEFT keeps them in float32 unless trainer.precision is bf16-true)")
            rank_zero_warn(
                f"{len(bf16)} trainable tensor(s) are bfloat16 (model.dtype: bfloat16, or trainer.precision: "
                "bf16-true): the optimizer updates them in bfloat16 with no float32 master copy, so an update below "
                "bfloat16's resolution (about 1/256 of the weight) is lost (4 steps at lr 1e-5 changed 11.5% of the "
                f"weights, against 75.4% from float32 weights). {advice[0].upper() + advice[1:]}")
        stats = getattr(getattr(self.trainer, "datamodule", None), "stats", None) or {}
        if self.cond_dropout > 0 and stats.get("train_records") and \
                stats.get("train_same_prompts") == stats["train_records"]:
            # (an unconditioned baseline, cond_dropout 0, may train so)
            raise ConfigError(
                "every training pair's conditioned and unconditioned prompts are the same text (data.system_prompt "
                "blank or equal to data.uncond_system_prompt, and no row with a system message of its own that "
                f"differs), so model.cond_dropout={self.cond_dropout} and guidance would do nothing; set "
                "data.system_prompt to the instruction and data.uncond_system_prompt to something else (or leave it "
                "unset: no system message)")
        self._build_reference()
        if self._lacks_table():
            if self.trainer.ckpt_path is not None:
                # the weights are the checkpoint's by now: a table scored on them would make
                # the trained model its own reference (NPO's weight back to 1)
                raise ConfigError(
                    f"reference: precomputed, but the checkpoint {self.trainer.ckpt_path} holds no reference table "
                    "(it comes from another objective or reference mode), and the resumed weights are not the "
                    "starting model; resume with reference: copy, which loads the starting model from `model`")
            self.reference_logps = self.compute_reference_logps()
            self.reference_fingerprints = self._data_fingerprints()
        elif self.reference_logps is not None and self.reference == "precomputed" \
                and not self._uses_adapters_as_reference():
            self._check_table_covers_data()

    def _data_fingerprints(self, splits: tuple[str, ...] = ("train", "val")) -> dict[str, int]:
        """``"split:id" -> pair_fingerprint`` of the data module's pairs of ``splits``."""
        dm = getattr(self.trainer, "datamodule", None)
        out = {}
        for split in splits:
            ds = getattr(dm, f"{split}_dataset", None)
            for item in ds if ds is not None else ():  # each built once (PairDataset builds items on access)
                out[f"{split}:{item['id']}"] = pair_fingerprint(item)
        return out

    def _check_table_covers_data(self, splits: tuple[str, ...] = ("train", "val")) -> None:
        """A checkpoint's reference table must hold every pair of this run's data (its
        ``splits``), as it was encoded when the table was scored. A pair missing from it failed only when
        its batch came up, mid-epoch, and under DDP on one rank alone, while the others
        waited in a collective (a gloo traceback there); a pair whose id stayed but whose
        text changed (another world seed, a regenerated file, another tokenizer,
        max_length or instruction) was compared with a reference scored on other tokens,
        silently (NPO's loss 11.8 where it was 0.59; a validate's val/loss 1.91 where it
        was 11.54)."""
        now = self._data_fingerprints(splits)
        saved = self.reference_fingerprints
        for split in splits:
            keys = [k for k in now if k.startswith(f"{split}:")]
            missing = [k for k in keys if k not in self.reference_logps]
            changed = [k for k in keys if saved is not None and k in saved and saved[k] != now[k]]
            for bad, what in ((missing, "have no entry in it"), (changed, "were encoded differently when it was "
                                                                         "scored (other text, tokenizer, max_length, "
                                                                         "instruction or answer end token)")):
                if bad:
                    shown = ", ".join(repr(k.split(":", 1)[1]) for k in bad[:3]) + (", ..." if len(bad) > 3 else "")
                    raise ConfigError(
                        f"the precomputed reference log-probs (reference: precomputed: scored once on the starting "
                        f"model, and kept in checkpoints) do not fit this data: {len(bad)} of the {len(keys)} {split} "
                        f"pairs ({shown}) {what}. Use the data they were scored on, or reference: copy")
        if saved is None:
            rank_zero_warn("the checkpoint's precomputed reference table has no fingerprints of the pairs it was "
                           "scored on (an older checkpoint): whether this data is the same cannot be checked")

    def compute_reference_logps(self, splits: tuple[str, ...] = ("train", "val")) -> dict[str, torch.Tensor]:
        """Summed response log-probs of the current (starting) model for every pair of
        the data module's ``splits``, both variants and both answers: ``"split:id" -> (2,
        2)`` tensor.
        Every rank computes the whole table, so no collective is needed. It runs before
        the first step, outside Lightning's forward: the root FSDP parameters are
        gathered and the precision plugin's autocast is on, as in a training step (a
        table scored in float32 would make a ``bf16-mixed`` policy differ from its own
        reference at step 0)."""
        from tqdm.auto import tqdm

        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "reference_dataloaders"):
            raise ConfigError("reference='precomputed' needs a PairDataModule (data: in the config)")
        table: dict[str, torch.Tensor] = {}
        loaders = {split: dl for split, dl in dm.reference_dataloaders().items() if split in splits}
        total = sum(len(dl) for dl in loaders.values())
        with torch.no_grad(), eval_mode(self.model), forward_outside_step(self.trainer.strategy):
            # the trainer's own setting: enable_progress_bar=False (the demo's --quiet) drew this one
            quiet = getattr(self.trainer, "progress_bar_callback", None) is None
            bar = tqdm(total=total, desc="reference log-probs", disable=self.global_rank != 0 or quiet)
            for split, dl in loaders.items():
                for batch in dl:
                    per_variant = []
                    for v in VARIANTS:
                        x = {k: batch[v][k].to(self.device) for k in TENSOR_KEYS}
                        rows = {k: torch.cat([x[k][:, 0], x[k][:, 1]]) for k in TENSOR_KEYS}
                        logits = self.model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"],
                                            use_cache=False).logits
                        logps, _ = token_logps(logits, rows["labels"])
                        per_variant.append(logps.sum(-1).float().view(2, -1).T.cpu())  # (B, side)
                    for i, pid in enumerate(batch["id"]):
                        table[f"{split}:{pid}"] = torch.stack([per_variant[0][i], per_variant[1][i]])
                    bar.update(1)
            bar.close()
        return table

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_finite_weights()
        # hparams keep `model` as given; a relative path breaks when the checkpoint is
        # exported from another folder, so the absolute one travels with it (export reads it)
        checkpoint["model_abspath"] = absolute_model_name(self.model_name)
        if self._trainer is not None and self.trainer.optimizers:  # what a resume must rebuild (on_train_start)
            checkpoint["optimizer_classes"] = [_class_name(type(o)) for o in self.trainer.optimizers]
        if self._adapter_only():
            trainable = self._checkpoint_keys(trainable_only=True)
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
            if self._base_fingerprint is not None:
                checkpoint["base_fingerprint"], checkpoint["base_fingerprint_dtypes"] = self._base_fingerprint
        # a resumed run must compare against the *starting* model, not the resumed one
        if self.reference_logps is not None:
            keys = sorted(self.reference_logps)
            checkpoint["reference_logps"] = {"keys": keys,
                                             "values": torch.stack([self.reference_logps[k] for k in keys])}
            prints = self.reference_fingerprints
            if prints is not None and all(k in prints for k in keys):
                checkpoint["reference_logps"]["fingerprints"] = torch.tensor([prints[k] for k in keys])

    def _check_finite_weights(self) -> None:
        """Refuse to checkpoint non-finite trainable weights. An update that overflows
        shows in the next step's loss (``TrainingDiverged``), but a checkpoint written
        before that step (an epoch's end, the fit's last step) saved the NaN weights,
        over the last good ``last.ckpt``, and the fit ended with status 0."""
        bad = next((n for n, p in self.named_parameters() if p.requires_grad and p.numel()
                    and not bool(torch.isfinite(p.detach()).all())), None)
        # every rank saves together; under FSDP each holds a shard, so agree on it
        if self._trainer is not None and self.trainer.world_size > 1:
            anywhere = self.trainer.strategy.reduce_boolean_decision(bad is not None, all=False)
        else:
            anywhere = bad is not None
        if anywhere:
            where = f"{_unwrapped(bad)} is" if bad is not None else "trainable weights on another rank are"
            raise NonFiniteWeights(
                f"not saving a checkpoint at step {self.global_step}: {where} NaN or infinite (training diverged). "
                "Lower model.optimizer's lr or clip gradients (trainer.gradient_clip_val), and resume from an "
                "earlier checkpoint")

    def _adapter_only(self) -> bool:
        return self.lora is not None and self.lora.adapter_only_checkpoints

    def _checkpoint_keys(self, trainable_only: bool) -> set[str]:
        """The module's state-dict keys as a checkpoint names them (``model.<name>``;
        FSDP/activation-checkpoint wrappers add name parts the saved keys do not have)."""
        return {f"model.{_unwrapped(n)}"
                for n, p in [*self.model.named_parameters(), *([] if trainable_only else self.model.named_buffers())]
                if not trainable_only or p.requires_grad}

    def _check_adapter_checkpoint(self, state_dict: dict[str, Any]) -> None:
        """Adapter-only checkpoints load non-strictly (the frozen base comes from
        ``model``), which would also hide adapters the checkpoint lacks or holds for
        another LoRA config (``target_modules``, ``r``): those load as nothing, silently.
        Every trainable key must be there, and every key must be the module's."""
        missing = sorted(self._checkpoint_keys(trainable_only=True) - set(state_dict))
        unexpected = sorted(set(state_dict) - self._checkpoint_keys(trainable_only=False))
        if missing or unexpected:
            def some(keys):
                return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

            parts = ([f"{len(missing)} trainable tensor(s) missing: {some(missing)}"] if missing else []) + (
                [f"{len(unexpected)} tensor(s) this model does not have: {some(unexpected)}"] if unexpected else [])
            raise ConfigError(f"the adapter checkpoint does not fit model {self.model_name} with LoRA settings "
                              f"{self.lora} (" + "; ".join(parts) + "): is it the model and LoRA settings the "
                              "checkpoint was trained with?")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        keys = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self._adapter_only() and not strict:
            # the frozen base is absent by design (it comes from `model`; on_load_checkpoint
            # has checked every adapter): left in, Lightning's load_from_checkpoint listed
            # each of its tensors as a missing key, which read as a broken load
            frozen = self._checkpoint_keys(trainable_only=False) - self._checkpoint_keys(trainable_only=True)
            keys.missing_keys[:] = [k for k in keys.missing_keys if _unwrapped(k) not in frozen]
        return keys

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.checkpoint_step, self.trained_step = int(checkpoint.get("global_step", 0)), None
        if self._adapter_only() and self.model is not None and isinstance(checkpoint.get("state_dict"), dict):
            self._check_adapter_checkpoint(checkpoint["state_dict"])
            saved = (checkpoint.get("base_fingerprint"), checkpoint.get("base_fingerprint_dtypes"))
            mine = self._base_fingerprint
            # comparable only for the same load dtypes (another dtype rounds the same base otherwise)
            if saved[0] is not None and mine is not None and saved[1] == mine[1] and saved[0] != mine[0]:
                raise ConfigError(
                    f"the adapter checkpoint was trained over another base model than {self.model_name}: the base "
                    f"weights differ (fingerprint {saved[0]:08x} at training, {mine[0]:08x} now), and its adapters "
                    "would load over them silently. Give the base it was trained on (model.model, or export's "
                    "--base-model)")
        self._saved_optimizer_classes = checkpoint.get("optimizer_classes")
        schedules = checkpoint.get("lr_schedulers")
        # a training checkpoint's (one a validate saved holds no optimizer state either)
        self._saved_schedules = len(schedules) if isinstance(schedules, list) and checkpoint.get(
            "optimizer_states") else None
        saved = checkpoint.get("reference_logps")
        if saved is not None and "keys" in saved:
            self.reference_logps = dict(zip(saved["keys"], saved["values"]))
            prints = saved.get("fingerprints")
            self.reference_fingerprints = None if prints is None else dict(zip(saved["keys"], prints.tolist()))
        elif saved is not None:  # before tables were keyed by split: bare ids, either split
            self.reference_fingerprints = None
            self.reference_logps = {f"{split}:{i}": v for i, v in zip(saved["ids"], saved["values"])
                                    for split in ("train", "val")}

    def on_train_start(self) -> None:
        # after Lightning restored the optimizer state, whichever strategy restores when
        saved, self._saved_optimizer_classes = self._saved_optimizer_classes, None
        built = [_class_name(type(o)) for o in self.trainer.optimizers]
        if self.trainer.ckpt_path is not None and saved and saved != built:
            # torch's load_state_dict takes the saved param groups whole: SGD over an AdamW
            # state failed at its first step with KeyError 'momentum', and Adam over it ran
            # as AdamW (the group's decoupled_weight_decay), silently
            raise ConfigError(
                f"the checkpoint {self.trainer.ckpt_path} holds the state of {', '.join(saved)}, but this fit builds "
                f"{', '.join(built)}: a resumed fit restores the optimizer's state and settings, which only the "
                "optimizer that saved them can use. Resume with that optimizer (model.optimizer), or start a new fit "
                "from the checkpoint's weights (cfg-unlearn export --ckpt CKPT --out DIR, then --model.model DIR)")
        schedules, self._saved_schedules = self._saved_schedules, None
        configured = len(self.trainer.lr_scheduler_configs)
        if self.trainer.ckpt_path is not None and schedules is not None and schedules != configured:
            # Lightning restores the schedules it finds in both: a schedule added on resume
            # started from its own step 0 (warm-up again half-way through training, the
            # cosine ending far above its floor); one dropped left the rate where it was
            raise ConfigError(
                f"the checkpoint {self.trainer.ckpt_path} was trained with {schedules} learning-rate schedule(s), "
                f"this fit configures {configured} (model.lr_scheduler): "
                + ("an added schedule would start from its own first step at step "
                   f"{self.trainer.global_step}" if configured > schedules else
                   "without it the learning rate stays where the schedule had left it")
                + ". Resume with the checkpoint's model.lr_scheduler, or start a new fit from the checkpoint's "
                "weights (cfg-unlearn export --ckpt CKPT --out DIR, then --model.model DIR)")

        # the steps the weights had before this fit: a resumed fit's global_step counts
        # them already; a new fit on restored or trained weights starts at 0
        self._steps_before = 0 if self.trainer.ckpt_path is not None else (
            self.checkpoint_step if self.checkpoint_step is not None else self.trained_step or 0)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self._steps_before + self.trainer.global_step
        now = self.trained_step if self.trained_step is not None else self.checkpoint_step
        if step != (now or 0):  # an optimizer step moved the weights (not every micro-batch does)
            self.trained_step, self.checkpoint_step = step, None

    def on_train_epoch_start(self) -> None:
        self.cond_counts = [0, 0]

    def on_train_epoch_end(self) -> None:
        # summed over ranks (every rank calls this hook, so the collective is safe)
        counts = torch.tensor(self.cond_counts, dtype=torch.long, device=self.device)
        dropped, total = self.trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        if total and self.cond_dropout > 0:
            rank_zero_info(f"conditioning dropout: {dropped}/{total} samples unconditioned ({dropped / total:.3f})")

    # ------------------------------------------------------------------ optim

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("no trainable parameters: everything is frozen")
        optimizer = self.optimizer_factory(params)
        self._plateau_after_validation = None
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if getattr(scheduler, "needs_total_steps", False):
            total = self.trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ConfigError(
                    f"{type(scheduler).__name__} needs the number of training steps, but this fit has no end in "
                    "steps (max_epochs: -1, e.g. with max_time): set trainer.max_steps or trainer.max_epochs")
            scheduler.set_total_steps(int(total))
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # it steps on a metric, which Lightning reads by name once per epoch (after
            # validation); LightningCLI's own ReduceLROnPlateau carries the name
            monitor = getattr(scheduler, "monitor", None)
            if not monitor:
                raise ConfigError("ReduceLROnPlateau needs the metric it watches: use "
                                  "lightning.pytorch.cli.ReduceLROnPlateau with monitor: (e.g. val/loss, or "
                                  "eval@g=2.0/leak_rate with GuidanceEval)")
            never = self._validates_never()
            if monitor.startswith("val/") and never:
                raise ConfigError(f"ReduceLROnPlateau watches {monitor}, but this fit never validates (no "
                                  "validation pairs, or trainer.limit_val_batches 0): give data.val_fraction or "
                                  "data.val_file, or watch a GuidanceEval metric (eval@g=.../...)")
            every = self.trainer.check_val_every_n_epoch
            if every is None and not never:
                # validation every N steps, across epochs (check_val_every_n_epoch: null):
                # Lightning's plateau stepping is per epoch or per batch index of an epoch,
                # and at the first epoch end, before any validation, it found no metric and
                # ended the fit. Stepped after each validation instead (on_validation_end)
                self._plateau_after_validation = (scheduler, monitor)
                return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": monitor,
                                                                 "frequency": _NEVER}}
            # stepped at the epochs that validate (a val/* or eval@ metric exists only there);
            # in a fit that never validates, GuidanceEval's eval@ metrics come at every epoch's end
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": monitor,
                                                             "frequency": every or 1}}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
