"""The Snakemake workflow itself, through its CLI: dry runs of both shipped configs, fail-fast
config validation, per-table targets, and one tiny real end-to-end run on the digits.

Every run uses `-s <repo>/Snakefile --directory <tmp>`, so nothing in the checkout is written.
Note: Snakemake 9 prints parse-time errors (a ConfigError raised while the Snakefile is read)
on stdout, not stderr, so error checks look at both streams.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline import config as pconfig
from pipeline import replicates
from pipeline.shards import num_shards

pytestmark = pytest.mark.workflow

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"
EMBEDDED = ROOT / "config" / "embedded.yaml"
PAPER = ROOT / "config" / "config.yaml"
VENV_BIN = Path(sys.executable).parent


def snakemake(workdir: Path, *args: str, configfile: Path | None = None, timeout: int = 120,
              cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the snakemake CLI on the repo's Snakefile in `workdir`. Targets go in `args`, before
    --configfile (which takes several values and would swallow a target placed after it)."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "-m", "snakemake", *args, "-s", str(SNAKEFILE), "--directory", str(workdir)]
    if configfile is not None:
        cmd += ["--configfile", str(configfile)]
    return subprocess.run(cmd, cwd=cwd or workdir, env=env, capture_output=True, text=True, timeout=timeout)


def output_of(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"snakemake failed ({proc.returncode}):\n{output_of(proc)[-6000:]}"
    return proc


def job_stats(text: str) -> dict[str, int]:
    """The 'Job stats' table of a (dry) run as {rule: count}, without the total."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "Job stats:")
    stats = {}
    for line in lines[start + 1:]:
        parts = line.split()
        if not parts or parts[0] in ("job",) or set(parts[0]) == {"-"}:
            continue
        if parts[0] == "total":
            break
        assert len(parts) == 2 and parts[1].isdigit(), f"unexpected job stats line {line!r}"
        stats[parts[0]] = int(parts[1])
    return stats


def embedded() -> dict:
    with open(EMBEDDED) as f:
        return yaml.safe_load(f)


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def results_files(workdir: Path) -> list[Path]:
    return [p for p in workdir.rglob("*") if p.is_file() and ".snakemake" not in p.parts]


# --------------------------------------------------------------------------- paper config, dry


def test_paper_config_dry_run(tmp_path):
    proc = check(snakemake(tmp_path, "-n", configfile=PAPER))
    out = output_of(proc)
    stats = job_stats(out)
    # Table 1 (4 teachers, 4 students), Table 2 (3 ImageNet teachers and students), Table 4 (the localized
    # teacher and student on CIFAR-10 and on ImageNet), Table 6 (stochastic teachers, 2-step students),
    # Table 7 (N = 40, 80), App. D.2 (narrow, wide and shallow teachers with their students), Figure 1 (5
    # snapshots of each Table 1 student), Table 3 (3 SD1.5 teachers fine-tuned on COCO memorization sets,
    # their LCM students), and App. A: one teacher run on 1000 images with 9 snapshots, two teachers
    # selected from it by memorization rate, PD (from both), DMD, CD and continuous-time CD students of
    # them (Table 5, App. A.1's CD rows, the refine sweep, Figs. 4 and 5), and Fig. 8's six mismatched or
    # randomly initialised students, the CD students of both teachers traced by 4 snapshots each; the
    # pairing rows' yardstick teacher on its own subset (disjoint from cifar10-5000) and Table 5's
    # "DMD, no regression" student
    expected = {
        "fetch_cifar10": 1, "fetch_inception": 1, "fetch_lpips_backbone": 1, "imagenet_source": 1,
        "prepare_imagenet64": 1, "subset": 5 + 4 + 3 + 1 + 1, "train_teacher": 5 + 3 + 4 + 1 + 1,
        "distill": 4 + 1 + 2 + 3 + 4 + 2 + 2 + 1 + 2 + 6 + 1, "snapshot": 4 * 5 + 9 + 8 * 4, "table": 12,
        "select_teacher": 2, "curve_figure": 3, "sample_figure": 2,
        "fetch_sd15": 1, "fetch_coco_captions": 1, "fetch_coco_images": 1, "fetch_clip": 1,
        "cache_latents": 3, "finetune_teacher": 3, "distill_lcm": 3,
    }
    assert {rule: stats.get(rule) for rule in expected} == expected, stats
    text_pairs = 6
    # Table 5 (7, with "DMD, no regression"), App. A.1's CD rows (4 new), the refine sweep (6 new levels),
    # Fig. 8 (8 runs x 5 points, 2 of them App. A.1's)
    pairs = 8 + 2 + 8 + 2 + 4 * 5 + 6 + 2 + 6 + text_pairs + 7 + 4 + 6 + 38
    # the convergence criterion compares each student row with its run's last snapshot under the row's
    # sampler: Table 6's 2-step rows of the four Table 1 students and App. A.1's 1-step rows add their
    # step-400000 snapshots' sets; the selections measure every model of teacher-1000's run (9 snapshots
    # and its end) with heun-18; Figs. 4 and 5 sample PD from the 30% teacher and both continuous-time
    # students, which no table measures
    figure_only = 3
    pairing_only = 1  # the yardstick teacher-5000-disjoint's heun-18 set, which no table shows
    sets = pairs + 4 + 2 + 10 + figure_only + pairing_only
    assert stats["sample_manifest"] + stats["sample_set"] == sets
    # 50000 samples per sample set: the one- and two-step students' in one sample_set job (shard_size
    # 50000), every other set in sample_shard jobs of its sampler's shard size and a manifest job
    cfg = pconfig.load(PAPER)
    samplers = [m.group(1) for m in {m.group(0): m for m in re.finditer(
        r"results/samples/[^/\s]+/([^/\s]+)/manifest\.json", out)}.values() if m.group(1) in cfg["samplers"]]
    single = [s for s in samplers if pconfig.shard_size(cfg, s) == 50000]
    assert len(samplers) == sets and set(single) == {"1-step", "2-step", "pd-1", "dmd-1"}
    assert stats["sample_set"] == len(single) and stats["sample_manifest"] == sets - len(single)
    assert stats["sample_shard"] == sum(num_shards(50000, pconfig.shard_size(cfg, s)) for s in samplers
                                        if s not in single)
    # four yardsticks (real held-out, replay, blurred, train vs train) for each of the 13 training subsets
    assert stats["yardstick"] == 52
    measured = sets - figure_only
    # one search job per measured set: the L2 search, the SSCD search and the gallery; the pairing rows
    # measure one of Fig. 4's sets too (PD from the 30% teacher: the row reports its L2 Mem)
    measured += 1
    assert stats["search"] == stats["metrics"] == measured + 52
    assert "similarity" not in stats and "neighbour_figure" not in stats
    # SSCD: every sample set and every subset embedded once; CLIP image and prompt embeddings for
    # Table 3's rows and their yardsticks only
    assert stats["fetch_sscd"] == 1 and stats["embed_subset"] == 13 + 1  # + the pairing yardstick's subset
    assert stats["embed_samples"] == measured + 52 + 2 * (text_pairs + 12)
    # FID against the full dataset each row's subset came from (CIFAR-10, ImageNet-64); COCO rows against
    # their training subset
    assert stats["reference_stats"] == 2 and stats["subset_reference_stats"] == 3
    # per-set jobs declare memory from what they hold (pipeline.config.stage_mem_mb): an ImageNet-64
    # set's search more than a CIFAR-10 set's, the profile's 4 GB a floor
    searches = re.findall(r"rule search:\n.*?wildcards: model=(\S+), sampler=\S+\n.*?mem_mb=(\d+)", out, re.S)
    mem = {model: int(mb) for model, mb in searches}
    assert mem["real~imagenet64-10000"] > mem["real~cifar10-3000"] >= 4000
    # Inception FID: the digits classifier is not needed
    assert "train_feature_net" not in stats
    assert results_files(tmp_path) == []


def test_paper_config_wires_the_study_variants(tmp_path):
    """Snapshot, stochastic-sampler and N-sweep jobs are in the plan, each with the inputs it needs."""
    out = output_of(check(snakemake(tmp_path, "-n", "-p", configfile=PAPER)))
    assert "results/snapshots/cd-3000/step-100000/model.safetensors" in out
    assert "results/samples/cd-3000@100000/1-step/shard-00000.parquet" in out
    assert "results/students/cd-3000/snapshots" in out
    assert "results/samples/teacher-5000/stochastic-cifar10/shard-00001.parquet" in out
    assert "results/samples/teacher-5000/stochastic-cifar10/shard-00002.parquet" not in out
    assert '"S_churn": 30' in out
    assert '"num_scales": 80' in out and '"num_scales": 40' in out
    assert "data/weights/vgg16-397923af.pth" in out and '"metric": "lpips"' in out
    assert '"net_config": {' in out and '"layers_per_block": 2' in out and '"init": "random"' in out


