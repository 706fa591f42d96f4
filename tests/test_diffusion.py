"""The EDM / consistency core against closed forms on Gaussian data.

For data ~ N(mu, s^2 I) everything is analytic: the optimal EDM denoiser is
D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), the PF-ODE dx/dsigma = (x - D) / sigma moves
x - mu by the factor sqrt(s^2 + sigma_b^2) / sqrt(s^2 + sigma_a^2) from sigma_a to sigma_b, and the
consistency function is f(x, sigma) = mu + (x - mu) sqrt(s^2 + sigma_min^2) / sqrt(s^2 + sigma^2).
"""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import EDMEulerScheduler
from torch import nn

from pipeline.diffusion import (ConsistencyFunction, EDMDenoiser, conditioned, consistency_sample,
                                consistency_scalings, edm_sample, edm_scalings, euler_step, heun_sample, heun_step,
                                karras_sigmas)
from pipeline.diffusion.loss import EDMLoss
from pipeline.diffusion.solvers import heun_nfe
from pipeline.nets import build_net
from gaussian import (CLASS_MUS, F64, MU, S, SIGMA_MAX, SIGMA_MIN, _col, exact_class_denoiser, exact_consistency,
                      exact_denoiser, exact_flow)
from tiny import TINY_UNET

SIGMA_DATA = 0.5


class ExactEDMNet(nn.Module):
    """The raw F(c_in x, c_noise) that makes EDMDenoiser equal the exact Gaussian denoiser."""

    def __init__(self, sigma_data=SIGMA_DATA):
        super().__init__()
        self.sigma_data = sigma_data
        self.calls = 0

    def forward(self, x_in, c_noise):
        self.calls += 1
        sigma = _col((4 * c_noise).exp(), x_in)
        x = x_in * (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_skip, c_out, _, _ = edm_scalings(sigma, self.sigma_data)
        return (exact_denoiser(x, sigma) - c_skip * x) / c_out


class ExactConsistencyNet(nn.Module):
    """The raw F that makes ConsistencyFunction equal the exact Gaussian consistency function."""

    def __init__(self, sigma_data=SIGMA_DATA, sigma_min=SIGMA_MIN, mu=MU, s=S):
        super().__init__()
        self.sigma_data, self.sigma_min, self.mu, self.s = sigma_data, sigma_min, mu, s

    def forward(self, x_in, c_noise):
        sigma = _col((4 * c_noise).exp(), x_in)
        x = x_in * (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_skip, c_out = consistency_scalings(sigma, self.sigma_data, self.sigma_min)
        target = exact_consistency(x, sigma, self.mu, self.s, self.sigma_min)
        safe = torch.where(c_out == 0, torch.ones_like(c_out), c_out)
        return torch.where(c_out == 0, torch.zeros_like(x), (target - c_skip * x) / safe)


def standardized_noise(n, d, seed):
    """Gaussian noise whitened to exactly zero sample mean and unit sample variance per dimension.

    The PF-ODE map of the Gaussian is affine, so with this noise the generated moments differ from
    the data moments only by solver error (and the tiny sigma_max / sigma_min truncation), not by
    Monte-Carlo error: the tolerances below can be tight.
    """
    z = torch.randn(n, d, dtype=F64, generator=torch.Generator().manual_seed(seed))
    z = z - z.mean(0)
    return z / z.std(0, unbiased=False)


# ---------------------------------------------------------------------------------------------- grid

def test_karras_sigmas_matches_diffusers_edm_euler():
    sched = EDMEulerScheduler(sigma_min=0.002, sigma_max=80, sigma_data=0.5, rho=7)
    sched.set_timesteps(18)
    ref = sched.sigmas.to(F64)
    assert ref[-1] == 0
    ours = karras_sigmas(18)
    assert ours.dtype == F64 and ours.shape == (18,)
    torch.testing.assert_close(ours, ref[:-1], rtol=1e-6, atol=1e-7)


def test_karras_sigmas_endpoints_and_monotone():
    for n in (2, 18, 40, 150):
        sig = karras_sigmas(n, 0.002, 80.0, 7.0)
        assert sig[0].item() == pytest.approx(80.0, rel=1e-12)
        assert sig[-1].item() == pytest.approx(0.002, rel=1e-12)
        assert torch.all(sig[1:] < sig[:-1])
        # evenly spaced in sigma^(1/rho)
        root = sig ** (1 / 7)
        torch.testing.assert_close(root[1:] - root[:-1], (root[1] - root[0]).expand(n - 1), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError):
        karras_sigmas(1)


# -------------------------------------------------------------------------------------- scalings

SIGMAS = torch.tensor([0.002, 0.01, 0.1, 0.5, 1.0, 3.0, 80.0], dtype=F64)


def test_edm_scalings_table1():
    sd = SIGMA_DATA
    c_skip, c_out, c_in, c_noise = edm_scalings(SIGMAS, sd)
    for i, s in enumerate(SIGMAS.tolist()):
        assert c_skip[i].item() == pytest.approx(sd ** 2 / (s ** 2 + sd ** 2), rel=1e-12)
        assert c_out[i].item() == pytest.approx(s * sd / math.sqrt(s ** 2 + sd ** 2), rel=1e-12)
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s ** 2 + sd ** 2), rel=1e-12)
        assert c_noise[i].item() == pytest.approx(math.log(s) / 4, rel=1e-12)
    # unit-variance target and input: c_skip^2 sd^2 + c_out^2 ... (EDM's derivation)
    torch.testing.assert_close(c_in ** 2 * (SIGMAS ** 2 + sd ** 2), torch.ones_like(SIGMAS))


