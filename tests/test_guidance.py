"""The CFG decoding engine: the math pinned by hand, the loop on a scripted model, and
token identity against transformers on the tiny model."""

import math
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from cfg_unlearn.data.world import World, WorldConfig
from cfg_unlearn.guidance import (
    answer_logprobs,
    answer_token_ids,
    cfg_decode,
    encode_prompts,
    eos_token_ids,
    generate,
    guided_logprobs,
    guided_scores,
    left_pad,
    pick_tokens,
    top_p_filter,
)
from cfg_unlearn.models import load_causal_lm, load_tokenizer
from cfg_unlearn.prompts import NEGATIVE_INSTRUCTION, SAFETY_INSTRUCTION, render_prompt

# ------------------------------------------------------------------ the math


def test_logprob_space_is_u_plus_g_times_c_minus_u():
    c_logits = torch.tensor([[2.0, 1.0, 0.0]])
    u_logits = torch.tensor([[0.0, 1.0, 2.0]])
    c = c_logits.log_softmax(-1)
    # log-softmax of (2, 1, 0) is (2, 1, 0) - log(e^2 + e + 1)
    lse = math.log(math.e**2 + math.e + 1)
    assert c[0, 0].item() == pytest.approx(2 - lse, abs=1e-6)
    out = guided_scores(c_logits, u_logits, 3.0, "logprob")
    # u + 3 (c - u) = 3c - 2u: token 0 -> 3(2-lse) - 2(0-lse) = 6 - lse
    want = torch.tensor([[6 - lse, 1 - lse, -4 - lse]])
    assert torch.allclose(out, want, atol=1e-5)
    assert torch.equal(guided_scores(c_logits, u_logits, 1.0, "logprob"), c)
    assert torch.equal(guided_scores(c_logits, None, 3.0, "prob"), c)


@pytest.mark.parametrize(
    "g, want",
    [
        # P_c = (0.7, 0.2, 0.1), P_u = (0.4, 0.4, 0.2)
        (1.5, (0.85, 0.10, 0.05)),  # 0.4 + 1.5 * 0.3 etc.: sums to 1, nothing clamped
        (2.0, (1.0, 0.0, 0.0)),  # (1.0, 0.0, 0.0) exactly
        (3.0, (1.0, 0.0, 0.0)),  # (1.3, -0.2, -0.1) -> clamp -> (1.3, 0, 0) -> renormalise
        (0.0, (0.4, 0.4, 0.2)),  # g = 0 is the unconditioned model
    ],
)
def test_prob_space_clamps_and_renormalises(g, want):
    c = torch.tensor([[0.7, 0.2, 0.1]]).log()
    u = torch.tensor([[0.4, 0.4, 0.2]]).log()
    p = guided_scores(c, u, g, "prob").exp()
    assert torch.allclose(p, torch.tensor([want]), atol=1e-6)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_prob_space_sampling_never_picks_clamped_tokens():
    c = torch.tensor([[0.5, 0.3, 0.1, 0.1]]).log().expand(4000, 4)
    u = torch.tensor([[0.2, 0.2, 0.3, 0.3]]).log().expand(4000, 4)
    # g=3: (1.1, 0.5, -0.3, -0.3) -> (1.1, 0.5, 0, 0) / 1.6
    scores = guided_scores(c, u, 3.0, "prob")
    draws = pick_tokens(scores, do_sample=True, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}
    assert (draws == 0).float().mean().item() == pytest.approx(1.1 / 1.6, abs=0.03)



@pytest.mark.parametrize("space", ["logprob", "prob"])
def test_banned_tokens_stay_banned_and_never_make_nan(space):
    """A -inf logit (a masked vocabulary slot) used to give NaN in log space
    (-inf - -inf), which argmax picks and sampling refuses. Banned in the conditioned
    branch: -inf; banned only in the unconditioned one: the conditioned score."""
    ninf = float("-inf")
    c_logits = torch.tensor([[2.0, 1.0, ninf, 0.0, 1.5]])
    u_logits = torch.tensor([[1.0, 2.0, ninf, 0.0, ninf]])
    out = guided_scores(c_logits, u_logits, 2.0, space)
    assert not out.isnan().any()
    assert out[0, 2] == ninf
    draws = pick_tokens(out.expand(500, 5), do_sample=True, generator=torch.Generator().manual_seed(0))
    assert 2 not in draws.tolist()
    if space == "logprob":
        c, u = c_logits.log_softmax(-1), u_logits.log_softmax(-1)
        assert out[0, 4] == c[0, 4]
        finite = [0, 1, 3]  # the formula, unchanged where both branches are finite
        assert torch.allclose(out[0, finite], 2 * (c - u)[0, finite] + u[0, finite])


