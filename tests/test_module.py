"""UnlearnModule: the conditioning hook, the one-forward ORPO step, optimizer wiring."""

import logging
import math
import warnings

import lightning as L
import pytest
import torch

from cfg_unlearn.data.datamodule import PairDataModule
from cfg_unlearn.data.world import WorldConfig
from cfg_unlearn.module import LoraSettings, UnlearnModule, apply_conditioning, draw_dropout_mask
from cfg_unlearn.objectives import dpo_loss, npo_loss, orpo_loss, sequence_logps
from cfg_unlearn.prompts import NEGATIVE_INSTRUCTION
from cfg_unlearn.utils import ConfigError


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_measured_dropout_rate_within_two_points(p):
    module = UnlearnModule(cond_dropout=p, cond_seed=123)
    draws = module.conditioning_mask([f"c{i:05d}-t0" for i in range(10_000)])
    assert draws.numel() == 10_000
    assert abs(draws.float().mean().item() - p) < 0.02


def test_dropout_mask_is_a_function_of_seed_epoch_and_sample_id():
    ids = [f"pair-{i}" for i in range(64)]
    a = draw_dropout_mask(ids, 0.5, seed=0, epoch=0)
    assert torch.equal(a, draw_dropout_mask(ids, 0.5, seed=0, epoch=0))
    # any split of the batch (ranks, batch sizes, resume points) gives the same draws
    assert torch.equal(torch.cat([draw_dropout_mask(ids[:10], 0.5, 0, 0), draw_dropout_mask(ids[10:], 0.5, 0, 0)]), a)
    assert torch.equal(draw_dropout_mask(ids[::-1], 0.5, 0, 0), a.flip(0))
    assert not torch.equal(a, draw_dropout_mask(ids, 0.5, seed=0, epoch=1))  # a new draw every epoch
    assert not torch.equal(a, draw_dropout_mask(ids, 0.5, seed=1, epoch=0))
    assert not draw_dropout_mask(ids[:5], 0.0, 1, 0).any() and draw_dropout_mask(ids[:5], 1.0, 1, 0).all()


def _toy_batch():
    """2 pairs; cond sequences of length 4, uncond of length 3 (padded to 4)."""

    def variant(base, length):
        ids = torch.full((2, 2, 4), 0)
        mask = torch.zeros(2, 2, 4, dtype=torch.long)
        for b in range(2):
            for k in range(2):
                ids[b, k, :length] = base + 10 * b + k
                mask[b, k, :length] = 1
        labels = torch.where(mask.bool(), ids, torch.tensor(-100))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "nll_labels": labels.clone()}

    return {"cond": variant(100, 4), "uncond": variant(200, 3)}


def test_apply_conditioning_selects_rows_and_trims():
    batch = _toy_batch()
    out = apply_conditioning(batch, torch.tensor([False, True]), "dropout")
    assert out["input_ids"].shape == (2, 2, 4)
    assert out["input_ids"][0, 0, 0] == 100 and out["input_ids"][1, 0, 0] == 210
    assert out["input_ids"][1, 1, 0] == 211  # chosen/rejected order kept
    all_uncond = apply_conditioning(batch, torch.tensor([True, True]), "dropout")
    assert all_uncond["input_ids"].shape == (2, 2, 3)  # padding column trimmed


def test_swap_mode_exchanges_chosen_and_rejected_on_unconditioned_rows_only():
    batch = _toy_batch()
    out = apply_conditioning(batch, torch.tensor([False, True]), "swap")
    assert out["input_ids"][0, 0, 0] == 100 and out["input_ids"][0, 1, 0] == 101  # cond row untouched
    assert out["input_ids"][1, 0, 0] == 211 and out["input_ids"][1, 1, 0] == 210  # swapped


@pytest.fixture(scope="module")
def tiny_setup(tiny_model_dir):
    spec = f"tiny:{tiny_model_dir}"
    dm = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=6), batch_size=4,
                        nll_span="prompt_response")
    dm.setup("fit")
    return spec, dm


def test_configure_model_is_idempotent_and_in_train_mode(tiny_setup):
    spec, _ = tiny_setup
    m = UnlearnModule(model=spec)
    m.configure_model()
    first = m.model
    m.configure_model()
    assert m.model is first
    assert m.model.training


def test_one_forward_equals_separate_reference_computation(tiny_setup):
    """The concatenated step's loss equals ORPO built from two separate forwards, and its
    NLL (prompt+response span) equals Hugging Face's own causal-LM loss on the chosen rows."""
    spec, dm = tiny_setup
    m = UnlearnModule(model=spec)
    m.configure_model()
    m.model.eval()
    batch = next(iter(dm.train_dataloader()))
    x = apply_conditioning(batch, torch.zeros(4, dtype=torch.bool))
    with torch.no_grad():
        loss, metrics = m.forward_pairs(x)
        out_c = m.model(input_ids=x["input_ids"][:, 0], attention_mask=x["attention_mask"][:, 0],
                        labels=x["nll_labels"][:, 0])
        out_r = m.model(input_ids=x["input_ids"][:, 1], attention_mask=x["attention_mask"][:, 1])
        lp_c = sequence_logps(out_c.logits, x["labels"][:, 0])
        lp_r = sequence_logps(out_r.logits, x["labels"][:, 1])
        ref, _ = orpo_loss(lp_c, lp_r, out_c.loss, beta=m.beta)
    assert metrics["nll_loss"].item() == pytest.approx(out_c.loss.item(), abs=1e-5)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)


def test_training_changes_only_trainable_parameters(tiny_setup, tmp_path):
    """TRL's smoke test: after a few steps every trainable tensor moved; a frozen one did not,
    and the optimizer holds only trainable parameters."""
    spec, dm = tiny_setup
    m = UnlearnModule(model=spec, cond_dropout=0.5, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    m.configure_model()
    m.model.get_input_embeddings().weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(m, datamodule=dm)
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert id(p) in opt_params
            assert not torch.equal(before[n], p.detach()), f"{n} did not change"
        else:
            assert id(p) not in opt_params
            assert torch.equal(before[n], p.detach()), f"frozen {n} changed"
    assert m.cond_counts[1] == 12  # 3 steps x 4 pairs counted


def test_swap_mode_requires_negative_instruction(tiny_model_dir, tmp_path):
    spec = f"tiny:{tiny_model_dir}"
    dm = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="uncond_system_prompt"):
        trainer.fit(UnlearnModule(model=spec, cond_mode="swap", cond_dropout=0.5), datamodule=dm)
    dm_neg = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4,
                            uncond_system_prompt=NEGATIVE_INSTRUCTION)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(UnlearnModule(model=spec, cond_mode="swap", cond_dropout=0.5), datamodule=dm_neg)
    assert trainer.global_step == 1
    # dataloaders without their data module: it cannot be checked, and a warning says so
    dm.setup("fit")
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path, limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"cond_mode='swap' without a data module .* cannot be checked"):
        trainer.fit(UnlearnModule(model=spec, cond_mode="swap", cond_dropout=0.5),
                    train_dataloaders=dm.train_dataloader())


@pytest.mark.parametrize("kwargs,match", [
    ({"cond_dropout": 1.5}, "cond_dropout"),
    ({"cond_mode": "flip"}, "cond_mode"),
    ({"objective": "kto"}, "objective must be one of"),
    ({"objective": "npo", "beta": 0.0}, "beta must be > 0"),
    ({"objective": "orpo", "beta": -0.1}, "beta must be >= 0 for orpo"),
    # YAML's .inf: the fit "diverged" at step 0 and blamed the learning rate
    ({"objective": "orpo", "beta": float("inf")}, "beta must be a finite number, got inf"),
    ({"objective": "npo", "beta": float("nan")}, "beta must be a finite number, got nan"),
    ({"objective": "dpo", "reference": "disk"}, "reference must be"),
])
def test_bad_module_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UnlearnModule(**kwargs)


@pytest.mark.parametrize("kwargs", [{"gradient_checkpointing": True}, {"dtype": "bfloat16"}],
                         ids=["grad-ckpt", "bf16"])