def test_consistency_scalings_song_et_al():
    sd, smin = SIGMA_DATA, SIGMA_MIN
    c_skip, c_out = consistency_scalings(SIGMAS, sd, smin)
    for i, s in enumerate(SIGMAS.tolist()):
        assert c_skip[i].item() == pytest.approx(sd ** 2 / ((s - smin) ** 2 + sd ** 2), rel=1e-12)
        assert c_out[i].item() == pytest.approx((s - smin) * sd / math.sqrt(s ** 2 + sd ** 2), rel=1e-12, abs=1e-300)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_consistency_boundary_condition_any_net(dtype):
    torch.manual_seed(0)
    net = build_net(TINY_UNET, resolution=8, channels=1).to(dtype)
    for p in net.parameters():  # make sure F is far from zero, so only c_out = 0 can give f = x
        nn.init.normal_(p, std=0.5)
    model = ConsistencyFunction(net, SIGMA_DATA, SIGMA_MIN).eval()
    x = torch.randn(3, 1, 8, 8, dtype=dtype)
    with torch.no_grad():
        out = model(x, torch.full((3,), SIGMA_MIN, dtype=dtype))
        out_scalar = model(x, SIGMA_MIN)
        raw = net(x, torch.zeros(3, dtype=dtype))
        away = model(x, torch.full((3,), 1.0, dtype=dtype))
    assert raw.abs().max() > 0.1
    assert torch.equal(out, x)
    assert torch.equal(out_scalar, x)
    assert not torch.allclose(away, x)


class ZeroNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x_in, c_noise):
        self.seen.append((x_in.clone(), c_noise.clone()))
        return torch.zeros_like(x_in)


