"""Config loading and validation (schema + cross-references) and the name helpers the rules use.

Fast: no Snakemake, no torch. Every error test checks that the message names the offending key
by its dotted path, since that is what a user sees when a run stops before its first job.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pipeline import config as pconfig
from pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "config" / "embedded.yaml"
PAPER = ROOT / "config" / "config.yaml"


@pytest.fixture(scope="module")
def _embedded_raw() -> dict:
    with open(EMBEDDED) as f:
        return yaml.safe_load(f)


@pytest.fixture
def cfg(_embedded_raw) -> dict:
    """A fresh, mutable copy of the embedded default (raw YAML, not yet validated)."""
    return copy.deepcopy(_embedded_raw)


def error_of(cfg: dict) -> str:
    with pytest.raises(ConfigError) as info:
        pconfig.validate(cfg)
    return str(info.value)


# --------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("path", [EMBEDDED, PAPER], ids=["embedded", "paper"])
def test_shipped_configs_load_and_validate(path):
    cfg = pconfig.load(path)
    assert cfg["tables"] and cfg["teachers"]
    # validate is idempotent and does not mutate its input
    again = pconfig.validate(cfg)
    assert again == cfg and again is not cfg


def test_a_sampler_sets_its_own_shard_size_which_the_sample_command_never_sees():
    """One-step sample sets are one job in the paper grid; a teacher's are ten."""
    cfg = pconfig.load(PAPER)
    assert pconfig.shard_size(cfg, "1-step") == 50000 and pconfig.shard_size(cfg, "pd-1") == 50000
    assert pconfig.shard_size(cfg, "heun-18") == cfg["sampling"]["shard_size"] == 25000
    assert pconfig.shard_size(cfg, "stochastic-imagenet64") == 5000
    assert "shard_size" not in pconfig.sampler_spec(cfg, "1-step")
    assert pconfig.sampler_spec(cfg, "refine-pd-10")["base_spec"] == {"kind": "euler", "steps": 1}


def test_paper_config_is_table1_grid():
    cfg = pconfig.load(PAPER)
    assert {f"teacher-{n}" for n in (3000, 4000, 5000, 6000)} | {"teacher-localized"} <= set(cfg["teachers"])
    assert {f"cd-{n}" for n in (3000, 4000, 5000, 6000)} <= set(cfg["students"])
    # YAML merge keys (<<: *teacher) must have been expanded with the override applied
    for n in (3000, 4000, 5000, 6000):
        assert cfg["teachers"][f"teacher-{n}"]["subset"] == f"cifar10-{n}"
        assert cfg["teachers"][f"teacher-{n}"]["train"]["steps"] == 500000
        assert cfg["students"][f"cd-{n}"]["teacher"] == f"teacher-{n}"
    assert len(pconfig.table_pairs(cfg, "table1")) == 8
    # Table 4: the localized subset, its teacher and a student without snapshots
    assert cfg["subsets"]["cifar10-localized"]["repeated_classes"] == [0, 1]
    assert cfg["students"]["cd-localized"]["teacher"] == "teacher-localized"
    assert cfg["students"]["cd-localized"]["snapshots"] == []


def test_load_names_the_source_file(tmp_path, cfg):
    cfg["bogus"] = 1
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="broken.yaml"):
        pconfig.load(path)


# --------------------------------------------------------------------------- schema errors


def test_unknown_top_level_key(cfg):
    cfg["memorisation"] = {"ratio": 0.5}
    msg = error_of(cfg)
    assert "memorisation" in msg


def test_missing_required_top_level_key(cfg):
    del cfg["quality"]
    assert "quality" in error_of(cfg)


def test_unknown_key_inside_teacher_train(cfg):
    cfg["teachers"]["teacher-48"]["train"]["stpes"] = 10
    msg = error_of(cfg)
    assert "teachers.teacher-48.train" in msg
    assert "stpes" in msg


def test_unknown_key_inside_student(cfg):
    cfg["students"]["cd-48"]["num_scale"] = 18
    msg = error_of(cfg)
    assert "students.cd-48" in msg and "num_scale" in msg


def test_wrong_type(cfg):
    cfg["teachers"]["teacher-48"]["train"]["steps"] = "ten"
    msg = error_of(cfg)
    assert "teachers.teacher-48.train.steps" in msg
    assert "'ten'" in msg


def test_out_of_range_value(cfg):
    cfg["memorization"]["ratio"] = 1.5
    assert "memorization.ratio" in error_of(cfg)


def test_uniform_subset_without_n(cfg):
    del cfg["subsets"]["digits-48"]["n"]
    msg = error_of(cfg)
    assert "subsets.digits-48" in msg and "'n'" in msg


def test_repetition_subset_needs_its_keys(cfg):
    cfg["subsets"]["digits-48"] = {"dataset": "digits", "kind": "repetition", "seed": 0}
    msg = error_of(cfg)
    assert "subsets.digits-48" in msg and "repeated_classes" in msg