@pytest.mark.parametrize("g", [0.0, 0.5])
def test_below_one_a_token_the_unconditioned_branch_bans_stays_banned(g):
    """Below g=1, log-space guidance is the geometric mixture c^g u^(1-g): a token the
    unconditioned branch bans is banned (at g=0, decoding is the unconditioned branch
    alone, as probability space is too). The g > 1 rule (keep the conditioned score) let
    it win the argmax at g=0 and 0.5."""
    ninf = float("-inf")
    c_logits = torch.tensor([[0.0, 0.0, 5.0, 1.0]])
    u_logits = torch.tensor([[0.0, 0.0, ninf, 1.0]])
    for space in ("logprob", "prob") if g == 0 else ("logprob",):
        out = guided_scores(c_logits, u_logits, g, space)
        assert not out.isnan().any() and out[0, 2] == ninf and out.argmax().item() == 3, space
    if g == 0:
        torch.testing.assert_close(guided_scores(c_logits, u_logits, 0.0), u_logits.log_softmax(-1))


def test_unknown_space_is_an_error():
    with pytest.raises(ValueError, match="space must be one of"):
        guided_scores(torch.zeros(1, 3), torch.zeros(1, 3), 2.0, "logit")


def test_top_p_keeps_the_smallest_nucleus():
    scores = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = torch.isfinite(top_p_filter(scores, 0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 >= 0.7
    kept = torch.isfinite(top_p_filter(scores, 0.85))
    assert kept.tolist() == [[True, True, True, False]]
    assert torch.isfinite(top_p_filter(scores, 0.01)).sum() == 1  # never empty
    assert torch.equal(top_p_filter(scores, 1.0), scores)


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        left_pad([[1], []], 0)


# ------------------------------------------------------------------ the loop, on a scripted model


class ScriptedLM(torch.nn.Module):
    """Next token = last token + 1 (one-hot logits); ``EOS`` = vocab - 1. Records every
    forward's inputs so the test can check positions, masks and the number of steps."""

    VOCAB = 12
    EOS = 11

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[dict] = []

    def forward(self, input_ids, attention_mask, position_ids, use_cache, past_key_values=None, logits_to_keep=0):
        self.calls.append(
            {"ids": input_ids.clone(), "mask": attention_mask.clone(), "pos": position_ids.clone(),
             "cache": past_key_values}
        )
        nxt = (input_ids[:, -1:] + 1).clamp(max=self.EOS)
        logits = torch.nn.functional.one_hot(nxt, self.VOCAB).float() * 10
        return SimpleNamespace(logits=logits, past_key_values=len(self.calls))


def test_rows_stop_at_eos_and_are_padded_after_it():
    lm = ScriptedLM()
    ids, mask = left_pad([[1, 2, 9], [7], [3, 4]], pad_token_id=0)
    out = cfg_decode(lm, ids, mask, max_new_tokens=10, eos_token_id=ScriptedLM.EOS, pad_token_id=0)
    assert out.tolist() == [
        [10, 11, 0, 0, 0, 0, 0],
        [8, 9, 10, 11, 0, 0, 0],
        [5, 6, 7, 8, 9, 10, 11],
    ]
    assert len(lm.calls) == 7  # the prefill + 6 steps: stops once every row is done
    # positions count from each row's first real token; pads get 1 (as transformers does)
    assert lm.calls[0]["pos"].tolist() == [[0, 1, 2], [1, 1, 0], [1, 0, 1]]
    assert lm.calls[1]["pos"].tolist() == [[3], [1], [2]]
    assert lm.calls[1]["mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]]
    assert lm.calls[2]["cache"] == 2  # each step continues from the previous step's cache


def test_max_new_tokens_bounds_and_eos_none_never_stops():
    lm = ScriptedLM()
    ids, mask = left_pad([[1]], 0)
    assert cfg_decode(lm, ids, mask, max_new_tokens=3, eos_token_id=ScriptedLM.EOS).tolist() == [[2, 3, 4]]
    assert len(lm.calls) == 3  # no forward is wasted after the last token
    out = cfg_decode(ScriptedLM(), *left_pad([[9]], 0), max_new_tokens=5, eos_token_id=None)
    assert out.tolist() == [[10, 11, 11, 11, 11]]


def test_guided_rows_share_one_forward():
    lm = ScriptedLM()
    ids, mask = left_pad([[1, 2, 3], [4]], 0)
    u_ids, u_mask = left_pad([[3], [2, 3, 4, 4]], 0)
    out = cfg_decode(lm, ids, mask, u_ids, u_mask, guidance_scale=2.0, max_new_tokens=2, eos_token_id=None)
    first = lm.calls[0]
    assert first["ids"].shape == (4, 4)  # 2B rows, one length: the longest of both sides
    assert first["ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 4], [0, 0, 0, 3], [2, 3, 4, 4]]
    # both branches are fed the guided token of their pair
    assert lm.calls[1]["ids"][:, 0].tolist() == out[:, 0].tolist() * 2
    with pytest.raises(ValueError, match="needs unconditioned prompts"):
        cfg_decode(lm, ids, mask, guidance_scale=2.0)


# ------------------------------------------------------------------ synced stop under DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank: int, port: int, sync: bool, results) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        lm = ScriptedLM()
        # rank 0's row is done after 1 token (EOS), rank 1's after 8 (4, 5, ..., 11)
        ids, mask = left_pad([[10] if rank == 0 else [3]], 0)
        out = cfg_decode(lm, ids, mask, max_new_tokens=20, eos_token_id=ScriptedLM.EOS, sync_ranks=sync)
        results[rank] = (len(lm.calls), out.tolist())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sync", [True, False])
def test_sync_ranks_runs_the_same_number_of_forwards_on_every_rank(sync):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_sync_worker, args=(_free_port(), sync, results), nprocs=2, join=True)
        calls = {r: results[r][0] for r in (0, 1)}
        outs = {r: results[r][1] for r in (0, 1)}
    assert outs[0][0][0] == 11 and outs[1][0][-1] == 11  # same tokens either way
    if sync:
        assert calls[0] == calls[1] == 8  # the prefill + 7 steps of rank 1 (tokens 4..11)
        assert outs[0] == [[11, 0, 0, 0, 0, 0, 0, 0]]  # kept stepping on padding
    else:
        assert (calls[0], calls[1]) == (1, 8)  # what would deadlock a sharded model


# ------------------------------------------------------------------ the tiny model vs transformers


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), dtype="float32").eval()
    return model, tok


@pytest.fixture(scope="module")
def prompts():
    """8 chat prompts of different lengths (0-7 history turns before a held-out probe)."""
    world = World(WorldConfig(seed=3, n_people=10))
    history = [m for c in world.conversations for m in c.messages]
    return [history[: 2 * i] + list(world.leak_probes[5 * i].prompt) for i in range(8)]


def _hf_generate(model, tok, ids, uncond=None, g=1.0, n=16):
    x = torch.tensor([ids])
    kw = {}
    if uncond is not None:
        u = torch.tensor([uncond])
        kw = {"guidance_scale": g, "negative_prompt_ids": u, "negative_prompt_attention_mask": torch.ones_like(u)}
    eos = eos_token_ids(model, tok)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         eos_token_id=eos, pad_token_id=tok.pad_token_id, **kw)
    new = out[0, len(ids):].tolist()
    new = new[: next((j for j, t in enumerate(new) if t in eos), len(new))]
    return tok.decode(new, skip_special_tokens=True)