def test_edm_denoiser_zero_net_is_c_skip_x_and_net_inputs():
    net = ZeroNet()
    model = EDMDenoiser(net, SIGMA_DATA)
    x = torch.randn(4, 1, 2, 2, dtype=F64)
    sigma = torch.tensor([0.01, 0.5, 2.0, 80.0], dtype=F64)
    c_skip, _, c_in, c_noise = edm_scalings(sigma, SIGMA_DATA)
    out = model(x, sigma)
    torch.testing.assert_close(out, c_skip.reshape(-1, 1, 1, 1) * x, rtol=1e-14, atol=0)
    x_in, cn = net.seen[-1]
    torch.testing.assert_close(x_in, c_in.reshape(-1, 1, 1, 1) * x, rtol=1e-14, atol=0)
    torch.testing.assert_close(cn, c_noise, rtol=1e-14, atol=0)
    # a scalar sigma is broadcast over the batch
    out_scalar = model(x, torch.tensor(0.5, dtype=F64))
    torch.testing.assert_close(out_scalar, x * SIGMA_DATA ** 2 / (0.25 + SIGMA_DATA ** 2))


def test_preconditioned_wrappers_reproduce_exact_gaussian_functions():
    x = MU.reshape(1, 1, 2, 2) + torch.randn(64, 1, 2, 2, dtype=F64) * 3.0
    sigma = karras_sigmas(64)
    torch.testing.assert_close(EDMDenoiser(ExactEDMNet())(x, sigma), exact_denoiser(x, sigma), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ConsistencyFunction(ExactConsistencyNet())(x, sigma), exact_consistency(x, sigma),
                               rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------ Heun / Euler

def test_heun_step_matches_exact_ode_on_grid_adjacent_levels():
    x0 = torch.randn(512, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    for n, bound in ((40, 2e-3), (80, 3e-4)):
        sig = karras_sigmas(n).tolist()
        for a, b in zip(sig[:-1], sig[1:]):
            xa = MU + x0 * math.sqrt(S ** 2 + a ** 2)
            exact = exact_flow(xa, a, b)
            got = heun_step(exact_denoiser, xa, a, b)
            rel = ((got - exact).abs().max() / (exact - MU).abs().max()).item()
            assert rel < bound, (n, a, b, rel)
    # far from sigma ~ s the grid-adjacent Heun step is essentially exact even at N = 18
    sig = karras_sigmas(18).tolist()
    for a, b in zip(sig[:-1], sig[1:]):
        if a > 4 or b < 0.03:
            xa = MU + x0 * math.sqrt(S ** 2 + a ** 2)
            exact = exact_flow(xa, a, b)
            rel = ((heun_step(exact_denoiser, xa, a, b) - exact).abs().max() / (exact - MU).abs().max()).item()
            assert rel < 1e-3, (a, b, rel)


def test_heun_per_sample_sigmas_equal_scalar_steps():
    x = MU + torch.randn(5, 4, dtype=F64)
    a = torch.tensor([80.0, 10.0, 1.0, 0.5, 0.01], dtype=F64)
    b = a * 0.7
    batched = heun_step(exact_denoiser, x, a, b)
    for i in range(5):
        single = heun_step(exact_denoiser, x[i:i + 1], a[i].item(), b[i].item())
        torch.testing.assert_close(batched[i:i + 1], single, rtol=1e-14, atol=1e-14)


def _local_errors(step, x0, a, ratio):
    xa = MU + x0 * math.sqrt(S ** 2 + a ** 2)
    b = a * ratio
    exact = exact_flow(xa, a, b)
    return ((step(exact_denoiser, xa, a, b) - exact).abs().max() / (exact - MU).abs().max()).item()


def test_heun_is_second_order_euler_first_order():
    """Local error: Heun O(h^3), Euler O(h^2); halving the step divides them by ~8 and ~4."""
    x0 = torch.randn(256, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    a = 0.6  # where the Gaussian ODE bends most (sigma ~ s)
    for h in (0.2, 0.1, 0.05):
        heun_h = _local_errors(heun_step, x0, a, 1 - h)
        heun_h2 = _local_errors(heun_step, x0, a, 1 - h / 2)
        euler_h = _local_errors(euler_step, x0, a, 1 - h)
        euler_h2 = _local_errors(euler_step, x0, a, 1 - h / 2)
        assert heun_h < euler_h / 3
        assert 6 < heun_h / heun_h2 < 10, (h, heun_h / heun_h2)
        assert 3 < euler_h / euler_h2 < 5, (h, euler_h / euler_h2)


def test_heun_nfe_and_denoiser_call_count():
    assert heun_nfe(18) == 35
    calls = []

    def counting(x, sigma):
        calls.append(sigma.clone())
        return exact_denoiser(x, sigma)

    heun_sample(counting, torch.randn(7, 4, dtype=F64), steps=18)
    assert len(calls) == 35 == heun_nfe(18)
    assert all(c.shape == (7,) for c in calls)
    # the last evaluation is the Euler step at sigma_min into sigma = 0
    torch.testing.assert_close(calls[-1], torch.full((7,), SIGMA_MIN, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(calls[0], torch.full((7,), SIGMA_MAX, dtype=F64), rtol=1e-12, atol=0)


def test_heun_sample_matches_exact_ode_solution():
    """Deterministic check: with the same noise, Heun's output -> exact ODE map, at second order."""
    noise = torch.randn(2000, 4, dtype=F64, generator=torch.Generator().manual_seed(3))
    # exact: flow from sigma_max to sigma_min, then the final Euler step to 0 is D(., sigma_min)
    ref = exact_denoiser(exact_flow(noise * SIGMA_MAX, SIGMA_MAX, SIGMA_MIN), SIGMA_MIN)
    errs = []
    for steps in (40, 80, 160):
        out = heun_sample(exact_denoiser, noise, steps=steps)
        errs.append(((out - ref).abs().max() / (ref - MU).abs().max()).item())
    assert errs[0] < 2e-2 and errs[-1] < 1e-3, errs
    for e1, e2 in zip(errs[:-1], errs[1:]):
        assert 3 < e1 / e2 < 5.5, errs  # global error O(h^2)


@pytest.mark.parametrize("steps,var_tol", [(40, 4e-2), (80, 1e-2), (160, 3e-3)])
def test_heun_sample_reproduces_gaussian_moments(steps, var_tol):
    noise = standardized_noise(20000, 4, seed=4)
    out = heun_sample(exact_denoiser, noise, steps=steps)
    # mean: off only by the sigma_max truncation, |mu| * s / sigma_max <= 0.0035 here
    torch.testing.assert_close(out.mean(0), MU, rtol=0, atol=5e-3)
    rel_var = out.var(0, unbiased=False) / S ** 2 - 1
    assert rel_var.abs().max() < var_tol, rel_var


def test_heun_sample_through_preconditioned_wrapper():
    noise = standardized_noise(4000, 4, seed=5).reshape(4000, 1, 2, 2)
    net = ExactEDMNet()
    out = heun_sample(EDMDenoiser(net, SIGMA_DATA), noise, steps=80)
    ref = heun_sample(exact_denoiser, noise, steps=80)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    assert net.calls == heun_nfe(80)


class ExactClassEDMNet(nn.Module):
    """The raw F(c_in x, c_noise, class_labels) of the exact class-conditional Gaussian denoiser."""

    def forward(self, x_in, c_noise, class_labels):
        sigma = _col((4 * c_noise).exp(), x_in)
        x = x_in * (sigma ** 2 + SIGMA_DATA ** 2).sqrt()
        c_skip, c_out, _, _ = edm_scalings(sigma, SIGMA_DATA)
        return (exact_class_denoiser(x, sigma, class_labels) - c_skip * x) / c_out


def test_class_labels_reach_the_net_and_the_sampler_lands_on_each_rows_class():
    """Class-conditional Gaussians: D(x, sigma, y) through the preconditioning is the exact conditional
    denoiser, and Heun sampling of `conditioned(D, y)` moves every row to the mean of its own class."""
    labels = torch.arange(3000) % 3
    model = EDMDenoiser(ExactClassEDMNet(), SIGMA_DATA)
    x = torch.randn(3000, 1, 2, 2, dtype=F64)
    for sigma in (0.01, 1.0, 30.0):
        torch.testing.assert_close(model(x, sigma, labels), exact_class_denoiser(x, sigma, labels),
                                   rtol=1e-9, atol=1e-9)
    assert conditioned(model, None) is model
    noise = standardized_noise(3000, 4, seed=9).reshape(3000, 1, 2, 2)
    out = heun_sample(conditioned(model, labels), noise, steps=80)
    for c in range(3):
        rows = out[labels == c].flatten(1)
        torch.testing.assert_close(rows.mean(0), CLASS_MUS[c], rtol=0, atol=0.03)
        assert (rows.var(0) / S ** 2 - 1).abs().max() < 0.1
    with pytest.raises(TypeError):
        model(x, 1.0)  # a class-conditional net refuses to run without its labels


def test_edm_loss_with_class_labels_is_the_conditional_loss():
    """At a fixed sigma the exact conditional denoiser scores the analytic loss; the same denoiser
    given other rows' labels scores far worse, so the loss really reads each row's class."""
    sigma = 1.0
    loss = EDMLoss(p_mean=math.log(sigma), p_std=0.0, sigma_data=SIGMA_DATA)
    labels = torch.arange(30000) % 3
    y = CLASS_MUS[labels].reshape(-1, 1, 2, 2) + S * torch.randn(30000, 1, 2, 2, dtype=F64,
                                                                   generator=torch.Generator().manual_seed(3))
    model = EDMDenoiser(ExactClassEDMNet(), SIGMA_DATA)
    right = loss(model, y, torch.Generator().manual_seed(4), labels).mean().item()
    wrong = loss(model, y, torch.Generator().manual_seed(4), (labels + 1) % 3).mean().item()
    assert right == pytest.approx(_analytic_weighted_loss(sigma), rel=0.03)
    assert wrong > 3 * right


# ----------------------------------------------------------------------------- consistency sampling

def _consistency_model(sigma_min):
    return ConsistencyFunction(ExactConsistencyNet(SIGMA_DATA, sigma_min), SIGMA_DATA, sigma_min)


@pytest.mark.parametrize("sigma_min", [SIGMA_MIN, 0.3])
def test_consistency_sample_one_step(sigma_min):
    model = _consistency_model(sigma_min)
    z = standardized_noise(20000, 4, seed=6)
    out = consistency_sample(model, [z], [SIGMA_MAX], sigma_min=sigma_min, clip_denoised=False)
    ref = exact_consistency(z * SIGMA_MAX, SIGMA_MAX, sigma_min=sigma_min)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.mean(0), MU, rtol=0, atol=5e-3)
    target_var = S ** 2 + sigma_min ** 2
    rel_var = out.var(0, unbiased=False) / target_var - 1
    assert rel_var.abs().max() < 1e-4, rel_var


@pytest.mark.parametrize("sigma_min", [SIGMA_MIN, 0.3])
def test_consistency_sample_two_steps_noise_injection(sigma_min):
    """x_t = x + sqrt(t^2 - sigma_min^2) z puts x (variance s^2 + sigma_min^2) on the sigma = t marginal."""
    model = _consistency_model(sigma_min)
    t = 0.5
    z0, z1 = standardized_noise(40000, 4, seed=7), standardized_noise(40000, 4, seed=8)
    # unbounded Gaussian data: no clamp to the image range [-1, 1]
    out = consistency_sample(model, [z0, z1], [SIGMA_MAX, t], sigma_min=sigma_min, clip_denoised=False)
    # closed form for these exact noises
    x = exact_consistency(z0 * SIGMA_MAX, SIGMA_MAX, sigma_min=sigma_min)
    ref = exact_consistency(x + math.sqrt(t ** 2 - sigma_min ** 2) * z1, t, sigma_min=sigma_min)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # model sees t as float32
    torch.testing.assert_close(out.mean(0), MU, rtol=0, atol=1e-2)
    target_var = S ** 2 + sigma_min ** 2
    rel_var = out.var(0, unbiased=False) / target_var - 1
    assert rel_var.abs().max() < 2e-2, rel_var
    if sigma_min > 0.1:
        # injecting t z instead (ignoring sigma_min) would inflate the variance by ~20% here
        wrong = (target_var + t ** 2) * target_var / (S ** 2 + t ** 2) / target_var - 1
        assert wrong > 0.15


def test_consistency_sample_clamps_each_prediction_before_renoising():
    """clip_denoised (the reference's default): x0 is clamped to [-1, 1], then re-noised, and the
    final prediction is clamped too; without it the first prediction's overshoot is carried along."""
    calls = []

    def model(x, t):
        calls.append((x.clone(), t.clone()))
        return 3.0 * x if t[0] > 10 else x  # an overshooting first prediction, then the identity

    z0 = torch.full((4, 2), 0.5, dtype=F64)
    z1 = torch.tensor([[1.0, -1.0]] * 4, dtype=F64)
    t = 0.5
    noise_scale = math.sqrt(t ** 2 - SIGMA_MIN ** 2)
    clipped = consistency_sample(model, [z0, z1], [SIGMA_MAX, t], sigma_min=SIGMA_MIN, clip_denoised=True)
    x_renoised = calls[1][0]
    # 3 * 0.5 * 80 = 120 -> clamped to 1 before adding noise
    torch.testing.assert_close(x_renoised, 1.0 + noise_scale * z1)
    torch.testing.assert_close(clipped, (1.0 + noise_scale * z1).clamp(-1, 1))
    calls.clear()
    raw = consistency_sample(model, [z0, z1], [SIGMA_MAX, t], sigma_min=SIGMA_MIN, clip_denoised=False)
    torch.testing.assert_close(raw, 120.0 + noise_scale * z1)


def test_consistency_sample_needs_one_noise_per_step():
    model = _consistency_model(SIGMA_MIN)
    with pytest.raises(ValueError):
        consistency_sample(model, [torch.randn(2, 4, dtype=F64)], [80.0, 1.0])


# --------------------------------------------------------------------------- stochastic EDM sampler

def _heun_by_hand(denoiser, noise, steps):
    """Algorithm 1 written out from the step functions, the reference for bit-for-bit equality."""
    sigmas = karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX).tolist() + [0.0]
    x = noise * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = heun_step(denoiser, x, s, s_next) if s_next > 0 else euler_step(denoiser, x, s, s_next)
    return x


class _Stream:
    def __init__(self, shape, seed):
        self.g = torch.Generator().manual_seed(seed)
        self.shape = shape
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return torch.randn(self.shape, generator=self.g, dtype=F64)


def test_stochastic_sampler_without_churn_is_heun_bit_for_bit():
    noise = standardized_noise(500, 4, seed=11)
    ref = _heun_by_hand(exact_denoiser, noise, 18)
    assert torch.equal(heun_sample(exact_denoiser, noise, steps=18), ref)
    stream = _Stream((500, 4), seed=12)
    assert torch.equal(edm_sample(exact_denoiser, noise, 18, S_churn=0.0, churn_noise=stream), ref)
    assert stream.calls == 0
    # churn switched on but outside every level ([S_min, S_max] above sigma_max): the same path
    stream = _Stream((500, 4), seed=12)
    out = edm_sample(exact_denoiser, noise, 18, S_churn=40, S_min=100.0, S_max=200.0, churn_noise=stream)
    assert torch.equal(out, ref)
    assert stream.calls == 18  # drawn every step, as edm_sampler's randn_like, used only where gamma > 0


def test_stochastic_sampler_follows_edm_sampler_arithmetic():
    """One step by hand from NVlabs/edm generate.py: gamma = min(S_churn / N, sqrt 2 - 1) in [S_min, S_max],
    t_hat = (1 + gamma) t, x_hat = x + sqrt(t_hat^2 - t^2) S_noise eps, then Heun from t_hat to t_next."""
    steps, churn, s_noise = 4, 1.0, 1.007
    noise = standardized_noise(64, 4, seed=13)
    eps = [torch.randn(64, 4, dtype=F64, generator=torch.Generator().manual_seed(20 + k)) for k in range(steps)]
    it = iter(eps)
    out = edm_sample(exact_denoiser, noise, steps, S_churn=churn, S_min=0.0, S_max=float("inf"), S_noise=s_noise,
                     churn_noise=lambda: next(it))
    t = karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX).tolist() + [0.0]
    gamma = min(churn / steps, math.sqrt(2) - 1)
    x = noise * t[0]
    for i in range(steps):
        t_hat = t[i] * (1 + gamma)
        x_hat = x + math.sqrt(t_hat ** 2 - t[i] ** 2) * s_noise * eps[i]
        d = (x_hat - exact_denoiser(x_hat, t_hat)) / t_hat
        x = x_hat + (t[i + 1] - t_hat) * d
        if i < steps - 1:
            d2 = (x - exact_denoiser(x, t[i + 1])) / t[i + 1]
            x = x_hat + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * d2)
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)
    assert gamma == 0.25 and min(80 / steps, math.sqrt(2) - 1) == pytest.approx(0.41421356)  # the cap


