import math

import pytest
import torch
import torch.nn.functional as F

from diffalign.align.losses import diffusion_dpo_loss, diffusion_kto_loss, per_sample_mse


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_dpo_loss_equals_hand_computation():
    err_w = torch.tensor([0.10, 0.30])
    err_l = torch.tensor([0.20, 0.10])
    ref_w = torch.tensor([0.15, 0.20])
    ref_l = torch.tensor([0.12, 0.25])
    beta = 10.0
    out = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, beta)
    # inside = -0.5 * beta * ((err_w - err_l) - (ref_w - ref_l))
    inside = [-0.5 * beta * ((0.10 - 0.20) - (0.15 - 0.12)), -0.5 * beta * ((0.30 - 0.10) - (0.20 - 0.25))]
    assert inside[0] == pytest.approx(0.65) and inside[1] == pytest.approx(-1.25)
    assert out.inside.tolist() == pytest.approx(inside, rel=1e-6)
    # -logsigmoid(x) = log(1 + exp(-x)), per pair, then the mean
    expected = (_softplus(-inside[0]) + _softplus(-inside[1])) / 2
    assert float(out.loss) == pytest.approx(expected, rel=1e-6)
    assert float(out.implicit_acc) == 0.5
    assert float(out.reward_margin) == pytest.approx(sum(inside) / 2, rel=1e-6)
    assert (out.reward_w - out.reward_l).tolist() == pytest.approx(inside, rel=1e-5)
    # ... which is not the logsigmoid of the mean (diffusers#6702)
    wrong = _softplus(-(inside[0] + inside[1]) / 2)
    assert abs(float(out.loss) - wrong) > 0.05


def test_dpo_loss_sign_prefers_lower_winner_error():
    ref = torch.tensor([0.2])
    better = diffusion_dpo_loss(torch.tensor([0.1]), torch.tensor([0.2]), ref, ref, 100.0)
    worse = diffusion_dpo_loss(torch.tensor([0.2]), torch.tensor([0.1]), ref, ref, 100.0)
    assert float(better.loss) < math.log(2) < float(worse.loss)
    equal = diffusion_dpo_loss(ref, ref, ref, ref, 100.0)
    assert float(equal.loss) == pytest.approx(math.log(2))


def test_dpo_loss_is_finite_for_huge_logits():
    out = diffusion_dpo_loss(
        torch.tensor([10.0]), torch.tensor([0.0]), torch.zeros(1), torch.zeros(1), 5000.0
    )
    assert torch.isfinite(out.loss) and float(out.loss) == pytest.approx(25000.0)


def test_dpo_gradient_matches_autograd_of_formula():
    err_w = torch.tensor([0.3, 0.1, 0.2], requires_grad=True)
    err_l = torch.tensor([0.2, 0.4, 0.2], requires_grad=True)
    ref_w, ref_l = torch.tensor([0.25, 0.2, 0.1]), torch.tensor([0.25, 0.3, 0.3])
    diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, 7.0).loss.backward()
    a, b = err_w.detach().requires_grad_(), err_l.detach().requires_grad_()
    (-F.logsigmoid(-3.5 * ((a - b) - (ref_w - ref_l)))).mean().backward()
    assert torch.allclose(err_w.grad, a.grad) and torch.allclose(err_l.grad, b.grad)


def test_per_sample_mse_averages_over_c_h_w():
    pred = torch.zeros(2, 3, 2, 2)
    target = torch.ones(2, 3, 2, 2)
    target[1] *= 2
    assert per_sample_mse(pred, target).tolist() == [1.0, 4.0]