def test_repetition_subset_takes_others_or_others_per_class_not_both(cfg):
    cfg["subsets"]["digits-48"] = {"dataset": "digits", "kind": "repetition", "seed": 0, "repeated_classes": [0],
                                   "per_class": 2, "repeats": 3, "others": 5, "others_per_class": 1}
    assert "subsets.digits-48" in error_of(cfg)
    del cfg["subsets"]["digits-48"]["others"]
    pconfig.validate(cfg)


def test_imagenet_dataset_names_its_copy_and_where_to_prepare_it(cfg):
    cfg["datasets"]["in64"] = {"source": "imagenet64", "train_dir": "raw/train"}
    assert "datasets.in64" in error_of(cfg) and "prepared" in error_of(cfg)
    cfg["datasets"]["in64"]["prepared"] = "data/prepared/in64"
    pconfig.validate(cfg)
    cfg["datasets"]["in64"]["archive"] = "ILSVRC2012_img_train.tar"  # one copy, not two
    assert "datasets.in64" in error_of(cfg)


def test_paper_imagenet_and_capacity_follow_their_references():
    """Table 2 / Table 4 ImageNet: openai/consistency_models' ImageNet-64 CD (N = 40, mu = 0.95, LPIPS,
    batch 2048, lr 8e-6) on ADM-layout teachers sampled with 40 Heun steps; App. D.2: teachers of
    other widths and depth, each with a 2-step student of its own network."""
    cfg = pconfig.load(PAPER)
    for n in ("5000", "7000", "10000", "localized"):
        student = cfg["students"][f"cd-imagenet64-{n}"]
        assert cfg["teachers"][student["teacher"]]["subset"] == f"imagenet64-{n}"
        assert (student["num_scales"], student["target_ema"], student["metric"]) == (40, 0.95, "lpips")
        assert (student["train"]["batch_size"], student["train"]["lr"]) == (2048, 0.000008)
    assert cfg["nets"]["adm-imagenet64"]["block_out_channels"] == [192, 384, 576, 768]
    assert cfg["samplers"]["heun-40"] == {"kind": "heun", "steps": 40}
    localized = cfg["subsets"]["imagenet64-localized"]
    assert (len(localized["repeated_classes"]), localized["per_class"], localized["repeats"],
            localized["others_per_class"]) == (50, 5, 10, 50)
    widths = {cfg["teachers"][r["model"]]["net"] for r in cfg["tables"]["capacity"]["rows"] if r["label"] == "Teacher"}
    assert widths == {"ncsnpp-cifar10", "ncsnpp-cifar10-narrow", "ncsnpp-cifar10-wide", "ncsnpp-cifar10-2blocks"}
    assert {r["sampler"] for r in cfg["tables"]["capacity"]["rows"] if r["label"] != "Teacher"} == {"2-step"}


def test_imagenet_models_are_class_conditional_and_table_rows_group_by_class():
    """Section 4.1: ImageNet generation is class-conditional, so Table 2 and 4's ImageNet rows (and their
    yardsticks) group samples by the class they were generated for; CIFAR-10 rows by nearest image."""
    cfg = pconfig.load(PAPER)
    for n in ("5000", "7000", "10000", "localized"):
        assert pconfig.num_classes(pconfig.net_of(cfg, f"teacher-imagenet64-{n}")) == 1000
        assert pconfig.class_conditional(cfg, f"cd-imagenet64-{n}")
    assert not pconfig.class_conditional(cfg, "teacher-localized") and not pconfig.class_conditional(cfg, "cd-3000@50000")
    by = {(r["setting"], r["label"]): r["group_by"] for r in pconfig.table_rows(cfg, "table4")}
    assert by[("ImageNet", "Teacher")] == by[("ImageNet", "Student")] == "class"
    assert by[("CIFAR-10", "Teacher")] == by[("CIFAR-10", "Student")] == "neighbour"
    assert by[("imagenet64-localized", "Real held-out")] == "class"
    assert by[("cifar10-localized", "Real held-out")] == "neighbour"


def test_student_conditioned_unlike_its_teacher(cfg):
    cfg["nets"]["unet-tiny-cond"] = {**cfg["nets"]["unet-tiny"], "num_class_embeds": 10}
    cfg["students"]["cd-48"]["net"] = "unet-tiny-cond"
    msg = error_of(cfg)
    assert "students.cd-48.net" in msg and "conditioned on 10 classes" in msg and "None" in msg
    cfg["teachers"]["teacher-48"]["net"] = "unet-tiny-cond"
    pconfig.validate(cfg)