@pytest.mark.parametrize("churn,s_min,s_max,s_noise", [(40, 0.05, 50.0, 1.003), (80, 0.0, float("inf"), 1.0)])
def test_stochastic_sampler_reproduces_gaussian_moments(churn, s_min, s_max, s_noise):
    """With the exact denoiser, churned sampling lands on N(mu, s^2): the noise added at sigma moves x to
    the sigma_hat marginal exactly, and only the larger Heun steps' discretisation error is left, an
    excess variance that shrinks as the step count grows (measured: ~5% at 80 steps, <1% at 320)."""
    n = 20000
    noise = standardized_noise(n, 4, seed=14)
    excess = {}
    for steps in (80, 320):
        out = edm_sample(exact_denoiser, noise, steps, S_churn=churn, S_min=s_min, S_max=s_max, S_noise=s_noise,
                         churn_noise=_Stream((n, 4), seed=15))
        torch.testing.assert_close(out.mean(0), MU, rtol=0, atol=1.5e-2)
        excess[steps] = out.var(0, unbiased=False) / S ** 2 - 1
        assert not torch.equal(out, heun_sample(exact_denoiser, noise, steps=steps))
    assert excess[320].abs().max() < 3e-2, excess
    assert excess[320].mean() < excess[80].mean(), excess


