"""Training objectives as small pure functions on tensors: testable without a model.

Conventions: ``labels`` are aligned with ``input_ids`` (same shape), ``-100`` marks
positions that are not scored; functions shift them internally (token t is predicted
from positions < t), as Hugging Face and TRL do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
_MINUS_LN2 = -math.log(2.0)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of ``labels`` and the mask of scored tokens.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)``, ``-100`` where not scored.

    Returns:
        ``(logps, mask)``, both ``(B, T-1)``; ``logps`` is 0 where ``mask`` is False.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    # gather - logsumexp: no (B, T, V) log-softmax tensor is materialised twice
    picked = torch.gather(logits, -1, safe.unsqueeze(-1)).squeeze(-1)
    logps = (picked - torch.logsumexp(logits, dim=-1)) * mask
    return logps, mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = True) -> torch.Tensor:
    """Per-sequence log-probability of the scored tokens: the mean over them
    (``average=True``, ORPO) or their sum (NPO, DPO). Shape ``(B,)``."""
    logps, mask = token_logps(logits, labels)
    return masked_sequence_mean(logps, mask) if average else logps.sum(-1)


def masked_sequence_mean(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean of ``logps`` over ``mask`` (``(B, T)`` -> ``(B,)``); 0 for empty rows."""
    return (logps * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable at both ends (Maechler 2012): near 0
    ``log(-expm1(x))`` keeps precision where ``1 - exp(x)`` cancels; far below,
    ``log1p(-exp(x))`` does. The naive form is NaN/-inf as ``x -> 0`` (TRL #2564)."""
    # evaluate each branch only where it is safe, so no inf/NaN reaches autograd
    near = x > _MINUS_LN2
    x_near = torch.where(near, x, torch.full_like(x, -1.0))
    x_far = torch.where(near, torch.full_like(x, -1.0), x)
    return torch.where(near, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO (Hong, Lee, Thorne 2024, arXiv 2403.07691): ``L = NLL(chosen) + beta * L_OR``.

    With length-averaged log-probs ``lp`` (so ``exp(lp)`` is a per-token odds base)::

        log_odds = (lp_c - lp_r) - (log1mexp(lp_c) - log1mexp(lp_r))
        L_OR     = -log sigmoid(log_odds)

    Args:
        chosen_logps, rejected_logps: ``(B,)`` length-averaged log-probs, ``<= 0``.
        chosen_nll: the NLL term, a scalar (token mean over the batch, as TRL) or ``(B,)``
            (averaged here).
        beta: weight of the odds-ratio term (the paper's lambda; TRL's ``beta``).

    Returns:
        ``(loss, metrics)``; metrics (detached) are the ones TRL logs:
        ``rewards/chosen = beta * lp_c`` (batch mean), ``rewards/rejected``,
        ``rewards/margins``, ``rewards/accuracies``, ``log_odds_ratio`` (mean
        ``log sigmoid(log_odds)``), ``log_odds_chosen`` (mean ``log_odds``), ``nll_loss``.
    """
    # at least fp32 (bf16 log-odds are too coarse), fp64 stays fp64
    dt = torch.promote_types(chosen_logps.dtype, torch.float32)
    lp_c, lp_r = chosen_logps.to(dt), rejected_logps.to(dt)
    # a log-prob of exactly 0 would make the odds infinite; clamp a hair below
    # (float32 resolution near 0 is ~1e-45, far beyond anything a model produces)
    lp_c = lp_c.clamp(max=-1e-30)
    lp_r = lp_r.clamp(max=-1e-30)
    log_odds = (lp_c - lp_r) - (log1mexp(lp_c) - log1mexp(lp_r))
    ratio = F.logsigmoid(log_odds)
    nll = chosen_nll.to(dt).mean()
    loss = nll - beta * ratio.mean()
    with torch.no_grad():
        r_c, r_r = beta * lp_c, beta * lp_r
        metrics = {
            "rewards/chosen": r_c.mean(),
            "rewards/rejected": r_r.mean(),
            "rewards/margins": (r_c - r_r).mean(),
            "rewards/accuracies": (r_c > r_r).float().mean(),
            "log_odds_ratio": ratio.mean(),
            "log_odds_chosen": log_odds.mean(),
            "nll_loss": nll.detach(),
        }
    return loss, metrics


def masked_nll(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean negative log-likelihood over the scored tokens of a batch (what
    ``nn.CrossEntropyLoss`` with ``ignore_index=-100`` computes)."""
    return -(logps * mask).sum() / mask.sum().clamp(min=1)