def test_memory_and_precision_options_give_finite_gradients(tiny_setup, kwargs):
    spec, dm = tiny_setup
    m = UnlearnModule(model=spec, **kwargs)
    m.configure_model()
    if "dtype" in kwargs:
        assert next(m.model.parameters()).dtype == torch.bfloat16
    else:
        assert getattr(m.model, "is_activation_checkpointing", None) or m.model.is_gradient_checkpointing
    batch = next(iter(dm.train_dataloader()))
    loss, metrics = m.forward_pairs(apply_conditioning(batch, torch.zeros(4, dtype=torch.bool)))
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32  # loss math is upcast
    grads = [p.grad for p in m.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------ baselines: NPO, DPO, GA, SFT


def _fit(module, dm, tmp_path, steps=3, **kw):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                        deterministic=True, **{"enable_checkpointing": False, "enable_progress_bar": False, **kw})
    trainer.fit(module, datamodule=dm)
    return trainer


def test_baseline_objectives_at_the_start_equal_their_closed_forms(tiny_setup):
    """Before any update the policy is its own reference: NPO gives (2/beta) ln 2 and DPO
    ln 2 exactly; SFT is Hugging Face's loss on the replacement (prompt+response span, as
    configured) and GA minus its loss on the leak's response tokens."""
    spec, dm = tiny_setup
    batch = next(iter(dm.train_dataloader()))
    x = apply_conditioning(batch, torch.zeros(4, dtype=torch.bool))
    out = {}
    for objective in ("npo", "dpo", "sft", "ga"):
        m = UnlearnModule(model=spec, objective=objective, beta=0.5)
        m.configure_model()
        m.model.eval()
        m._build_reference()
        with torch.no_grad():
            out[objective] = m.forward_pairs(x)[0].item()
    with torch.no_grad():
        hf_c = m.model(input_ids=x["input_ids"][:, 0], attention_mask=x["attention_mask"][:, 0],
                       labels=x["nll_labels"][:, 0]).loss.item()
        hf_r = m.model(input_ids=x["input_ids"][:, 1], attention_mask=x["attention_mask"][:, 1],
                       labels=x["labels"][:, 1]).loss.item()
    assert out["npo"] == pytest.approx(2 / 0.5 * math.log(2), abs=1e-6)
    assert out["dpo"] == pytest.approx(math.log(2), abs=1e-6)
    assert out["sft"] == pytest.approx(hf_c, abs=1e-5)
    assert out["ga"] == pytest.approx(-hf_r, abs=1e-5)
    assert hf_c != pytest.approx(hf_r, abs=1e-3)  # the two sides really differ