def test_g1_equals_plain_greedy_generate(tiny, prompts):
    model, tok = tiny
    ours = generate(model, tok, prompts, system=SAFETY_INSTRUCTION, max_new_tokens=16)
    ids = encode_prompts(tok, prompts, system=SAFETY_INSTRUCTION)
    assert ours == [_hf_generate(model, tok, p) for p in ids]
    assert len(set(ours)) > 4 and all(ours)  # real, varied text: the comparison is not vacuous


@pytest.mark.parametrize("g", [1.0, 2.0])
def test_the_kv_cache_goes_by_the_name_the_model_takes(tiny, prompts, g):
    """transformers 5.2x renamed the KV cache argument and output past_key_values ->
    cache: every decode warned "`past_key_values` is deprecated and will be removed in
    version 5.40.0" (generate's console, the demo's), and 5.40 would stop reading it. The
    engine passes and reads the cache under the name the model's forward takes, with the
    same tokens as transformers' own generate."""
    import inspect
    import warnings

    from cfg_unlearn.guidance import cache_argument

    model, tok = tiny
    taken = inspect.signature(model.forward).parameters
    assert cache_argument(model) == ("cache" if "cache" in taken else "past_key_values")

    class Wrapper(torch.nn.Module):  # as DDP and FSDP wrap a model: forward(*args, **kwargs)
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    inner = SimpleNamespace(forward=lambda input_ids, past_key_values=None: None)
    assert cache_argument(Wrapper(model)) == cache_argument(model)
    old_style = Wrapper(torch.nn.Module())
    old_style.module.forward = inner.forward  # a remote-code model that still reads past_key_values
    assert cache_argument(old_style) == "past_key_values"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = generate(model, tok, prompts[:3], system=SAFETY_INSTRUCTION, guidance_scale=g, max_new_tokens=8)
    assert not [w for w in caught if "past_key_values" in str(w.message)], [str(w.message) for w in caught]
    if g == 1.0:
        assert ours == [_hf_generate(model, tok, p, n=8) for p in encode_prompts(tok, prompts[:3], system=SAFETY_INSTRUCTION)]