def test_text_memorization_subsets_need_captioned_datasets(cfg):
    cfg["datasets"]["digits-captioned"] = {"source": "digits", "resolution": cfg["datasets"]["digits"]["resolution"],
                                           "caption_templates": ["a handwritten digit {name}"]}
    cfg["subsets"]["memorized-3x"] = {"dataset": "digits-captioned", "kind": "text_memorization", "n": 20,
                                      "repeats": 10, "extra_ratio": 3, "seed": 0}
    pconfig.validate(cfg)
    assert pconfig.extra_dataset_of_subset(cfg, "memorized-3x") is None  # extras from its own dataset
    cfg["subsets"]["memorized-3x"]["extra_dataset"] = "digits"
    msg = error_of(cfg)
    assert "subsets.memorized-3x.extra_dataset" in msg and "has no captions" in msg
    cfg["subsets"]["memorized-3x"]["extra_dataset"] = "coco"
    assert "'coco' is not defined under datasets" in error_of(cfg)
    del cfg["subsets"]["memorized-3x"]["extra_ratio"], cfg["subsets"]["memorized-3x"]["extra_dataset"]
    assert "'extra_ratio' is a required property" in error_of(cfg)
    cfg["subsets"]["memorized-3x"]["extra_ratio"] = 3
    cfg["subsets"]["digits-48"]["extra_ratio"] = 3
    assert "belong to text_memorization subsets" in error_of(cfg)


def test_heun_sampler_without_steps(cfg):
    cfg["samplers"]["heun-18"] = {"kind": "heun"}
    msg = error_of(cfg)
    assert "samplers.heun-18" in msg and "'steps'" in msg


def test_consistency_sampler_without_ts(cfg):
    cfg["samplers"]["1-step"] = {"kind": "consistency"}
    msg = error_of(cfg)
    assert "samplers.1-step" in msg and "'ts'" in msg and "'grid_steps'" in msg


# --------------------------------------------------------------------------- cross-references


def test_teacher_with_undefined_subset(cfg):
    cfg["teachers"]["teacher-48"]["subset"] = "digits-99"
    msg = error_of(cfg)
    assert "teachers.teacher-48.subset" in msg and "digits-99" in msg


def test_teacher_with_undefined_net(cfg):
    cfg["teachers"]["teacher-48"]["net"] = "unet-huge"
    msg = error_of(cfg)
    assert "teachers.teacher-48.net" in msg and "unet-huge" in msg


def test_subset_with_undefined_dataset(cfg):
    cfg["subsets"]["digits-48"]["dataset"] = "mnist"
    msg = error_of(cfg)
    assert "subsets.digits-48.dataset" in msg and "mnist" in msg


def test_student_with_undefined_teacher(cfg):
    cfg["students"]["cd-48"]["teacher"] = "teacher-99"
    msg = error_of(cfg)
    assert "students.cd-48.teacher" in msg and "teacher-99" in msg


def test_table_row_with_unknown_model(cfg):
    cfg["tables"]["demo"]["rows"][1]["model"] = "cd-99"
    msg = error_of(cfg)
    assert "tables.demo.rows[1].model" in msg and "cd-99" in msg


def test_table_row_with_unknown_sampler(cfg):
    cfg["tables"]["demo"]["rows"][0]["sampler"] = "euler-9"
    msg = error_of(cfg)
    assert "tables.demo.rows[0].sampler" in msg and "euler-9" in msg


def test_paper_students_follow_the_cifar10_reference_protocol():
    """CIFAR-10 CD as consistency_models_cifar10 configs/cifar10_ve_cd.py runs it: mu = 0 (online weights
    under stop-gradient), LPIPS, Heun, N = 18 for the Table 1 students, student dropout 0."""
    cfg = pconfig.load(PAPER)
    for name, student in cfg["students"].items():
        if student["method"] != "cd" or cfg["subsets"][pconfig.subset_of(cfg, name)]["dataset"] != "cifar10":
            continue
        assert student["target_ema"] == 0.0, name
        assert student["metric"] == "lpips" and student["solver"] == "heun", name
        assert student.get("dropout", 0.0) == 0.0, name
    for n in (3000, 4000, 5000, 6000):
        assert cfg["students"][f"cd-{n}"]["num_scales"] == 18
    # the teacher's net keeps EDM's CIFAR-10 dropout; the student's is its own setting
    assert cfg["nets"]["ncsnpp-cifar10"]["dropout"] == 0.13


def test_paper_config_names_the_study_variants():
    cfg = pconfig.load(PAPER)
    kinds = {s["kind"] for s in cfg["samplers"].values()}
    assert kinds == {"heun", "stochastic", "consistency", "euler", "refine", "diffusion", "lcm"}
    assert pconfig.sampler_spec(cfg, "stochastic-imagenet64") == {"kind": "stochastic", "steps": 256, "S_churn": 40,
                                                                  "S_min": 0.05, "S_max": 50.0, "S_noise": 1.003}
    assert {"table1", "table5", "table6", "table7", "figure8", "figure1"} <= set(cfg["tables"])
    assert sorted(s["num_scales"] for s in cfg["students"].values() if s["teacher"] == "teacher-5000"
                  and s.get("net") is None and s["init"] == "teacher") == [18, 40, 80]
    models = pconfig.models_of(cfg)
    assert models["cd-3000@100000"] == "snapshots"
    assert pconfig.model_dir(cfg, "cd-3000@100000") == "results/snapshots/cd-3000/step-100000"
    assert pconfig.subset_of(cfg, "cd-3000@100000") == "cifar10-3000"


