"""The saddle-point density of the teacher curvature U beside its simulated spectrum (Fig. 2(a)).

Gaussian equivalence (Bonnaire et al. 2025, tbonnair/Why-Diffusion-Models-Don-t-Memorize
Theory/src/plot_spectrum_U.py, the constants a_t, b_t, v_t^2, s_t^2 and the equivalent U there): a
feature of a noisy training point, phi = tanh(w . x_t / sqrt(d)) with x_t = e^{-t} x + sqrt(Delta_t) eta,
behaves like
  phi_{nu,k} ~ g_nu + b W_d eta_{nu,k} + s xi_{nu,k},    g_nu = c W_d x_nu + v omega_nu,
with omega, xi independent standard Gaussian vectors in R^p (g_nu is shared by every noise draw k of
x_nu; the rest is fresh with each draw), W_d = W / sqrt(d) (entries N(0, 1/d)), c = e^{-t} a, and, for
a pre-activation of variance
Gamma^2 = e^{-2t} sigma_x^2 + Delta_t (sigma_x^2 = tr Sigma / d):
  a   = E[tanh'(Gamma g)]                                   (Stein's lemma: the linear part in x),
  b   = sqrt(Delta_t) a                                      (the linear part in the noise),
  v^2 = E_u[psi(e^{-t} sigma_x u)^2] - c^2 sigma_x^2,  psi(y) = E_w tanh(y + sqrt(Delta_t) w)
                                                             (what of the data-mean feature is not linear),
  s^2 = E[tanh(Gamma g)^2] - c^2 sigma_x^2 - v^2 - b^2       (the rest, independent per draw).
All by Gauss-Hermite quadrature (the reference script uses Monte Carlo). Bonnaire et al. take the exact
noise average, U = G G^T / n + b^2 W_d W_d^T + s^2 I; ours averages over m = `noise_draws` draws per
point, so (ours) U is the sum of two independent sample covariances given W: the n draw-means
g_nu + (noise mean), covariance C_1 = c^2 W_d Sigma W_d^T + v^2 I + (b^2 W_d W_d^T + s^2 I) / m, and the
n (m - 1) within-point deviations, covariance C_2 = (m - 1) / m (b^2 W_d W_d^T + s^2 I). For m -> infinity
this is the reference's U.

The saddle point (ours: a two-level deterministic equivalent). Given W, a sum of sample covariances
sum_g (1/N_g) sum_i x_i x_i^T, x_i ~ N(0, C_g), has the resolvent equivalent
  (U - z)^{-1} ~ (sum_g C_g / (1 + delta_g) - z)^{-1},   delta_g = tr[C_g (U - z)^{-1}] / N_g
(the Silverstein-Bai equations for several independent groups; Couillet & Liao 2022, Random Matrix
Methods for Machine Learning, Sec. 2.2.3). Each C_g = alpha_g I + W_d D_g W_d^T with D_g diagonal in
Sigma's eigenbasis, so the bracket is W_d D W_d^T + (alpha - z) I with D = sum_g D_g / (1 + delta_g),
alpha = sum_g alpha_g / (1 + delta_g), whose equivalent over W (a sample covariance again, d columns
of W_d) is m(z) I with
  m = 1 / (<D / (1 + D e)> + alpha - z),   e = psi_p m,
  delta_g = (alpha_g p m + d <D_g e / (1 + D e)>) / N_g,
<.> the average over Sigma's eigenvalues (the two-delta spectrum: two values), m(z) = tr (U - z)^{-1} / p
the Stieltjes transform and rho(lambda) = Im m(lambda + i0) / pi the density. Solved by damped fixed-point
iteration at z = lambda (1 + i epsilon) for every lambda at once; epsilon = 1e-3 integrates to mass
1.002 at d = 40 (tests/test_theory.py checks it and the convergence of the simulated U towards it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import random_features as rf


@dataclass(frozen=True)
class GEConstants:
    a: float
    b: float
    v2: float
    s2: float


def _gauss_hermite():
    nodes, weights = np.polynomial.hermite_e.hermegauss(rf.GAUSS_HERMITE_POINTS)
    return nodes, weights / np.sqrt(2.0 * np.pi)


def ge_constants(setup: rf.Setup) -> GEConstants:
    g, w = _gauss_hermite()
    sx2 = float(rf.covariance_spectrum(setup.d, setup.covariance).mean())
    c0 = np.exp(-setup.t)
    gamma = np.sqrt(c0 ** 2 * sx2 + setup.delta)
    a = float(np.sum(w * (1.0 - np.tanh(gamma * g) ** 2)))
    b = np.sqrt(setup.delta) * a
    psi = np.tanh(c0 * np.sqrt(sx2) * g[:, None] + np.sqrt(setup.delta) * g[None, :]) @ w
    v2 = float(np.sum(w * psi ** 2) - (c0 * a) ** 2 * sx2)
    s2 = float(np.sum(w * np.tanh(gamma * g) ** 2) - (c0 * a) ** 2 * sx2 - v2 - b ** 2)
    return GEConstants(a, float(b), v2, s2)


def stieltjes(setup: rf.Setup, z: np.ndarray, tolerance: float = 1e-12, max_iterations: int = 20000,
              damping: float = 0.5) -> np.ndarray:
    """m(z) = tr (U - z)^{-1} / p of the saddle-point equations above, for every z (Im z > 0) at once."""
    k = ge_constants(setup)
    spectrum = rf.covariance_spectrum(setup.d, setup.covariance)
    values, counts = np.unique(spectrum, return_counts=True)
    weights = counts / counts.sum()
    c2, m_draws = k.a ** 2 * np.exp(-2.0 * setup.t), setup.noise_draws
    # the groups: (alpha_g, D_g over Sigma's eigenvalues, N_g); a single draw has no within-point group
    groups = [(k.v2 + k.s2 / m_draws, c2 * values + k.b ** 2 / m_draws, setup.n)]
    if m_draws > 1:
        groups.append(((m_draws - 1) * k.s2 / m_draws, np.full_like(values, (m_draws - 1) * k.b ** 2 / m_draws),
                       setup.n * (m_draws - 1)))
    z = np.asarray(z, dtype=complex)
    psi_p = setup.p / setup.d
    m = -1.0 / z
    deltas = [np.zeros_like(z) for _ in groups]
    for _ in range(max_iterations):
        e = psi_p * m
        D = sum(Dg[None, :] / (1.0 + dg[:, None]) for (_, Dg, _), dg in zip(groups, deltas))
        alpha = sum(ag / (1.0 + dg) for (ag, _, _), dg in zip(groups, deltas))
        resolvent = 1.0 / (1.0 + D * e[:, None])
        m_new = 1.0 / ((D * resolvent) @ weights + alpha - z)
        new_deltas = [(ag * setup.p * m + setup.d * ((Dg[None, :] * e[:, None] * resolvent) @ weights)) / Ng
                      for ag, Dg, Ng in groups]
        change = np.max(np.abs(m_new - m) / np.abs(m))
        m = damping * m + (1.0 - damping) * m_new
        deltas = [damping * d0 + (1.0 - damping) * d1 for d0, d1 in zip(deltas, new_deltas)]
        if change < tolerance:
            return m
    raise RuntimeError(f"saddle-point iteration did not converge in {max_iterations} steps (last change {change:.2e})")


def density(setup: rf.Setup, eigenvalues: np.ndarray, epsilon: float = 1e-3) -> np.ndarray:
    """rho(lambda) = Im m(lambda (1 + i epsilon)) / pi on a grid of eigenvalues."""
    grid = np.asarray(eigenvalues, dtype=float)
    return stieltjes(setup, grid * (1.0 + 1j * epsilon)).imag / np.pi


def expected_modes(setup: rf.Setup, bin_edges: np.ndarray, points_per_bin: int = 16) -> np.ndarray:
    """p times the saddle-point mass in each bin: the histogram the simulated U should approach."""
    edges = np.asarray(bin_edges, dtype=float)
    fine = np.concatenate([np.geomspace(lo, hi, points_per_bin, endpoint=False) for lo, hi in zip(edges[:-1], edges[1:])]
                          + [edges[-1:]])
    rho = density(setup, fine)
    cumulative = np.concatenate([[0.0], np.cumsum(np.diff(fine) * (rho[1:] + rho[:-1]) / 2.0)])
    return setup.p * np.diff(cumulative[::points_per_bin])
