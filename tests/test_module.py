"""UnlearnModule: the conditioning hook, the one-forward ORPO step, optimizer wiring."""

import lightning as L
import pytest
import torch

from cfg_unlearn.data.datamodule import PairDataModule
from cfg_unlearn.data.world import WorldConfig
from cfg_unlearn.module import UnlearnModule, apply_conditioning, draw_dropout_mask
from cfg_unlearn.objectives import orpo_loss, sequence_logps
from cfg_unlearn.prompts import NEGATIVE_INSTRUCTION


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_measured_dropout_rate_within_two_points(p):
    module = UnlearnModule(cond_dropout=p, seed=123)
    draws = torch.cat([module.conditioning_mask(8, batch_idx=i) for i in range(1250)])  # 10,000 samples
    assert draws.numel() == 10_000
    assert abs(draws.float().mean().item() - p) < 0.02


def test_dropout_mask_is_reproducible_and_varies_by_batch():
    a = draw_dropout_mask(64, 0.5, (0, 0, 0, 7))
    assert torch.equal(a, draw_dropout_mask(64, 0.5, (0, 0, 0, 7)))
    assert not torch.equal(a, draw_dropout_mask(64, 0.5, (0, 0, 0, 8)))
    assert not draw_dropout_mask(5, 0.0, (1,)).any() and draw_dropout_mask(5, 1.0, (1,)).all()


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
    assert m.cond_counts[1].item() == 12  # 3 steps x 4 pairs counted


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


@pytest.mark.parametrize("kwargs,match", [
    ({"cond_dropout": 1.5}, "cond_dropout"),
    ({"cond_mode": "flip"}, "cond_mode"),
    ({"objective": "npo"}, "not available yet"),
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