def test_stochastic_sampler_needs_a_noise_source():
    with pytest.raises(ValueError, match="noise source"):
        edm_sample(exact_denoiser, torch.randn(2, 4, dtype=F64), 4, S_churn=10)


# ------------------------------------------------------------------------------------------ EDM loss

def test_edm_loss_weight_formula():
    loss = EDMLoss(sigma_data=SIGMA_DATA)
    for s in SIGMAS.tolist():
        w = loss.weight(torch.tensor(s, dtype=F64)).item()
        assert w == pytest.approx((s ** 2 + SIGMA_DATA ** 2) / (s * SIGMA_DATA) ** 2, rel=1e-12)
    # lambda(sigma) = 1 / c_out(sigma)^2
    _, c_out, _, _ = edm_scalings(SIGMAS, SIGMA_DATA)
    torch.testing.assert_close(loss.weight(SIGMAS), 1 / c_out ** 2)


def _gaussian_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return MU.reshape(1, 1, 2, 2) + S * torch.randn(n, 1, 2, 2, dtype=F64, generator=g)


def _analytic_weighted_loss(sigma, sd=SIGMA_DATA, s=S):
    """lambda(sigma) * per-dim error variance s^2 sigma^2 / (s^2 + sigma^2) of the optimal denoiser."""
    lam = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    return lam * s ** 2 * sigma ** 2 / (s ** 2 + sigma ** 2)