def test_paper_config_has_the_text_to_image_branch():
    """Table 3: SD1.5 fine-tuned on 200 pairs x 10 plus 3/4/5 x 200 COCO pairs, LCM students sampled in 4 steps."""
    cfg = pconfig.load(PAPER)
    assert {cfg["subsets"][f"coco-memorize-{k}x"]["extra_ratio"] for k in (3, 4, 5)} == {3, 4, 5}
    assert all(cfg["subsets"][f"coco-memorize-{k}x"]["n"] == 200 for k in (3, 4, 5))
    assert pconfig.backbone_of(cfg, "lcm-sd15-4x") == "sd15"
    assert pconfig.backbone_dir(cfg, "sd15") == "data/weights/stable-diffusion-v1-5"
    assert pconfig.samplers_for(cfg, "sd15-memorize-3x") == ("diffusion",)
    assert pconfig.samplers_for(cfg, "lcm-sd15-3x") == ("lcm",) and pconfig.samplers_for(cfg, "cd-3000") == ("consistency", "refine")
    assert pconfig.net_of(cfg, "lcm-sd15-3x") == {} and not pconfig.class_conditional(cfg, "lcm-sd15-3x")
    lcm = cfg["students"]["lcm-sd15-3x"]
    assert lcm["lcm"]["loss"] == "huber" and lcm["train"]["lr"] == 1e-6 and lcm["lcm"]["target_ema"] == 0.95
    assert cfg["samplers"]["lcm-4"] == {"kind": "lcm", "steps": 4, "guidance_scale": 8.5, "original_steps": 50}


def test_text_to_image_entries_are_checked(cfg):
    cfg["datasets"]["captioned"] = {"source": "digits", "resolution": cfg["datasets"]["digits"]["resolution"], "caption_templates": ["a digit {name}"]}
    cfg["subsets"]["mem"] = {"dataset": "captioned", "kind": "text_memorization", "n": 4, "repeats": 2,
                             "extra_ratio": 1, "seed": 0}
    cfg["backbones"] = {"mini": {"kind": "miniature", "dataset": "captioned", "text_encoder": {}, "vae": {}, "unet": {},
                                 "vae_train": {"steps": 1, "batch_size": 1, "lr": 0.1}}}
    cfg["teachers"]["t2i"] = {"subset": "mem", "backbone": "mini", "train": {"steps": 1, "batch_size": 1, "lr": 0.1}}
    cfg["students"]["lcm"] = {"method": "lcm", "teacher": "t2i", "train": {"steps": 1, "batch_size": 1, "lr": 0.1}}
    cfg["samplers"]["lcm-4"] = {"kind": "lcm", "steps": 4}
    pconfig.validate(cfg)
    bad = copy.deepcopy(cfg)
    bad["students"]["lcm"]["teacher"] = "teacher-48"
    assert "lcm cannot distil 'teacher-48'" in error_of(bad)
    bad = copy.deepcopy(cfg)
    bad["teachers"]["t2i"]["subset"] = "digits-48"
    assert "a text-to-image teacher trains on image-prompt pairs" in error_of(bad)
    bad = copy.deepcopy(cfg)
    bad["backbones"]["mini"]["dataset"] = "digits"
    assert "backbones.mini.dataset: 'digits' has no captions" in error_of(bad)
    bad = copy.deepcopy(cfg)
    bad["teachers"]["t2i"]["net"] = "unet-tiny"  # a teacher is an EDM net or a backbone's UNet, not both
    assert "teachers.t2i" in error_of(bad)
    bad = copy.deepcopy(cfg)
    bad["students"]["lcm"]["num_scales"] = 18
    assert "students.lcm" in error_of(bad)
    bad = copy.deepcopy(cfg)
    bad["students"]["lcm"]["lcm"] = {"w_min": 9, "w_max": 3}
    assert "w_min 9 exceeds w_max 3" in error_of(bad)
    bad = copy.deepcopy(cfg)
    bad["samplers"]["lcm-4"]["ts"] = [80.0]
    assert "samplers.lcm-4" in error_of(bad)
    bad = copy.deepcopy(cfg)
    bad["tables"]["demo"]["rows"].append({"setting": "x", "label": "S", "model": "lcm", "sampler": "1-step"})
    assert "cannot sample 'lcm' (needs a lcm sampler)" in error_of(bad)
    bad = copy.deepcopy(cfg)
    bad["backbones"]["sd"] = {"kind": "pretrained"}
    assert "backbones.sd" in error_of(bad)
    bad = copy.deepcopy(cfg)
    bad["quality"] = {"kind": "inception_fid", "reference": "digits", "weights": "w.pt", "prompt_class": True}
    assert "quality.prompt_class" in error_of(bad)


