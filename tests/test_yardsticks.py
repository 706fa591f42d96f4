"""Yardsticks: the held-out split, the three non-generated sample sets, and their place in tables."""
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import config as pconfig
from pipeline.data import build_subset, load_source
from pipeline.shards import read_samples
from pipeline.data import write_subset
from pipeline.yardsticks import (blur, heldout_split, parse_id, write_yardstick, yardstick_id,
                                 yardstick_images)


EMBEDDED = Path(__file__).resolve().parents[1] / "config" / "embedded.yaml"


@pytest.fixture(scope="module")
def digits():
    images, labels = load_source({"source": "digits", "resolution": 8})
    subset = build_subset(images, labels, {"kind": "repetition", "repeated_classes": [0], "per_class": 3,
                                           "repeats": 4, "others": 5, "seed": 0})
    return images, labels, subset


def test_heldout_split_avoids_every_subset_and_is_deterministic(digits):
    images, _, subset = digits
    other = np.arange(100, 160)
    reserve, rest = heldout_split(len(images), [subset.index, other], 50, seed=3)
    used = set(subset.index.tolist()) | set(other.tolist())
    assert len(reserve) == 50 and not (set(reserve.tolist()) & used)
    assert not (set(rest.tolist()) & used) and not (set(rest.tolist()) & set(reserve.tolist()))
    assert len(reserve) + len(rest) + len(used) == len(images)
    again, _ = heldout_split(len(images), [other, subset.index], 50, seed=3)
    assert np.array_equal(reserve, again)
    with pytest.raises(ValueError, match="outside every training subset"):
        heldout_split(len(images), [np.arange(len(images) - 10)], 50, seed=3)


def test_yardstick_images(digits):
    images, labels, subset = digits
    reserve, _ = heldout_split(len(images), [subset.index], 40, seed=0)
    real, real_labels, own = yardstick_images("real", images, labels, subset, reserve, 40, seed=0)
    assert np.array_equal(real, images[reserve]) and np.array_equal(real_labels, labels[reserve]) and own is None
    blurred, _, _ = yardstick_images("blur", images, labels, subset, reserve, 40, seed=0, blur_sigma=1.0)
    assert blurred.dtype == np.uint8 and blurred.shape == real.shape
    assert np.abs(np.diff(blurred.astype(float), axis=2)).mean() < np.abs(np.diff(real.astype(float), axis=2)).mean()
    replay, replay_labels, _ = yardstick_images("replay", images, labels, subset, reserve, 400, seed=0)
    rows = [next(i for i in range(len(subset)) if np.array_equal(subset.images[i], img)) for img in replay]
    assert np.array_equal(subset.labels[rows], replay_labels)
    # drawn with the repeats: the 3 images repeated 4x hold 12 of 17 training slots
    repeated_share = np.isin(rows, np.flatnonzero(subset.repeat == 4)).mean()
    assert abs(repeated_share - 12 / 17) < 0.08
    with pytest.raises(ValueError, match="reserve has 40"):
        yardstick_images("real", images, labels, subset, reserve, 41, seed=0)


def test_each_replicates_heldout_set_is_a_resample_of_the_reserve_outside_training_and_classifier_images(digits):
    """With a reserve larger than the yardstick (yardsticks.reserve), each replicate's real and blurred
    sets draw without replacement from it: never a training image of any subset, never an image the
    digits classifier trains on (the split's rest), no image twice, and a different set per replicate."""
    from pipeline.yardsticks import replicated_kinds, yardstick_rows

    images, labels, subset = digits
    other = np.arange(100, 160)
    reserve, rest = heldout_split(len(images), [subset.index, other], 90, seed=3)
    training = set(subset.index.tolist()) | set(other.tolist())
    sets = []
    for r in range(5):
        where, rows, _ = yardstick_rows("real", subset, reserve, 60, seed=3, replicate=r)
        assert where == "source" and len(rows) == 60 and len(set(rows.tolist())) == 60
        assert set(rows.tolist()) <= set(reserve.tolist())
        assert not set(rows.tolist()) & training and not set(rows.tolist()) & set(rest.tolist())
        assert np.array_equal(yardstick_rows("blur", subset, reserve, 60, seed=3, replicate=r)[1], rows)
        sets.append(frozenset(rows.tolist()))
    assert len(set(sets)) == 5
    assert sets[0] == frozenset(reserve[:60].tolist())  # replicate 0: the set a single run has always used
    again = yardstick_rows("real", subset, reserve, 60, seed=3, replicate=2)[1]
    assert frozenset(again.tolist()) == sets[2]
    assert replicated_kinds(90, 60) == ("replay", "real", "blur") and replicated_kinds(60, 60) == ("replay",)
    with pytest.raises(ValueError, match="no replicates"):  # a reserve of exactly the set's size: one fixed set
        yardstick_rows("real", subset, reserve[:60], 60, seed=3, replicate=1)
    with pytest.raises(ValueError, match="no replicates"):
        yardstick_rows("train", subset, reserve, 60, seed=3, replicate=1)


