"""The edge-of-memorization laboratory (src/pipeline/theory/edge.py): the mixture denoiser against the
closed-form Gaussian posterior mean, the brute-force losses against the crossover formulas in high
dimension, DDIM from a memorizer, and one tiny lab end to end with its report."""
import math

import numpy as np
import pytest
import torch

from pipeline.theory import edge

F64 = torch.float64


def test_one_component_posterior_mean_is_the_gaussian_one():
    """K = 1: E[x0 | x_t] = mu + alpha v (x_t - alpha mu) / (alpha^2 v + sigma^2) exactly."""
    rng = np.random.default_rng(0)
    mu, v, t = rng.standard_normal(5), 0.7, np.array([0.3, 0.9])
    alpha, sigma = edge.alpha_sigma(t)
    xt = rng.standard_normal((2, 4, 5))
    got = edge.posterior_mean(torch.as_tensor(xt), torch.as_tensor(alpha), torch.as_tensor(sigma),
                              torch.as_tensor(mu[None]), torch.tensor(v, dtype=F64)).numpy()
    a, s2 = alpha[:, None, None], sigma[:, None, None] ** 2
    assert np.allclose(got, mu + a * v * (xt - a * mu) / (a ** 2 * v + s2), atol=1e-12)


def test_point_masses_pick_the_nearest_point_at_low_noise():
    points = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=F64)
    xt = torch.tensor([[[9.0, 1.0], [1.0, -1.0]]], dtype=F64)
    alpha, sigma = (torch.as_tensor(v) for v in edge.alpha_sigma(np.array([0.01])))
    out = edge.posterior_mean(xt, alpha, sigma, points, torch.zeros((), dtype=F64))
    assert torch.allclose(out[0], points[[1, 0]], atol=1e-9)


def test_crossing_interpolates_the_sign_change():
    x = np.array([0.2, 0.4, 0.6, 0.8])
    assert edge.crossing(x, np.array([3.0, 1.0, -1.0, -2.0])) == pytest.approx(0.5)
    assert edge.crossing(x, np.array([-1.0, 1.0, 2.0, 3.0])) == 0.2
    assert math.isnan(edge.crossing(x, np.array([3.0, 2.0, 1.0, 0.5])))


def test_crossover_formula_agrees_with_brute_force_losses_in_high_dimension():
    """d = 400, one time (t = 0.36, psi = 6.7): the generalizer's loss is d sigma0^2 / (1 + psi sigma0^2)
    and the memorizer's ~0; the partial memorizer's n - K missing points each cost ~2 d sigma0^2, so
    the nearest-point formula's K*/n matches the brute-force crossing, and upstream's (c = 1) does not."""
    case = {"data": "gaussian", "d": 400, "k": 2, "n": 20, "sigma0": 1.0}
    times = np.array([0.36])
    sizes = list(range(2, 21, 2))
    data = edge.draw_data(case, 0)
    mc = edge.brute_force_losses(data, case, times, sizes, draws=16, subsets=3, seed=0)
    nearest = edge.analytic_excess(400, 1.0, 20, times, sizes, edge.CHARGE_NEAREST_POINT)
    upstream = edge.analytic_excess(400, 1.0, 20, times, sizes, edge.CHARGE_UPSTREAM)
    assert mc["generalizer"] == pytest.approx(nearest["generalizer"], rel=0.02)
    assert mc["memorizer"] < 1e-6 * mc["generalizer"]
    # the per-point charge of the brute-force partial memorizers, K >= 6 (each mode kept): 2 less the
    # nearest of the kept points' head start, O(sqrt(6 / d)) = 0.12 relative here
    frac = np.asarray(sizes) / 20
    excess = mc["partial"].mean(1) - mc["memorizer"]
    charge = excess[2:-1] / (400 * (1 - frac[2:-1]))
    assert np.all((charge > 1.75) & (charge < 2.0)), charge
    assert abs(mc["crossover"] - nearest["crossover"]) < 0.01
    assert abs(mc["crossover"] - upstream["crossover"]) > 0.04


def test_ddim_from_the_memorizer_copies_training_points():
    """K = n, v = 0 is the empirical distribution: its DDIM samples land on training points (the copy
    share's upper yardstick); fresh draws of the mixture copy none."""
    case = {"data": "gaussian", "d": 10, "k": 2, "n": 12, "sigma0": 1.0}
    data = edge.draw_data(case, 1)
    times = edge.time_grid({"min": 0.001, "max": 0.999, "num": 26})
    samples = edge.ddim_sample(torch.as_tensor(data["train"]), torch.zeros((), dtype=F64), 40, times, 0)
    assert edge.memorized_share(samples, data["train"]) == 1.0
    fresh = data["means"][[0, 1] * 20] + np.random.default_rng(5).standard_normal((40, 10))
    assert edge.memorized_share(fresh, data["train"]) < 0.1


def test_digit_templates_are_the_class_means_at_norm_sqrt_d():
    means = edge.mode_means({"data": "digit_templates", "k": 3, "classes": [0, 1, 7]}, np.random.default_rng(0))
    assert means.shape == (3, 64)
    assert np.allclose(np.linalg.norm(means, axis=1), 8.0)
    assert np.corrcoef(means)[0, 1] < 0.5  # distinct templates


def test_tiny_lab_and_report(tmp_path):
    """A lab of three sizes trains, samples and writes its file; the report reads two seeds into a figure
    and a table with the predicted and measured sizes and both yardsticks."""
    from pipeline.theory.edge_report import write_edge_report

    case = {"data": "gaussian", "d": 8, "k": 2, "n": 12, "sigma0": 1.0}
    spec = {"times": {"min": 0.1, "max": 0.8, "num": 4}, "sample_times": {"min": 0.001, "max": 0.999, "num": 26},
            "size_fractions": [0.25, 0.5, 1.0], "noise_draws": 8, "subsets": 2, "samples": 30,
            "train": {"steps": 40, "lr": 0.05, "noise_draws": 2}}
    paths = []
    for seed in (0, 1):
        path = tmp_path / "lab" / "gaussian" / f"seed-{seed}.npz"
        result = edge.write_lab(case, spec, seed, path)
        paths.append(path)
        assert list(result["sizes"]) == [3, 6, 12]
        assert result["memorizer_memorized"] == 1.0 and result["fresh_memorized"] < 0.2
        assert result["trained_loss"].shape == (3,) and np.all(result["trained_var"] > 0)
        # gradient descent from the partial memorizer never ends above where it started
        assert np.all(result["trained_loss"] <= result["mc_partial"].mean(1) + 1e-6 + 0.2 * result["mc_generalizer"])
    rows = write_edge_report(paths, tmp_path / "crossover.png", tmp_path / "crossover.md")
    assert rows[0]["case"] == "gaussian" and rows[0]["seeds"] == 2
    md = (tmp_path / "crossover.md").read_text()
    assert "| gaussian | 8 | 12 | 2 |" in md and "copy share: memorizer" in md
    assert (tmp_path / "crossover.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
