"""The one-node SLURM cluster of profiles/slurm/one-node-cluster.sh: a real slurmctld and slurmd on
this machine, scheduling CPU jobs and count-only GPU jobs. The script installs Debian's packages
when they are missing, so it needs root (or sudo); without either the test is skipped, unless
MEMDISTILL_SLURM_TEST=required says the machine must run it."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "slurm"
SCRIPT = PROFILE / "one-node-cluster.sh"


@pytest.fixture(scope="module")
def cluster():
    privileged = os.geteuid() == 0 or shutil.which("sudo") is not None
    if not privileged or shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        message = "the one-node SLURM cluster needs root or sudo, and Debian's packages"
        if os.environ.get("MEMDISTILL_SLURM_TEST") == "required":
            pytest.fail(message)
        pytest.skip(message)
    start = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    assert start.returncode == 0, start.stdout + start.stderr
    # started twice: still one cluster, still up
    again = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    # Left running: with SLURM's client tools installed and no controller answering, every snakemake
    # command waits about 10 s (the SLURM executor plugin asks `scontrol show config` when it loads).
    return start.stdout


def sbatch(tmp_path: Path, *args: str) -> str:
    out = tmp_path / "job.out"
    proc = subprocess.run(["sbatch", "--wait", "-o", str(out), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out.read_text()


def test_cluster_is_up_with_a_cpu_and_a_gpu_partition(cluster):
    sinfo = subprocess.run(["sinfo", "-h", "-o", "%P %t %G"], capture_output=True, text=True, check=True).stdout
    partitions = {line.split()[0].rstrip("*"): line.split()[1:] for line in sinfo.splitlines()}
    assert set(partitions) == {"cpu", "gpu"}
    assert all(state in ("idle", "mix", "alloc") for state, _ in partitions.values()), sinfo
    assert all(gres.startswith("gpu:1") for _, gres in partitions.values()), sinfo


def test_cluster_runs_a_cpu_job(cluster, tmp_path):
    assert sbatch(tmp_path, "-p", "cpu", "--wrap", "echo ran on $SLURM_JOB_PARTITION").strip() == "ran on cpu"


def test_cluster_schedules_a_gpu_request(cluster, tmp_path):
    """`--gpus=1`, what the executor plugin submits for a rule's `gpu` resource, is granted."""
    out = sbatch(tmp_path, "-p", "gpu", "--gpus=1", "--wrap", "echo gpus=$SLURM_GPUS job_gpus=$SLURM_JOB_GPUS")
    assert out.strip() == "gpus=1 job_gpus=0"