def test_npo_and_dpo_against_separately_computed_reference(tiny_setup):
    """After the policy moves, the step's NPO/DPO loss equals the pure loss on summed
    log-probs from two separate forwards of the policy and of the untouched start model."""
    spec, dm = tiny_setup
    batch = next(iter(dm.train_dataloader()))
    x = apply_conditioning(batch, torch.tensor([False, True, False, True]))
    start = UnlearnModule(model=spec)
    start.configure_model()
    start.model.eval()
    for objective in ("npo", "dpo"):
        m = UnlearnModule(model=spec, objective=objective)
        m.configure_model()
        m._build_reference()  # copies the start ...
        with torch.no_grad():  # ... then the policy moves away from it
            for p in m.model.parameters():
                p.add_(0.02 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
        m.model.eval()
        with torch.no_grad():
            loss, _ = m.forward_pairs(x)
            pol = [sequence_logps(m.model(input_ids=x["input_ids"][:, k], attention_mask=x["attention_mask"][:, k]).logits,
                                  x["labels"][:, k], average=False) for k in (0, 1)]
            ref = [sequence_logps(start.model(input_ids=x["input_ids"][:, k],
                                              attention_mask=x["attention_mask"][:, k]).logits,
                                  x["labels"][:, k], average=False) for k in (0, 1)]
        expected = npo_loss(pol[1], ref[1])[0] if objective == "npo" else dpo_loss(pol[0], pol[1], ref[0], ref[1])[0]
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert abs(loss.item() - (20 * math.log(2) if objective == "npo" else math.log(2))) > 1e-3


@pytest.mark.parametrize("objective,cond_mode", [("npo", "dropout"), ("dpo", "swap")])
def test_precomputed_reference_trains_exactly_like_the_frozen_copy(tiny_model_dir, tmp_path, objective, cond_mode):
    """Same seed, same batches, same conditioning draws (half the rows unconditioned, swapped
    in swap mode): the table looked up by pair id and variant gives the weights the frozen
    copy gives."""
    spec = f"tiny:{tiny_model_dir}"
    weights = {}
    for reference in ("copy", "precomputed"):
        dm = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4, val_fraction=0.0,
                            uncond_system_prompt=NEGATIVE_INSTRUCTION if cond_mode == "swap" else None)
        L.seed_everything(0)
        m = UnlearnModule(model=spec, objective=objective, reference=reference, cond_dropout=0.5, cond_mode=cond_mode,
                          optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
        _fit(m, dm, tmp_path, steps=3)
        weights[reference] = {n: p.detach().clone() for n, p in m.model.named_parameters()}
        if reference == "precomputed":
            assert len(m.reference_logps) == 4 * 6 and m._reference_model == ()  # no second model
        else:
            assert m.reference_logps is None
    start = UnlearnModule(model=spec)
    start.configure_model()
    start_weights = dict(start.model.named_parameters())
    for n, w in weights["copy"].items():
        torch.testing.assert_close(weights["precomputed"][n], w, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(w, start_weights[n]) for n, w in weights["copy"].items())  # training moved them
    assert m.cond_counts[0] > 0  # the unconditioned lookups were exercised


@pytest.mark.parametrize("objective", ["npo", "dpo"])
def test_precomputed_reference_is_scored_in_the_training_precision(tiny_model_dir, tmp_path, objective):
    """Under ``bf16-mixed`` the table is scored under the same autocast as the steps: with
    lr 0 the policy is its own reference, so the first step's log-ratio is 0 (up to bf16
    noise from batches padded differently) and the loss is the closed form. A table
    scored in float32 made NPO's log-ratio -0.0019 here."""
    spec = f"tiny:{tiny_model_dir}"
    dm = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4, val_fraction=0.0)
    m = UnlearnModule(model=spec, objective=objective, reference="precomputed", beta=0.1,
                      optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    trainer = _fit(m, dm, tmp_path, steps=1, precision="bf16-mixed")
    metrics = trainer.callback_metrics
    if objective == "npo":
        assert abs(float(metrics["train/npo/log_ratio"])) < 1e-4
        assert float(metrics["train/loss"]) == pytest.approx(20 * math.log(2), abs=1e-3)
    else:
        assert abs(float(metrics["train/rewards/chosen"])) < 1e-5 and abs(float(metrics["train/rewards/rejected"])) < 1e-5
        assert float(metrics["train/loss"]) == pytest.approx(math.log(2), abs=1e-5)


def test_precomputed_reference_bar_follows_the_trainers_progress_setting(tiny_model_dir, tmp_path, capfd):
    """`enable_progress_bar=False` (the demo's --quiet) still drew "reference log-probs"."""
    spec = f"tiny:{tiny_model_dir}"
    for shown in (False, True):
        dm = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=2), batch_size=4, val_fraction=0.0)
        m = UnlearnModule(model=spec, objective="npo", reference="precomputed", beta=0.1,
                          optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
        capfd.readouterr()
        _fit(m, dm, tmp_path, steps=1, enable_progress_bar=shown)
        assert ("reference log-probs" in capfd.readouterr().err) == shown


def test_precomputed_reference_is_kept_in_checkpoints(tiny_model_dir, tmp_path):
    """A resumed NPO run must compare with the starting model: the table travels in the
    checkpoint and is not recomputed from the resumed weights."""
    spec = f"tiny:{tiny_model_dir}"
    dm = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4, val_fraction=0.0)
    m = UnlearnModule(model=spec, objective="npo", reference="precomputed",
                      optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    trainer = _fit(m, dm, tmp_path, steps=2, enable_checkpointing=True)
    ckpt = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    table = m.reference_logps
    resumed = UnlearnModule(model=spec, objective="npo", reference="precomputed",
                            optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    trainer2 = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                         enable_checkpointing=False)
    trainer2.fit(resumed, datamodule=dm, ckpt_path=ckpt)
    assert trainer2.global_step == 3
    assert resumed.reference_logps.keys() == table.keys()
    for k in table:
        assert torch.equal(resumed.reference_logps[k], table[k])
    fresh = resumed.compute_reference_logps()  # what the resumed weights would have given
    assert any(not torch.allclose(fresh[k], table[k]) for k in table)
    # resumed on other data, the table has no entry for its pairs: one clear error (was a KeyError)
    other = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=6), batch_size=4, val_fraction=0.0)
    again = UnlearnModule(model=spec, objective="npo", reference="precomputed",
                          optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    steps = []

    class Steps(L.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    trainer3 = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                         enable_checkpointing=False, callbacks=[Steps()])
    # checked at the fit's start, for every pair: a batch's own check failed mid-epoch, and
    # under DDP on one rank only, the others left waiting in a collective
    with pytest.raises(ValueError, match=r"do not fit this data: 12 of the 36 train pairs \('.*', ...\) have no entry "
                                         r"in it.*or reference: copy"):
        trainer3.fit(again, datamodule=other, ckpt_path=ckpt)
    assert steps == []
    # another world seed: the same 24 ids, other text. The stale table was used silently
    # (NPO's loss 11.8 at the first resumed step, against 0.59 on the same data)
    reseeded = PairDataModule(tokenizer=spec, world=WorldConfig(seed=1, n_people=4), batch_size=4, val_fraction=0.0)
    reseeded.setup("fit")
    assert {reseeded.train_dataset[i]["id"] for i in range(24)} == {k.split(":", 1)[1] for k in table}
    trainer4 = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                         enable_checkpointing=False, callbacks=[Steps()])
    again = UnlearnModule(model=spec, objective="npo", reference="precomputed",
                          optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    with pytest.raises(ValueError, match=r"24 of the 24 train pairs .* were encoded differently when it was scored"):
        trainer4.fit(again, datamodule=reseeded, ckpt_path=ckpt)
    assert steps == []



def test_precomputed_reference_keeps_train_and_val_pairs_apart_when_ids_collide(tiny_model_dir, tmp_path):
    """Rows without an id are named <file name>:<line>, so train/pairs.jsonl and
    val/pairs.jsonl share ids. The table used to be keyed by id alone: the validation
    pair's log-probs overwrote the training pair's, and DPO at lr 0 reported a margin.
    Now every lookup finds its own pair's reference: loss ln 2, margin 0, in both splits."""
    import json

    from cfg_unlearn.data.world import World

    pairs = World(WorldConfig(seed=0, n_people=4)).pairs()
    for split, rows in (("train", pairs[:8]), ("val", pairs[8:12])):
        (tmp_path / split).mkdir()
        with open(tmp_path / split / "pairs.jsonl", "w") as fh:
            for r in rows:  # TRL-style rows: no id
                fh.write(json.dumps({"prompt": list(r.prompt), "chosen": r.chosen, "rejected": r.rejected}) + "\n")
    spec = f"tiny:{tiny_model_dir}"
    dm = PairDataModule(tokenizer=spec, train_file=str(tmp_path / "train/pairs.jsonl"),
                        val_file=str(tmp_path / "val/pairs.jsonl"), batch_size=4)
    m = UnlearnModule(model=spec, objective="dpo", reference="precomputed",
                      optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0)
    trainer.fit(m, datamodule=dm)
    assert len(m.reference_logps) == 8 + 4  # the 4 shared ids are kept apart
    metrics = trainer.callback_metrics
    for split in ("train", "val"):
        assert float(metrics[f"{split}/loss"]) == pytest.approx(math.log(2), abs=1e-5), split
        assert abs(float(metrics[f"{split}/rewards/margins"])) < 1e-5, split
    # a checkpoint written before the split keys still loads: each bare id serves both splits
    old = UnlearnModule(model=spec, objective="dpo", reference="precomputed")
    old.on_load_checkpoint({"reference_logps": {"ids": ["a"], "values": torch.ones(1, 2, 2)}})
    assert sorted(old.reference_logps) == ["train:a", "val:a"]


# ------------------------------------------------------------------ LoRA


def test_lora_trains_only_adapters_and_is_its_own_npo_reference(tiny_model_dir, tmp_path, caplog):
    """LoRA: only adapter weights are trainable and move; the base is untouched; NPO uses
    the adapters-off model as reference (no copy), so its first loss is (2/beta) ln 2
    (LoRA's B starts at zero) and after training the adapters-off log-probs are exactly
    the starting model's."""
    spec = f"tiny:{tiny_model_dir}"
    dm = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4, val_fraction=0.0)
    dm.setup("fit")
    m = UnlearnModule(model=spec, objective="npo", lora=LoraSettings(r=4, alpha=8),
                      optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    with caplog.at_level(logging.INFO):
        m.configure_model()
    trainable = [n for n, p in m.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    n_trainable = sum(p.numel() for p in m.model.parameters() if p.requires_grad)
    assert f"{n_trainable / 1e6:.2f}M trainable (LoRA adapters, r=4)" in caplog.text  # says which ones
    before = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    batch = next(iter(dm.train_dataloader()))
    x = apply_conditioning(batch, torch.zeros(4, dtype=torch.bool))
    with torch.no_grad():
        assert m.forward_pairs(x)[0].item() == pytest.approx(20 * math.log(2), abs=1e-5)
    _fit(m, dm, tmp_path, steps=3)
    assert m._reference_model == ()  # no second model held
    for n, p in m.model.named_parameters():
        if "lora_B" in n:
            assert not torch.equal(before[n], p.detach()), f"{n} did not move"
        elif "lora_" not in n:
            assert torch.equal(before[n], p.detach()), f"base weight {n} changed"
    start = UnlearnModule(model=spec)
    start.configure_model()
    start.model.eval()
    m.model.eval()
    rows = m._rows(x)
    with torch.no_grad():
        ref = m._reference_forward(rows)
        want = sequence_logps(start.model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits,
                              rows["labels"], average=False)
        policy = sequence_logps(m.model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits,
                                rows["labels"], average=False)
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)
    assert (policy < ref - 1e-3).all()  # the adapters did push the leak down


def test_lora_reference_is_scored_in_eval_mode(tiny_model_dir, tmp_path):
    """The adapters-off reference ran in training mode: on a base model with dropout it
    was a different random reference at every call (the copy and the table use eval)."""
    import json
    import shutil

    drop = tmp_path / "tiny-dropout"
    shutil.copytree(tiny_model_dir, drop)
    config = json.loads((drop / "config.json").read_text())
    (drop / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.3}))
    dm = PairDataModule(tokenizer=str(drop), world=WorldConfig(seed=0, n_people=4), batch_size=4, val_fraction=0.0)
    dm.setup("fit")
    rows = None
    for lora in (LoraSettings(r=4), None):
        m = UnlearnModule(model=str(drop), objective="npo", lora=lora)
        m.configure_model()
        rows = rows or m._rows(apply_conditioning(next(iter(dm.train_dataloader())), torch.zeros(4, dtype=torch.bool)))
        torch.manual_seed(0)
        first, second = m._reference_forward(rows), m._reference_forward(rows)
        assert torch.equal(first, second), lora
        assert m.model.training  # the policy's mode is given back
        if lora is not None:
            adapters_off = first
    torch.testing.assert_close(adapters_off, first, rtol=1e-5, atol=1e-4)  # LoRA's B is 0: same as the copy


def test_frozen_copy_reference_is_in_the_policys_precision(tiny_model_dir, tmp_path):
    """`bf16-true` converts the policy's weights, not the reference's (no submodule): at
    lr 0 NPO's log-ratio was 0.0011 at the first step, not 0."""
    spec = f"tiny:{tiny_model_dir}"
    dm = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4, val_fraction=0.0)
    m = UnlearnModule(model=spec, objective="npo", reference="copy", optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    trainer = _fit(m, dm, tmp_path, steps=1, precision="bf16-true")
    assert next(m._reference_model[0].parameters()).dtype == torch.bfloat16
    assert float(trainer.callback_metrics["train/npo/log_ratio"]) == 0.0
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(20 * math.log(2), rel=1e-2)
    # a reference an earlier trainer built in fp32 (a validate first) is rebuilt in the
    # later one's precision: it was kept, and the log-ratio was 0.0045 at lr 0
    m = UnlearnModule(model=spec, objective="npo", reference="copy", optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              limit_val_batches=1, default_root_dir=tmp_path).validate(
        m, datamodule=PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4), verbose=False)
    assert next(m._reference_model[0].parameters()).dtype == torch.float32
    trainer = _fit(m, dm, tmp_path, steps=1, precision="bf16-true")
    assert next(m._reference_model[0].parameters()).dtype == torch.bfloat16
    assert float(trainer.callback_metrics["train/npo/log_ratio"]) == 0.0


