"""pipeline.inception against clean-fid's own pieces, with a tiny stand-in for the weights file.

The stand-in has the real file's interface as `InceptionV3W` uses it: a TorchScript module with
a `layers` submodule mapping (B, 3, 299, 299) float -> (B, 2048), plus a forward taking
`return_features`. Pooling to 8x8 (not 1x1) keeps the features sensitive to the resize itself.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from cleanfid.fid import fid_from_feats, frechet_distance
from cleanfid.resize import make_resizer

from pipeline.inception import INCEPTION_FILE, fid_from_features, inception_features, load_inception


class _Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(8)
        self.fc = torch.nn.Linear(3 * 8 * 8, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


class _TinyInception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers((x - 128.0) / 128.0)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = _TinyInception().eval()
    path = tmp_path_factory.mktemp("weights") / INCEPTION_FILE["name"]
    torch.jit.save(torch.jit.script(model), str(path))
    return path, model


def by_hand(images, model):
    """clean-fid's clean resize, float32 CHW, (x - 128) / 128, the tiny network: one at a time."""
    resize = make_resizer("PIL", False, "bicubic", (299, 299))
    rows = []
    with torch.no_grad():
        for img in images:
            x = torch.from_numpy(resize(img).transpose(2, 0, 1).copy())[None]
            assert x.dtype == torch.float32 and x.shape == (1, 3, 299, 299)
            rows.append(model.layers((x - 128) / 128).numpy()[0])
    return np.asarray(rows, dtype=np.float64)


def test_missing_weights_name_the_path_and_the_rule(tmp_path):
    missing = tmp_path / "weights" / INCEPTION_FILE["name"]
    with pytest.raises(FileNotFoundError) as err:
        load_inception(missing)
    assert str(missing) in str(err.value)
    assert "fetch_inception" in str(err.value)
    with pytest.raises(FileNotFoundError):
        inception_features(np.zeros((1, 8, 8, 3), np.uint8), missing)


def test_loaded_model_is_in_eval_mode(tiny_weights):
    path, _ = tiny_weights
    model = load_inception(path)
    assert not model.training
    assert INCEPTION_FILE["url"].endswith(INCEPTION_FILE["name"])


def test_features_match_clean_fid_by_hand(tiny_weights):
    path, model = tiny_weights
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    feats = inception_features(images, path, batch_size=2)
    assert feats.shape == (5, 2048) and feats.dtype == np.float64
    np.testing.assert_allclose(feats, by_hand(images, model), rtol=1e-5, atol=1e-5)


def test_grayscale_is_repeated_to_rgb(tiny_weights):
    path, model = tiny_weights
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, size=(3, 28, 28, 1), dtype=np.uint8)
    rgb = np.repeat(gray, 3, axis=-1)
    feats = inception_features(gray, path, batch_size=64)
    assert feats.shape == (3, 2048)
    np.testing.assert_array_equal(feats, inception_features(rgb, path))
    np.testing.assert_allclose(feats, by_hand(rgb, model), rtol=1e-5, atol=1e-5)


def test_rejects_non_uint8_and_bad_shapes(tiny_weights):
    path, _ = tiny_weights
    with pytest.raises(ValueError):
        inception_features(np.zeros((2, 8, 8, 3), np.float32), path)
    with pytest.raises(ValueError):
        inception_features(np.zeros((2, 8, 8, 4), np.uint8), path)
    assert inception_features(np.zeros((0, 8, 8, 3), np.uint8), path).shape == (0, 2048)


def _exact_gaussian(rng, n, mu, var):
    """Samples whose sample mean is exactly mu and np.cov is exactly diag(var)."""
    z = rng.standard_normal((n, len(mu)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return z * np.sqrt(var) + mu


def test_fid_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(2).standard_normal((400, 16))
    assert abs(fid_from_features(feats, feats)) < 1e-6


def test_fid_matches_clean_fid_on_shifted_gaussians():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((500, 12))
    b = rng.standard_normal((600, 12)) * 1.5 + 0.7
    expected = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    got = fid_from_features(a, b)
    assert isinstance(got, float) and got > 1.0
    assert got == pytest.approx(expected, rel=1e-12)
    assert got == pytest.approx(fid_from_feats(a, b), rel=1e-12)


def test_fid_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(4)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.5, 2.0, 6), rng.uniform(0.5, 3.0, 6)
    a, b = _exact_gaussian(rng, 300, mu1, var1), _exact_gaussian(rng, 350, mu2, var2)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert fid_from_features(a, b) == pytest.approx(closed, rel=1e-9, abs=1e-9)


def test_fid_equals_clean_fid_on_png_folders_with_a_custom_feature_extractor(tiny_weights, tmp_path):
    """clean-fid's own folder path (`compute_fid(fdir1, fdir2, mode="clean", custom_feat_extractor=...)`:
    PIL reading, its resizer, batching) and this module's in-memory path give the same FID when both
    use the same feature network."""
    from PIL import Image
    from cleanfid import fid as cleanfid

    path, _ = tiny_weights
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (1, 32, 32, 3))
    sets = {"a": np.clip(base + rng.integers(-60, 61, (12, 32, 32, 3)), 0, 255).astype(np.uint8),
            "b": rng.integers(0, 256, (14, 32, 32, 3), dtype=np.uint8)}
    for name, images in sets.items():
        (tmp_path / name).mkdir()
        for i, img in enumerate(images):
            Image.fromarray(img).save(tmp_path / name / f"{i:03d}.png")
    extractor = load_inception(path)
    theirs = cleanfid.compute_fid(str(tmp_path / "a"), str(tmp_path / "b"), mode="clean", num_workers=0,
                                  batch_size=5, device=torch.device("cpu"), custom_feat_extractor=extractor,
                                  verbose=False)
    ours = fid_from_features(inception_features(sets["a"], path, batch_size=4),
                             inception_features(sets["b"], path, batch_size=4))
    assert ours > 1.0
    assert ours == pytest.approx(theirs, rel=1e-6)
