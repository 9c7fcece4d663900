"""SAFT: filter PII-leaking samples out of fine-tuning data, without labels.

Choi, Du, Li 2024, "Safety-Aware Fine-Tuning of Large Language Models"
(arXiv:2410.10014). No official code is public; the steps here follow the paper's
description (``docs/method.md`` section 4) and HaloScope's subspace score it builds on:

1. **Embed** every sample with the model: the chat-rendered conversation, one hidden
   layer, pooled over the sample's tokens (``mean``) or taken at its last token (``last``).
2. **Centre** the embedding matrix and take its top-``k`` right singular vectors. Leaky
   samples are a minority that differs from the rest in a consistent way, so they pull
   the leading directions towards themselves.
3. **Score** each sample. ``--score projection`` is the paper's: the size of its
   projection on those directions (for ``k = 1`` the signed projection, oriented as
   below, or its absolute value; for ``k > 1`` the norm, optionally weighted by the
   singular values). ``--score whitened``, the default, divides each direction's
   projection by that direction's spread before taking the norm (the Mahalanobis
   distance within the top-``k`` subspace, :func:`whitened_scores`), with ``k`` up to
   64: a leaky minority that is far out on a small direction counts as much as one on
   the largest. Measured on the synthetic contaminated sets, the largest directions
   separate kinds of benign rows, not the leaks (README, "SAFT filtering").
4. **Remove** the high scorers: a fraction, or everything at or above a threshold.

With a small labelled set, the layer, ``k`` and (projection) the sign are picked by
AUROC on it (the subspace is still fitted on all samples, labelled or not).

**The sign.** A singular vector's sign is arbitrary. We orient every direction so that
the projections of the fitted data have a non-negative third moment (skew to the
positive side). A minority cluster sits in the long tail of the projection, so ``+``
(the ``auto`` default for ``k = 1``) ranks the minority side highest: under SAFT's own
premise (harmful samples are the minority) this is the label-free choice. ``-`` is the
reverse, ``abs`` the unsigned size.

**Defaults** (used as-is without labels): the middle layer (``hidden_states[L // 2]``
of an ``L``-layer model; 0 is the embedding output, ``L`` or ``-1`` the last layer),
``mean`` pooling over the sample's tokens except the first (the first position is an
attention sink whose activations are orders of magnitude larger in big models; left in,
it turns the leading direction into 1/length), the whitened score on ``k = min(64,
samples // 10)`` directions, remove 10%. The layer and pooling were fixed before
measuring anything; the whitened score replaced the paper's ``k = 1`` projection (sign
``auto``) after it was measured to miss most leaks (README).

**What a sample is.** A conversation row ``{"id", "messages", ["system"], ["pii"],
["label"]}``, rendered whole with the tokenizer's chat template (the README's fallback
format without one). A pair row (``prompt``/``chosen``/``rejected``, every variant
:mod:`cfg_unlearn.data.schema` reads) becomes the prompt plus **one** answer:
``rejected`` by default, because that is the side a pair takes from the original,
possibly contaminated data (the one to find); ``--pair-side chosen`` audits the
replacement answers instead (a chosen answer that still leaks is the worst row of a
pair file: training pulls the model towards it).

``cfg-unlearn saft --model M --data D --out O`` writes to ``O``: ``kept.jsonl`` and
``removed.jsonl`` (input rows, byte for byte), ``scores.jsonl`` (``id, score, removed,
[label]``), ``saft.json`` (settings, picks, AUROC table, counts, evaluation on any known
labels) and ``scores_hist.png``, as one set: all five are written to temp files first
and renamed at the end (``saft.json`` last), so a failed or killed run replaces none of
a previous run's files. Nothing from a sample's text is printed.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cfg_unlearn.data.schema import (
    DEFAULT_MAX_CHARS,
    PairFormatError,
    ReadStats,
    _messages,
    _pii_field,
    _read_records,
    _record_id,
    _text,
    iter_jsonl,
    iter_raw_lines,
    not_an_object,
    record_from_dict,
)
from cfg_unlearn.prompts import render_chat
from cfg_unlearn.utils import (atomic_write_files, check_out_dir, check_writable_file, command_parser,
                               console_logging, eval_mode, exit_with_error, hf_progress_bars_off)

log = logging.getLogger(__name__)

POOLINGS = ("mean", "last")
#: ``whitened`` (default): the distance from the centre in the top-k subspace, each
#: direction in units of its own spread; ``projection``: the paper's size of the projection
SCORES = ("whitened", "projection")
DEFAULT_SCORE = "whitened"
#: at most this many directions for the whitened score by default (and one per 10 samples)
WHITENED_MAX_K = 64
#: k values tried with labels for the whitened score (each capped by :func:`default_whitened_k`)
WHITENED_SEARCH_K = (8, 16, 32, 64)
SIGNS = ("auto", "+", "-", "abs")
#: sign candidates tried per k when picking by labels (k > 1 has only the norm)
SEARCH_SIGNS_K1 = ("+", "-", "abs")
DEFAULT_SEARCH_K = (1, 2, 3, 4, 5)
DEFAULT_REMOVE_FRACTION = 0.1
#: at most this many layers are embedded for a label-driven search by default
MAX_SEARCH_LAYERS = 8


# =========================================================================== data


@dataclass(frozen=True)
class Sample:
    """One row to score: the conversation as rendered for the model, its label if known."""

    id: str
    messages: tuple[dict[str, str], ...]
    system: str | None = None
    label: int | None = None
    line: int = 0
    source: str = field(default="", compare=False)
    #: the row's ``id`` as written (an integer stays one in scores.jsonl), else ``id``
    raw_id: Any = field(default=None, compare=False)


def _shown_label(raw: Any) -> str:
    # a number is quoted back; other values only by kind (a "label" field can hold PII spans)
    return f"{type(raw).__name__} {raw!r}" if isinstance(raw, (int, float)) else type(raw).__name__


def parse_label(obj: dict, src: str, line: int | None) -> int | None:
    """``label``: 0/1 (benign/leaky) or false/true; absent or null = unlabelled."""
    raw = obj.get("label")
    if raw is None:
        return None
    if isinstance(raw, bool):
        return int(raw)
    if isinstance(raw, int) and raw in (0, 1):
        return raw
    if isinstance(raw, float) and raw in (0.0, 1.0):
        return int(raw)
    raise PairFormatError(src, line, "label", f"expected 0 (benign) or 1 (leaky), got {_shown_label(raw)}")


def sample_from_dict(
    obj: Any, *, source: str = "<dict>", line: int | None = None, pair_side: str = "rejected",
    max_chars: int = DEFAULT_MAX_CHARS,
) -> Sample:
    """Validate one row: a conversation (``messages``) or a pair (see the module docstring)."""
    src = source
    if not isinstance(obj, dict):
        raise not_an_object(src, line, obj)
    if "messages" in obj:
        msgs = _messages(obj["messages"], src, line, "messages", max_chars)
        system = _text(obj, "system", src, line, max_chars, required=False)
        if system is not None and not system.strip():
            system = None  # "": none of its own, as in the pair format (datasets write it so)
        if msgs[0]["role"] == "system":
            if system is not None:
                raise PairFormatError(src, line, "system", "given both as a field and as a system message")
            system, msgs = msgs[0]["content"], msgs[1:]
        if not msgs:
            raise PairFormatError(src, line, "messages", "holds only a system message")
        for i, m in enumerate(msgs):
            if m["role"] == "system":
                raise PairFormatError(src, line, f"messages[{i}].role", "a system message is only allowed first")
        _pii_field(obj, src, line, max_chars)  # validated like the pair format's, not used
    elif any(k in obj for k in ("prompt", "chosen", "rejected")):
        rec = record_from_dict(obj, source=src, line=line, max_chars=max_chars)
        answer = rec.rejected if pair_side == "rejected" else rec.chosen
        msgs, system = [*rec.prompt, {"role": "assistant", "content": answer}], rec.system
    else:
        raise PairFormatError(
            src, line, "messages",
            "missing required field (a row is a conversation {id, messages} or a pair {prompt, chosen, rejected})",
        )
    rid = _record_id(obj, src, line)
    return Sample(rid, tuple(msgs), system, parse_label(obj, src, line), line or 0,
                  f"{src}:{line}" if line is not None else src, obj["id"] if obj.get("id") is not None else rid)


def read_samples(
    path: str | os.PathLike, *, pair_side: str = "rejected", on_error: str = "raise",
    max_chars: int = DEFAULT_MAX_CHARS,
) -> tuple[list[Sample], list[str], ReadStats]:
    """Read a data file: the validated samples, each sample's original line (for
    writing kept/removed rows unchanged) and the read statistics. Bad rows raise
    ``file:line: field 'x': why`` (or, with ``on_error="skip"``, are counted and logged)."""
    if pair_side not in ("rejected", "chosen"):
        raise ValueError(f"pair_side must be 'rejected' or 'chosen', got {pair_side!r}")
    if os.path.exists(path) and not os.path.isfile(path):
        raise PairFormatError(str(path), None, None, "not a regular file: the data is read twice (its rows, then "
                                                     "their original lines for kept/removed); write it to a file first")
    samples, stats = _read_records(
        path,
        lambda obj, line: sample_from_dict(obj, source=str(path), line=line, pair_side=pair_side, max_chars=max_chars),
        "samples", on_error,
    )
    # the same lines iter_jsonl numbered; only the samples' are held (not a skipped
    # over-long line, nor the whole file)
    wanted = {s.line for s in samples}
    raw = {n: line.removesuffix(b"\n").rstrip(b"\r") for n, line, _ in iter_raw_lines(path) if n in wanted}
    lines = [raw[s.line].decode("utf-8") for s in samples]
    return samples, lines, stats


def read_labels(
    path: str | os.PathLike, known_ids: dict[str, int] | None = None, data_labels: dict[str, int] | None = None,
    on_error: str = "raise", skipped: list[str] | None = None,
) -> dict[str, int]:
    """A labelled JSONL: ``{"id", "label"}`` per line (other fields ignored, so the data
    file itself works too, or a labelled copy of it whose rows carry ids; rows without a
    label are skipped). With ``known_ids`` (id -> index: a labels file other than the
    data), a row without an id is an error naming the line (ids default to the file's
    name and line, which would match the data's rows by line when both files have the
    same name), and so is an id not in the data; with ``data_labels`` (id -> the data
    row's own label), so is a label that contradicts it.

    ``on_error="skip"`` (``--on-error skip``) skips a bad line, or a label whose id is
    not in the data (the data's bad rows were skipped), instead: each is logged and its
    ``file:line`` appended to ``skipped``. Duplicates and contradictions stay errors."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    src = str(path)
    out: dict[str, int] = {}
    first: dict[str, int] = {}
    passed: list[str] = []  # where the lines skipped here are

    def bad(err: PairFormatError) -> None:
        if on_error == "raise":
            raise err
        log.warning("skipping %s", err)
        passed.append(f"{src}:{err.line}")

    for line, obj, err in iter_jsonl(path):
        if err is not None:
            bad(err)
            continue
        if obj is None:
            continue
        if not isinstance(obj, dict):
            bad(not_an_object(src, line, obj))
            continue
        try:
            label = parse_label(obj, src, line)
            if label is None:
                continue
            rid = _record_id(obj, src, line)
        except PairFormatError as e:
            bad(e)
            continue
        if rid in first:
            raise PairFormatError(src, line, "id", f"duplicate id (first on line {first[rid]})")
        if known_ids is not None and obj.get("id") is None:
            # its default id is this file's name and line: the data's row at that line, when
            # the data file has the same name in another folder, silently (a shuffled copy
            # of the data with labels added labelled other rows)
            bad(PairFormatError(src, line, "id", "missing: a labels file other than the data needs the ids of the "
                                "rows it labels (or give the data file itself, with its rows' labels, as --labels)"))
            continue
        if known_ids is not None and rid not in known_ids:
            bad(PairFormatError(src, line, "id", "no row of the data has this id"))
            continue
        if data_labels is not None and data_labels.get(rid, label) != label:
            raise PairFormatError(src, line, "label",
                                  f"{label} contradicts the data row's own label {data_labels[rid]}")
        first[rid] = line
        out[rid] = label
    if skipped is not None:
        skipped.extend(passed)
    if passed:
        log.warning("saft: %d label lines of %s skipped (on_error: skip)", len(passed), src)
    if not out:
        why = (f"no usable labelled row ({len(passed)} skipped)" if passed
               else "no labelled row (expected {\"id\": ..., \"label\": 0 or 1} lines)")
        raise PairFormatError(src, None, "label", why)
    return out


# =========================================================================== embedding


def render_sample(tokenizer, messages: Sequence[dict[str, str]], system: str | None = None) -> str:
    """The whole conversation as the model reads it. A conversation ending with a user
    turn is rendered as a prompt (:func:`cfg_unlearn.prompts.render_prompt`); one ending
    with an answer is the chat template without a generation prompt, or the README's
    fallback ``<bos>System: ...\\n\\nUser: ...\\n\\nAssistant: ...``."""
    return render_chat(tokenizer, messages, system, generation_prompt=messages[-1]["role"] == "user",
                       check_system=False)


def render_samples(tokenizer, samples: Sequence[Sample], source: str) -> list[str]:
    """:func:`render_sample` of every sample; a row the chat template refuses (one that
    insists on user and assistant turns alternating, or refuses a system message) is a
    ``file:line`` error, not jinja's traceback after the model has loaded."""
    from jinja2.exceptions import TemplateError

    texts = []
    for s in samples:
        try:
            texts.append(render_sample(tokenizer, s.messages, s.system))
        except TemplateError as e:
            raise PairFormatError(source, s.line or None, "messages",
                                  f"the tokenizer's chat template refuses this row ({e})") from None
    return texts


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _hidden_size(model) -> int | None:
    size = getattr(_text_config(model), "hidden_size", None)
    return int(size) if isinstance(size, int) else None


def num_layers(model) -> int:
    return int(_text_config(model).num_hidden_layers)


def default_layer(n_layers: int) -> int:
    """The middle of the stack: ``hidden_states[L // 2]``."""
    return n_layers // 2


def resolve_layer(layer: int, n_layers: int) -> int:
    """A ``hidden_states`` index in ``[0, L]`` (0 = embeddings, ``L`` = last layer);
    negative counts from the end (-1 = last layer)."""
    idx = layer + n_layers + 1 if layer < 0 else layer
    if not 0 <= idx <= n_layers:
        raise ValueError(f"layer {layer} out of range for a {n_layers}-layer model (use -{n_layers + 1}..{n_layers})")
    return idx


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool right-padded ``hidden`` [B, T, D] over each row's ``lengths`` real tokens.
    ``last``: the last real token. ``mean``: the mean over real tokens except the first
    (kept only when it is the sole token)."""
    b, t, _ = hidden.shape
    if pooling == "last":
        return hidden[torch.arange(b, device=hidden.device), lengths - 1]
    if pooling == "mean":
        pos = torch.arange(t, device=hidden.device)[None]
        start = (lengths > 1).long()[:, None]
        mask = ((pos >= start) & (pos < lengths[:, None])).to(hidden.dtype)
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


@torch.no_grad()
def embed_layers(
    model, tokenizer, texts: Sequence[str], layers: Sequence[int], *, pooling: str = "mean", batch_size: int = 16,
    max_length: int | None = None, progress: bool = True,
) -> tuple[dict[int, torch.Tensor], int]:
    """Embed ``texts`` at several ``hidden_states`` indices in one pass: ``({layer:
    float32 [N, D]}, number of texts cut from the left to ``max_length`` tokens)``.
    Texts are batched by length with right padding; only the backbone runs (no LM head)."""
    from tqdm.auto import tqdm

    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_layers = num_layers(model)
    idx = {layer: resolve_layer(layer, n_layers) for layer in layers}
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None) or model
    device = next(model.parameters()).device
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]  # the rendering holds the BOS
    truncated = 0
    if max_length is not None:
        truncated = sum(len(x) > max_length for x in ids)
        ids = [x[-max_length:] for x in ids]  # keep the end: the answer is where a leak is
    if any(len(x) == 0 for x in ids):
        raise ValueError("a text rendered to zero tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    # filled in place, row by row in input order: chunk lists, their concatenation and a
    # reordered copy held three copies at once (2.7 GB peak for 1.15 GB of embeddings)
    out: dict[int, torch.Tensor] = {}
    with eval_mode(backbone), tqdm(total=len(ids), desc="saft: embed", unit="sample", disable=not progress) as bar:
        for s in range(0, len(order), batch_size):
            rows = torch.tensor(order[s : s + batch_size])
            batch = [ids[i] for i in order[s : s + batch_size]]
            lengths = torch.tensor([len(x) for x in batch], device=device)
            width = int(lengths.max())
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in batch], device=device)
            mask = (torch.arange(width, device=device)[None] < lengths[:, None]).long()
            hs = backbone(input_ids=input_ids, attention_mask=mask, output_hidden_states=True,
                          use_cache=False).hidden_states
            for layer, i in idx.items():
                pooled = pool(hs[i].float(), lengths, pooling).cpu()
                if layer not in out:
                    out[layer] = torch.empty(len(ids), pooled.shape[-1])
                out[layer][rows] = pooled
            bar.update(len(batch))
    return {layer: out.get(layer, torch.empty(0)) for layer in layers}, truncated


def embed(model, tokenizer, texts: Sequence[str], *, layer: int | None = None, pooling: str = "mean",
          batch_size: int = 16, max_length: int | None = None, progress: bool = True) -> torch.Tensor:
    """Embed ``texts`` at one layer (default: the middle one): float32 [N, D]."""
    layer = default_layer(num_layers(model)) if layer is None else layer
    embs, _ = embed_layers(model, tokenizer, texts, [layer], pooling=pooling, batch_size=batch_size,
                           max_length=max_length, progress=progress)
    return embs[layer]


# =========================================================================== scoring


@dataclass
class Subspace:
    """The top singular directions of a centred embedding matrix. ``directions`` [D, k]
    has unit columns, each oriented so that the fitted data's projections on it have a
    non-negative third moment (the long tail, where a minority sits, is positive)."""

    mean: torch.Tensor
    singular_values: torch.Tensor
    directions: torch.Tensor
    #: rows it was fitted on (a direction's spread is ``singular_value / sqrt(samples)``)
    samples: int

    def project(self, emb: torch.Tensor, k: int | None = None) -> torch.Tensor:
        k = self.directions.shape[1] if k is None else k
        return (emb.double() - self.mean) @ self.directions[:, :k]


def has_variance(emb: torch.Tensor) -> bool:
    """Whether the rows of ``emb`` [N, D] differ by more than float rounding (layer 0 with
    last-token pooling embeds every row by its last token, often the same end-of-turn
    token)."""
    x = emb.double()
    return float((x - x.mean(0)).abs().max()) > 1e-6 * max(float(x.abs().max()), 1e-30)


def fit_subspace(emb: torch.Tensor, k: int) -> Subspace:
    """Centre ``emb`` [N, D] and take its top-``k`` right singular vectors (exact, in
    float64: an SVD of the matrix, or for N > D the eigenvectors of its D x D Gram)."""
    if emb.ndim != 2:
        raise ValueError(f"expected an [N, D] embedding matrix, got shape {tuple(emb.shape)}")
    n, d = emb.shape
    if not 1 <= k <= min(n - 1, d):
        raise ValueError(f"k must be in [1, {min(n - 1, d)}] for {n} samples of dimension {d}, got {k}")
    x = emb.double()
    if not torch.isfinite(x).all():
        raise ValueError("embeddings hold NaN or inf values (try --dtype float32)")
    mean = x.mean(0)
    xc = x - mean
    if not has_variance(x):
        raise ValueError(f"the {n} embeddings are all the same (no direction to score along; every score would be "
                         "0 and the removal arbitrary): embed at another --layer or --pooling, or a longer --max-length")
    if n > d:
        evals, evecs = torch.linalg.eigh(xc.T @ xc)
        top = torch.argsort(evals, descending=True)[:k]
        sv, v = evals[top].clamp_min(0).sqrt(), evecs[:, top]
    else:
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)
        sv, v = s[:k], vh[:k].T
    v = v.clone()
    third = ((xc @ v) ** 3).sum(0)
    for j in range(k):
        t = third[j]
        if abs(t) <= 1e-12 * float((xc @ v[:, j]).abs().pow(3).sum()):  # symmetric: fall back to a fixed rule
            t = v[v[:, j].abs().argmax(), j]
        if t < 0:
            v[:, j] = -v[:, j]
    return Subspace(mean, sv, v, n)


def resolve_sign(sign: str, k: int) -> str:
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {SIGNS}, got {sign!r}")
    if sign == "auto":
        return "+" if k == 1 else "abs"
    if sign in ("+", "-") and k != 1:
        raise ValueError(f"sign {sign!r} needs k=1 (k>1 scores the norm of the projection: use 'abs' or 'auto')")
    return sign


def saft_scores(emb: torch.Tensor, k: int = 1, weighted: bool = False, sign: str = "auto",
                subspace: Subspace | None = None) -> torch.Tensor:
    """SAFT scores of ``emb`` [N, D] (float64 [N]; higher = more likely leaky).

    ``p = (emb - mean) @ V_k`` on the top-``k`` directions of ``subspace`` (default: fitted
    on ``emb`` itself). Sign ``+``/``-`` (k = 1): ``+p`` / ``-p``; ``abs``: ``sqrt(sum_j
    w_j p_j^2)`` with ``w_j = sigma_j / sigma_1`` if ``weighted`` else 1 (the ranking of
    HaloScope's ``sum_j sigma_j p_j^2``). ``auto`` = ``+`` for k = 1, ``abs`` above."""
    sign = resolve_sign(sign, k)
    sub = fit_subspace(emb, k) if subspace is None else subspace
    if k > sub.directions.shape[1]:
        raise ValueError(f"the subspace holds {sub.directions.shape[1]} directions, asked for k={k}")
    p = sub.project(emb, k)
    if sign == "+":
        return p[:, 0]
    if sign == "-":
        return -p[:, 0]
    w = sub.singular_values[:k] / sub.singular_values[0] if weighted and sub.singular_values[0] > 0 else 1.0
    return (w * p**2).sum(1).sqrt()


def whitened_scores(emb: torch.Tensor, k: int, subspace: Subspace | None = None) -> torch.Tensor:
    """Whitened scores of ``emb`` [N, D] (float64 [N]; higher = more likely leaky): the
    Mahalanobis distance from the centre within the top-``k`` subspace,
    ``sqrt(sum_j (p_j / s_j)^2)`` with ``p = (emb - mean) @ V_k`` and ``s_j = sigma_j /
    sqrt(N)`` the spread of the fitted rows along direction j. A direction with no spread
    (``sigma_j`` below the rounding of ``emb``'s dtype, relative to the first) counts 0.

    Why this and not the paper's projection: the leaky rows need not be what varies most.
    On the synthetic contaminated sets (10% leaky) embedded by the demo's leaky models,
    the largest directions separate kinds of benign rows (one-turn facts from fact
    conversations), and the leaky rows stand out on smaller ones; dividing by the spread
    lets a row that is far out on a small direction score as high as one on a large
    direction (README, "SAFT filtering", has the figures)."""
    sub = fit_subspace(emb, k) if subspace is None else subspace
    if k > sub.directions.shape[1]:
        raise ValueError(f"the subspace holds {sub.directions.shape[1]} directions, asked for k={k}")
    if k >= sub.samples - 1:
        raise ValueError(f"the whitened score on k={k} directions of {sub.samples} rows is sqrt({sub.samples - 1}) "
                         f"for every row: use k <= {sub.samples - 2}")
    p = sub.project(emb, k)
    sv = sub.singular_values[:k]
    # a direction below the embeddings' own rounding (float32: 1.2e-7 of the first) holds
    # noise, which dividing by its spread would blow up to full weight
    floor = max(torch.finfo(emb.dtype).eps if emb.is_floating_point() else 0.0, 1e-12)
    live = sv > floor * sv[0] if sv[0] > 0 else torch.zeros_like(sv, dtype=torch.bool)
    spread = torch.where(live, sv, torch.ones_like(sv)) / math.sqrt(sub.samples)
    return ((p / spread) ** 2 * live).sum(1).sqrt()


def default_whitened_k(n: int, k_limit: int) -> int:
    """The whitened score's default k: :data:`WHITENED_MAX_K` directions, at most one per
    10 samples (a spread needs rows to be estimated) and at most ``k_limit``."""
    return max(1, min(WHITENED_MAX_K, n // 10, k_limit))


def auroc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for ``labels`` (1 = positive): the
    Mann-Whitney statistic ``P(s+ > s-) + P(s+ = s-) / 2``, ties at average ranks."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels).flatten()
    if s.shape != y.shape:
        raise ValueError(f"{s.numel()} scores but {y.numel()} labels")
    if torch.isnan(s).any():
        raise ValueError("scores hold NaN")
    if not ((y == 0) | (y == 1)).all():
        raise ValueError("labels must be 0 or 1")
    y = y.bool()
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        raise ValueError(f"AUROC needs both classes (got {n1} positive, {n0} negative)")
    sorted_s, order = torch.sort(s, stable=True)
    _, counts = torch.unique_consecutive(sorted_s, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2  # 1-based average rank of each tie group
    ranks = torch.empty_like(s)
    ranks[order] = torch.repeat_interleave(avg, counts)
    u = ranks[y].sum() - n1 * (n1 + 1) / 2
    return float(u / (n1 * n0))


def select(scores, *, fraction: float | None = None, threshold: float | None = None) -> tuple[torch.Tensor, float | None]:
    """Which samples to remove: ``(bool mask [N], threshold)``.

    ``fraction``: the ``round(fraction * N)`` highest scores (ties broken by row order);
    the returned threshold is the lowest removed score (None if nothing is removed).
    ``threshold``: every score at or above it, so the threshold a fraction run reports
    removes the same samples when it is given back (it removed one fewer, the lowest)."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if (fraction is None) == (threshold is None):
        raise ValueError("give exactly one of fraction and threshold")
    if threshold is not None:
        return s >= threshold, float(threshold)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    n_remove = int(math.floor(fraction * s.numel() + 0.5))
    removed = torch.zeros(s.numel(), dtype=torch.bool)
    if n_remove == 0:
        return removed, None
    order = torch.sort(-s, stable=True).indices[:n_remove]
    removed[order] = True
    return removed, float(s[order].min())


# =========================================================================== picking by labels


@dataclass(frozen=True)
class Candidate:
    layer: int
    k: int
    sign: str
    auroc: float
    score: str = "projection"


def search(
    embs: dict[int, torch.Tensor], labelled: torch.Tensor, labels: torch.Tensor, *, ks: Sequence[int],
    signs: Sequence[str] | None = None, weighted: bool = False, prefer_layer: int | None = None,
    score: str = "projection",
) -> tuple[list[Candidate], Candidate]:
    """AUROC on the labelled rows (``labelled`` indices, their ``labels``) of every
    (layer, k, sign); each layer's subspace is fitted on all its rows. Returns the table
    and the pick (:func:`best_candidate`). ``signs`` restricts the signs
    (``auto`` allowed); by default k = 1 tries ``+``, ``-``, ``abs`` and k > 1 ``abs``.
    ``score="whitened"`` scores with :func:`whitened_scores` (a distance: sign ``abs``)."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if not ks:
        raise ValueError("no k to search")
    rows: list[Candidate] = []
    # (a layer with NaN/inf is not "flat": fit_subspace names it, with the dtype hint)
    flat = [layer for layer, emb in embs.items()
            if torch.isfinite(emb).all() and not has_variance(emb)]
    if len(flat) == len(embs):
        flat = []  # nothing left to search: fit_subspace says why
    if flat:
        log.warning("saft: layer(s) %s skipped: every row embeds the same there", flat)
    for layer, emb in embs.items():
        if layer in flat:
            continue
        sub = fit_subspace(emb, max(ks))
        for k in sorted(set(ks)):
            if score == "whitened":
                s = whitened_scores(emb, k, subspace=sub)
                rows.append(Candidate(layer, k, "abs", auroc(s[labelled], labels), score))
                continue
            wanted = SEARCH_SIGNS_K1 if k == 1 else ("abs",)
            if signs is not None:
                wanted = tuple(dict.fromkeys(resolve_sign(s, k) for s in signs if k == 1 or s in ("auto", "abs")))
            for sign in wanted:
                s = saft_scores(emb, k, weighted, sign, subspace=sub)
                rows.append(Candidate(layer, k, sign, auroc(s[labelled], labels)))
    if not rows:
        raise ValueError("no (layer, k, sign) combination to search")
    return rows, best_candidate(rows, prefer_layer)


def best_candidate(rows: Sequence[Candidate], prefer_layer: int | None = None) -> Candidate:
    """The highest AUROC; ties to fewer directions, then the layer closest to
    ``prefer_layer``, then the whitened score, then ``+`` over ``abs`` over ``-``."""
    rank = {"+": 0, "abs": 1, "-": 2}
    return min(rows, key=lambda c: (-round(c.auroc, 12), c.k,
                                    abs(c.layer - prefer_layer) if prefer_layer is not None else 0,
                                    SCORES.index(c.score), rank[c.sign]))


def default_search_layers(n_layers: int) -> list[int]:
    """Every layer 1..L when L <= 8, else 8 evenly spaced ones (the middle included)."""
    if n_layers <= MAX_SEARCH_LAYERS:
        return list(range(1, n_layers + 1))
    picks = {round(1 + i * (n_layers - 1) / (MAX_SEARCH_LAYERS - 2)) for i in range(MAX_SEARCH_LAYERS - 1)}
    return sorted(picks | {default_layer(n_layers)})


# =========================================================================== the run


@dataclass
class SaftConfig:
    """Settings of one run (``None`` = default; with labels, ``None`` also means "search")."""

    model: str
    data: str
    out: str
    layer: int | None = None
    pooling: str = "mean"
    #: None: the whitened score, and with labels both scores searched (the projection
    #: only, when ``sign`` is + or - or ``weighted`` is set: those are its options)
    score: str | None = None
    k: int | None = None
    sign: str | None = None
    weighted: bool = False
    remove_fraction: float | None = None
    threshold: float | None = None
    labels: str | None = None
    search_layers: list[int] | None = None
    search_k: list[int] | None = None
    pair_side: str = "rejected"
    batch_size: int = 16
    max_length: int | None = 2048
    dtype: str = "auto"
    device: str | None = None
    on_error: str = "raise"
    max_chars: int = DEFAULT_MAX_CHARS
    progress: bool = True
    #: write into a non-empty ``out`` (its SAFT files are replaced, other files left alone)
    overwrite: bool = False


def _eval_block(scores: torch.Tensor, removed: torch.Tensor, labels: torch.Tensor, known: torch.Tensor,
                lengths: torch.Tensor) -> dict[str, Any] | None:
    """AUROC and removal figures on the rows with a label (``known`` mask)."""
    if not bool(known.any()):
        return None
    y, r = labels[known], removed[known]
    n1 = int(y.sum())
    caught = int((r & (y == 1)).sum())
    out: dict[str, Any] = {"labelled": int(known.sum()), "leaky": n1, "benign": int(known.sum()) - n1,
                           "removed_labelled": int(r.sum()), "removed_leaky": caught,
                           "recall": caught / n1 if n1 else None,
                           "precision": caught / int(r.sum()) if int(r.sum()) else None,
                           "auroc": None, "length_auroc": None}
    if 0 < n1 < int(known.sum()):
        out["auroc"] = auroc(scores[known], y)
        # what the token count alone would score: a check that the set is not separable by length
        out["length_auroc"] = auroc(lengths[known].double(), y)
    return out


def run_saft(cfg: SaftConfig) -> dict[str, Any]:
    """Read, embed, score, select, write (see the module docstring). Returns ``saft.json``'s content."""
    from cfg_unlearn.models import context_limit, load_causal_lm, load_tokenizer

    if cfg.remove_fraction is not None and cfg.threshold is not None:
        raise ValueError("give --remove-fraction or --threshold, not both")
    fraction = cfg.remove_fraction if cfg.threshold is None and cfg.remove_fraction is not None else None
    if cfg.threshold is None and fraction is None:
        fraction = DEFAULT_REMOVE_FRACTION
    if cfg.pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {cfg.pooling!r}")
    if cfg.sign is not None and cfg.sign not in SIGNS:
        raise ValueError(f"sign must be one of {SIGNS}, got {cfg.sign!r}")
    if cfg.score is not None and cfg.score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {cfg.score!r}")
    projection_only = cfg.sign in ("+", "-") or cfg.weighted
    if cfg.score == "whitened" and projection_only:
        raise ValueError("--sign +/- and --weighted are options of --score projection (the whitened score is a "
                         "distance, each direction already in units of its spread)")
    if cfg.k is not None and cfg.k < 1:
        raise ValueError(f"k must be >= 1, got {cfg.k}")
    if cfg.threshold is not None and not math.isfinite(cfg.threshold):
        raise ValueError(f"threshold must be a finite number, got {cfg.threshold}")
    # search options that would be ignored: say so instead of recording them as if used
    if cfg.labels is None and (cfg.search_k is not None or cfg.search_layers is not None):
        raise ValueError("--search-k/--search-layers pick by AUROC on --labels: give --labels, or set the "
                         "layer and k themselves with --layer/--k")
    for fixed, fixed_val, searched, searched_val in (("--layer", cfg.layer, "--search-layers", cfg.search_layers),
                                                    ("--k", cfg.k, "--search-k", cfg.search_k)):
        if fixed_val is not None and searched_val is not None:
            raise ValueError(f"{fixed} fixes what {searched} would search: give one of them")
    # what the label search will try, checked before the model loads and every sample is embedded
    if cfg.labels is not None and cfg.k is None and cfg.search_k is not None:
        if not cfg.search_k or min(cfg.search_k) < 1:
            raise ValueError(f"--search-k values must be >= 1, got {cfg.search_k}")
        if cfg.sign in ("+", "-") and 1 not in cfg.search_k:
            raise ValueError(f"--sign {cfg.sign} scores k=1 only (k>1 scores the norm), but --search-k "
                             f"{' '.join(map(str, cfg.search_k))} has no 1")
    # before minutes of embedding: kept.jsonl written into the data's own folder could be the data
    # the files are written straight into out: only out itself must take them
    check_out_dir(Path(cfg.out), cfg.overwrite, [p for p in (cfg.data, cfg.labels) if p is not None], staged=False)
    if Path(cfg.out).is_dir():
        check_writable_file(Path(cfg.out) / "saft.json")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    samples, lines, stats = read_samples(cfg.data, pair_side=cfg.pair_side, on_error=cfg.on_error,
                                         max_chars=cfg.max_chars)
    if len(samples) < 2:
        raise PairFormatError(cfg.data, None, None, f"SAFT needs at least 2 samples, the file holds {len(samples)}")
    index = {s.id: i for i, s in enumerate(samples)}
    n = len(samples)
    row_labels = torch.tensor([-1 if s.label is None else s.label for s in samples])
    tune = torch.full((n,), -1, dtype=torch.long)
    skipped_labels: list[str] = []
    if cfg.labels is not None:
        own = {s.id: s.label for s in samples if s.label is not None}
        if os.path.exists(cfg.labels) and os.path.samefile(cfg.labels, cfg.data):
            # the rows just read, so --on-error skip applies to the labels as to the data
            if not own:
                raise PairFormatError(cfg.labels, None, "label", "no labelled row (expected \"label\": 0 or 1)")
            labels = own
        else:
            labels = read_labels(cfg.labels, index, own, on_error=cfg.on_error, skipped=skipped_labels)
        for rid, lab in labels.items():
            tune[index[rid]] = lab
    all_labels = torch.where(tune >= 0, tune, row_labels)
    seconds["read"] = time.perf_counter() - t0

    tuning = cfg.labels is not None
    if tuning:
        n_tune = int((tune >= 0).sum())
        n_tune_pos = int((tune == 1).sum())
        if n_tune_pos in (0, n_tune):
            raise PairFormatError(cfg.labels, None, "label",
                                  f"the labelled rows need both classes to pick by AUROC ({n_tune_pos} leaky of {n_tune})")

    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.model)
    texts = render_samples(tok, samples, str(cfg.data))  # a row the template refuses: before the model loads
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_causal_lm(cfg.model, dtype=cfg.dtype).to(device)
    n_layers = num_layers(model)
    # before the embedding: more directions than the samples span is an error, not a quiet k=1
    hidden = _hidden_size(model)
    k_limit = min(n - 1, hidden) if hidden else n - 1
    if cfg.score is not None:
        kinds = [cfg.score]
    elif tuning and not projection_only:
        kinds = list(SCORES)
    else:
        kinds = ["projection" if projection_only else DEFAULT_SCORE]
    # the whitened score on all n - 1 directions the centred rows span is sqrt(n - 1) for
    # every row: one direction fewer at most
    limits = {kind: min(k_limit, n - 2) if kind == "whitened" else k_limit for kind in kinds}
    if cfg.k is not None and all(cfg.k > limit for limit in limits.values()):
        raise ValueError(f"k={cfg.k}: {n} samples of dimension {hidden} span at most {k_limit} directions"
                         + (f" (the whitened score takes at most {n - 2}: on all of them it is the same for every "
                            "row)" if "whitened" in kinds else ""))
    search_k: dict[str, list[int]] = {}
    for kind in kinds:
        if cfg.k is not None:
            search_k[kind] = [cfg.k]
        elif cfg.search_k:
            search_k[kind] = list(cfg.search_k)
        elif kind == "whitened":  # capped, not skipped: a small file still searches
            search_k[kind] = sorted({min(k, default_whitened_k(n, limits[kind])) for k in WHITENED_SEARCH_K})
        else:
            search_k[kind] = list(DEFAULT_SEARCH_K)
    over = sorted({k for kind, ks in search_k.items() for k in ks if k > limits[kind]})
    if over:
        if all(k > limits[kind] for kind, ks in search_k.items() for k in ks):
            raise ValueError(f"k {over}: {n} samples of dimension {hidden} span at most {k_limit} directions"
                             + (f" (the whitened score takes at most {n - 2})" if "whitened" in kinds else ""))
        log.warning("saft: k %s skipped where above %s: %d samples of dimension %s span at most %d directions",
                    over, ", ".join(f"{limit} ({kind})" for kind, limit in limits.items()), n, hidden, k_limit)
        search_k = {kind: [k for k in ks if k <= limits[kind]] for kind, ks in search_k.items()}
        kinds = [kind for kind in kinds if search_k[kind]]
    if cfg.layer is not None:
        layers = [resolve_layer(cfg.layer, n_layers)]
    elif tuning:
        layers = sorted({resolve_layer(x, n_layers) for x in (cfg.search_layers or default_search_layers(n_layers))})
    else:
        layers = [default_layer(n_layers)]
    lengths = torch.tensor([len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]])
    max_len = cfg.max_length
    pos_limit = context_limit(model)
    if pos_limit and (max_len is None or max_len > pos_limit):
        max_len = int(pos_limit)
    embs, truncated = embed_layers(model, tok, texts, layers, pooling=cfg.pooling, batch_size=cfg.batch_size,
                                   max_length=max_len, progress=cfg.progress)
    dim = next(iter(embs.values())).shape[1]
    del model
    seconds["embed"] = time.perf_counter() - t0
    print(f"saft: embedded {n} samples at layer(s) {layers} of {n_layers} ({cfg.pooling} pooling, dim {dim}) "
          f"in {seconds['embed']:.1f}s" + (f"; {truncated} cut to their last {max_len} tokens" if truncated else ""))

    t0 = time.perf_counter()
    table: list[Candidate] = []
    picked: Candidate | None = None
    if tuning:
        idx = torch.nonzero(tune >= 0).flatten()
        for kind in kinds:  # each with a k to try (the others were dropped above)
            table += search(embs, idx, tune[idx], ks=search_k[kind], signs=[cfg.sign] if cfg.sign else None,
                            weighted=cfg.weighted, prefer_layer=default_layer(n_layers), score=kind)[0]
        picked = best_candidate(table, default_layer(n_layers))
        layer, k, sign, score = picked.layer, picked.k, picked.sign, picked.score
        print(render_table(table, picked, n_labelled=len(idx), n_leaky=int((tune == 1).sum())))
    elif kinds == ["whitened"]:  # the documented default, not the label search's smallest k
        layer, k, sign, score = layers[0], cfg.k or default_whitened_k(n, limits["whitened"]), "abs", "whitened"
    else:
        layer, k, score = layers[0], cfg.k or 1, "projection"
        sign = resolve_sign(cfg.sign or "auto", k)
    sub = fit_subspace(embs[layer], k)
    if score == "whitened":
        scores = whitened_scores(embs[layer], k, subspace=sub)
    else:
        scores = saft_scores(embs[layer], k, cfg.weighted, sign, subspace=sub)
    removed, thr = select(scores, fraction=fraction, threshold=cfg.threshold)
    seconds["score"] = time.perf_counter() - t0
    tied_over = 0 if thr is None else int((scores.double() >= thr).sum()) - int(removed.sum())
    if tied_over:  # rows scoring exactly the cut (duplicates): the fraction took some of them
        log.warning("saft: %d more rows score exactly the cut %r, kept to remove %d; --threshold %r would remove "
                    "them too (%d)", tied_over, thr, int(removed.sum()), thr, int(removed.sum()) + tied_over)

    evaluation = _eval_block(scores, removed, all_labels, all_labels >= 0, lengths)
    untuned = (all_labels >= 0) & (tune < 0)
    held_out = _eval_block(scores, removed, all_labels, untuned, lengths) if tuning else None

    out = Path(cfg.out)
    kept_lines = [line for line, r in zip(lines, removed.tolist()) if not r]
    removed_lines = [line for line, r in zip(lines, removed.tolist()) if r]
    score_rows = []
    for i, s in enumerate(samples):
        row: dict[str, Any] = {"id": s.raw_id, "score": float(scores[i]), "removed": bool(removed[i])}
        if all_labels[i] >= 0:
            row["label"] = int(all_labels[i])
        score_rows.append(json.dumps(row))
    histogram = scores_histogram_png(scores, all_labels, thr,
                                     title=f"SAFT {score} scores: layer {layer}, {cfg.pooling}, k={k}"
                                     + (f", sign {sign}" if score == "projection" else "")
                                     + (", weighted" if cfg.weighted and k > 1 else ""))

    settings = {key: val for key, val in asdict(cfg).items() if key not in ("progress",)}
    settings.update(remove_fraction=fraction, max_length=max_len)
    result = {
        "method": "SAFT (Choi, Du, Li 2024): top-k singular directions of centred hidden states; score "
                  + ("the Mahalanobis distance within them" if score == "whitened" else "the projection on them"),
        "settings": settings,
        "model_layers": n_layers,
        "embedding_dim": dim,
        "used": {"layer": layer, "pooling": cfg.pooling, "score": score, "k": k, "sign": sign,
                 "weighted": cfg.weighted,
                 "picked_by": "labels" if tuning else "defaults"},
        "picked": asdict(picked) if picked else None,
        "search": [asdict(c) for c in table],
        "singular_values": [float(x) for x in sub.singular_values],
        "threshold": thr,
        "counts": {"samples": n, "kept": n - int(removed.sum()), "removed": int(removed.sum()),
                   "lines": stats.lines, "blank": stats.blank, "skipped": stats.skipped, "truncated": truncated,
                   "tuning_labelled": int((tune >= 0).sum()), "labelled": int((all_labels >= 0).sum()),
                   "skipped_labels": len(skipped_labels)},
        "evaluation": evaluation,
        "evaluation_untuned": held_out,
        "seconds": {key: round(v, 2) for key, v in seconds.items()},
    }
    # one set: a full disk or a kill before the renames leaves the previous run's files as they were
    atomic_write_files([(out / "kept.jsonl", "".join(x + "\n" for x in kept_lines)),
                        (out / "removed.jsonl", "".join(x + "\n" for x in removed_lines)),
                        (out / "scores.jsonl", "".join(x + "\n" for x in score_rows)),
                        (out / "scores_hist.png", histogram),
                        (out / "saft.json", json.dumps(result, indent=2) + "\n")])
    thr_text = "none" if thr is None else repr(thr)  # exact: given back as --threshold it removes the same rows
    print(f"saft: removed {int(removed.sum())} of {n} (threshold {thr_text}); kept {n - int(removed.sum())} -> "
          f"{out / 'kept.jsonl'}, {out / 'removed.jsonl'}")
    if evaluation:
        print("saft: on the labelled rows: " + _eval_line(evaluation))
        if held_out:
            print("saft: on the labelled rows not used for picking: " + _eval_line(held_out))
    return result


def _eval_line(e: dict[str, Any]) -> str:
    parts = [f"{e['labelled']} rows ({e['leaky']} leaky)"]
    if e["auroc"] is not None:
        parts.append(f"AUROC {e['auroc']:.3f} (token length alone: {e['length_auroc']:.3f})")
    if e["leaky"]:
        parts.append(f"removal caught {e['removed_leaky']}/{e['leaky']} leaky (recall {e['recall']:.3f})")
    if e["precision"] is not None:
        parts.append(f"precision {e['precision']:.3f}")
    return ", ".join(parts)


def render_table(table: list[Candidate], picked: Candidate, *, n_labelled: int, n_leaky: int) -> str:
    """The AUROC per (layer, k, sign) as a small text table, layers as columns."""
    layers = sorted({c.layer for c in table})
    keys = list(dict.fromkeys((c.score, c.k, c.sign) for c in table))
    cell = {(c.layer, c.score, c.k, c.sign): c.auroc for c in table}
    head = f"{'score':>10} {'k':>3} {'sign':>4} | " + " ".join(f"{'L' + str(layer):>7}" for layer in layers)
    lines = [f"saft: AUROC on {n_labelled} labelled rows ({n_leaky} leaky), per layer (hidden_states index)",
             head, "-" * len(head)]
    for score, k, sign in keys:
        vals = []
        for layer in layers:
            v = cell.get((layer, score, k, sign))
            mark = "*" if (layer, score, k, sign) == (picked.layer, picked.score, picked.k, picked.sign) else " "
            vals.append(f"{'':>7}" if v is None else f"{v:6.3f}{mark}")
        lines.append(f"{score:>10} {k:>3} {sign:>4} | " + " ".join(vals))
    lines.append(f"saft: picked the {picked.score} score, layer {picked.layer}, k={picked.k}"
                 + (f", sign {picked.sign}" if picked.score == "projection" else "") + f" (AUROC {picked.auroc:.3f})")
    return "\n".join(lines)


def scores_histogram_png(scores: torch.Tensor, labels: torch.Tensor, threshold: float | None, *,
                         title: str = "SAFT scores") -> bytes:
    """Histogram of the scores, benign / leaky / unlabelled stacked, with the threshold
    line, as PNG bytes (Agg canvas, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s = scores.double().numpy()
    lab = labels.numpy()
    fig = Figure(figsize=(6.4, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    groups = [(lab == 0, "benign (label 0)", "tab:blue"), (lab == 1, "leaky (label 1)", "tab:red"),
              (lab < 0, "unlabelled", "tab:gray")]
    data = [(s[m], name, color) for m, name, color in groups if m.any()]
    lo, hi = float(s.min()), float(s.max())
    spread = hi - lo > 1e-9 * max(abs(lo), abs(hi), 1e-300)  # numpy refuses 50 bins narrower than rounding
    ax.hist([d for d, _, _ in data], bins=50 if spread else 1, range=(lo, hi) if spread else None, stacked=True,
            label=[nm for _, nm, _ in data], color=[c for _, _, c in data])
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel("score (higher = removed first)")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


# =========================================================================== CLI


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        prog="cfg-unlearn saft",
        description="SAFT: score every sample of a conversation or pair file by where it lies along the top singular "
        "directions of the model's (centred) hidden states, and split the file into kept.jsonl / removed.jsonl "
        "(plus scores.jsonl, saft.json, scores_hist.png) in --out. Without --labels the defaults are used as they "
        "are; with --labels, score, layer, k and sign (those not given) are picked by AUROC on the labelled rows.",
    )
    p.add_argument("--model", required=True, help="hub name, local path or tiny:<dir> of the model that embeds")
    p.add_argument("--data", required=True,
                   help="JSONL: conversations {id, messages, [pii], [label]} or pairs {prompt, chosen, rejected}")
    p.add_argument("--out", required=True, help="output directory (new or empty; not the folder of --data)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out (its SAFT files are replaced)")
    p.add_argument("--layer", type=int, default=None,
                   help="hidden_states index: 0 = embeddings, L or -1 = last layer (default: the middle, L // 2)")
    p.add_argument("--pooling", choices=POOLINGS, default="mean",
                   help="mean over the sample's tokens (first token excluded) or the last token (default: mean)")
    p.add_argument("--score", choices=SCORES, default=None,
                   help="whitened: distance from the centre in the top-k subspace, each direction in units of its "
                   "spread; projection: the paper's size of the projection on the top-k directions (default: "
                   "whitened; with --labels both are searched, the projection alone with --sign +/- or --weighted)")
    p.add_argument("--k", type=int, default=None,
                   help=f"number of singular directions (default: whitened {WHITENED_MAX_K}, at most one per 10 "
                   "samples; projection 1)")
    p.add_argument("--sign", choices=SIGNS, default=None,
                   help="--score projection, k=1: + (skew-oriented; = auto), - (reversed), abs; k>1: abs/auto = norm")
    p.add_argument("--weighted", action="store_true",
                   help="--score projection: weight directions by singular value (k>1)")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--remove-fraction", type=float, default=None,
                     help=f"remove this share of the highest scores (default {DEFAULT_REMOVE_FRACTION})")
    sel.add_argument("--threshold", type=float, default=None,
                     help="remove every score at or above this (what a --remove-fraction run reports)")
    p.add_argument("--labels", default=None,
                   help="labelled JSONL ({id, label 0/1}; may be the data file itself) to pick layer, k, sign by AUROC")
    p.add_argument("--search-layers", type=int, nargs="+", default=None,
                   help="layers tried with --labels (default: all when L <= 8, else 8 spread out)")
    p.add_argument("--search-k", type=int, nargs="+", default=None,
                   help=f"k values tried with --labels (default: whitened {' '.join(map(str, WHITENED_SEARCH_K))}, "
                   f"capped as --k is; projection {' '.join(map(str, DEFAULT_SEARCH_K))})")
    p.add_argument("--pair-side", choices=("rejected", "chosen"), default="rejected",
                   help="for pair rows: which answer forms the sample (default: rejected, the original data)")
    p.add_argument("--batch-size", type=int, default=16, help="samples embedded together (default %(default)s)")
    p.add_argument("--max-length", type=int, default=2048, help="keep at most the last N tokens of a sample")
    p.add_argument("--dtype", default="auto", help="model dtype: auto, float32, bfloat16, float16")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="bad rows: stop with file:line (default) or skip them, counted and logged")
    p.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS, help="cap on one text field")
    p.add_argument("--quiet", action="store_true", help="no progress bars (transformers' loading bar too)")
    return p


def main(argv: list[str] | None = None) -> None:
    """``cfg-unlearn saft ...`` (see :func:`build_parser`); bad input exits with status 2
    and a ``file:line: field 'x': why`` message. Use :func:`run_saft` for the results."""
    from cfg_unlearn.models import check_device, parse_dtype

    p = build_parser()
    a = p.parse_args(argv)
    console_logging(logging.WARNING)
    for name, val in (("--batch-size", a.batch_size), ("--max-length", a.max_length)):
        if val < 1:
            p.error(f"{name} must be >= 1")
    if a.remove_fraction is not None and not 0.0 <= a.remove_fraction <= 1.0:
        p.error("--remove-fraction must be in [0, 1]")
    if a.k is not None and a.k < 1:
        p.error("--k must be >= 1")
    if a.threshold is not None and not math.isfinite(a.threshold):
        p.error("--threshold must be a finite number")
    try:
        parse_dtype(a.dtype)
        check_device(a.device)
    except ValueError as e:
        p.error(str(e))
    if a.sign in ("+", "-") and a.k is not None and a.k != 1 and a.score != "whitened":
        p.error(f"--sign {a.sign} needs --k 1 (k>1 scores the norm)")
    cfg = SaftConfig(
        model=a.model, data=a.data, out=a.out, layer=a.layer, pooling=a.pooling, score=a.score, k=a.k, sign=a.sign,
        weighted=a.weighted, remove_fraction=a.remove_fraction, threshold=a.threshold, labels=a.labels,
        search_layers=a.search_layers, search_k=a.search_k, pair_side=a.pair_side, batch_size=a.batch_size,
        max_length=a.max_length, dtype=a.dtype, device=a.device, on_error=a.on_error, max_chars=a.max_chars,
        progress=not a.quiet, overwrite=a.overwrite,
    )
    try:
        with hf_progress_bars_off(a.quiet):
            run_saft(cfg)
    except (ValueError, FileExistsError) as e:  # PairFormatError included: file:line: field 'x': why
        exit_with_error(p, str(e))


if __name__ == "__main__":  # python -m cfg_unlearn.saft: SIGTERM cleans up, as under cfg-unlearn
    from cfg_unlearn.utils import sigterm_raises

    with sigterm_raises():
        main(sys.argv[1:])
