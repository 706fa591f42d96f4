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
    """The structured part of Theorem 5.3's C lies in range(W): rho is an eigenvalue at least p - d times."""
    A = rf.closed_form_teacher(model)
    cd = rf.cd_curvature(model, A, samples=4000)
    assert cd.rho > 0 and 0 < cd.kappa < 1
    for ridge in (0.0, 0.1):
        eig = np.linalg.eigvalsh(rf.theorem_curvature(model, cd.kappa, cd.rho, ridge))
        assert np.sum(np.isclose(eig, cd.rho, rtol=1e-8, atol=0)) >= SMALL.p - SMALL.d


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