def test_a_larger_reserve_gives_the_heldout_yardsticks_replicates_in_the_tables():
    cfg = pconfig.load(EMBEDDED)
    cfg["replicates"] = 2
    fixed = {r["model"]: r["replicates"] for r in pconfig.table_rows(cfg, "demo")}
    assert fixed["real~digits-48"] == ["real~digits-48"] and fixed["replay~digits-48"] == ["replay~digits-48", "replay~digits-48.r1"]
    cfg["yardsticks"] = {"reserve": cfg["sampling"]["num_samples"] + 100}
    pconfig.validate(cfg)
    rows = {r["model"]: r["replicates"] for r in pconfig.table_rows(cfg, "demo")}
    for kind in ("real", "blur", "replay"):
        assert rows[f"{kind}~digits-48"] == [f"{kind}~digits-48", f"{kind}~digits-48.r1"]
    assert rows["train~digits-48"] == ["train~digits-48"]
    cfg["yardsticks"] = {"reserve": cfg["sampling"]["num_samples"] - 1}
    with pytest.raises(pconfig.ConfigError, match="yardsticks.reserve"):
        pconfig.validate(cfg)


def test_train_yardstick_cycles_unique_images_and_names_each_rows_own_image(digits):
    images, labels, subset = digits
    train, train_labels, own = yardstick_images("train", images, labels, subset, np.empty(0, np.int64), 20, seed=0)
    assert np.array_equal(train, subset.images[own]) and np.array_equal(train_labels, subset.labels[own])
    # 8 unique images cycled to 20 rows: each image twice or three times, all eight twice before any thrice
    assert sorted(np.bincount(own, minlength=len(subset)).tolist()) == [2] * 4 + [3] * 4
    assert sorted(own[:len(subset)].tolist()) == list(range(len(subset)))


def test_blur_of_a_constant_image_is_itself():
    flat = np.full((2, 8, 8, 1), 77, np.uint8)
    assert np.array_equal(blur(flat, 1.0), flat)


def test_written_yardstick_reads_as_samples(digits, tmp_path, monkeypatch):
    images, labels, subset = digits
    monkeypatch.chdir(tmp_path)
    manifest = write_yardstick("replay", "s", subset.images[:5], subset.labels[:5], "out", shard_size=2)
    assert manifest["model"] == "replay~s" and manifest["sampler"] == "data" and manifest["nfe"] == 0
    got, table, _ = read_samples("out/manifest.json")
    assert np.array_equal(got, subset.images[:5]) and table.column("sample_id").to_pylist() == list(range(5))
    with pytest.raises(ValueError, match="at least 2"):
        write_yardstick("real", "s", subset.images[:1], subset.labels[:1], "one", shard_size=2)


def test_ids_and_table_rows():
    assert yardstick_id("real", "digits-48") == "real~digits-48"
    assert parse_id("blur~cifar10-3000") == ("blur", "cifar10-3000")
    assert parse_id("cd-48@200") is None and parse_id("teacher-48") is None
    cfg = pconfig.load(EMBEDDED)
    rows = pconfig.table_rows(cfg, "demo")
    kinds = ["real", "replay", "blur", "train"]
    assert [r["model"] for r in rows[-8:]] == [f"{k}~digits-{n}" for n in (48, 96) for k in kinds]
    assert pconfig.subset_of(cfg, "replay~digits-48") == "digits-48"
    cfg["tables"]["demo"]["yardsticks"] = False
    assert len(pconfig.table_rows(cfg, "demo")) == len(cfg["tables"]["demo"]["rows"])


def test_data_is_a_reserved_sampler_name():
    import copy
    import yaml

    with open(EMBEDDED) as f:
        cfg = yaml.safe_load(f)
    bad = copy.deepcopy(cfg)
    bad["samplers"]["data"] = {"kind": "heun", "steps": 4}
    with pytest.raises(pconfig.ConfigError, match="reserved"):
        pconfig.validate(bad)


def test_digits_classifier_never_sees_training_or_yardstick_images(digits, tmp_path):
    """The quality network trains on the digits outside every subset and outside the yardstick reserve."""
    from pipeline.cli import main

    images, _, subset = digits
    write_subset(tmp_path / "s.parquet", subset, {})
    dataset = json.dumps({"source": "digits", "resolution": 8})
    main(["feature-net", "--dataset", dataset, "--epochs", "1", "--exclude", str(tmp_path / "s.parquet"),
          "--reserve", "100", "--seed", "0", "--out", str(tmp_path / "clf")])
    stats = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert stats["images"] == len(images) - len(subset) - 100


def test_table_note_places_each_model_among_its_yardsticks():
    from pipeline.tables import _placement

    def row(model, label, quality, mem, nfe=1):
        return {"model": model, "label": label, "sampler": "s" if nfe else "data", "nfe": nfe, "quality": quality,
                "mem": mem, "subset": "d"}

    rows = [row("t", "Teacher", 182.4, 0.607), row("c", "Student", 3.0, 0.0), row("w", "Worst", 400.0, 0.5),
            row("real~d", "Real held-out", 4.7, 0.0, 0), row("replay~d", "Training replay", 166.0, 1.0, 0),
            row("blur~d", "Blurred", 284.4, 0.0, 0), row("train~d", "Train vs train", 145.0, 0.02, 0)]
    lines = _placement(rows, "FD")
    assert lines[0] == ("Teacher (s): FD 182.40, between training replay 166.00 and blurred 284.40 (floor: real "
                        "held-out 4.70); L2 Mem 60.70% (real held-out 0.00%, train vs train 2.00%, training replay 100.00%).")
    assert "better than every yardstick (best: real held-out 4.70)" in lines[1]
    assert "worse than every yardstick (worst: blurred 284.40)" in lines[2]
    assert len(lines) == 3
