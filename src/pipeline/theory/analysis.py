"""One seed of the random-feature analysis (Section 5, App. B.3): everything the figures and the
table read, computed once and written to one .npz file."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..io import atomic_output
from . import random_features as rf
from . import spectrum


def setup_of(spec: Mapping[str, Any], seed: int) -> rf.Setup:
    """The config's `theory` section at one seed: p and n from the ratios psi_p = p/d, psi_n = n/d."""
    d = int(spec["d"])
    return rf.Setup(d=d, p=int(round(spec["psi_p"] * d)), n=int(round(spec["psi_n"] * d)), t=float(spec["t"]),
                    h=float(spec["h"]), covariance=tuple(spec.get("covariance", (1.0, 1.0))),
                    noise_draws=int(spec["noise_draws"]), seed=int(seed))


def analyse(spec: Mapping[str, Any], seed: int) -> dict[str, np.ndarray]:
    """U's spectrum and its saddle-point density, the Mem/Gen threshold, the ridge sweep and the chosen ridge (Eq. B.17), the
    per-mode response at that ridge, the spectrum of Theorem 5.3's C with Lemma 5.1's constants
    measured on the simulated teacher, and App. D.4's psi_n sweep at that ridge. The primary per-mode
    result is the simulated C's own response along U's modes (`simulated_*`; no ridge enters it); the
    theorem form's is kept beside it with its relative Frobenius error against the simulated C at the
    chosen ridge and at ridge 0 (and Lemma 5.1's and the finite-sample form's, for scale)."""
    setup = setup_of(spec, seed)
    rf.require_isotropic(setup)  # before any work: the theorem form and the response assume Sigma = I
    model = rf.draw(setup)
    teacher = rf.closed_form_teacher(model)
    eigenvalues = model.modes[0]
    threshold = rf.mem_gen_threshold(eigenvalues, setup.d)
    ridges = [float(r) for r in spec["ridges"]]
    ridge, medians = rf.select_ridge(model, ridges, float(spec["leakage_tolerance"]), threshold)
    tolerance_met = ridge is not None
    ridge = ridge if tolerance_met else max(ridges)  # said in the table: the sweep never reached the tolerance
    response = rf.mode_response(model, ridge)
    cd = rf.cd_curvature(model, teacher, int(spec["cd_samples"]), seed=seed + 1)
    comparison = curvature_comparison(model, cd, ridge, threshold)
    positive = eigenvalues[eigenvalues > 0]
    bins = np.geomspace(positive.min() / 1.2, positive.max() * 1.2, 61)
    return {
        "d": np.array(setup.d), "p": np.array(setup.p), "n": np.array(setup.n), "seed": np.array(seed),
        "u_eigenvalues": eigenvalues, "threshold": np.array(threshold),
        "widest_gap_modes": np.array(rf.widest_gap_modes(eigenvalues)),
        "u_bins": bins, "u_saddle_point_modes": spectrum.expected_modes(setup, bins, points_per_bin=8),
        "ridges": np.array(ridges), "median_gen_leakage": np.array(medians), "ridge": np.array(ridge),
        "tolerance_met": np.array(tolerance_met),
        "mode_eigenvalues": response.eigenvalues, "visibility": response.visibility,
        "resolvent": response.resolvent, "signed": response.signed,
        **comparison,
        "cd_samples": np.array(int(spec["cd_samples"])), "t": np.array(setup.t), "h": np.array(setup.h),
        "kappa": np.array(cd.kappa), "rho": np.array(cd.rho),
        "c_simulated_eigenvalues": np.linalg.eigvalsh(cd.C),
        **psi_n_sweep(spec, seed, ridge),
    }


