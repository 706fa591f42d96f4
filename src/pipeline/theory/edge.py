"""The edge-of-memorization laboratory (Pai et al., "On the Edge of Memorization in Diffusion Models",
../shared/reference/003_...; their code DruvPai/diffusion_mem_gen@608e838 with diffusionlab 3.0.4).

Data are k Gaussian modes with shared isotropic variance sigma0^2; the denoisers are mixtures of K
components with one shared variance v and priors 1/K (`models/gmm.py:123-162`,
`IsoHomGMMSharedParametersEstimator`; the posterior mean of `diffusionlab/distributions/gmm/
iso_hom_gmm.py:191-250`). K is the model's size: K = n with v = 0 is the memorizer (the empirical
distribution), K random training points with v = 0 a partial memorizer, the true modes with v = sigma0^2
the generalizer. The study's hypothesis: a model of size K trained by gradient descent memorizes when
the partial memorizer's weighted training loss is below the generalizer's, so the crossover of the two
losses predicts the size at which memorization wins.

The forward process is diffusionlab's (`dynamics.py:133`): x_t = alpha x0 + sigma eps with
alpha = sqrt(1 - t^2), sigma = t, SNR psi = alpha^2 / sigma^2.

Losses here are in x0 units (E ||x0_hat - x0||^2 summed over coordinates), uniform over a time grid.
Upstream trains and evaluates in eps units with weight 1 over its grid of 26 times in [0.001, 0.999]
(`experiments/gmm/shared_gmm/varying_model_size/run_experiment.py:31-34`, the grid
`common/orchestrate.py:81`, `common/train.py:146`, `common/evaluate.py:117-125`), i.e. x0-unit losses
weighted by psi (`loss/loss_scaling.py`, X0 to EPS: (alpha / sigma)^2). There the t = 0.001 term
(psi = 1e6) outweighs the rest by orders of magnitude, and
upstream's own formulas (c = 1, below) cross at K/n = 1 - sum_t psi/(1 + psi) / sum_t psi
= 1 - 1.7e-5 (`analytic_excess(..., weight=snr(times))`; tests/test_edge.py), outside any model size
at upstream's n <= 200; in x0 units every time on the grid counts alike and the crossover is inside
(0, n). The same weighting trains the models and predicts their crossover.

Crossover formulas (losses in excess of the memorizer, whose training loss is ~0 where points are
resolvable, psi * d * sigma0^2 >> log n):
  generalizer   d sigma0^2 / (1 + psi sigma0^2)   (`loss/loss_approximations.py:10-27`: the posterior
                variance of a correctly identified mode)
  partial mem.  c d sigma0^2 (1 - K/n)            (the same file, lines 30-46, with c = 1)
Equal losses give
  K*/n = 1 - <d sigma0^2 / (1 + psi sigma0^2)>_t / (c d sigma0^2) = 1 - <1 / (1 + psi sigma0^2)>_t / c,
which for any constant c depends on sigma0 and the time grid only, not on d, k or n: both closed
forms below predict the same K*/n for every case of a config (0.872 and 0.745 on t in [0.1, 0.8]).

c = 2 is an asymptotic argument, not a measurement. The n - K training points a partial memorizer
lacks are each denoised onto another training point of their mode, at squared distance 2 d sigma0^2
(two independent draws), once psi * sqrt(d) >> 1 makes the posterior weights collapse onto one point
and d is large enough that all kept points of a mode are equally far: c -> 2 as d -> infinity.
Upstream's c = 1 is the cost of mapping them onto their mode's mean instead, which no memorizer does.
At finite d the nearest kept point of a mode is closer than 2 d sigma0^2 by O(sqrt(6 d)) sigma0^2, more
so the more points are kept, and at large t the posterior weights spread over several points: both
lower c. Measured (brute-force excess per missing point, d sigma0^2 units, t in [0.1, 0.8], 64 noise
draws, 4 subsets, seeds 0-2): at d = 30, k = 3, n = 60 it is 1.48-1.61 at K/n = 0.2 and falls as K
grows (not strictly in every seed), to 1.14-1.30 at K/n = 0.95; at d = 400, k = 2, n = 20 it is
1.78-1.93 at every time of the grid. So the c = 2 formula overestimates K* at these d (0.872 against
a brute-force 0.80-0.81 at d = 30; at d = 400 within 0.01 for t <= 0.4 and 0.025-0.032 at t = 0.8,
tests/test_edge.py), and upstream's c = 1 underestimates it. The lab therefore also fits the charge
from its own brute-force losses
(`empirical_charge`: the excess pooled over every size K < n per missing point) and reports the K*/n
that the closed form predicts with it, beside both constants (config/embedded-edge.yaml, seeds 0-2:
c = 1.38 ± 0.05 for the Gaussian case and 1.62 ± 0.03 for the digit templates, K*/n 0.815 and 0.842
against brute-force 0.803 and 0.831; a little high because the pooled charge weights the small sizes,
where a missing point costs more). The lab's prediction of record remains
the crossing of the brute-force losses (common noise draws, averaged over random K-subsets).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from .edge_formula import (CHARGE_NEAREST_POINT, CHARGE_UPSTREAM, alpha_sigma, analytic_excess, crossing,
                           empirical_charge, time_grid)

log = logging.getLogger(__name__)


def mode_means(case: dict, rng: np.random.Generator) -> np.ndarray:
    """The k true means, each of norm sqrt(d) (`experiments/gmm/.../common/orchestrate.py:65-69`).

    `gaussian`: random directions in d dimensions, as upstream. `digit_templates`: the class-mean images
    of scikit-learn's 8x8 digits (d = 64), centred on their average and scaled to norm sqrt(d): modes
    with an image's structure and much smaller separations than random directions (the study's
    "image-like structured data", here without a download)."""
    k = case["k"]
    if case["data"] == "gaussian":
        d = case["d"]
        means = rng.standard_normal((k, d))
    elif case["data"] == "digit_templates":
        from ..data.sources import _sklearn_digits

        pixels, labels = _sklearn_digits()
        classes = case.get("classes", list(range(k)))
        if len(classes) != k:
            raise ValueError(f"digit_templates: {len(classes)} classes for k = {k}")
        means = np.stack([pixels[labels == c].reshape(-1, 64).mean(0) for c in classes])
        means = means - means.mean(0)
        d = means.shape[1]
    else:
        raise ValueError(f"unknown edge data {case['data']!r}: gaussian or digit_templates")
    return means / np.linalg.norm(means, axis=1, keepdims=True) * math.sqrt(d)


def draw_data(case: dict, seed: int) -> dict:
    """Means, n training points and their modes: x = mu_y + sigma0 z, y uniform (priors 1/k)."""
    rng = np.random.default_rng([seed, 0])
    means = mode_means(case, rng)
    labels = rng.integers(0, case["k"], size=case["n"])
    train = means[labels] + case["sigma0"] * rng.standard_normal((case["n"], means.shape[1]))
    return {"means": means, "train": train, "labels": labels}


def posterior_mean(xt: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, means: torch.Tensor,
                   var: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t] under a mixture of N(mu_k, var I) with equal priors.

    xt: (T, m, d) with alpha, sigma: (T,); means (K, d); var a scalar tensor (0 = point masses).
    w_k = softmax(-||x_t - alpha mu_k||^2 / 2 v_t), v_t = alpha^2 var + sigma^2, and
    x0_hat = sum_k w_k [mu_k + alpha var (x_t - alpha mu_k) / v_t] = (sigma^2 / v_t) sum_k w_k mu_k
    + (alpha var / v_t) x_t (iso_hom_gmm.py:222-248; equal log-determinants cancel in the softmax)."""
    a, s2 = alpha[:, None, None], (sigma ** 2)[:, None, None]
    vt = a ** 2 * var + s2
    # ||x - a mu||^2 without materialising (T, m, K, d): the matmul form
    sq = (xt ** 2).sum(-1, keepdim=True) - 2 * a * xt @ means.T + a ** 2 * (means ** 2).sum(-1)
    w = torch.softmax(-sq / (2 * vt), dim=-1)
    return (s2 / vt) * (w @ means) + (a * var / vt) * xt


