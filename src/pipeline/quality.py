"""Sample-quality metrics: Frechet distances between feature statistics of samples and a reference set.

`digits_fd` needs no download: its features come from a small digits classifier that the
train_feature_net rule trains on the whole digits set. It tells a student that draws plausible
digits from one that blurs, which pixel statistics alone cannot. `inception_fid` is clean-fid's
FID with the TorchScript Inception weights from a fetched local file.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .io import atomic_output, images_to_unit, read_json, write_json

log = logging.getLogger(__name__)


class DigitsClassifier(nn.Module):
    """A small CNN whose penultimate layer (64 features) serves as the embedding for digits-FD."""

    def __init__(self, channels: int = 1, resolution: int = 16, features: int = 64, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (resolution // 4) ** 2, features), nn.ReLU(),
        )
        self.head = nn.Linear(features, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_digits_classifier(images: np.ndarray, labels: np.ndarray, out_dir: str | Path, epochs: int = 30,
                            seed: int = 0, holdout: float = 0.2) -> dict:
    """Train on all images after reporting accuracy on a held-out split from a first, identical run."""
    from safetensors.torch import save_file

    x = torch.from_numpy(images_to_unit(images))
    y = torch.from_numpy(labels.astype(np.int64))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    n_val = int(len(x) * holdout)
    val, tr = perm[:n_val], perm[n_val:]
    probe = _fit(x[tr], y[tr], epochs, seed)
    with torch.no_grad():
        val_acc = (probe(x[val]).argmax(1) == y[val]).float().mean().item()
    net = _fit(x, y, epochs, seed)
    with torch.no_grad():
        train_acc = (net(x).argmax(1) == y).float().mean().item()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_dir / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    stats = {"heldout_accuracy": val_acc, "train_accuracy": train_acc, "epochs": epochs, "images": len(x),
             "channels": int(x.shape[1]), "resolution": int(x.shape[2])}
    write_json(out_dir / "config.json", stats)
    log.info("digits classifier: held-out accuracy %.3f, train accuracy %.3f", val_acc, train_acc)
    return stats


def _fit(x, y, epochs, seed, batch_size=64):
    torch.manual_seed(seed)
    net = DigitsClassifier(x.shape[1], x.shape[2])
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="classifier", mininterval=5):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def load_digits_classifier(model_dir: str | Path) -> DigitsClassifier:
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    if not (model_dir / "model.safetensors").exists():
        raise FileNotFoundError(f"{model_dir / 'model.safetensors'} is missing: it is written by the train_feature_net rule")
    cfg = read_json(model_dir / "config.json")
    net = DigitsClassifier(cfg["channels"], cfg["resolution"])
    net.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    return net.eval()


@torch.no_grad()
def classifier_features(net: DigitsClassifier, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    x = torch.from_numpy(images_to_unit(images))
    return torch.cat([net.features(b) for b in x.split(batch_size)]).double().numpy()


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
        return classifier_features(load_digits_classifier(feature_net), images)
    if kind == "inception_fid":
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


@torch.no_grad()
def prompt_class_agreement(images: np.ndarray, prompts, classifier_dir: str | Path) -> dict:
    """The embedded data's download-free stand-in for the CLIP score of captioned digits: the share of
    samples the digits classifier reads as the digit their prompt names (over samples whose prompt
    names one). Real captioned digits score the classifier's accuracy: its yardstick."""
    named = prompt_digits(prompts)
    keep = named >= 0
    if not keep.any():
        raise ValueError("no prompt names a digit: the prompt-class agreement needs captioned digits")
    net = load_digits_classifier(classifier_dir)
    x = torch.from_numpy(images_to_unit(images[keep]))
    predicted = torch.cat([net(b).argmax(1) for b in x.split(512)]).numpy()
    return {"value": float((predicted == named[keep]).mean()), "n_samples": int(keep.sum()),
            "classifier": str(classifier_dir)}
