"""Training with DDP on CPU (gloo): ``train.py fit --trainer.devices 2 --trainer.strategy ddp``
follows the one-process run at the same global batch."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


#: GuidanceEval at the third step, on 21 probes
EVAL_ARGS = ("--eval.max_probes=21", "--eval.batch_size=4", "--eval.max_new_tokens=8", "--eval.scales=[1, 2]",
             "--eval.every_n_train_steps=3")


def _fit(tiny_model_dir, save: Path, devices: int, accumulate: int = 1,
         data_args: tuple[str, ...] = ("--data.world.n_people=4", "--data.val_fraction=0"),
         eval_args: tuple[str, ...] = EVAL_ARGS) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """3 optimizer steps (24 pairs by default), global batch 8 (8 on one process, 4 + 4 on
    two, or 2 x 2 accumulated on each of two), conditioning dropout on, then GuidanceEval;
    returns final weights and eval metrics, with the logged train/* rows under "train"."""
    args = [
        sys.executable, "train.py", "fit", "--config", "configs/tiny.yaml",
        f"--model.model=tiny:{tiny_model_dir}", f"--trainer.logger.init_args.save_dir={save}",
        "--trainer.enable_progress_bar=false", f"--trainer.devices={devices}",
        *(["--trainer.strategy=ddp"] if devices > 1 else []),
        "--trainer.max_steps=3", "--trainer.max_epochs=1", "--trainer.log_every_n_steps=1",
        *data_args, f"--data.batch_size={8 // devices // accumulate}",
        f"--trainer.accumulate_grad_batches={accumulate}", "--model.cond_dropout=0.5", *eval_args,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (ckpt,) = save.rglob("last.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    (path,) = save.rglob("metrics.csv")
    logged = list(csv.DictReader(open(path)))
    rows = [r for r in logged if r.get("eval/n_leak_targets")] or [{}]
    metrics = {k: float(v) for k, v in rows[-1].items() if k.startswith("eval") and k != "eval/seconds" and v}
    metrics["train"] = [{k: float(v) for k, v in r.items() if k.startswith("train/") and v}
                        for r in logged if r.get("train/loss")]
    # the measured dropout rate, summed over the ranks
    metrics["dropout line"] = next(ln for ln in (run.stdout + run.stderr).splitlines()
                                   if ln.startswith("conditioning dropout:"))
    # GuidanceEval's sample table (the [answer] column redacted, ids and hits as they are)
    metrics["samples"] = [list(csv.reader(open(p))) for p in sorted(save.rglob("eval_samples/*.csv"))]
    return state, metrics


@pytest.mark.slow
def test_two_process_ddp_fit_follows_the_one_process_run(tiny_model_dir, tmp_path):
    w1, m1 = _fit(tiny_model_dir, tmp_path / "one", devices=1)
    w2, m2 = _fit(tiny_model_dir, tmp_path / "two", devices=2)
    # and with 2 micro-batches accumulated per rank: the NLL is a mean over the step's
    # tokens on both ranks, so the answers' uneven lengths weigh as in one batch
    w3, _ = _fit(tiny_model_dir, tmp_path / "two-accumulated", devices=2, accumulate=2)
    assert w1.keys() == w2.keys() == w3.keys()
    from cfg_unlearn.module import UnlearnModule

    init = UnlearnModule(model=f"tiny:{tiny_model_dir}")
    init.configure_model()
    w0 = {f"model.{n}": p.detach() for n, p in init.model.named_parameters()}
    gap = sum((w2[k] - w1[k]).abs().sum() for k in w0) / sum(v.numel() for v in w0.values())
    moved = sum((w1[k] - w0[k]).abs().sum() for k in w0) / sum(v.numel() for v in w0.values())
    # same pairs in every global batch, the same dropout draws, the NLL over the global
    # batch's tokens: what is left is float summation order (gradients agree to ~1e-7)
    for k in w0:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5)
        torch.testing.assert_close(w3[k], w1[k], rtol=0, atol=1e-5)
    print(f"mean |w2 - w1| = {gap:.2e}, mean |w1 - w0| = {moved:.2e}")
    assert moved > 1e-4 and gap < 1e-3 * moved, (gap, moved)
    # GuidanceEval's in-run metrics of the two runs agree exactly, and so does the measured
    # dropout rate (rank 0's counts, broadcast as a DDP buffer, were summed twice before)
    m1.pop("train"), m2.pop("train")
    # the reference perplexity is continuous: the weights' ~1e-7 difference shows in it
    ppl = [k for k in m1 if k.endswith("/perplexity")]
    assert ppl and [m2.pop(k) for k in ppl] == pytest.approx([m1.pop(k) for k in ppl], rel=1e-6)
    assert m1 == m2
    assert m1["dropout line"].startswith("conditioning dropout: ") and "/24 " in m1["dropout line"]
    # the same sample table: 8 probes and 4 questions per scale, the sets' first ones (rank
    # 0 showed its own shard's, 4 and 2, other rows than one process shows)
    (table,) = m1["samples"]
    assert [r[2] for r in table[1:]] == (["leak"] * 8 + ["qa"] * 4) * 2
    assert m1["eval/n_leak_targets"] == 21
    # the tiny model knows no PII, so those metrics are 0 on both sides: also compare the
    # answers themselves: the two runs' models decode the same tokens, and they are not
    # the untrained model's
    from cfg_unlearn.data.world import World, WorldConfig
    from cfg_unlearn.guidance import generate
    from cfg_unlearn.models import load_tokenizer
    from cfg_unlearn.prompts import SAFETY_INSTRUCTION

    tok = load_tokenizer(str(tiny_model_dir))
    prompts = [list(r.prompt) for r in World(WorldConfig(seed=5, n_people=4)).probe_records()]

    def answers(weights):
        model = UnlearnModule(model=f"tiny:{tiny_model_dir}")
        model.configure_model()
        if weights is not None:
            model.load_state_dict(weights)
        return [generate(model.model.eval(), tok, prompts, system=SAFETY_INSTRUCTION, guidance_scale=g,
                         max_new_tokens=8) for g in (1.0, 2.0)]

    a1, a2 = answers(w1), answers(w2)
    assert a1 == a2
    assert a1 != answers(None)


@pytest.mark.slow
def test_uneven_shards_and_windows_train_like_one_process(tiny_model_dir, tmp_path):
    """21 training pairs at global batch 8: one process's batches are 8, 8, 5. Two
    processes at batch 4 shard them 11 + 11, the second shard ending in a padding row;
    Lightning's DistributedSampler repeated a real pair there, so one pair counted twice
    in the last step (weights 4e-4 off). With 2 x 2 accumulated on each, and on one
    process at batch 4 accumulating 2, the last step's 5 pairs come in micro-batches of
    4 and 1, whose per-pair terms were averaged per micro-batch ((mean of 4 + the 1) / 2,
    not the mean of 5). Every step is now the one-process batch's step."""
    data = ("--data.world.n_people=4", "--data.world.turns_per_conversation=3", "--data.val_fraction=0.1")
    runs = {name: _fit(tiny_model_dir, tmp_path / name, devices=d, accumulate=k, data_args=data,
                       eval_args=("--eval=null",))
            for name, d, k in (("one", 1, 1), ("two", 2, 1), ("two-accumulated", 2, 2), ("one-accumulated", 1, 2))}
    # the logged train/* are the whole step's, not rank 0's half: per-pair means agree
    # exactly, the token-mean NLL and the loss closely (ranks weigh by pairs, not tokens)
    t1, t2 = runs["one"][1]["train"], runs["two"][1]["train"]
    assert len(t1) == len(t2) == 3
    for step, (a, b) in enumerate(zip(t1, t2)):
        assert a.keys() == b.keys() and "train/rewards/margins" in a, step
        for k in a:
            if k.endswith("loss"):  # train/loss, train/nll_loss
                assert b[k] == pytest.approx(a[k], rel=0.05), (step, k)
            else:  # rewards/*, logps/*, log-odds, the dropout rate (the padding row is no pair)
                assert b[k] == pytest.approx(a[k], abs=1e-5), (step, k)
    runs = {name: run[0] for name, run in runs.items()}
    w1 = runs.pop("one")
    for name, w in runs.items():
        assert w.keys() == w1.keys()
        for k in w1:
            torch.testing.assert_close(w[k], w1[k], rtol=0, atol=1e-5, msg=lambda m, name=name, k=k: f"{name} {k}: {m}")


def _validate(tiny_model_dir, save: Path, devices: int) -> dict[str, float]:
    """A standalone validate on 3 validation pairs (batch 4): on 2 processes the shards
    are 2 + 1, so one rank's batch holds a padding row."""
    args = [
        sys.executable, "train.py", "validate", "--config", "configs/tiny.yaml",
        f"--model.model=tiny:{tiny_model_dir}", f"--trainer.logger.init_args.save_dir={save}",
        "--trainer.enable_progress_bar=false", f"--trainer.devices={devices}",
        *(["--trainer.strategy=ddp"] if devices > 1 else []), "--eval=null",
        "--data.world.n_people=6", "--data.world.turns_per_conversation=3", "--data.val_fraction=0.1",
        "--data.eval_batch_size=4",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "sync_dist=True" not in run.stderr  # no epoch-level logging warning
    (path,) = save.rglob("metrics.csv")
    (row,) = [r for r in csv.DictReader(open(path)) if r.get("val/loss")]
    return {k: float(v) for k, v in row.items() if k.startswith("val") and v}


@pytest.mark.slow
def test_two_process_validation_counts_each_pair_once(tiny_model_dir, tmp_path):
    """Lightning's sampler padded the 2 + 1 shards with a repeat of a real pair, and
    sync_dist averaged the ranks' means: val/rewards/accuracies was 0.25 on 2 processes
    against 0.3333 on one. Now every metric is the mean over the 3 real pairs."""
    one = _validate(tiny_model_dir, tmp_path / "one", devices=1)
    two = _validate(tiny_model_dir, tmp_path / "two", devices=2)
    assert one.keys() == two.keys() and "val/rewards/accuracies" in one and "val/uncond/loss" in one
    # per-pair means agree to float summation order; the loss's NLL term is a token mean
    # per batch, so it depends on how the pairs are batched, as batch sizes do on one process
    for k in one:
        if k.endswith("loss"):  # loss, nll_loss
            assert two[k] == pytest.approx(one[k], rel=0.05), k
        else:
            assert two[k] == pytest.approx(one[k], abs=1e-5), k
    assert one["val/rewards/accuracies"] * 3 == pytest.approx(round(one["val/rewards/accuracies"] * 3))