def test_paper_config_text_to_image_branch_dry_run(tmp_path):
    """Table 3's models, down to their sample shards: COCO and SD1.5 from their fetch rules, the memorization
    set, cached latents, the fine-tuned teacher and its LCM student, through the same launch and shards."""
    targets = [f"results/samples/{m}/{s}/manifest.json" for m, s in (("sd15-memorize-3x", "sd15-pndm-50"),
                                                                   ("lcm-sd15-3x", "lcm-4"))]
    out = output_of(check(snakemake(tmp_path, "-n", "-p", *targets, configfile=PAPER)))
    stats = job_stats(out)
    assert {k: stats[k] for k in ("fetch_sd15", "fetch_coco_captions", "fetch_coco_images", "subset", "cache_latents",
                                  "finetune_teacher", "distill_lcm")} == dict.fromkeys(
        ("fetch_sd15", "fetch_coco_captions", "fetch_coco_images", "subset", "cache_latents", "finetune_teacher",
         "distill_lcm"), 1)
    assert "fetch-sd15 --dest data/weights/stable-diffusion-v1-5 --repo stable-diffusion-v1-5/stable-diffusion-v1-5 " \
           "--revision f03de327dd89b501a01da37fc5240cf4fdba85a1" in out
    assert "cache-latents --subset results/subsets/coco-memorize-3x.parquet --backbone data/weights/stable-diffusion-v1-5 " \
           "--out results/latents/coco-memorize-3x/sd15.safetensors" in out
    assert "--config_file config/accelerate/deepspeed-zero2.yaml -m pipeline finetune-teacher " \
           "--subset results/subsets/coco-memorize-3x.parquet --latents results/latents/coco-memorize-3x/sd15.safetensors" in out
    assert '"gradient_checkpointing": true' in out and '"lr": 1e-05' in out
    assert "distill --method lcm --subset results/subsets/coco-memorize-3x.parquet" in out
    assert '"loss": "huber"' in out and '"target_ema": 0.95' in out and '"lr": 1e-06' in out
    assert '--sampler-name lcm-4 --sampler \'{"guidance_scale": 8.5, "kind": "lcm", "original_steps": 50, "steps": 4}\'' in out


def test_paper_config_table3_is_a_target(tmp_path):
    """`snakemake -n results/tables/table3.md` shows the whole branch: 3 fine-tuned teachers, 3 LCM students,
    their yardsticks with captions, SSCD and CLIP for prompt-conditioned rows only."""
    out = output_of(check(snakemake(tmp_path, "-n", "-p", "results/tables/table3.md", configfile=PAPER)))
    stats = job_stats(out)
    assert (stats["finetune_teacher"], stats["distill_lcm"], stats["cache_latents"], stats["subset"]) == (3, 3, 3, 3)
    assert stats["yardstick"] == 12 and stats["search"] == 18 and stats["metrics"] == 18 and stats["table"] == 1
    assert stats["embed_samples"] == 18 * 3  # SSCD, CLIP image and CLIP prompt embeddings of every row
    assert "fetch_sd15" in stats and "fetch_clip" in stats and "fetch_coco_images" in stats
    # rows of image-prompt collections are judged against their training subset (COCO is never loaded whole)
    assert "results/quality/reference/inception_fid-subset-coco-memorize-3x.npz" in out
    table1 = output_of(check(snakemake(tmp_path, "-n", "-p", "results/tables/table1.md", configfile=PAPER)))
    assert "results/embeddings/clip" not in table1  # no prompts, no CLIP score


def test_missing_stable_diffusion_stops_at_its_fetch_rule(tmp_path):
    """Offline and without the weights, the branch stops at fetch_sd15, whose log names what is missing."""
    cfg = pconfig.load(PAPER)
    path = write_config(tmp_path / "c.yaml", cfg)
    env_offline = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "data/weights/stable-diffusion-v1-5/checksums.json",
                           "-s", str(SNAKEFILE), "--directory", str(tmp_path), "--configfile", str(path)],
                          cwd=tmp_path, env=dict(env_offline, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "fetch_sd15" in output_of(proc)
    log = (tmp_path / "logs/fetch/sd15/data/weights/stable-diffusion-v1-5.log").read_text()
    assert "could not download Stable Diffusion v1.5" in log
    assert "copy the files there (model_index.json, scheduler/scheduler_config.json, tokenizer/vocab.json, " \
           "unet/diffusion_pytorch_model.safetensors" in log
    assert not (tmp_path / "data/weights/stable-diffusion-v1-5").exists()


@pytest.mark.parametrize("flag", ["--rulegraph", "--dag"])
def test_paper_config_graphs(tmp_path, flag):
    proc = check(snakemake(tmp_path, flag, configfile=PAPER))
    assert proc.stdout.lstrip().startswith("digraph"), proc.stdout[:500]
    assert proc.stdout.rstrip().endswith("}")
    for rule in ("train_teacher", "distill", "sample_shard", "search", "metrics", "table"):
        assert rule in proc.stdout


def test_text_memorization_subset_rule_reads_both_datasets(tmp_path):
    """A text-to-image memorization set of COCO-like extras: the subset job depends on both datasets'
    files and hands the extra dataset to the command."""
    cfg = embedded()
    cfg["datasets"]["pairs"] = {"source": "pairs", "dir": "data/raw/pairs-200", "resolution": 16}
    cfg["datasets"]["coco"] = {"source": "coco2017", "images_dir": "data/raw/coco/train2017",
                               "captions_file": "data/raw/coco/annotations/captions_train2017.json", "resolution": 16}
    cfg["subsets"]["memorized-3x"] = {"dataset": "pairs", "extra_dataset": "coco", "kind": "text_memorization",
                                      "n": 200, "repeats": 10, "extra_ratio": 3, "seed": 0}
    proc = snakemake(tmp_path, "-n", "-p", "results/subsets/memorized-3x.parquet",
                     configfile=write_config(tmp_path / "c.yaml", cfg))
    out = output_of(proc)
    assert proc.returncode != 0 and "Missing input files" in out  # your own pairs: no rule makes them
    assert "data/raw/pairs-200/metadata.jsonl" in out and "captions_train2017.json" not in out.split("Missing")[1]
    f = tmp_path / "data/raw/pairs-200/metadata.jsonl"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text("")
    out = output_of(check(snakemake(tmp_path, "-n", "-p", "results/subsets/memorized-3x.parquet",
                                    configfile=tmp_path / "c.yaml")))
    # COCO comes from its fetch rules: the captions file and the split's images from their md5-checked archives
    assert "rule fetch_coco_captions" in out and "rule fetch_coco_images" in out
    assert "fetch-coco --captions-file data/raw/coco/annotations/captions_train2017.json --images-dir " \
           "data/raw/coco/train2017 --zips-dir data/raw/coco/zips" in out
    assert """--extra-dataset '{"captions_file": "data/raw/coco/annotations/captions_train2017.json",""" in out
    assert """--spec '{"extra_ratio": 3, "kind": "text_memorization", "n": 200, "repeats": 10, "seed": 0}'""" in out


# --------------------------------------------------------------------------- embedded default


def test_embedded_default_without_configfile(tmp_path):
    """With no --configfile the embedded digits config must be found next to the Snakefile,
    whatever the working directory (`snakemake -s /path/to/Snakefile` from elsewhere)."""
    proc = snakemake(tmp_path, "-n")
    assert proc.returncode == 0, (
        "the default config is resolved relative to the working directory, not the Snakefile:\n"
        + output_of(proc)[-3000:]
    )
    stats = job_stats(output_of(proc))
    assert stats["train_teacher"] == 2 and stats["distill"] == 2 and stats["table"] == 2


@pytest.mark.parametrize("table", list(yaml.safe_load(PAPER.read_text())["tables"]))
def test_each_paper_table_plans_only_its_own_jobs(tmp_path, table):
    """`snakemake -n results/tables/<name>.md`: exactly one table, and metrics for exactly its rows and
    the yardsticks of its subsets; a table with published values reads the published file."""
    cfg = pconfig.load(PAPER)
    rows = pconfig.table_rows(cfg, table)
    proc = check(snakemake(tmp_path, f"results/tables/{table}.md", "-n", configfile=PAPER))
    out = output_of(proc)
    stats = job_stats(out)
    wanted = set(pconfig.table_metrics(rows))  # its rows, with their convergence snapshots
    # and the models a selected teacher is chosen from, when a row is or distils one
    selections = cfg.get("teacher_selections", {})
    for r in rows:
        model = pconfig.base_model(r["model"])
        for name in (model, cfg.get("students", {}).get(model, {}).get("teacher")):
            if name in selections:
                wanted |= {(m, selections[name]["sampler"]) for m in pconfig.selection_candidates(cfg, name)}
    assert stats["table"] == 1 and stats["metrics"] == len(wanted), stats
    planned = set(re.findall(r"output: results/metrics/(\S+)\.json", out))
    assert planned == {f"{m}/{s}" for m, s in wanted}
    assert ("config/published.yaml" in out) == ("paper" in cfg["tables"][table])


def test_embedded_default_with_config_override(tmp_path):
    """`--config key=value` without --configfile overrides one key of the default config
    instead of replacing the whole config."""
    proc = snakemake(tmp_path, "-n", "--config", "seed=3")
    assert proc.returncode == 0, output_of(proc)[-3000:]


def test_mixed_precision_reaches_the_training_launch(tmp_path):
    cfg = embedded()
    cfg["teachers"]["teacher-48"]["compute"]["mixed_precision"] = "bf16"
    proc = check(snakemake(tmp_path, "results/teachers/teacher-48/model.safetensors", "-n", "-p",
                           configfile=write_config(tmp_path / "bf16.yaml", cfg)))
    # A one-process CPU job starts without `accelerate launch`, with the environment it would set:
    # Accelerator() in that environment runs bf16 on the CPU.
    env = dict(re.findall(r"\b(ACCELERATE_\w+|KMP_\w+)=(\S+)", output_of(proc)))
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16" and "accelerate launch" not in output_of(proc)
    probe = "from accelerate import Accelerator; a = Accelerator(); print(a.mixed_precision, a.device.type)"
    ran = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **env}, capture_output=True, text=True)
    assert ran.stdout.split() == ["bf16", "cpu"], ran.stderr[-2000:]
    cfg["teachers"]["teacher-48"]["compute"].update(gpus=1)
    proc = check(snakemake(tmp_path, "results/teachers/teacher-48/model.safetensors", "-n", "-p",
                           configfile=write_config(tmp_path / "bf16-gpu.yaml", cfg)))
    assert "accelerate launch --num_machines 1 --mixed_precision bf16" in output_of(proc)
    cfg["teachers"]["teacher-48"]["compute"]["mixed_precision"] = "fp8"
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path / "fp8.yaml", cfg))
    assert proc.returncode != 0 and "mixed_precision" in output_of(proc)


