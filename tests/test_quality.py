"""digits-FD: the quality column must separate real-looking digits from blurred or noisy ones."""
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from pipeline.data import load_source
from pipeline.digits_classifier import train_digits_classifier
from pipeline.quality import compute_quality, frechet_from_features, write_reference_stats


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    images, labels = load_source({"source": "digits", "resolution": 16})
    stats = train_digits_classifier(images, labels, root / "clf", epochs=4)
    write_reference_stats("digits_fd", root / "clf", images, root / "ref.npz")
    return images, stats, root


def test_classifier_learns_digits(setup):
    _, stats, _ = setup
    assert stats["heldout_accuracy"] > 0.85
    assert stats["images"] == 1797


def test_fd_orders_real_blurred_and_noise(setup):
    images, _, root = setup
    rng = np.random.default_rng(0)
    real = images[rng.choice(len(images), 400, replace=False)]
    blurred = np.stack([gaussian_filter(im.astype(float), sigma=(1.2, 1.2, 0)) for im in real]).round().astype(np.uint8)
    noise = rng.integers(0, 256, real.shape, dtype=np.uint8)
    fd = {name: compute_quality("digits_fd", root / "clf", x, root / "ref.npz")["value"]
          for name, x in (("real", real), ("blurred", blurred), ("noise", noise))}
    assert fd["real"] < 0.5 * fd["blurred"] < 0.5 * fd["noise"]


def test_fd_of_reference_with_itself_is_zero(setup):
    images, _, root = setup
    q = compute_quality("digits_fd", root / "clf", images, root / "ref.npz")
    assert q["value"] == pytest.approx(0.0, abs=1e-3)
    assert q["name"] == "digits-FD" and q["num_reference"] == len(images)


def test_frechet_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 1.0, (200000, 3))
    b = rng.normal(1.0, 2.0, (200000, 3))
    # ||mu_a - mu_b||^2 + sum(var_a + var_b - 2 sqrt(var_a var_b)) = 3 + 3 * (1 + 4 - 4)
    assert frechet_from_features(a, b) == pytest.approx(6.0, rel=0.02)


def test_unknown_metric_and_missing_classifier(setup, tmp_path):
    images, _, root = setup
    with pytest.raises(ValueError, match="unknown quality metric"):
        compute_quality("bogus", root / "clf", images[:10], root / "ref.npz")
    with pytest.raises(FileNotFoundError, match="train_feature_net"):
        compute_quality("digits_fd", tmp_path / "none", images[:10], root / "ref.npz")


def test_reference_from_a_training_subset_counts_its_repeats(setup, tmp_path):
    """`reference-stats --subset`: statistics of the training distribution (repeats included), the
    alternative to the full dataset; the subset's own replay then scores 0 against it."""
    import json

    from pipeline.cli import main
    from pipeline.data import build_subset, write_subset

    images, _, root = setup
    labels = load_source({"source": "digits", "resolution": 16})[1]
    subset = build_subset(images, labels, {"kind": "repetition", "repeated_classes": [0], "per_class": 10,
                                           "repeats": 5, "others": 30, "seed": 0})
    write_subset(tmp_path / "s.parquet", subset, {})
    main(["reference-stats", "--kind", "digits_fd", "--feature-net", str(root / "clf"), "--subset",
          str(tmp_path / "s.parquet"), "--out", str(tmp_path / "s.npz")])
    main(["reference-stats", "--kind", "digits_fd", "--feature-net", str(root / "clf"), "--dataset",
          json.dumps({"source": "digits", "resolution": 16}), "--out", str(tmp_path / "d.npz")])
    replay = subset.images[subset.expanded_indices()]
    q_sub = compute_quality("digits_fd", root / "clf", replay, tmp_path / "s.npz")
    q_full = compute_quality("digits_fd", root / "clf", replay, tmp_path / "d.npz")
    assert q_sub["value"] == pytest.approx(0.0, abs=1e-3) and q_full["value"] > 1.0
    assert q_sub["num_reference"] == len(replay) == 10 * 5 + 30
    assert q_sub["reference"] == f"the training subset s ({len(replay)} images with repeats)"
    assert q_full["reference"] == f"the full digits dataset ({len(images)} images)"
    with pytest.raises(SystemExit, match="exactly one of"):
        main(["reference-stats", "--kind", "digits_fd", "--feature-net", str(root / "clf"), "--out", "x.npz"])


def test_frechet_distance_is_clean_fids():
    from cleanfid.fid import frechet_distance as clean_fid

    from pipeline.quality import frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(150, 16)) * 1.3 + 0.2
    stats = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(*stats) == pytest.approx(clean_fid(*stats), rel=1e-12)
    singular = (a[:3].mean(0), np.cov(a[:3], rowvar=False), b[:3].mean(0), np.cov(b[:3], rowvar=False))
    assert frechet_distance(*singular) == pytest.approx(clean_fid(*singular), rel=1e-9)


def test_classifier_inference_in_numpy_equals_the_torch_network(tmp_path):
    """digits-FD embeds with the classifier's forward pass written in numpy (no torch in metrics jobs):
    the same features and classes as the trained torch network, at 8 and 16 pixels."""
    import torch
    from safetensors.torch import load_file

    from pipeline.digits_classifier import ClassifierFeatures, _torch_network
    from pipeline.io import images_to_unit

    for resolution in (8, 16):
        images, labels = load_source({"source": "digits", "resolution": resolution})
        train_digits_classifier(images[:200], labels[:200], tmp_path / str(resolution), epochs=1)
        net = _torch_network(1, resolution)
        net.load_state_dict(load_file(str(tmp_path / str(resolution) / "model.safetensors")))
        with torch.no_grad():
            x = torch.from_numpy(images_to_unit(images[200:500]))
            want, classes = net.features(x).double().numpy(), net(x).argmax(1).numpy()
        ours = ClassifierFeatures(tmp_path / str(resolution))
        got = ours.features(images[200:500], batch_size=128)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert (ours.predict(images[200:500]) == classes).mean() > 0.99
    with pytest.raises(ValueError, match="takes 1 x 16"):
        ours.features(images[:4, :8, :8])
    # a multiple of its resolution is seen as block means: pixel-replicated digits embed as the originals
    doubled = images[200:210].repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_allclose(ours.features(doubled), ours.features(images[200:210]), rtol=1e-12)
    with pytest.raises(ValueError, match="integer multiples of 16"):
        ours.features(images[:4].repeat(3, axis=1)[:, :24].repeat(3, axis=2)[:, :, :24])
