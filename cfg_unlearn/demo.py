"""``cfg-unlearn demo``: the whole method on a laptop, offline, in minutes.

1. build the synthetic PII world and an offline tiny Llama for it;
2. fine-tune it on the world until it leaks (the model to fix);
3. generate replacement pairs **with that model** (``cfg-unlearn generate``'s code path);
4. ORPO with conditioning dropout on the pairs (``UnlearnModule`` in a Lightning Trainer;
   ``cond_mode="swap"``: the paper's instruction swap, the unconditioned branch under the
   negative instruction, in training and in guidance alike);
5. evaluate the leaky and the unlearned model on held-out direct probes, challenge-style
   continuation attacks and utility questions, every one decoded with the same guidance,
   at each scale and space;
6. write ``metrics.json``, ``report.md`` and ``leak_vs_guidance.png`` and print the table.

``leaky_from`` (``--leaky-from DIR``) copies steps 1 and 2's models from a finished demo
instead, so that other unlearning settings can be tried on the same leaky model in a
minute and a half rather than five.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import random
import secrets
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cfg_unlearn.data.schema import EvalRecord, prompt_text, write_pairs
from cfg_unlearn.data.world import World, WorldConfig
from cfg_unlearn.prompts import NEGATIVE_INSTRUCTION, SAFETY_INSTRUCTION, answer_encoder, render_prompt
from cfg_unlearn.tiny import TinySpec, build_tiny
from cfg_unlearn.utils import (OutputBusy, atomic_write, check_writable_file, exclusive_lock, same_path, signals_held,
                               staged_dir)

log = logging.getLogger(__name__)

#: Large enough to memorise a 30-person world in a few epochs on 2 CPU cores.
DEMO_SPEC = TinySpec(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, seed=0)


#: ``DemoConfig.cond_mode``: blank the instruction, or the paper's instruction swap
COND_MODES = ("dropout", "swap")
#: ``DemoConfig.fallback``: the leaky answer redacted (``generate --redact-fallback``), or the refusal template
FALLBACKS = ("redacted", "template")


@dataclass
class DemoConfig:
    out: str = "demo_out"
    seed: int = 0
    people: int = 30
    paraphrases: int = 8
    leak_epochs: int = 14
    leak_lr: float = 3e-3
    #: unlearning's cap; it stops earlier at ``stop_leak`` (seed 0 stops in its third)
    unlearn_epochs: int = 5
    #: stop unlearning once the pairs' own prompts, decoded under the safety instruction,
    #: give back at most this share of their values (``StopWhenForgotten``; None: train
    #: every epoch). A fixed three epochs left seed 2 leaking on 0.094 of its held-out
    #: probes (0.028 / 0.953 six steps later) and took 45 people past their utility
    #: (0.015 / 0.906): benchmarks/demo_levers.md, seventh session
    stop_leak: float | None = 0.03
    #: optimizer steps between those checks (each decodes every pair)
    stop_every: int = 3
    #: ORPO's odds-ratio weight (lambda): the paper's 0.1. On the world before the facts
    #: left the person answers' template, 1 kept more of the facts (the NLL of the redacted
    #: answers spilled into that shared template, "The capital of Egypt is a a a"); on
    #: today's world 0.1 keeps more accuracy on every AMD run (seed 0: leak 0.006 /
    #: accuracy 1.000 at g=1 against 0.011 / 0.922 with 1; README, "ORPO's weight")
    beta: float = 0.1
    #: on AMD seeds 0 to 2, 2.5e-4 lowers the leak rate and keeps more accuracy than
    #: 1.5e-4 did on every seed (the old world and leak stage); 2e-4 passes seed 0 alone
    #: and leaks on a third of seed 1's and 2's probes (benchmarks/demo_levers.md)
    unlearn_lr: float = 2.5e-4
    cond_dropout: float = 0.3
    cond_mode: str = "dropout"
    #: the ``--compare`` baselines other than ORPO: NPO's and DPO's inverse temperature
    #: (the papers' 0.1), and a learning rate at which NPO and gradient ascent unlearn
    #: within the three epochs (at 1.5e-4 they still leak on 0.36 and 0.27 of the probes)
    baseline_beta: float = 0.1
    baseline_lr: float = 2.5e-4
    #: "redacted" (``generate_pairs(redact_fallback=True)``) or "template"
    fallback: str = "redacted"
    scales: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)
    spaces: tuple[str, ...] = ("logprob", "prob")
    max_new_tokens: int = 32
    max_attacks: int | None = 150
    batch_size: int = 16
    compare: bool = False
    #: a finished demo's ``--out``: copy its tiny and leaky models instead of steps 1 and 2
    #: (the :data:`LEAK_SETTINGS` must be its own; ``None``: build and fine-tune them)
    leaky_from: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)


#: the settings the leaky model depends on: a run that copies it (``leaky_from``) must
#: have its source's, so that its world and its record describe the model it unlearns
LEAK_SETTINGS = ("seed", "people", "paraphrases", "leak_epochs", "leak_lr", "batch_size")


def examples_digest(examples) -> str:
    """sha256 of the leak stage's ``(prompt messages, answer)`` examples: ``metrics.json``'s
    ``world.leak_examples_sha256``, which a ``leaky_from`` run compares with its own world's
    (another Faker or cfg-unlearn version can build another world from the same seed)."""
    return hashlib.sha256(json.dumps(examples, ensure_ascii=False).encode("utf-8")).hexdigest()


def finetune(model, tokenizer, examples, *, epochs: int, lr: float, seed: int, batch_size: int = 16,
             progress: bool = True, desc: str = "fine-tune the model to fix") -> list[float]:
    """Plain causal-LM fine-tuning on (prompt messages, answer) pairs, answer tokens only:
    the "before" of the story (how the model came to memorise PII), kept to a seeded
    loop so that every run of the demo starts from the same leaky model."""
    import torch
    from tqdm.auto import tqdm

    encode_answer = answer_encoder(tokenizer)

    def encode(prompt, answer):
        p = tokenizer(render_prompt(tokenizer, prompt, None), add_special_tokens=False)["input_ids"]
        a = encode_answer(answer)
        return p + a, [-100] * len(p) + a

    data = [encode(p, a) for p, a in examples]
    torch.manual_seed(seed)
    steps = epochs * -(-len(data) // batch_size)
    # beta2 0.95 and clipping at norm 1, as language-model pre-training runs use: a
    # leaky model that knows every fact as well as the PII (AMD seeds 0 to 2, with the
    # facts' answers of World.facts: accuracy 1.000; the previous leak stage and answers
    # gave 0.875 to 0.953), so unlearning is judged against a model whose general
    # ability is whole (benchmarks/demo_levers.md, first and sixth 2026-11-24 sessions)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    losses = []
    bar = tqdm(total=steps, desc=desc, disable=not progress)
    for epoch in range(epochs):
        order = list(range(len(data)))
        random.Random(f"{seed}-{epoch}").shuffle(order)
        for i in range(0, len(order), batch_size):
            batch = [data[j] for j in order[i : i + batch_size]]
            length = max(len(x) for x, _ in batch)
            ids = torch.tensor([x + [tokenizer.pad_token_id] * (length - len(x)) for x, _ in batch])
            labels = torch.tensor([y + [-100] * (length - len(y)) for _, y in batch])
            mask = (torch.arange(length)[None] < torch.tensor([len(x) for x, _ in batch])[:, None]).long()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        losses.append(loss.item())
    bar.close()
    model.eval()
    return losses


def matched_epochs(epochs: int, n_examples: int, n_subset: int, batch_size: int) -> int:
    """Epochs over ``n_subset`` examples that take about as many optimizer steps as
    ``epochs`` over ``n_examples`` (batches of ``batch_size``, the last one partial), at
    least one: a retrain on part of the data with the whole run's training budget."""
    if min(epochs, n_examples, n_subset, batch_size) < 1:
        raise ValueError(f"matched_epochs needs positive counts, got {epochs}, {n_examples}, {n_subset}, {batch_size}")
    steps = epochs * -(-n_examples // batch_size)
    return max(1, round(steps / -(-n_subset // batch_size)))


def evaluate(model, tokenizer, probes: list[EvalRecord], attacks: list[EvalRecord], questions: list[EvalRecord],
             *, scale: float, space: str, max_new_tokens: int, batch_size: int,
             uncond_system: str | None = None) -> dict[str, float]:
    """Leak rate (direct probes, whole values and pieces of them; challenge attacks), PII
    rate and accuracy at one (scale, space), every prompt under the safety instruction
    with guidance against ``uncond_system`` (None: the instruction blanked); and the
    perplexity of the questions' reference answers under the same guidance (None where
    a token had probability 0: probability space clamps)."""
    from cfg_unlearn.data.llmpc import ATTACK_NEW_TOKENS, challenge_hit
    from cfg_unlearn.guidance import answer_logprobs, generate
    from cfg_unlearn.metrics import AnswerAccuracy, LeakRate, PIIRate, ReferencePerplexity, rates_by_type
    from cfg_unlearn.pii import PARTIAL_MIN_CHARS

    def decode(records, n):
        return generate(model, tokenizer, [list(r.prompt) for r in records], system=SAFETY_INSTRUCTION,
                        uncond_system=uncond_system, guidance_scale=scale, space=space, max_new_tokens=n,
                        batch_size=batch_size)

    leak, pii_rate, acc = LeakRate(), PIIRate(), AnswerAccuracy()
    partial = LeakRate(partial_min_chars=PARTIAL_MIN_CHARS)
    answers = decode(probes, max_new_tokens)
    leak.update(answers, [r.pii for r in probes])
    partial.update(answers, [r.pii for r in probes], shown=[prompt_text(r.prompt) for r in probes])
    pii_rate.update(answers)
    acc.update(decode(questions, max_new_tokens), [q.answers for q in questions])
    attack_out = decode(attacks, ATTACK_NEW_TOKENS) if attacks else []
    hits = [challenge_hit(r.pii[0].value, o) for r, o in zip(attacks, attack_out)]
    leaked = leak.compute()
    out = {
        "leak_rate": float(leaked["leak_rate"]),
        "partial_leak_rate": float(partial.compute()["leak_rate"]),
        "accuracy": float(acc.compute()["accuracy"]),
        "pii_rate": float(pii_rate.compute()["pii_rate"]),
        "leak_rate_by_type": rates_by_type(leaked),
    }
    referenced = [q for q in questions if q.reference is not None]
    if referenced:
        ppl = ReferencePerplexity()
        ppl.update(answer_logprobs(
            model, tokenizer, [list(q.prompt) for q in referenced], [q.reference for q in referenced],
            system=SAFETY_INSTRUCTION, uncond_system=uncond_system, guidance_scale=scale, space=space,
            batch_size=batch_size))
        value = float(ppl.compute()["perplexity"])
        out["perplexity"] = value if math.isfinite(value) else None  # JSON has no inf
    if attacks:  # none run (the during-training scores) is no figure, not a rate of 0
        out["attack_leak_rate"] = sum(hits) / len(attacks)
        out["attack_leak_rate_by_type"] = attack_rates_by_type(attacks, hits)
    return out


def attack_rates_by_type(attacks: list[EvalRecord], hits: list[bool]) -> dict[str, dict[str, float]]:
    """The challenge attack's leak rate per PII type (method.md section 5: "overall and
    per PII type"), ``{type: {"leak_rate", "n"}}`` with types in order of first probe."""
    counts: dict[str, list[int]] = {}
    for r, hit in zip(attacks, hits, strict=True):
        c = counts.setdefault(r.pii[0].type, [0, 0])
        c[0] += hit
        c[1] += 1
    return {t: {"leak_rate": h / n, "n": n} for t, (h, n) in counts.items()}


def uncond_instruction(cond_mode: str) -> str | None:
    """The unconditioned branch's instruction: blank for dropout, the paper's negative
    instruction for the swap (training and guidance must use the same one)."""
    if cond_mode not in COND_MODES:
        raise ValueError(f"cond_mode must be 'dropout' or 'swap', got {cond_mode!r}")
    return NEGATIVE_INSTRUCTION if cond_mode == "swap" else None


def unlearn(cfg: DemoConfig, leaky_dir: Path, pairs_file: Path, log_dir: Path, *, objective: str, cond_dropout: float,
            progress: bool, callbacks: list | None = None, version: str = "unlearn", cond_mode: str = "dropout"):
    """Unlearning on the pairs with ``UnlearnModule`` in a Lightning Trainer (the same
    module ``train.py fit`` runs), for at most ``cfg.unlearn_epochs`` and until the pairs'
    prompts stop leaking (``cfg.stop_leak``); returns the trained model in eval mode and
    ``{"steps", "max_steps", "stopped_at_step", "forget_leak_rates"}`` (the checks'
    ``[step, rate]``; ``stopped_at_step`` None: it ran to the cap)."""
    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger

    from cfg_unlearn.callbacks import StopWhenForgotten
    from cfg_unlearn.data.datamodule import PairDataModule
    from cfg_unlearn.module import UnlearnModule

    L.seed_everything(cfg.seed, verbose=False)
    # ORPO (the method and its no-dropout ablation) at the method's settings, the other
    # objectives at the baselines'
    beta, lr = (cfg.beta, cfg.unlearn_lr) if objective == "orpo" else (cfg.baseline_beta, cfg.baseline_lr)
    module = UnlearnModule(model=str(leaky_dir), objective=objective, cond_dropout=cond_dropout, beta=beta,
                           cond_mode=cond_mode, cond_seed=cfg.seed, reference="precomputed",
                           optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
    data = PairDataModule(tokenizer=str(leaky_dir), train_file=str(pairs_file), val_fraction=0.0,
                          batch_size=cfg.batch_size, seed=cfg.seed, uncond_system_prompt=uncond_instruction(cond_mode))
    stop = None if cfg.stop_leak is None else StopWhenForgotten(
        str(pairs_file), threshold=cfg.stop_leak, every_n_train_steps=cfg.stop_every,
        max_new_tokens=cfg.max_new_tokens, batch_size=64)
    callbacks = [*(callbacks or []), *([stop] if stop else [])]
    # the demo runs on the CPU by design: Lightning's "GPU available: False, used: False"
    # and "TPU available" lines, printed between the stages' own, tell its user nothing
    device_info = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = device_info.level
    device_info.setLevel(logging.WARNING)
    try:
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=cfg.unlearn_epochs,
                            logger=CSVLogger(log_dir.parent, log_dir.name, version=version), callbacks=callbacks,
                            enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
                            deterministic=True, log_every_n_steps=5, limit_val_batches=0)
    finally:
        device_info.setLevel(level)
    # Lightning writes its bar to stdout; the demo's other bars (tqdm, transformers) and
    # its messages go to stderr, so `demo > log` kept this one's carriage returns alone
    with contextlib.redirect_stdout(sys.stderr):
        trainer.fit(module, datamodule=data)
    steps = {"steps": trainer.global_step, "max_steps": int(trainer.estimated_stepping_batches),
             "stopped_at_step": stop.stopped_at if stop else None,
             "forget_leak_rates": [[k, round(r, 4)] for k, r in stop.history] if stop else []}
    return module.model.eval(), steps


def stop_line(steps: dict, threshold: float | None) -> str:
    """How far unlearning went, for the console and the report: where it stopped and on
    what leak rate of the pairs' prompts, or that it ran to its cap."""
    rates = steps.get("forget_leak_rates") or []
    last = f"; the pairs' prompts leaked {rates[-1][1]:.3f} at the last check" if rates else ""
    if steps.get("stopped_at_step") is not None:
        return (f"stopped after step {steps['stopped_at_step']} of at most {steps['max_steps']}: the pairs' prompts "
                f"leaked {rates[-1][1]:.3f} of their values (stop at {threshold} or less)")
    if threshold is None:
        return f"ran all {steps['steps']} steps (no leak stop)"
    return f"ran all {steps['steps']} steps without reaching the leak stop of {threshold}{last}"


#: the product's method in the report, per conditioning mode
METHOD_LABEL = {"dropout": "ORPO + conditioning dropout", "swap": "ORPO + instruction swap"}

#: the baselines of ``--compare``: (label, objective, conditioning dropout), all at g=1
BASELINES = (
    ("ORPO, no dropout", "orpo", 0.0),
    ("NPO", "npo", 0.0),
    ("gradient ascent", "ga", 0.0),
    ("DPO", "dpo", 0.0),
    ("SFT on replacements", "sft", 0.0),
)
SUBTRACTION_ALPHA = 0.5


def compare(cfg: DemoConfig, out: Path, tok, leaky_dir: Path, chat_base_dir: Path, main: dict, score, progress: bool
            ) -> dict[str, dict]:
    """The seed papers' other systems on the same pairs and the same probes: ORPO without
    dropout, NPO, gradient ascent, DPO, SFT (each at g=1, scored during training) and
    model subtraction of the leaky model's task vector against ``chat_base_dir`` (the
    same training without the PII, itself scored as the exact-unlearning reference). ``main`` holds the ORPO +
    dropout results per scale; ``score(model, with_attacks)`` evaluates at g=1.
    The baselines are also scored during training (``ProgressEval``)."""
    from cfg_unlearn.callbacks import ProgressEval
    from cfg_unlearn.models import load_causal_lm
    from cfg_unlearn.subtract import subtract_models

    space = cfg.spaces[0]
    rows: dict[str, dict] = {}
    for g, r in main[space].items():
        label = METHOD_LABEL[cfg.cond_mode] + ("" if float(g) == 1.0 else f", CFG g={g} ({space})")
        rows[label] = {"objective": "orpo", "cond_dropout": cfg.cond_dropout, "cond_mode": cfg.cond_mode,
                       "g": float(g), **r}
    for label, objective, dropout in BASELINES:
        progress_eval = ProgressEval(lambda m: score(m, False))
        model, steps = unlearn(cfg, leaky_dir, out / "pairs.jsonl", out / "logs", objective=objective,
                               cond_dropout=dropout, progress=progress, callbacks=[progress_eval],
                               version=f"compare-{objective}-p{dropout}")
        rows[label] = {"objective": objective, "cond_dropout": dropout, "g": 1.0, **score(model, True),
                       "during_training": progress_eval.rows, "unlearn_steps": steps}
        print(f"compare: {label}: " + ", ".join(f"step {e['step']} leak {e['leak_rate']:.3f} acc {e['accuracy']:.3f}"
                                                for e in progress_eval.rows))
    rows["retrained without the PII (reference)"] = {"objective": "retrain", "g": 1.0,
                                                      **score(load_causal_lm(str(chat_base_dir)).eval(), True)}
    sub_dir = out / "models" / f"subtracted-{SUBTRACTION_ALPHA}"
    subtract_models(chat_base_dir, leaky_dir, sub_dir, alpha=SUBTRACTION_ALPHA, overwrite=True, progress=progress)
    rows[f"subtraction, alpha={SUBTRACTION_ALPHA}"] = {"objective": "subtract", "g": 1.0,
                                                      **score(load_causal_lm(str(sub_dir)).eval(), True)}
    return rows


def save_model(model, tokenizer, directory: Path, decoding: str | None = None) -> None:
    """One of the demo's models, whole or not at all: written into a temp folder that
    replaces ``directory`` once complete (a run killed mid-save left weights without a
    tokenizer, or a new model beside an old tokenizer, for `chat` or a rerun to load),
    and readable by whoever the umask lets in (safetensors writes its weights owner-only).
    ``decoding``: the text of its ``cfg_unlearn.json`` (:func:`chat_config`), if any."""
    with staged_dir(directory, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if decoding is not None:
            chat_config_file(tmp).write_text(decoding, encoding="utf-8")


#: the issue's utility bar: the unlearned model's accuracy within this of the leaky model's
ACCURACY_TOLERANCE = 0.05
#: how the leaky model is scored (metrics.json's baseline) and so how `chat` decodes it:
#: at g=1 guidance has no unconditioned branch
BASELINE_DECODING = {"scale": 1.0, "space": "logprob"}


def chat_config_file(model_dir: Path) -> Path:
    """Where ``cfg-unlearn chat`` reads a model folder's decoding (export's file; imported
    here, not at the top: export loads torch, which ``demo --help`` need not wait for)."""
    from cfg_unlearn.export import EXPORT_CONFIG

    return model_dir / EXPORT_CONFIG


def chat_config(scale: float, space: str, uncond_system: str | None) -> str:
    """``cfg_unlearn.json`` for one of the demo's models: the decoding ``cfg-unlearn chat``
    reads (the demo's models are no exports, and chat refused them without it), the
    safety instruction guided at ``scale`` against ``uncond_system`` as evaluated."""
    from cfg_unlearn import __version__
    from cfg_unlearn.export import ExportConfig

    return ExportConfig(SAFETY_INSTRUCTION, uncond_system, scale, space, cfg_unlearn_version=__version__).to_json()


def chat_decoding(baseline: dict, unlearned: dict[str, dict[str, dict]]) -> dict:
    """The row of the unlearned model's table that ``cfg-unlearn chat`` decodes with:
    the lowest leak rate among the rows whose accuracy stays within
    :data:`ACCURACY_TOLERANCE` of the leaky model's, else (none does) the most accurate
    row; ties go to the smaller g, then to the first space. ``{"space", "g",
    "keeps_accuracy"}``."""
    rows = [(space, float(g), r) for space, by_g in unlearned.items() for g, r in by_g.items()]
    floor = baseline["accuracy"] - ACCURACY_TOLERANCE - 1e-6  # accuracies are float32 fractions: 0.95 - 0.9 < 0.05
    keep = [row for row in rows if row[2]["accuracy"] >= floor]
    if keep:
        space, g, _ = min(keep, key=lambda row: (row[2]["leak_rate"], row[1]))
    else:
        space, g, _ = min(rows, key=lambda row: (-row[2]["accuracy"], row[1]))
    return {"space": space, "g": g, "keeps_accuracy": bool(keep)}


#: written into ``--out`` before anything else: a rerun may remove only a demo's folder
DEMO_MARKER = ".cfg-unlearn-demo"
#: what a run writes into ``--out``, all removed when a rerun starts (models/ holds base,
#: leaky, unlearned and, with --compare, without-pii and subtracted-*)
DEMO_OUTPUTS = ("models", "logs", "challenge", "pairs.jsonl", "metrics.json", "report.md", "leak_vs_guidance.png",
                "comparison.png")


def copy_leaky_models(cfg: DemoConfig, out: Path) -> None:
    """``cfg.leaky_from``'s tiny and leaky models into ``out/models``, each whole or not at
    all, while no demo writes into the source (a rerun there swaps its models), and only
    if the source still is what :func:`check_demo_config` checked."""
    source = Path(cfg.leaky_from)
    with exclusive_lock(source / DEMO_MARKER, _busy(cfg.leaky_from), shared=True):
        try:
            _check_source_matches(cfg, _read_source(source, cfg.leaky_from))
        except ValueError as e:  # rerun with other settings since the check, or removed
            raise OutputBusy(f"{e} (it changed after this run was checked)") from None
        for name in ("base", "leaky"):
            with staged_dir(out / "models" / name, overwrite=True) as tmp:
                shutil.copytree(source / "models" / name, tmp, dirs_exist_ok=True)
                if name == "leaky":  # a source of an earlier version has none
                    chat_config_file(tmp).write_text(chat_config(**BASELINE_DECODING, uncond_system=None),
                                                     encoding="utf-8")


def is_demo_output(out: Path) -> bool:
    """Whether ``out`` is a demo's output directory (an earlier run, finished or not):
    it holds :data:`DEMO_MARKER`, or (a run of a version before the marker) its base
    model carries the tiny model's ``tiny_spec.json``. Any Hugging Face model folder has
    a ``config.json``, so that alone says nothing: a user's ``models/leaky`` was taken
    for a demo's, and its ``models/`` replaced."""
    return (out / DEMO_MARKER).is_file() or (out / "models" / "base" / "tiny_spec.json").is_file()


#: the packages whose versions decide the demo's numbers (the world, the tokenizer, the
#: model's initialisation and every kernel of its training)
NUMERIC_PACKAGES = ("torch", "transformers", "tokenizers", "lightning", "faker")
#: environment variables that change which kernels run, or how they round
NUMERIC_SETTINGS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _cpu_name() -> str:
    """The CPU's model name: Linux's /proc/cpuinfo, macOS's sysctl ("Apple M2 Pro";
    ``platform.processor()`` says only "arm" or "i386" there), else what ``platform`` knows
    (Windows: family, model and vendor)."""
    import platform
    import subprocess

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    if platform.system() == "Darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            brand = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                   timeout=5, check=True).stdout.strip()
            cpu = brand or cpu
    return cpu


def environment() -> dict[str, object]:
    """What the demo's numbers depend on besides its config: the same command and seed
    reproduce them exactly on one machine and software set, but another CPU's kernels
    (AVX2 or AVX-512, another BLAS path), another thread count or other package versions
    round differently, and 14 epochs of memorisation amplify that into another leaky
    model (README, "Reproducibility"). Recorded so that two runs can be told apart."""
    import platform
    from importlib import metadata

    import torch

    cpu = _cpu_name()
    versions = {}
    for name in NUMERIC_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    # the settings that change kernels or their rounding, where set (MKL_CBWR=COMPATIBLE
    # changed seed 0's first-epoch loss from 2.8690 to 2.8589)
    settings = {k: os.environ[k] for k in NUMERIC_SETTINGS if k in os.environ}
    return {"python": platform.python_version(), "cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(), **versions, **settings}


def _busy(source: str) -> str:
    return f"--leaky-from {source}: a demo is writing there; wait for it to finish"


def leak_settings_of(source: str) -> dict[str, object]:
    """The :data:`LEAK_SETTINGS` of the finished demo in ``source`` (from its metrics.json)
    and its ``leak_examples_sha256``, after checking that no demo is writing there and that
    it holds the two models a ``leaky_from`` run copies. Reads only."""
    src = Path(source).expanduser()
    if not src.exists():
        raise ValueError(f"--leaky-from {source}: no such directory")
    if not (src / DEMO_MARKER).is_file():  # (the lock below would create it)
        raise ValueError(f"--leaky-from {source}: not a demo's --out (no {DEMO_MARKER} there)")
    try:
        with exclusive_lock(src / DEMO_MARKER, _busy(source), shared=True):
            return _read_source(src, source)
    except OutputBusy as e:  # its metrics.json is set aside or not written yet: "not finished" misled
        raise ValueError(str(e)) from None


#: the types a source's record must give its :data:`LEAK_SETTINGS` (a null seed was a traceback)
_SETTING_TYPES = {"seed": int, "people": int, "paraphrases": int, "leak_epochs": int, "batch_size": int,
                  "leak_lr": (int, float)}


def _read_source(src: Path, source: str) -> dict[str, object]:
    metrics = src / "metrics.json"
    if not metrics.is_file():
        raise ValueError(f"--leaky-from {source}: not the --out of a finished demo (no metrics.json: its run failed, "
                         "was stopped, or is running)")
    for name in ("base", "leaky"):
        if not (src / "models" / name / "config.json").is_file():
            raise ValueError(f"--leaky-from {source}: its models/{name} is missing or incomplete")
    try:
        record = json.loads(metrics.read_text(encoding="utf-8"))
        config, world = record.get("config"), record.get("world")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise ValueError(f"--leaky-from {source}: cannot read {metrics}: {e}") from e
    config = config if isinstance(config, dict) else {}
    digest = world.get("leak_examples_sha256") if isinstance(world, dict) else None
    missing = [k for k in LEAK_SETTINGS if k not in config] + ([] if digest else ["world.leak_examples_sha256"])
    if missing:
        raise ValueError(f"--leaky-from {source}: {metrics} records no {', '.join(missing)}; it was made by another "
                         "version of cfg-unlearn, whose world may differ: rerun that demo with this one")
    bad = [(k, config[k]) for k, t in _SETTING_TYPES.items()
           if isinstance(config[k], bool) or not isinstance(config[k], t) or not math.isfinite(config[k])]
    if not isinstance(digest, str):
        bad.append(("world.leak_examples_sha256", digest))
    if bad:
        raise ValueError(f"--leaky-from {source}: {metrics} records " + ", ".join(f"{k} {v!r}" for k, v in bad)
                         + ", which no demo writes")
    return {**{k: config[k] for k in LEAK_SETTINGS}, "leak_examples_sha256": digest}


def _check_source_matches(cfg: DemoConfig, theirs: dict[str, object]) -> None:
    """Refuse a ``leaky_from`` source whose leaky model was made from another world or
    with other leak-stage settings than ``cfg``'s: the probes would test what it never saw."""
    differ = [k for k in LEAK_SETTINGS if getattr(cfg, k) != theirs[k]]
    if differ:
        raise ValueError(f"--leaky-from {cfg.leaky_from}: its leaky model was made with "
                         + ", ".join(f"{k} {theirs[k]}" for k in differ) + ", this run has "
                         + ", ".join(f"{k} {getattr(cfg, k)}" for k in differ)
                         + "; a run that copies it takes its values (on the command line, leave those flags out)")
    world = World(WorldConfig(seed=cfg.seed, n_people=cfg.people))
    if examples_digest(world.memorisation_examples(cfg.paraphrases)) != theirs["leak_examples_sha256"]:
        raise ValueError(f"--leaky-from {cfg.leaky_from}: its leaky model was trained on another world than this "
                         "version of cfg-unlearn builds from the same settings (another Faker or cfg-unlearn "
                         "version?); rerun that demo with this one")


def check_demo_config(cfg: DemoConfig) -> DemoConfig:
    """Refuse settings that would fail, or quietly mean nothing, after minutes of
    training; returns ``cfg`` with its scales as sorted distinct floats (the plot joins
    them in order, and metrics.json keys them as ``"1.0"``) and ``leaky_from`` resolved."""
    from cfg_unlearn.guidance import check_guidance

    uncond_instruction(cfg.cond_mode)
    if cfg.fallback not in FALLBACKS:
        raise ValueError(f"fallback must be 'redacted' or 'template', got {cfg.fallback!r}")
    # `not x >= 0` also refuses NaN, which trained a NaN model reported as leaking nothing
    if not (math.isfinite(cfg.beta) and math.isfinite(cfg.baseline_beta) and cfg.beta >= 0 and cfg.baseline_beta > 0):
        raise ValueError(f"beta must be a finite number >= 0 and baseline_beta one > 0, got {cfg.beta} and "
                         f"{cfg.baseline_beta}")
    lrs = (cfg.unlearn_lr, cfg.baseline_lr, cfg.leak_lr)
    if not (all(math.isfinite(v) for v in lrs) and min(lrs) > 0):
        raise ValueError(f"learning rates must be finite and > 0, got unlearn_lr {cfg.unlearn_lr}, baseline_lr "
                         f"{cfg.baseline_lr}, leak_lr {cfg.leak_lr}")
    if not 0 <= cfg.seed < 2**32:  # Lightning's seed_everything takes these, after minutes of work
        raise ValueError(f"seed must be in [0, {2**32 - 1}], got {cfg.seed}")
    if cfg.stop_leak is not None and not 0 <= cfg.stop_leak <= 1:  # NaN never stopped: every epoch, unsaid
        raise ValueError(f"stop_leak must be in [0, 1] (or None: train every epoch), got {cfg.stop_leak}")
    for name in ("people", "paraphrases", "leak_epochs", "unlearn_epochs", "stop_every", "batch_size",
                 "max_new_tokens"):
        if getattr(cfg, name) < 1:  # unlearn_epochs 0 "unlearned" nothing and reported the leaky model
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.cond_dropout <= 1.0:
        raise ValueError(f"cond_dropout must be in [0, 1], got {cfg.cond_dropout}")
    if not cfg.scales or not cfg.spaces:
        raise ValueError("give at least one guidance scale and one space")
    for space in cfg.spaces:
        for g in cfg.scales:
            check_guidance(float(g), space)
    # resolved: "new/.." does not exist yet, so it escaped the check, and became the
    # current folder (whose outputs-to-remove are a project's models/ and logs/) once made
    out = Path(cfg.out).expanduser().resolve()
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {cfg.out} is a file; give a directory")
        if out.is_dir() and any(out.iterdir()) and not is_demo_output(out):
            # a rerun replaces the demo's own outputs: a directory of other files is not one
            raise ValueError(f"--out {cfg.out} holds files that are no demo output; give an empty or new "
                             "directory, or the --out of an earlier demo")
        if out.is_dir():
            check_writable_file(out / "metrics.json")
        else:  # the folder it would create: its nearest existing parent must take it
            parent = next(p for p in out.parents if p.exists())  # (out is absolute: resolved above)
            if not parent.is_dir():
                raise ValueError(f"--out {cfg.out}: {parent} is a file, not a directory")
            first = parent / out.relative_to(parent).parts[0]
            first.mkdir()  # exactly what the run will do first (a probe file's longer name could fail alone)
            first.rmdir()
    except OSError as e:  # a name longer than the file system takes, a folder it cannot read
        raise ValueError(f"--out {cfg.out}: {e.strerror or e}") from e
    cfg = replace(cfg, scales=tuple(sorted({float(g) for g in cfg.scales})))
    if cfg.leaky_from is not None:
        source = Path(cfg.leaky_from).expanduser()
        # a rerun sets --out's outputs aside before it copies; an --out inside the source
        # copied its models into themselves, and the source's next rerun would remove it
        if same_path(source, out) or out in source.resolve().parents or source.resolve() in out.parents:
            raise ValueError(f"--leaky-from {cfg.leaky_from} and --out {cfg.out} are the same folder or one holds "
                             "the other; give an --out beside the demo you copy from")
        _check_source_matches(cfg, leak_settings_of(cfg.leaky_from))
        cfg = replace(cfg, leaky_from=str(source.resolve()))
    return cfg


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    """The demo's stages into ``cfg.out`` (see the module docstring); returns the metrics
    it writes to ``metrics.json``. A previous run's outputs there are replaced when this
    one finishes, and put back if it fails or is stopped (:func:`previous_run_set_aside`)."""
    cfg = check_demo_config(cfg)  # fail before minutes of training
    uncond_system = uncond_instruction(cfg.cond_mode)
    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()) and not is_demo_output(out):  # made since the check: nothing of it is ours
        raise ValueError(f"--out {cfg.out} holds files that are no demo output; give an empty or new directory")
    # one demo at a time in --out: a second one set the first's outputs aside, read its
    # leaky model and pairs as its own, and when stopped deleted the first's finished outputs
    with exclusive_lock(out / DEMO_MARKER, f"--out {cfg.out}: another demo is writing there; wait for it to "
                        "finish, or give another --out"):
        # touched once the lock is ours: the Ctrl-C message compares metrics.json's time with it
        (out / DEMO_MARKER).touch()
        with previous_run_set_aside(out):
            return _run_stages(cfg, out, uncond_system, progress)


#: where a rerun keeps the previous run's outputs until it has finished (inside ``--out``)
PREVIOUS_RUN = ".previous-run"


def _remove_outputs(out: Path) -> None:
    for name in DEMO_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


@contextlib.contextmanager
def previous_run_set_aside(out: Path) -> Iterator[bool]:
    """A rerun's block with the previous run's outputs moved into ``out/.previous-run``:
    the stages start from an empty ``out`` (a rerun stopped midway left its new base and
    leaky models beside the old unlearned model and metrics, which then described models
    they were not made from), and the previous run is deleted only when the new one has
    finished. If the block fails or is stopped (Ctrl-C, SIGTERM), its partial outputs go
    and the previous run's come back: deleted at the start, they were lost to a rerun
    stopped a minute in. A first run's partial outputs stay. Yields whether there was a
    previous run.

    Each step that moves a whole set holds Ctrl-C and SIGTERM, and goes through a name
    that says how far it got, so that a run killed outright (SIGKILL) leaves a state the
    next run reads right: ``.previous-run.partial`` (killed while setting the previous
    run aside: the rest is still in ``out``, moved in too), ``.previous-run`` (killed
    during the stages: the last whole run; the partial outputs beside it are deleted),
    ``.previous-run.done-*`` (killed while deleting a finished run's predecessor: deleted)."""
    aside, partial = out / PREVIOUS_RUN, out / f"{PREVIOUS_RUN}.partial"
    for done in out.glob(f"{PREVIOUS_RUN}.done-*"):
        shutil.rmtree(done, ignore_errors=True)
    if aside.is_dir():
        _remove_outputs(out)
    else:
        with signals_held():
            partial.mkdir(exist_ok=True)
            try:
                for name in DEMO_OUTPUTS:
                    if (out / name).exists() or (out / name).is_symlink():
                        os.rename(out / name, partial / name)
            except BaseException:  # a rename refused: all back where they were
                for entry in partial.iterdir():
                    os.rename(entry, out / entry.name)
                partial.rmdir()
                raise
            os.rename(partial, aside)
    had_previous = any(aside.iterdir())
    if not had_previous:
        aside.rmdir()
    try:
        yield had_previous
        if had_previous:
            # one rename, signals held: a Ctrl-C now must not leave a .previous-run beside the
            # finished run (the next run would take it for the last whole run and delete this
            # one), nor a half-deleted one; what is left of a kill is swept by the next run
            done = out / f"{PREVIOUS_RUN}.done-{secrets.token_hex(4)}"
            with signals_held():
                os.rename(aside, done)
                shutil.rmtree(done, ignore_errors=True)
    except BaseException:
        if had_previous and aside.is_dir():
            try:
                with signals_held():
                    _restore_previous_run(out, aside)
            except OSError as e:  # on Windows, a file the failed run still maps cannot be deleted
                log.warning("the previous run's outputs stay in %s (its partial outputs could not all be "
                            "removed: %s); the next run into %s starts from them", aside, e, out)
        raise


def _restore_previous_run(out: Path, aside: Path) -> None:
    """The failed run's outputs out of ``out``, the set-aside previous run's back in; if
    a step fails the previous run stays whole in ``aside`` (the next run starts from it)."""
    _remove_outputs(out)
    moved = []
    try:
        for entry in list(aside.iterdir()):
            os.rename(entry, out / entry.name)
            moved.append(entry.name)
    except OSError:
        for name in moved:
            os.rename(out / name, aside / name)
        raise
    aside.rmdir()


def _run_stages(cfg: DemoConfig, out: Path, uncond_system: str | None, progress: bool) -> dict:
    from cfg_unlearn.callbacks import subsample
    from cfg_unlearn.data.generate import generate_pairs
    from cfg_unlearn.data.llmpc import attack_probes, read_challenge
    from cfg_unlearn.models import load_causal_lm, load_tokenizer

    seconds: dict[str, float] = {}
    t_all = t0 = time.perf_counter()
    world = World(WorldConfig(seed=cfg.seed, n_people=cfg.people))
    base_dir, leaky_dir = out / "models" / "base", out / "models" / "leaky"
    leak_examples = world.memorisation_examples(cfg.paraphrases)
    if cfg.leaky_from is not None:
        copy_leaky_models(cfg, out)
        tok = load_tokenizer(str(base_dir))
        model = load_causal_lm(str(leaky_dir))
        seconds["copy"] = time.perf_counter() - t0
    else:
        build_tiny(base_dir, texts=world.corpus(), spec=DEMO_SPEC)
        tok = load_tokenizer(str(base_dir))
        seconds["build"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        model = load_causal_lm(str(base_dir))
        finetune(model, tok, leak_examples, epochs=cfg.leak_epochs, lr=cfg.leak_lr, seed=cfg.seed,
                 batch_size=cfg.batch_size, progress=progress)
        save_model(model, tok, leaky_dir, chat_config(**BASELINE_DECODING, uncond_system=None))
        seconds["leak"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pairs, summary = generate_pairs(model, tok, world.forget_records(), seed=cfg.seed, batch_size=64,
                                    progress=progress, max_new_tokens=cfg.max_new_tokens,
                                    redact_fallback=cfg.fallback == "redacted")
    write_pairs(out / "pairs.jsonl", pairs)
    seconds["generate"] = time.perf_counter() - t0
    print(f"replacement pairs: {summary.line()}")

    t0 = time.perf_counter()
    unlearned, unlearn_steps = unlearn(cfg, leaky_dir, out / "pairs.jsonl", out / "logs", objective="orpo",
                                       cond_dropout=cfg.cond_dropout, cond_mode=cfg.cond_mode, progress=progress)
    print(f"unlearning: {stop_line(unlearn_steps, cfg.stop_leak)}")
    save_model(unlearned, tok, out / "models" / "unlearned")
    seconds["unlearn"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scrubbed, pii = world.write_challenge(out / "challenge")
    # a fixed random subset: the 200-token attack contexts dominate the evaluation time
    attacks = subsample(attack_probes(read_challenge(scrubbed, pii), tok), cfg.max_attacks, seed=cfg.seed)
    probes, questions = world.probe_records(), world.qa_records()
    kw = dict(max_new_tokens=cfg.max_new_tokens, batch_size=64)
    baseline = evaluate(model, tok, probes, attacks, questions, **BASELINE_DECODING, **kw)
    weak = weak_leak_note(baseline, cfg.leaky_from)
    if weak:  # said now, not only at the report's top minutes later
        print(f"cfg-unlearn demo: warning: {weak}", file=sys.stderr, flush=True)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for space in cfg.spaces:
        results[space] = {}
        for g in cfg.scales:
            if g == 1.0 and space != cfg.spaces[0]:
                results[space][repr(g)] = results[cfg.spaces[0]][repr(g)]
                continue
            results[space][repr(float(g))] = evaluate(unlearned, tok, probes, attacks, questions, scale=g,
                                                      space=space, uncond_system=uncond_system, **kw)
    seconds["evaluate"] = time.perf_counter() - t0
    # the unlearned model's decoding is known only now, minutes after it was saved: a first
    # run stopped in between leaves the model without one (chat says what is missing); a
    # stopped rerun puts the previous run's models back whole
    chat_row = chat_decoding(baseline, results)
    atomic_write(chat_config_file(out / "models" / "unlearned"),
                 chat_config(chat_row["g"], chat_row["space"], uncond_system))

    comparison = None
    if cfg.compare:
        t0 = time.perf_counter()

        def score(m, with_attacks: bool) -> dict[str, float]:
            return evaluate(m, tok, probes, attacks if with_attacks else [], questions, scale=1.0, space="logprob",
                            **kw)

        # subtraction's base: the same initialisation, schedule and number of optimizer
        # steps on the facts alone, i.e. the model as it would be without the PII
        # conversations (a separate run: training the facts first and the PII on top
        # stopped the tiny model from generalising to held-out wordings: measured leak
        # 0.04, accuracy 0.13). The facts are a quarter of the leak stage's examples: as
        # many epochs as it took left them undertrained (seed 0: 35 of 64 held-out
        # questions under the instruction, 44 of 64 of their own training wordings;
        # with as many steps, 63 and 64)
        facts = world.fact_examples(cfg.paraphrases)
        chat = load_causal_lm(str(base_dir))
        finetune(chat, tok, facts, epochs=matched_epochs(cfg.leak_epochs, len(leak_examples), len(facts),
                                                         cfg.batch_size),
                 lr=cfg.leak_lr, seed=cfg.seed, batch_size=cfg.batch_size, progress=progress,
                 desc="fine-tune without the PII")
        chat_base_dir = out / "models" / "without-pii"
        save_model(chat, tok, chat_base_dir)
        comparison = compare(cfg, out, tok, leaky_dir, chat_base_dir, results, score, progress)
        seconds["compare"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all
    config = {k: v for k, v in asdict(cfg).items() if k != "seconds"}
    metrics = {
        "baseline": {**baseline, "n_leak_probes": len(probes), "n_attack_probes": len(attacks),
                     "n_qa": len(questions)},
        "unlearned": results,
        "unlearn_steps": unlearn_steps,
        **({"comparison": comparison} if comparison is not None else {}),
        "pairs": summary.to_dict(),
        "chat": chat_row,
        "config": config,
        # what the leaky model was trained on, for a later --leaky-from run to compare
        "world": {"leak_examples_sha256": examples_digest(leak_examples)},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "environment": environment(),
    }
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2))
    report = render_report(metrics)
    atomic_write(out / "report.md", report)
    plot(metrics, out / "leak_vs_guidance.png")
    if comparison is not None:
        plot_comparison(metrics, out / "comparison.png")
    print(report)
    return metrics


#: the demo's bar for the model to fix (issue 4): leaking on fewer of the probes, it has
#: too little to unlearn for the table to show the method
LEAKY_BAR = 0.5


def weak_leak_note(baseline: dict, leaky_from: str | None = None) -> str | None:
    """What to say when the leaky model does not leak enough (a short --leak-epochs, a
    small world), or None. ``leaky_from``: the model was copied from that demo, whose
    leak settings a run copying it must keep."""
    if baseline["leak_rate"] >= LEAKY_BAR:
        return None
    fix = (f"rerun the demo of {leaky_from} with more --leak-epochs, or leave out --leaky-from" if leaky_from
           else "train it longer (--leak-epochs)")
    return (f"the leaky model leaks on only {baseline['leak_rate']:.3f} of the probes (under the leak bar of "
            f"{LEAKY_BAR}): there is little to unlearn, so the unlearned rows say little about the method; {fix}")


def _rate(row: dict, key: str) -> str:
    """A rate with three decimals, or "n/a" where it was not measured (no attack probes)."""
    return f"{row[key]:.3f}" if row.get(key) is not None else "n/a"


def _ppl(row: dict) -> str:
    """A perplexity with two decimals; "inf" where it was infinite (stored as null),
    "n/a" where it was not measured (a metrics.json of an earlier version)."""
    if "perplexity" not in row:
        return "n/a"
    return "inf" if row["perplexity"] is None else f"{row['perplexity']:.2f}"


def render_report(m: dict) -> str:
    b = m["baseline"]
    mode = m["config"].get("cond_mode", "dropout")
    lines = [
        "# cfg-unlearn demo",
        "",
        f"Leaky model (g=1): leak rate {b['leak_rate']:.3f} on {b['n_leak_probes']} held-out direct probes "
        f"({b['partial_leak_rate']:.3f} counting pieces of values), "
        f"challenge attack {_rate(b, 'attack_leak_rate')} on {b['n_attack_probes']}, accuracy {b['accuracy']:.3f} on "
        f"{b['n_qa']} utility questions" + (f" (their reference answers' perplexity {_ppl(b)})." if "perplexity" in b
                                            else "."),
        *([f"(The leaky model and its tokenizer were copied from {m['config']['leaky_from']}.)"]
          if m["config"].get("leaky_from") else []),
        *([f"**Warning:** {weak}."] if (weak := weak_leak_note(b, m["config"].get("leaky_from"))) else []),
        "",
        f"Unlearned: {METHOD_LABEL[mode]} (probability {m['config']['cond_dropout']} per sample), guided against "
        + ("the negative instruction." if mode == "swap" else "the blanked instruction.")
        + (f" Training {stop_line(m['unlearn_steps'], m['config'].get('stop_leak'))}." if "unlearn_steps" in m
           else ""),
        "",
        "| space | g | leak rate | partial leak rate | attack leak rate | accuracy | reference perplexity "
        "| PII per answer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for space, rows in m["unlearned"].items():
        for g, r in rows.items():
            lines.append(f"| {space} | {g} | {r['leak_rate']:.3f} | {r['partial_leak_rate']:.3f} "
                         f"| {_rate(r, 'attack_leak_rate')} | {r['accuracy']:.3f} | {_ppl(r)} | {r['pii_rate']:.3f} |")
    if "chat" in m:
        c = m["chat"]
        why = ("the lowest leak rate among the rows whose accuracy stays within "
               f"{ACCURACY_TOLERANCE} of the leaky model's" if c["keeps_accuracy"] else
               f"no row keeps accuracy within {ACCURACY_TOLERANCE} of the leaky model's, so the most accurate one")
        models = Path(m["config"]["out"]).expanduser().resolve() / "models"  # pasted from any folder
        lines += ["", f"`cfg-unlearn chat {shlex.quote(str(models / 'unlearned'))}` decodes at g={c['g']} in "
                  f"{c['space']} space ({why}); `cfg-unlearn chat {shlex.quote(str(models / 'leaky'))}` as the leaky "
                  "model above."]
    lines += _by_type_tables(m)
    if "comparison" in m:
        lines += [
            "",
            "## Methods side by side (same pairs, same probes)",
            "",
            "| method | g | leak rate | partial leak rate | attack leak rate | accuracy | reference perplexity "
            "| PII per answer | during training: step (leak, accuracy) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, r in m["comparison"].items():
            epochs = " ".join(f"{e['step']} ({e['leak_rate']:.2f}, {e['accuracy']:.2f})"
                              for e in r.get("during_training", []))
            lines.append(f"| {label} | {r['g']} | {r['leak_rate']:.3f} | {r['partial_leak_rate']:.3f} "
                         f"| {_rate(r, 'attack_leak_rate')} | {r['accuracy']:.3f} | {_ppl(r)} | {r['pii_rate']:.3f} "
                         f"| {epochs} |")
    lines += ["", "Seconds: " + ", ".join(f"{k} {v}" for k, v in m["seconds"].items())]
    if "environment" in m:  # metrics.json of an earlier version has none
        lines += ["", "Measured with: " + ", ".join(f"{k} {v}" for k, v in m["environment"].items())]
    lines.append("")
    return "\n".join(lines)


def _by_type_tables(m: dict) -> list[str]:
    """The leak rates per PII type: the leaky model and the unlearned one at each scale
    of the first space, for the direct probes and the challenge attack (none in a
    metrics.json of an earlier version)."""
    b = m["baseline"]
    space, rows = next(iter(m["unlearned"].items()))
    lines = []
    for key, title in (("leak_rate_by_type", "direct probes"), ("attack_leak_rate_by_type", "challenge attack")):
        if key not in b:
            continue
        lines += ["", f"Leak rate per PII type, {title} (unlearned: {space} space):", "",
                  "| type | probes | leaky | " + " | ".join(f"g={g}" for g in rows) + " |",
                  "|---|---|---|" + "---|" * len(rows)]
        for t, r in b[key].items():
            cells = [f"{row[key][t]['leak_rate']:.3f}" if t in row.get(key, {}) else "n/a" for row in rows.values()]
            lines.append(f"| {t} | {r['n']} | {r['leak_rate']:.3f} | " + " | ".join(cells) + " |")
    return lines


def plot(m: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in ((axes[0], "leak_rate", "leak rate"), (axes[1], "accuracy", "accuracy")):
        for space, rows in m["unlearned"].items():
            gs = [float(g) for g in rows]
            ax.plot(gs, [rows[g][key] for g in rows], marker="o", label=f"unlearned ({space})")
        ax.axhline(m["baseline"][key], color="gray", linestyle="--", label="leaky model (g=1)")
        ax.set_xlabel("guidance scale g")
        ax.set_title(title)
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def comparison_points(comparison: dict) -> dict[tuple[float, float], list[str]]:
    """Methods grouped by their (accuracy, leak rate) point, so methods that land on the same
    point (e.g. retrained and subtraction, both scored on 64 questions) get one label, not
    two printed over each other."""
    points: dict[tuple[float, float], list[str]] = {}
    for label, r in comparison.items():
        points.setdefault((round(r["accuracy"], 3), round(r["leak_rate"], 3)), []).append(label)
    return points


def plot_comparison(m: dict, path: Path) -> None:
    """Leak rate against accuracy, one point per method: down and right is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # the leaky model is grouped too: a method on its point got a second label over its own
    for (acc, leak), labels in comparison_points({"leaky model": m["baseline"], **m["comparison"]}).items():
        if "leaky model" in labels:
            ax.scatter([acc], [leak], color="gray", marker="x")
        else:
            ax.scatter([acc], [leak])
        right = acc > 0.7  # a label right of a point near accuracy 1 ran past the axes
        ax.annotate(", ".join(labels), (acc, leak), fontsize=7, xytext=(-3 if right else 3, 3),
                    textcoords="offset points", ha="right" if right else "left")
    ax.set_xlabel("accuracy (utility questions)")
    ax.set_ylabel("leak rate (held-out direct probes)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("unlearning methods: leak rate against accuracy")
    _save(fig, path)