@pytest.mark.parametrize("strategy", ["fsdp", "ddp", "fsdp-no-shard"])
def test_a_frozen_copy_under_a_sharding_strategy_is_warned_about(tiny_model_dir, strategy):
    """FSDP shards the policy, not the reference copy (no submodule): a whole fp32 copy
    of an 8B model on every GPU, which the user did not ask for by name."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins import Precision
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    m = UnlearnModule(model=f"tiny:{tiny_model_dir}", objective="npo", reference="copy")
    # the parts of a trainer the reference reads (Lightning builds FSDP on GPUs only)
    made = {"fsdp": FSDPStrategy, "ddp": DDPStrategy, "fsdp-no-shard": lambda: FSDPStrategy(sharding_strategy="NO_SHARD")}
    m._trainer = SimpleNamespace(strategy=made[strategy](), precision="32-true", precision_plugin=Precision())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        m._build_reference()
    said = [str(w.message) for w in seen if "unsharded copy" in str(w.message)]
    if strategy != "fsdp":  # every device holds the whole policy anyway
        assert said == []
    else:
        size = sum(p.numel() * 4 for p in m._reference_model[0].parameters()) / 2**20
        assert said == [f"model.reference: copy keeps a whole, unsharded copy of the starting model on every device "
                        f"({size:.1f} MiB) beside the FSDPStrategy-sharded model: use model.reference: precomputed "
                        "(its log-probs computed once at fit start; no second model)"]


def test_precomputed_reference_is_not_scored_on_resumed_weights(tiny_model_dir, tmp_path):
    """A checkpoint with no table (here: a `copy` run) resumed with `precomputed` scored
    the table on the trained weights: the model became its own reference, silently."""
    from cfg_unlearn.utils import ConfigError

    spec = f"tiny:{tiny_model_dir}"
    dm = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4, val_fraction=0.0)
    opt = lambda p: torch.optim.SGD(p, lr=0.5)  # noqa: E731
    trainer = _fit(UnlearnModule(model=spec, objective="npo", reference="copy", optimizer=opt), dm, tmp_path,
                   steps=2, enable_checkpointing=True)
    ckpt = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
    resumed = UnlearnModule(model=spec, objective="npo", reference="precomputed", optimizer=opt)
    with pytest.raises(ConfigError, match=r"holds no reference table .* resume with reference: copy"):
        L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  limit_val_batches=0, default_root_dir=tmp_path, enable_checkpointing=False).fit(
            resumed, datamodule=dm, ckpt_path=ckpt)
    assert resumed.reference_logps is None


def test_a_resume_with_another_optimizer_class_is_refused(tiny_model_dir, tmp_path):
    """torch's load_state_dict takes the saved param groups whole: SGD resumed over an
    AdamW checkpoint died at its first step with KeyError 'momentum', and Adam ran as
    AdamW (the group's decoupled_weight_decay: True) without a word."""
    from cfg_unlearn.utils import ConfigError

    spec = f"tiny:{tiny_model_dir}"
    dm = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4, val_fraction=0.0)
    trainer = _fit(UnlearnModule(model=spec), dm, tmp_path, steps=1, enable_checkpointing=True)
    ckpt = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["optimizer_classes"] == ["torch.optim.adamw.AdamW"]

    def resume(optimizer):
        module = UnlearnModule(model=spec, optimizer=optimizer)
        t = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                      enable_checkpointing=False)
        t.fit(module, datamodule=dm, ckpt_path=ckpt)
        return t

    for other in (torch.optim.SGD, torch.optim.Adam):
        with pytest.raises(ConfigError, match=rf"holds the state of torch\.optim\.adamw\.AdamW, but this fit builds "
                                              rf"{other.__module__}\.{other.__name__}: .*Resume with that optimizer"):
            resume(lambda p, other=other: other(p, lr=0.1))
    assert resume(lambda p: torch.optim.AdamW(p, lr=0.1)).global_step == 2  # the same class resumes
    # a checkpoint a validate saved holds no optimizer state, and resumes with any optimizer
    t = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  limit_val_batches=1, default_root_dir=tmp_path)
    t.validate(UnlearnModule(model=spec), datamodule=PairDataModule(
        tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4), verbose=False)
    t.save_checkpoint(tmp_path / "validated.ckpt")
    ckpt = str(tmp_path / "validated.ckpt")
    assert resume(lambda p: torch.optim.SGD(p, lr=0.1)).global_step == 2


def test_a_resume_that_adds_or_drops_the_learning_rate_schedule_is_refused(tiny_model_dir, tmp_path):
    """Lightning restores the schedules found in both the checkpoint and the fit: one
    added on resume started from its own step 0 (an audit: warm-up again at step 8 of 16,
    the cosine ending at 0.87x the peak), one dropped left the rate where it was."""
    from functools import partial

    from cfg_unlearn.schedules import WarmupCosine
    from cfg_unlearn.utils import ConfigError

    spec = f"tiny:{tiny_model_dir}"
    dm = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4, val_fraction=0.0)
    cosine = partial(WarmupCosine, warmup_steps=1)
    for first, then, said in ((None, cosine, "with 0 learning-rate schedule.*this fit configures 1.*an added "
                                             "schedule would start from its own first step at step 1"),
                              (cosine, None, "with 1 learning-rate schedule.*configures 0.*stays where")):
        trainer = _fit(UnlearnModule(model=spec, lr_scheduler=first), dm, tmp_path / "a", steps=1,
                       enable_checkpointing=True)
        ckpt = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path

        def resume(schedule):
            t = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path / "b",
                          enable_checkpointing=False)
            t.fit(UnlearnModule(model=spec, lr_scheduler=schedule), datamodule=dm, ckpt_path=ckpt)
            return t

        with pytest.raises(ConfigError, match=said):
            resume(then)
        assert resume(first).global_step == 2  # the same schedule resumes


def test_a_schedule_without_a_step_budget_is_a_clear_error(tiny_model_dir, tmp_path):
    """max_epochs -1 (with max_time) gives no step count: WarmupCosine failed with
    "OverflowError: cannot convert float infinity to integer"."""
    from functools import partial

    from cfg_unlearn.schedules import WarmupCosine
    from cfg_unlearn.utils import ConfigError

    spec = f"tiny:{tiny_model_dir}"
    dm = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4, val_fraction=0.0)
    m = UnlearnModule(model=spec, lr_scheduler=partial(WarmupCosine, warmup_steps=3))
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, max_time="00:00:00:30", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match="WarmupCosine needs the number of training steps.*max_steps"):
        trainer.fit(m, datamodule=dm)
    # a total below 1: 0 held the peak forever after warm-up, -5 dropped to the floor at once
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for total in (0, -5):
        with pytest.raises(ConfigError, match=rf"total_steps must be >= 1, or null for the fit's own; got {total}"):
            WarmupCosine(optimizer, warmup_steps=1, total_steps=total)


def test_lora_with_gradient_checkpointing_gives_adapter_gradients(tiny_setup):
    spec, dm = tiny_setup
    m = UnlearnModule(model=spec, gradient_checkpointing=True, lora=LoraSettings(r=4, target_modules=["q_proj", "v_proj"]))
    m.configure_model()
    batch = next(iter(dm.train_dataloader()))
    loss, _ = m.forward_pairs(apply_conditioning(batch, torch.zeros(4, dtype=torch.bool)))
    loss.backward()
    named = dict(m.model.named_parameters())
    lora_b = [p for n, p in named.items() if "lora_B" in n]  # (A's gradient is 0 while B is still 0)
    assert len(lora_b) == 2 * 2  # q_proj and v_proj in each of the tiny model's 2 layers
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in lora_b)
    assert all(p.grad is None for n, p in named.items() if "lora_" not in n)


