"""From Section 5's model to the experiments (ours; none of the anchors has it): the per-mode analysis
on a trained digits teacher, its penultimate features standing for the random features.

- Features: the input of the UNet's `conv_out` (channels x H x W, flattened to p), the layer the
  denoiser is linear in, at one noise level sigma, phi(x + sigma eta) over the unique training images
  and `noise_draws` draws each (N = n m feature vectors); a class-conditional teacher sees each
  image's own class.
- U = E[phi phi^T]: the curvature of the denoising loss in the last layer's weights, as in the model.
  Its modes come from the thin SVD of the N x p feature matrix (U has rank at most N, far below p).
- Gen modes: U's top d, d = the pixels of an image, as `random_features.mem_gen_threshold` counts
  them; the widest log gap of the nonzero spectrum is reported beside it.
- C = E[dphi dphi^T] along one Euler step of the teacher's probability-flow ODE from sigma to
  sigma (1 - step), both features at sigma: the model's fixed-time feature map.
- Excess response per mode (ours): u_k^T C u_k - tr(C) / p. A trained net's C has no known isotropic
  part; its mean over all p directions stands in for it. The Gen share of positive excess is the
  model's Gen share; it is also given without U's top mode, which for these features is their mean
  direction (the model's odd tanh features have none).
- Per training image, the share of its features' energy outside the Gen modes (its Mem share),
  against the number of the teacher's samples that copy it (`memorized` rows of the L2 search, by
  `nn1_index`): Spearman's rank correlation, beside the 95% range of the same correlation with the
  copy counts shuffled over the images (no relation), and when some images are never copied, the
  probability that a copied image has the larger Mem share (AUC, 0.5 for no relation).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

PERMUTATIONS = 2000


@dataclass
class BridgeResult:
    eigenvalues: np.ndarray  # U's nonzero spectrum, descending
    excess: np.ndarray  # per mode, in the same order
    gen_modes: int
    widest_gap_modes: int
    gen_share: float
    gen_share_without_top: float  # the top mode is the features' mean direction (no such mode in the tanh model)
    top_mean_cosine: float
    mem_share: np.ndarray  # per training image
    copies: np.ndarray  # per training image
    spearman: float
    null_range: tuple[float, float]
    auc: float
    auc_null_range: tuple[float, float]


def penultimate_features(model, x, sigma: float, labels=None):
    """The denoiser's output and the input of its UNet's conv_out at noise level sigma, flattened;
    `labels`: each image's class for a class-conditional teacher."""
    import torch

    captured = {}
    hook = model.net.unet.conv_out.register_forward_pre_hook(lambda module, args: captured.__setitem__("h", args[0]))
    try:
        denoised = model(x, torch.full((len(x),), float(sigma)), labels)
    finally:
        hook.remove()
    return denoised, captured["h"].flatten(1)


def feature_moments(model, images: np.ndarray, sigma: float, noise_draws: int, step: float, seed: int,
                    labels=None):
    """phi and dphi (N x p, float64) over `noise_draws` noisy copies of every image, and each row's image."""
    import torch

    from ..io import images_to_unit

    x = torch.from_numpy(images_to_unit(images))
    generator = torch.Generator().manual_seed(seed)
    phis, dphis = [], []
    with torch.no_grad():
        for _ in range(noise_draws):
            x_t = x + sigma * torch.randn(x.shape, generator=generator)
            denoised, phi = penultimate_features(model, x_t, sigma, labels)
            x_next = x_t - step * (x_t - denoised)  # Euler from sigma to sigma (1 - step): dx/dsigma = (x - D) / sigma
            _, phi_next = penultimate_features(model, x_next, sigma, labels)
            phis.append(phi.double())
            dphis.append((phi_next - phi).double())
    owner = np.tile(np.arange(len(images)), noise_draws)
    return torch.cat(phis).numpy(), torch.cat(dphis).numpy(), owner


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation, ties at their average rank (most images are copied 0 times)."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(a positive's score exceeds a negative's), ties counted half; nan without both kinds."""
    if not positive.any() or positive.all():
        return float("nan")
    diff = scores[positive][:, None] - scores[~positive][None, :]
    return float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))


