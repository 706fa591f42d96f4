"""SSCD descriptors (with a tiny TorchScript model the test scripts), similarity statistics, and the
standalone audit command on folders of PNGs with planted copies."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.embed import IMAGENET_MEAN, IMAGENET_STD, load_sscd, sscd, sscd_preprocess
from pipeline.io import write_image_table
from pipeline.memorization import similarity_summary


@pytest.fixture(scope="module")
def sscd_file(tmp_path_factory):
    """A stand-in for sscd_disc_mixup.torchscript.pt: a scripted conv net with a 512-d output."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(64, 512))
    path = tmp_path_factory.mktemp("sscd") / "sscd_tiny.torchscript.pt"
    torch.jit.script(net).save(str(path))
    return path


def test_sscd_preprocessing_shapes_and_normalisation():
    grey = np.full((2, 16, 16, 1), 255, np.uint8)
    x = sscd_preprocess(grey, "official")
    assert x.shape == (2, 3, 288, 288)  # short side to 288: small images are upsampled
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 100, 100], expected)
    wide = np.zeros((1, 16, 32, 3), np.uint8)
    assert sscd_preprocess(wide, "official").shape == (1, 3, 288, 576)
    assert sscd_preprocess(wide, "square_320").shape == (1, 3, 320, 320)
    dcr = sscd_preprocess(grey, "dcr")  # Resize(256), CenterCrop(224), inputs in [-1, 1]
    assert dcr.shape == (2, 3, 224, 224) and torch.allclose(dcr, torch.ones_like(dcr))
    assert sscd_preprocess(wide, "dcr").shape == (1, 3, 224, 224)
    with pytest.raises(ValueError, match="unknown SSCD preprocessing"):
        sscd_preprocess(wide, "dcr_but_misspelled")


def test_sscd_descriptors_are_unit_vectors(sscd_file):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    d = sscd(images, sscd_file, batch_size=2, device="cpu")
    assert d.shape == (5, 512) and d.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, rtol=1e-5)
    again = sscd(images[[3, 1]], sscd_file, device="cpu")
    np.testing.assert_allclose(again, d[[3, 1]], rtol=1e-5, atol=1e-6)


def test_missing_sscd_file_names_the_rule(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch_sscd"):
        load_sscd(tmp_path / "sscd_disc_mixup.torchscript.pt")


def test_similarity_summary_by_hand():
    sim = np.array([0.2, 0.4, 0.6, 0.9, 0.45])
    out = similarity_summary(sim, groups=np.array(["a", "a", "b", "b", "a"]), threshold=0.5)
    assert out["mem_ratio"] == pytest.approx(0.4) and out["max"] == 0.9 and out["mean"] == pytest.approx(0.51)
    assert out["p95"] == pytest.approx(np.percentile(sim, 95))
    assert out["by_group"]["b"]["mem_ratio"] == 1.0 and out["by_group"]["a"]["mem_ratio"] == 0.0
    assert sum(g["n_samples"] for g in out["by_group"].values()) == 5
    assert similarity_summary(np.array([0.5]), threshold=0.5)["mem_ratio"] == 0.0  # strictly above


def _save_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:04d}.png")


@pytest.fixture
def planted(tmp_path):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (30, 16, 16, 3), dtype=np.uint8)
    samples = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    copies = {3: 7, 8: 0, 11: 21, 15: 29, 19: 13}  # sample -> training image copied verbatim
    near = {5: 2, 17: 18}                          # sample -> training image copied with +-2 noise
    for s, t in copies.items():
        samples[s] = train[t]
    for s, t in near.items():
        samples[s] = np.clip(train[t].astype(int) + rng.integers(-2, 3, train[t].shape), 0, 255)
    _save_pngs(tmp_path / "train", train)
    _save_pngs(tmp_path / "samples", samples)
    return tmp_path, {**copies, **near}


def test_audit_pixels_finds_exactly_the_planted_copies(planted):
    root, truth = planted
    out = root / "audit.json"
    code = main(["audit", "--train", str(root / "train"), "--samples", str(root / "samples"), "--out", str(out),
                 "--figure", str(root / "audit.png"), "--count", "10"])
    result = json.loads(out.read_text())
    assert code == 0 and result["passed"]
    assert result["mem_ratio"] == pytest.approx(len(truth) / 20)
    flagged = {e["sample"]: e["nearest_train"] for e in result["most_copied"] if e["flagged"]}
    assert flagged == truth
    assert {e["sample"] for e in result["most_copied"][:len(truth)]} == set(truth)
    with Image.open(root / "audit.png") as im:
        assert im.format == "PNG" and im.size[0] > 0


