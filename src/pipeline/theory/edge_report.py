"""The edge-of-memorization figure and table from the labs' files (one per case and seed; theory/edge.py):
the predicted crossover (brute-force losses, the nearest-point formula, upstream's formula, the formula
with the charge fitted from the brute-force losses) beside the
size at which models trained by gradient descent start to copy, with the memorizer and fresh draws of
the true mixture as the yardsticks of the copy share. numpy and matplotlib only."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import atomic_output, pyplot, save_png
from .edge_formula import CHARGE_NEAREST_POINT, CHARGE_UPSTREAM, analytic_excess

KEYS = ("sizes", "fractions", "times", "d", "sigma0", "mc_generalizer", "mc_memorizer", "mc_partial", "mc_crossover",
        "formula_crossover", "upstream_crossover", "empirical_charge", "empirical_crossover", "trained_loss", "trained_var", "trained_memorized",
        "measured_transition", "memorizer_memorized", "fresh_memorized")


def load_labs(paths) -> dict:
    """{case: [lab, ...]} from files results/edge/lab/<case>/seed-<s>.npz."""
    labs: dict[str, list] = {}
    for path in sorted(map(Path, paths)):
        with np.load(path) as f:
            missing = [k for k in KEYS if k not in f.files]
            if missing:
                raise ValueError(f"{path} lacks {missing}: re-run edge_lab")
            labs.setdefault(path.parent.name, []).append({k: f[k] for k in KEYS})
    return labs


def _mean_sd(values) -> str:
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).any():
        return f"{np.nanmean(values):.3f} ({int(np.isnan(values).sum())} of {len(values)} never)" if np.isfinite(
            values).any() else "never"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def summary_rows(labs: dict) -> list[dict]:
    rows = []
    for case, runs in labs.items():
        rows.append({
            "case": case, "d": int(runs[0]["d"]), "n": int(round(runs[0]["sizes"][-1] / runs[0]["fractions"][-1])),
            "seeds": len(runs),
            "mc": [float(r["mc_crossover"]) for r in runs],
            "formula": float(runs[0]["formula_crossover"]), "upstream": float(runs[0]["upstream_crossover"]),
            "charge": [float(r["empirical_charge"]) for r in runs],
            "fitted": [float(r["empirical_crossover"]) for r in runs],
            "measured": [float(r["measured_transition"]) for r in runs],
            "memorizer": [float(r["memorizer_memorized"]) for r in runs],
            "fresh": [float(r["fresh_memorized"]) for r in runs],
        })
    return rows


def write_table(labs: dict, rows: list[dict], out_md) -> None:
    lines = [
        "# Edge of memorization: predicted crossover and measured transition",
        "",
        "K*/n: the model size (components per training point) where the partial memorizer's training loss",
        "falls below the generalizer's (predicted), and where half of a trained model's DDIM samples copy a",
        "training point by the L2 ratio criterion (measured). Mean ± sd over seeds (each seed draws its own",
        "data); the copy share's yardsticks are the memorizer (K = n, v = 0) and fresh draws of the true",
        "mixture, on the same criterion. The closed form K*/n = 1 - <1 / (1 + psi sigma0^2)>_t / c with three",
        "charges c per missing point (d sigma0^2 units): 2 (asymptotic, d -> infinity), upstream's 1, and",
        "the charge fitted from this lab's own brute-force losses (their excess over the memorizer pooled",
        "over every size K < n, per missing point).",
        "",
        "| case | d | n | seeds | predicted K*/n: brute-force losses | nearest-point formula (c = 2) | upstream formula (c = 1) | fitted charge c | formula with the fitted c | measured transition | copy share: memorizer | copy share: fresh draws |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['d']} | {r['n']} | {r['seeds']} | {_mean_sd(r['mc'])} | {r['formula']:.3f} | "
                     f"{r['upstream']:.3f} | {_mean_sd(r['charge'])} | {_mean_sd(r['fitted'])} | {_mean_sd(r['measured'])} | "
                     f"{_mean_sd(r['memorizer'])} | {_mean_sd(r['fresh'])} |")
    lines += ["", "Per size (mean over seeds): trained loss, learned variance v and copy share; the partial",
              "memorizer's and the generalizer's brute-force losses (x0 units, mean over the time grid).", ""]
    for case, runs in labs.items():
        lines += [f"## {case}", "", "| K/n | trained loss | partial memorizer | generalizer | learned v | copy share |",
                  "|---:|---:|---:|---:|---:|---:|"]
        gen = np.mean([r["mc_generalizer"] for r in runs])
        for i, frac in enumerate(runs[0]["fractions"]):
            loss = np.mean([r["trained_loss"][i] for r in runs])
            partial = np.mean([r["mc_partial"][i].mean() for r in runs])
            var = np.mean([r["trained_var"][i] for r in runs])
            mem = [r["trained_memorized"][i] for r in runs]
            lines.append(f"| {frac:.3f} | {loss:.3f} | {partial:.3f} | {gen:.3f} | {var:.3g} | {_mean_sd(mem)} |")
        lines.append("")
    with atomic_output(out_md) as tmp:
        tmp.write_text("\n".join(lines))


def draw_figure(labs: dict, out_png) -> None:
    plt = pyplot()

    cases = list(labs)
    fig, axes = plt.subplots(len(cases), 2, figsize=(11, 3.8 * len(cases)), squeeze=False)
    for row, case in enumerate(cases):
        runs = labs[case]
        frac = runs[0]["fractions"]
        d = int(runs[0]["d"])
        mem = np.mean([r["mc_memorizer"] for r in runs])
        partial = np.stack([r["mc_partial"].mean(1) for r in runs])
        gen = np.array([r["mc_generalizer"] for r in runs])
        trained = np.stack([r["trained_loss"] for r in runs])
        ax = axes[row, 0]
        ax.fill_between(frac, partial.min(0), partial.max(0), color="C0", alpha=0.2)
        ax.plot(frac, partial.mean(0), "o-", color="C0", label="partial memorizer (brute force)")
        ax.axhline(gen.mean(), color="C1", label="generalizer (brute force)")
        ax.axhspan(gen.min(), gen.max(), color="C1", alpha=0.2)
        fine = np.linspace(frac[0], 1, 100)
        n = runs[0]["sizes"][-1] / frac[-1]
        for charge, style, name in ((CHARGE_NEAREST_POINT, "--", "nearest-point formula"),
                                    (CHARGE_UPSTREAM, ":", "upstream formula")):
            excess = analytic_excess(d, float(runs[0]["sigma0"]), n, runs[0]["times"], fine * n, charge)["partial"]
            ax.plot(fine, mem + excess, style, color="C0", label=f"{name} (c = {charge:g})")
        ax.errorbar(frac, trained.mean(0), yerr=trained.std(0), fmt="s", color="C2", label="trained by gradient descent")
        ax.set_yscale("log")
        ax.set_xlabel("model size K/n")
        ax.set_ylabel("training loss (x0 units, time-grid mean)")
        ax.set_title(f"{case}: training losses")
        ax.legend(fontsize=7)
        ax = axes[row, 1]
        copies = np.stack([r["trained_memorized"] for r in runs])
        ax.errorbar(frac, copies.mean(0), yerr=copies.std(0), fmt="s-", color="C2", label="trained models")
        ax.axhline(np.mean([r["memorizer_memorized"] for r in runs]), color="k", ls="--", label="memorizer (yardstick)")
        ax.axhline(np.mean([r["fresh_memorized"] for r in runs]), color="k", ls=":", label="fresh draws (yardstick)")
        predicted = np.array([r["mc_crossover"] for r in runs])
        ax.axvspan(np.nanmin(predicted), np.nanmax(predicted), color="C0", alpha=0.25,
                   label="predicted crossover (brute force, seed range)")
        ax.axvline(float(runs[0]["formula_crossover"]), color="C0", ls="--", label="nearest-point formula")
        ax.axvline(float(runs[0]["upstream_crossover"]), color="C0", ls=":", label="upstream formula")
        ax.axvline(float(np.nanmean([r["empirical_crossover"] for r in runs])), color="C0", ls="-.",
                   label="formula with the fitted charge (seed mean)")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("model size K/n")
        ax.set_ylabel("share of samples copying a training point")
        ax.set_title(f"{case}: memorization of trained models")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, out_png)
    plt.close(fig)


def write_edge_report(paths, out_png, out_md) -> list[dict]:
    labs = load_labs(paths)
    rows = summary_rows(labs)
    write_table(labs, rows, out_md)
    draw_figure(labs, out_png)
    return rows
