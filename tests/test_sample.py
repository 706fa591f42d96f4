"""Sampling: per-sample seeds, shard layout independence, Parquet round trips and corrupt-shard detection."""
import json

import numpy as np
import pytest
import torch

from pipeline.io import CorruptFileError, read_image_table, write_image_table
from pipeline.modelio import load_model, model_meta, save_model
from pipeline.nets import build_net
from tiny import TINY_UNET
from pipeline.diffusion import ConsistencyFunction, EDMDenoiser
from pipeline.sample import (NoiseStream, consistency_ts, generate, sample_labels, sample_noise, sample_seed, sampler_nfe,
                             write_shard)
from pipeline.shards import num_shards, read_samples, shard_range, write_manifest



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random-weight EDM teacher and consistency student, saved as model directories."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    dirs = {}
    for kind, cls in (("edm", EDMDenoiser), ("consistency", ConsistencyFunction)):
        model = cls(build_net(TINY_UNET, 8, 1))
        meta = model_meta(kind, TINY_UNET, 8, 1, 0.5, 0.002, 80.0)
        save_model(root / kind, model, meta, {"steps": 0})
        dirs[kind] = root / kind
    return dirs


def test_sample_seed_depends_only_on_run_seed_and_index():
    assert sample_seed(0, 5) == sample_seed(0, 5)
    seeds = {sample_seed(0, i) for i in range(1000)}
    assert len(seeds) == 1000
    assert sample_seed(1, 5) != sample_seed(0, 5)
    assert all(0 <= s < 2 ** 63 for s in seeds)


def test_noise_of_a_sample_does_not_depend_on_its_batch():
    seeds = [sample_seed(3, i) for i in range(6)]
    whole = sample_noise(seeds, 2, (1, 4, 4))
    parts = [sample_noise(seeds[:2], 2, (1, 4, 4)), sample_noise(seeds[2:], 2, (1, 4, 4))]
    for k in range(2):
        assert torch.equal(whole[k], torch.cat([parts[0][k], parts[1][k]]))
    assert not torch.equal(whole[0], whole[1])  # each step draws fresh noise


def test_shard_ranges_cover_every_sample_once():
    n, size = 23, 5
    covered = [i for k in range(num_shards(n, size)) for i in shard_range(k, size, n)]
    assert covered == list(range(n))
    with pytest.raises(ValueError):
        shard_range(5, size, n)


@pytest.mark.parametrize("kind,sampler", [("edm", {"kind": "heun", "steps": 3}),
                                          ("edm", {"kind": "stochastic", "steps": 3, "S_churn": 40, "S_min": 0.05,
                                                   "S_max": 50.0, "S_noise": 1.003}),
                                          ("consistency", {"kind": "consistency", "ts": [80.0, 0.8]}),
                                          ("consistency", {"kind": "consistency", "grid_steps": 18, "ts_index": [0, 11]})])
def test_samples_identical_whatever_the_shard_size(models, tmp_path, kind, sampler):
    n = 7
    images = {}
    for shard_size, batch in ((7, 7), (3, 2)):
        paths = []
        for k in range(num_shards(n, shard_size)):
            out = tmp_path / f"{shard_size}" / f"shard-{k:05d}.parquet"
            write_shard(models[kind], out, "s", sampler, k, shard_size, n, run_seed=11, model_id="m",
                        batch_size=batch, device="cpu")
            paths.append(out)
        write_manifest(paths, tmp_path / f"{shard_size}" / "manifest.json", shard_size, n)
        imgs, table, manifest = read_samples(tmp_path / f"{shard_size}" / "manifest.json")
        assert table.column("sample_id").to_pylist() == list(range(n))
        assert table.column("seed").to_pylist() == [sample_seed(11, i) for i in range(n)]
        assert set(table.column("nfe").to_pylist()) == {5 if kind == "edm" else 2}
        assert manifest["num_samples"] == n
        images[shard_size] = imgs
    assert images[7].dtype == np.uint8 and images[7].shape == (n, 8, 8, 1)
    np.testing.assert_array_equal(images[7], images[3])


def test_stochastic_sampler_draws_per_sample_churn_noise(models):
    """A sample's churn noise comes from its own seed: the same seed gives the same image in any batch,
    and churn changes the image against the deterministic sampler from the same initial noise."""
    model, meta = load_model(models["edm"])
    churn = {"kind": "stochastic", "steps": 4, "S_churn": 80, "S_min": 0.0, "S_max": 1e9, "S_noise": 1.0}
    seeds = [sample_seed(5, i) for i in range(6)]
    whole = generate(model, meta, churn, seeds)
    np.testing.assert_array_equal(whole[2:4], generate(model, meta, churn, seeds[2:4]))
    heun = generate(model, meta, {"kind": "heun", "steps": 4}, seeds)
    assert not np.array_equal(whole, heun)
    off = dict(churn, S_min=1e8)  # churn configured but never active: exactly the deterministic sampler
    np.testing.assert_array_equal(generate(model, meta, off, seeds), heun)
    assert sampler_nfe(churn) == 7


