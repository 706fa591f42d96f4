"""Resumable training state that survives time limits, preemption and a crash half-way through a save.

A cluster job can end at any moment: SLURM sends SIGTERM at its time limit, on `scancel` and on
preemption, then SIGKILL after `KillWait` seconds. So training state goes into numbered checkpoint
directories, each built under a temporary name and renamed into place only once every file is
written and listed with its SHA-256 in `progress.json`; the newest that verifies is resumed, and a
newest one that does not (a node died while the filesystem was flushing it) falls back to the one
before with a warning. `StopSignals` turns SIGTERM/SIGUSR1 into a request the training loop honours
at the next step boundary: save, then exit non-zero so the scheduler's retry resumes.

accelerate's `save_state` writes the model, optimizer and every process's RNG states but knows
nothing of this loop's data order, EMA or consistency target, nor of verifying or falling back, so
those are written here by hand around it.
"""
from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Mapping

import torch

from .io import sha256_file, write_json

log = logging.getLogger(__name__)

PREFIX = "ckpt-"
PROGRESS = "progress.json"


class StopSignals:
    """Record SIGTERM and SIGUSR1 instead of dying, so training can stop cleanly between steps.

    Handlers are installed only from the main thread (Python's rule) and restored on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.received is None:
            log.warning("received %s: saving a checkpoint and stopping after this step", signal.Signals(signum).name)
        self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def requested(self, accelerator) -> int | None:
        """The signal any process received (processes must stop at the same step to save together)."""
        if accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor([self.received or 0], device=accelerator.device)
        got = int(accelerator.reduce(flag, reduction="max").item())
        return got or None


class CheckpointStore:
    """Numbered, verified checkpoint directories under `root`; the newest `keep` are kept."""

    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = max(int(keep), 1)

    def path(self, step: int) -> Path:
        return self.root / f"{PREFIX}{step:09d}"

    def candidates(self) -> list[Path]:
        """Complete checkpoint directories, newest first (partial ones never carry the prefix)."""
        if not self.root.exists():
            return []
        found = [d for d in self.root.glob(f"{PREFIX}*") if d.is_dir() and d.name[len(PREFIX):].isdigit()]
        return sorted(found, key=lambda d: int(d.name[len(PREFIX):]), reverse=True)

    def save(self, accelerator, step: int, extras: Mapping[str, torch.nn.Module], process_state: Mapping[str, Any],
             progress: Mapping[str, Any]) -> Path:
        """Write the state of every process at `step`; collective (every process must call it)."""
        final = self.path(step)
        partial = self.root / f".partial-{final.name}"
        if accelerator.is_main_process:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial / "accelerate"))
        torch.save(dict(process_state), partial / f"rng-{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            torch.save({k: m.state_dict() for k, m in extras.items()}, partial / "extras.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {str(p.relative_to(partial)): sha256_file(p) for p in sorted(partial.rglob("*")) if p.is_file()}
            write_json(partial / PROGRESS, {**progress, "step": step, "processes": accelerator.num_processes,
                                            "files": files})
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            for old in self.candidates()[self.keep:]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def discard(self, accelerator) -> None:
        """Remove every checkpoint (they belong to another configuration of this run): collective."""
        if accelerator.is_main_process:
            for d in self.candidates():
                log.warning("removing %s: it cannot be resumed by this configuration", d)
                shutil.rmtree(d, ignore_errors=True)
        accelerator.wait_for_everyone()

    @staticmethod
    def verify(directory: Path) -> dict:
        """The checkpoint's progress record, if every file it lists is present with its checksum."""
        progress = json.loads((directory / PROGRESS).read_text())
        for name, digest in progress["files"].items():
            path = directory / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing")
            if sha256_file(path) != digest:
                raise ValueError(f"{path} does not match its checksum")
        return progress

    def newest_valid(self, fingerprint: str, max_step: int) -> tuple[Path, dict] | None:
        """The newest checkpoint that verifies and belongs to this run; older ones are the fallback."""
        for d in self.candidates():
            try:
                progress = self.verify(d)
            except Exception as exc:  # a truncated or half-flushed checkpoint of any kind
                log.warning("checkpoint %s is unusable (%s); falling back to the one before", d, exc)
                continue
            if progress.get("fingerprint") != fingerprint:
                log.warning("ignoring checkpoints in %s: they belong to a different configuration", self.root)
                return None
            if progress["step"] > max_step:
                log.warning("ignoring %s: step %d lies past this run's %d steps", d, progress["step"], max_step)
                continue
            return d, progress
        return None

    @staticmethod
    def load(directory: Path, progress: Mapping[str, Any], accelerator,
             extras: Mapping[str, torch.nn.Module]) -> dict:
        """Restore model, optimizer, RNGs and extras from a verified checkpoint; return this process's state."""
        if progress.get("processes", 1) != accelerator.num_processes:
            raise RuntimeError(f"{directory} was written by {progress.get('processes', 1)} processes, now running "
                               f"{accelerator.num_processes}: delete it to restart, or relaunch with the same count")
        accelerator.load_state(str(directory / "accelerate"))
        saved = torch.load(directory / "extras.pt", map_location="cpu", weights_only=True)
        for k, m in extras.items():
            m.load_state_dict(saved[k])
        return torch.load(directory / f"rng-{accelerator.process_index}.pt", weights_only=True)