def test_deepspeed_config_file_and_compile_reach_the_training_launch(tmp_path):
    """compute.accelerate_config names the shipped ZeRO-2 file, which accelerate reads as DeepSpeed
    stage 2; compute.compile turns on accelerate's inductor backend."""
    from accelerate.commands.config.config_args import load_config_from_file

    zero2 = "config/accelerate/deepspeed-zero2.yaml"
    parsed = load_config_from_file(str(ROOT / zero2))
    assert parsed.distributed_type == "DEEPSPEED" and parsed.deepspeed_config["zero_stage"] == 2
    assert parsed.deepspeed_config["gradient_clipping"] == 0.0  # EDM does not clip
    cfg = embedded()
    cfg["teachers"]["teacher-48"]["compute"].update(accelerate_config=zero2, compile=True)
    out = output_of(check(snakemake(tmp_path, "results/teachers/teacher-48/model.safetensors", "-n", "-p",
                                    configfile=write_config(tmp_path / "zero2.yaml", cfg))))
    assert f"--config_file {zero2}" in out and "--dynamo_backend inductor" in out


def test_quality_against_the_training_subset_plans_one_reference_per_subset(tmp_path):
    """`quality.reference_set: subset`: each model (and yardstick) is judged against its own training
    subset's statistics; the full-dataset reference is not built."""
    cfg = yaml.safe_load(EMBEDDED.read_text())
    cfg["quality"]["reference_set"] = "subset"
    proc = check(snakemake(tmp_path, "results/tables/demo.md", "-n", configfile=write_config(tmp_path / "c.yaml", cfg)))
    stats = job_stats(output_of(proc))
    assert stats["subset_reference_stats"] == 2 and "reference_stats" not in stats, stats
    assert "results/quality/reference/digits_fd-subset-digits-48.npz" in output_of(proc)
    assert "results/quality/reference/digits_fd-subset-digits-96.npz" in output_of(proc)


def test_clip_score_plans_image_and_prompt_embeddings_and_the_fetch(tmp_path):
    """`quality.clip`: every prompt-conditioned sample set (text-to-image models and the yardsticks of their
    image-prompt subsets) gets CLIP image and prompt embeddings before its metrics, and the model comes from
    the fetch_clip rule (run on the login node); sample sets without prompts get none."""
    cfg = embedded()
    for key, value in yaml.safe_load((ROOT / "config" / "embedded-text2image.yaml").read_text()).items():
        cfg[key] = {**cfg.get(key, {}), **value}
    cfg["quality"]["clip"] = {}
    config = write_config(tmp_path / "c.yaml", cfg)
    out = output_of(check(snakemake(tmp_path, "results/tables/table3-miniature.md", "-n", configfile=config)))
    stats = job_stats(out)
    assert stats["fetch_clip"] == 1 and stats["metrics"] == 6 + 12
    assert stats["embed_samples"] == 18 + 2 * 18, stats  # digit features, CLIP image and prompt embeddings
    assert "results/embeddings/clip-text/lcm-mini-3x/lcm-4.npy" in out
    assert "results/embeddings/clip-text/real~digits-memorize-3x/data.npy" in out
    assert "data/weights/clip-vit-large-patch14/checksums.json" in out
    demo = output_of(check(snakemake(tmp_path, "results/tables/demo.md", "-n", configfile=config)))
    assert "fetch_clip" not in job_stats(demo) and "results/embeddings/clip" not in demo


def test_embedded_explicit_configfile_dry_run(tmp_path):
    proc = check(snakemake(tmp_path, "-n", configfile=EMBEDDED))
    stats = job_stats(output_of(proc))
    # Two regimes (48 and 96 digits), each with 3 (model, sampler) pairs: teacher heun-18, student
    # 1-step, 1 snapshot; 4 yardsticks (real held-out, replay, blurred, train vs train) per subset
    expected = {
        "subset": 2, "train_teacher": 2, "distill": 2, "snapshot": 2, "sample_set": 6,
        "yardstick": 8, "search": 14, "metrics": 14, "table": 2, "curve_figure": 1,
        "train_feature_net": 1, "reference_stats": 1, "theory_analysis": 3, "theory_report": 1, "theory_bridge": 2,
    }
    assert {rule: stats.get(rule) for rule in expected} == expected, stats
    # 512 samples per set: each set is one sample_set job that writes its manifest too
    assert "sample_shard" not in stats and "sample_manifest" not in stats
    assert "fetch_cifar10" not in stats and "fetch_inception" not in stats


def test_embedded_grid_adds_the_sampler_comparison_without_training(tmp_path):
    """config/embedded-grid.yaml layered on the embedded default: Table 6 in miniature, no new training."""
    proc = check(snakemake(tmp_path, "-n", configfile=EMBEDDED))
    base = job_stats(output_of(proc))
    cmd = ["-n", "--configfile", str(EMBEDDED), str(ROOT / "config" / "embedded-grid.yaml")]
    grid = job_stats(output_of(check(snakemake(tmp_path, *cmd))))
    assert grid["table"] == base["table"] + 1
    assert grid["train_teacher"] == base["train_teacher"] and grid["distill"] == base["distill"]
    # stochastic teacher and 2-step student samples for both regimes, and each student's last snapshot in
    # 2 steps for the convergence criterion
    assert grid["sample_set"] == base["sample_set"] + 4 + 2


EVIDENCE = ROOT / "config" / "embedded-evidence.yaml"
QUALITY = ROOT / "config" / "embedded-quality.yaml"


def teacher_commands(text: str) -> dict[str, str]:
    """{teacher: its train-teacher shell command} from a dry run with --printshellcmds."""
    return {m.group(1): m.group(0) for m in re.finditer(r"train-teacher --subset results/subsets/\S+ .*--out results/teachers/(\S+) .*", text)}


def test_quality_config_distils_from_the_evidence_runs_teachers_without_training_them_again(tmp_path):
    """config/embedded-quality.yaml layered on the evidence config: where the evidence run's three replicates
    of teacher-48 and teacher-160 are present, its dry run (with 5 replicates, stage 2) plans no job for them,
    and their train-teacher commands are those of the evidence config (no params change that would rerun them
    in a directory the evidence run wrote); the new ~10% teacher and the replicates beyond 3 are planned."""
    heun = "results/tables/quality-heun.md"
    for d in ("q", "e", "w"):
        (tmp_path / d).mkdir()
    layered = teacher_commands(check(snakemake(tmp_path / "q", heun, "-n", "--printshellcmds", "--config", "replicates=3",
                                               "--configfile", str(EVIDENCE), str(QUALITY), timeout=300)).stdout)
    alone = teacher_commands(check(snakemake(tmp_path / "e", "results/tables/demo.md", "-n", "--printshellcmds",
                                             "--configfile", str(EVIDENCE), timeout=300)).stdout)
    evidence_teachers = [replicates.replicate_id(t, r) for t in ("teacher-48", "teacher-160") for r in range(3)]
    assert set(alone) == set(evidence_teachers) and set(layered) == set(alone) | {f"teacher-112{s}" for s in ("", ".r1", ".r2")}
    for name in evidence_teachers:
        assert layered[name] == alone[name], name
    work = tmp_path / "w"
    old = time.time() - 3600
    for subset in ("digits-48", "digits-160"):
        path = work / "results" / "subsets" / f"{subset}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"planted")
        os.utime(path, (old, old))
    for name in evidence_teachers:
        out = work / "results" / "teachers" / name
        (out / "snapshots").mkdir(parents=True)
        for f in ("model.safetensors", "config.json", "stats.json"):
            (out / f).write_text("planted")
    proc = check(snakemake(work, heun, "-n", "--config", "replicates=5", "--configfile", str(EVIDENCE), str(QUALITY),
                           timeout=300))
    text = output_of(proc)
    trained = set(re.findall(r"rule train_teacher:\n(?:.*\n)*?\s+wildcards: teacher=(\S+)", text))
    assert not trained & set(evidence_teachers), sorted(trained & set(evidence_teachers))
    assert trained == ({replicates.replicate_id("teacher-112", r) for r in range(5)}
                       | {replicates.replicate_id(t, r) for t in ("teacher-48", "teacher-160") for r in (3, 4)}), sorted(trained)
    assert job_stats(text)["subset"] == 1  # digits-112 only


# --------------------------------------------------------------------------- bad config


def test_bad_config_fails_fast_naming_the_key(tmp_path):
    text = EMBEDDED.read_text()
    assert "log_every: 200" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("log_every: 200", "log_evry: 200"))
    start = time.monotonic()
    proc = snakemake(tmp_path, "--cores", "1", configfile=bad)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    out = output_of(proc)
    assert "log_evry" in out
    assert "teachers.teacher-48.train" in out
    assert elapsed < 60
    # stopped before any job: nothing was produced
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()


def test_bad_reference_fails_fast(tmp_path):
    cfg = embedded()
    cfg["students"]["cd-48"]["teacher"] = "teacher-99"
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path / "bad.yaml", cfg))
    assert proc.returncode != 0
    assert "students.cd-48.teacher" in output_of(proc) and "teacher-99" in output_of(proc)


# --------------------------------------------------------------------------- per-table targets