def denoising_loss(points: torch.Tensor, times: np.ndarray, noise: torch.Tensor, means: torch.Tensor,
                   var: torch.Tensor) -> torch.Tensor:
    """Per-time training loss in x0 units: mean over points and noise draws of ||x0_hat - x0||^2.

    points (n, d); noise (T, n, R, d) standard normal. Returns (T,)."""
    alpha, sigma = (torch.as_tensor(v, dtype=points.dtype) for v in alpha_sigma(times))
    T, n, R, d = noise.shape
    xt = alpha[:, None, None, None] * points[None, :, None, :] + sigma[:, None, None, None] * noise
    x0 = posterior_mean(xt.reshape(T, n * R, d), alpha, sigma, means, var).reshape(T, n, R, d)
    return ((x0 - points[None, :, None, :]) ** 2).sum(-1).mean((1, 2))


def brute_force_losses(data: dict, case: dict, times: np.ndarray, sizes, draws: int, subsets: int,
                       seed: int) -> dict:
    """Monte-Carlo training losses (common noise draws) of the generalizer, the memorizer, and partial
    memorizers on `subsets` random K-subsets of the training points for every K in `sizes`."""
    rng = np.random.default_rng([seed, 1])
    train = torch.as_tensor(data["train"])
    gen = torch.tensor(float(case["sigma0"] ** 2), dtype=train.dtype)
    zero = torch.zeros((), dtype=train.dtype)
    noise = torch.as_tensor(rng.standard_normal((len(times), *train.shape[:1], draws, train.shape[1])))
    with torch.no_grad():
        out = {"generalizer_t": denoising_loss(train, times, noise, torch.as_tensor(data["means"]), gen).numpy(),
               "memorizer_t": denoising_loss(train, times, noise, train, zero).numpy()}
        partial = np.zeros((len(sizes), subsets, len(times)))
        for i, K in enumerate(sizes):
            if K == case["n"]:  # every subset is the training set: the memorizer
                partial[i] = out["memorizer_t"]
                continue
            for s in range(subsets):
                keep = torch.as_tensor(np.sort(rng.choice(case["n"], size=int(K), replace=False)))
                partial[i, s] = denoising_loss(train, times, noise, train[keep], zero).numpy()
    out["partial_t"] = partial
    out["generalizer"] = float(out["generalizer_t"].mean())
    out["memorizer"] = float(out["memorizer_t"].mean())
    out["partial"] = partial.mean(-1)  # (sizes, subsets)
    out["crossover"] = crossing(np.asarray(sizes) / case["n"], out["partial"].mean(1) - out["generalizer"])
    return out


