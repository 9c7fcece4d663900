"""Classifier-free guidance decoding: the one engine behind evaluation, replacement
generation and users' own inference.

At every step the model scores the next token twice, under the conditioned prompt (the
safety instruction) and under the unconditioned one (instruction blanked, or a negative
instruction), and the two distributions are extrapolated by the guidance scale ``g``:

* ``space="logprob"`` (Sanchez et al. 2023; Hugging Face's ``guidance_scale``):
  ``s = u + g * (c - u)`` on log-softmaxed logits;
* ``space="prob"`` (the seed paper's "modified CFG"): ``P = P_u + g * (P_c - P_u)``,
  clamped at 0 and renormalised, so it can be sampled; greedy takes the argmax.

``g = 1`` is plain decoding, exactly: the unconditioned branch is not run at all.

Why it is shaped like this (and faster than ``generate(guidance_scale=...)``):

* Both branches go through **one** forward of ``2B`` rows per decoding step with one
  KV cache, instead of a second sequential forward with its own cache. (The prompts
  are prefilled as two ``B``-row forwards at their own lengths, then their caches are
  merged: cheaper than one ``2B``-row prefill padded to the longer side.)
* Prompts are left padded with position ids counted from each row's first real token,
  so a padded batch decodes the same tokens as each prompt alone in float32 (tested;
  in bf16 padding changes the rounding, and a near tie can go the other way).
* Only the last position's logits are computed (``logits_to_keep=1``) in the prefill,
  and the KV cache is preallocated (no per-step concatenation).
* Under DDP/FSDP each forward is a collective for sharded weights: with
  ``sync_ranks=True`` ranks agree to stop only when every rank is done, so all run
  the same number of steps (callers must also give every rank the same number of
  prompts, hence batches).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from cfg_unlearn.models import context_limit
from cfg_unlearn.prompts import answer_encoder, answer_end_ids, render_prompt
from cfg_unlearn.utils import NonFiniteWeights, eval_mode

Space = Literal["logprob", "prob"]
SPACES = ("logprob", "prob")
Prompt = str | Sequence[dict[str, str]]


#: the largest guidance scale accepted from a user (:func:`check_guidance`)
MAX_GUIDANCE_SCALE = 1e6


def check_guidance(guidance_scale: float, space: str) -> None:
    """The guidance settings a user may ask for (export, generate): a finite ``g >= 0``
    and a known space. Above :data:`MAX_GUIDANCE_SCALE` the difference term alone ranks the
    tokens already, and near float32's 3.4e38 the scores become NaN (every answer came out
    empty at 1e39)."""
    if not math.isfinite(guidance_scale) or not 0 <= guidance_scale <= MAX_GUIDANCE_SCALE:
        raise ValueError(f"guidance_scale must be a finite number in [0, {MAX_GUIDANCE_SCALE:g}], got {guidance_scale}")
    if space not in SPACES:
        raise ValueError(f"space must be one of {', '.join(SPACES)}, got {space!r}")


#: the lowest sampling temperature: a log-probability gap of 1 becomes 1e4, and at 1e-40
#: the scores overflowed to inf and sampling failed on NaN probabilities
MIN_TEMPERATURE = 1e-4


# --------------------------------------------------------------------------- the math


def guided_scores(
    cond_logits: torch.Tensor, uncond_logits: torch.Tensor | None, guidance_scale: float, space: Space = "logprob"
) -> torch.Tensor:
    """Next-token scores after guidance, as log-probabilities (``-inf`` where the
    probability-space mixture was clamped to 0). ``uncond_logits`` None or ``g == 1``
    returns the conditioned log-softmax."""
    c = F.log_softmax(cond_logits.float(), dim=-1)
    if uncond_logits is None or guidance_scale == 1:
        return c
    u = F.log_softmax(uncond_logits.float(), dim=-1)
    if space == "logprob":
        if guidance_scale == 0:  # the unconditioned branch alone
            return u
        # same expression and order as transformers' CFG logits processor, so greedy
        # decoding is token-identical to it on finite scores
        out = guidance_scale * (c - u) + u
        # a banned token (-inf logit, e.g. a masked vocabulary slot) made that NaN, which
        # argmax picks: banned in the conditioned branch stays banned; banned only in the
        # unconditioned one, g > 1 has nothing to push away from, so it keeps its c, while
        # 0 < g < 1 leans towards the branch that bans it (at g=0.5 it kept c and won)
        kept = c if guidance_scale > 1 else torch.full_like(c, float("-inf"))
        return torch.where(torch.isneginf(c), c, torch.where(torch.isneginf(u), kept, out))
    if space == "prob":
        pu = u.exp()
        p = (pu + guidance_scale * (c.exp() - pu)).clamp_min(0.0)
        # the unclamped mixture sums to 1, so the clamped one sums to >= 1: never 0
        return (p / p.sum(dim=-1, keepdim=True)).log()
    raise ValueError(f"space must be one of {SPACES}, got {space!r}")


def guided_logprobs(
    cond_logits: torch.Tensor, uncond_logits: torch.Tensor | None, guidance_scale: float, space: Space = "logprob"
) -> torch.Tensor:
    """The next-token log-probabilities of the distribution guided decoding samples from
    (at temperature 1): :func:`guided_scores` normalised. Log space's ``u + g * (c - u)``
    is no log-distribution for ``g != 1`` (with c = log(.99, .005, .005), u its mirror
    and g = 3 the first token scores +9.99); probability space's already is."""
    return F.log_softmax(guided_scores(cond_logits, uncond_logits, guidance_scale, space), dim=-1)


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches
    ``top_p`` (always at least one), as transformers' ``TopPLogitsWarper``."""
    if top_p >= 1.0:
        return scores
    sorted_scores, order = scores.sort(dim=-1, descending=False)
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1 - top_p)
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def pick_tokens(
    scores: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Greedy argmax, or a temperature / top-p sample, of ``(B, V)`` scores."""
    if not do_sample:
        return scores.argmax(dim=-1)
    scores = top_p_filter(scores / temperature, top_p)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# --------------------------------------------------------------------------- tensors


def left_pad(seqs: Sequence[Sequence[int]], pad_token_id: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> left-padded ``(input_ids, attention_mask)`` of ``length`` columns."""
    length = max(len(s) for s in seqs) if length is None else length
    ids = torch.full((len(seqs), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError(f"prompt {i} is empty after tokenisation")
        ids[i, length - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, length - len(s) :] = 1
    return ids, mask


def _repad_left(ids: torch.Tensor, mask: torch.Tensor, length: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - ids.shape[1]
    if extra == 0:
        return ids, mask
    return F.pad(ids, (extra, 0), value=pad_token_id), F.pad(mask, (extra, 0), value=0)


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    # counted from each row's first real token; pads get 1, as in transformers' generate
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill_(mask == 0, 1)


def _forward_parameters(model: torch.nn.Module) -> Mapping[str, inspect.Parameter]:
    """The parameters of the forward that reads ``model``'s keyword arguments: through
    the wrappers whose forward takes ``**kwargs`` (DDP's and FSDP's ``module``,
    torch.compile's ``_orig_mod``), and from a PEFT model to its base, whose forward it
    calls; empty where no signature can be read."""
    inner = model
    for _ in range(8):
        nxt = next((getattr(inner, a) for a in ("module", "_fsdp_wrapped_module", "_orig_mod")
                    if isinstance(getattr(inner, a, None), torch.nn.Module)), None)
        if nxt is None:
            break
        inner = nxt
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    try:
        return inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return {}


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in _forward_parameters(model)


def _uses_alibi(config) -> bool:
    """ALiBi attention (Bloom, MPT, Falcon with ``alibi``): its bias is built from the
    2-D attention mask, as long as the prompt, while a static cache returns keys of its
    whole length ("The expanded size of the tensor (9) must match the existing size
    (5)" at the first forward, even at g=1)."""
    attn = getattr(config, "attn_config", None)
    return bool(getattr(config, "alibi", False) or getattr(config, "model_type", None) == "bloom"
                or getattr(attn, "alibi", False) or (isinstance(attn, dict) and attn.get("alibi")))


def _static_cache(model: torch.nn.Module, max_len: int):
    """A static (preallocated) KV cache of ``max_len`` positions, or None where the model
    cannot take one."""
    if _uses_alibi(getattr(model, "config", None)):
        return None
    try:
        from transformers import StaticCache

        return StaticCache(config=model.config, max_cache_len=max_len)
    except Exception:  # noqa: BLE001 - an architecture without static-cache support
        return None


def _autocast_on(model: torch.nn.Module) -> bool:
    try:
        device_type = next(model.parameters()).device.type
    except StopIteration:
        return False
    return torch.is_autocast_enabled(device_type) if device_type in ("cpu", "cuda") else False


def _preallocated_cache(model: torch.nn.Module, max_len: int):
    """A static (preallocated) KV cache of ``max_len`` positions, or None (the model's
    default dynamic cache) where the model cannot take one. A dynamic cache concatenates
    every layer's keys and values at every step; with 2B rows that copying was about a
    sixth of a decoding step on CPU (benchmarks/cfg_decode.py).

    None under autocast too (fp32 weights with ``bf16-mixed``/``16-mixed``, as
    GuidanceEval decodes inside the precision plugin): the rotary embedding returns keys
    in float32 while the values come out in the autocast dtype, and a static cache holds
    one dtype for both (``index_copy_(): self and source expected to have the same dtype``)."""
    if _autocast_on(model):
        return None
    return _static_cache(model, max_len)


def _mergeable_cache(model: torch.nn.Module) -> bool:
    """Whether the split prefill can merge this model's caches: a transformers model whose
    layers all keep every position. Decided from the config, before any forward, so that
    every rank takes the same path (under FSDP a different number of forwards hangs)."""
    cfg = getattr(model, "config", None)
    if cfg is None or _static_cache(model, 1) is None:
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False  # sliding-window, linear-attention or state-space layers
    return not (getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True))


def _prefill_pair(model, cond, uncond, max_len: int, extra: dict) -> tuple[object | None, torch.Tensor | None]:
    """Prefill the conditioned and unconditioned prompts as two forwards, each at its own
    padded length, and merge their caches (left padded to one length) into one
    preallocated cache of ``2B`` rows. Two ``B``-row prefills cost less than one of ``2B``
    rows padded to the longer side (the unconditioned prompts lack the instruction), and
    the conditioned rows are computed exactly as plain decoding computes them.

    Returns ``(None, None)`` where the caches turn out not to expose whole per-layer
    tensors after all (then the caller prefills all ``2B`` rows at once)."""
    outs = [
        model(input_ids=i, attention_mask=m, position_ids=_position_ids(m), use_cache=True, **extra)
        for i, m in (cond, uncond)
    ]
    caches = [output_cache(o) for o in outs]
    layers = [getattr(c, "layers", None) for c in caches]
    if any(ls is None or not all(hasattr(layer, "keys") for layer in ls) for ls in layers):
        return None, None
    length = max(cond[0].shape[1], uncond[0].shape[1])
    merged = _preallocated_cache(model, max_len)
    if merged is None:
        from transformers import DynamicCache

        merged = DynamicCache()
    for i, (lc, lu) in enumerate(zip(*layers)):
        if lc.keys.shape[-2] != cond[0].shape[1] or lu.keys.shape[-2] != uncond[0].shape[1]:
            return None, None  # e.g. a sliding-window layer that kept fewer positions
        pad = [(0, 0, length - t.shape[-2], 0) for t in (lc.keys, lu.keys)]
        keys = torch.cat([F.pad(lc.keys, pad[0]), F.pad(lu.keys, pad[1])])
        values = torch.cat([F.pad(lc.values, pad[0]), F.pad(lu.values, pad[1])])
        merged.update(keys, values, i)
    return merged, torch.cat([outs[0].logits[:, -1], outs[1].logits[:, -1]])


def cache_argument(model) -> str:
    """The name ``model``'s forward takes its KV cache by: ``cache`` since transformers
    renamed ``past_key_values`` (5.2x; the old name warns on every decode and goes in
    5.40), ``past_key_values`` before it. From the signature of the forward that reads
    it (:func:`_forward_parameters`), else from the installed transformers' output class
    (a forward that takes ``**kwargs`` only)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    params = _forward_parameters(model)
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(out) -> object:
    """A forward's KV cache, under the name its transformers gives it (see
    :func:`cache_argument`; asking a new output for ``past_key_values`` warns)."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _checked_cache(out) -> object:
    cache = output_cache(out)
    if cache is None:
        raise ValueError(
            "the model returned no KV cache (past_key_values): cfg_decode needs a transformers causal LM "
            "that supports use_cache=True"
        )
    return cache


def _all_ranks_done(done: bool, device: torch.device) -> bool:
    """True when every rank is done (a collective: every rank must call it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return done
    flag = torch.tensor([0.0 if done else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


@torch.no_grad()
def cfg_decode(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    uncond_input_ids: torch.Tensor | None = None,
    uncond_attention_mask: torch.Tensor | None = None,
    *,
    guidance_scale: float = 1.0,
    space: Space = "logprob",
    max_new_tokens: int = 64,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    sync_ranks: bool = False,
) -> torch.Tensor:
    """Decode ``(B, T)`` new tokens for left-padded ``(B, L)`` prompts.

    The tensor-level engine under :func:`generate`. Unconditioned prompts are required
    unless ``guidance_scale == 1`` (then they are ignored and only ``B`` rows run).
    Rows that emit an EOS are padded with ``pad_token_id`` afterwards; decoding stops when
    every row has (on every rank, with ``sync_ranks``) or after ``max_new_tokens``.
    ``eos_token_id=None`` never stops early (benchmarks).
    """
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if do_sample and not (math.isfinite(temperature) and temperature >= MIN_TEMPERATURE):
        raise ValueError(f"temperature must be a finite number > 0 when sampling, at least {MIN_TEMPERATURE:g} (below "
                         f"it the scaled scores overflow to NaN; decode greedily instead), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    guided = guidance_scale != 1
    if guided and (uncond_input_ids is None or uncond_attention_mask is None):
        raise ValueError(
            f"guidance_scale={guidance_scale} needs unconditioned prompts: uncond_input_ids and uncond_attention_mask"
        )
    device = next(model.parameters()).device
    b = input_ids.shape[0]
    ids, mask = input_ids.to(device), attention_mask.to(device)
    eos = torch.tensor(
        [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)),
        dtype=torch.long,
        device=device,
    )
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    kv = cache_argument(model)
    if guided:
        u_ids, u_mask = uncond_input_ids.to(device), uncond_attention_mask.to(device)
        if u_ids.shape[0] != b:
            raise ValueError(f"{b} conditioned prompts but {u_ids.shape[0]} unconditioned ones")
        length = max(ids.shape[1], u_ids.shape[1])
        cache = logits = None
        if _mergeable_cache(model):
            cache, logits = _prefill_pair(model, (ids, mask), (u_ids, u_mask), length + max_new_tokens, extra)
        ids, mask = _repad_left(ids, mask, length, pad_token_id)
        u_ids, u_mask = _repad_left(u_ids, u_mask, length, pad_token_id)
        # from here on rows [0, B) are conditioned, [B, 2B) unconditioned: one forward per step
        ids, mask = torch.cat([ids, u_ids]), torch.cat([mask, u_mask])
        pos = _position_ids(mask)
        if cache is None:  # the model's cache cannot be merged: prefill both sides at once
            cache = _preallocated_cache(model, length + max_new_tokens)
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **{kv: cache}, use_cache=True, **extra)
            cache, logits = _checked_cache(out), out.logits[:, -1]
    else:
        pos = _position_ids(mask)
        cache = _preallocated_cache(model, ids.shape[1] + max_new_tokens)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **{kv: cache}, use_cache=True, **extra)
        cache, logits = _checked_cache(out), out.logits[:, -1]
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    new_tokens = []
    for step in range(max_new_tokens):
        if guided:
            scores = guided_scores(logits[:b], logits[b:], guidance_scale, space)
        else:
            # g == 1: argmax of the raw logits, exactly what plain greedy decoding takes
            scores = logits.float() if not do_sample else F.log_softmax(logits.float(), dim=-1)
        if step == 0 and scores.isnan().any():
            # argmax over NaN is token 0 (often the pad token): NaN weights decoded empty
            # answers, which every metric scores as leaking nothing
            raise NonFiniteWeights("the model's next-token scores are NaN: its weights are not finite (a diverged "
                             "training, or an overflowing cast); its answers cannot be decoded or scored")
        nxt = pick_tokens(scores, do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator)
        nxt = nxt.masked_fill(finished, pad_token_id)
        new_tokens.append(nxt)
        finished |= torch.isin(nxt, eos)
        if step == max_new_tokens - 1:
            break
        if sync_ranks:
            if _all_ranks_done(bool(finished.all()), device):
                break
        elif finished.all():
            break
        feed = torch.cat([nxt, nxt]) if guided else nxt
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=feed[:, None], attention_mask=mask, position_ids=pos, **{kv: cache}, use_cache=True)
        cache, logits = output_cache(out), out.logits[:, -1]
    return torch.stack(new_tokens, dim=1) if new_tokens else ids.new_zeros((b, 0))


# --------------------------------------------------------------------------- text


def eos_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """Every id that ends an answer: the generation config's (Llama-3 has several), the
    tokenizer's, and the chat template's end of an answer, which training appends
    (:func:`cfg_unlearn.prompts.answer_end_ids`)."""
    ids: set[int] = set(answer_end_ids(tokenizer))
    gen = getattr(model, "generation_config", None)
    cfg_eos = getattr(gen, "eos_token_id", None)
    if isinstance(cfg_eos, int):
        ids.add(cfg_eos)
    elif cfg_eos:
        ids.update(int(i) for i in cfg_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def split_system(messages: Sequence[dict[str, str]]) -> tuple[str | None, list[dict[str, str]]]:
    """``(system instruction or None, the other messages)`` of a chat prompt."""
    msgs = [dict(m) for m in messages]
    if msgs and msgs[0].get("role") == "system":
        return msgs[0]["content"], msgs[1:]
    return None, msgs


def encode_prompts(
    tokenizer, prompts: Sequence[Prompt], *, system: str | None = None, blank_system: bool = False,
    replacement_system: str | None = None, side: str | None = None,
) -> list[list[int]]:
    """Token ids of each prompt, rendered exactly as the data module renders training
    prompts. Message lists use the chat template; their system instruction is a leading
    system message or else ``system``. With ``blank_system`` the instruction is removed
    (or replaced by ``replacement_system``): the unconditioned variant. Strings are raw
    text, tokenised with the tokenizer's special tokens and never altered. ``side`` names
    the list in errors (default: "unconditioned prompt" with ``blank_system``, else "prompt")."""
    out = []
    side = side or ("unconditioned prompt" if blank_system else "prompt")
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            ids = tokenizer(p)["input_ids"]
            if not ids:
                raise ValueError(f"{side} {i} is empty after tokenisation")
            out.append(ids)
            continue
        own, rest = split_system(p)
        if not rest:
            raise ValueError(f"{side} {i}: a chat prompt needs at least one non-system message")
        instruction = replacement_system if blank_system else (own or system)  # as training renders it
        text = render_prompt(tokenizer, rest, instruction)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def needed_positions(n_tokens: int, max_new_tokens: int) -> int:
    """The positions decoding a prompt of ``n_tokens`` needs: the prompt's and every new
    token's but the last, which is never fed back (a prompt of 19 tokens and 7 new ones
    fits 25 positions; 26 were asked for)."""
    return n_tokens + max(max_new_tokens - 1, 0)


def first_overflow(encoded: Sequence[Sequence[int]], max_new_tokens: int, limit: int | None) -> int | None:
    """The index of the first prompt whose decoding with ``max_new_tokens`` does not fit
    a context of ``limit`` positions (None: all fit, or no limit is known)."""
    if limit is None:
        return None
    return next((i for i, ids in enumerate(encoded) if needed_positions(len(ids), max_new_tokens) > limit), None)


def overflow_message(n_tokens: int, max_new_tokens: int, limit: int) -> str:
    return (f"is {n_tokens:,} tokens; with max_new_tokens={max_new_tokens} it needs "
            f"{needed_positions(n_tokens, max_new_tokens):,} "
            f"positions, more than the model's context of {limit:,} (config.max_position_embeddings): shorten it "
            "or ask for fewer new tokens")


def answer_token_ids(model: torch.nn.Module, tokenizer, answers: Sequence[str]) -> list[list[int]]:
    """Each answer's tokens and the end token training appends
    (:func:`cfg_unlearn.prompts.answer_end_ids`), as answers are scored; where that names
    none (no EOS; the data module refuses such a tokenizer), the smallest of the
    model's end ids."""
    end = answer_end_ids(tokenizer) or eos_token_ids(model, tokenizer)[:1]
    if not end:
        raise ValueError("the model and tokenizer name no EOS token to end an answer with")
    encode = answer_encoder(tokenizer, end)
    return [encode(a) for a in answers]


def answer_overflow_message(n_tokens: int, limit: int) -> str:
    """What a prompt with its scored answer (``n_tokens`` in all) is told when it does not
    fit: no token is decoded, so there are no new tokens to ask fewer of."""
    return (f"is {n_tokens:,} tokens, more than the model's context of {limit:,} (config.max_position_embeddings): "
            "shorten it")


def _encode_branches(tokenizer, prompts: Sequence[Prompt], uncond_prompts: Sequence[Prompt] | None, *,
                     system: str | None, uncond_system: str | None, guided: bool
                     ) -> tuple[list[Prompt], list[list[int]], list[list[int]] | None]:
    """``(prompts as a list, conditioned ids, unconditioned ids or None)``, as
    :func:`generate` documents its prompt arguments."""
    if isinstance(prompts, (str, dict)):
        raise TypeError(f"prompts must be a list of prompts (strings or message lists), got one {type(prompts).__name__}"
                        f"; wrap it in a list")
    prompts = list(prompts)
    if prompts and all(isinstance(p, dict) for p in prompts):
        raise TypeError("prompts is one conversation (a list of messages); wrap it in a list: [messages]")
    cond = encode_prompts(tokenizer, prompts, system=system)
    if not guided:
        return prompts, cond, None
    if uncond_prompts is not None:
        if len(uncond_prompts) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(uncond_prompts)} uncond_prompts")
        return prompts, cond, encode_prompts(tokenizer, list(uncond_prompts), system=None, side="uncond_prompts item")
    if any(isinstance(p, str) for p in prompts):
        raise ValueError(
            "raw-string prompts have no system instruction to blank: pass uncond_prompts, "
            "or give chat message lists"
        )
    return prompts, cond, encode_prompts(tokenizer, prompts, blank_system=True, replacement_system=uncond_system)


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    uncond_prompts: Sequence[Prompt] | None = None,
    system: str | None = None,
    uncond_system: str | None = None,
    guidance_scale: float = 1.0,
    space: Space = "logprob",
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    batch_size: int = 16,
    sync_ranks: bool = False,
    progress: bool = False,
    return_finished: bool = False,
) -> list[str] | tuple[list[str], list[bool]]:
    """Decode an answer for each prompt with classifier-free guidance.

    Args:
        model: a Hugging Face causal LM (or PEFT model). Put in eval mode for the call.
        tokenizer: its tokenizer.
        prompts: chat message lists (``[{"role", "content"}, ...]``) or raw strings.
        uncond_prompts: explicit unconditioned prompts, one per prompt. Default for chat
            prompts: the same conversation with the system instruction blanked (or
            replaced by ``uncond_system``). Raw-string prompts need them when ``g != 1``.
        system: the conditioning instruction for chat prompts without a system message
            (e.g. :data:`~cfg_unlearn.prompts.SAFETY_INSTRUCTION`).
        uncond_system: a negative instruction for the unconditioned branch instead of a
            blank (the instruction-swap variant).
        guidance_scale: ``g``; 1 is plain decoding.
        space: ``logprob`` or ``prob`` (see the module docstring).
        max_new_tokens: tokens per answer at most.
        do_sample, temperature, top_p: sampling; greedy by default.
        seed: seeds the sampling generator, one for the call: the same call repeats
            its samples exactly; a prompt's sample also depends on ``batch_size`` and on
            the other prompts (they draw from the same generator, longest first).
        batch_size: prompts per batch (``2 * batch_size`` rows with guidance). Prompts
            are decoded longest first, so batches waste little padding; results come
            back in the input order.
        sync_ranks: under DDP/FSDP, run the same number of steps on every rank; every
            rank must then call with the same number of prompts.
        progress: show a progress bar over batches.
        return_finished: also return, per answer, whether it ended with an EOS token
            (False: ``max_new_tokens`` cut it off, possibly mid-word).

    Returns:
        The decoded answers (special tokens removed, cut at EOS); with
        ``return_finished``, ``(answers, finished)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_guidance(guidance_scale, space)  # a NaN g would argmax to token 0 everywhere
    guided = guidance_scale != 1
    prompts, cond, uncond = _encode_branches(tokenizer, prompts, uncond_prompts, system=system,
                                             uncond_system=uncond_system, guided=guided)
    # refused before any decoding: past its positions a model with learned position
    # embeddings fails deep inside (a device-side assert on CUDA), a rotary one decodes
    # silently into text it was never trained to produce, and either scores as an answer
    limit = context_limit(model)
    for side, encoded in (("prompt", cond), ("unconditioned prompt", uncond or [])):
        i = first_overflow(encoded, max_new_tokens, limit)
        if i is not None:
            raise ValueError(f"{side} {i} " + overflow_message(len(encoded[i]), max_new_tokens, limit))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    eos = eos_token_ids(model, tokenizer)
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: -len(cond[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    answers: list[str | None] = [None] * len(prompts)
    finished = [False] * len(prompts)
    with eval_mode(model):
        from tqdm.auto import tqdm

        for idx in tqdm(batches, desc=f"decode g={guidance_scale:g}", disable=not progress, leave=False):
            ids, mask = left_pad([cond[i] for i in idx], pad)
            u_ids = u_mask = None
            if guided:
                u_ids, u_mask = left_pad([uncond[i] for i in idx], pad)
            new = cfg_decode(
                model, ids, mask, u_ids, u_mask,
                guidance_scale=guidance_scale, space=space, max_new_tokens=max_new_tokens,
                eos_token_id=eos, pad_token_id=pad, do_sample=do_sample, temperature=temperature,
                top_p=top_p, generator=generator, sync_ranks=sync_ranks,
            )
            for row, i in zip(new.tolist(), idx):
                kept = _cut_at_eos(row, eos)
                finished[i] = len(kept) < len(row)
                answers[i] = tokenizer.decode(kept, skip_special_tokens=True)
    return (answers, finished) if return_finished else answers  # type: ignore[return-value]


@torch.no_grad()
def answer_logprobs(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    answers: Sequence[str],
    *,
    uncond_prompts: Sequence[Prompt] | None = None,
    system: str | None = None,
    uncond_system: str | None = None,
    guidance_scale: float = 1.0,
    space: Space = "logprob",
    batch_size: int = 16,
) -> list[tuple[float, int]]:
    """Teacher-forced log-probability of each answer after its prompt, under the
    next-token distribution that :func:`generate` decodes from at the same settings
    (:func:`guided_logprobs`; the prompt arguments as :func:`generate` takes them).

    An answer is scored as its tokens plus the end token training appends
    (:func:`answer_token_ids`).
    Returns ``(sum of the tokens' log-probabilities, number of tokens)`` per answer; the
    sum is ``-inf`` where probability-space guidance clamped one of its tokens to 0.
    ``exp(-sum(sums) / sum(counts))`` is the set's perplexity
    (:class:`cfg_unlearn.metrics.ReferencePerplexity`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_guidance(guidance_scale, space)
    if len(answers) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    guided = guidance_scale != 1
    prompts, cond, uncond = _encode_branches(tokenizer, prompts, uncond_prompts, system=system,
                                             uncond_system=uncond_system, guided=guided)
    targets = answer_token_ids(model, tokenizer, answers)
    limit = context_limit(model)
    for side, encoded in (("prompt", cond), ("unconditioned prompt", uncond or [])):
        i = first_overflow([p + t for p, t in zip(encoded, targets)], 0, limit)
        if i is not None:
            raise ValueError(f"{side} {i} with its answer "
                             + answer_overflow_message(len(encoded[i]) + len(targets[i]), limit))
    # no pad token: the EOS every answer ends with (no answers: nothing is padded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (targets[0][-1] if targets else 0)
    device = next(model.parameters()).device

    def answer_logits(encoded: list[list[int]], idx: list[int], n: int) -> torch.Tensor:
        # left padded, every row ends with its answer: the n positions before the last
        # predict the last n tokens
        ids, mask = left_pad([encoded[i] + targets[i] for i in idx], pad)
        ids, mask = ids.to(device), mask.to(device)
        # only the positions scored: a 128k vocabulary over every position of a batch is GBs
        keep = {"logits_to_keep": n + 1} if _accepts_logits_to_keep(model) else {}
        logits = model(input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask), use_cache=False,
                       **keep).logits
        return logits[:, -n - 1 : -1]

    out: list[tuple[float, int]] = [(0.0, 0)] * len(prompts)
    with eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            idx = list(range(start, min(start + batch_size, len(prompts))))
            n = max(len(targets[i]) for i in idx)
            logps = guided_logprobs(answer_logits(cond, idx, n), answer_logits(uncond, idx, n) if guided else None,
                                    guidance_scale, space)
            for row, i in enumerate(idx):
                t = torch.as_tensor(targets[i], device=logps.device)
                picked = logps[row, n - len(t) :].gather(-1, t[:, None]).squeeze(-1)
                # summed in float64 on the CPU (Apple's MPS has no float64)
                out[i] = (float(picked.cpu().double().sum()), len(t))
    return out


def _cut_at_eos(tokens: list[int], eos: Sequence[int]) -> list[int]:
    """``tokens`` up to their first EOS (all of them when there is none)."""
    for j, t in enumerate(tokens):
        if t in eos:
            return tokens[:j]
    return tokens