@pytest.mark.parametrize("sigma", [0.02, 0.3, 1.0, 10.0])
def test_edm_loss_fixed_sigma_matches_analytic_expectation(sigma):
    loss = EDMLoss(p_mean=math.log(sigma), p_std=0.0, sigma_data=SIGMA_DATA)
    y = _gaussian_batch(40000, seed=10)
    per_sample = loss(exact_denoiser, y, torch.Generator().manual_seed(11))
    assert per_sample.shape == (40000,)
    expected = _analytic_weighted_loss(sigma)
    # per-sample value is expected * chi2_4 / 4: relative std 1/sqrt(2 * 40000) ~ 0.35%
    assert per_sample.mean().item() == pytest.approx(expected, rel=0.02)
    # and the spread is that of a scaled chi^2 with 4 degrees of freedom
    assert per_sample.var().item() == pytest.approx(expected ** 2 / 2, rel=0.08)


def test_edm_loss_lognormal_sigma_matches_quadrature():
    """Default p_mean/p_std: E_sigma[lambda * err] by Gauss-Hermite quadrature over ln sigma."""
    loss = EDMLoss(sigma_data=SIGMA_DATA)
    y = _gaussian_batch(40000, seed=12)
    mc = loss(exact_denoiser, y, torch.Generator().manual_seed(13)).mean().item()
    import numpy as np
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    sig = np.exp(loss.p_mean + loss.p_std * nodes)
    expected = float((weights * _analytic_weighted_loss(sig)).sum() / weights.sum())
    assert mc == pytest.approx(expected, rel=0.02)


