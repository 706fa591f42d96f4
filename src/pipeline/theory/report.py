"""The figures and the table of the random-feature analysis, from the per-seed .npz files.

spectra.png (the study's Fig. 2): the spectrum of the teacher curvature U, Mem and Gen sides of the
threshold, with the modes its saddle-point density puts in each bin, and of Theorem 5.3's CD curvature
C with its atom. modes.png (Fig. 3): visibility,
resolvent subtraction and signed response per teacher mode (Theorem 5.3's form), and the simulated
C's own response along the same modes (the primary result). ridge.png (Fig. 6): median Mem leakage
of Gen modes against the ridge. gen-share.md: per seed, the Gen share of positive response and the
fraction of Gen modes responding positively for the simulated C and for the theorem form (at the chosen
ridge and at ridge 0), with the theorem form's relative Frobenius error against the simulated C, beside
the study's statement. psi-sweep-response.png and psi-sweep-spectra.png (App. D.4, Figs. 9 and 10): the
signed response and U's spectrum as the training points per dimension psi_n vary; psi-sweep.md: their
numbers over the seeds, beside the study's statements.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import atomic_output, pyplot, save_png
from .analysis import read_analysis

STUDY_STATEMENT = ("nearly all positive non-isotropic updates are assigned to generalization-associated "
                   "directions (Sec. 5.4 (III); the number itself was lost in the text's extraction)")


def _figure(path: Path, fig) -> None:
    save_png(fig, path, dpi=120, bbox_inches="tight")


def spectra_figure(runs: Sequence[dict], out: str | Path) -> None:
    plt = pyplot()
    run = runs[0]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    lam = run["u_eigenvalues"]
    bins = run["u_bins"]
    gen = lam >= run["threshold"]
    a.hist([lam[~gen], lam[gen]], bins=bins, stacked=True, color=["tab:red", "tab:blue"],
           label=[f"Mem ({(~gen).sum()})", f"Gen ({gen.sum()})"])
    a.stairs(run["u_saddle_point_modes"], bins, color="k", lw=1.2, label="saddle point (Gaussian equivalent)")
    a.axvline(float(run["threshold"]), color="k", ls="--", lw=1, label="threshold")
    a.set(xscale="log", xlabel="eigenvalue of U", ylabel="modes",
          title=f"(a) teacher curvature U (d={int(run['d'])}, p={int(run['p'])}, n={int(run['n'])})")
    a.legend()
    c = run["c_eigenvalues"]
    rho = float(run["rho"])
    atom = np.isclose(c, rho, rtol=1e-8, atol=0)
    rest = c[~atom]
    b.hist(rest, bins=60, color="tab:gray", label=f"structured ({len(rest)})")
    b.axvline(rho, color="tab:green", lw=2, label=f"atom at rho, multiplicity {int(atom.sum())} (p - d = {int(run['p'] - run['d'])})")
    b.set(xlabel="eigenvalue of C", ylabel="modes", title=f"(b) Theorem 5.3's form of C (ridge {float(run['ridge']):g}; not the simulated C)")
    b.legend(fontsize=8)
    _figure(Path(out), fig)
    plt.close(fig)


def modes_figure(runs: Sequence[dict], out: str | Path) -> None:
    plt = pyplot()
    run = runs[0]
    lam = run["mode_eigenvalues"]
    gen = lam >= run["threshold"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for ax, key, title in zip(axes, ("visibility", "resolvent", "signed", "simulated_signed"),
                              ("(a) visibility u^T P u", "(b) resolvent subtraction", "(c) signed response",
                               "(d) simulated C")):
        ax.scatter(lam[~gen], run[key][~gen], s=4, color="tab:red", label="Mem")
        ax.scatter(lam[gen], run[key][gen], s=4, color="tab:blue", label="Gen")
        ax.axvline(float(run["threshold"]), color="k", ls="--", lw=1)
        ax.set(xscale="log", xlabel="eigenvalue of U", title=title)
    axes[2].axhline(0.0, color="k", lw=0.5)
    axes[3].axhline(0.0, color="k", lw=0.5)
    axes[2].set_title(f"(c) theorem form, ridge {float(run['ridge']):g}: Gen share {float(run['gen_share']):.3f}")
    axes[3].set_title(f"(d) simulated C (no ridge): Gen share {float(run['simulated_gen_share']):.3f}")
    axes[3].set_ylabel("(u^T C_sim u - rho) / (kappa h)^2")
    axes[0].legend()
    _figure(Path(out), fig)
    plt.close(fig)


def ridge_figure(runs: Sequence[dict], out: str | Path, tolerance: float) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        ridges = run["ridges"]
        shown = np.where(ridges > 0, ridges, ridges[ridges > 0].min() / 10)  # ridge 0 drawn a decade left
        ax.plot(shown, run["median_gen_leakage"], marker="o", label=f"seed {int(run['seed'])}, chosen {float(run['ridge']):g}")
    ax.axhline(tolerance, color="k", ls="--", lw=1, label=f"tolerance {tolerance:g}")
    ax.set(xscale="log", xlabel="ridge (leftmost point: 0)", ylabel="median Mem leakage of Gen modes",
           title="Inverse-curvature leakage against the ridge")
    ax.legend(fontsize=8)
    _figure(Path(out), fig)
    plt.close(fig)


def gen_share_table(runs: Sequence[dict], out: str | Path) -> None:
    """The simulated C's per-mode response first (the result), then Theorem 5.3's form beside it."""
    run = runs[0]
    simulated = np.array([float(r["simulated_gen_share"]) for r in runs])
    lines = ["# Gen share of positive non-isotropic CD response (random-feature model)", "",
             f"Signed response of a curvature C along U's eigenmodes u_k: (u_k^T C u_k - rho) / (kappa^2 h^2). The "
             f"simulated C is E[dphi dphi^T] of the one-step CD loss over {int(run['cd_samples'])} noisy training "
             f"points (t = {float(run['t']):g}, h = {float(run['h']):g}); no ridge enters it. Gen share: the share of "
             "the positive response carried by Gen modes (the top d of U).", "",
             "| seed | d | p | n | Mem/Gen threshold | Gen modes | simulated C: Gen share | simulated C: Gen modes > 0 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        gen = int(np.sum(r["mode_eigenvalues"] >= r["threshold"]))
        lines.append(f"| {int(r['seed'])} | {int(r['d'])} | {int(r['p'])} | {int(r['n'])} | {float(r['threshold']):.4g} | "
                     f"{gen} | {float(r['simulated_gen_share']):.4f} | {100 * float(r['simulated_gen_positive']):.1f}% |")
    lines += ["", f"Simulated C: mean Gen share {_mean_sd(simulated, 4)}. The study: {STUDY_STATEMENT}.", ""]
    lines += _theorem_table(runs)
    with atomic_output(out) as tmp:
        tmp.write_text("\n".join(lines))


def _theorem_table(runs: Sequence[dict]) -> list[str]:
    """Theorem 5.3's form of C at the chosen ridge and at ridge 0, and its error against the simulated C."""
    shares = np.array([float(r["gen_share"]) for r in runs])
    lines = ["## Theorem 5.3's form of C beside it", "",
             "rho I + kappa^2 h^2 (P - mu1^2 P (U + ridge I)^{-1} P), its response s_k the same definition. Error: "
             "relative Frobenius norm ||C - C_sim||_F / ||C_sim||_F; negative: its eigenvalues below 0 (a second "
             "moment has none). Lemma 5.1's form and the finite-sample form (the same algebra on the teacher's own "
             "noise draws) for scale. The chosen ridge is Eq. B.17's.", "",
             "| seed | d | chosen ridge | Gen share | Gen modes > 0 | error | negative | ridge 0: Gen share | "
             "Gen modes > 0 | error | negative | Lemma 5.1 error | finite-sample error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {int(r['seed'])} | {int(r['d'])} | "
                     f"{float(r['ridge']):g}{'' if bool(r['tolerance_met']) else ' (largest: tolerance not met)'} | "
                     f"{float(r['gen_share']):.4f} | {100 * float(r['gen_positive']):.1f}% | "
                     f"{float(r['theorem_error']):.3f} | {int(r['theorem_negative'])} | "
                     f"{float(r['gen_share_ridge0']):.4f} | {100 * float(r['gen_positive_ridge0']):.1f}% | "
                     f"{float(r['theorem_error_ridge0']):.3f} | {int(r['theorem_negative_ridge0'])} | "
                     f"{float(r['lemma_error']):.3f} | {float(r['draws_error']):.3f} |")
    lines += ["", f"Theorem form at the chosen ridge: mean Gen share {_mean_sd(shares, 4)}. A Gen share of nan: no "
              "mode responds positively. The theorem form is not the simulated C's second moment (see "
              "src/pipeline/theory/random_features.py); its signs depend on the ridge, the simulated C's do not.", ""]
    return lines