def test_kto_loss_equals_hand_computation():
    err = torch.tensor([0.1, 0.4, 0.2])
    ref = torch.tensor([0.2, 0.3, 0.2])
    liked = torch.tensor([True, False, True])
    beta = 5.0
    out = diffusion_kto_loss(err, ref, liked, beta, lambda_desirable=1.0, lambda_undesirable=2.0)
    g = [0.1, -0.1, 0.0]  # -(err - ref)
    z = max(0.0, sum(g) / 3)  # 0: clamped at zero
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [1 - sig(beta * (g[0] - z)), 2.0 * (1 - sig(-beta * (g[1] - z))), 1 - sig(beta * (g[2] - z))]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-5)
    assert float(out.loss) == pytest.approx(sum(expected) / 3, rel=1e-5)
    assert float(out.reference_point) == pytest.approx(z, abs=1e-6)
    # a positive batch-mean log-ratio becomes the (detached) reference point
    shifted = diffusion_kto_loss(err - 0.2, ref, liked, beta)
    assert float(shifted.reference_point) == pytest.approx(0.2 - 0.0 + sum(g) / 3, rel=1e-5)


def test_soft_label_dpo_loss_is_the_bradley_terry_cross_entropy():
    err_w = torch.tensor([0.10, 0.30, 0.20, 0.25])
    err_l = torch.tensor([0.20, 0.10, 0.22, 0.05])
    ref_w = torch.tensor([0.15, 0.20, 0.20, 0.10])
    ref_l = torch.tensor([0.12, 0.25, 0.20, 0.10])
    labels = torch.tensor([1.0, 0.5, 0.9, 0.2])
    beta = 10.0
    out = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, beta, labels)
    inside = [-0.5 * beta * ((w - lo) - (rw - rl)) for w, lo, rw, rl in zip(err_w, err_l, ref_w, ref_l)]
    inside = [float(x) for x in inside]
    # -(p log sigmoid(x) + (1 - p) log sigmoid(-x)) = p softplus(-x) + (1 - p) softplus(x), per pair
    by_hand = [p * _softplus(-x) + (1 - p) * _softplus(x) for p, x in zip(labels.tolist(), inside)]
    assert out.losses.tolist() == pytest.approx(by_hand, rel=1e-5)
    assert float(out.loss) == pytest.approx(sum(by_hand) / 4, rel=1e-5)
    # ... which is torch's binary cross-entropy with logits against the soft labels
    bce = F.binary_cross_entropy_with_logits(out.inside, labels, reduction="none")
    assert torch.allclose(out.losses, bce, atol=1e-6)
    # label 1 is the paper's loss exactly
    hard = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, beta)
    assert float(out.losses[0]) == float(hard.losses[0])
    # accuracy and margin over the decisive pairs (0, 2, 3), each signed towards its preferred image
    assert out.decisive.tolist() == [True, False, True, True]
    right = [inside[0] > 0, inside[2] > 0, inside[3] < 0]
    assert float(out.implicit_acc) == pytest.approx(sum(right) / 3)
    assert float(out.reward_margin) == pytest.approx((inside[0] + inside[2] - inside[3]) / 3, rel=1e-5)


def test_a_tie_holds_the_reference_preference_and_bad_labels_are_refused():
    ref_w, ref_l = torch.tensor([0.2, 0.3]), torch.tensor([0.1, 0.4])
    err_w, err_l = ref_w.clone().requires_grad_(), ref_l.clone().requires_grad_()
    tie = torch.tensor([0.5, 0.5])
    diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, 50.0, tie).loss.backward()
    assert err_w.grad.abs().max() == 0 and err_l.grad.abs().max() == 0  # at the reference: no pull
    moved = diffusion_dpo_loss(ref_w - 0.01, ref_l, ref_w, ref_l, 50.0, tie)
    flipped = diffusion_dpo_loss(ref_w + 0.01, ref_l, ref_w, ref_l, 50.0, tie)
    assert float(moved.loss) > math.log(2) and float(moved.loss) == pytest.approx(float(flipped.loss))
    assert math.isnan(float(diffusion_dpo_loss(ref_w, ref_l, ref_w, ref_l, 50.0, tie).implicit_acc))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        diffusion_dpo_loss(ref_w, ref_l, ref_w, ref_l, 50.0, torch.tensor([1.5, 0.5]))
    with pytest.raises(ValueError, match="labels has shape"):
        diffusion_dpo_loss(ref_w, ref_l, ref_w, ref_l, 50.0, torch.tensor([1.0]))
