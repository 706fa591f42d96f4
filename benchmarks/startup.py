"""Start-up cost of the pipeline's small jobs: each rule's command, run as Snakemake runs it (a fresh
`python -m pipeline` process), on tiny real inputs, timed end to end.

Usage: python benchmarks/startup.py [--repeats 5] [--src path/to/checkout/src]

`--src` times another checkout's package (e.g. the commit before an import change) on the same inputs,
which this checkout's package prepares once. Prints one Markdown row per command: median and minimum
wall seconds over the repeats, and the heavy modules the command loaded (from its log line; blank for
a checkout that does not log them). The inputs are tiny, so the seconds are start-up: the interpreter,
the imports the command pays for, and its own small work.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIGITS = json.dumps({"source": "digits", "resolution": 16})
NET = {"block_out_channels": [8, 16], "layers_per_block": 1, "down_block_types": ["DownBlock2D", "DownBlock2D"],
       "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "add_attention": False}


def prepare(work: Path) -> None:
    """Inputs every timed command reads: a subset, a yardstick's shards and manifest, their neighbours,
    a digits classifier with reference statistics, a metrics file, and a training run with a snapshot."""
    import torch

    from pipeline.cli import main
    from pipeline.modelio import build_model, model_meta, save_model

    def run(*args):
        if main([str(a) for a in args]):
            raise RuntimeError(f"preparing {args[0]} failed")

    run("subset", "--dataset", DIGITS, "--spec", json.dumps({"kind": "uniform", "n": 48, "seed": 0}),
        "--out", work / "subset.parquet")
    run("yardstick", "--kind", "real", "--dataset", DIGITS, "--subset", work / "subset.parquet", "--subset-name", "s",
        "--exclude", work / "subset.parquet", "--reserve", 256, "--num-samples", 256, "--shard-size", 256,
        "--out-dir", work / "real")
    run("search", "--subset", work / "subset.parquet", "--manifest", work / "real" / "manifest.json",
        "--out", work / "neighbours.parquet")
    run("feature-net", "--dataset", DIGITS, "--epochs", 1, "--exclude", work / "subset.parquet", "--reserve", 256,
        "--out", work / "classifier")
    run("reference-stats", "--kind", "digits_fd", "--feature-net", work / "classifier", "--dataset", DIGITS,
        "--out", work / "reference.npz")
    run(*metrics_args(work))
    torch.manual_seed(0)
    meta = model_meta("consistency", NET, 16, 1, 0.5, 0.002, 80.0)
    model = build_model(meta)
    save_model(work / "run", model, meta, {"steps": 2})
    save_model(work / "run" / "snapshots" / "step-1", model, dict(meta, step=1), {"step": 1, "steps": 1})


def metrics_args(work: Path) -> list:
    return ["metrics", "--model-id", "real~s", "--sampler-name", "data", "--neighbours", work / "neighbours.parquet",
            "--manifest", work / "real" / "manifest.json", "--quality-kind", "digits_fd",
            "--feature-net", work / "classifier", "--reference-stats", work / "reference.npz",
            "--out", work / "metrics.json"]


def commands(work: Path) -> dict[str, list]:
    rows = json.dumps([{"setting": "s", "label": "Real", "model": "real~s", "sampler": "data", "role": "yardstick"}])
    return {
        "subset": ["subset", "--dataset", DIGITS, "--spec", json.dumps({"kind": "uniform", "n": 48, "seed": 0}),
                   "--out", work / "t-subset.parquet"],
        "yardstick": ["yardstick", "--kind", "blur", "--dataset", DIGITS, "--subset", work / "subset.parquet",
                      "--subset-name", "s", "--exclude", work / "subset.parquet", "--reserve", 256,
                      "--num-samples", 256, "--shard-size", 256, "--out-dir", work / "t-blur"],
        "sample_manifest": ["manifest", "--shards", work / "real" / "shard-00000.parquet", "--shard-size", 256,
                            "--num-samples", 256, "--out", work / "t-manifest.json"],
        "search": ["search", "--subset", work / "subset.parquet", "--manifest", work / "real" / "manifest.json",
                   "--out", work / "t-neighbours.parquet", "--figure", work / "t.png", "--figure-count", 8],
        "snapshot": ["snapshot", "--run-dir", work / "run" / "snapshots", "--step", 1, "--out", work / "t-snapshot"],
        "metrics": metrics_args(work)[:-1] + [work / "t-metrics.json"],
        "table": ["table", "--rows", rows, "--metrics", work / "metrics.json", "--csv", work / "t.csv",
                  "--md", work / "t.md"],
    }


def time_command(args: list, src: Path, cwd: Path) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{args[0]} failed:\n{proc.stderr[-2000:]}")
    loaded = [line.split("heavy modules loaded:")[1].strip() for line in proc.stderr.splitlines()
              if "heavy modules loaded:" in line]
    return seconds, loaded[-1] if loaded else ""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--src", type=Path, default=ROOT / "src", help="the package checkout to time")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work)
        print("| rule | median s | min s | heavy modules loaded |")
        print("|---|---:|---:|---|")
        for rule, args in commands(work).items():
            runs = [time_command(args, a.src.resolve(), work) for _ in range(a.repeats)]
            seconds = [s for s, _ in runs]
            print(f"| {rule} | {statistics.median(seconds):.2f} | {min(seconds):.2f} | {runs[-1][1]} |", flush=True)


if __name__ == "__main__":
    main()