def test_adapter_only_checkpoints_hold_adapters_and_restore_exactly(tiny_model_dir, tmp_path):
    spec = f"tiny:{tiny_model_dir}"
    dm = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4, val_fraction=0.0)
    lora = LoraSettings(r=4, adapter_only_checkpoints=True)
    m = UnlearnModule(model=spec, lora=lora, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = _fit(m, dm, tmp_path, steps=2, enable_checkpointing=True)
    ckpt_path = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all("lora_" in k for k in keys)
    saved = sum(v.numel() for v in ckpt["state_dict"].values())
    assert saved < sum(p.numel() for p in m.model.parameters()) / 10  # adapters only: a small fraction
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = UnlearnModule.load_from_checkpoint(ckpt_path, map_location="cpu")
    # the frozen base is absent by design (and on_load_checkpoint checks every adapter):
    # Lightning listed all of its tensors as missing keys, which read as a broken load
    assert not [w for w in caught if "not in the checkpoint" in str(w.message)]
    # load_from_checkpoint calls configure_model, then loads the adapters non-strictly
    assert restored.lora == lora
    for n, p in m.model.named_parameters():
        assert torch.equal(dict(restored.model.named_parameters())[n], p.detach()), n


def _adapter_only_checkpoint(tiny_model_dir, tmp_path) -> str:
    """A one-step LoRA fit's adapter-only checkpoint over the tiny model."""
    spec = f"tiny:{tiny_model_dir}"
    dm = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4, val_fraction=0.0)
    m = UnlearnModule(model=spec, lora=LoraSettings(r=4, adapter_only_checkpoints=True),
                      optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = _fit(m, dm, tmp_path, steps=1, enable_checkpointing=True)
    return trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path


def test_adapter_checkpoint_for_other_lora_settings_is_refused(tiny_model_dir, tmp_path):
    """Adapter-only checkpoints load non-strictly, which also hid adapters the checkpoint
    lacks or holds for another LoRA config: validate scored a half-loaded model."""
    from cfg_unlearn.utils import ConfigError

    ckpt = _adapter_only_checkpoint(tiny_model_dir, tmp_path)
    fewer = LoraSettings(r=4, target_modules=["q_proj", "v_proj"], adapter_only_checkpoints=True)
    with pytest.raises(ConfigError, match=r"does not fit model tiny:.* with LoRA settings .*\(\d+ tensor\(s\) this "
                                          r"model does not have: model\.base_model.*the model and LoRA settings the "
                                          r"checkpoint was trained with\?"):
        UnlearnModule.load_from_checkpoint(ckpt, map_location="cpu", lora=fewer)
    more = LoraSettings(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj", "lm_head"], adapter_only_checkpoints=True)
    with pytest.raises(ConfigError, match=r"\d+ trainable tensor\(s\) missing: .*lm_head"):
        UnlearnModule.load_from_checkpoint(ckpt, map_location="cpu", lora=more)


def test_adapter_checkpoint_over_another_base_is_refused(tiny_model_dir, tmp_path):
    """An adapter-only checkpoint loaded over another base with the same architecture
    (a base model for its instruct variant, a snapshot replaced in place) loaded and
    merged silently. The same base in another dtype still loads."""
    from transformers import AutoModelForCausalLM

    from cfg_unlearn.export import export_checkpoint
    from cfg_unlearn.utils import ConfigError

    ckpt = _adapter_only_checkpoint(tiny_model_dir, tmp_path)
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a fine-tune of the same base
    other.save_pretrained(tmp_path / "other")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "other" / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(ConfigError, match=r"trained over another base model than .*other: the base weights differ "
                                          r"\(fingerprint [0-9a-f]{8} at training, [0-9a-f]{8} now\)"):
        UnlearnModule.load_from_checkpoint(ckpt, map_location="cpu", model=str(tmp_path / "other"))
    with pytest.raises(ConfigError, match="trained over another base model"):
        export_checkpoint(ckpt, tmp_path / "export", base_model=str(tmp_path / "other"))
    # another load dtype rounds the same base otherwise: not compared (a float16 load of a
    # float32-trained base was refused as another base)
    for dtype in ("bfloat16", "float16"):
        restored = UnlearnModule.load_from_checkpoint(ckpt, map_location="cpu", dtype=dtype)
        assert restored.model.dtype == getattr(torch, dtype)


def test_frozen_copy_reference_is_the_starting_model_even_after_resume(tiny_model_dir, tmp_path):
    """reference='copy' loads the reference from `model`, so a run resumed from a
    checkpoint (whose self.model holds trained weights) still compares with the start."""
    spec = f"tiny:{tiny_model_dir}"
    dm = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4, val_fraction=0.0)
    opt = lambda p: torch.optim.SGD(p, lr=0.5)  # noqa: E731
    trainer = _fit(UnlearnModule(model=spec, objective="npo", optimizer=opt), dm, tmp_path, steps=2,
                   enable_checkpointing=True)
    ckpt = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
    resumed = UnlearnModule(model=spec, objective="npo", optimizer=opt)
    trainer2 = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                         enable_checkpointing=False)
    trainer2.fit(resumed, datamodule=dm, ckpt_path=ckpt)
    start = UnlearnModule(model=spec)
    start.configure_model()
    ref = dict(resumed._reference_model[0].named_parameters())
    for n, p in start.model.named_parameters():
        assert torch.equal(ref[n], p)
    assert any(not torch.equal(p, dict(resumed.model.named_parameters())[n]) for n, p in start.model.named_parameters())


def test_accumulation_window_totals():
    from cfg_unlearn.module import accumulation_window_totals

    assert accumulation_window_totals([3, 5, 2], 2) == [8, 8, 2]
    assert accumulation_window_totals([3, 5, 2, 1, 4], 3) == [10, 10, 10, 5, 5]
    assert accumulation_window_totals([3, 5], 1) == [3, 5]
    with pytest.raises(ValueError, match="k must be >= 1"):
        accumulation_window_totals([1], 0)


def _uneven_pairs(path, n):
    """``n`` pairs whose replacements and leaks range from a few to ~60 tokens: a
    per-micro-batch token mean weights them very differently from one mean over the
    optimizer step."""
    import json

    with open(path, "w") as fh:
        for i in range(n):
            chosen = "ok." if i % 2 else " ".join(["I can not share that detail about a private person."] * (1 + i))
            fh.write(json.dumps({"id": f"p{i}", "prompt": f"Where does person {i} live?", "chosen": chosen,
                                 "rejected": " ".join([f"Person {i} lives at {100 + i} Main Street."] * (1 + i % 3 * 4))})
                     + "\n")