def ddim_sample(means: torch.Tensor, var: torch.Tensor, count: int, times: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic DDIM from x ~ N(0, I) at the first (largest) time down the grid, returning x at the
    last time (diffusionlab `samplers.py:590-593` with use_stochastic_sampler = False, as
    `experiments/gmm/.../common/train.py:162-168`)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(count, means.shape[1], generator=gen, dtype=means.dtype)
    alpha, sigma = (torch.as_tensor(v, dtype=means.dtype) for v in alpha_sigma(times))
    with torch.no_grad():
        for i in range(len(times) - 1):
            x0 = posterior_mean(x[None], alpha[i:i + 1], sigma[i:i + 1], means, var)[0]
            ratio = sigma[i + 1] / sigma[i]
            x = ratio * x + (alpha[i + 1] - alpha[i] * ratio) * x0
    return x.numpy()


def memorized_share(samples: np.ndarray, train: np.ndarray, ratio: float | None = None) -> float:
    """The share of samples whose nearest training point is closer than `ratio` times the second nearest
    (the L2 ratio criterion of the whole pipeline, `memorization.l2_ratio_memorized`)."""
    from ..memorization import DEFAULT_RATIO, l2_ratio_memorized

    from scipy.spatial.distance import cdist

    d = np.partition(cdist(samples, train), 1, axis=1)  # the two nearest first, in order
    return float(l2_ratio_memorized(d[:, 0], d[:, 1], DEFAULT_RATIO if ratio is None else ratio).mean())


def train_mixture(data: dict, K: int, times: np.ndarray, spec: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Gradient descent on K means and the shared log-variance from upstream's PMEM start (the means on K
    random training points, v = 1e-6: `models/gmm.py:86-117`), full batch, fresh noise each step, Adam
    with a linear decay of the learning rate (upstream: 50,000 steps of Adam at 1e-3 with a warm-up and
    a linear decay, `optim/wsd.py`; a larger rate and fewer steps here, the same objective)."""
    rng = np.random.default_rng([seed, 2, K])
    train = torch.as_tensor(data["train"])
    keep = rng.choice(len(train), size=K, replace=False)
    means = torch.nn.Parameter(train[torch.as_tensor(keep)].clone())
    log_var = torch.nn.Parameter(torch.tensor(math.log(spec.get("init_var", 1e-6)), dtype=train.dtype))
    opt = torch.optim.Adam([means, log_var], lr=spec["lr"])
    steps = spec["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    history = []
    for step in range(steps):
        noise = torch.randn(len(times), len(train), spec["noise_draws"], train.shape[1], generator=gen,
                            dtype=train.dtype)
        loss = denoising_loss(train, times, noise, means, log_var.exp()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % max(steps // 10, 1) == 0 or step == steps - 1:
            history.append((step, loss.item(), log_var.exp().item()))
    return means.detach(), log_var.detach().exp(), history


def run_case(case: dict, spec: dict, seed: int) -> dict:
    """One lab: data, brute-force losses, both formulas and the one with the fitted charge, and a model trained at every size, with the
    share of its DDIM samples that copy a training point; the memorizer and fresh draws of the true
    mixture as the yardsticks of that share."""
    data = draw_data(case, seed)
    times, sample_times = time_grid(spec["times"]), time_grid(spec["sample_times"])
    sizes = sorted({max(1, round(f * case["n"])) for f in spec["size_fractions"]})
    log.info("edge lab: d=%d k=%d n=%d, sizes %s, seed %d", data["train"].shape[1], case["k"], case["n"], sizes, seed)
    mc = brute_force_losses(data, case, times, sizes, spec["noise_draws"], spec["subsets"], seed)
    train = torch.as_tensor(data["train"])
    eval_noise = torch.as_tensor(np.random.default_rng([seed, 3]).standard_normal(
        (len(times), case["n"], spec["noise_draws"], train.shape[1])))
    trained_loss, trained_var, trained_mem = [], [], []
    for K in sizes:
        means, var, history = train_mixture(data, K, times, spec["train"], seed)
        with torch.no_grad():
            trained_loss.append(float(denoising_loss(train, times, eval_noise, means, var).mean()))
        samples = ddim_sample(means, var, spec["samples"], sample_times, seed)
        trained_var.append(float(var))
        trained_mem.append(memorized_share(samples, data["train"]))
        log.info("K=%d: loss %.3f (start %.3f), v %.3g, memorized %.2f", K, trained_loss[-1], history[0][1],
                 trained_var[-1], trained_mem[-1])
    rng = np.random.default_rng([seed, 4])
    fresh = data["means"][rng.integers(0, case["k"], spec["samples"])] + case["sigma0"] * rng.standard_normal(
        (spec["samples"], train.shape[1]))
    memorizer = ddim_sample(train, torch.zeros((), dtype=train.dtype), spec["samples"], sample_times, seed)
    d = data["train"].shape[1]
    upstream = analytic_excess(d, case["sigma0"], case["n"], times, sizes, CHARGE_UPSTREAM)
    nearest = analytic_excess(d, case["sigma0"], case["n"], times, sizes, CHARGE_NEAREST_POINT)
    frac = np.asarray(sizes, dtype=np.float64) / case["n"]
    charge = empirical_charge(frac, mc["partial"].mean(1), mc["memorizer"], d, case["sigma0"])
    fitted = analytic_excess(d, case["sigma0"], case["n"], times, sizes, charge)
    return {
        "sizes": np.asarray(sizes), "fractions": frac, "times": times, "d": d, "sigma0": case["sigma0"],
        "mc_generalizer": mc["generalizer"], "mc_memorizer": mc["memorizer"], "mc_partial": mc["partial"],
        "mc_generalizer_t": mc["generalizer_t"], "mc_memorizer_t": mc["memorizer_t"], "mc_partial_t": mc["partial_t"],
        "mc_crossover": mc["crossover"], "formula_crossover": nearest["crossover"],
        "upstream_crossover": upstream["crossover"], "formula_generalizer": nearest["generalizer"],
        "empirical_charge": charge, "empirical_crossover": fitted["crossover"],
        "trained_loss": np.asarray(trained_loss), "trained_var": np.asarray(trained_var),
        "trained_memorized": np.asarray(trained_mem),
        "measured_transition": crossing(frac, 0.5 - np.asarray(trained_mem)),
        "memorizer_memorized": memorized_share(memorizer, data["train"]),
        "fresh_memorized": memorized_share(fresh, data["train"]),
    }


def write_lab(case: dict, spec: dict, seed: int, out) -> dict:
    """run_case to an .npz (atomically)."""
    from ..io import atomic_output

    result = run_case(case, spec, seed)
    with atomic_output(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **result)
    return result