def test_target_ema_is_required(cfg):
    del cfg["students"]["cd-48"]["target_ema"]
    msg = error_of(cfg)
    assert "students.cd-48" in msg and "target_ema" in msg


@pytest.mark.parametrize("sampler,fragment", [
    ({"kind": "stochastic", "steps": 18}, "S_churn"),
    ({"kind": "heun", "steps": 18, "S_churn": 10}, "samplers.bad"),
    ({"kind": "consistency", "ts": [80.0], "grid_steps": 18, "ts_index": [0]}, "samplers.bad"),
    ({"kind": "consistency", "grid_steps": 18}, "samplers.bad"),
    ({"kind": "consistency", "ts": [80.0], "ts_index": [0]}, "either"),
    ({"kind": "consistency", "ts": [0.5, 80.0]}, "must decrease"),
    ({"kind": "consistency", "grid_steps": 18, "ts_index": [0, 17]}, "below grid_steps - 1"),
    ({"kind": "consistency", "grid_steps": 18, "ts_index": [5, 2]}, "must increase"),
])
def test_bad_samplers(cfg, sampler, fragment):
    cfg["samplers"]["bad"] = sampler
    assert fragment in error_of(cfg)


def test_snapshot_steps_within_training(cfg):
    cfg["students"]["cd-48"]["snapshots"] = [200, 5000]
    msg = error_of(cfg)
    assert "students.cd-48.snapshots" in msg and "5000" in msg


def test_table_row_with_unconfigured_snapshot(cfg):
    cfg["tables"]["demo"]["rows"][1]["model"] = "cd-48@300"
    assert "tables.demo.rows[1].model" in error_of(cfg)


def test_student_with_undefined_net(cfg):
    cfg["students"]["cd-48"]["net"] = "no-such-net"
    assert "students.cd-48.net" in error_of(cfg)


def test_snapshot_of_a_teacher_takes_edm_samplers(cfg):
    cfg["teachers"]["teacher-48"]["snapshots"] = [500]
    cfg["tables"]["demo"]["rows"].append({"model": "teacher-48@500", "sampler": "stochastic-cifar10"})
    ok = pconfig.validate(cfg)
    assert pconfig.models_of(ok)["teacher-48@500"] == "snapshots"
    cfg["tables"]["demo"]["rows"].append({"model": "teacher-48@500", "sampler": "1-step"})
    assert "heun or stochastic" in error_of(cfg)


def test_teacher_row_with_consistency_sampler(cfg):
    cfg["tables"]["demo"]["rows"][0]["sampler"] = "1-step"
    msg = error_of(cfg)
    assert "tables.demo.rows[0]" in msg and "heun" in msg and "teacher-48" in msg


def test_student_row_with_heun_sampler(cfg):
    cfg["tables"]["demo"]["rows"][1]["sampler"] = "heun-18"
    msg = error_of(cfg)
    assert "tables.demo.rows[1]" in msg and "consistency" in msg and "cd-48" in msg


def test_teacher_student_name_clash(cfg):
    cfg["students"]["teacher-48"] = cfg["students"].pop("cd-48")
    for row in cfg["tables"]["demo"]["rows"]:
        if row["model"] == "cd-48":
            row["model"] = "teacher-48"
    msg = error_of(cfg)
    assert "teacher-48" in msg and "unique" in msg


def test_quality_reference_must_be_a_dataset(cfg):
    cfg["quality"]["reference"] = "cifar10"
    msg = error_of(cfg)
    assert "quality.reference" in msg and "cifar10" in msg


def test_inception_fid_without_weights(cfg):
    cfg["quality"] = {"kind": "inception_fid", "reference": "digits"}
    msg = error_of(cfg)
    assert "quality.weights" in msg


def test_inception_fid_with_weights_is_valid(cfg):
    cfg["quality"] = {"kind": "inception_fid", "reference": "digits", "weights": "data/weights/x.pt"}
    pconfig.validate(cfg)


def test_errors_are_collected(cfg):
    """Several reference problems are reported together, not one per run."""
    cfg["teachers"]["teacher-48"]["subset"] = "nope-1"
    cfg["students"]["cd-48"]["teacher"] = "nope-2"
    msg = error_of(cfg)
    assert "nope-1" in msg and "nope-2" in msg


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("bad", ["a/b", "with space", "../up", "", "-lead", "tab\tname"])
@pytest.mark.parametrize("section", ["datasets", "subsets", "nets", "teachers", "samplers", "tables"])
def test_names_that_cannot_be_paths_are_rejected(cfg, section, bad):
    key = next(iter(cfg[section]))
    cfg[section][bad] = cfg[section].pop(key)
    msg = error_of(cfg)
    assert section in msg
    assert repr(bad) in msg or bad in msg


@pytest.mark.parametrize("bad", ["cd/48", "cd 48"])
def test_student_names_that_cannot_be_paths_are_rejected(cfg, bad):
    cfg["students"][bad] = cfg["students"].pop("cd-48")
    for row in cfg["tables"]["demo"]["rows"]:
        if row["model"] == "cd-48":
            row["model"] = bad
    msg = error_of(cfg)
    assert "students" in msg and bad in msg