def curvature_comparison(model: rf.Model, cd: rf.CDCurvature, ridge: float, threshold: float) -> dict[str, np.ndarray]:
    """The simulated C's signed response along U's modes (the primary per-mode result: no ridge enters it)
    with its Gen share and the fraction of Gen modes responding positively; the same two for Theorem
    5.3's form at `ridge` and at ridge 0; the theorem form's relative Frobenius error against the
    simulated C and its count of negative eigenvalues at both ridges, and Lemma 5.1's and the
    finite-sample form's errors for scale. `c_eigenvalues`: the theorem form's spectrum at `ridge`."""
    lam = model.modes[0]
    theorem = rf.theorem_curvature(model, cd.kappa, cd.rho, ridge)
    unridged = rf.theorem_curvature(model, cd.kappa, cd.rho, 0.0)
    curvature, curvature_unridged = np.linalg.eigvalsh(theorem), np.linalg.eigvalsh(unridged)
    simulated = rf.curvature_response(model, cd.C, cd.kappa, cd.rho)
    signed, signed_unridged = rf.mode_response(model, ridge).signed, rf.mode_response(model, 0.0).signed
    return {
        "simulated_signed": simulated,
        "simulated_gen_share": np.array(rf.signed_gen_share(lam, simulated, threshold)),
        "simulated_gen_positive": np.array(rf.gen_positive(lam, simulated, threshold)),
        "gen_share": np.array(rf.signed_gen_share(lam, signed, threshold)),
        "gen_positive": np.array(rf.gen_positive(lam, signed, threshold)),
        "gen_share_ridge0": np.array(rf.signed_gen_share(lam, signed_unridged, threshold)),
        "gen_positive_ridge0": np.array(rf.gen_positive(lam, signed_unridged, threshold)),
        "theorem_error": np.array(rf.relative_error(theorem, cd.C)),
        "theorem_error_ridge0": np.array(rf.relative_error(unridged, cd.C)),
        "theorem_negative": np.array(int(np.sum(curvature < 0))),
        "theorem_negative_ridge0": np.array(int(np.sum(curvature_unridged < 0))),
        "lemma_error": np.array(rf.relative_error(rf.lemma_curvature(model, cd), cd.C)),
        "draws_error": np.array(rf.relative_error(rf.draws_curvature(model, cd.kappa, cd.rho), cd.C)),
        "c_eigenvalues": curvature,
    }


def spectral_gap(eigenvalues: np.ndarray, threshold: float) -> float:
    """Decades between the highest Mem and the lowest Gen eigenvalue of U (Fig. 10's separation)."""
    lam = np.asarray(eigenvalues)
    gen, mem = lam[lam >= threshold], lam[(lam < threshold) & (lam > 0)]
    return float(np.log10(gen.min() / mem.max())) if len(gen) and len(mem) else float("nan")


def psi_n_sweep(spec: Mapping[str, Any], seed: int, ridge: float) -> dict[str, np.ndarray]:
    """App. D.4 (Figs. 9, 10): at the config's d and psi_p, one model per psi_n of `psi_n_sweep` (fewer
    training points per feature: a more severely memorizing teacher). Per psi_n: U's spectrum and its
    gap, and the signed response per mode at `ridge` (the one Eq. B.17 chose at the config's psi_n, so
    every psi_n is compared at the same regularisation), with the share of Gen modes responding
    positively and the Gen share of positive response; the same two at the psi_n's own Eq. B.17 ridge,
    which grows as psi_n falls (the study does not say which it used)."""
    ridges, tolerance = [float(r) for r in spec["ridges"]], float(spec["leakage_tolerance"])
    rows = []
    for psi_n in spec["psi_n_sweep"]:
        model = rf.draw(setup_of({**spec, "psi_n": psi_n}, seed))
        lam = model.modes[0]
        threshold = rf.mem_gen_threshold(lam, model.setup.d)
        gen = lam >= threshold
        own, _ = rf.select_ridge(model, ridges, tolerance, threshold)
        row = {"psi_n": psi_n, "n": model.setup.n, "eigenvalues": lam, "threshold": threshold,
               "gen_modes": int(gen.sum()), "gap": spectral_gap(lam, threshold),
               "widest_gap_modes": rf.widest_gap_modes(lam), "own_ridge": max(ridges) if own is None else own,
               "own_tolerance_met": own is not None}
        for prefix, r in (("", ridge), ("own_", row["own_ridge"])):
            response = rf.mode_response(model, r)
            if not prefix:
                row["signed"] = response.signed
            row[prefix + "gen_positive"] = float(np.mean(response.signed[gen] > 0))
            row[prefix + "gen_share"] = rf.gen_share(response, threshold)
        rows.append(row)
    return {f"sweep_{key}": np.array([r[key] for r in rows], dtype=float) for key in rows[0]}


def write_analysis(spec: Mapping[str, Any], seed: int, out: str | Path) -> dict[str, np.ndarray]:
    result = analyse(spec, seed)
    with atomic_output(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **result)
    return result


def read_analysis(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}
