"""The random-feature model of the study's Section 5, simulated directly (numpy only).

The study's text lost most formulas in extraction; below is every formula used, where it comes
from, and which parts are our reconstruction ("ours").

Data and noise: n training points x_nu in R^d, x ~ N(0, Sigma) with Sigma = I (the study's App. B.3)
or Bonnaire et al.'s two-delta spectrum, half the eigenvalues lambda1 and half lambda2
(tbonnair/Why-Diffusion-Models-Don-t-Memorize, Theory/src/plot_spectrum_U.py l.89). The OU forward
process at a fixed time t: x_t = e^{-t} x + sqrt(Delta_t) eta, Delta_t = 1 - e^{-2t}
(Theory/src/Training_random_features.py l.46-47, 71).

Features: W in R^{p x d} with i.i.d. N(0, 1) entries, phi(x) = tanh(W x / sqrt(d)) (same file, l.59, 66).

Teacher: s_A(x) = A phi(x) / sqrt(p), A in R^{d x p}, trained by denoising score matching at time t,
  L(A) = 1/(n d) sum_nu E_eta || sqrt(Delta_t) s_A(x_nu^t) + eta ||^2            (same file, l.72)
       = 1/d [ Delta_t/p tr(A U A^T) + 2 sqrt(Delta_t/p) tr(A V) + E||eta||^2 ],
  U = 1/n sum_nu E_eta[phi phi^T] (p x p),   V = 1/n sum_nu E_eta[phi eta^T] (p x d).
U is the teacher curvature: the Hessian of L in each row of A is 2 Delta_t / (p d) U. L is quadratic,
so gradient flow from A = 0 converges to (Lemma 5.2, the study's Eq. 5.5)
  A* = -sqrt(p / Delta_t) V^T U^{-1}.
E_eta is taken over `noise_draws` fixed draws per training point: A* is then the exact minimiser of
the loss on those draws, which is what the gradient-descent check trains.

One teacher step: the OU probability-flow ODE dx/dt = -x - grad log p_t(x), one Euler step of size h
from t towards t - h with the teacher's score, x' = x_t + h (x_t + s_A(x_t)); the teacher-induced
perturbation is eps = x' - x_t.

Student and CD curvature: the student consistency map on the same features, f_B(x) = B phi(x)/sqrt(p);
the one-step CD loss (Eq. 5.1) E || f_B(x') - f_B(x_t) ||^2 / d = tr(B C B^T) / (p d), with
  C = E[dphi dphi^T],  dphi = phi(x') - phi(x_t)                                       (Eq. 5.3),
over training points and fresh noise (CD draws x from the training set: Song et al. 2023, Alg. 2).

Lemma 5.1 (ours, from the steps of App. C.2): per feature i, with delta_i = w_i . eps / sqrt(d), the L2
projection kappa = E[dphi_i delta_i] / E[delta_i^2] and the residual variance
rho = E[dphi_i^2] - kappa^2 E[delta_i^2]; under Gaussian equivalence the cross terms vanish and
  C ~ kappa^2 W Sigma_eps W^T / d + rho I,     Sigma_eps = E[eps eps^T].

Theorem 5.3 (ours, following App. C.3 for Sigma = I, where every pre-activation has unit variance at
every t): Stein's lemma gives V ~ sqrt(Delta_t) mu1 W / sqrt(d) and E[phi x_t^T] ~ mu1 W / sqrt(d),
mu1 = E[tanh'(g)], g ~ N(0, 1); with E[phi phi^T] = U, Sigma_eps / h^2 ~ I - mu1^2 W^T U^{-1} W / d, so
with the random-feature metric P = W W^T / d
  C ~ rho I + kappa^2 h^2 (P - mu1^2 P (U + gamma I)^{-1} P),
gamma = 0 in the theorem and the ridge of App. B.3.1 otherwise. The structured part lies in range(W),
of dimension d: C has the eigenvalue rho with multiplicity at least p - d (the study's atom, Fig. 2b).

This form is NOT the simulated C's second moment, and is kept as the study's statement beside it, not
as the result. Measured (tests/test_theory.py checks these): on README's setup (d = 40, psi_p = 8,
psi_n = 4, t = 0.01, h = 0.001, 16 draws, seed 0, 8000 CD samples), its relative Frobenius error
||C_thm - C_sim||_F / ||C_sim||_F is 2.00 at gamma = 0, where all d = 40 structured eigenvalues are
negative (C_thm is not positive semidefinite; its implied Sigma_eps has trace/d -17.7, the simulated
one +17.3), and 0.97 at the chosen gamma = 1 (one negative eigenvalue). On the Lemma's setup (t = 0.1,
h = 0.01, p = 6d, n = 2d) the error is 4.1, 2.7, 2.3, 2.1 at d = 10, 20, 40, 80: it does not shrink,
where Lemma 5.1's does (0.30, 0.24, 0.16, 0.14). The cause: the Stein values for V and E[phi x_t^T]
are population values, paired with the finite-sample U^{-1} (n < p) whose small Mem eigenvalues
amplify everything off range(W). The finite-sample form, `draws_curvature`, takes V, E[phi x_t^T] and
E[x_t x_t^T] on the teacher's own noise draws: Sigma_eps / h^2 = S - (K^T U^{-1} V + V^T U^{-1} K) /
sqrt(Delta_t) + V^T U^{-1} V / Delta_t exactly on those draws. It is PSD, and its error (0.30, 0.28,
0.19, 0.19 at d = 10, 20, 40, 80 on the Lemma's setup; 0.19 on README's) stays within 0.05 of the
Lemma's, above it by what the teacher's fit to its own draws does not carry over to CD's fresh noise;
it has no closed form in U and P alone, so the theorem's per-mode decomposition does not follow from it.
The per-mode result therefore stands on the simulated C itself (`curvature_response`).

Per-mode response (Eqs. 5.9-5.10; the names are ours): along an eigenpair (lambda_k, u_k) of U, the
visibility v_k = u_k^T P u_k, the resolvent subtraction r_k = mu1^2 u_k^T P (U + gamma I)^{-1} P u_k, and
the signed response s_k = v_k - r_k, the non-isotropic part of u_k^T C u_k over kappa^2 h^2
(s_k > 0: net retention, s_k < 0: suppression). The same definition on any C, (u_k^T C u_k - rho) /
(kappa^2 h^2), is `curvature_response`: on the theorem's C it is s_k exactly, on the simulated C it
is the primary result. Their signs differ with the ridge: at gamma = 0 the theorem's s_k is negative
for every mode (no Gen share exists), at gamma >= about U's lowest Gen eigenvalue (0.75 on README's
setup) its Gen share is 0.993 with 60-65% of Gen modes positive; the simulated C needs no ridge and
gives every Gen mode a positive response and a Gen share of 0.971-0.973 over seeds 0-2.

Only Sigma = I: Theorem 5.3 and the response above are the identity-covariance forms, so
`theorem_curvature`, `mode_response` and the analysis refuse any other `covariance` (`require_isotropic`);
the two-delta spectrum stays available to the saddle-point density (pipeline.theory.spectrum).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

GAUSS_HERMITE_POINTS = 80  # E[f(g)], g ~ N(0, 1), exact to far below the Monte-Carlo noise of every estimate here


@dataclass(frozen=True)
class Setup:
    """One random-feature model: sizes, diffusion time t, Euler step h, data covariance, seed."""
    d: int
    p: int
    n: int
    t: float
    h: float
    covariance: tuple[float, float] = (1.0, 1.0)  # (lambda1, lambda2): the two-delta spectrum; (1, 1) is Sigma = I
    noise_draws: int = 32
    seed: int = 0

    @property
    def delta(self) -> float:
        return 1.0 - np.exp(-2.0 * self.t)


@dataclass
class Model:
    """A drawn instance: features W, training set X (n x d), the noise draws of the teacher's loss, U, V."""
    setup: Setup
    W: np.ndarray
    X: np.ndarray
    eta: np.ndarray  # (noise_draws, n, d)
    U: np.ndarray
    V: np.ndarray

    @cached_property
    def metric(self) -> np.ndarray:
        """P = W W^T / d, the random-feature metric."""
        return self.W @ self.W.T / self.setup.d

    @cached_property
    def modes(self) -> tuple[np.ndarray, np.ndarray]:
        """U's eigenvalues (ascending) and eigenvectors, computed once for every per-mode quantity."""
        return np.linalg.eigh(self.U)

    @cached_property
    def coupling(self) -> np.ndarray:
        """u_j^T P u_k for every pair of teacher modes: what the ridge sweep reweights by 1 / (lambda_j + ridge)."""
        modes = self.modes[1]
        return modes.T @ self.metric @ modes

    @property
    def preactivation_variance(self) -> float:
        """Var(w . x_t / sqrt(d)) = e^{-2t} tr(Sigma) / d + Delta_t: 1 for Sigma = I at every t."""
        s = self.setup
        return float(np.exp(-2.0 * s.t) * covariance_spectrum(s.d, s.covariance).mean() + s.delta)