@pytest.mark.parametrize("good", ["a.b", "x_1", "heun+18", "A-b.c_d+e"])
def test_allowed_name_characters(cfg, good):
    cfg["samplers"][good] = {"kind": "heun", "steps": 4}
    pconfig.validate(cfg)


# --------------------------------------------------------------------------- helpers


def test_models_of(cfg):
    cfg = pconfig.validate(cfg)
    assert pconfig.models_of(cfg) == {"teacher-48": "teachers", "teacher-96": "teachers", "cd-48": "students",
                                      "cd-96": "students", "cd-48@75": "snapshots", "cd-96@75": "snapshots"}


def test_models_of_without_students(cfg):
    del cfg["students"]
    cfg["tables"] = {"demo": {"rows": [cfg["tables"]["demo"]["rows"][0]]}}
    cfg = pconfig.validate(cfg)
    assert pconfig.models_of(cfg) == {"teacher-48": "teachers", "teacher-96": "teachers"}
    assert pconfig.all_pairs(cfg) == [("teacher-48", "heun-18")]


def test_model_dir():
    cfg = pconfig.load(PAPER)
    assert pconfig.model_dir(cfg, "teacher-3000") == "results/teachers/teacher-3000"
    assert pconfig.model_dir(cfg, "cd-5000") == "results/students/cd-5000"
    with pytest.raises(KeyError):
        pconfig.model_dir(cfg, "nobody")


def test_subset_of():
    cfg = pconfig.load(PAPER)
    assert pconfig.subset_of(cfg, "teacher-4000") == "cifar10-4000"
    # a student trains on (and is searched against) its teacher's subset
    for n in (3000, 4000, 5000, 6000):
        assert pconfig.subset_of(cfg, f"cd-{n}") == f"cifar10-{n}"


def test_dataset_of_subset():
    cfg = pconfig.load(PAPER)
    assert pconfig.dataset_of_subset(cfg, "cifar10-3000")["source"] == "cifar10"


def test_table_pairs():
    cfg = pconfig.load(EMBEDDED)
    assert pconfig.table_pairs(cfg, "demo") == [
        ("teacher-48", "heun-18"), ("cd-48", "1-step"), ("teacher-96", "heun-18"), ("cd-96", "1-step"),
    ]


THREE_ROWS = [{"setting": "s", "label": "Teacher", "model": "teacher-48", "sampler": "heun-18"},
              {"setting": "s", "label": "Student", "model": "cd-48", "sampler": "1-step"},
              {"setting": "s", "label": "Student", "model": "cd-48", "sampler": "2-step"}]


def test_all_pairs_deduplicated_in_order(cfg):
    rows = THREE_ROWS
    cfg["tables"] = {"demo": {"rows": rows}}
    cfg["tables"]["first"] = {"rows": [rows[2], rows[0]]}
    cfg["tables"]["again"] = {"rows": [rows[0], rows[1], rows[0]]}
    cfg = pconfig.validate(cfg)
    # tables in config order: demo, first, again
    assert pconfig.all_pairs(cfg) == [
        ("teacher-48", "heun-18"), ("cd-48", "1-step"), ("cd-48", "2-step"),
    ]
    assert pconfig.table_pairs(cfg, "again") == [
        ("teacher-48", "heun-18"), ("cd-48", "1-step"), ("teacher-48", "heun-18"),
    ]


def test_all_pairs_order_follows_first_appearance(cfg):
    rows = THREE_ROWS
    cfg["tables"] = {"b": {"rows": [rows[2]]}, "a": {"rows": [rows[0], rows[2], rows[1]]}}
    cfg = pconfig.validate(cfg)
    assert pconfig.all_pairs(cfg) == [("cd-48", "2-step"), ("teacher-48", "heun-18"), ("cd-48", "1-step")]


def test_digits_fd_needs_the_classifiers_resolution_or_a_multiple_for_every_digits_subset():
    cfg = yaml.safe_load(EMBEDDED.read_text())
    cfg["datasets"]["digits"]["resolution"] = 16
    cfg["datasets"]["digits-32"] = {"source": "digits", "resolution": 32}
    cfg["subsets"]["digits-48"]["dataset"] = "digits-32"
    pconfig.validate(cfg)  # seen by the classifier as 2 x 2 block means
    cfg["datasets"]["digits-odd"] = {"source": "digits", "resolution": 24}
    cfg["subsets"]["digits-48"]["dataset"] = "digits-odd"
    with pytest.raises(pconfig.ConfigError, match="subsets.digits-48: its dataset 'digits-odd' is 24 px"):
        pconfig.validate(cfg)


