"""Teachers chosen by how much they memorize (the study's App. A: "we construct teachers with 10% and
30% memorization rates").

A selection names a teacher's training run, a sampler and a rate X: the chosen teacher is the first
model along the run (its snapshots in step order, then the run's end) whose L2 memorization under
that sampler, measured on its own samples like every table row, reaches X. It becomes a model of its
own, `results/selected/<name>/`, which students distil and tables sample like any teacher.
Reads metric files and copies three files: no torch.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

from .io import atomic_output, write_json
from .modelio import CONFIG, STATS, WEIGHTS


def first_reaching(rates: Sequence[float], threshold: float) -> int:
    """Index of the first rate >= threshold; a clear error listing them all when none does."""
    for i, rate in enumerate(rates):
        if rate >= threshold:
            return i
    listed = ", ".join(f"{100 * r:.2f}%" for r in rates)
    raise ValueError(f"no model of the run memorizes {100 * threshold:.2f}% or more (in step order: {listed}); "
                     "train longer, add later snapshots, or lower the selection's `memorization`")


def select_teacher(candidates: Sequence[str], model_dirs: Sequence[str | Path], metrics: Sequence[str | Path],
                   threshold: float, out_dir: str | Path) -> dict:
    """Copy the first candidate whose metrics reach `threshold` to out_dir; candidates in step order."""
    if not (len(candidates) == len(model_dirs) == len(metrics)) or not candidates:
        raise ValueError("give one model directory and one metrics file per candidate, at least one")
    rates = [float(json.loads(Path(m).read_text())["memorization"]["mem_ratio"]) for m in metrics]
    chosen = first_reaching(rates, threshold)
    src, out_dir = Path(model_dirs[chosen]), Path(out_dir)
    stats = json.loads((src / STATS).read_text())
    for name in (WEIGHTS, CONFIG):
        with atomic_output(out_dir / name) as tmp:
            shutil.copyfile(src / name, tmp)
    selection = {"model": candidates[chosen], "threshold": threshold, "mem_ratio": rates[chosen],
                 "candidates": [{"model": c, "mem_ratio": r} for c, r in zip(candidates, rates)]}
    write_json(out_dir / STATS, dict(stats, selection=selection))
    return selection
