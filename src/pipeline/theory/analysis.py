"""One seed of the random-feature analysis (Section 5, App. B.3): everything the figures and the
table read, computed once and written to one .npz file."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..io import atomic_output
from . import random_features as rf


def setup_of(spec: Mapping[str, Any], seed: int) -> rf.Setup:
    """The config's `theory` section at one seed: p and n from the ratios psi_p = p/d, psi_n = n/d."""
    d = int(spec["d"])
    return rf.Setup(d=d, p=int(round(spec["psi_p"] * d)), n=int(round(spec["psi_n"] * d)), t=float(spec["t"]),
                    h=float(spec["h"]), covariance=tuple(spec.get("covariance", (1.0, 1.0))),
                    noise_draws=int(spec["noise_draws"]), seed=int(seed))


def analyse(spec: Mapping[str, Any], seed: int) -> dict[str, np.ndarray]:
    """U's spectrum, the Mem/Gen threshold, the ridge sweep and the chosen ridge (Eq. B.17), the
    per-mode response at that ridge, and the spectrum of Theorem 5.3's C with Lemma 5.1's constants
    measured on the simulated teacher."""
    setup = setup_of(spec, seed)
    model = rf.draw(setup)
    teacher = rf.closed_form_teacher(model)
    eigenvalues = model.modes[0]
    threshold = rf.mem_gen_threshold(eigenvalues)
    ridges = [float(r) for r in spec["ridges"]]
    ridge, medians = rf.select_ridge(model, ridges, float(spec["leakage_tolerance"]), threshold)
    tolerance_met = ridge is not None
    ridge = ridge if tolerance_met else max(ridges)  # said in the table: the sweep never reached the tolerance
    response = rf.mode_response(model, ridge)
    cd = rf.cd_curvature(model, teacher, int(spec["cd_samples"]), seed=seed + 1)
    curvature = np.linalg.eigvalsh(rf.theorem_curvature(model, cd.kappa, cd.rho, ridge))
    return {
        "d": np.array(setup.d), "p": np.array(setup.p), "n": np.array(setup.n), "seed": np.array(seed),
        "u_eigenvalues": eigenvalues, "threshold": np.array(threshold),
        "ridges": np.array(ridges), "median_gen_leakage": np.array(medians), "ridge": np.array(ridge),
        "tolerance_met": np.array(tolerance_met),
        "mode_eigenvalues": response.eigenvalues, "visibility": response.visibility,
        "resolvent": response.resolvent, "signed": response.signed,
        "gen_share": np.array(rf.gen_share(response, threshold)),
        "c_eigenvalues": curvature, "kappa": np.array(cd.kappa), "rho": np.array(cd.rho),
        "c_simulated_eigenvalues": np.linalg.eigvalsh(cd.C),
    }


def write_analysis(spec: Mapping[str, Any], seed: int, out: str | Path) -> dict[str, np.ndarray]:
    result = analyse(spec, seed)
    with atomic_output(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **result)
    return result


def read_analysis(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}