def test_copy_threshold_is_fixed_or_calibrated_on_real_held_out_images(cfg):
    cfg["memorization"]["sscd"] = {"descriptor": "digits_classifier", "calibrate": {"quantile": 0.99}}
    valid = pconfig.validate(cfg)
    assert pconfig.calibration_yardstick(valid, "teacher-48") == "real~digits-48"
    assert pconfig.calibration_yardstick(valid, "replay~digits-48.r1") == "real~digits-48"
    cfg["memorization"]["sscd"]["threshold"] = 0.9
    with pytest.raises(ConfigError, match="fixed `threshold` or `calibrate`, not both"):
        pconfig.validate(cfg)
    del cfg["memorization"]["sscd"]["threshold"]
    cfg["yardsticks"] = {"kinds": ["replay", "blur"]}
    with pytest.raises(ConfigError, match="yardsticks.kinds leaves out `real`"):
        pconfig.validate(cfg)
    cfg["yardsticks"] = {}
    cfg["memorization"]["sscd"]["calibrate"]["quantile"] = 1.0
    with pytest.raises(ConfigError, match="quantile"):
        pconfig.validate(cfg)


def test_bridge_rows_name_edm_teachers_and_samplers():
    cfg = pconfig.load(ROOT / "config" / "embedded.yaml")
    assert [r["model"] for r in cfg["theory"]["bridge"]["rows"]] == ["teacher-48", "teacher-96"]
    bad = copy.deepcopy(cfg)
    bad["theory"]["bridge"]["rows"] = [{"model": "cd-48", "sampler": "heun-18"}, {"model": "teacher-48", "sampler": "nope"}]
    with pytest.raises(pconfig.ConfigError, match=r"rows\[0\].model.*'cd-48'.*teachers(.|\n)*rows\[1\].sampler"):
        pconfig.validate(bad)


def test_edge_cases_and_time_grids_are_checked(cfg):
    cfg["edge"]["times"] = {"min": 0.8, "max": 0.1, "num": 8}
    cfg["edge"]["cases"]["digit-templates"] = {"data": "digit_templates", "k": 4, "n": 60, "sigma0": 1.0, "d": 64}
    cfg["edge"]["cases"]["gaussian"].pop("d")
    cfg["edge"]["cases"]["wrong-classes"] = {"data": "digit_templates", "k": 3, "n": 20, "sigma0": 1.0, "classes": [1, 2]}
    message = error_of(cfg)
    assert "edge.times: min 0.8 must be below max 0.1" in message
    assert "edge.cases.digit-templates: `d` is for gaussian data" in message
    assert "edge.cases.gaussian: `d` is for gaussian data" in message
    assert "edge.cases.wrong-classes.classes: 2 classes for k = 3" in message


def test_pairing_rows_are_checked(cfg):
    cfg["pairing"] = {"teacher_sampler": "1-step", "rows": [
        {"label": "a teacher without reference", "model": "teacher-48", "sampler": "heun-18"},
        {"label": "unknown", "model": "cd-99", "sampler": "1-step"},
        {"label": "bad reference", "model": "cd-48", "sampler": "1-step", "reference": "teacher-99"}]}
    message = error_of(cfg)
    assert "pairing.teacher_sampler: '1-step' is not a deterministic EDM sampler" in message
    assert "pairing.rows[0].model: 'teacher-48' is not a student: name its `reference`" in message
    assert "pairing.rows[1].model: 'cd-99' is not a configured model" in message
    assert "pairing.rows[2].reference: 'teacher-99' is not a configured model" in message


def test_per_set_jobs_declare_memory_from_sizes():
    """stage_mem_mb from the subset and set sizes: a CIFAR-10 search of 50,000 samples against 3,000
    images holds 2 x float32 copies of 53,000 x 3,072 values (+ SSCD descriptors), an ImageNet-64 one
    four times the values per image; small sets get the profile's 4 GB floor."""
    cfg = pconfig.load(PAPER)
    cifar = pconfig.stage_mem_mb(cfg, "real~cifar10-3000", "search", 50000, descriptors=True)
    expected = 2048 + 1.5 * (8 * 3072 * 53000 + 4 * 512 * 53000) / 2 ** 20
    assert cifar == int(expected)
    assert pconfig.stage_mem_mb(cfg, "real~imagenet64-10000", "search", 50000) > 2 * cifar
    assert pconfig.stage_mem_mb(cfg, "real~cifar10-3000", "embed", 100) == 4000
    assert pconfig.stage_mem_mb(cfg, "subset:cifar10-3000", "embed", 0) == 4000
    assert pconfig.subset_size(cfg, "cifar10-3000") == (3000, 3072)



# --------------------------------------------------------------------------- pairing yardsticks