@pytest.mark.parametrize("g", [1.0, 2.0])
def test_fp32_weights_decode_under_bf16_autocast(tiny, prompts, g):
    """GuidanceEval decodes inside the precision plugin's autocast (fp32 weights,
    ``bf16-mixed``): keys leave the rotary embedding in float32 and values in bfloat16,
    which a preallocated cache (one dtype) refused with an index_copy_ dtype error. Under
    autocast the dynamic cache is used, and greedy g=1 matches transformers' generate
    under the same autocast token for token (prompt by prompt)."""
    model, tok = tiny
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = generate(model, tok, prompts, system=SAFETY_INSTRUCTION, guidance_scale=g, max_new_tokens=12)
        if g == 1.0:  # one prompt at a time: bf16 rounds a padded batch differently
            ids = encode_prompts(tok, prompts, system=SAFETY_INSTRUCTION)
            single = generate(model, tok, prompts, system=SAFETY_INSTRUCTION, max_new_tokens=12, batch_size=1)
            assert single == [_hf_generate(model, tok, p, n=12) for p in ids]
    assert len(ours) == len(prompts) and len(set(ours)) > 4 and all(ours)


@pytest.mark.parametrize("g", [1.5, 3.0])
def test_log_space_equals_transformers_cfg_at_batch_1(tiny, prompts, g):
    model, tok = tiny
    ids = encode_prompts(tok, prompts, system=SAFETY_INSTRUCTION)
    neg = encode_prompts(tok, prompts, blank_system=True)
    ours = generate(model, tok, prompts, system=SAFETY_INSTRUCTION, guidance_scale=g, max_new_tokens=16,
                    batch_size=1)
    assert ours == [_hf_generate(model, tok, c, u, g) for c, u in zip(ids, neg)]
    plain = generate(model, tok, prompts, system=SAFETY_INSTRUCTION, max_new_tokens=16)
    assert sum(a != b for a, b in zip(ours, plain)) >= 2  # guidance changed the answers


@pytest.mark.parametrize("g, space", [(1.0, "logprob"), (2.0, "logprob"), (2.0, "prob"), (3.0, "prob")])
def test_padded_batch_equals_one_at_a_time(tiny, prompts, g, space):
    model, tok = tiny
    lengths = [len(x) for x in encode_prompts(tok, prompts, system=SAFETY_INSTRUCTION)]
    assert len(set(lengths)) == 8  # every row of the batch is padded differently
    kw = dict(system=SAFETY_INSTRUCTION, guidance_scale=g, space=space, max_new_tokens=16)
    batched = generate(model, tok, prompts, batch_size=8, **kw)
    single = [generate(model, tok, [p], batch_size=1, **kw)[0] for p in prompts]
    assert batched == single


