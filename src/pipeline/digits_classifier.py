"""The digits classifier behind digits-FD (quality.py) and the embedded data's copy-detection stand-in
(embed.py): a small CNN trained by the train_feature_net rule, whose penultimate layer (64 features)
is the embedding.

Training uses torch (`train_digits_classifier`). Inference is written out in numpy
(`ClassifierFeatures`): two 3x3 convolutions with ReLU and 2x2 max-pooling, then two linear layers,
read from the same safetensors file and tested equal to the torch network's forward pass. Every
metrics job embeds its samples with it, and torch alone costs about 3 s to import in each of them,
which is most of what such a job does on the embedded data.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .io import atomic_output, images_to_unit, read_json, write_json

log = logging.getLogger(__name__)


def _torch_network(channels: int, resolution: int, features: int = 64, classes: int = 10):
    """The classifier as a torch module (built here so that importing this module needs no torch)."""
    from torch import nn

    class DigitsClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(64 * (resolution // 4) ** 2, features), nn.ReLU(),
            )
            self.head = nn.Linear(features, classes)

        def features(self, x):
            return self.body(x)

        def forward(self, x):
            return self.head(self.body(x))

    return DigitsClassifier()


def train_digits_classifier(images: np.ndarray, labels: np.ndarray, out_dir: str | Path, epochs: int = 30,
                            seed: int = 0, holdout: float = 0.2) -> dict:
    """Train on all images after reporting accuracy on a held-out split from a first, identical run."""
    import torch
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
    import torch
    from torch import nn
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    net = _torch_network(x.shape[1], x.shape[2])
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="classifier", mininterval=5):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


class ClassifierFeatures:
    """The trained classifier's forward pass in numpy (float32, as torch computes it): `features` (the
    64-d penultimate layer, float64 for the statistics) and `predict` (the class)."""

    def __init__(self, model_dir: str | Path):
        from safetensors.numpy import load_file

        model_dir = Path(model_dir)
        if not (model_dir / "model.safetensors").exists():
            raise FileNotFoundError(f"{model_dir / 'model.safetensors'} is missing: it is written by the "
                                    "train_feature_net rule")
        self.config = read_json(model_dir / "config.json")
        self.w = load_file(str(model_dir / "model.safetensors"))

    def _body(self, images: np.ndarray) -> np.ndarray:
        x = images_to_unit(images)
        c, r = self.config["channels"], self.config["resolution"]
        if x.shape[1] == c and x.shape[2] == x.shape[3] and x.shape[2] > r and x.shape[2] % r == 0:
            # digits drawn at a multiple of the classifier's resolution are seen at its own, as block means
            # (the way Inception-based FID resizes every image to 299 px): one feature net for a config whose
            # models train at several resolutions
            k = x.shape[2] // r
            x = x.reshape(len(x), c, r, k, r, k).mean(axis=(3, 5))
        if x.shape[1:] != (c, r, r):
            raise ValueError(f"the digits classifier takes {c} x {r}^2 images (or integer multiples of {r} px), got "
                             f"{x.shape[1:]}: train it on the samples' resolution")
        x = _maxpool2(_relu(_conv3x3(x, self.w["body.0.weight"], self.w["body.0.bias"])))
        x = _maxpool2(_relu(_conv3x3(x, self.w["body.3.weight"], self.w["body.3.bias"])))
        return _relu(x.reshape(len(x), -1) @ self.w["body.7.weight"].T + self.w["body.7.bias"])

    def features(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        return np.concatenate([self._body(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
                              ).astype(np.float64)

    def predict(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        feats = self.features(images, batch_size).astype(np.float32)
        return (feats @ self.w["head.weight"].T + self.w["head.bias"]).argmax(1)


def _conv3x3(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """A 3x3 convolution with zero padding 1 (NCHW): every 3x3 window against every filter."""
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3), axis=(2, 3))
    return np.einsum("nchwij,ocij->nohw", windows, weight, optimize=True) + bias[None, :, None, None]


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def _maxpool2(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    return x[:, :, :h // 2 * 2, :w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