@pytest.fixture
def two_tables(tmp_path) -> Path:
    cfg = embedded()
    rows = cfg["tables"]["demo"]["rows"]
    cfg["tables"] = {
        "teach": {"title": "teacher only", "rows": [rows[0]]},
        "demo": {"title": "teacher and student", "rows": [rows[0], rows[1]]},
    }
    return write_config(tmp_path / "two.yaml", cfg)


def test_teacher_only_table_plans_no_student_jobs(tmp_path, two_tables):
    proc = check(snakemake(tmp_path, "results/tables/teach.md", "-n", configfile=two_tables))
    out = output_of(proc)
    stats = job_stats(out)
    assert "distill" not in stats, stats
    assert stats["train_teacher"] == 1
    assert stats["sample_set"] == 1 and stats["metrics"] == 1 + 4
    assert stats["yardstick"] == 4
    assert stats["table"] == 1
    # the default target (and its galleries of the student's sets) is not requested
    assert "all" not in stats and stats["search"] == 1 + 4
    assert "results/samples/cd-48" not in out and "results/students/" not in out
    assert "wildcards: model=cd-48" not in out


def test_student_table_plans_student_jobs(tmp_path, two_tables):
    proc = check(snakemake(tmp_path, "results/tables/demo.md", "-n", configfile=two_tables))
    out = output_of(proc)
    stats = job_stats(out)
    assert stats["distill"] == 1 and stats["train_teacher"] == 1
    # teacher, student, and the student's last snapshot (step 400) for the convergence criterion
    assert stats["sample_set"] == 3 and stats["metrics"] == 3 + 4
    assert stats["snapshot"] == 1
    assert "results/samples/cd-48/1-step/shard-00000.parquet" in out
    assert "teach.md" not in out


# --------------------------------------------------------------------------- tiny real run

TINY_TABLE = "tiny"
PAIRS = [("teacher-48", "heun-4", "teachers"), ("cd-48", "1-step", "students")]
SNAPSHOT = ("cd-48@10", "1-step")