def test_default_uncond_blanks_the_system_and_options_replace_it(tiny, prompts):
    model, tok = tiny
    p = prompts[:3]
    with_system = [[{"role": "system", "content": SAFETY_INSTRUCTION}, *x] for x in p]
    blank = [list(x) for x in p]
    kw = dict(guidance_scale=2.0, max_new_tokens=12)
    # a leading system message == the `system` argument; blanked == explicit uncond prompts
    a = generate(model, tok, with_system, **kw)
    assert a == generate(model, tok, p, system=SAFETY_INSTRUCTION, **kw)
    assert a == generate(model, tok, with_system, uncond_prompts=blank, **kw)
    negative = [[{"role": "system", "content": NEGATIVE_INSTRUCTION}, *x] for x in p]
    b = generate(model, tok, with_system, uncond_system=NEGATIVE_INSTRUCTION, **kw)
    assert b == generate(model, tok, with_system, uncond_prompts=negative, **kw)
    assert a != b


def test_prompts_are_rendered_as_training_renders_them(tiny, prompts):
    _, tok = tiny
    ids = encode_prompts(tok, prompts[:2], system=SAFETY_INSTRUCTION)
    for p, got in zip(prompts[:2], ids):
        want = tok(render_prompt(tok, p, SAFETY_INSTRUCTION), add_special_tokens=False)["input_ids"]
        assert got == want
    assert encode_prompts(tok, ["raw text"]) == [tok("raw text")["input_ids"]]


def test_sampling_is_seeded_and_order_is_kept(tiny, prompts):
    model, tok = tiny
    kw = dict(system=SAFETY_INSTRUCTION, guidance_scale=2.0, space="prob", do_sample=True, top_p=0.9,
              temperature=0.8, max_new_tokens=12)
    a = generate(model, tok, prompts, seed=7, **kw)
    assert a == generate(model, tok, prompts, seed=7, **kw)
    assert a != generate(model, tok, prompts, seed=8, **kw)
    # results come back in input order whatever the batching
    greedy = dict(system=SAFETY_INSTRUCTION, guidance_scale=2.0, max_new_tokens=12)
    assert generate(model, tok, prompts, batch_size=3, **greedy) == generate(model, tok, prompts, **greedy)


def test_a_prompt_past_the_models_context_is_refused_before_decoding(tiny, prompts, monkeypatch):
    """Past its positions a model decodes text it was never trained on (a rotary one),
    or fails deep inside (learned positions; a device-side assert on CUDA); either was
    scored as an answer."""
    from cfg_unlearn.guidance import encode_prompts

    model, tok = tiny
    n = [len(ids) for ids in encode_prompts(tok, prompts[:3], system=SAFETY_INSTRUCTION)]
    monkeypatch.setattr(model.config, "max_position_embeddings", n[1] + 4)
    # fits exactly: the last new token is never fed back, so it needs no position (the
    # check asked for one more, refusing what decodes)
    assert len(generate(model, tok, prompts[:2], system=SAFETY_INSTRUCTION, max_new_tokens=5)) == 2
    with pytest.raises(ValueError, match=rf"^prompt 1 is {n[1]} tokens; with max_new_tokens=6 it needs {n[1] + 5} "
                                         rf"positions, more than the model's context of {n[1] + 4} "):
        generate(model, tok, prompts[:2], system=SAFETY_INSTRUCTION, max_new_tokens=6)
    # the unconditioned side too: here a longer negative instruction than the condition
    u = len(encode_prompts(tok, prompts[:1], blank_system=True, replacement_system="x " * 40)[0])
    monkeypatch.setattr(model.config, "max_position_embeddings", u - 1)
    assert n[0] < u - 1
    with pytest.raises(ValueError, match=rf"^unconditioned prompt 0 is {u} tokens"):
        generate(model, tok, prompts[:1], system=SAFETY_INSTRUCTION, uncond_system="x " * 40, guidance_scale=2.0,
                 max_new_tokens=0)


