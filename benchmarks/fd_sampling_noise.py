"""How much of a model's Frechet distance is sampling noise: the spread of its quality over independent
sample sets of one trained model, at the sample count the pipeline uses and at multiples of it.

Usage (after a pipeline run, in its directory; the sampler JSON is the `--sampler` of the model's
sample_set job, e.g. from `snakemake -n --printshellcmds`):
  python benchmarks/fd_sampling_noise.py --model results/teachers/teacher-160 --sampler '{"kind": "heun", "steps": 18}' \
      --feature-net results/quality/feature_net --reference results/quality/reference_stats.npz \
      --num-samples 512 --sets 6 --out fd-noise.json

Set k draws sample i from the seed (1000 + k, i), a stream no pipeline run uses (run seeds are the
configured seed and replicate seeds), so the sets are independent of each other and of the run's own
samples. With `--sets S`, the S sets of n give S values at n; the same images joined in pairs give S/2
values at 2n, in fours S/4 values at 4n: the table reports the mean and sample sd at each size, which
is the noise a paired student-teacher difference carries from sampling alone (its variance is the sum
of both models' variances). Training noise is what replicates add on top.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SEED_BASE = 1000


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model directory (results/teachers/<t> or results/students/<s>)")
    p.add_argument("--sampler", required=True, help="the sampler spec as JSON, as the sample_set rule passes it")
    p.add_argument("--feature-net", required=True)
    p.add_argument("--reference", required=True, help="the reference statistics (.npz) the metrics jobs use")
    p.add_argument("--kind", default="digits_fd")
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--sets", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    import torch

    from pipeline.modelio import load_model
    from pipeline.quality import compute_quality
    from pipeline.sample import generate, sample_seed

    torch.set_num_threads(1)
    model, meta = load_model(a.model, "cpu")
    sampler = json.loads(a.sampler)
    sets, seconds = [], []
    for k in range(a.sets):
        t0 = time.perf_counter()
        seeds = [sample_seed(SEED_BASE + k, i) for i in range(a.num_samples)]
        sets.append(np.concatenate([generate(model, meta, sampler, seeds[lo:lo + a.batch_size])
                                    for lo in range(0, len(seeds), a.batch_size)]))
        seconds.append(time.perf_counter() - t0)
    rows = []
    size = 1
    while size <= a.sets // 2 or size == 1:
        groups = [np.concatenate(sets[g:g + size]) for g in range(0, a.sets - size + 1, size)]
        values = [compute_quality(a.kind, a.feature_net, images, a.reference)["value"] for images in groups]
        rows.append({"num_samples": size * a.num_samples, "values": values, "mean": statistics.fmean(values),
                     "sd": statistics.stdev(values) if len(values) > 1 else float("nan")})
        size *= 2
    result = {"model": a.model, "sampler": sampler, "sets": a.sets, "seconds_per_set": statistics.fmean(seconds),
              "by_size": rows}
    print(f"{a.model} ({sampler}): {a.sets} independent sets of {a.num_samples}, "
          f"{statistics.fmean(seconds):.1f} s each to generate")
    print("| samples | sets | mean | sd | values |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['num_samples']} | {len(r['values'])} | {r['mean']:.2f} | {r['sd']:.2f} | "
              f"{', '.join(f'{v:.1f}' for v in r['values'])} |")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
