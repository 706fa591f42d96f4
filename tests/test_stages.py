"""Teacher training and distillation as stage functions: outputs on disk, and bit-for-bit reruns."""
import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.data import build_subset, load_source, write_subset
from pipeline.distill.cd import distill_cd
from pipeline.modelio import load_model
from pipeline.teacher import train_teacher
from tiny import TINY_UNET

TRAIN = {"steps": 3, "batch_size": 4, "lr": 1e-3, "ema_halflife_kimg": 0.01, "log_every": 1, "seed": 7}


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    path = tmp_path_factory.mktemp("subset") / "digits-8.parquet"
    images, labels = load_source({"source": "digits", "resolution": 8})
    write_subset(path, build_subset(images, labels, {"kind": "uniform", "n": 8, "seed": 0}), {})
    return path


def test_teacher_and_student_are_reproducible(subset, tmp_path):
    for run in ("a", "b"):
        train_teacher(subset, tmp_path / run / "teacher", {"train": TRAIN}, TINY_UNET)
        distill_cd(subset, tmp_path / run / "teacher", tmp_path / run / "student",
                   {"num_scales": 6, "metric": "pseudo_huber", "target_ema": 0.9, "train": {**TRAIN, "optimizer": "radam"}})
    for model in ("teacher", "student"):
        a = load_file(str(tmp_path / "a" / model / "model.safetensors"))
        b = load_file(str(tmp_path / "b" / model / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (model, k)


def test_stage_outputs_describe_the_model(subset, tmp_path):
    train_teacher(subset, tmp_path / "teacher", {"train": TRAIN, "edm": {"sigma_max": 40.0}}, TINY_UNET)
    distill_cd(subset, tmp_path / "teacher", tmp_path / "student",
               {"num_scales": 6, "train": {**TRAIN, "optimizer": "radam"}})
    teacher, tmeta = load_model(tmp_path / "teacher")
    student, smeta = load_model(tmp_path / "student")
    assert tmeta["kind"] == "edm" and smeta["kind"] == "consistency"
    assert tmeta["sigma_max"] == smeta["sigma_max"] == 40.0
    assert smeta["net"] == tmeta["net"] == TINY_UNET
    stats = json.loads((tmp_path / "student" / "stats.json").read_text())
    assert stats["method"] == "cd" and stats["steps"] == 3 and len(stats["history"]) == 3
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(student(x, torch.full((2,), 0.002)), x)  # boundary condition survives save/load


def test_distillation_refuses_a_consistency_teacher(subset, tmp_path):
    train_teacher(subset, tmp_path / "teacher", {"train": TRAIN}, TINY_UNET)
    spec = {"num_scales": 6, "train": {**TRAIN, "optimizer": "radam"}}
    distill_cd(subset, tmp_path / "teacher", tmp_path / "student", spec)
    with pytest.raises(ValueError, match="needs an EDM teacher"):
        distill_cd(subset, tmp_path / "student", tmp_path / "student2", spec)