def tiny_config() -> dict:
    cfg = copy.deepcopy(embedded())
    # one regime only: the 48-digit teacher and its student
    del cfg["subsets"]["digits-96"], cfg["teachers"]["teacher-96"], cfg["students"]["cd-96"]
    # Localized repetition (Table 4's design in miniature): 4 images each of digits 0 and 1 seen
    # 3 times, 8 other digits once, so the table gains per-group memorization columns.
    cfg["subsets"]["digits-48"] = {"dataset": "digits", "kind": "repetition", "repeated_classes": [0, 1],
                                   "per_class": 4, "repeats": 3, "others": 8, "seed": 0}
    cfg["teachers"]["teacher-48"]["train"].update(steps=40, batch_size=16, log_every=10)
    cfg["students"]["cd-48"]["train"].update(steps=20, batch_size=16, log_every=10)
    cfg["students"]["cd-48"]["snapshots"] = [10]
    # the teacher's samples in three shard jobs and a manifest job; the one-step sets in one job each
    cfg["samplers"] = {"heun-4": {"kind": "heun", "steps": 4},
                       "1-step": {"kind": "consistency", "ts": [80.0], "shard_size": 24}}
    cfg["sampling"].update(num_samples=24, shard_size=10, batch_size=16)
    cfg["memorization"]["figure_samples"] = 8
    cfg["memorization"]["sscd"] = {"weights": "sscd-tiny.torchscript.pt", "preprocessing": "dcr", "threshold": 0.5}
    cfg["quality"]["classifier_epochs"] = 2
    cfg["replicates"] = 2  # every model twice, with seeds derived from the replicate: tables show a spread
    cfg["theory"].update(d=12, cd_samples=1000, seeds=[0, 1], psi_n_sweep=[2, 6])  # the random-feature branch, shortened
    cfg["theory"]["bridge"].update(rows=[{"model": "teacher-48", "sampler": "heun-4"}], noise_draws=8)
    # the edge-of-memorization lab, shortened: one case, two seeds, three sizes
    cfg["edge"].update(cases={"gaussian": cfg["edge"]["cases"]["gaussian"]}, seeds=[0, 1], size_fractions=[0.5, 0.8, 1.0],
                       noise_draws=8, samples=40, train={"steps": 40, "lr": 0.05, "noise_draws": 2})
    cfg["tables"] = {TINY_TABLE: {"title": "tiny", "figure": "curve", "rows": [
        {"setting": "16 digits", "label": "Teacher", "model": "teacher-48", "sampler": "heun-4"},
        {"setting": "16 digits", "label": "Student", "model": "cd-48", "sampler": "1-step"},
        {"setting": "16 digits", "label": "Student at step 10", "model": SNAPSHOT[0], "sampler": SNAPSHOT[1]},
    ]}}
    return cfg


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real run of the whole pipeline on a tiny config (about 2 minutes on 2 CPU cores)."""
    import torch

    workdir = tmp_path_factory.mktemp("tiny-run")
    config = write_config(workdir / "tiny.yaml", tiny_config())
    # a stand-in for the SSCD TorchScript file (no download): a scripted conv net with a 512-d output
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 8, stride=8), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 512))
    torch.jit.script(net).save(str(workdir / "sscd-tiny.torchscript.pt"))
    start = time.monotonic()
    proc = snakemake(workdir, "--cores", "2", "--show-failed-logs", configfile=config, timeout=900)
    elapsed = time.monotonic() - start
    print(f"\ntiny end-to-end snakemake run: {elapsed:.1f} s")
    check(proc)
    return workdir, config, elapsed


def test_tiny_run_theory_branch(tiny_run):
    """Section 5's random-feature analysis runs in the same DAG: one model per seed, then its figures and table."""
    workdir, _, _ = tiny_run
    theory = workdir / "results" / "theory"
    assert sorted(p.name for p in (theory / "analysis").iterdir()) == ["seed-0.npz", "seed-1.npz"]
    for name in ("spectra.png", "modes.png", "ridge.png", "psi-sweep-response.png", "psi-sweep-spectra.png"):
        assert (theory / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gen_share = (theory / "gen-share.md").read_text()
    rows = [line for line in gen_share.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[2].strip() for row in rows] == ["12"] * 4  # d, one row per seed: simulated C, then theorem
    assert gen_share.index("simulated C: Gen share") < gen_share.index("## Theorem 5.3's form of C beside it")
    # App. D.4's sweep: one row per psi_n, n = psi_n d
    rows = [line for line in (theory / "psi-sweep.md").read_text().splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[2].strip() for row in rows] == ["24", "72"]
    # the bridge on each replicate of the trained teacher: 16 unique training images x 8 draws of unet-tiny's 16 x 8 x 8 features
    bridge = (theory / "bridge" / "teacher-48.md").read_text()
    assert "(128 feature vectors of p = 1024)" in bridge and "| Gen modes (top d) | 64 |" in bridge
    assert (theory / "bridge" / "teacher-48.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (theory / "bridge").iterdir()) == [
        "teacher-48.md", "teacher-48.png", "teacher-48.r1.md", "teacher-48.r1.png"]


def test_tiny_run_edge_branch(tiny_run):
    """The edge-of-memorization lab runs in the same DAG: one job per case and seed, then its figure and
    table with the predicted and the measured transition and the copy share's yardsticks."""
    workdir, _, _ = tiny_run
    edge_dir = workdir / "results" / "edge"
    assert sorted(p.name for p in (edge_dir / "lab" / "gaussian").iterdir()) == ["seed-0.npz", "seed-1.npz"]
    assert (edge_dir / "crossover.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (edge_dir / "crossover.md").read_text()
    assert "| gaussian | 30 | 60 | 2 |" in md
    assert [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| 0.")] == ["0.500", "0.800"]


def test_tiny_run_replication_report(tiny_run):
    """The run ends in the replication report: every claim of config/claims.yaml with a computed verdict, the
    ones this config measures (the theory and edge labs; its one table has none of the study's rows) at the
    scale they were measured at, the rest NOT MEASURED with what would measure them."""
    workdir, _, _ = tiny_run
    claims_dir = workdir / "results" / "claims"
    md = (claims_dir / "claims.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| 00")]
    assert len(rows) >= 67 and md.splitlines()[2].startswith("Verdicts per scale: ")
    assert "not measured: " in md.splitlines()[2] and "random features, d = 12" in md.splitlines()[2]
    gen_share = next(r for r in rows if r.startswith("| 001-sec54-gen-share-nearly-all |"))
    assert "(n = 2)" in gen_share and "(random features, d = 12" in gen_share
    assert any(r.startswith("| 003-crossover-exists |") and "edge lab" in r for r in rows)
    with open(claims_dir / "claims.csv") as f:
        verdicts = {r["verdict"] for r in csv.DictReader(f)}
    assert verdicts <= {"REPRODUCED", "DISAGREES", "INCONCLUSIVE", "NOT MEASURED"} and "NOT MEASURED" in verdicts
    assert (claims_dir / "claims.html").read_text().startswith("<!DOCTYPE html>")


def test_tiny_run_table(tiny_run):
    workdir, _, _ = tiny_run
    md = (workdir / "results" / "tables" / f"{TINY_TABLE}.md").read_text()
    table_lines = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + 3 + 4, md  # header, separator, 3 rows, 4 yardstick rows
    assert "Teacher" in table_lines[2] and "Student" in table_lines[3] and "step 10" in table_lines[4]
    assert [line.split("|")[2].strip() for line in table_lines[5:]] == [
        "Real held-out", "Training replay", "Real held-out, blurred (sigma = 1 px)", "Train vs train (leave-one-out)"]
    csv_lines = (workdir / "results" / "tables" / f"{TINY_TABLE}.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 7, csv_lines
    assert csv_lines[1].split(",")[2:4] == ["teacher-48", "heun-4"]
    assert csv_lines[2].split(",")[2:4] == ["cd-48", "1-step"]
    assert csv_lines[3].split(",")[2:4] == list(SNAPSHOT)
    header = table_lines[0]
    assert "L2 Mem (repeated)" in header and "L2 Mem (non_repeated)" in header and "SSCD Mem / p95" in header
    assert {"mem_repeated", "mem_non_repeated"} <= set(csv_lines[0].split(","))


def test_tiny_run_rows_aggregate_their_replicates(tiny_run):
    """Each model ran twice with its own seeds (different weights, different samples); its table row is
    the mean of the two, with their standard deviation; the student's convergence is not assessed from
    its last snapshot and its end alone (two points give no slope interval); it is set against its own
    teacher replicate by replicate; drawn yardsticks have replicates, train vs train has none."""
    import numpy as np
    from safetensors.numpy import load_file

    workdir, _, _ = tiny_run
    res = workdir / "results"
    a, b = (load_file(str(res / "students" / m / "model.safetensors")) for m in ("cd-48", "cd-48.r1"))
    assert a.keys() == b.keys() and any(not np.array_equal(a[k], b[k]) for k in a)
    metrics = {m: json.loads((res / "metrics" / m / f"{s}.json").read_text())
               for m, s in [("teacher-48", "heun-4"), ("teacher-48.r1", "heun-4"), ("cd-48", "1-step"),
                            ("cd-48.r1", "1-step"), ("replay~digits-48", "data"), ("replay~digits-48.r1", "data")]}
    assert metrics["cd-48.r1"]["quality"]["value"] != metrics["cd-48"]["quality"]["value"]
    assert not (res / "samples" / "train~digits-48.r1").exists() and not (res / "samples" / "real~digits-48.r1").exists()
    with open(res / "tables" / f"{TINY_TABLE}.csv") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    for model in ("teacher-48", "cd-48", "replay~digits-48"):
        values = [metrics[m]["quality"]["value"] for m in (model, replicates.replicate_id(model, 1))]
        assert float(rows[model]["quality"]) == pytest.approx(np.mean(values))
        assert float(rows[model]["quality_sd"]) == pytest.approx(np.std(values, ddof=1))
        assert rows[model]["replicates"] == "2"
    assert rows["train~digits-48"]["replicates"] == "1" and rows["train~digits-48"]["quality_sd"] == ""
    assert rows["cd-48"]["converged"] == "" and rows["cd-48"]["convergence_steps"] == "10"
    md = (res / "tables" / f"{TINY_TABLE}.md").read_text()
    assert " ± " in md and "n/a: 2 points per replicate (steps 10 and the end), 4 needed" in md
    differences = [metrics[m]["quality"]["value"] - metrics[t]["quality"]["value"]
                   for m, t in (("cd-48", "teacher-48"), ("cd-48.r1", "teacher-48.r1"))]
    assert float(rows["cd-48"]["vs_teacher_quality"]) == pytest.approx(np.mean(differences))


# Rules whose jobs need none of torch (nor diffusers): each job is a fresh process, and torch alone
# costs about 3 s to import. Every job logs the heavy modules it loaded (pipeline.cli).
TORCH_FREE_RULES = ("subset", "yardstick", "sample_manifest", "search", "snapshot", "table",
                    "curve_figure", "metrics", "reference_stats", "theory_analysis", "theory_report", "edge_report", "claims")


def test_tiny_run_rules_import_only_what_they_use(tiny_run):
    workdir, _, _ = tiny_run
    seen = {}
    for log in (workdir / "logs").rglob("*.log"):
        rule = log.relative_to(workdir / "logs").parts[0]
        lines = [line for line in log.read_text().splitlines() if "heavy modules loaded:" in line]
        if lines:
            seen.setdefault(rule, set()).update(m.strip() for m in lines[-1].split("heavy modules loaded:")[1].split(","))
    assert set(TORCH_FREE_RULES) <= set(seen), sorted(seen)
    for rule in TORCH_FREE_RULES:
        assert not seen[rule] & {"torch", "diffusers", "transformers", "accelerate", "cleanfid"}, (rule, seen[rule])
    assert "torch" in seen["train_teacher"] and "torch" in seen["sample_shard"] and "torch" in seen["sample_set"]


# The conda packages that provide each heavy module a job may load (workflow/envs/*.yaml names).
ENV_PACKAGES = {"torch": {"pytorch", "torch"}, "diffusers": {"diffusers"}, "transformers": {"transformers"},
                "accelerate": {"accelerate"}, "faiss": {"faiss-gpu", "faiss-cpu"}, "cleanfid": {"clean-fid"},
                "sklearn": {"scikit-learn"}, "matplotlib": {"matplotlib", "matplotlib-base"}}


def rule_envs() -> dict[str, tuple[str, str]]:
    """rule -> (its conda environment's name, its rule text), from workflow/rules/*.smk; a `use rule`
    inherits its base's environment."""
    out = {}
    for path in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        text = path.read_text()
        for m in re.finditer(r"^rule (\w+):\n(.*?)(?=^\S|\Z)", text, re.M | re.S):
            env = re.search(r"conda:\s*\n\s*[\"']\.\./envs/([\w.-]+)\.yaml", m.group(2))
            out[m.group(1)] = (env.group(1) if env else None, m.group(2))
        for m in re.finditer(r"^use rule (\w+) as (\w+)", text, re.M):
            out[m.group(2)] = out[m.group(1)]
    return out


def env_packages(name: str) -> set[str]:
    deps = yaml.safe_load((ROOT / "workflow" / "envs" / f"{name}.yaml").read_text())["dependencies"]
    specs = [d for d in deps if isinstance(d, str)] + [p for d in deps if isinstance(d, dict) for p in d.get("pip", [])]
    return {re.split(r"[=<> ]", spec, maxsplit=1)[0] for spec in specs}


def test_tiny_run_rules_environments_hold_what_their_jobs_import(tiny_run):
    """Under `--sdm conda` every job runs in its rule's environment: the heavy modules each job of the
    tiny run loaded (its log says which) must be installable there, and a rule that may be asked for
    GPUs (MEMDISTILL_GPUS) needs torch or faiss-gpu to count them (pipeline.cluster.visible_gpus)."""
    workdir, _, _ = tiny_run
    envs = rule_envs()
    missing = []
    for log in (workdir / "logs").rglob("*.log"):
        rule = log.relative_to(workdir / "logs").parts[0]
        lines = [line for line in log.read_text().splitlines() if "heavy modules loaded:" in line]
        if not lines or rule not in envs:
            continue
        have = env_packages(envs[rule][0])
        for module in {m.strip() for m in lines[-1].split("heavy modules loaded:")[1].split(",")} - {"none"}:
            if not ENV_PACKAGES[module] & have:
                missing.append(f"{rule} ({envs[rule][0]}.yaml) loads {module}")
    assert not missing, sorted(set(missing))
    for rule, (env, text) in envs.items():
        if env and ("on_sampling_gpus(" in text or "MEMDISTILL_GPUS" in text):
            assert env_packages(env) & {"pytorch", "torch", "faiss-gpu"}, rule


@pytest.mark.parametrize("model,sampler,kind", PAIRS)
def test_tiny_run_group_breakdown_adds_up(tiny_run, model, sampler, kind):
    workdir, _, _ = tiny_run
    mem = json.loads((workdir / "results" / "metrics" / model / f"{sampler}.json").read_text())["memorization"]
    groups = mem["by_group"]
    assert set(groups) <= {"repeated", "non_repeated"} and groups
    assert sum(g["n_samples"] for g in groups.values()) == mem["n_samples"]
    memorized = sum(g["n_samples"] * g["mem_ratio"] for g in groups.values())
    assert memorized == pytest.approx(mem["n_samples"] * mem["mem_ratio"])


@pytest.mark.parametrize("model,sampler,kind", PAIRS)
def test_tiny_run_metrics(tiny_run, model, sampler, kind):
    workdir, _, _ = tiny_run
    metrics = json.loads((workdir / "results" / "metrics" / model / f"{sampler}.json").read_text())
    assert metrics["model"] == model and metrics["sampler"] == sampler
    assert metrics["num_samples"] == 24
    mem = metrics["memorization"]["mem_ratio"]
    assert 0.0 <= mem <= 1.0
    assert math.isfinite(metrics["quality"]["value"])
    assert metrics["nfe"] == (7 if kind == "teachers" else 1)


@pytest.mark.parametrize("model,sampler,kind", PAIRS)
def test_tiny_run_shards_and_manifest(tiny_run, model, sampler, kind):
    import pyarrow.parquet as pq

    workdir, _, _ = tiny_run
    manifest = json.loads((workdir / "results" / "samples" / model / sampler / "manifest.json").read_text())
    rows = [10, 10, 4] if kind == "teachers" else [24]  # 1-step: one shard, written with its manifest
    assert manifest["num_samples"] == 24 and manifest["shard_size"] == rows[0]
    assert [s["rows"] for s in manifest["shards"]] == rows
    for k, entry in enumerate(manifest["shards"]):
        path = workdir / entry["path"]
        assert path.name == f"shard-{k:05d}.parquet"
        assert pq.read_metadata(path).num_rows == entry["rows"]


@pytest.mark.parametrize("model,sampler,kind", PAIRS)
def test_tiny_run_galleries(tiny_run, tmp_path, monkeypatch, model, sampler, kind):
    """The gallery shows the most-memorized samples first (smallest d1/d2), captioned with the SSCD
    similarity from the SSCD search of the same job, and is what the rule drew."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.figures import neighbour_figure

    workdir, _, _ = tiny_run
    monkeypatch.chdir(workdir)  # manifests name their shards relative to the working directory
    path = workdir / "results" / "figures" / model / f"{sampler}-neighbours.png"
    with Image.open(path) as im:
        assert im.format == "PNG"
        drawn = np.asarray(im.convert("RGB"))
    nb = pq.read_table(workdir / "results" / "neighbours" / "pixels" / model / f"{sampler}.parquet").to_pydict()
    again = tmp_path / "gallery.png"
    ids = neighbour_figure(workdir / "results" / "samples" / model / sampler / "manifest.json",
                           workdir / "results" / "neighbours" / "pixels" / model / f"{sampler}.parquet",
                           workdir / "results" / "subsets" / "digits-48.parquet", again, count=8,
                           sscd_path=workdir / "results" / "neighbours" / "sscd" / model / f"{sampler}.parquet")
    ratio = dict(zip(nb["sample_id"], nb["ratio"]))
    shown = [ratio[i] for i in ids]
    assert len(ids) == 8 and shown == sorted(shown) and shown[0] == min(nb["ratio"])
    assert sorted(ratio.values())[:8] == shown
    with Image.open(again) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), drawn)


def test_tiny_run_curve(tiny_run):
    from PIL import Image

    workdir, _, _ = tiny_run
    with Image.open(workdir / "results" / "figures" / f"{TINY_TABLE}.png") as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 200


@pytest.mark.parametrize("model,sampler,kind", PAIRS)
def test_tiny_run_model_dirs(tiny_run, model, sampler, kind):
    from safetensors import safe_open

    workdir, _, _ = tiny_run
    d = workdir / "results" / kind / model
    for name in ("model.safetensors", "config.json", "stats.json"):
        assert (d / name).is_file() and (d / name).stat().st_size > 0, d / name
    json.loads((d / "config.json").read_text())
    stats = json.loads((d / "stats.json").read_text())
    assert stats
    with safe_open(str(d / "model.safetensors"), framework="numpy") as f:
        assert len(list(f.keys())) > 0


def test_tiny_run_yardsticks_bracket_the_models(tiny_run, monkeypatch):
    """Replayed training images are all memorized (d1 = 0) and held-out real images none; the real
    images never come from the training subset, and the replay only from it."""
    from pipeline.data import read_subset
    from pipeline.shards import read_samples

    workdir, _, _ = tiny_run
    monkeypatch.chdir(workdir)  # manifests name their shards relative to the workflow directory
    metrics = {k: json.loads((workdir / "results" / "metrics" / f"{k}~digits-48" / "data.json").read_text())
               for k in ("real", "replay", "blur", "train")}
    assert metrics["replay"]["memorization"]["mem_ratio"] == 1.0 and metrics["replay"]["nfe"] == 0
    # replayed training images are their own most similar training image in SSCD space too
    assert metrics["replay"]["sscd"]["mem_ratio"] == 1.0
    assert metrics["replay"]["sscd"]["max"] == pytest.approx(1.0, abs=1e-5)
    # yardstick images carry their class: per-class figures in both spaces, and a replayed image's
    # nearest training image (itself) is always of its own class
    for space in ("memorization", "sscd"):
        assert metrics["replay"][space]["nn1_same_class"] == 1.0
        assert sum(v["n_samples"] for v in metrics["real"][space]["by_label"].values()) == metrics["real"]["num_samples"]
    assert metrics["real"]["memorization"]["mem_ratio"] == 0.0
    assert metrics["real"]["quality"]["value"] < metrics["blur"]["quality"]["value"]
    subset = read_subset(workdir / "results" / "subsets" / "digits-48.parquet")
    train = {img.tobytes() for img in subset.images}
    real, _, _ = read_samples(workdir / "results" / "samples" / "real~digits-48" / "data" / "manifest.json")
    replay, _, _ = read_samples(workdir / "results" / "samples" / "replay~digits-48" / "data" / "manifest.json")
    assert len(real) == len(replay) == 24
    assert not any(img.tobytes() in train for img in real)
    assert all(img.tobytes() in train for img in replay)
    # train vs train: every unique training image once before any twice, none matched with itself in either space
    import numpy as np
    import pyarrow.parquet as pq

    own, table, _ = read_samples(workdir / "results" / "samples" / "train~digits-48" / "data" / "manifest.json")
    rows = table.column("own_train_index").to_numpy()
    assert sorted(rows[:len(subset)].tolist()) == list(range(len(subset))) and np.array_equal(own, subset.images[rows])
    for space in ("pixels", "sscd"):
        nn = pq.read_table(workdir / "results" / "neighbours" / space / "train~digits-48" / "data.parquet")
        assert (nn.column("nn1_index").to_numpy() != rows).all(), space
    assert metrics["train"]["memorization"]["mem_ratio"] < 0.5
    assert metrics["train"]["sscd"]["max"] < 1.0 - 1e-6


def test_tiny_run_snapshot_is_a_model_of_its_own(tiny_run):
    """The student's step-10 snapshot went through export, sampling, search and metrics like any model."""
    from safetensors.torch import load_file

    workdir, _, _ = tiny_run
    run = workdir / "results" / "students" / "cd-48" / "snapshots"
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["step-10"]
    exported = workdir / "results" / "snapshots" / "cd-48" / "step-10"
    assert json.loads((exported / "config.json").read_text())["step"] == 10
    snap = load_file(str(exported / "model.safetensors"))
    final = load_file(str(workdir / "results" / "students" / "cd-48" / "model.safetensors"))
    assert snap.keys() == final.keys() and any(not (snap[k] == final[k]).all() for k in snap)
    metrics = json.loads((workdir / "results" / "metrics" / SNAPSHOT[0] / f"{SNAPSHOT[1]}.json").read_text())
    assert metrics["model"] == SNAPSHOT[0] and metrics["training"]["step"] == 10 and metrics["num_samples"] == 24
    assert (workdir / "logs" / "snapshot" / "cd-48" / "step-10.log").is_file()


def sample_job_files(base: Path, model: str, sampler: str, ext: str) -> list[Path]:
    """The log or benchmark files of a sample set's jobs: three sample_shard jobs and the manifest's
    for the teacher's heun-4, one sample_set job for a one-step set."""
    if sampler == "1-step":
        paths = [base / "sample_set" / model / f"{sampler}.{ext}"]
    else:
        paths = [base / "sample_shard" / model / sampler / f"shard-{k:05d}.{ext}" for k in range(3)]
        paths += [base / "sample_manifest" / model / f"{sampler}.{ext}"]
    for path in paths:
        assert path.exists(), path
    return paths


def test_tiny_run_logs(tiny_run):
    workdir, _, _ = tiny_run
    logs = workdir / "logs"
    expected = [
        "subset/digits-48.log",
        "train_teacher/teacher-48.log",
        "distill/cd-48.log",
        "train_feature_net/digits-classifier.log",
        "reference_stats/digits_fd-digits.log",
        f"table/{TINY_TABLE}.log",
        f"curve_figure/{TINY_TABLE}.log",
    ]
    for model, sampler, _ in PAIRS:
        expected += [p.relative_to(logs).as_posix() for p in sample_job_files(logs, model, sampler, "log")]
        expected += [
            f"search/{model}/{sampler}.log",
            f"metrics/{model}/{sampler}.log",
        ]
    expected += ["snapshot/cd-48/step-10.log", f"sample_set/{SNAPSHOT[0]}/{SNAPSHOT[1]}.log"]
    expected += [f"yardstick/{kind}~digits-48.log" for kind in ("real", "replay", "blur", "train")]
    expected += ["embed_subset/sscd/digits-48.log", "theory_analysis/seed-0.log", "theory_analysis/seed-1.log",
                 "theory_report/report.log", "theory_bridge/teacher-48.log", "theory_bridge/teacher-48.r1.log",
                 "edge_lab/gaussian/seed-0.log", "edge_lab/gaussian/seed-1.log", "edge_report/report.log",
                 "claims/plan.log", "claims/claims.log"]
    for model, sampler in [(m, s) for m, s, _ in PAIRS] + [SNAPSHOT] + [(f"{k}~digits-48", "data") for k in ("real", "replay", "blur", "train")]:
        expected += [f"embed_samples/sscd/{model}/{sampler}.log", f"search/{model}/{sampler}.log"]
    missing = [p for p in expected if not (logs / p).is_file()]
    assert not missing, missing
    # every rule that ran (all but the `all` target) wrote a log directory
    assert {p.name for p in logs.iterdir()} == {p.split("/")[0] for p in expected}
    assert "step 40" in (logs / "train_teacher" / "teacher-48.log").read_text()
    assert "=== attempt started" in (logs / "train_teacher" / "teacher-48.log").read_text()
    # beside each training log, its metrics as JSON lines (steps 10..40 and 10..20 at log_every 10)
    for rule, name, steps in (("train_teacher", "teacher-48", 40), ("distill", "cd-48", 20)):
        records = [json.loads(line) for line in (logs / rule / f"{name}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(10, steps + 1, 10))
        assert all(r["images_per_second"] > 0 and r["lr"] > 0 for r in records)


def test_tiny_run_benchmarks(tiny_run):
    workdir, _, _ = tiny_run
    bench = workdir / "results" / "benchmarks"
    paths = [bench / "train_teacher" / "teacher-48.tsv", bench / "distill" / "cd-48.tsv"]
    for model, sampler, _ in PAIRS:
        paths += sample_job_files(bench, model, sampler, "tsv")
    for path in paths:
        lines = path.read_text().strip().splitlines()
        assert len(lines) == 2 and lines[0].split("\t")[0] == "s", path
        assert float(lines[1].split("\t")[0]) > 0


@pytest.fixture(scope="module")
def tiny_report(tiny_run):
    """`snakemake --report` on the tiny run: one self-contained HTML file."""
    workdir, config, _ = tiny_run
    check(snakemake(workdir, "--report", "report.html", configfile=config, timeout=300))
    return workdir / "report.html"


def report_results(tiny_run) -> list[str]:
    workdir, _, _ = tiny_run
    return ([f"results/tables/{TINY_TABLE}.html", f"results/figures/{TINY_TABLE}.png"]
            + [f"results/figures/{m}/{s}-neighbours.png" for m, s in [(m, s) for m, s, _ in PAIRS] + [SNAPSHOT]])


def test_tiny_run_report_holds_tables_curves_and_galleries(tiny_run, tiny_report):
    text = tiny_report.read_text()
    for path in report_results(tiny_run):
        assert path in text, path
    for category in ("Tables", "Figures", "Galleries"):
        assert category in text


def test_tiny_run_report_in_a_browser(tiny_run, tiny_report):
    """Open the report in headless Chromium as a reader would. Tables: the table page renders in the
    report's frame with its model and yardstick rows. Galleries: the teacher's gallery is displayed,
    and the screenshot holds it pixel for pixel. Both screenshots are kept beside the report."""
    import math
    import shutil

    import numpy as np
    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if chromium is None or sync_playwright is None:
        message = "needs chromium (Debian package `chromium`) and the playwright package"
        if os.environ.get("MEMDISTILL_BROWSER_TEST") == "required":
            pytest.fail(message)
        pytest.skip(message)
    workdir, _, _ = tiny_run
    gallery = workdir / "results" / "figures" / PAIRS[0][0] / f"{PAIRS[0][1]}-neighbours.png"
    # Chromium on a closed network: no background connections, no sandbox (CI runs as root)
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=flags)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(tiny_report.as_uri())
        page.get_by_role("link", name="Tables", exact=True).click()
        page.locator("tr", has_text=TINY_TABLE).locator("a").first.click()
        frame = page.frame_locator("iframe")
        frame.locator("table").wait_for()
        body = frame.locator("table").inner_text()
        assert frame.locator("tr").count() == 1 + 3 + 4, body
        for label in ("Teacher", "Student at step 10", "Real held-out", "Training replay", "Train vs train"):
            assert label in body
        page.screenshot(path=str(workdir / "report-table.png"))
        page.goto(tiny_report.as_uri())
        page.get_by_role("link", name="Galleries", exact=True).click()
        page.locator("tr", has_text=PAIRS[0][0]).locator("a").first.click()
        img = page.locator("img[src^='data:image/png']")
        img.wait_for()
        box = img.bounding_box()
        page.screenshot(path=str(workdir / "report-gallery.png"))
        browser.close()
    table_shot = np.asarray(Image.open(workdir / "report-table.png").convert("L"), dtype=np.float64)
    assert table_shot.shape == (1000, 1600) and table_shot.std() > 10  # drawn, not a blank page
    shot = np.asarray(Image.open(workdir / "report-gallery.png").convert("RGB"))
    drawn = np.asarray(Image.open(gallery).convert("RGB"))
    h, w = drawn.shape[:2]
    assert (box["width"], box["height"]) == (w, h)  # shown at its own size
    x0, y0 = math.floor(box["x"]), math.floor(box["y"])
    # the browser snaps the image to whole pixels: it sits at the box's corner, rounded either way
    assert any(np.array_equal(shot[y:y + h, x:x + w], drawn) for y in (y0, y0 + 1) for x in (x0, x0 + 1))


def test_tiny_run_is_up_to_date(tiny_run):
    workdir, config, _ = tiny_run
    for targets in ([], [f"results/tables/{TINY_TABLE}.md"]):
        proc = check(snakemake(workdir, *targets, "-n", configfile=config))
        assert "Nothing to be done" in output_of(proc), output_of(proc)[-3000:]


def test_every_rule_has_log_and_benchmark():
    """Every file-producing rule leaves a log and a benchmark record (the `all` target rule excepted)."""
    rules = {}
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        for block in re.split(r"^(?=rule )", smk.read_text(), flags=re.M)[1:]:
            name = re.match(r"rule (\w+):", block).group(1)
            rules[name] = block
    assert len(rules) >= 18
    for name, block in rules.items():
        assert re.search(r"^\s+log:", block, re.M), f"rule {name} has no log:"
        assert re.search(r"^\s+benchmark:", block, re.M), f"rule {name} has no benchmark:"


def test_tiny_run_audit_rule(tiny_run):
    """The audit as a rule on a finished run: the student's samples against its own subset."""
    workdir, config, _ = tiny_run
    check(snakemake(workdir, "results/audit/pixels/cd-48/1-step.json", "--cores", "1", configfile=config))
    result = json.loads((workdir / "results" / "audit" / "pixels" / "cd-48" / "1-step.json").read_text())
    metrics = json.loads((workdir / "results" / "metrics" / "cd-48" / "1-step.json").read_text())
    assert result["n_samples"] == 24 and result["passed"]
    assert result["mem_ratio"] == metrics["memorization"]["mem_ratio"]  # the same search, the same answer
    assert (workdir / "results" / "audit" / "pixels" / "cd-48" / "1-step.png").stat().st_size > 0
    # in SSCD space the rule uses the configured weights and preprocessing (no fetch planned)
    check(snakemake(workdir, "results/audit/sscd/cd-48/1-step.json", "--cores", "1", configfile=config))
    result = json.loads((workdir / "results" / "audit" / "sscd" / "cd-48" / "1-step.json").read_text())
    assert result["space"] == "sscd" and result["preprocessing"] == "dcr" and result["n_samples"] == 24


def test_sscd_audit_plans_the_fetch_rule(tmp_path):
    proc = check(snakemake(tmp_path, "results/audit/sscd/cd-48/1-step.json", "-n"))
    assert "fetch_sscd" in job_stats(output_of(proc))


def test_imagenet_rules_explain_a_missing_copy_and_prepare_a_present_one(tmp_path):
    """imagenet_source fails naming what to provide; prepare_imagenet64 converts the configured folder."""
    from PIL import Image

    cfg = embedded()
    cfg["datasets"]["imagenet64"] = {"source": "imagenet64", "train_dir": "raw/train", "prepared": "prep/in64",
                                     "resolution": 16}
    config = write_config(tmp_path / "c.yaml", cfg)
    proc = snakemake(tmp_path, "prep/in64/manifest.json", "--cores", "1", configfile=config)
    assert proc.returncode != 0
    log = (tmp_path / "logs" / "fetch" / "imagenet_source" / "raw" / "train.log").read_text()
    assert "ImageNet source not found: raw/train" in log and "prepare_imagenet64" in log
    for k, wnid in enumerate(["n0002", "n0001"]):
        (tmp_path / "raw" / "train" / wnid).mkdir(parents=True)
        Image.new("RGB", (40 + k, 30), (10 * k, 0, 0)).save(tmp_path / "raw" / "train" / wnid / "a.JPEG")
    check(snakemake(tmp_path, "prep/in64/manifest.json", "--cores", "1", configfile=config))
    manifest = json.loads((tmp_path / "prep" / "in64" / "manifest.json").read_text())
    assert manifest["images"] == 2 and manifest["classes"] == 2 and manifest["resolution"] == 16


# ------------------------------------------------------------------ Table 3 in miniature, for real

MINIATURE = ROOT / "config" / "embedded-text2image.yaml"


def test_text2image_miniature_layers_on_the_embedded_default(tmp_path):
    proc = check(snakemake(tmp_path, "-n", "--configfile", str(EMBEDDED), str(MINIATURE)))
    stats = job_stats(output_of(proc))
    assert (stats["build_backbone"], stats["finetune_teacher"], stats["distill_lcm"], stats["cache_latents"]) == (1, 3, 3, 3)
    assert stats["table"] == 3 and stats["train_teacher"] == 2  # the demo tables are unchanged
    assert "fetch_sd15" not in stats and "fetch_clip" not in stats and "fetch_sscd" not in stats  # no download


def test_text2image_miniature_runs_end_to_end(tmp_path):
    """The miniature branch, shortened (one extra ratio, a few steps), run for real: backbone built, VAE
    trained, teacher fine-tuned, LCM student distilled, both sampled, Table 3's columns filled."""
    cfg = copy.deepcopy(embedded())
    mini = yaml.safe_load(MINIATURE.read_text())
    for key, value in mini.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    for name in ("4x", "5x"):
        del cfg["subsets"][f"digits-memorize-{name}"], cfg["teachers"][f"mini-sd-{name}"]
        del cfg["students"][f"lcm-mini-{name}"]
    cfg["subsets"]["digits-memorize-3x"].update(n=6, repeats=3)
    cfg["backbones"]["mini-sd"]["vae_train"].update(steps=20, log_every=10)
    cfg["teachers"]["mini-sd-3x"]["train"].update(steps=20, batch_size=16, log_every=10, checkpoint_every=10)
    cfg["students"]["lcm-mini-3x"]["train"].update(steps=10, batch_size=16, log_every=5, checkpoint_every=5)
    cfg["samplers"]["pndm-50"]["steps"] = 5
    cfg["sampling"].update(num_samples=24, shard_size=24, batch_size=24)
    cfg["quality"]["classifier_epochs"] = 2
    cfg["tables"] = {"t3": {"title": "t3", "rows": [r for r in mini["tables"]["table3-miniature"]["rows"]
                                                     if r["setting"] == "3 extra"]}}
    config = write_config(tmp_path / "mini.yaml", cfg)
    proc = snakemake(tmp_path, "results/tables/t3.md", "--cores", "2", "--show-failed-logs", configfile=config,
                     timeout=900)
    check(proc)
    md = (tmp_path / "results/tables/t3.md").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| Setting"))
    assert "Prompt digit" in head and "Digit-feature own pair mean / max / p95" in head and "SSCD" not in head
    rows = [line for line in md.splitlines() if line.startswith("| 3 extra") or line.startswith("| digits-memorize")]
    assert len(rows) == 2 + 4  # teacher, student, four yardsticks
    metrics = json.loads((tmp_path / "results/metrics/lcm-mini-3x/lcm-4.json").read_text())
    own = metrics["sscd"]["text"]["memorized_prompts"]["own_image"]
    assert metrics["nfe"] == 4 and own["n_samples"] == 24 and 0 < own["mean"] <= own["max"] <= 1 + 1e-6
    assert 0 <= metrics["prompt_class"]["value"] <= 1 and metrics["sscd"]["descriptor"] == "digits"
    replay = json.loads((tmp_path / "results/metrics/replay~digits-memorize-3x/data.json").read_text())
    assert replay["sscd"]["text"]["memorized_prompts"]["own_image"]["max"] == pytest.approx(1.0, abs=1e-5)
    # The copy threshold is the real held-out digits' 99th percentile (of 24: their maximum), the same for
    # every row of the subset, so the real yardstick itself scores 0% and the table says so.
    real = json.loads((tmp_path / "results/metrics/real~digits-memorize-3x/data.json").read_text())
    assert metrics["sscd"]["calibration"] == {"yardstick": "real~digits-memorize-3x", "quantile": 0.99, "n_samples": 24}
    assert real["sscd"]["threshold"] == metrics["sscd"]["threshold"] == replay["sscd"]["threshold"] == real["sscd"]["max"]
    assert real["sscd"]["mem_ratio"] == 0.0 and replay["sscd"]["mem_ratio"] > 0.5
    assert "calibrated on the real held-out images of the same training subset, the 99th percentile" in md
    teacher = json.loads((tmp_path / "results/teachers/mini-sd-3x/config.json").read_text())
    assert teacher["kind"] == "latent-diffusion" and teacher["backbone"] == "results/backbones/mini-sd"


# ------------------------------------------------------------------ Table 5 in miniature, for real

BASELINES = ROOT / "config" / "embedded-baselines.yaml"


def test_baselines_miniature_plans_selection_pd_dmd_and_refine(tmp_path):
    """Table 5's miniature layers on the embedded default: two teachers chosen by memorization rate from
    teacher-48's snapshots, PD, DMD and CD students of them, refine samples that read the teacher."""
    proc = check(snakemake(tmp_path, "results/tables/table5-miniature.md", "results/figures/refine-sweep.png",
                           "results/subsets/digits-48-disjoint.parquet", "-n", "-p", "--configfile", str(EMBEDDED),
                           str(BASELINES)))
    out = output_of(proc)
    # the pairing yardstick's subset is drawn without digits-48's images, read from its file
    assert re.search(r'"disjoint_from": \["digits-48"\].*--disjoint-from results/subsets/digits-48.parquet '
                     r'--out results/subsets/digits-48-disjoint.parquet', out)
    stats = job_stats(out)
    assert (stats["select_teacher"], stats["distill"], stats["snapshot"], stats["curve_figure"]) == (2, 5, 8, 1)
    assert "--method pd" in out and "--method dmd" in out
    assert '"regression": {"metric": "pseudo_huber", "pairs": 1024, "steps": 18, "weight": 0.25}' in out
    assert ("--teacher results/selected/teacher-mem10 --manifest results/samples/pd-mem10/refine-pd-10/manifest.json "
            "--out results/samples/pd-mem10/refine-pd-10/shard-00000.parquet") in out
    assert re.search(r"select-teacher --candidates teacher-48@150 teacher-48@300 teacher-48@350 teacher-48@400 "
                     r"teacher-48@450 teacher-48@500 teacher-48@550 teacher-48@600 teacher-48 ", out)


def test_pairing_dimension_sweep_plans_teachers_and_dmd_students_at_three_resolutions(tmp_path):
    """config/embedded-pairing.yaml: the same 48 digits at 8, 16 and 32 px, a teacher and a DMD student at
    each (and the embedded CD student), three replicates, one pairing job per row and replicate."""
    proc = check(snakemake(tmp_path, "results/pairing/pairing.md", "-n", "-p", "--configfile", str(EMBEDDED),
                           str(ROOT / "config" / "embedded-pairing.yaml")))
    out = output_of(proc)
    stats = job_stats(out)
    assert (stats["train_teacher"], stats["distill"], stats["pairing"], stats["pairing_report"]) == (9, 12, 12, 1)
    for teacher in ("teacher-48", "teacher-48-16px.r1", "teacher-48-32px.r2"):
        assert f"--teacher results/samples/{teacher}/heun-18/manifest.json" in out
    assert '"resolution": 32' in out


def test_full_edge_lab_plans_two_cases_of_three_seeds(tmp_path):
    """config/embedded-edge.yaml, the lab README reports: both cases, three seeds each, one report."""
    out = output_of(check(snakemake(tmp_path, "results/edge/crossover.md", "-n", "--configfile", str(EMBEDDED),
                                    str(ROOT / "config" / "embedded-edge.yaml"))))
    stats = job_stats(out)
    assert (stats["edge_lab"], stats["edge_report"]) == (6, 1)
    assert "results/edge/lab/digit-templates/seed-2.npz" in out


def test_baselines_miniature_runs_end_to_end(tmp_path):
    """The miniature, shortened (few steps, 64 samples), run for real: the selections pick models of
    teacher-48's run, PD runs its stages, DMD trains, refine samples at every level, Table 5 and the
    sweep figure are written."""
    cfg = copy.deepcopy(embedded())
    mini = yaml.safe_load(BASELINES.read_text())
    for key, value in mini.items():
        if key == "teachers":
            cfg["teachers"]["teacher-48"].update(value["teacher-48"])
            cfg["teachers"]["teacher-48-disjoint"] = value["teacher-48-disjoint"]
        else:
            cfg[key] = {**cfg.get(key, {}), **value}
    cfg["teachers"]["teacher-48"]["train"].update(steps=90)
    cfg["teachers"]["teacher-48"]["snapshots"] = [30, 60]
    cfg["teacher_selections"] = {"teacher-mem10": {**mini["teacher_selections"]["teacher-mem10"], "memorization": 0.0},
                                 "teacher-mem30": {**mini["teacher_selections"]["teacher-mem30"], "memorization": 0.0}}
    cfg["students"]["pd-mem10"]["pd"] = {"start_scales": 2, "stage_steps": 2}
    for name in ("dmd-mem30", "dmd-mem30-noreg"):
        cfg["students"][name]["train"] = dict(cfg["students"][name]["train"], steps=3, log_every=1, checkpoint_every=0)
    cfg["students"]["dmd-mem30"]["dmd"]["regression"].update(pairs=16, steps=3)
    for name in ("cd-mem10", "cd-mem30"):
        cfg["students"][name]["train"].update(steps=3)
    for name in [s for s in cfg["samplers"] if s.startswith("refine-")]:
        cfg["samplers"][name]["steps"] = 3
    cfg["sampling"].update(num_samples=64, shard_size=64, batch_size=64)
    cfg["quality"]["classifier_epochs"] = 2
    cfg["tables"] = {k: mini["tables"][k] for k in ("table5-miniature", "refine-sweep")}
    cfg["pairing"]["rows"] = [row for row in mini["pairing"]["rows"] if row["model"] in ("cd-mem10", "pd-mem10", "dmd-mem30")]
    config = write_config(tmp_path / "mini.yaml", cfg)
    proc = snakemake(tmp_path, "results/tables/table5-miniature.md", "results/figures/refine-sweep.png",
                     "results/pairing/pairing.md", "--cores", "2", "--show-failed-logs", configfile=config, timeout=900)
    check(proc)
    md = (tmp_path / "results/tables/table5-miniature.md").read_text()
    assert all(f"| {label} |" in md for label in ("PD", "PD+refine", "DMD", "DMD+refine", "DMD, no regression", "CD"))
    assert "| Teacher: 0% teacher (0.00%: teacher-48@30) |" in md  # the target beside the rate reached
    chosen = json.loads((tmp_path / "results/selected/teacher-mem10/stats.json").read_text())["selection"]
    assert chosen["model"] == "teacher-48@30" and [c["model"] for c in chosen["candidates"]] == [
        "teacher-48@30", "teacher-48@60", "teacher-48"]
    pd = json.loads((tmp_path / "results/students/pd-mem10/stats.json").read_text())
    assert [s["student_steps"] for s in pd["stages"]] == [2, 1]
    refined = json.loads((tmp_path / "results/metrics/pd-mem10/refine-pd-80.json").read_text())
    assert refined["nfe"] == 1 + 5
    with open(tmp_path / "results/tables/refine-sweep.csv") as f:
        sigmas = sorted(float(r["refine_sigma"]) for r in csv.DictReader(f) if r["refine_sigma"])
    assert sigmas == [0.5, 0.5, 2.0, 2.0, 10.0, 10.0, 80.0, 80.0]
    assert (tmp_path / "results/figures/refine-sweep.png").stat().st_size > 10_000
    # the pairing branch: each student's 64 samples against its own teacher's heun-18 set from the same noise
    pairing = json.loads((tmp_path / "results/pairing/teacher-mem30/dmd-mem30/dmd-1.json").read_text())
    assert pairing["n_pairs"] == 64 and pairing["dimension"] == 64 and 0 < pairing["pairing_ratio"] < 2
    assert pairing["within_class"] is False and pairing["n_matching"] == 64  # unconditional sets carry label -1
    md = (tmp_path / "results/pairing/pairing.md").read_text()
    assert all(f"| {row['label']} | {row['model']} (x1) |" in md for row in cfg["pairing"]["rows"])