def test_context_limit_reads_through_wrappers_multimodal_configs_and_rope_scaling(tiny):
    from types import SimpleNamespace

    from transformers import LlamaConfig, Qwen2Config

    from cfg_unlearn.models import context_limit

    model, _ = tiny
    assert context_limit(model) == 1024
    assert context_limit(torch.nn.DataParallel(model)) == 1024  # DDP/FSDP/DataParallel keep it as .module
    assert context_limit(torch.nn.Linear(2, 2)) is None  # no config: nothing to check against
    # Qwen2.5's YaRN: 32k positions in the config, four times that readable
    yarn = Qwen2Config(max_position_embeddings=32768,
                       rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    assert context_limit(SimpleNamespace(config=yarn)) == 131072
    # Llama 3.1 states its extended window already (8k x 8 is less)
    llama = LlamaConfig(max_position_embeddings=131072, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0})
    assert context_limit(SimpleNamespace(config=llama)) == 131072
    assert context_limit(SimpleNamespace(config=LlamaConfig(max_position_embeddings=2048))) == 2048
    # a multimodal config keeps the text model's window in its text config
    outer = SimpleNamespace(get_text_config=lambda: LlamaConfig(max_position_embeddings=4096))
    assert context_limit(SimpleNamespace(config=outer)) == 4096


def test_generate_restores_train_mode_and_checks_its_inputs(tiny, prompts):
    model, tok = tiny
    model.train()
    model.model.embed_tokens.eval()  # a module left in eval (frozen dropout) stays so
    try:
        generate(model, tok, prompts[:1], max_new_tokens=2)
        assert model.training and model.model.layers[0].training and not model.model.embed_tokens.training
    finally:
        model.eval()
    with pytest.raises(ValueError, match="raw-string prompts"):
        generate(model, tok, ["hello"], guidance_scale=2.0)
    with pytest.raises(ValueError, match="1 prompts but 2 uncond_prompts"):
        generate(model, tok, ["hello"], uncond_prompts=["a", "b"], guidance_scale=2.0)
    with pytest.raises(ValueError, match="batch_size"):
        generate(model, tok, ["hello"], batch_size=0)
    for t in (0.0, float("nan"), float("inf")):  # NaN failed deep in torch.multinomial
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            generate(model, tok, ["hello"], do_sample=True, temperature=t)
    # a NaN scale argmaxed to token 0 (padding) everywhere: empty answers, no error
    # (and 1e39, beyond float32: NaN scores again, every answer empty)
    for g in (float("nan"), float("inf"), -1.0, 1e39, 1e6 + 1):
        with pytest.raises(ValueError, match=r"guidance_scale must be a finite number in \[0, 1e\+06\]"):
            generate(model, tok, prompts[:1], guidance_scale=g)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):  # was an IndexError in the cache
        generate(model, tok, prompts[:1], max_new_tokens=-1)
    with pytest.raises(TypeError, match="got one str"):  # was decoded as one prompt per character
        generate(model, tok, "hello", max_new_tokens=2)
    with pytest.raises(TypeError, match="one conversation"):
        generate(model, tok, prompts[0], max_new_tokens=2)
    # raw strings with explicit unconditioned strings are fine
    out = generate(model, tok, ["The email of"], uncond_prompts=["The"], guidance_scale=2.0, max_new_tokens=4)
    assert len(out) == 1 and isinstance(out[0], str)


def test_unconditioned_prompts_longer_than_the_conditioned_ones(tiny, prompts):
    """The merged cache then pads the conditioned side: still exact."""
    model, tok = tiny
    cond = prompts[:4]
    longer = [[*prompts[7][:-1], *p] for p in cond]  # extra history in the unconditioned branch
    ids, neg = encode_prompts(tok, cond), encode_prompts(tok, longer)
    assert all(len(n) > len(c) for c, n in zip(ids, neg))
    kw = dict(guidance_scale=2.0, max_new_tokens=12)
    batched = generate(model, tok, cond, uncond_prompts=longer, **kw)
    assert batched == [generate(model, tok, [c], uncond_prompts=[u], **kw)[0] for c, u in zip(cond, longer)]
    assert batched == [_hf_generate(model, tok, c, u, 2.0, n=12) for c, u in zip(ids, neg)]


