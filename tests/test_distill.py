"""Consistency distillation on Gaussian data, distances, target EMA and a tiny end-to-end step.

With data ~ N(mu, s^2 I) the exact consistency function is
f(x, sigma) = mu + (x - mu) sqrt(s^2 + sigma_min^2) / sqrt(s^2 + sigma^2), and the exact teacher is
D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu). With both exact, the CD loss measures only the
local error of one teacher Heun step, O(h^3) per step, so O(h^6) for the squared L2 distance.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from pipeline.diffusion import ConsistencyFunction, EDMDenoiser, karras_sigmas
from pipeline.distill.cd import ConsistencyDistillation, cd_loss
from pipeline.distill.distances import DISTANCES, get_distance, l2, pseudo_huber
from pipeline.nets import build_net
from gaussian import F64, MU, S, SIGMA_MAX, SIGMA_MIN, exact_consistency, exact_denoiser
from tiny import TINY_UNET
from pipeline.train import TrainConfig, ema_beta, ema_update

IMAGE_MU = MU.reshape(1, 1, 2, 2)  # the 4-d Gaussian as tiny 1x2x2 images


def perturbed_consistency(x, sigma):
    return exact_consistency(x, sigma) + 0.1


def gaussian_batch(n, seed):
    return IMAGE_MU + S * torch.randn(n, 1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))


def ascending(n):
    return karras_sigmas(n, SIGMA_MIN, SIGMA_MAX).flip(0)


# ---------------------------------------------------------------------------------------- cd_loss

@pytest.mark.parametrize("metric,rel_bound", [("l2", 1e-6), ("pseudo_huber", 1e-4)])
def test_cd_loss_vanishes_for_exact_consistency_function(metric, rel_bound):
    dist = get_distance(metric)
    x = gaussian_batch(8192, seed=0)
    sig = ascending(80)
    exact = cd_loss(exact_consistency, exact_consistency, exact_denoiser, x, sig, dist,
                    generator=torch.Generator().manual_seed(1))
    off = cd_loss(perturbed_consistency, exact_consistency, exact_denoiser, x, sig, dist,
                  generator=torch.Generator().manual_seed(1))
    assert exact.shape == off.shape == (8192,)
    assert torch.all(exact >= 0)
    ref = off.mean().item()
    # perturbation by 0.1 in each of the 4 dims: l2 = 0.01, pseudo-Huber ~ ||0.1 * 1||= 0.2
    expected_ref = 0.01 if metric == "l2" else 0.2
    assert ref == pytest.approx(expected_ref, rel=0.02)
    assert exact.mean().item() < rel_bound * ref, exact.mean().item() / ref
    assert exact.max().item() < 1e3 * rel_bound * ref


def test_cd_loss_exact_student_converges_at_heun_local_order():
    """Squared L2 of a Heun local error O(h^3): doubling N divides the loss by ~2^6 (Euler would give 2^4)."""
    x = gaussian_batch(16384, seed=2)
    losses = []
    for n in (40, 80, 160):
        losses.append(cd_loss(exact_consistency, exact_consistency, exact_denoiser, x, ascending(n), l2,
                              generator=torch.Generator().manual_seed(3)).mean().item())
    for a, b in zip(losses[:-1], losses[1:]):
        assert a / b > 32, losses


def test_cd_loss_uses_target_at_teacher_step_and_student_at_next_level():
    """With a recording student/target, check the indices: student sees t_{n+1}, target t_n, adjacent levels."""
    x = gaussian_batch(512, seed=4)
    sig = ascending(18)
    seen = {}

    def student(xx, t):
        seen["student"] = t.clone()
        return exact_consistency(xx, t)

    def target(xx, t):
        seen["target"] = t.clone()
        return exact_consistency(xx, t)

    cd_loss(student, target, exact_denoiser, x, sig, l2, generator=torch.Generator().manual_seed(5))
    idx_next = torch.searchsorted(sig, seen["student"])
    idx_cur = torch.searchsorted(sig, seen["target"])
    torch.testing.assert_close(sig[idx_next], seen["student"])
    torch.testing.assert_close(sig[idx_cur], seen["target"])
    assert torch.equal(idx_next, idx_cur + 1)
    # every adjacent pair (t_n, t_{n+1}), n = 1..N-1, is drawn, and sigma_min is never the student's level
    assert set(idx_cur.tolist()) == set(range(17))
    assert idx_next.min().item() == 1


def test_cd_loss_deterministic_given_generator():
    x = gaussian_batch(64, seed=6)
    sig = ascending(18)
    a = cd_loss(perturbed_consistency, exact_consistency, exact_denoiser, x, sig, l2, torch.Generator().manual_seed(7))
    b = cd_loss(perturbed_consistency, exact_consistency, exact_denoiser, x, sig, l2, torch.Generator().manual_seed(7))
    c = cd_loss(perturbed_consistency, exact_consistency, exact_denoiser, x, sig, l2, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# -------------------------------------------------------------------------------------- distances

def test_l2_by_hand():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]], dtype=F64)
    y = torch.tensor([[[[1.0, 0.0], [3.0, 1.0]]], [[[0.5, -0.5], [0.0, 0.0]]]], dtype=F64)
    torch.testing.assert_close(l2(x, y), torch.tensor([(0 + 4 + 0 + 9) / 4, (0.25 + 0.25) / 4], dtype=F64))


def test_pseudo_huber_by_hand():
    x = torch.zeros(3, 3, 8, 8, dtype=F64)
    y = torch.zeros(3, 3, 8, 8, dtype=F64)
    y[0, 0, 0, 0] = 3.0
    y[0, 1, 2, 3] = 4.0        # ||x - y|| = 5
    y[1] = 1e-5                # ||x - y||^2 = 192e-10, below c^2: quadratic regime
    d = 3 * 8 * 8
    c = 0.00054 * math.sqrt(d)
    assert c == pytest.approx(0.00748246, rel=1e-5)
    expected = [math.sqrt(25 + c * c) - c, math.sqrt(d * 1e-10 + c * c) - c, 0.0]
    torch.testing.assert_close(pseudo_huber(x, y), torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-15)
    # large errors: ~ ||x - y|| - c; small errors: ~ ||x - y||^2 / (2c)
    assert pseudo_huber(x, y)[0].item() == pytest.approx(5 - c, rel=1e-5)
    assert pseudo_huber(x, y)[1].item() == pytest.approx(d * 1e-10 / (2 * c), rel=1e-3)
    # symmetric
    torch.testing.assert_close(pseudo_huber(y, x), pseudo_huber(x, y))


def test_get_distance_names():
    assert get_distance("l2") is l2
    assert get_distance("pseudo_huber") is pseudo_huber
    assert set(DISTANCES) >= {"l2", "pseudo_huber"}
    with pytest.raises(ValueError, match="unknown consistency metric"):
        get_distance("lpips_but_misspelled")


# ------------------------------------------------------------------------------------------- EMAs

def _tiny_net(seed=0):
    torch.manual_seed(seed)
    return build_net(TINY_UNET, resolution=8, channels=1)


def test_ema_update_arithmetic():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    bn_a, bn_b = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    ema, model = torch.nn.Sequential(a, bn_a), torch.nn.Sequential(b, bn_b)
    bn_b.running_mean.fill_(3.0)
    old = [p.detach().clone() for p in ema.parameters()]
    new = [p.detach().clone() for p in model.parameters()]
    ema_update(ema, model, 0.9)
    for e, o, n in zip(ema.parameters(), old, new):
        torch.testing.assert_close(e.detach(), 0.9 * o + 0.1 * n)
    assert torch.equal(bn_a.running_mean, bn_b.running_mean)  # buffers are copied, not averaged
    ema_update(ema, model, 1.0)
    for e, o, n in zip(ema.parameters(), old, new):
        torch.testing.assert_close(e.detach(), 0.9 * o + 0.1 * n)
    ema_update(ema, model, 0.0)
    for e, n in zip(ema.parameters(), new):
        assert torch.equal(e.detach(), n)


def test_ema_beta_arithmetic():
    cfg = TrainConfig(steps=10, batch_size=32, lr=1e-3, ema_halflife_kimg=500.0, ema_rampup_ratio=0.05)
    # ramp-up: half-life = min(500k, 0.05 * images_seen)
    assert ema_beta(cfg, 1000) == pytest.approx(0.5 ** (32 / 50), rel=1e-12)
    assert ema_beta(cfg, 10 ** 8) == pytest.approx(0.5 ** (32 / 500_000), rel=1e-12)
    assert ema_beta(cfg, 0) == pytest.approx(0.0, abs=1e-300)
    no_ramp = TrainConfig(steps=10, batch_size=32, lr=1e-3, ema_halflife_kimg=0.5, ema_rampup_ratio=None)
    assert ema_beta(no_ramp, 0) == pytest.approx(0.5 ** (32 / 500), rel=1e-12)
    # half-life semantics: after halflife / batch_size updates the weight of the start is 1/2
    assert ema_beta(no_ramp, 0) ** (500 / 32) == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("mu", [0.0, 0.5, 0.95])
def test_consistency_distillation_after_step_moves_target_by_mu(mu):
    teacher = EDMDenoiser(_tiny_net(0)).requires_grad_(False).eval()
    student = ConsistencyFunction(copy.deepcopy(teacher.net), 0.5, SIGMA_MIN)
    obj = ConsistencyDistillation(student, teacher, ascending(18).float(), l2, mu)
    assert obj.mu == mu and obj.model is student
    assert all(not p.requires_grad for p in obj.target.parameters())
    assert obj.target is not student and obj.target.net is not student.net
    assert set(obj.extra_modules()) == {"target"}  # the frozen teacher is reloaded from its file, not checkpointed
    old = [p.detach().clone() for p in obj.target.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    new = [p.detach().clone() for p in student.parameters()]
    obj.after_step(student, 1)
    for t, o, n in zip(obj.target.parameters(), old, new):
        torch.testing.assert_close(t.detach(), mu * o + (1 - mu) * n, rtol=1e-6, atol=1e-6)
    if mu == 0.0:
        for t, n in zip(obj.target.parameters(), student.parameters()):
            assert torch.equal(t, n)
    # the online student is untouched
    for p, n in zip(student.parameters(), new):
        assert torch.equal(p.detach(), n)


# ----------------------------------------------------------------------------- end-to-end gradient

def test_tiny_unet_distillation_steps_reduce_loss():
    teacher = EDMDenoiser(_tiny_net(1), 0.5).requires_grad_(False).eval()
    student = ConsistencyFunction(copy.deepcopy(teacher.net), 0.5, SIGMA_MIN).requires_grad_(True).train()
    obj = ConsistencyDistillation(student, teacher, ascending(18).to(torch.float32), l2, 0.9)
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    y = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)

    def batch_loss():
        return obj.loss(student, y, torch.Generator().manual_seed(3)).mean()  # fixed sigmas and noise

    losses = []
    for step in range(15):
        opt.zero_grad(set_to_none=True)
        loss = batch_loss()
        losses.append(loss.item())
        loss.backward()
        grads = [p.grad for p in student.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
        assert all(p.grad is None for p in obj.target.parameters())
        assert all(p.grad is None for p in teacher.parameters())
        opt.step()
        obj.after_step(student, step)
    with torch.no_grad():
        final = batch_loss().item()
    assert math.isfinite(losses[0]) and losses[0] > 0
    assert final < 0.5 * losses[0], (losses, final)
    for p, b in zip(teacher.parameters(), teacher_before):
        assert torch.equal(p, b)