def covariance_spectrum(d: int, covariance: tuple[float, float]) -> np.ndarray:
    lam1, lam2 = covariance
    return np.array([lam1] * (d // 2) + [lam2] * (d - d // 2), dtype=np.float64)


def features(W: np.ndarray, x: np.ndarray) -> np.ndarray:
    """phi(x) = tanh(W x / sqrt(d)) for the rows of x: shape (..., p)."""
    return np.tanh(x @ W.T / np.sqrt(W.shape[1]))


def noisy(setup: Setup, x: np.ndarray, eta: np.ndarray) -> np.ndarray:
    return np.exp(-setup.t) * x + np.sqrt(setup.delta) * eta


def draw(setup: Setup) -> Model:
    """Draw W, the training set and the teacher's noise; U and V over those draws."""
    rng = np.random.default_rng(setup.seed)
    W = rng.standard_normal((setup.p, setup.d))
    X = rng.standard_normal((setup.n, setup.d)) * np.sqrt(covariance_spectrum(setup.d, setup.covariance))
    eta = rng.standard_normal((setup.noise_draws, setup.n, setup.d))
    phi = features(W, noisy(setup, X[None], eta)).reshape(-1, setup.p)
    count = phi.shape[0]
    return Model(setup, W, X, eta, U=phi.T @ phi / count, V=phi.T @ eta.reshape(-1, setup.d) / count)


def dsm_loss(model: Model, A: np.ndarray) -> float:
    """L(A) on the model's noise draws, the normalisation of Training_random_features.py l.72."""
    s = model.setup
    phi = features(model.W, noisy(s, model.X[None], model.eta))
    residual = np.sqrt(s.delta) * phi @ A.T / np.sqrt(s.p) + model.eta
    return float(np.sum(residual ** 2) / (s.noise_draws * s.n * s.d))


def dsm_gradient(model: Model, A: np.ndarray) -> np.ndarray:
    s = model.setup
    return 2.0 / s.d * (s.delta / s.p * A @ model.U + np.sqrt(s.delta / s.p) * model.V.T)


def teacher_curvature_scale(setup: Setup) -> float:
    """The Hessian of L in one row of A is this times U."""
    return 2.0 * setup.delta / (setup.p * setup.d)


def closed_form_teacher(model: Model) -> np.ndarray:
    """A* = -sqrt(p / Delta_t) V^T U^+ (Lemma 5.2), the limit of gradient flow from A = 0."""
    s = model.setup
    return -np.sqrt(s.p / s.delta) * model.V.T @ np.linalg.pinv(model.U, hermitian=True)


def gradient_descent_teacher(model: Model, steps: int, lr: float | None = None) -> np.ndarray:
    """Full-batch gradient descent from A = 0 on the same loss (the check of the closed form); the
    default step is 1 / (largest Hessian eigenvalue), which converges without overshoot."""
    hessian_top = teacher_curvature_scale(model.setup) * model.modes[0][-1]
    lr = 1.0 / hessian_top if lr is None else lr
    A = np.zeros((model.setup.d, model.setup.p))
    for _ in range(steps):
        A -= lr * dsm_gradient(model, A)
    return A


def score(model: Model, A: np.ndarray, x: np.ndarray) -> np.ndarray:
    return features(model.W, x) @ A.T / np.sqrt(model.setup.p)


def euler_step(model: Model, A: np.ndarray, x_t: np.ndarray) -> np.ndarray:
    """One Euler step of the OU probability-flow ODE from t towards t - h with the teacher's score."""
    return x_t + model.setup.h * (x_t + score(model, A, x_t))


@dataclass
class CDCurvature:
    """C = E[dphi dphi^T] from samples, with Lemma 5.1's kappa and rho and the teacher perturbations' E[eps eps^T]."""
    C: np.ndarray
    kappa: float
    rho: float
    sigma_eps: np.ndarray


def cd_curvature(model: Model, A: np.ndarray, samples: int, seed: int = 1) -> CDCurvature:
    """C of the one-step CD loss, over `samples` noisy training points (fresh noise, uniform points)."""
    s = model.setup
    rng = np.random.default_rng(seed)
    x = model.X[rng.integers(0, s.n, samples)]
    x_t = noisy(s, x, rng.standard_normal(x.shape))
    eps = euler_step(model, A, x_t) - x_t
    dphi = features(model.W, x_t + eps) - features(model.W, x_t)
    delta = eps @ model.W.T / np.sqrt(s.d)
    kappa = float(np.sum(dphi * delta) / np.sum(delta ** 2))
    rho = float(np.mean(dphi ** 2) - kappa ** 2 * np.mean(delta ** 2))
    return CDCurvature(C=dphi.T @ dphi / samples, kappa=kappa, rho=rho, sigma_eps=eps.T @ eps / samples)


def gaussian_mean(f) -> float:
    """E[f(g)], g ~ N(0, 1), by Gauss-Hermite quadrature."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(GAUSS_HERMITE_POINTS)
    return float(np.sum(weights * f(nodes)) / np.sqrt(2.0 * np.pi))


def mu1(variance: float = 1.0) -> float:
    """mu1 = E[tanh'(g)], g ~ N(0, variance): the linear Gaussian-equivalent coefficient of tanh (Stein's
    lemma) for pre-activations of that variance; 1 for Sigma = I."""
    return gaussian_mean(lambda g: 1.0 - np.tanh(np.sqrt(variance) * g) ** 2)


def lemma_curvature(model: Model, cd: CDCurvature) -> np.ndarray:
    """Lemma 5.1's form of C: kappa^2 W Sigma_eps W^T / d + rho I, from the simulated teacher's perturbations."""
    return cd.kappa ** 2 * model.W @ cd.sigma_eps @ model.W.T / model.setup.d + cd.rho * np.eye(model.setup.p)


def require_isotropic(setup: Setup) -> None:
    """Refuse a non-identity data covariance where a Sigma = I form would be applied to it silently."""
    if tuple(float(c) for c in setup.covariance) != (1.0, 1.0):
        raise ValueError(f"theory.covariance = {list(setup.covariance)}: Theorem 5.3's C and the per-mode response "
                         "are implemented for Sigma = I only (covariance [1, 1]); a non-isotropic spectrum would "
                         "silently get the identity-covariance theorem")


def theorem_curvature(model: Model, kappa: float, rho: float, ridge: float = 0.0) -> np.ndarray:
    """Theorem 5.3's form of C (Sigma = I): rho I + kappa^2 h^2 (P - mu1^2 P (U + ridge I)^{-1} P).
    Not PSD and not the simulated C at ridge 0: see the module docstring for its measured error."""
    require_isotropic(model.setup)
    s = model.setup
    P = model.metric
    structured = P - mu1(model.preactivation_variance) ** 2 * P @ np.linalg.solve(model.U + ridge * np.eye(s.p), P)
    return rho * np.eye(s.p) + kappa ** 2 * s.h ** 2 * (structured + structured.T) / 2.0


def draws_curvature(model: Model, kappa: float, rho: float) -> np.ndarray:
    """The finite-sample counterpart of Theorem 5.3's C: Lemma 5.1's form with Sigma_eps of the closed-form
    teacher in closed form on its own noise draws, Sigma_eps / h^2 = S - (K^T U^+ V + V^T U^+ K) / sqrt(Delta_t)
    + V^T U^+ V / Delta_t, K = E[phi x_t^T], S = E[x_t x_t^T] over those draws (the module docstring gives
    its measured error)."""
    s = model.setup
    x_t = noisy(s, model.X[None], model.eta).reshape(-1, s.d)
    phi = features(model.W, x_t)
    K, S = phi.T @ x_t / len(x_t), x_t.T @ x_t / len(x_t)
    UV = np.linalg.pinv(model.U, hermitian=True) @ model.V
    cross = K.T @ UV / np.sqrt(s.delta)
    sigma = S - cross - cross.T + model.V.T @ UV / s.delta
    return kappa ** 2 * s.h ** 2 * model.W @ sigma @ model.W.T / s.d + rho * np.eye(s.p)


def relative_error(C: np.ndarray, reference: np.ndarray) -> float:
    """||C - reference||_F / ||reference||_F."""
    return float(np.linalg.norm(C - reference) / np.linalg.norm(reference))


def curvature_response(model: Model, C: np.ndarray, kappa: float, rho: float) -> np.ndarray:
    """(u_k^T C u_k - rho) / (kappa^2 h^2) along U's eigenmodes (ascending): the signed response of any C,
    `ModeResponse.signed` exactly when C is Theorem 5.3's form."""
    modes = model.modes[1]
    return (np.einsum("ik,ij,jk->k", modes, C, modes) - rho) / (kappa ** 2 * model.setup.h ** 2)


@dataclass
class ModeResponse:
    """Per teacher eigenmode (ascending eigenvalue): visibility, resolvent subtraction, signed response."""
    eigenvalues: np.ndarray
    visibility: np.ndarray
    resolvent: np.ndarray

    @property
    def signed(self) -> np.ndarray:
        return self.visibility - self.resolvent


def mode_response(model: Model, ridge: float) -> ModeResponse:
    """Eqs. 5.9-5.10 along the eigenmodes of U (Theorem 5.3's form: Sigma = I only)."""
    require_isotropic(model.setup)
    lam, coupling = model.modes[0], model.coupling
    # u_k^T P (U + ridge)^{-1} P u_k in U's eigenbasis: sum_j (u_j^T P u_k)^2 / (lambda_j + ridge)
    resolvent = mu1(model.preactivation_variance) ** 2 * np.sum(coupling ** 2 / (lam + ridge)[:, None], axis=0)
    return ModeResponse(lam, np.diag(coupling).copy(), resolvent)


def gen_share(response: ModeResponse, threshold: float) -> float:
    """The share of positive signed response carried by Gen modes (eigenvalue >= threshold); NaN when no
    mode responds positively."""
    return signed_gen_share(response.eigenvalues, response.signed, threshold)


def signed_gen_share(eigenvalues: np.ndarray, signed: np.ndarray, threshold: float) -> float:
    """`gen_share` of any per-mode signed response (the theorem's or the simulated C's)."""
    positive = np.clip(signed, 0.0, None)
    total = positive.sum()
    return float(positive[eigenvalues >= threshold].sum() / total) if total > 0 else float("nan")


def gen_positive(eigenvalues: np.ndarray, signed: np.ndarray, threshold: float) -> float:
    """The fraction of Gen modes (eigenvalue >= threshold) whose signed response is positive."""
    return float(np.mean(signed[eigenvalues >= threshold] > 0))


def mem_gen_threshold(eigenvalues: np.ndarray, gen_modes: int) -> float:
    """The Mem/Gen threshold (ours: the study's definition was lost in extraction): the geometric middle
    of the `gen_modes`-th and the next eigenvalue of U, counted from the top, with `gen_modes` = d. Why
    d: the population part of U, e^{-2t} mu1^2 W Sigma W^T / d (Stein's lemma on E_eta[phi]), has rank
    d, and its modes form the upper bulk; the sample-specific part (one direction per training point
    beyond the d the data span) and the noise floor lie below. At psi_p = 8, psi_n >= 4 this split is
    also the widest gap of the spectrum on a log scale (`widest_gap_modes`); at psi_n <= 2 the gap
    between the sample bulk and the floor is as wide, and a widest-gap rule flips between the two from
    seed to seed."""
    lam = np.sort(np.asarray(eigenvalues))[::-1]
    return float(np.sqrt(lam[gen_modes - 1] * lam[gen_modes]))


def widest_gap_modes(eigenvalues: np.ndarray) -> int:
    """How many eigenvalues lie above the widest gap between consecutive positive eigenvalues of U on a
    log scale: the diagnostic beside `mem_gen_threshold`'s count."""
    lam = np.sort(np.asarray(eigenvalues))[::-1]
    lam = lam[lam > 0]
    return int(np.argmax(-np.diff(np.log(lam)))) + 1


def mem_leakage(model: Model, ridge: float, threshold: float) -> np.ndarray:
    """Per teacher mode k, the share of its inverse-curvature response energy
    u_k^T P (U + ridge)^{-1} P u_k = sum_j (u_j^T P u_k)^2 / (lambda_j + ridge) that comes from Mem modes j
    (App. B.3.1, Eq. B.15 as we read it)."""
    lam = model.modes[0]
    energy = model.coupling ** 2 / (lam + ridge)[:, None]
    return energy[lam < threshold].sum(axis=0) / energy.sum(axis=0)


def select_ridge(model: Model, ridges, tolerance: float, threshold: float) -> tuple[float, list[float]]:
    """The smallest ridge whose median Mem leakage over Gen modes is at most `tolerance` (Eq. B.17), or
    None when no ridge of the sweep gets there; and the median leakage at every ridge (Fig. 6)."""
    lam = model.modes[0]
    medians = [float(np.median(mem_leakage(model, r, threshold)[lam >= threshold])) for r in ridges]
    chosen = next((r for r, m in zip(ridges, medians) if m <= tolerance), None)
    return chosen, medians