def test_empty_prompts_are_named(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, tok, ["some text", ""], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 0: a chat prompt needs at least one non-system message"):
        generate(model, tok, [[{"role": "system", "content": "x"}]], max_new_tokens=2)
    # an empty explicit unconditioned prompt is named as one, not as the (fine) prompt beside it
    with pytest.raises(ValueError, match="uncond_prompts item 1 is empty"):
        generate(model, tok, ["The email of", "Hello"], uncond_prompts=["The", ""], guidance_scale=2.0)


@pytest.mark.parametrize("g,space", [(1.0, "logprob"), (2.0, "logprob"), (2.0, "prob")])
def test_a_model_with_nan_weights_is_refused_not_decoded_empty(tiny_model_dir, g, space):
    """One NaN weight made every score NaN; argmax picked token 0 (the pad token) and the
    answers came back empty, which LeakRate scored as no leak at all (a numerics audit)."""
    tok, model = load_tokenizer(str(tiny_model_dir)), load_causal_lm(str(tiny_model_dir)).eval()
    prompts = [[{"role": "user", "content": "What is the e-mail of Ann Lee?"}]]
    assert generate(model, tok, prompts, system="Avoid PII", guidance_scale=g, space=space, max_new_tokens=4)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="next-token scores are NaN: its weights are not finite"):
        generate(model, tok, prompts, system="Avoid PII", guidance_scale=g, space=space, max_new_tokens=4)


@pytest.mark.parametrize("family", ["bloom", "falcon-alibi"])
def test_alibi_models_decode_like_transformers(family):
    """ALiBi models crashed at the first forward, even at g=1: a static cache returns keys
    of its whole length, the ALiBi bias has the prompt's. At g=1 the answer is
    transformers' own greedy generate; at g=2 it is finite and ends as long."""
    from transformers import BloomConfig, BloomForCausalLM, FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    if family == "bloom":
        model = BloomForCausalLM(BloomConfig(vocab_size=97, hidden_size=32, n_layer=2, n_head=4)).eval()
    else:
        model = FalconForCausalLM(FalconConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, alibi=True, new_decoder_architecture=False,
                                               multi_query=True)).eval()
    ids, mask = left_pad([[5, 6, 7], [8, 9, 10, 11, 12]], 0)
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                          eos_token_id=None)[:, ids.shape[1]:]
    assert torch.equal(cfg_decode(model, ids, mask, guidance_scale=1.0, max_new_tokens=4, eos_token_id=[]), want)
    uncond, umask = left_pad([[7], [11, 12]], 0)
    assert cfg_decode(model, ids, mask, uncond, umask, guidance_scale=2.0, max_new_tokens=4,
                      eos_token_id=[]).shape == (2, 4)


# ------------------------------------------------------------------ scoring answers


def test_guided_logprobs_are_the_normalised_distribution_sampling_draws_from():
    """Log space's u + g(c - u) is no log-distribution: with c = logits (5, 0, 0), u = (0, 5, 0)
    and g = 3 the first token scores +9.99. Normalised, its log-probability is
    -log(1 + e^-25 + e^-15) (the scores are 9.99, -15.01 and -5.01)."""
    c, u = torch.tensor([[5.0, 0.0, 0.0]]), torch.tensor([[0.0, 5.0, 0.0]])
    assert guided_scores(c, u, 3.0)[0, 0].item() == pytest.approx(9.98661, abs=1e-4)
    logps = guided_logprobs(c, u, 3.0)  # float32: one step at 10 is 9.5e-7
    assert logps[0, 0].item() == pytest.approx(-math.log1p(math.exp(-25) + math.exp(-15)), abs=1e-6)
    assert logps[0, 1].item() == pytest.approx(-15.01339 - 9.98661, abs=1e-4)
    assert logps.exp().sum().item() == pytest.approx(1.0)
    # probability space and g = 1 were normalised already: unchanged
    for g, space in ((3.0, "prob"), (1.0, "logprob")):
        torch.testing.assert_close(guided_logprobs(c, u, g, space), guided_scores(c, u, g, space))


def _scored_alone(model, tok, prompt_ids, answer_ids, uncond_ids=None, g=1.0, space="logprob"):
    """One unpadded forward per branch, the answer's log-probs under guided_scores:
    what answer_logprobs must give for any batch."""
    @torch.no_grad()
    def logits(ids):
        x = torch.tensor([ids + answer_ids])
        return model(input_ids=x).logits[0, len(ids) - 1 : -1]

    scores = guided_scores(logits(prompt_ids), logits(uncond_ids) if uncond_ids else None, g, space)
    logps = scores - scores.logsumexp(-1, keepdim=True)  # sampling's softmax, normalised
    return float(logps.gather(-1, torch.tensor(answer_ids)[:, None]).sum())