def test_consistency_ts_from_grid_indices():
    """The reference's ts as indices into the Karras grid: CIFAR-10 [0, 11] of 18, ImageNet-64 [0, 22] of 40."""
    assert consistency_ts({"ts": [80.0, 0.821]}, 0.002, 80.0) == [80.0, 0.821]
    cifar = consistency_ts({"grid_steps": 18, "ts_index": [0, 11]}, 0.002, 80.0)
    assert cifar[0] == pytest.approx(80.0) and cifar[1] == pytest.approx(0.5853, abs=1e-4)
    imagenet = consistency_ts({"grid_steps": 40, "ts_index": [0, 22]}, 0.002, 80.0)
    assert imagenet[1] == pytest.approx(1.3824, abs=1e-4)
    assert sampler_nfe({"kind": "consistency", "grid_steps": 18, "ts_index": [0, 11]}) == 2


def test_noise_stream_equals_drawing_all_at_once():
    seeds = [sample_seed(1, i) for i in range(5)]
    stream = NoiseStream(seeds, (1, 4, 4))
    drawn = sample_noise(seeds, 3, (1, 4, 4))
    for k in range(3):
        assert torch.equal(stream(), drawn[k])


def test_sampler_must_match_model_kind(models):
    model, meta = load_model(models["edm"])
    with pytest.raises(ValueError, match="consistency model"):
        generate(model, meta, {"kind": "consistency", "ts": [80.0]}, [1, 2])
    with pytest.raises(ValueError, match="labels were given to an unconditional model"):
        generate(model, meta, {"kind": "heun", "steps": 2}, [1, 2], labels=[0, 1])


def test_sample_labels_are_uniform_and_depend_only_on_run_seed_and_index():
    labels = sample_labels(0, range(20000), 10)
    np.testing.assert_array_equal(labels[500:510], sample_labels(0, range(500, 510), 10))
    assert not np.array_equal(labels[:100], sample_labels(1, range(100), 10))
    counts = np.bincount(labels, minlength=10)
    assert counts.min() > 1800 and counts.max() < 2200  # 2000 +- 4.7 standard deviations


def test_missing_model_names_the_rule(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_teacher or distill"):
        load_model(tmp_path / "nowhere")


def test_image_table_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 4, 3, 2), dtype=np.uint8)
    write_image_table(tmp_path / "t.parquet", images, {"a": np.arange(5), "b": list("vwxyz")}, {"k": "v"})
    back, table, meta = read_image_table(tmp_path / "t.parquet", expected_rows=5)
    np.testing.assert_array_equal(back, images)
    assert table.column("b").to_pylist() == list("vwxyz")
    assert meta == {"k": "v"}
    with pytest.raises(CorruptFileError, match="expected 6"):
        read_image_table(tmp_path / "t.parquet", expected_rows=6)


def test_truncated_and_tampered_shards_are_detected(models, tmp_path):
    sampler = {"kind": "heun", "steps": 2}
    paths = [tmp_path / f"shard-{k:05d}.parquet" for k in range(2)]
    for k, p in enumerate(paths):
        write_shard(models["edm"], p, "s", sampler, k, 4, 8, run_seed=0, model_id="m", device="cpu")
    write_manifest(paths, tmp_path / "manifest.json", 4, 8)
    read_samples(tmp_path / "manifest.json")

    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="checksum"):
        read_samples(tmp_path / "manifest.json")
    with pytest.raises(CorruptFileError, match="unreadable"):
        read_image_table(paths[1])
    with pytest.raises(CorruptFileError):
        write_manifest(paths, tmp_path / "manifest2.json", 4, 8)
    assert not (tmp_path / "manifest2.json").exists()


def test_manifest_rejects_shards_out_of_order(models, tmp_path):
    sampler = {"kind": "heun", "steps": 2}
    paths = [tmp_path / f"shard-{k:05d}.parquet" for k in range(2)]
    for k, p in enumerate(paths):
        write_shard(models["edm"], p, "s", sampler, k, 4, 8, run_seed=0, model_id="m", device="cpu")
    with pytest.raises(CorruptFileError, match="do not continue"):
        write_manifest(paths[::-1], tmp_path / "manifest.json", 4, 8)
    json.dumps(write_manifest(paths, tmp_path / "manifest.json", 4, 8))


def test_sample_command_writes_a_one_shard_sets_manifest(models, tmp_path):
    """`sample --manifest` (the sample_set rule) writes the manifest the manifest command would, and
    refuses a set of more than one shard before drawing anything."""
    from pipeline.cli import main

    args = ["sample", "--model", str(models["edm"]), "--model-id", "m", "--sampler-name", "s",
            "--sampler", json.dumps({"kind": "heun", "steps": 2}), "--shard", "0", "--seed", "3", "--batch-size", "4"]
    one = tmp_path / "one"
    assert main(args + ["--shard-size", "6", "--num-samples", "6", "--out", str(one / "shard-00000.parquet"),
                        "--manifest", str(one / "manifest.json")]) == 0
    written = json.loads((one / "manifest.json").read_text())
    assert written == write_manifest([one / "shard-00000.parquet"], tmp_path / "expected.json", 6, 6)
    assert written["shards"][0]["rows"] == 6 and read_samples(one / "manifest.json")[0].shape[0] == 6

    two = tmp_path / "two"
    with pytest.raises(SystemExit, match="one shard"):
        main(args + ["--shard-size", "3", "--num-samples", "6", "--out", str(two / "shard-00000.parquet"),
                     "--manifest", str(two / "manifest.json")])
    assert not two.exists()
