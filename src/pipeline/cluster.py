"""What a cluster job checks about its node before it computes, and how it reports being stopped.

A rule whose `compute.gpus` is N exports MEMDISTILL_GPUS=N. If CUDA then sees fewer GPUs (a node
without drivers, CUDA_VISIBLE_DEVICES emptied, a GPU request lost in a profile), the job stops at
once instead of quietly running a multi-day training on CPU.
"""
from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

ENV = "MEMDISTILL_GPUS"


class MissingGPUError(RuntimeError):
    """The job was configured for GPUs that CUDA does not see."""


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal after saving its state; the exit is non-zero so a retry resumes."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f"state saved in {checkpoint}" if checkpoint else "no checkpoint directory, state lost"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by that signal


def visible_gpus() -> int:
    """The CUDA devices this process sees: through torch where it is installed, else through faiss (the
    search rules' conda environment has faiss-gpu and no torch, workflow/envs/search.yaml)."""
    try:
        import torch
    except ImportError:
        import faiss

        return int(faiss.get_num_gpus())
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def require_gpus(need: int | None = None) -> int:
    """Raise MissingGPUError unless CUDA sees at least `need` GPUs (default: $MEMDISTILL_GPUS, 0 if unset)."""
    if need is None:
        need = int(os.environ.get(ENV) or 0)
    if need <= 0:
        return 0
    have = visible_gpus()
    if have < need:
        raise MissingGPUError(
            f"this job is configured for {need} GPU(s) (compute.gpus of its config entry) but CUDA sees {have} "
            f"on {_where()}; stopping instead of running on CPU. Check the GPU partition and driver "
            f"(`snakemake --profile profiles/slurm gpu_smoke`), or set compute.gpus: 0 to run it on CPU on purpose.")
    return have


def _where() -> str:
    where = f"node {socket.gethostname()}"
    if os.environ.get("SLURM_JOB_ID"):
        where += f", SLURM job {os.environ['SLURM_JOB_ID']}"
    return f"{where} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r})"


def gpu_smoke(size: int = 4096, repeats: int = 10) -> dict:
    """Every visible GPU's name, and a float32 matmul on the first checked against float64 on the CPU."""
    import torch

    if visible_gpus() < 1:  # its own message: the generic one would send the user back here
        raise MissingGPUError(
            f"gpu_smoke: CUDA sees no GPU on {_where()}; torch {torch.__version__} is "
            f"{'a CUDA ' + torch.version.cuda if torch.version.cuda else 'a CPU-only'} build. Check that the job "
            f"ran in the GPU partition (MEMDISTILL_SLURM_GPU_PARTITION={os.environ.get('MEMDISTILL_SLURM_GPU_PARTITION', '<unset>')!r}; "
            f"`sinfo -o \"%P %G\"` lists each partition's GPUs), that nvidia-smi above in this log lists a device, "
            f"and that torch is a CUDA build.")
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=g) for _ in range(2))
    dev_a, dev_b = a.cuda(), b.cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    dev_a @ dev_b  # the first call loads cuBLAS and picks a kernel: not what a matmul costs
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        c = dev_a @ dev_b
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / repeats
    rows = slice(0, 64)  # a slice is enough to catch a broken device or driver
    exact = a[rows].double() @ b.double()
    err = ((c[rows].double().cpu() - exact).abs().max() / exact.abs().max()).item()
    if not err < 1e-4:
        raise RuntimeError(f"GPU matmul disagrees with the CPU: relative error {err:.2e}")
    return {"devices": devices, "cuda": torch.version.cuda, "torch": torch.__version__, "matmul_size": size,
            "matmul_seconds": seconds, "tflops": 2 * size ** 3 / seconds / 1e12, "relative_error": err,
            "host": socket.gethostname(), "slurm_job": os.environ.get("SLURM_JOB_ID")}
