"""What a job checks about its node: the GPUs its config entry computes on, and the smoke test users
run first on a cluster. Real on both kinds of machine: without CUDA the checks must stop the job at
once; with CUDA the smoke test must run on it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.cluster import MissingGPUError, require_gpus, visible_gpus
from tiny import train_teacher_args

ROOT = Path(__file__).resolve().parents[1]


def test_require_gpus_reads_the_rule_setting(monkeypatch):
    monkeypatch.delenv("MEMDISTILL_GPUS", raising=False)
    assert require_gpus() == 0  # nothing asked: nothing checked
    monkeypatch.setenv("MEMDISTILL_GPUS", "0")
    assert require_gpus() == 0
    monkeypatch.setenv("MEMDISTILL_GPUS", str(visible_gpus() + 1))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with pytest.raises(MissingGPUError, match=r"configured for \d+ GPU\(s\).*CUDA sees \d+.*SLURM job 4242"):
        require_gpus()


def run_pipeline(tmp_path, *args, **env):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, cwd=tmp_path)


def test_a_training_configured_for_more_gpus_than_cuda_sees_stops_before_it_starts(tmp_path):
    """Not a silent CPU run: exit 2, a message naming the count and the fix, nothing written."""
    need = visible_gpus() + 1
    proc = run_pipeline(tmp_path, *train_teacher_args(tmp_path, {"train": {"steps": 2, "batch_size": 4, "lr": 1e-3}}),
                        MEMDISTILL_GPUS=str(need))
    assert proc.returncode == 2, proc.stderr
    assert f"configured for {need} GPU(s)" in proc.stderr and "compute.gpus" in proc.stderr
    assert not (tmp_path / "teacher").exists()


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="a machine with 2 GPUs runs this launch for real")
def test_a_multi_gpu_launch_without_the_gpus_fails_instead_of_running_one_cpu_process(tmp_path):
    """What the issue saw: `accelerate launch --multi_gpu --num_processes 2` on a node without GPUs
    ran as a single CPU process. With the rule's MEMDISTILL_GPUS it fails."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--multi_gpu", "--num_processes", "2", "-m", "pipeline",
           *train_teacher_args(tmp_path, {"train": {"steps": 2, "batch_size": 4, "lr": 1e-3}})]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MEMDISTILL_GPUS": "2"})
    assert proc.returncode != 0
    assert "configured for 2 GPU(s)" in proc.stdout + proc.stderr
    assert not (tmp_path / "teacher" / "model.safetensors").exists()



def test_gpus_are_counted_without_torch():
    """The search rules' environment has faiss-gpu and no torch: a search job asked for a GPU counts the
    devices through faiss instead of failing to import torch."""
    code = ("import sys; sys.modules['torch'] = None; from pipeline.cluster import visible_gpus; "
            "print(visible_gpus(), 'faiss' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    import faiss

    assert out.stdout.split() == [str(faiss.get_num_gpus()), "True"]

@pytest.mark.workflow
def test_gpu_smoke_rule(tmp_path):
    """The cluster's first target: with CUDA it records the devices and a checked matmul; without it
    the job fails at once, saying why, in its log."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run([sys.executable, "-m", "snakemake", "gpu_smoke", "--cores", "1", "-s", str(ROOT / "Snakefile"),
                           "--directory", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    log = (tmp_path / "logs" / "gpu_smoke.log").read_text()
    if torch.cuda.is_available():
        assert proc.returncode == 0, log
        smoke = json.loads((tmp_path / "results" / "cluster" / "gpu-smoke.json").read_text())
        assert smoke["devices"] and smoke["relative_error"] < 1e-4 and smoke["tflops"] > 0
    else:
        assert proc.returncode != 0
        assert "gpu_smoke: CUDA sees no GPU on node" in log and " build. Check" in log and "sinfo" in log
        assert "set compute.gpus: 0" not in log  # the generic advice does not apply to the smoke test
        assert not (tmp_path / "results" / "cluster" / "gpu-smoke.json").exists()