def _merged(*paths: Path) -> dict:
    """Config files layered as Snakemake layers --configfile (a recursive update of mappings)."""
    def update(base: dict, extra: dict) -> dict:
        for k, v in extra.items():
            base[k] = update(dict(base[k]), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return base

    out: dict = {}
    for p in paths:
        out = update(out, yaml.safe_load(p.read_text()))
    return out


def _source_indices(cfg: dict, subset: str, dataset_size: int):
    """The source indices a uniform subset draws: build_subset on placeholder images of the dataset's size
    (a uniform draw depends on the size, the seed and the subsets it is disjoint from, not on pixels)."""
    import numpy as np

    from pipeline.data import build_subset

    spec = cfg["subsets"][subset]
    assert spec["kind"] == "uniform"
    exclude = [_source_indices(cfg, other, dataset_size) for other in spec.get("disjoint_from", [])]
    i = np.arange(dataset_size)  # distinct placeholder pixels: equal images would be collapsed into one
    placeholder = np.stack([i // 256, i % 256], axis=-1).astype(np.uint8).reshape(dataset_size, 1, 1, 2)
    return build_subset(placeholder, np.zeros(dataset_size), spec, np.concatenate(exclude) if exclude else None).index


@pytest.mark.parametrize("paths,dataset_size", [
    ((EMBEDDED, ROOT / "config" / "embedded-baselines.yaml"), 1797),  # scikit-learn's digits
    ((PAPER,), 50000),  # CIFAR-10's training set
], ids=["embedded-baselines", "paper"])
def test_pairing_yardstick_shares_no_training_image_with_its_reference(paths, dataset_size):
    """The unrelated teacher of the pairing rows is unrelated: its subset and its reference's share no
    source index (cifar10-5000 lies inside cifar10-6000, and digits-96 shared 3 digits with digits-48)."""
    cfg = pconfig.validate(_merged(*paths))
    rows = [r for r in cfg["pairing"]["rows"] if r.get("series") == "yardstick"]
    assert rows
    for row in rows:
        ours, theirs = pconfig.subset_of(cfg, row["model"]), pconfig.subset_of(cfg, row["reference"])
        shared = set(_source_indices(cfg, ours, dataset_size)) & set(_source_indices(cfg, theirs, dataset_size))
        assert not shared, f"{ours} and {theirs} share {len(shared)} source images"
    assert len(set(_source_indices(cfg, "cifar10-5000" if dataset_size == 50000 else "digits-48", dataset_size))
               - set(_source_indices(cfg, "cifar10-6000" if dataset_size == 50000 else "digits-96", dataset_size))) \
        == (0 if dataset_size == 50000 else 45)  # the old yardsticks' overlap, which this test exists to catch


def test_disjoint_from_names_another_uniform_subset_of_the_same_dataset(cfg):
    uniform = {"kind": "uniform", "n": 8, "seed": 1}
    cfg["datasets"]["digits-16px"] = {"source": "digits", "resolution": 16}
    cfg["subsets"].update({
        "digits-x": {"dataset": "digits", **uniform, "disjoint_from": ["nope", "digits-x"]},
        "digits-y": {"dataset": "digits-16px", **uniform, "disjoint_from": ["digits-48"]},
        "digits-z": {"dataset": "digits", **uniform, "disjoint_from": ["digits-w"]},
        "digits-w": {"dataset": "digits", **uniform, "disjoint_from": ["digits-48"]},
        "digits-r": {"dataset": "digits", "kind": "repetition", "seed": 0, "repeated_classes": [0], "per_class": 2,
                     "repeats": 2, "others": 4, "disjoint_from": ["digits-48"]}})
    message = error_of(cfg)
    assert "subsets.digits-x.disjoint_from: 'nope' is not another configured subset" in message
    assert "subsets.digits-x.disjoint_from: 'digits-x' is not another configured subset" in message
    assert "subsets.digits-y.disjoint_from: 'digits-48' must draw from the same dataset ('digits-16px')" in message
    assert "subsets.digits-z.disjoint_from: 'digits-w' must draw from the same dataset ('digits') and name no" in message
    assert "subsets.digits-r.disjoint_from: only a uniform subset is drawn disjoint from others" in message


def test_student_rows_name_their_own_teachers_row():
    """Table 5's miniature: each student row pairs with its own teacher's row (the nearest above it), a
    teacher or yardstick row with none; a student whose teacher the table does not show gets none."""
    cfg = pconfig.validate(_merged(EMBEDDED, ROOT / "config" / "embedded-baselines.yaml"))
    rows = pconfig.table_rows(cfg, "table5-miniature")
    paired = {r["label"] + "/" + r["model"]: r.get("teacher_row") for r in rows}
    assert paired["PD/pd-mem10"] == paired["PD+refine/pd-mem10"] == paired["CD/cd-mem10"] == 0
    assert paired["DMD, no regression/dmd-mem30-noreg"] == paired["CD/cd-mem30"] == 4
    assert rows[0]["model"] == "teacher-mem10" and rows[4]["model"] == "teacher-mem30"
    assert all(r.get("teacher_row") is None for r in rows if r["role"] != "student")
    cfg["tables"]["table5-miniature"]["rows"] = [r for r in cfg["tables"]["table5-miniature"]["rows"]
                                                 if r["model"] != "teacher-mem10"]
    assert all(r.get("teacher_row") is None for r in pconfig.table_rows(cfg, "table5-miniature")
               if r["model"] in ("pd-mem10", "cd-mem10"))