@pytest.mark.parametrize("objective,n_pairs,batch,k", [
    ("orpo", 8, 2, 2), ("sft", 10, 2, 3), ("ga", 8, 2, 2), ("orpo", 10, 2, 3), ("dpo", 10, 3, 2), ("npo", 4, 3, 2),
])
def test_accumulated_micro_batches_follow_one_big_batch(tiny_model_dir, tmp_path, objective, n_pairs, batch, k):
    """An optimizer step over k accumulated micro-batches updates the weights exactly as
    one batch of k x batch pairs does, with answers of very uneven lengths, conditioning
    dropout on, and a last window of fewer micro-batches (10 pairs: 2 x 3 + 2 x 2, or
    micro-batches of 3 + 3 and 3 + 1, or 3 + 1 alone: NPO forgets in its first step). The NLL used to be a token mean per micro-batch:
    the short answers' tokens then weighed far more; the per-pair terms (odds ratio, NPO,
    DPO) were means per micro-batch, which a last window's fewer or smaller micro-batches
    scaled down or up."""
    spec = f"tiny:{tiny_model_dir}"
    _uneven_pairs(tmp_path / "pairs.jsonl", n_pairs)
    weights = {}
    for name, bs, acc in (("one batch", batch * k, 1), ("accumulated", batch, k)):
        dm = PairDataModule(tokenizer=spec, train_file=str(tmp_path / "pairs.jsonl"), batch_size=bs, val_fraction=0.0)
        L.seed_everything(0)
        m = UnlearnModule(model=spec, objective=objective, cond_dropout=0.5, beta=0.5,
                          optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
        trainer = _fit(m, dm, tmp_path / name, steps=-1, max_epochs=1, accumulate_grad_batches=acc)
        assert trainer.global_step == -(-n_pairs // (batch * k))
        weights[name] = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    start = UnlearnModule(model=spec)
    start.configure_model()
    w0 = dict(start.model.named_parameters())
    moved = max((w - w0[n]).abs().max().item() for n, w in weights["one batch"].items())
    assert moved > 1e-3
    # float32 rounding of the summed gradients: up to a few 1e-6 of the largest move (DPO's
    # sums of token log-probs; 44 of 262,144 weights above 1e-6 once the tiny model's world
    # changed), so every weight within 1e-5 and all but a thousandth within 1e-6 as before;
    # a weighting error (a per-micro-batch mean) moves weights by a tenth of it
    scale = max(1.0, moved)
    above, total = 0, 0
    for n, w in weights["one batch"].items():
        torch.testing.assert_close(weights["accumulated"][n], w, rtol=0, atol=1e-5 * scale)
        above += int(((weights["accumulated"][n] - w).abs() > 1e-6 * scale).sum())
        total += w.numel()
    assert above <= total // 1000, f"{above} of {total} weights differ by more than 1e-6 of the largest move"


def test_epoch_order_replays_seeded_samplers_and_refuses_random_ones():
    from torch.utils.data import DataLoader, DistributedSampler

    from cfg_unlearn.module import _epoch_order

    data = list(range(10))
    seeded = DataLoader(data, batch_size=3, sampler=DistributedSampler(data, num_replicas=1, rank=0, seed=4))
    for epoch in (0, 1):
        order = _epoch_order(seeded, epoch)
        seeded.sampler.set_epoch(epoch)
        assert order == [i for b in seeded for i in b.tolist()]
    assert _epoch_order(seeded, 0) != _epoch_order(seeded, 1)
    assert _epoch_order(DataLoader(data, batch_size=3), 0) == data
    assert _epoch_order(DataLoader(data, batch_size=3, shuffle=True), 0) is None  # draws from a generator


def test_accumulation_logs_each_micro_batchs_own_loss(tiny_model_dir, tmp_path):
    """The step-level token normalisation shapes the gradient only: with the weights held
    still (lr 0), every micro-batch logs the loss and NLL it logs without accumulation.
    An epoch's short last window (5 batches, windows of 3 + 2) logged several times its
    NLL when the scaled value was logged."""
    spec = f"tiny:{tiny_model_dir}"
    _uneven_pairs(tmp_path / "pairs.jsonl", 10)
    logged = {}
    for acc in (1, 3):
        seen = []

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                seen.append((float(trainer.callback_metrics["train/loss"]),
                             float(trainer.callback_metrics["train/nll_loss"])))

        dm = PairDataModule(tokenizer=spec, train_file=str(tmp_path / "pairs.jsonl"), batch_size=2, val_fraction=0.0)
        m = UnlearnModule(model=spec, cond_dropout=0.5, beta=0.5, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
        _fit(m, dm, tmp_path / str(acc), steps=-1, max_epochs=1, accumulate_grad_batches=acc, callbacks=[Record()],
             log_every_n_steps=1)
        logged[acc] = seen
    assert len(logged[3]) == len(logged[1]) == 5
    for (loss3, nll3), (loss1, nll1) in zip(logged[3], logged[1]):
        assert loss3 == pytest.approx(loss1, rel=1e-5) and nll3 == pytest.approx(nll1, rel=1e-5)


def test_the_data_module_takes_the_models_tokenizer_and_refuses_another(tiny_model_dir, tmp_path, monkeypatch):
    """The data module's default tokenizer was a tiny one built into ./.cache: a Python-API
    user who set only UnlearnModule(model=...) trained and evaluated a 4096-token model on
    the ids of a 2048-token tokenizer without a word (a smaller model: an IndexError deep
    in the forward). The default is now the model's tokenizer; another one is refused."""
    from cfg_unlearn.tiny import TinySpec, build_tiny
    from cfg_unlearn.utils import ConfigError

    monkeypatch.chdir(tmp_path)
    big = build_tiny(tmp_path / "big", spec=TinySpec(vocab_size=4096))
    small = build_tiny(tmp_path / "small", spec=TinySpec(vocab_size=512))

    def fit(model, tokenizer):
        dm = PairDataModule(tokenizer=tokenizer, world=WorldConfig(seed=0, n_people=4), batch_size=4,
                            val_fraction=0.0)
        _fit(UnlearnModule(model=model), dm, tmp_path, steps=1)
        return dm

    dm = fit(f"tiny:{big}", None)
    assert len(dm.tokenizer) == 4096 and dm.tokenizer_source() == f"tiny:{big}"
    assert not (tmp_path / ".cache").exists()  # nothing built beside the user's files
    fit(str(big), f"tiny:{big}")  # the same folder named two ways
    # BPE on one corpus: the 2048 tokens are the first 2048 of the 4096, with their ids
    with pytest.raises(ConfigError, match=r"data tokenizer tiny:.* \(2048 tokens\) is not the tokenizer of model "
                                          r"tiny:.*big \(4096 tokens\): it would split text into other tokens"):
        fit(f"tiny:{big}", f"tiny:{tiny_model_dir}")
    with pytest.raises(ConfigError, match=r"has 2048 tokens, more than the 512 embedding rows of model tiny:.*small"):
        fit(f"tiny:{small}", f"tiny:{tiny_model_dir}")
    with pytest.raises(ConfigError, match=r"tokenizer=None\) takes the tokenizer of the model its trainer trains"):
        PairDataModule(world=WorldConfig(seed=0, n_people=4)).setup("fit")


def test_reduce_lr_on_plateau_steps_on_its_monitor_once_per_epoch(tiny_model_dir, tmp_path):
    """The module built the scheduler entry without a monitor, so Lightning refused every
    ReduceLROnPlateau, LightningCLI's own (which carries one) included."""
    from functools import partial

    from lightning.pytorch.cli import ReduceLROnPlateau

    from cfg_unlearn.utils import ConfigError

    spec = f"tiny:{tiny_model_dir}"
    dm = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4, val_fraction=0.3)
    # threshold 1 in relative mode: no value ever counts as better, so with patience 0
    # every epoch's check halves the rate
    plateau = partial(ReduceLROnPlateau, monitor="val/loss", patience=0, factor=0.5, threshold=1.0)
    for every, halvings in ((1, 2), (2, 1)):  # it steps at the epochs that validate (val/loss exists only there)
        module = UnlearnModule(model=spec, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), lr_scheduler=plateau)
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                            check_val_every_n_epoch=every)
        trainer.fit(module, datamodule=dm)
        assert trainer.lr_scheduler_configs[0].monitor == "val/loss"
        assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 / 2**halvings)
    plain = partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=0)
    with pytest.raises(ConfigError, match="ReduceLROnPlateau needs the metric it watches"):
        _fit(UnlearnModule(model=spec, lr_scheduler=plain), dm, tmp_path, steps=1)
    # validation every 6 steps across epochs of 4 (check_val_every_n_epoch None): the fit
    # ended at the first epoch's end ("conditioned on metric val/loss which is not
    # available"); it steps after the validation (step 6), not at the sanity check
    module = UnlearnModule(model=spec, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), lr_scheduler=plateau)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        val_check_interval=6, check_val_every_n_epoch=None, num_sanity_val_steps=1)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 8 and trainer.num_training_batches == 4
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 / 2)
    # a fit that never validates cannot feed a val/* monitor: refused before training
    # (Lightning ended it at the first epoch's end)
    with pytest.raises(ConfigError, match="ReduceLROnPlateau watches val/loss, but this fit never validates"):
        _fit(UnlearnModule(model=spec, lr_scheduler=plateau), dm, tmp_path, steps=1)  # limit_val_batches=0
    # ... but it still steps per epoch on a GuidanceEval metric, which such a fit logs at
    # every epoch's end (a review: with check_val_every_n_epoch null it never stepped)

    class EvalMetric(L.Callback):
        def on_train_epoch_end(self, trainer, *args):
            trainer.callback_metrics["eval@g=2.0/leak_rate"] = torch.tensor(0.5)

    on_eval = partial(ReduceLROnPlateau, monitor="eval@g=2.0/leak_rate", patience=0, factor=0.5, threshold=1.0)
    module = UnlearnModule(model=spec, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), lr_scheduler=on_eval)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        val_check_interval=6, check_val_every_n_epoch=None, limit_val_batches=0,
                        callbacks=[EvalMetric()])
    trainer.fit(module, datamodule=dm)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 / 2**2)


