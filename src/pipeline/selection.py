"""Teachers chosen by how much they memorize (the study's App. A: "we construct teachers with 10% and
30% memorization rates").

A selection names a teacher's training run, a sampler and a rate X: the chosen teacher is the model
along the run (its snapshots, then the run's end) whose L2 memorization under that sampler, measured
on its own samples like every table row, lies nearest X (by absolute difference; a tie goes to the
earlier model). The study picks that way: its "30%" teacher copies 26.57% (Table 5), under 30%, so
it is not the first model past the rate. It becomes a model of its own, `results/selected/<name>/`,
which students distil and tables sample like any teacher; its stats carry the rate reached beside
the target, and every table row of it prints both. Reads metric files and copies three files: no torch.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

from .io import atomic_output, write_json
from .modelio import CONFIG, STATS, WEIGHTS

# How far the reached rate may lie from the target before the table says so: within a factor of 1.5
# either way (our choice: snapshots fine enough that "a 10% teacher" copies 6.7-15%).
CLOSE_FACTOR = 1.5


def nearest_rate(rates: Sequence[float], target: float) -> int:
    """Index of the rate nearest `target` (absolute difference); the earliest of equally near ones."""
    if not len(rates):
        raise ValueError("no candidate rates to choose from")
    return min(range(len(rates)), key=lambda i: (abs(rates[i] - target), i))


def close_to_target(reached: float, target: float, factor: float = CLOSE_FACTOR) -> bool:
    """Whether the reached rate lies within a factor of `factor` of the target (both ways)."""
    if target <= 0:
        return reached <= 0
    return target / factor <= reached <= target * factor


def select_teacher(candidates: Sequence[str], model_dirs: Sequence[str | Path], metrics: Sequence[str | Path],
                   threshold: float, out_dir: str | Path) -> dict:
    """Copy the candidate whose rate lies nearest `threshold` to out_dir; candidates in step order."""
    if not (len(candidates) == len(model_dirs) == len(metrics)) or not candidates:
        raise ValueError("give one model directory and one metrics file per candidate, at least one")
    rates = [float(json.loads(Path(m).read_text())["memorization"]["mem_ratio"]) for m in metrics]
    chosen = nearest_rate(rates, threshold)
    src, out_dir = Path(model_dirs[chosen]), Path(out_dir)
    stats = json.loads((src / STATS).read_text())
    for name in (WEIGHTS, CONFIG):
        with atomic_output(out_dir / name) as tmp:
            shutil.copyfile(src / name, tmp)
    selection = {"model": candidates[chosen], "threshold": threshold, "mem_ratio": rates[chosen],
                 "within_factor": CLOSE_FACTOR if close_to_target(rates[chosen], threshold) else None,
                 "candidates": [{"model": c, "mem_ratio": r} for c, r in zip(candidates, rates)]}
    write_json(out_dir / STATS, dict(stats, selection=selection))
    return selection
