"""Loss tests. Expected numbers are derived by hand in each docstring; the random-input
test compares against an independent 50-digit implementation (mpmath)."""

import math

import mpmath
import pytest
import torch

from cfg_unlearn.objectives import log1mexp, masked_nll, orpo_loss, sequence_logps, token_logps


def test_sequence_logps_hand_values():
    """Zero logits over V=4 give log p = -ln 4 for every token. Row 0 scores labels at
    positions 1 and 2 (two tokens), row 1 only position 3 (one token).
    average -> -ln 4 for both rows; sum -> -2 ln 4 and -ln 4."""
    logits = torch.zeros(2, 4, 4)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, -100, 3]])
    ln4 = math.log(4)
    assert torch.allclose(sequence_logps(logits, labels), torch.tensor([-ln4, -ln4]))
    assert torch.allclose(sequence_logps(logits, labels, average=False), torch.tensor([-2 * ln4, -ln4]))


def test_token_logps_picks_the_label_and_shifts():
    """Logits at position t score the label at t+1. Position 0 puts logit ln 3 on token 2
    (others 0): p(2) = 3 / (3 + 3) = 1/2 over V=4; label[1] = 2 -> log p = ln(1/2)."""
    logits = torch.zeros(1, 2, 4)
    logits[0, 0, 2] = math.log(3)
    labels = torch.tensor([[-100, 2]])
    logps, mask = token_logps(logits, labels)
    assert mask.tolist() == [[True]]
    assert logps.item() == pytest.approx(math.log(0.5), abs=1e-6)


def test_token_logps_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="disagree"):
        token_logps(torch.zeros(1, 3, 4), torch.zeros(1, 2, dtype=torch.long))


def test_masked_nll_is_token_mean():
    """Scored log-probs -1, -2, -3 (one masked -10): NLL = (1 + 2 + 3) / 3 = 2."""
    logps = torch.tensor([[-1.0, -2.0], [-3.0, -10.0]])
    mask = torch.tensor([[True, True], [True, False]])
    assert masked_nll(logps, mask).item() == pytest.approx(2.0)


def test_log1mexp_stable_at_both_ends():
    """log(1 - e^x): at x = -1e-8, 1 - e^x = 1e-8 (to 1e-16) -> ln 1e-8 = -18.420681;
    at x = -ln 2, ln(1/2); at x = -60, -e^-60 (~ -8.76e-27)."""
    x = torch.tensor([-1e-8, -math.log(2), -60.0], dtype=torch.float64)
    out = log1mexp(x)
    assert out[0].item() == pytest.approx(math.log(1e-8), rel=1e-9)
    assert out[1].item() == pytest.approx(math.log(0.5), rel=1e-12)
    assert out[2].item() == pytest.approx(-math.exp(-60), rel=1e-9)


def test_orpo_loss_hand_values():
    """Sample 1: p_c = 1/2, p_r = 1/4 -> odds 1 and 1/3, log_odds = ln 3,
    log sigmoid(ln 3) = ln(3/4). Sample 2: p_c = 0.2, p_r = 0.8 -> odds 1/4 and 4,
    log_odds = -ln 16, log sigmoid = ln(1/17).
    With NLL 1.0 and beta 0.1: loss = 1 - 0.1 * (ln(3/4) + ln(1/17)) / 2 = 1.15604477;
    rewards/chosen = 0.1 * (ln .5 + ln .2) / 2, margins = 0.1 * mean(lp_c - lp_r),
    accuracies = 1/2, log_odds_chosen = (ln 3 - ln 16) / 2."""
    lp_c = torch.tensor([math.log(0.5), math.log(0.2)], dtype=torch.float64)
    lp_r = torch.tensor([math.log(0.25), math.log(0.8)], dtype=torch.float64)
    loss, m = orpo_loss(lp_c, lp_r, torch.tensor(1.0, dtype=torch.float64), beta=0.1)
    assert loss.item() == pytest.approx(1.1560447708254, abs=1e-11)
    assert m["log_odds_ratio"].item() == pytest.approx((math.log(0.75) + math.log(1 / 17)) / 2, abs=1e-12)
    assert m["log_odds_chosen"].item() == pytest.approx((math.log(3) - math.log(16)) / 2, abs=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(0.1 * (math.log(0.5) + math.log(0.2)) / 2, abs=1e-12)
    assert m["rewards/rejected"].item() == pytest.approx(0.1 * (math.log(0.25) + math.log(0.8)) / 2, abs=1e-12)
    assert m["rewards/margins"].item() == pytest.approx(0.1 * (math.log(2) + math.log(0.25)) / 2, abs=1e-12)
    assert m["rewards/accuracies"].item() == 0.5
    assert m["nll_loss"].item() == 1.0


def _reference_orpo(lp_c: list[float], lp_r: list[float], nll: float, beta: float) -> float:
    """Independent: odds straight from probabilities at 50 significant digits."""
    mpmath.mp.dps = 50
    total = mpmath.mpf(0)
    for c, r in zip(lp_c, lp_r):
        pc, pr = mpmath.exp(mpmath.mpf(c)), mpmath.exp(mpmath.mpf(r))
        log_odds = mpmath.log(pc / (1 - pc)) - mpmath.log(pr / (1 - pr))
        total += -mpmath.log(1 + mpmath.exp(-log_odds))  # log sigmoid
    return float(mpmath.mpf(nll) - beta * total / len(lp_c))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_orpo_loss_matches_independent_implementation_including_extremes(seed):
    g = torch.Generator().manual_seed(seed)
    n = 64
    lp = -torch.rand(2, n, generator=g, dtype=torch.float64) * 5
    # extremes: within 1e-7 of 0, and below -50
    lp[0, :8] = -torch.rand(8, generator=g, dtype=torch.float64) * 1e-7 - 1e-12
    lp[1, 8:16] = -torch.rand(8, generator=g, dtype=torch.float64) * 1e-7 - 1e-12
    lp[0, 16:24] = -50 - torch.rand(8, generator=g, dtype=torch.float64) * 50
    lp[1, 24:32] = -50 - torch.rand(8, generator=g, dtype=torch.float64) * 50
    lp[:, 32:36] = torch.tensor([[-1e-8, -80.0, -1e-9, -55.0], [-70.0, -1e-8, -60.0, -1e-9]], dtype=torch.float64)
    lp_c, lp_r = lp[0].clone().requires_grad_(), lp[1].clone().requires_grad_()
    nll = torch.tensor(1.7, dtype=torch.float64)
    loss, _ = orpo_loss(lp_c, lp_r, nll, beta=0.1)
    ref = _reference_orpo(lp[0].tolist(), lp[1].tolist(), 1.7, 0.1)
    assert abs(loss.item() - ref) < 1e-6
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(lp_c.grad).all() and torch.isfinite(lp_r.grad).all()


def test_orpo_loss_float32_extremes_are_finite():
    lp_c = torch.tensor([-1e-7, -60.0, -1e-9, -0.0], requires_grad=True)
    lp_r = torch.tensor([-60.0, -1e-7, -80.0, -3.0], requires_grad=True)
    loss, metrics = orpo_loss(lp_c, lp_r, torch.tensor(0.5))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(lp_c.grad).all() and torch.isfinite(lp_r.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())