def test_a_standalone_validate_scores_the_precomputed_reference_or_says_why_not(tiny_model_dir, tmp_path):
    """validate with reference: precomputed and no table left val/loss out without a word.
    An untrained module is the starting model: its table is scored, and NPO is at its
    closed form (2 / beta) ln 2. Weights restored from a checkpoint without a table get a
    warning instead."""
    spec = f"tiny:{tiny_model_dir}"
    dm = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4, val_fraction=0.3)

    def validate(module, **kw):
        return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path).validate(
            module, datamodule=dm, verbose=False, **kw)[0]

    module = UnlearnModule(model=spec, objective="npo", reference="precomputed", beta=0.1)
    scored = []
    compute = module.compute_reference_logps
    module.compute_reference_logps = lambda splits=("train", "val"): scored.append(splits) or compute(splits)
    out = validate(module)
    assert out["val/loss"] == pytest.approx(20 * math.log(2), abs=1e-4)
    # the validation pairs only, and for that validate only: a later fit (another precision,
    # other data) scored with it; here it scores its own, train pairs included
    assert scored == [("val",)] and module.reference_logps is None
    _fit(module, dm, tmp_path, steps=1)
    assert scored == [("val",), ("train", "val")] and any(k.startswith("train:") for k in module.reference_logps)
    # dataloaders without their data module: nothing to score from, and a warning says so
    with pytest.warns(UserWarning, match="the table is scored from a PairDataModule, and dataloaders were given"):
        out = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path).validate(
            UnlearnModule(model=spec, objective="npo", reference="precomputed"), dataloaders=dm.val_dataloader(),
            verbose=False)[0]
    assert "val/loss" not in out and "val/logps/forget" in out
    trainer = _fit(UnlearnModule(model=spec, objective="npo", reference="copy"), dm, tmp_path, steps=1,
                   enable_checkpointing=True)
    ckpt = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
    with pytest.warns(UserWarning, match=r"npo with reference: precomputed, but these weights come with no "
                                         r"reference table .* val/loss and the objective's terms are left out"):
        out = validate(UnlearnModule(model=spec, objective="npo", reference="precomputed"), ckpt_path=ckpt)
    assert "val/loss" not in out and "val/logps/forget" in out


def test_validate_refuses_a_checkpoints_reference_table_scored_on_other_data(tiny_model_dir, tmp_path):
    """validate --ckpt_path of an NPO run on another world seed (the same validation ids,
    other text) scored val/loss against the stale table without a word (1.91 where it
    was 11.54)."""
    spec = f"tiny:{tiny_model_dir}"

    def dm(seed):
        return PairDataModule(tokenizer=spec, world=WorldConfig(seed=seed, n_people=4), batch_size=4,
                              val_fraction=0.3)

    trainer = _fit(UnlearnModule(model=spec, objective="npo", reference="precomputed",
                                 optimizer=lambda p: torch.optim.SGD(p, lr=1e-3)), dm(0), tmp_path, steps=2,
                   enable_checkpointing=True)
    ckpt = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path

    def validate(seed):
        return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path).validate(
            UnlearnModule(model=spec, objective="npo", reference="precomputed"), datamodule=dm(seed),
            ckpt_path=ckpt, verbose=False)

    assert "val/loss" in validate(0)[0]  # its own data: scored
    with pytest.raises(ValueError, match=r"do not fit this data: \d+ of the \d+ val pairs .* were encoded "
                                         r"differently .* or reference: copy"):
        validate(1)


def test_python_users_settings_as_dicts_and_strict_false(tiny_model_dir, tmp_path):
    """From Python, lora={"r": 8} and world={...} were AttributeErrors ('dict' object has no
    attribute 'r' / 'check'), and load_from_checkpoint(strict=False) was refused as "in
    conflict with UnlearnModule.strict_loading=True", which the user never set."""
    from cfg_unlearn.callbacks import GuidanceEval
    from cfg_unlearn.utils import ConfigError

    spec = f"tiny:{tiny_model_dir}"
    m = UnlearnModule(model=spec, lora={"r": 4, "alpha": 8})
    assert m.lora == LoraSettings(r=4, alpha=8) and m.hparams.lora == LoraSettings(r=4, alpha=8)
    dm = PairDataModule(tokenizer=spec, world={"seed": 1, "n_people": 3}, batch_size=4, val_fraction=0.0)
    assert dm.world == WorldConfig(seed=1, n_people=3)
    assert GuidanceEval(world={"n_people": 3}).world == WorldConfig(n_people=3)
    with pytest.raises(ConfigError, match=r"lora: unknown field\(s\) 'rank'; LoraSettings has .*\br\b"):
        UnlearnModule(model=spec, lora={"rank": 4})
    trainer = _fit(UnlearnModule(model=spec), dm, tmp_path, steps=1, enable_checkpointing=True)
    ckpt = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
    assert UnlearnModule.load_from_checkpoint(ckpt, strict=False).model is not None


def test_pairs_longer_than_the_models_context_are_refused_before_training(tmp_path):
    """fit never compared the pairs with the model's context: a GPT-2-style model (learned
    positions) died in the sanity check with an IndexError, and a rotary one trained on
    positions it never knew, without a word."""
    from cfg_unlearn.tiny import TinySpec, build_tiny
    from cfg_unlearn.utils import ConfigError

    short = f"tiny:{build_tiny(tmp_path / 'short', spec=TinySpec(max_position_embeddings=32))}"

    def dm(**kw):
        return PairDataModule(tokenizer=short, world=WorldConfig(seed=0, n_people=4), batch_size=4,
                              val_fraction=0.0, **kw)

    with pytest.raises(ConfigError, match=r"the longest pair sequence is \d+ tokens, past the 32 positions of model "
                                          r"tiny:.*short: set data.max_length to 32 or less"):
        _fit(UnlearnModule(model=short), dm(), tmp_path, steps=1)
    data = dm(max_length=32)
    assert _fit(UnlearnModule(model=short), data, tmp_path, steps=1).global_step == 1
    assert data.longest_sequence() == 32


def test_validation_leaves_padding_rows_out_and_weights_batches_by_real_pairs(tiny_setup):
    """A rank's padding row (a repeat of a real pair, marked ``pad``) is not scored, a
    batch of padding alone weighs nothing, and batches weigh by their real pairs."""
    from cfg_unlearn.data.datamodule import MarkedPadding

    spec, dm = tiny_setup
    m = UnlearnModule(model=spec)
    m.configure_model()
    m.model.eval()
    marked = MarkedPadding(dm.train_dataset)
    n = len(dm.train_dataset)
    collate = dm.train_dataloader().collate_fn

    def sums(*batches):
        m.on_validation_epoch_start()
        with torch.no_grad():
            for rows in batches:
                m.validation_step(collate([marked[i] for i in rows]), 0)
        return {k: v.item() for k, v in m._val_sums.items()}, m._val_pairs

    real, count = sums([0, 1, 2])
    padded, padded_count = sums([0, 1, 2, n], [n + 1])  # n, n + 1: padding (pairs 0 and 1 again)
    assert count == padded_count == 3 and real.keys() == padded.keys()
    for k in real:
        assert padded[k] == pytest.approx(real[k], abs=1e-4), k
    # two batches of 1 and 2 pairs: the first counts once, the second twice
    split, split_count = sums([0], [1, 2])
    assert split_count == 3
    assert split["val/rewards/accuracies"] == pytest.approx(real["val/rewards/accuracies"], abs=1e-6)


@pytest.mark.parametrize("settings,match", [
    ({"r": 4, "alpha": 0}, r"lora.alpha must be > 0"),
    ({"r": 4, "alpha": -8}, r"lora.alpha must be > 0"),
    ({"r": 4, "dropout": -0.1}, r"lora.dropout must be in \[0, 1\)"),
    ({"r": 4, "dropout": 1.5}, r"lora.dropout must be in \[0, 1\)"),
    ({"r": 4, "target_modules": "q_proj("}, r"lora.target_modules 'q_proj\(' is no valid regex"),
    ({"r": 4, "target_modules": []}, r"non-empty list of module names"),
])
def test_lora_settings_that_would_train_nothing_or_else_are_refused(tiny_setup, settings, match):
    """alpha 0 left every lora_B at 0 through training; a negative dropout was no dropout."""
    spec, _ = tiny_setup
    with pytest.raises(ConfigError, match=match):
        UnlearnModule(model=spec, lora=settings)