def analyse_features(phi: np.ndarray, dphi: np.ndarray, owner: np.ndarray, data_dim: int, copies: np.ndarray,
                     seed: int = 0) -> BridgeResult:
    """Everything of the module docstring from the feature matrices and the per-image copy counts."""
    count, p = phi.shape
    _, singular, modes = np.linalg.svd(phi / np.sqrt(count), full_matrices=False)
    keep = singular > singular[0] * 1e-10
    eigenvalues, modes = singular[keep] ** 2, modes[keep]
    excess = np.sum((dphi @ modes.T) ** 2, axis=0) / count - np.sum(dphi ** 2) / count / p
    order = np.arange(len(eigenvalues))
    gen = order < data_dim
    positive = np.clip(excess, 0.0, None)

    def gen_share(kept: np.ndarray) -> float:
        total = positive[kept].sum()
        return float(positive[kept & gen].sum() / total) if total > 0 else float("nan")

    mean = phi.mean(axis=0)
    top_mean_cosine = float(abs(modes[0] @ mean) / np.linalg.norm(mean)) if np.linalg.norm(mean) > 0 else 0.0
    outside = 1.0 - np.sum((phi @ modes[gen].T) ** 2, axis=1) / np.sum(phi ** 2, axis=1)
    n = int(owner.max()) + 1
    mem_share = np.bincount(owner, weights=outside, minlength=n) / np.bincount(owner, minlength=n)
    rng = np.random.default_rng(seed)
    shuffled = [rng.permutation(copies) for _ in range(PERMUTATIONS)]
    return BridgeResult(
        eigenvalues=eigenvalues, excess=excess, gen_modes=int(gen.sum()),
        widest_gap_modes=int(np.argmax(-np.diff(np.log(eigenvalues)))) + 1,
        gen_share=gen_share(order >= 0), gen_share_without_top=gen_share(order > 0), top_mean_cosine=top_mean_cosine,
        mem_share=mem_share, copies=copies, spearman=spearman(mem_share, copies),
        null_range=_range([spearman(mem_share, c) for c in shuffled]),
        auc=auc(mem_share, copies > 0), auc_null_range=_range([auc(mem_share, c > 0) for c in shuffled]),
    )


def _range(values) -> tuple[float, float]:
    """The central 95% of a permutation distribution (nan when it is undefined)."""
    values = np.asarray(values, dtype=float)
    if np.isnan(values).all():
        return float("nan"), float("nan")
    return float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5))


def copy_counts(neighbours_path: str | Path, n: int) -> np.ndarray:
    """How many of the teacher's samples the L2 ratio test calls copies of each training image."""
    import pyarrow.parquet as pq

    table = pq.read_table(neighbours_path, columns=["nn1_index", "memorized"])
    index, memorized = table.column("nn1_index").to_numpy(), table.column("memorized").to_numpy(zero_copy_only=False)
    return np.bincount(index[memorized.astype(bool)], minlength=n)


def run_bridge(model_dir: str | Path, subset_path: str | Path, neighbours_path: str | Path, spec: Mapping[str, Any],
               model_id: str, out_md: str | Path, out_png: str | Path) -> BridgeResult:
    from ..data import read_subset
    from ..modelio import load_model
    from ..nets import class_labels

    model, meta = load_model(model_dir)
    subset = read_subset(subset_path)
    labels = class_labels(meta["net"], subset.labels)  # None for an unconditional teacher
    phi, dphi, owner = feature_moments(model, subset.images, float(spec["sigma"]), int(spec["noise_draws"]),
                                       float(spec["step"]), int(spec["seed"]), labels)
    result = analyse_features(phi, dphi, owner, int(np.prod(subset.images.shape[1:])),
                              copy_counts(neighbours_path, len(subset.images)), seed=int(spec["seed"]))
    write_bridge_table(result, model_id, phi.shape, spec, out_md)
    bridge_figure(result, model_id, out_png)
    return result


