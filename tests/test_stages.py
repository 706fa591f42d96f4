"""Teacher training and distillation as stage functions: outputs on disk, and bit-for-bit reruns."""
import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.data import build_subset, load_source, write_subset
from pipeline.distill.cd import distill_cd
from pipeline.modelio import export_snapshot, load_model
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
               {"num_scales": 6, "target_ema": 0.0, "train": {**TRAIN, "optimizer": "radam"}})
    teacher, tmeta = load_model(tmp_path / "teacher")
    student, smeta = load_model(tmp_path / "student")
    assert tmeta["kind"] == "edm" and smeta["kind"] == "consistency"
    assert tmeta["sigma_max"] == smeta["sigma_max"] == 40.0
    assert tmeta["net"] == TINY_UNET and smeta["net"] == dict(TINY_UNET, dropout=0.0)  # the student's own dropout
    stats = json.loads((tmp_path / "student" / "stats.json").read_text())
    assert stats["method"] == "cd" and stats["steps"] == 3 and len(stats["history"]) == 3
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(student(x, torch.full((2,), 0.002)), x)  # boundary condition survives save/load


def test_distillation_refuses_a_consistency_teacher(subset, tmp_path):
    train_teacher(subset, tmp_path / "teacher", {"train": TRAIN}, TINY_UNET)
    spec = {"num_scales": 6, "target_ema": 0.0, "train": {**TRAIN, "optimizer": "radam"}}
    distill_cd(subset, tmp_path / "teacher", tmp_path / "student", spec)
    with pytest.raises(ValueError, match="needs an EDM teacher"):
        distill_cd(subset, tmp_path / "student", tmp_path / "student2", spec)


def test_distillation_needs_target_ema(subset, tmp_path):
    train_teacher(subset, tmp_path / "teacher", {"train": TRAIN}, TINY_UNET)
    with pytest.raises(ValueError, match="target_ema"):
        distill_cd(subset, tmp_path / "teacher", tmp_path / "student", {"num_scales": 6, "train": TRAIN})


def test_snapshots_of_teacher_and_student_are_models(subset, tmp_path):
    """Snapshots land in <model>/snapshots/step-K as full model directories; export checks the step."""
    train = {**TRAIN, "steps": 4}
    train_teacher(subset, tmp_path / "teacher", {"train": train, "snapshots": [2]}, TINY_UNET, tmp_path / "ck-t")
    assert sorted(p.name for p in (tmp_path / "teacher" / "snapshots").iterdir()) == ["step-2"]
    spec = {"num_scales": 6, "target_ema": 0.0, "snapshots": [1, 3], "train": {**train, "optimizer": "radam"}}
    distill_cd(subset, tmp_path / "teacher", tmp_path / "student", spec, tmp_path / "ck-s")
    assert sorted(p.name for p in (tmp_path / "student" / "snapshots").iterdir()) == ["step-1", "step-3"]
    meta = export_snapshot(tmp_path / "student" / "snapshots", 3, tmp_path / "exported")
    assert meta["kind"] == "consistency" and meta["step"] == 3
    snap, _ = load_model(tmp_path / "exported")
    final, _ = load_model(tmp_path / "student")
    assert json.loads((tmp_path / "exported" / "stats.json").read_text())["steps"] == 3
    assert any(not torch.equal(a, b) for a, b in zip(snap.state_dict().values(), final.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="snapshots"):
        export_snapshot(tmp_path / "student" / "snapshots", 2, tmp_path / "nope")
    (tmp_path / "student" / "snapshots" / "step-3").rename(tmp_path / "student" / "snapshots" / "step-2")
    with pytest.raises(ValueError, match="step 3, not 2"):
        export_snapshot(tmp_path / "student" / "snapshots", 2, tmp_path / "nope")
    # a snapshot whose tensors are not the run's model's (another network) is refused before it is copied
    from safetensors.torch import save_file

    (tmp_path / "student" / "snapshots" / "step-2").rename(tmp_path / "student" / "snapshots" / "step-3")
    save_file({"net.conv_in.weight": torch.zeros(3, 3)}, str(tmp_path / "student" / "snapshots" / "step-3" / "model.safetensors"))
    with pytest.raises(ValueError, match="names or shapes differ"):
        export_snapshot(tmp_path / "student" / "snapshots", 3, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    # without snapshots the directory is still there, empty: the rules declare it
    distill_cd(subset, tmp_path / "teacher", tmp_path / "plain", {**spec, "snapshots": []})
    assert list((tmp_path / "plain" / "snapshots").iterdir()) == []


def test_mismatched_random_student_records_its_initialisation(subset, tmp_path):
    train_teacher(subset, tmp_path / "teacher", {"train": TRAIN}, dict(TINY_UNET, dropout=0.1))
    deeper = dict(TINY_UNET, layers_per_block=2)
    distill_cd(subset, tmp_path / "teacher", tmp_path / "deep",
               {"num_scales": 6, "target_ema": 0.0, "net_config": deeper, "solver": "euler", "metric": "l1",
                "train": {**TRAIN, "optimizer": "radam"}})
    stats = json.loads((tmp_path / "deep" / "stats.json").read_text())
    assert stats["solver"] == "euler" and stats["metric"] == "l1" and stats["student_dropout"] == 0.0
    assert 0 < stats["inherited_parameters"] < stats["parameters"]
    _, meta = load_model(tmp_path / "deep")
    assert meta["net"] == dict(deeper, dropout=0.0)
    distill_cd(subset, tmp_path / "teacher", tmp_path / "random",
               {"num_scales": 6, "target_ema": 0.0, "init": "random", "dropout": 0.2,
                "train": {**TRAIN, "optimizer": "radam"}})
    stats = json.loads((tmp_path / "random" / "stats.json").read_text())
    assert stats["inherited_parameters"] == 0 and stats["init"] == "random" and stats["student_dropout"] == 0.2


def test_lpips_distillation_stage_reads_the_backbone_file(subset, tmp_path):
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "vgg16-test.pth"
    torch.save({k: v for k, v in torchvision.models.vgg16(weights=None).state_dict().items()
                if k.startswith("features.")}, weights)
    train_teacher(subset, tmp_path / "teacher", {"train": TRAIN}, TINY_UNET)
    spec = {"num_scales": 6, "target_ema": 0.0, "metric": "lpips", "lpips": {"net": "vgg", "weights": str(weights),
                                                                                "resize": 32},
            "train": {**TRAIN, "steps": 2, "optimizer": "radam"}}
    stats = distill_cd(subset, tmp_path / "teacher", tmp_path / "student", spec)
    assert stats["metric"] == "lpips" and all(h["loss"] > 0 for h in stats["history"])
    with pytest.raises(FileNotFoundError, match="fetch_lpips_backbone"):
        distill_cd(subset, tmp_path / "teacher", tmp_path / "student2",
                   {**spec, "lpips": {"weights": str(tmp_path / "absent.pth")}})
