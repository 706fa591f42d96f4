"""Class labels end to end (the study's ImageNet models are class-conditional): a tiny conditional
teacher on two digit classes trains, generates each class on request, writes shards whose `label`
column is the class each sample was generated for, distils into a conditional student, and the
memorization search reports per class."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.data import Subset, load_source, write_subset
from pipeline.distill.cd import distill_cd
from pipeline.modelio import load_model
from pipeline.sample import generate, sample_labels, sample_seed, write_shard
from pipeline.search import search_samples
from pipeline.shards import write_manifest
from pipeline.teacher import train_teacher
from tiny import TINY_UNET

CONDITIONAL = {**TINY_UNET, "num_class_embeds": 2}
HEUN = {"kind": "heun", "steps": 6}


@pytest.fixture(scope="module")
def digits01(tmp_path_factory):
    """64 digits of classes 0 and 1 at 8x8, as a subset file, with the images and labels."""
    images, labels = load_source({"source": "digits", "resolution": 8})
    keep = np.flatnonzero(labels < 2)[:64]
    subset = Subset(images[keep], labels[keep], keep, np.ones(len(keep)), np.full(len(keep), "uniform"))
    path = tmp_path_factory.mktemp("digits01") / "subset.parquet"
    write_subset(path, subset)
    return path, subset


@pytest.fixture(scope="module")
def teacher(digits01, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    cfg = {"train": {"steps": 200, "batch_size": 32, "lr": 2e-3, "seed": 0, "log_every": 50, "ema_halflife_kimg": 0.5}}
    stats = train_teacher(digits01[0], out, cfg, CONDITIONAL)
    return out, stats


def nearest_class_mean(images, subset):
    """The class whose mean training image is nearest to each image (pixel space)."""
    means = np.stack([subset.images[subset.labels == c].astype(float).mean(0) for c in (0, 1)])
    d = ((images.astype(float)[:, None] - means[None]) ** 2).reshape(len(images), 2, -1).sum(-1)
    return d.argmin(1)


def test_conditional_teacher_generates_the_class_it_is_asked_for(digits01, teacher):
    _, subset = digits01
    model, meta = load_model(teacher[0])
    assert teacher[1]["num_classes"] == 2 and meta["net"]["num_class_embeds"] == 2
    seeds = [sample_seed(1, i) for i in range(32)]
    for c in (0, 1):
        out = generate(model, meta, HEUN, seeds, labels=[c] * 32)
        assert (nearest_class_mean(out, subset) == c).mean() >= 0.9, c  # the same noise, the asked class
    with pytest.raises(ValueError, match="needs one label per sample"):
        generate(model, meta, HEUN, seeds)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        generate(model, meta, HEUN, seeds[:2], labels=[0, 2])


def test_shards_carry_the_class_each_sample_was_generated_for(digits01, teacher, tmp_path):
    _, subset = digits01
    model, meta = load_model(teacher[0])
    write_shard(teacher[0], tmp_path / "whole.parquet", "heun", HEUN, 0, 12, 12, run_seed=3, model_id="t")
    table = pq.read_table(tmp_path / "whole.parquet")
    labels = table.column("label").to_numpy()
    np.testing.assert_array_equal(labels, sample_labels(3, range(12), 2))
    assert set(labels.tolist()) == {0, 1}
    from pipeline.io import read_image_table

    images, _, _ = read_image_table(tmp_path / "whole.parquet")
    assert (nearest_class_mean(images, subset) == labels).mean() >= 0.9
    # shard k of N holds the same samples and classes whatever the shard size (labels from (seed, i) alone)
    for k in range(3):
        write_shard(teacher[0], tmp_path / f"part{k}.parquet", "heun", HEUN, k, 4, 12, run_seed=3, model_id="t",
                    batch_size=3)
    parts = [read_image_table(tmp_path / f"part{k}.parquet") for k in range(3)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), images)
    np.testing.assert_array_equal(np.concatenate([p[1].column("label").to_numpy() for p in parts]), labels)


def test_per_class_memorization_of_class_conditional_samples(digits01, teacher, tmp_path):
    path, subset = digits01
    shard = tmp_path / "shard-00000.parquet"
    write_shard(teacher[0], shard, "heun", HEUN, 0, 16, 16, run_seed=5, model_id="t")
    write_manifest([shard], tmp_path / "manifest.json", 16, 16)
    summary = search_samples(path, tmp_path / "manifest.json", tmp_path / "nn.parquet", device="cpu")
    labels = sample_labels(5, range(16), 2)
    assert {k: v["n_samples"] for k, v in summary["by_label"].items()} == {
        str(c): int((labels == c).sum()) for c in (0, 1)}
    assert summary["by_class_group"]["uniform"]["n_samples"] == 16
    assert summary["nn1_same_class"] >= 0.9  # each sample's nearest training digit is of its own class
    json.dumps(summary)


def test_conditional_student_distils_with_the_teachers_classes(digits01, teacher, tmp_path):
    path, subset = digits01
    spec = {"num_scales": 6, "metric": "l2", "target_ema": 0.0,
            "train": {"steps": 3, "batch_size": 8, "lr": 1e-4, "optimizer": "radam", "seed": 0, "log_every": 1}}
    stats = distill_cd(path, teacher[0], tmp_path / "student", spec)
    assert stats["num_classes"] == 2
    _, meta = load_model(tmp_path / "student")
    assert meta["kind"] == "consistency" and meta["net"]["num_class_embeds"] == 2
    write_shard(tmp_path / "student", tmp_path / "s.parquet", "1-step", {"kind": "consistency", "ts": [80.0]},
                0, 6, 6, run_seed=2, model_id="s")
    np.testing.assert_array_equal(pq.read_table(tmp_path / "s.parquet").column("label").to_numpy(),
                                  sample_labels(2, range(6), 2))
    unconditional = {**spec, "net_config": TINY_UNET}
    with pytest.raises(ValueError, match="conditioned on None classes, its teacher on 2"):
        distill_cd(path, teacher[0], tmp_path / "student2", unconditional)


def test_labels_outside_the_class_embedding_are_refused(digits01, tmp_path):
    path, _ = digits01
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\)"):
        train_teacher(path, tmp_path / "t", {"train": {"steps": 1, "batch_size": 4, "lr": 1e-3}},
                      {**TINY_UNET, "num_class_embeds": 1})
    assert not (tmp_path / "t").exists()
