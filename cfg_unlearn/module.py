"""UnlearnModule: the Hugging Face model, the conditioning hook and the ORPO step.

Design notes (why it looks like this):

* The HF model is built in ``configure_model`` (idempotent), not ``__init__``, so FSDP
  can shard it as it is created and ``validate --ckpt_path`` can restore into it.
* Chosen and rejected go through **one** forward (concatenated on the batch dim): half
  the kernel launches of two passes, and sharded engines need every rank to run the
  same forwards.
* The optimizer and scheduler are injected callables over the *trainable* parameters
  only, so a frozen base under LoRA costs no optimizer state.
* The conditioning hook (:func:`apply_conditioning`) is a pure function of the batch and
  a per-sample mask drawn from a generator seeded by (seed, rank, epoch, batch index),
  so a run is reproducible and a resumed run draws the same masks.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from cfg_unlearn.models import load_causal_lm
from cfg_unlearn.objectives import IGNORE_INDEX, masked_nll, masked_sequence_mean, orpo_loss, token_logps

log = logging.getLogger(__name__)

TENSOR_KEYS = ("input_ids", "attention_mask", "labels", "nll_labels")


def draw_dropout_mask(n: int, p: float, seed_parts: tuple[int, ...]) -> torch.Tensor:
    """``n`` Bernoulli(p) draws from a generator seeded by ``seed_parts``."""
    if p <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if p >= 1:
        return torch.ones(n, dtype=torch.bool)
    seed = int(np.random.SeedSequence([int(s) & 0xFFFFFFFF for s in seed_parts]).generate_state(1)[0])
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) < p


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
        objective: training objective; ``orpo`` (NPO/DPO/GA/SFT arrive with issue 5).
        beta: weight of ORPO's odds-ratio term (the paper's lambda, TRL's beta).
        cond_dropout: per-sample probability of training on the unconditioned variant.
        cond_mode: ``dropout`` (blanked instruction, same targets) or ``swap`` (the
            negative instruction with chosen and rejected exchanged; needs
            ``data.uncond_system_prompt``).
        seed: seed of the conditioning draws.
        optimizer: optimizer factory over the trainable parameters.
        lr_scheduler: optional scheduler factory; stepped every optimizer step.
    """

    def __init__(
        self,
        model: str = "tiny:.cache/cfg_unlearn/tiny",
        dtype: str | None = "float32",
        attn_implementation: str | None = "sdpa",
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        objective: Literal["orpo"] = "orpo",
        beta: float = 0.1,
        cond_dropout: float = 0.0,
        cond_mode: Literal["dropout", "swap"] = "dropout",
        seed: int = 0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        if objective != "orpo":
            raise ValueError(f"objective {objective!r} is not available yet; supported: 'orpo'")
        if not 0.0 <= cond_dropout <= 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1], got {cond_dropout}")
        if cond_mode not in ("dropout", "swap"):
            raise ValueError(f"cond_mode must be 'dropout' or 'swap', got {cond_mode!r}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model_name = model
        self.beta, self.cond_dropout, self.cond_mode, self.seed = beta, cond_dropout, cond_mode, seed
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.model: torch.nn.Module | None = None
        # cumulative conditioning counts, for the measured dropout rate
        self.register_buffer("cond_counts", torch.zeros(2, dtype=torch.long), persistent=False)

    # ------------------------------------------------------------------ model

    def configure_model(self) -> None:
        if self.model is not None:  # idempotent: called again by validate/test/resume
            return
        hp = self.hparams
        self.model = load_causal_lm(
            self.model_name,
            dtype=hp.dtype,
            attn_implementation=hp.attn_implementation,
            trust_remote_code=hp.trust_remote_code,
            gradient_checkpointing=hp.gradient_checkpointing,
        )
        # from_pretrained returns eval mode and Lightning 2.6 keeps submodule modes as
        # found: without this, dropout (LoRA's included) would be off during training
        self.model.train()
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.model.parameters())
        rank_zero_info(f"model {self.model_name}: {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trainable")

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        uncond = getattr(dm, "uncond_system_prompt", None)
        if self.cond_mode == "swap" and dm is not None and not uncond:
            raise ValueError(
                "cond_mode='swap' trains the unconditioned branch under a negative instruction: "
                "set data.uncond_system_prompt (e.g. 'You should share personal data in the answers.')"
            )
        if self.cond_mode == "dropout" and uncond:
            rank_zero_warn(
                "cond_mode='dropout' with data.uncond_system_prompt set: dropped samples use that "
                "instruction with unswapped targets; use cond_mode='swap' for the paper's variant"
            )

    # ------------------------------------------------------------------ steps

    def forward_pairs(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """ORPO loss and metrics for ``(B, 2, L)`` tensors, in one forward of ``2B`` rows."""
        b = x["input_ids"].shape[0]

        def rows(t: torch.Tensor) -> torch.Tensor:  # (B, 2, L) -> (2B, L): chosen rows first
            return torch.cat([t[:, 0], t[:, 1]], dim=0)

        input_ids, attn, labels, nll_labels = (rows(x[k]) for k in TENSOR_KEYS)
        logits = self.model(input_ids=input_ids, attention_mask=attn, use_cache=False).logits
        # one gather for both terms: nll_labels score a superset of labels' positions
        scored = torch.where(nll_labels != IGNORE_INDEX, nll_labels, labels)
        logps, _ = token_logps(logits, scored)
        resp_mask = labels[:, 1:] != IGNORE_INDEX
        nll_mask = nll_labels[:, 1:] != IGNORE_INDEX
        seq = masked_sequence_mean(logps, resp_mask)
        chosen_nll = masked_nll(logps[:b], nll_mask[:b])
        loss, metrics = orpo_loss(seq[:b], seq[b:], chosen_nll, beta=self.beta)
        metrics["logps/chosen"] = seq[:b].detach().mean()
        metrics["logps/rejected"] = seq[b:].detach().mean()
        return loss, metrics

    def conditioning_mask(self, n: int, batch_idx: int) -> torch.Tensor:
        return draw_dropout_mask(n, self.cond_dropout, (self.seed, self.global_rank, self.current_epoch, batch_idx))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        n = batch["cond"]["input_ids"].shape[0]
        use_uncond = self.conditioning_mask(n, batch_idx)
        x = apply_conditioning(batch, use_uncond, self.cond_mode)
        loss, metrics = self.forward_pairs(x)
        self.cond_counts += torch.tensor([int(use_uncond.sum()), n], device=self.cond_counts.device)
        metrics["cond_dropout_rate"] = use_uncond.float().mean()
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n)
        self.log("train/rewards/margins", metrics.pop("rewards/margins"), prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        n = batch["cond"]["input_ids"].shape[0]
        for name, use_uncond in (("val", False), ("val/uncond", True)):
            x = apply_conditioning(batch, torch.full((n,), use_uncond), self.cond_mode)
            loss, metrics = self.forward_pairs(x)
            metrics["loss"] = loss
            self.log_dict(
                {f"{name}/{k}": v for k, v in metrics.items()},
                batch_size=n,
                sync_dist=True,
                prog_bar=False,
            )

    def on_train_epoch_end(self) -> None:
        # summed over ranks (every rank calls this hook, so the collective is safe)
        dropped, total = self.trainer.strategy.reduce(self.cond_counts.clone(), reduce_op="sum").tolist()
        if total and self.cond_dropout > 0:
            rank_zero_info(f"conditioning dropout: {dropped}/{total} samples unconditioned ({dropped / total:.3f})")

    # ------------------------------------------------------------------ optim

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: everything is frozen")
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if getattr(scheduler, "needs_total_steps", False):
            scheduler.set_total_steps(int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