D4_STATEMENTS = (  # the varied symbols were lost in extraction; we read them as psi_n and psi_p / psi_n
    "Fig. 9: for fixed [lost], decreasing [lost] (hence increasing the ratio [lost]) enlarges the subset of "
    "Gen modes with positive signed response, and Mem modes stay concentrated near zero response",
    "Fig. 10: with the Gen modes well separated from the Mem modes most Gen modes respond positively; as "
    "[lost] decreases, the Gen spectrum moves down, the gap closes and more Gen modes fall into the "
    "suppressive regime",
)


def _mean_sd(values: np.ndarray, digits: int) -> str:
    values = np.asarray(values, dtype=float)
    sd = f" ± {values.std(ddof=1):.{digits}f}" if len(values) > 1 else ""
    return f"{values.mean():.{digits}f}{sd}"


def sweep_response_figure(runs: Sequence[dict], out: str | Path) -> None:
    plt = pyplot()
    run = runs[0]
    count = len(run["sweep_psi_n"])
    fig, axes = plt.subplots(1, count, figsize=(4 * count, 3.6), sharey=False, squeeze=False)
    for k, ax in enumerate(axes[0]):
        lam, signed, threshold = run["sweep_eigenvalues"][k], run["sweep_signed"][k], float(run["sweep_threshold"][k])
        gen = lam >= threshold
        ax.scatter(lam[~gen], signed[~gen], s=4, color="tab:red", label="Mem")
        ax.scatter(lam[gen], signed[gen], s=4, color="tab:blue", label="Gen")
        ax.axhline(0.0, color="k", lw=0.5)
        ax.axvline(threshold, color="k", ls="--", lw=1)
        ax.set(xscale="log", xlabel="eigenvalue of U",
               title=f"psi_n = {run['sweep_psi_n'][k]:g} (p/n = {run['p'] / run['sweep_n'][k]:.2g}): "
                     f"{100 * run['sweep_gen_positive'][k]:.0f}% of Gen > 0")
    axes[0][0].set_ylabel("signed response")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Signed response per teacher mode as psi_n varies (d = {int(run['d'])}, p = {int(run['p'])}, "
                 f"ridge {float(run['ridge']):g}, seed {int(run['seed'])})")
    _figure(Path(out), fig)
    plt.close(fig)


