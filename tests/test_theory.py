"""The random-feature model of Section 5 (pipeline.theory.random_features) on small sizes."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.theory import random_features as rf

SMALL = rf.Setup(d=10, p=60, n=20, t=0.1, h=0.01, noise_draws=32, seed=0)


@pytest.fixture(scope="module")
def model() -> rf.Model:
    return rf.draw(SMALL)


def test_teacher_curvature_is_symmetric_psd_and_the_loss_hessian(model):
    """U is the Hessian of the DSM loss in each row of A (times 2 Delta_t / (p d)): checked by finite
    differences of the loss itself, which is quadratic, so the differences are exact up to rounding."""
    U = model.U
    assert np.array_equal(U, U.T) and np.linalg.eigvalsh(U)[0] > 0
    eps, row, idx = 1e-3, 3, [0, 7, 21, 59]
    base = np.zeros((SMALL.d, SMALL.p))
    f0 = rf.dsm_loss(model, base)

    def bump(*cols):
        A = base.copy()
        for c in cols:
            A[row, c] += eps
        return rf.dsm_loss(model, A)

    fd = np.array([[(bump(a, b) - bump(a) - bump(b) + f0) / eps ** 2 for b in idx] for a in idx])
    expected = rf.teacher_curvature_scale(SMALL) * U[np.ix_(idx, idx)]
    np.testing.assert_allclose(fd, expected, rtol=1e-4, atol=1e-9)


def test_closed_form_teacher_has_zero_gradient_and_gradient_descent_reaches_it(model):
    A = rf.closed_form_teacher(model)
    scale = np.abs(rf.dsm_gradient(model, np.zeros_like(A))).max()
    assert np.abs(rf.dsm_gradient(model, A)).max() < 1e-12 * scale
    trained = rf.gradient_descent_teacher(model, steps=10000)
    assert rf.dsm_loss(model, A) <= rf.dsm_loss(model, trained) < rf.dsm_loss(model, A) + 1e-3
    assert np.linalg.norm(trained - A) / np.linalg.norm(A) < 0.1


def test_the_euler_step_moves_noisy_points_towards_the_data_by_the_teachers_score(model):
    A = rf.closed_form_teacher(model)
    x_t = rf.noisy(SMALL, model.X, model.eta[0])
    step = rf.euler_step(model, A, x_t) - x_t
    np.testing.assert_allclose(step, SMALL.h * (x_t + rf.score(model, A, x_t)))
    # the memorizing teacher's score at x_t points back towards its own clean training point
    towards = np.sum(rf.score(model, A, x_t) * (np.exp(-SMALL.t) * model.X - x_t), axis=1)
    assert np.mean(towards > 0) > 0.9


def test_theorem_curvature_has_the_isotropic_atom_with_multiplicity_at_least_p_minus_d(model):
    """The structured part of Theorem 5.3's C lies in range(W): rho is an eigenvalue at least p - d times,
    so at least p - n times whenever n >= d (the study's statement for p > n)."""
    A = rf.closed_form_teacher(model)
    cd = rf.cd_curvature(model, A, samples=4000)
    assert cd.rho > 0 and 0 < cd.kappa < 1
    assert SMALL.p > SMALL.n >= SMALL.d
    for ridge in (0.0, 0.1):
        eig = np.linalg.eigvalsh(rf.theorem_curvature(model, cd.kappa, cd.rho, ridge))
        multiplicity = np.sum(np.isclose(eig, cd.rho, rtol=1e-8, atol=0))
        assert multiplicity >= SMALL.p - SMALL.d >= SMALL.p - SMALL.n


def test_lemma_decomposition_approaches_the_simulated_curvature_as_sizes_grow():
    """Lemma 5.1 is a Gaussian-equivalence statement: its relative error on the directly simulated C
    shrinks with d at fixed ratios (measured 0.30, 0.24, 0.16 at d = 10, 20, 40)."""
    errors = []
    for d in (10, 40):
        setup = rf.Setup(d=d, p=6 * d, n=2 * d, t=0.1, h=0.01, noise_draws=32, seed=0)
        m = rf.draw(setup)
        cd = rf.cd_curvature(m, rf.closed_form_teacher(m), samples=40 * setup.p)
        errors.append(np.linalg.norm(rf.lemma_curvature(m, cd) - cd.C) / np.linalg.norm(cd.C))
    assert errors[1] < 0.8 * errors[0] and errors[1] < 0.25


def test_gaussian_constant_and_gen_share():
    assert rf.mu1() == pytest.approx(0.6057, abs=1e-4)  # E[tanh'(g)], g ~ N(0, 1)
    response = rf.ModeResponse(np.array([0.1, 0.2, 5.0, 6.0]), np.array([1.0, 1.0, 4.0, 5.0]),
                               np.array([0.5, 2.0, 1.0, 1.0]))
    assert rf.gen_share(response, threshold=1.0) == pytest.approx((3.0 + 4.0) / (0.5 + 3.0 + 4.0))


def test_mode_response_is_the_structured_curvature_along_each_teacher_mode(model):
    """s_k = v_k - r_k equals u_k^T (C - rho I) u_k / (kappa^2 h^2) for Theorem 5.3's C, mode by mode."""
    ridge, kappa, rho = 0.05, 0.5, 1e-4
    response = rf.mode_response(model, ridge)
    lam, modes = np.linalg.eigh(model.U)
    np.testing.assert_allclose(response.eigenvalues, lam)
    C = rf.theorem_curvature(model, kappa, rho, ridge)
    along = np.einsum("ik,ij,jk->k", modes, C - rho * np.eye(SMALL.p), modes) / (kappa ** 2 * SMALL.h ** 2)
    np.testing.assert_allclose(response.signed, along, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(response.visibility, np.einsum("ik,ij,jk->k", modes, model.metric, modes))


def test_at_the_studys_ratios_ridge_selection_leaves_positive_response_to_gen_modes():
    """psi_p = 8, psi_n = 4 at d = 40: the d Gen modes sit above the widest log-gap of U; without a ridge the
    inverse curvature leaks almost all of a Gen mode's response energy into Mem modes, and every ridge
    past the chosen one (median leakage <= 0.1) keeps Mem modes near zero and gives positive response
    almost only to Gen modes (the study's Sec. 5.4 statement; measured at d = 100: Gen share 0.995)."""
    setup = rf.Setup(d=40, p=320, n=160, t=0.01, h=0.001, noise_draws=16, seed=0)
    m = rf.draw(setup)
    threshold = rf.mem_gen_threshold(np.linalg.eigvalsh(m.U), setup.d)
    response = rf.mode_response(m, 0.0)
    gen = response.eigenvalues >= threshold
    assert gen.sum() == setup.d == rf.widest_gap_modes(response.eigenvalues)
    assert response.visibility[gen].min() > 10 * response.visibility[~gen].max()
    ridges = [0.0, 0.01, 0.1, 0.3, 1.0, 3.0]
    chosen, medians = rf.select_ridge(m, ridges, tolerance=0.1, threshold=threshold)
    assert medians[0] > 0.8 and all(b <= a for a, b in zip(medians, medians[1:])) and chosen in ridges[2:]
    assert rf.select_ridge(m, ridges[:2], tolerance=0.1, threshold=threshold)[0] is None
    tuned = rf.mode_response(m, chosen)
    assert rf.gen_share(tuned, threshold) > 0.95
    assert np.abs(tuned.signed[~gen]).max() < 0.1 * np.abs(tuned.signed[gen]).max()


def test_psi_n_sweep_fewer_points_close_the_gap_and_suppress_more_gen_modes():
    """App. D.4 at d = 20 (p = 160), psi_n = 1 and 6, at one common ridge: with fewer training points
    (the more severely memorizing teacher) the gap between U's Gen and Mem modes is narrower and more
    Gen modes respond negatively (Fig. 10's statement); each psi_n's own Eq. B.17 ridge is larger at
    psi_n = 1, where it is not met within the sweep."""
    from pipeline.theory.analysis import psi_n_sweep

    spec = {"d": 20, "psi_p": 8, "psi_n": 4, "psi_n_sweep": [1, 6], "t": 0.01, "h": 0.001, "noise_draws": 16,
            "ridges": [0, 0.01, 0.1, 0.3, 1, 3], "leakage_tolerance": 0.1}
    for seed in (0, 1):
        sweep = psi_n_sweep(spec, seed, ridge=1.0)
        assert sweep["sweep_eigenvalues"].shape == (2, 160) and list(sweep["sweep_n"]) == [20, 120]
        assert list(sweep["sweep_gen_modes"]) == [20, 20]
        assert sweep["sweep_gap"][0] + 0.3 < sweep["sweep_gap"][1]
        assert sweep["sweep_gen_positive"][0] + 0.3 < sweep["sweep_gen_positive"][1]
        assert list(sweep["sweep_own_ridge"]) == [3, 1] and list(sweep["sweep_own_tolerance_met"]) == [0, 1]


def test_saddle_point_density_is_a_density_and_the_simulated_u_approaches_it():
    """The saddle-point equations (pipeline.theory.spectrum) give a density of mass 1, and the
    simulated U's Stieltjes transform at z = lambda (1 + 0.2i), that is its spectrum smoothed at 20% of
    each eigenvalue, approaches it as d doubles at fixed ratios, across the noise floor (1e-3), the
    sample bulk (1e-2, 1e-1) and the population bulk (1)."""
    from pipeline.theory import spectrum

    setup = lambda d: rf.Setup(d=d, p=8 * d, n=4 * d, t=0.01, h=0.001, noise_draws=16, seed=0)  # noqa: E731
    grid = np.geomspace(10 ** -4.5, 10 ** 1.5, 400)
    assert np.trapezoid(spectrum.density(setup(20), grid), grid) == pytest.approx(1.0, abs=0.01)
    z = np.array([1e-3, 1e-2, 1e-1, 1.0]) * (1 + 0.2j)
    errors = []
    for d in (10, 20, 40):
        eigenvalues = np.linalg.eigvalsh(rf.draw(setup(d)).U)
        simulated = np.mean(1.0 / (eigenvalues[None, :] - z[:, None]), axis=1)
        theory = spectrum.stieltjes(setup(d), z)
        errors.append(np.abs(simulated - theory) / np.abs(theory))
    errors = np.array(errors)
    assert np.all(errors[1:] < errors[:-1] + 0.01)  # no point gets worse
    assert errors[-1].mean() < 0.6 * errors[0].mean() and errors[-1][1:].max() < 0.15


def test_bridge_modes_equal_us_eigenmodes_and_the_copy_statistics_see_a_planted_relation():
    """The bridge's thin-SVD modes are U's nonzero eigenpairs whether there are fewer feature vectors
    than features or more; with copy counts that rise with an image's Mem share, Spearman is 1 and the
    AUC 1, both outside their shuffled ranges; with copy counts unrelated to it, both stay inside."""
    from pipeline.theory.bridge import analyse_features

    rng = np.random.default_rng(0)
    for n, draws, p in ((6, 3, 40), (30, 4, 20)):
        phi = rng.standard_normal((n * draws, p)) @ rng.standard_normal((p, p))
        dphi = 0.01 * rng.standard_normal(phi.shape)
        owner = np.tile(np.arange(n), draws)
        result = analyse_features(phi, dphi, owner, data_dim=4, copies=np.zeros(n, int))
        U = phi.T @ phi / len(phi)
        expected = np.sort(np.linalg.eigvalsh(U))[::-1][:min(n * draws, p)]
        np.testing.assert_allclose(result.eigenvalues, expected, rtol=1e-8)
        assert result.gen_modes == 4 and np.all((result.mem_share > 0) & (result.mem_share < 1))
    rank = np.argsort(np.argsort(result.mem_share))
    planted = analyse_features(phi, dphi, owner, data_dim=4, copies=np.where(rank >= n // 2, rank, 0))
    assert planted.spearman > planted.null_range[1] and planted.null_range[1] < 0.5
    assert planted.auc == 1.0 and planted.auc_null_range[1] < 1.0
    unrelated = analyse_features(phi, dphi, owner, data_dim=4, copies=rng.permutation(np.arange(n) % 3))
    assert unrelated.null_range[0] < unrelated.spearman < unrelated.null_range[1]


@pytest.mark.parametrize("classes", [None, 10])
def test_bridge_runs_on_a_teachers_penultimate_features(tmp_path, classes):
    """run_bridge on a random-weight tiny UNet teacher: the features are conv_out's input (TINY_UNET's
    8 channels at 8x8: p = 512), 12 images x 8 draws give 96 nonzero modes of which d = 64 are Gen,
    the copy counts come from the memorized rows only, and the table and figure are written; a
    class-conditional teacher sees each training image's class."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from pipeline.data import build_subset, load_source, write_subset
    from pipeline.diffusion import EDMDenoiser
    from pipeline.modelio import model_meta, save_model
    from pipeline.nets import build_net
    from pipeline.theory.bridge import run_bridge
    from tiny import TINY_UNET

    torch.manual_seed(0)
    net = {**TINY_UNET, "num_class_embeds": classes} if classes else TINY_UNET
    save_model(tmp_path / "teacher", EDMDenoiser(build_net(net, 8, 1)), model_meta("edm", net, 8, 1, 0.5, 0.002, 80.0),
               {"steps": 0})
    images, labels = load_source({"source": "digits", "resolution": 8})
    write_subset(tmp_path / "s.parquet", build_subset(images, labels, {"kind": "uniform", "n": 12, "seed": 0}), {})
    copies = [0, 0, 3, 0, 1, 0, 0, 0, 2, 0, 0, 0]
    nn1 = [i for i, c in enumerate(copies) for _ in range(c)] + [5, 6]
    pq.write_table(pa.table({"nn1_index": nn1, "memorized": [True] * 6 + [False, False]}), tmp_path / "nb.parquet")
    spec = {"sigma": 0.1, "noise_draws": 8, "step": 0.01, "seed": 0}
    result = run_bridge(tmp_path / "teacher", tmp_path / "s.parquet", tmp_path / "nb.parquet", spec, "tiny",
                        tmp_path / "b.md", tmp_path / "b.png")
    assert list(result.copies) == copies and result.gen_modes == 64 and len(result.eigenvalues) == 96
    table = (tmp_path / "b.md").read_text()
    assert "| Gen modes (top d) | 64 |" in table and "p = 512" in table and "without the top mode" in table
    assert 0.0 <= result.gen_share_without_top <= 1.0 and 0.0 <= result.top_mean_cosine <= 1.0
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_mem_gen_split_and_gen_share_are_stable_across_three_seeds_at_the_studys_sizes():
    """d = 100, psi_p = 8, psi_n = 4 (p = 800, n = 400), seeds 0-2: the top d modes sit above U's widest
    gap in every seed, Eq. B.17 picks the same ridge, and the Gen share agrees to 0.002 (> 0.99)."""
    from pipeline.theory.analysis import setup_of

    spec = {"d": 100, "psi_p": 8, "psi_n": 4, "t": 0.01, "h": 0.001, "noise_draws": 16}
    ridges = [0.0, 0.01, 0.1, 0.3, 1.0, 3.0]
    chosen, shares = set(), []
    for seed in (0, 1, 2):
        model = rf.draw(setup_of(spec, seed))
        lam = model.modes[0]
        assert rf.widest_gap_modes(lam) == 100
        threshold = rf.mem_gen_threshold(lam, 100)
        ridge, _ = rf.select_ridge(model, ridges, tolerance=0.1, threshold=threshold)
        chosen.add(ridge)
        shares.append(rf.gen_share(rf.mode_response(model, ridge), threshold))
    assert len(chosen) == 1 and min(shares) > 0.99 and max(shares) - min(shares) < 0.002