@pytest.mark.parametrize("g, space", [(1.0, "logprob"), (2.5, "logprob"), (2.0, "prob")])
def test_answer_logprobs_of_a_padded_batch_equal_each_answer_scored_alone(tiny, prompts, g, space):
    model, tok = tiny
    answers = ["Paris.", "You can call them at a private number.", "", "The capital of Peru is Lima, 41 plus 1 is 42."]
    answers = (answers * 2)[: len(prompts)]
    got = answer_logprobs(model, tok, prompts, answers, system=SAFETY_INSTRUCTION, guidance_scale=g, space=space,
                          batch_size=3)
    cond = encode_prompts(tok, prompts, system=SAFETY_INSTRUCTION)
    uncond = encode_prompts(tok, prompts, blank_system=True) if g != 1 else [None] * len(prompts)
    eos = tok.eos_token_id  # the one training appends
    for (lp, n), c, u, a in zip(got, cond, uncond, answers):
        ids = tok(a, add_special_tokens=False)["input_ids"] + [eos]  # the EOS is scored: an empty answer is 1 token
        assert n == len(ids)
        assert lp == pytest.approx(_scored_alone(model, tok, c, ids, u, g, space), abs=1e-4)
    assert len({round(lp, 3) for lp, _ in got}) == len(got)  # real, distinct scores
    if g != 1:  # guidance changed the scores
        plain = answer_logprobs(model, tok, prompts, answers, system=SAFETY_INSTRUCTION)
        assert all(abs(a[0] - b[0]) > 1e-3 for a, b in zip(got, plain))


def test_answer_logprobs_end_with_the_eos_training_appends(tiny, prompts):
    """Llama 3's generation config lists several end ids; the answer is scored with the
    tokenizer's, which the data module appends in training, not the smallest id."""
    model, tok = tiny
    other = tok.eos_token_id + 7
    model.generation_config.eos_token_id = [other - 100 if other > 100 else 0, tok.eos_token_id]
    try:
        assert min(eos_token_ids(model, tok)) != tok.eos_token_id
        (lp, n), = answer_logprobs(model, tok, prompts[:1], ["Paris."])
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id
    ids = tok("Paris.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    c = encode_prompts(tok, prompts[:1])[0]
    assert n == len(ids) and lp == pytest.approx(_scored_alone(model, tok, c, ids), abs=1e-4)


def test_answer_logprobs_bad_input(tiny, prompts):
    model, tok = tiny
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        answer_logprobs(model, tok, prompts[:2], ["a"])
    with pytest.raises(ValueError, match="raw-string prompts have no system instruction"):
        answer_logprobs(model, tok, ["text"], ["a"], guidance_scale=2.0)
    with pytest.raises(ValueError, match="batch_size"):
        answer_logprobs(model, tok, prompts[:1], ["a"], batch_size=0)
    with pytest.raises(ValueError, match=r"prompt 0 with its answer is .* more than the model's context"):
        answer_logprobs(model, tok, prompts[:1], ["word " * 5000])


def test_decoding_stops_at_and_scoring_appends_the_chat_templates_answer_end(tiny_model_dir):
    """A template that ends answers with a token other than the EOS (an older Llama 3
    snapshot: EOS <|end_of_text|>, answers end with <|eot_id|>): training appends
    <|eot_id|> (the data module's test), so decoding must stop at it even where the
    generation config does not list it, and references are scored ending with it (and
    trimmed, as this template trims answers)."""
    tok = load_tokenizer(f"tiny:{tiny_model_dir}")
    tok.add_tokens(["<|eot_id|>", "<|end_of_text|>"], special_tokens=True)
    tok.eos_token = "<|end_of_text|>"
    tok.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + (m['content'] | trim) + '<|eot_id|>' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=tok.eos_token_id))
    assert eos_token_ids(model, tok) == sorted({eot, tok.eos_token_id})
    # and read as the template writes it: this one trims answers
    assert answer_token_ids(model, tok, ["Paris.\n"]) == [tok("Paris.", add_special_tokens=False)["input_ids"] + [eot]]