def test_edm_loss_through_preconditioned_exact_net_and_determinism():
    loss = EDMLoss(sigma_data=SIGMA_DATA)
    y = _gaussian_batch(256, seed=14)
    model = EDMDenoiser(ExactEDMNet(), SIGMA_DATA)
    a = loss(model, y, torch.Generator().manual_seed(5))
    b = loss(model, y, torch.Generator().manual_seed(5))
    c = loss(model, y, torch.Generator().manual_seed(6))
    d = loss(exact_denoiser, y, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(a, d, rtol=1e-9, atol=1e-12)


def test_edm_loss_unit_at_every_sigma_when_s_equals_sigma_data():
    """EDM's design point: for s = sigma_data the optimal denoiser's weighted loss is 1 at all sigma."""
    for sigma in (0.01, 0.5, 50.0):
        assert _analytic_weighted_loss(sigma, sd=0.5, s=0.5) == pytest.approx(1.0, rel=1e-12)


def test_batch_noise_rows_do_not_depend_on_the_split():
    """Row i of a global batch gets the same draws whether it is computed alone, in a half or whole."""
    from pipeline.diffusion.noise import BatchNoise, step_seed

    def draws(lo, hi):
        g = torch.Generator().manual_seed(step_seed(3, 17))
        noise = BatchNoise(g, 8, lo, hi)
        return noise.randint(40), noise.randn((1, 2, 2))

    whole_n, whole_z = draws(0, 8)
    for lo, hi in ((0, 4), (4, 8), (6, 8), (5, 6)):
        n, z = draws(lo, hi)
        assert torch.equal(n, whole_n[lo:hi]) and torch.equal(z, whole_z[lo:hi])
    assert step_seed(3, 17) != step_seed(3, 18) and step_seed(3, 17) != step_seed(4, 17)
    assert 0 <= step_seed(2**31, 10**9) < 2**63
    with pytest.raises(ValueError, match="do not lie"):
        BatchNoise(None, 4, 2, 6)
    with pytest.raises(ValueError, match="noise for 2 rows, batch of 3"):
        BatchNoise.of(BatchNoise(None, 4, 0, 2), 3, "cpu")