def write_bridge_table(r: BridgeResult, model_id: str, shape, spec: Mapping[str, Any], out: str | Path) -> None:
    from ..io import atomic_output

    copied = r.copies > 0
    lines = [f"# The per-mode analysis on {model_id}'s penultimate features", "",
             f"{len(r.copies)} training images x {spec['noise_draws']} noise draws at sigma = {spec['sigma']:g} "
             f"({shape[0]} feature vectors of p = {shape[1]}); Euler step {spec['step']:g} of sigma.", "",
             "| quantity | value | yardstick |", "|---|---|---|",
             f"| U's nonzero modes | {len(r.eigenvalues)} | at most the {shape[0]} feature vectors |",
             f"| Gen modes (top d) | {r.gen_modes} | widest log gap after {r.widest_gap_modes} modes |",
             f"| Gen share of positive excess CD response | {r.gen_share:.3f} | "
             f"{r.gen_modes / len(r.eigenvalues):.3f} if spread evenly over the nonzero modes |",
             f"| the same without the top mode (cosine {r.top_mean_cosine:.4f} with the features' mean) | "
             f"{r.gen_share_without_top:.3f} | {(r.gen_modes - 1) / (len(r.eigenvalues) - 1):.3f} if spread evenly |",
             f"| training images copied by at least one sample | {int(copied.sum())} of {len(r.copies)} | |",
             f"| Mem share of an image's features, mean (range) | {r.mem_share.mean():.4f} "
             f"({r.mem_share.min():.4f}-{r.mem_share.max():.4f}) | |",
             f"| Spearman(Mem share, copies) | {r.spearman:.3f} | {r.null_range[0]:.3f} to {r.null_range[1]:.3f} "
             f"(95% with copies shuffled) |",
             f"| P(copied image has the larger Mem share) | "
             + ("n/a (every image or none copied) | |" if np.isnan(r.auc) else
                f"{r.auc:.3f} | {r.auc_null_range[0]:.3f} to {r.auc_null_range[1]:.3f} (95% with copies shuffled) |"),
             ""]
    with atomic_output(out) as tmp:
        Path(tmp).write_text("\n".join(lines))


def bridge_figure(r: BridgeResult, model_id: str, out: str | Path) -> None:
    from ..io import pyplot
    from .report import _figure

    plt = pyplot()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    gen = np.arange(len(r.eigenvalues)) < r.gen_modes
    bins = np.geomspace(r.eigenvalues.min(), r.eigenvalues.max(), 60)
    a.hist([r.eigenvalues[~gen], r.eigenvalues[gen]], bins=bins, stacked=True, color=["tab:red", "tab:blue"],
           label=[f"Mem ({(~gen).sum()})", f"Gen ({gen.sum()})"])
    a.set(xscale="log", xlabel="eigenvalue of U", ylabel="modes", title=f"(a) {model_id}: U of the penultimate features")
    a.legend()
    b.scatter(r.eigenvalues[~gen], r.excess[~gen], s=4, color="tab:red", label="Mem")
    b.scatter(r.eigenvalues[gen], r.excess[gen], s=4, color="tab:blue", label="Gen")
    b.axhline(0.0, color="k", lw=0.5)
    b.set(xscale="log", xlabel="eigenvalue of U", ylabel="u^T C u - tr C / p",
          title=f"(b) excess CD response, Gen share {r.gen_share:.3f}")
    c.scatter(r.copies, r.mem_share, s=10)
    c.set(xlabel="samples copying the image (L2 ratio)", ylabel="Mem share of its features",
          title=f"(c) Spearman {r.spearman:.2f} (shuffled: {r.null_range[0]:.2f} to {r.null_range[1]:.2f})")
    _figure(Path(out), fig)
    plt.close(fig)
