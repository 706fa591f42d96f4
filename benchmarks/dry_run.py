"""The paper grid's dry run, timed beside yardsticks that move with the machine (BENCHMARKS.md, "Dry run").

A dry run's wall time on a shared machine swings 1.3x from hour to hour, so one number cannot say whether the
workflow got slower. Runs alternate, in the same minutes: the grid's dry run (`snakemake -n --configfile ...
--quiet rules`, the command users run), Snakemake starting on a one-rule workflow (its fixed cost), and a
flat DAG of as many trivial jobs as the grid plans (Snakemake's cost per job with nothing of ours in it).
The grid over the flat DAG is the number that moves with the code, not with the hour. The grid is timed once
more under the SLURM profile (`--profile profiles/slurm`, the dry run a cluster user runs), whose default
resources Snakemake evaluates per job.

  python benchmarks/dry_run.py --repeats 5 --out /tmp/dry-run      # the paper grid
  python benchmarks/dry_run.py --configfile config/embedded.yaml --repeats 1

With Slurm's client tools installed but no controller answering, the SLURM executor plugin waits about 9 s
in `scontrol show config` when Snakemake loads it; `--shim-scontrol` puts an `scontrol` that fails at once
first on PATH for these runs only, so the stall (a property of the machine, not of the workflow) is left out.

One more, untimed, run of the grid counts CPython's cyclic collections (young, middle, full) and the seconds
spent in them (`gc.callbacks`), before and after the Snakefile sets its collector threshold.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


DRY_RUN = ["-n", "--quiet", "rules"]  # the plan without the per-job listing, as in BENCHMARKS.md


def run_dry(args: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "snakemake", *DRY_RUN, *args], cwd=cwd, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return seconds, proc.stdout + proc.stderr


# Runs `python -m snakemake` with every collection timed, grouped by the young-generation threshold in force
# (CPython's default while Snakemake imports, the Snakefile's own once it is read); prints the totals and the
# thresholds at start and exit on stderr as the process exits.
GC_PROBE = """
import atexit, gc, json, runpy, sys, time
totals = {}
started = [0.0]
at_start = gc.get_threshold()
def probe(phase, info):
    if phase == "start":
        started[0] = time.perf_counter()
        return
    entry = totals.setdefault(str(gc.get_threshold()[0]), {"collections": [0, 0, 0], "seconds": 0.0})
    entry["seconds"] += time.perf_counter() - started[0]
    entry["collections"][info["generation"]] += 1
gc.callbacks.append(probe)
atexit.register(lambda: print("GC-TOTALS " + json.dumps({"by_threshold": totals, "threshold_at_start": at_start,
                                                         "threshold_at_exit": gc.get_threshold()}),
                              file=sys.stderr))
sys.argv = ["snakemake", *sys.argv[1:]]
runpy.run_module("snakemake", run_name="__main__")
"""


def collector_totals(args: list[str], cwd: Path, env: dict) -> dict:
    """The cyclic collector's work during one dry run, per young-generation threshold in force: collections
    per generation (young, middle, full) and the seconds spent in them; and the thresholds it began and ended with."""
    proc = subprocess.run([sys.executable, "-c", GC_PROBE, *DRY_RUN, *args], cwd=cwd, env=env,
                          capture_output=True, text=True)
    match = re.search(r"^GC-TOTALS (.*)$", proc.stderr, flags=re.M)
    if proc.returncode != 0 or not match:
        raise SystemExit(f"snakemake {' '.join(args)} under the collector probe failed:\n{proc.stderr[-2000:]}")
    return json.loads(match.group(1))


def planned_jobs(output: str) -> int:
    match = re.search(r"^total\s+(\d+)", output, flags=re.M)
    if not match:
        raise SystemExit("the dry run printed no job total")
    return int(match.group(1))


def write_flat(directory: Path, jobs: int) -> Path:
    """A workflow of `jobs` trivial jobs: one wildcard rule and the target rule."""
    snakefile = directory / "Snakefile"
    snakefile.write_text(f'rule all:\n    input: expand("out/{{i}}.txt", i=range({jobs - 1}))\n\n'
                         'rule make:\n    output: "out/{i}.txt"\n    shell: "touch {output}"\n')
    return snakefile


def write_one_rule(directory: Path) -> Path:
    snakefile = directory / "Snakefile"
    snakefile.write_text('rule all:\n    output: "done.txt"\n    shell: "touch {output}"\n')
    return snakefile


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configfile", default="config/config.yaml")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shim-scontrol", action="store_true", help="leave the SLURM plugin's scontrol wait out")
    p.add_argument("--out", default=None, help="folder for dry-run.json (printed either way)")
    a = p.parse_args(argv)
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.shim_scontrol:
            (tmp / "bin").mkdir()
            (tmp / "bin" / "scontrol").write_text("#!/bin/sh\nexit 1\n")
            (tmp / "bin" / "scontrol").chmod(0o755)
            env["PATH"] = f"{tmp / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        # The SLURM profile's partitions and account, for a dry run outside a cluster (it submits nothing).
        for name, value in (("ACCOUNT", "account"), ("PARTITION", "cpu"), ("GPU_PARTITION", "gpu")):
            env.setdefault(f"MEMDISTILL_SLURM_{name}", value)
        for name in ("grid", "slurm", "flat", "one"):
            (tmp / name).mkdir()
        def grid(directory: Path) -> list[str]:
            return ["-s", str(ROOT / "Snakefile"), "--configfile", str(ROOT / a.configfile), "--directory",
                    str(directory)]

        grid_args = grid(tmp / "grid")
        seconds, output = run_dry(grid_args, ROOT, env)  # a first run warms the caches and counts the jobs
        jobs = planned_jobs(output)
        cases = {"grid": grid_args,
                 "grid_slurm_profile": [*grid(tmp / "slurm"), "--profile", str(ROOT / "profiles" / "slurm")],
                 "flat": ["-s", str(write_flat(tmp / "flat", jobs)), "--directory", str(tmp / "flat")],
                 "one_rule": ["-s", str(write_one_rule(tmp / "one")), "--directory", str(tmp / "one")]}
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(a.repeats):
            for name, args in cases.items():
                times[name].append(run_dry(args, ROOT, env)[0])
                workdir = Path(args[args.index("--directory") + 1])
                shutil.rmtree(workdir / ".snakemake", ignore_errors=True)  # each run starts as the first did
        collector = collector_totals(grid_args, ROOT, env)
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "configfile": a.configfile, "jobs": jobs,
              "repeats": a.repeats, "shim_scontrol": a.shim_scontrol, "seconds": times, "median_s": medians,
              "grid_over_flat": medians["grid"] / medians["flat"],
              "grid_ms_per_job_over_start": 1000 * (medians["grid"] - medians["one_rule"]) / jobs,
              "flat_ms_per_job_over_start": 1000 * (medians["flat"] - medians["one_rule"]) / jobs,
              "grid_collector": collector}
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        tmp_file = Path(a.out) / ".dry-run.json.tmp"
        tmp_file.write_text(text)
        tmp_file.replace(Path(a.out) / "dry-run.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
