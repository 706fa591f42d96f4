"""Sample-quality metrics: Frechet distances between feature statistics of samples and a reference set.

`digits_fd` needs no download: its features come from a small digits classifier that the
train_feature_net rule trains on the whole digits set (digits_classifier.py). It tells a student that
draws plausible digits from one that blurs, which pixel statistics alone cannot. `inception_fid` is
clean-fid's FID with the TorchScript Inception weights from a fetched local file. torch is imported
only for Inception: digits-FD runs in numpy.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .digits_classifier import ClassifierFeatures
from .io import atomic_output

log = logging.getLogger(__name__)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """clean-fid's `frechet_distance` (GaParmar/clean-fid cleanfid/fid.py, itself pytorch-fid's), step
    for step, and tested equal to it. Written out because clean-fid's module imports torchvision and
    torch._dynamo on load, about 3 s in every metrics job that needs only this formula."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} / {sigma1.shape} vs {mu2.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():  # a singular product: offset both diagonals, as clean-fid does
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the covariance square root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (clean-fid's formula)."""
    return float(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))


def _features(kind: str, feature_net: str | Path, images: np.ndarray) -> np.ndarray:
    if kind == "digits_fd":
        return ClassifierFeatures(feature_net).features(images)
    if kind == "inception_fid":
        import torch

        from .inception import inception_features

        return inception_features(images, feature_net, "cuda" if torch.cuda.is_available() else "cpu")
    raise ValueError(f"unknown quality metric {kind!r}; available: {sorted(METRIC_NAMES)}")


METRIC_NAMES = {"digits_fd": "digits-FD", "inception_fid": "FID"}


def write_reference_stats(kind: str, feature_net: str | Path, images: np.ndarray, out_path: str | Path,
                          what: str = "") -> None:
    """Feature mean and covariance of the reference set, computed once and shared by every metrics job.

    `what` names the set (a full dataset, or a model's training subset) in the tables' notes.
    """
    if len(images) < 2:
        raise ValueError(f"reference statistics need at least 2 images, got {len(images)} ({what or out_path})")
    feats = _features(kind, feature_net, images)
    with atomic_output(out_path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), n=len(feats), what=np.array(what))


def compute_quality(kind: str, feature_net: str | Path, images: np.ndarray, reference_stats: str | Path) -> dict:
    """Frechet distance of `images` to the reference statistics under the configured feature space."""
    if len(images) < 2:
        raise ValueError("a Frechet distance needs at least 2 samples")
    feats = _features(kind, feature_net, images)
    with np.load(reference_stats) as ref:
        value = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), ref["mu"], ref["sigma"])
        n_ref = int(ref["n"])
        what = str(ref["what"]) if "what" in ref.files else ""
    return {"name": METRIC_NAMES[kind], "value": float(value), "lower_is_better": True,
            "num_samples": len(images), "num_reference": n_ref, "reference": what}


def prompt_digits(prompts) -> np.ndarray:
    """The digit each prompt names (its first digit word or numeral, "a handwritten digit seven" -> 7),
    -1 where it names none."""
    import re

    from .data.sources import DIGIT_NAMES

    words = {w: i for i, w in enumerate(DIGIT_NAMES)} | {str(i): i for i in range(10)}
    out = []
    for p in prompts:
        found = [words[w] for w in re.findall(r"[a-z]+|[0-9]", str(p).lower()) if w in words]
        out.append(found[0] if found else -1)
    return np.asarray(out, dtype=np.int64)


def prompt_class_agreement(images: np.ndarray, prompts, classifier_dir: str | Path) -> dict:
    """The embedded data's download-free stand-in for the CLIP score of captioned digits: the share of
    samples the digits classifier reads as the digit their prompt names (over samples whose prompt
    names one). Real captioned digits score the classifier's accuracy: its yardstick."""
    named = prompt_digits(prompts)
    keep = named >= 0
    if not keep.any():
        raise ValueError("no prompt names a digit: the prompt-class agreement needs captioned digits")
    predicted = ClassifierFeatures(classifier_dir).predict(images[keep])
    return {"value": float((predicted == named[keep]).mean()), "n_samples": int(keep.sum()),
            "classifier": str(classifier_dir)}
