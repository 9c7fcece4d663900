"""CFG decoding speed: plain greedy ``generate``, Hugging Face CFG and ours, in one run.

One random-init Llama (~12M parameters), one set of chat prompts of different lengths
(system instruction + a conversation; the unconditioned prompt is the same conversation
without it; two sets: short evaluation probes and long conversations), greedy, a fixed number of new tokens for every method (EOS ignored), at
batch 1 (prompts one at a time) and batch 8 (one left-padded batch):

* ``plain``:  ``model.generate(...)`` (no guidance), the cost floor;
* ``hf_cfg``: ``model.generate(..., guidance_scale=g, negative_prompt_ids=...)``;
* ``ours``:   :func:`cfg_unlearn.guidance.cfg_decode` at the same ``g`` (log space).

Prints new tokens/s of each (median of ``--repeats`` interleaved runs) and the two ratios
the product is judged by: ours / hf_cfg throughput, and ours / plain time per token.

    python benchmarks/cfg_decode.py [--new-tokens 32] [--repeats 3] [--scale 2.0]
    python benchmarks/cfg_decode.py --arch llama3.1-8b   # a random-init model of a real shape, bf16

On a GPU a 12M model is bound by kernel launches, not by the weights it reads; ``--arch``
(the shapes of ``benchmarks/real_shape.py``) times decoding where the weights dominate.

Timings are only meaningful against the peers measured in the same run.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cfg_unlearn.data.world import World, WorldConfig  # noqa: E402
from cfg_unlearn.guidance import cfg_decode, encode_prompts, left_pad  # noqa: E402
from cfg_unlearn.prompts import SAFETY_INSTRUCTION  # noqa: E402
from cfg_unlearn.tiny import BENCH_SPEC, build_tiny  # noqa: E402
from real_shape import ARCHS, random_model  # noqa: E402  (beside this file)

N_PROMPTS = 8


def make_prompts(n: int, max_turns: int) -> list[list[dict[str, str]]]:
    """Chat prompts of different lengths: 0..max_turns history turns from the synthetic
    world before a held-out leak probe."""
    world = World(WorldConfig(seed=1, n_people=20))
    history = [m for c in world.conversations for m in c.messages]
    return [history[: 2 * (i % (max_turns + 1))] + list(world.leak_probes[i].prompt) for i in range(n)]


#: name -> history turns: "probes" is the evaluation workload (a question, at most two
#: earlier exchanges); "long" has up to 7 exchanges, where the prefill dominates.
PROMPT_SETS = {"probes": 2, "long": 7}


def time_it(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of each; the median is reported")
    ap.add_argument("--scale", type=float, default=2.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sets", nargs="+", default=list(PROMPT_SETS), choices=list(PROMPT_SETS))
    ap.add_argument("--arch", choices=sorted(ARCHS), help="a random-init bf16 model of this shape instead of "
                    "the 12M float32 Llama (built in memory on --device)")
    a = ap.parse_args()
    for name, value in (("--new-tokens", a.new_tokens), ("--repeats", a.repeats)):
        if value < 1:
            ap.error(f"{name} must be >= 1, got {value}")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if a.arch:
        run(a, *random_model(a.arch, a.device))
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="cfg-bench-") as work:  # ~50 MB of model, removed after
        model_dir = build_tiny(Path(work) / "model", spec=BENCH_SPEC)
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(a.device)
    run(a, model, tok)


def run(a: argparse.Namespace, model, tok) -> None:
    model.eval()
    pad, n_new, g = tok.pad_token_id, a.new_tokens, a.scale
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f}M {a.arch or 'tiny'} {model.dtype} parameters on {a.device}; {N_PROMPTS} prompts per set; {n_new} new "
          f"tokens each; g={g}; torch threads {torch.get_num_threads()}")
    for set_name in a.sets:
        prompts = make_prompts(N_PROMPTS, PROMPT_SETS[set_name])
        cond = encode_prompts(tok, prompts, system=SAFETY_INSTRUCTION)
        uncond = encode_prompts(tok, prompts, blank_system=True)
        print(f"[{set_name}] prompts of {min(map(len, cond))}-{max(map(len, cond))} tokens (unconditioned "
              f"{min(map(len, uncond))}-{max(map(len, uncond))})")
        run_set(model, cond, uncond, pad, n_new, g, a.repeats, a.device)


def run_set(model, cond, uncond, pad: int, n_new: int, g: float, repeats: int, device: str) -> None:

    def batches(bs: int):
        for i in range(0, N_PROMPTS, bs):
            c = [t.to(device) for t in left_pad(cond[i : i + bs], pad)]
            u = [t.to(device) for t in left_pad(uncond[i : i + bs], pad)]
            yield c, u

    def plain(bs: int) -> None:
        for (ids, mask), _ in batches(bs):
            model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                           do_sample=False, pad_token_id=pad)

    def hf_cfg(bs: int) -> None:
        for (ids, mask), (u_ids, u_mask) in batches(bs):
            model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                           do_sample=False, pad_token_id=pad, guidance_scale=g,
                           negative_prompt_ids=u_ids, negative_prompt_attention_mask=u_mask)

    def ours(bs: int) -> None:
        for (ids, mask), (u_ids, u_mask) in batches(bs):
            out = cfg_decode(model, ids, mask, u_ids, u_mask, guidance_scale=g, max_new_tokens=n_new,
                             eos_token_id=None, pad_token_id=pad)
            assert out.shape[1] == n_new

    methods = {"plain": plain, "hf_cfg": hf_cfg, "ours": ours}
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    for bs in (1, 8):
        for fn in methods.values():  # warm-up: allocator, kernels, first-call overheads
            fn(bs)
        times: dict[str, list[float]] = {k: [] for k in methods}
        for _ in range(repeats):
            for k, fn in methods.items():
                sync()
                times[k].append(time_it(lambda: (fn(bs), sync())))
        tps = {k: N_PROMPTS * n_new / statistics.median(v) for k, v in times.items()}
        print(f"  batch {bs}: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in tps.items()))
        print(f"    ours vs HF CFG throughput: {tps['ours'] / tps['hf_cfg']:.2f}x   "
              f"ours cost vs plain greedy: {tps['plain'] / tps['ours']:.2f}x   "
              f"(HF CFG cost vs plain: {tps['plain'] / tps['hf_cfg']:.2f}x)")


if __name__ == "__main__":
    main()