def sweep_spectra_figure(runs: Sequence[dict], out: str | Path) -> None:
    plt = pyplot()
    run = runs[0]
    count = len(run["sweep_psi_n"])
    fig, axes = plt.subplots(count, 1, figsize=(7, 1.8 * count), sharex=True, squeeze=False)
    positive = run["sweep_eigenvalues"][run["sweep_eigenvalues"] > 0]
    bins = np.logspace(np.log10(positive.min()), np.log10(positive.max()), 80)
    for k, ax in enumerate(axes[:, 0]):
        lam, threshold = run["sweep_eigenvalues"][k], float(run["sweep_threshold"][k])
        gen = lam >= threshold
        ax.hist([lam[~gen & (lam > 0)], lam[gen]], bins=bins, stacked=True, color=["tab:red", "tab:blue"],
                label=["Mem", "Gen"])
        ax.axvline(threshold, color="k", ls="--", lw=1)
        ax.set(xscale="log", ylabel="modes")
        ax.set_title(f"psi_n = {run['sweep_psi_n'][k]:g}: gap {run['sweep_gap'][k]:.2f} decades", fontsize=9)
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel("eigenvalue of U")
    _figure(Path(out), fig)
    plt.close(fig)


def sweep_table(runs: Sequence[dict], out: str | Path) -> None:
    run = runs[0]
    seeds = ", ".join(str(int(r["seed"])) for r in runs)
    common = ", ".join(f"{float(r['ridge']):g}" for r in runs)
    lines = ["# Signed response and spectral gap as psi_n varies (random-feature model, App. D.4)", "",
             f"d = {int(run['d'])}, p = {int(run['p'])}; mean ± sample standard deviation over {len(runs)} seed(s) "
             f"({seeds}). Gen modes: the top d of U. The gap: decades between the lowest Gen and the highest "
             "Mem eigenvalue. Response at the common ridge (the one Eq. B.17 chose at the config's psi_n, per "
             f"seed: {common}) and at each psi_n's own Eq. B.17 ridge.", "",
             "| psi_n | n | p / n | spectral gap (decades) | widest-gap split | Gen modes > 0, common ridge "
             "| Gen share, common ridge | own ridge | Gen modes > 0, own ridge | Gen share, own ridge |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for k, psi_n in enumerate(run["sweep_psi_n"]):
        def col(key: str, k: int = k) -> np.ndarray:
            """One column of the table: entry k of `key` in every seed."""
            return np.array([r[key][k] for r in runs])

        n = int(run["sweep_n"][k])
        own = ", ".join(f"{x:g}{'' if met else ' (tolerance not met)'}"
                        for x, met in zip(col("sweep_own_ridge"), col("sweep_own_tolerance_met")))
        lines.append(f"| {psi_n:g} | {n} | {run['p'] / n:.2g} | {_mean_sd(col('sweep_gap'), 2)} | "
                     f"{', '.join(str(int(x)) for x in col('sweep_widest_gap_modes'))} modes | "
                     f"{_mean_sd(100 * col('sweep_gen_positive'), 1)}% | {_mean_sd(col('sweep_gen_share'), 4)} | {own} | "
                     f"{_mean_sd(100 * col('sweep_own_gen_positive'), 1)}% | {_mean_sd(col('sweep_own_gen_share'), 4)} |")
    lines += ["", "The study (App. D.4):", ""] + [f"- {s}." for s in D4_STATEMENTS] + [""]
    with atomic_output(out) as tmp:
        tmp.write_text("\n".join(lines))


def write_report(analyses: Sequence[str | Path], out_dir: str | Path, tolerance: float) -> None:
    runs = sorted((read_analysis(p) for p in analyses), key=lambda r: int(r["seed"]))
    out_dir = Path(out_dir)
    spectra_figure(runs, out_dir / "spectra.png")
    modes_figure(runs, out_dir / "modes.png")
    ridge_figure(runs, out_dir / "ridge.png", tolerance)
    gen_share_table(runs, out_dir / "gen-share.md")
    sweep_response_figure(runs, out_dir / "psi-sweep-response.png")
    sweep_spectra_figure(runs, out_dir / "psi-sweep-spectra.png")
    sweep_table(runs, out_dir / "psi-sweep.md")
