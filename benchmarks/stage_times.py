"""Summarize Snakemake's per-job benchmark files into a Markdown table of stage times.

Usage: python benchmarks/stage_times.py [results/benchmarks]
Run after a pipeline run; the numbers in BENCHMARKS.md were produced this way. For the rules that do
little work (manifest, search, snapshot, table), the median job's seconds are mostly its start-up:
Python, the imports the job pays for, and writing its outputs.
"""
from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path
from statistics import median


def main(root: str = "results/benchmarks") -> None:
    per_rule: dict[str, list[tuple[str, float, float]]] = defaultdict(list)
    for path in sorted(Path(root).rglob("*.tsv")):
        rule = path.relative_to(root).parts[0]
        with open(path) as f:
            row = next(csv.DictReader(f, delimiter="\t"))
        per_rule[rule].append((str(path.relative_to(root).with_suffix("")), float(row["s"]), float(row["max_rss"] or 0)))
    print("| rule | jobs | total s | median job s | max job s | max RSS MB |")
    print("|---|---|---|---|---|---|")
    for rule, jobs in per_rule.items():
        seconds = sorted(j[1] for j in jobs)
        print(f"| {rule} | {len(jobs)} | {sum(seconds):.1f} | {median(seconds):.1f} | {seconds[-1]:.1f} | "
              f"{max(j[2] for j in jobs):.0f} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