def test_cluster_refuses_more_memory_than_the_node_has(cluster, tmp_path):
    proc = subprocess.run(["sbatch", "--mem=999999", "--wrap", "true", "-o", str(tmp_path / "x.out")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "memory" in proc.stderr.lower(), proc.stderr


# --------------------------------------------------------------------------- the profile, end to end

def slurm_config(workdir: Path) -> Path:
    """The tiny study of test_workflow, cut to what a table of its teacher needs, with a teacher long
    enough (400 steps, a checkpoint every 50) to be stopped twice mid-way."""
    from test_workflow import tiny_config, write_config

    cfg = tiny_config()
    cfg["replicates"] = 1  # one training job to stop and resume
    del cfg["memorization"]["sscd"]
    cfg["yardsticks"] = {"kinds": ["real"]}
    cfg["sampling"].update(num_samples=24, shard_size=24)
    cfg["teachers"]["teacher-48"]["train"].update(steps=400, checkpoint_every=50, log_every=50)
    cfg["tables"]["tiny"]["rows"] = cfg["tables"]["tiny"]["rows"][:1]
    return write_config(workdir / "tiny.yaml", cfg)


def derived_profile(workdir: Path) -> Path:
    """profiles/slurm as shipped (its `squeue` status command works on this cluster without
    accounting), plus quick status checks, the sbatch calls in the log, and the fake GPU requested by
    the training and sampling rules (their config computes on CPU, so they run there)."""
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert profile["slurm-status-command"] == "squeue"
    profile.update({"slurm-init-seconds-before-status-checks": 1, "latency-wait": 5, "verbose": True})
    for rule in ("train_teacher", "sample_set"):  # the config computes on CPU: the profile sends them to the GPU
        profile["set-resources"].setdefault(rule, {}).update(gpu=1, slurm_partition="'gpu'")
    (workdir / "profile").mkdir()
    (workdir / "profile" / "config.yaml").write_text(yaml.safe_dump(profile))
    return workdir / "profile"


def teacher_job(exclude=()) -> str | None:
    lines = subprocess.run(["squeue", "-h", "-o", "%i %k"], capture_output=True, text=True).stdout.split("\n")
    jobs = [line.split()[0] for line in lines if "rule_train_teacher" in line]
    return next((j for j in jobs if j not in exclude), None)


def checkpoint_steps(workdir: Path) -> list[int]:
    root = workdir / "checkpoints" / "teachers" / "teacher-48"
    return sorted(int(d.name[5:]) for d in root.glob("ckpt-*")) if root.exists() else []


def wait_for(predicate, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        assert proc.poll() is None, "snakemake ended early"
        time.sleep(0.5)
    raise AssertionError("timed out")


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    """`snakemake --profile` (profiles/slurm, derived) on the one-node cluster builds a table; its
    teacher is stopped twice: once by SLURM's warning signal (what `--signal=TERM@600` sends before
    the time limit), once cancelled outright (`scancel`, as a user or preemption would)."""
    workdir = tmp_path_factory.mktemp("slurm-run")
    config, profile = slurm_config(workdir), derived_profile(workdir)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", MEMDISTILL_SLURM_ACCOUNT="",
               MEMDISTILL_SLURM_PARTITION="cpu", MEMDISTILL_SLURM_GPU_PARTITION="gpu")
    log = open(workdir / "snakemake.log", "w")
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--profile", str(profile), "-s", str(ROOT / "Snakefile"),
                             "--configfile", str(config), "--", "results/tables/tiny.md"],
                            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    stops = []
    try:
        first = wait_for(teacher_job, proc)
        wait_for(lambda: any(s >= 100 for s in checkpoint_steps(workdir)), proc)
        # the log the README names is there while the job runs, and follows it
        live_log = workdir / "logs" / "train_teacher" / "teacher-48.log"
        live = live_log.is_symlink() and "=== attempt started" in live_log.read_text()
        subprocess.run(["scancel", "--signal=TERM", first], check=True)
        stops.append(first)
        second = wait_for(lambda: teacher_job(exclude={first}), proc)
        wait_for(lambda: any(s >= 250 for s in checkpoint_steps(workdir)), proc)
        subprocess.run(["scancel", second], check=True)
        stops.append(second)
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", "--user", str(os.getuid())], capture_output=True)
    print(f"\nSLURM end-to-end run: {time.monotonic() - start:.1f} s")
    text = (workdir / "snakemake.log").read_text()
    assert rc == 0, text[-8000:]
    return workdir, config, text, stops, live


def sbatch_calls(text: str, rule: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("sbatch call:") and f"--comment rule_{rule}_" in line]


def test_slurm_run_builds_the_table(slurm_run):
    workdir, *_ = slurm_run
    rows = [r for r in (workdir / "results" / "tables" / "tiny.md").read_text().splitlines() if r.startswith("| 16")]
    assert [r.split("|")[2].strip() for r in rows] == ["Teacher"]


def test_slurm_run_sbatch_arguments(slurm_run):
    """A CPU rule goes to the CPU partition without GPUs; a training rule to the GPU partition with the
    plugin's --gpus, the warning signal, and on every retry more time and memory."""
    _, _, text, *_ = slurm_run
    (subset,) = sbatch_calls(text, "subset")
    assert " -p cpu " in subset and " -t 60 " in subset and "--cpus-per-task=1" in subset
    assert "--gpus" not in subset and "--signal" not in subset
    teacher = sbatch_calls(text, "train_teacher")
    assert len(teacher) == 3
    for attempt, call in enumerate(teacher, 1):
        assert " -p gpu " in call and "--gpus=1" in call and "--signal=TERM@600" in call, call
        assert f" -t {60 * attempt} " in call and f" --mem {int(8000 * (1 + (attempt - 1) / 2))} " in call, call


def test_slurm_run_training_resumes_after_each_stop_and_matches_an_uninterrupted_run(slurm_run, tmp_path):
    from safetensors.torch import load_file

    workdir, config, _, stops, live = slurm_run
    assert live, "logs/train_teacher/teacher-48.log was not a live link to the running attempt's log"
    log = (workdir / "logs" / "train_teacher" / "teacher-48.log").read_text()
    # the rule log keeps every attempt: one banner per SLURM job, the stops, the resumptions
    banners = re.findall(r"=== attempt started \S+ on \S+, SLURM job (\d+)", log)
    assert banners[:2] == stops and len(banners) == 3
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert len(resumed) == 2 and 100 <= resumed[0] < 250 <= resumed[1] < 400, log[-3000:]
    assert "stopped by SIGTERM after step" in log
    stats = json.loads((workdir / "results" / "teachers" / "teacher-48" / "stats.json").read_text())
    assert [a["from_step"] for a in stats["attempts"]] == [0, *resumed]
    assert stats["seconds"] == pytest.approx(sum(a["seconds"] for a in stats["attempts"]), rel=0.2)
    assert not (workdir / "checkpoints" / "teachers" / "teacher-48" / "logs").exists()
    # the same training straight through, in one process with the rule's arguments
    cfg = yaml.safe_load(config.read_text())
    teacher = cfg["teachers"]["teacher-48"]
    spec = {k: v for k, v in teacher.items() if k in ("edm", "train", "snapshots")}
    subprocess.run([sys.executable, "-m", "pipeline", "train-teacher", "--subset",
                    str(workdir / "results" / "subsets" / "digits-48.parquet"), "--net",
                    json.dumps(cfg["nets"][teacher["net"]]), "--spec", json.dumps(spec), "--out", str(tmp_path / "t")],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    straight = load_file(str(tmp_path / "t" / "model.safetensors"))
    interrupted = load_file(str(workdir / "results" / "teachers" / "teacher-48" / "model.safetensors"))
    assert straight.keys() == interrupted.keys()
    for name in straight:
        assert torch.equal(straight[name], interrupted[name]), name