def test_every_lora_target_must_name_a_module(tiny_setup):
    """A typo in one name (q_prj) left that layer unadapted, silently; peft raises only
    when no name matches."""
    spec, _ = tiny_setup
    m = UnlearnModule(model=spec, lora={"r": 4, "target_modules": ["q_prj", "v_proj"]})
    with pytest.raises(ConfigError, match=r"lora.target_modules \['q_prj'\] name no module of the model; its "
                                          r"linear layers are \[.*'q_proj'.*\] \(did you mean 'q_prj' -> 'q_proj'\?\)"):
        m.configure_model()
    # a string is peft's regex over full names: it must match one ("q_proj" alone matches
    # none). A user review: the error printed it as the list ['q_proj'], which reads as
    # the very name its list of layers shows
    with pytest.raises(ConfigError, match=r"lora.target_modules 'q_proj': a string is a regex over full module names "
                                          r"\(peft's rule\), and it matches none \(they read like 'model.layers.0."
                                          r"self_attn.q_proj'\); for that layer in every block give a list, \[q_proj\]"):
        UnlearnModule(model=spec, lora={"r": 4, "target_modules": "q_proj"}).configure_model()
    with pytest.raises(ConfigError, match=r"matches none .*; did you mean 'all-linear'\?; or give a list"):
        UnlearnModule(model=spec, lora={"r": 4, "target_modules": "all_linear"}).configure_model()
    from cfg_unlearn.module import check_lora_targets

    # a model with no linear layer to show as an example (a review: an IndexError)
    with pytest.raises(ConfigError, match=r"'q_proj': a string is a regex .* matches none; or give a list"):
        check_lora_targets(torch.nn.Sequential(torch.nn.Embedding(4, 4)), "q_proj")
    regex = UnlearnModule(model=spec, lora={"r": 4, "target_modules": r".*\.(q_proj|v_proj)"})
    regex.configure_model()
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in regex.model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "v_proj"}
    # a review: a typo inside the regex's alternatives trained only the layers the others
    # matched, silently (peft raises only when the whole regex matches nothing)
    with pytest.raises(ConfigError, match=r"lora.target_modules '\.\*\\\.\(q_proj\|vproj\)': 'vproj' matches no "
                                          r"module with the rest of the regex, so that layer would stay unadapted; "
                                          r"the linear layers are \[.*\] \(did you mean 'vproj' -> 'v_proj'\?\)"):
        UnlearnModule(model=spec, lora={"r": 4, "target_modules": r".*\.(q_proj|vproj)"}).configure_model()
    # a name of another architecture (a config shared with GPT-2) is said, not refused (a review)
    shared = UnlearnModule(model=spec, lora={"r": 4, "target_modules": r".*\.(q_proj|v_proj|c_attn)"})
    with pytest.warns(UserWarning, match=r"'c_attn' match no module of this model \(names of another architecture"):
        shared.configure_model()


def test_dead_regex_alternatives_fixes_one_group_at_a_time():
    from cfg_unlearn.module import dead_regex_alternatives

    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    assert dead_regex_alternatives(r".*\.(q_proj|up_proj)", names) == []
    assert dead_regex_alternatives(r".*\.(?:q_proj|k_proj|up_proj)", names) == ["k_proj"]
    # two groups: each alternative must match with the other group as written
    assert dead_regex_alternatives(r"model\.layers\.(0|1|2)\.(self_attn\.q_proj|mlp\.up_proj)", names) == ["2"]
    # what is not a group of plain alternatives is not split (nor a single name)
    assert dead_regex_alternatives(r".*\.(q_\w+|nothing)", names) == []
    assert dead_regex_alternatives(r".*\.(q_proj)", names) == []


def test_lora_on_a_tied_embedding_is_refused(tiny_model_dir, tmp_path):
    """With tied embeddings, an adapter on embed_tokens changed the shared matrix at
    merge: every export answer differed from the trained module's."""
    import shutil

    from transformers import AutoModelForCausalLM

    tied = tmp_path / "tied"
    shutil.copytree(tiny_model_dir, tied)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.tie_word_embeddings = True  # as Qwen2.5-0.5B, Llama-3.2-1B and Gemma are
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(tied)
    for targets in (["embed_tokens", "q_proj"], ["lm_head"], r".*(embed_tokens|q_proj)"):
        m = UnlearnModule(model=str(tied), lora={"r": 4, "target_modules": targets})
        with pytest.raises(ConfigError, match=r"ties its input embedding and output head"):
            m.configure_model()
    ok = UnlearnModule(model=str(tied), lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    ok.configure_model()  # the attention layers are fine
    untied = UnlearnModule(model=f"tiny:{tiny_model_dir}", lora={"r": 4, "target_modules": ["embed_tokens"]})
    untied.configure_model()  # untied: the embedding is its own matrix


def test_settings_errors_name_their_key_and_a_bad_dtype_fails_before_any_work():
    """--model.dtype float33 was a traceback once the model was built, after the data's
    setup; batch_size errors did not say whether data or eval was meant."""
    from cfg_unlearn.data.datamodule import PairDataModule

    with pytest.raises(ConfigError, match=r"model.dtype: unknown dtype 'float33'"):
        UnlearnModule(model="unused", dtype="float33")
    with pytest.raises(ConfigError, match=r"^model.cond_dropout must be in \[0, 1\]"):
        UnlearnModule(model="unused", cond_dropout=1.5)
    with pytest.raises(ConfigError, match=r"^data.batch_size must be >= 1, got 0"):
        PairDataModule(tokenizer="unused", world=WorldConfig(n_people=2), batch_size=0)


@pytest.mark.parametrize("settings", [{"dtype": "float16"}, {"precision": "16-true"}],
                         ids=["dtype-float16", "precision-16-true"])
def test_float16_trainable_weights_are_refused(tiny_setup, tmp_path, settings):
    """AdamW's eps (1e-8) is 0 in float16: a zero gradient made the weights NaN at the
    first step, and training went on, exit status 0 (a numerics audit)."""
    spec, dm = tiny_setup
    m = UnlearnModule(model=spec, dtype=settings.get("dtype", "float32"))
    kw = {"precision": settings["precision"]} if "precision" in settings else {}
    with pytest.raises(ValueError, match=r"trainable tensor\(s\) are float16 .* cannot be trained without float32 "
                                         r"master weights .*16-mixed"):
        _fit(m, dm, tmp_path, steps=1, **kw)


def test_a_diverged_loss_stops_training_before_its_update(tiny_setup, tmp_path):
    """A NaN or infinite loss trained on: every later step, checkpoint and evaluation was
    of NaN weights (whose empty answers score leak rate 0), exit status 0. It stops at
    the first such step."""
    from cfg_unlearn.utils import TrainingDiverged

    spec, dm = tiny_setup
    m = UnlearnModule(model=spec, optimizer=lambda p: torch.optim.SGD(p, lr=1e9))
    steps = []

    class Steps(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            steps.append(trainer.global_step)

    with pytest.raises(TrainingDiverged, match=r"train/loss is (nan|inf) at step ([1-9]\d*) .* training diverged"):
        _fit(m, dm, tmp_path, steps=50, callbacks=[Steps()])
    assert 0 < len(steps) < 10  # stopped at the first non-finite loss, not after 50 steps


def test_bfloat16_trainable_weights_are_warned_about(tiny_setup, tmp_path):
    """Full fine-tuning of bfloat16 weights (no float32 master copy) loses updates below
    bfloat16's resolution, silently; LoRA adapters over a bfloat16 base stay float32."""
    spec, dm = tiny_setup
    with pytest.warns(UserWarning, match=r"trainable tensor\(s\) are bfloat16 .* no float32 master copy"):
        _fit(UnlearnModule(model=spec, dtype="bfloat16"), dm, tmp_path, steps=1)
    import warnings

    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        _fit(UnlearnModule(model=spec, dtype="bfloat16", lora={"r": 4}), dm, tmp_path, steps=1)
    assert not [w for w in got if "master copy" in str(w.message)]
    # bf16-true casts the adapters too: the advice was "train LoRA adapters" to a LoRA user
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        _fit(UnlearnModule(model=spec, lora={"r": 4}), dm, tmp_path, steps=1, precision="bf16-true")
    said = [str(w.message) for w in got if "master copy" in str(w.message)]
    assert len(said) == 1 and "Keep the adapters float32 with trainer.precision bf16-mixed" in said[0]
    assert "train LoRA adapters" not in said[0]