def test_audit_is_a_release_gate(planted):
    root, truth = planted
    args = ["audit", "--train", str(root / "train"), "--samples", str(root / "samples"), "--out", str(root / "a.json")]
    assert main(args + ["--fail-above", "0.1"]) == 1
    assert json.loads((root / "a.json").read_text())["passed"] is False
    assert main(args + ["--fail-above", "0.5"]) == 0


def test_audit_sscd_space(planted, sscd_file):
    root, truth = planted
    out = root / "sscd.json"
    main(["audit", "--train", str(root / "train"), "--samples", str(root / "samples"), "--space", "sscd",
          "--sscd-weights", str(sscd_file), "--out", str(out), "--device", "cpu", "--count", "20"])
    result = json.loads(out.read_text())
    assert result["n_samples"] == 20 and set(result) >= {"mem_ratio", "p95", "mean", "max", "threshold"}
    assert result["max"] == pytest.approx(1.0, abs=1e-5)  # verbatim copies have identical descriptors
    verbatim = {3, 8, 11, 15, 19}
    assert {e["sample"] for e in result["most_copied"][:5]} == verbatim
    assert all(e["nearest_train"] == truth[e["sample"]] for e in result["most_copied"][:5])


def test_audit_reads_parquet_tables_and_dedupes_training_images(planted, tmp_path):
    root, truth = planted
    train = np.stack([np.asarray(Image.open(root / "train" / f"{i:04d}.png")) for i in range(30)])
    doubled = np.concatenate([train, train[:5]])  # repeated images: stored once for the search
    write_image_table(tmp_path / "train.parquet", doubled, {"group": ["g"] * 35})
    out = tmp_path / "p.json"
    main(["audit", "--train", str(tmp_path / "train.parquet"), "--samples", str(root / "samples"), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["n_train_unique"] == 30 and result["mem_ratio"] == pytest.approx(len(truth) / 20)
    assert result["by_group"]["g"]["n_samples"] == 20


def test_audit_bad_inputs(planted, tmp_path):
    root, _ = planted
    mixed = tmp_path / "mixed"
    _save_pngs(mixed, [np.zeros((16, 16, 3), np.uint8)])
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(mixed / "small.png")
    base = ["--out", str(tmp_path / "x.json")]
    with pytest.raises(ValueError, match="mixes image sizes.*small.png"):
        main(["audit", "--train", str(root / "train"), "--samples", str(mixed)] + base)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        main(["audit", "--train", str(root / "train"), "--samples", str(tmp_path / "empty")] + base)
    write_image_table(tmp_path / "none.parquet", np.zeros((0, 16, 16, 3), np.uint8), {})
    with pytest.raises(ValueError, match="holds no images"):
        main(["audit", "--train", str(root / "train"), "--samples", str(tmp_path / "none.parquet")] + base)
    with pytest.raises(FileNotFoundError, match="fetch_sscd"):
        main(["audit", "--train", str(root / "train"), "--samples", str(root / "samples"), "--space", "sscd",
              "--sscd-weights", str(tmp_path / "sscd_disc_mixup.torchscript.pt")] + base)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["audit", "--train", str(tmp_path / "nope"), "--samples", str(root / "samples")] + base)


def test_embeddings_round_trip_and_corruption(tmp_path):
    from pipeline.embed import read_embeddings, write_embeddings
    from pipeline.io import CorruptFileError

    v = np.random.default_rng(0).standard_normal((7, 512)).astype(np.float32)
    write_embeddings(v, tmp_path / "e.npy", {"space": "sscd"})
    assert np.array_equal(read_embeddings(tmp_path / "e.npy"), v)
    np.save(tmp_path / "e.npy", v[:5])
    with pytest.raises(CorruptFileError, match="manifest says"):
        read_embeddings(tmp_path / "e.npy")
    (tmp_path / "e.npy").write_bytes(b"not an array")
    with pytest.raises(CorruptFileError, match="not a readable"):
        read_embeddings(tmp_path / "e.npy")
    with pytest.raises(FileNotFoundError, match="embed rule"):
        read_embeddings(tmp_path / "absent.npy")
