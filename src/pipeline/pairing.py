"""Does a distilled student copy its teacher's pairing of noise to data?

The neighbouring study ../shared/reference/004_... reports that DMD students in high dimension map each
noise vector to (nearly) the image the teacher's probability-flow ODE maps it to, although distribution
matching leaves the pairing free, and measures it with a scale-invariant "Pairing Inefficiency"; its
formula is not public. Ours, on sample sets drawn from the same noise (sample i of every set of a run
starts from the noise of seed (run seed, i), src/pipeline/sample.py), student s_i and teacher t_i:

  matched  = mean_i ||s_i - t_i||^2
  random   = mean_{i != j} ||s_i - t_j||^2    (the expectation under a uniformly random re-pairing)
  optimal  = min over permutations pi of mean_i ||s_i - t_pi(i)||^2   (the optimal matching of the sets)

  pairing ratio       matched / random                  0: the teacher's own pairing; ~1: no relation
  pairing inefficiency (matched - optimal) / (random - optimal)
                                                        the student's excess transport cost over the
                                                        cheapest pairing of the same two sets, as a
                                                        share of a random pairing's excess

For a class-conditional pair of sets (each sample drawn for a class, the same class in both) a
re-pairing stays within the class: `random` averages over pairs i != j of the same class and the
optimal matching matches within each class, so a student is not credited for keeping the class its
conditioning fixes.

The inefficiency depends on how many pairs the optimal matching sees (a larger set has nearer
matches): every config solves it on the same `max_matching` pairs (512), so rows and configs compare.

Both are invariant to rescaling the data (every term scales by s^2) and to shifting it. The ratio asks
"does the student send each noise where the teacher does"; the inefficiency asks the same relative to
what any pairing of these two sets could achieve, so two sets that differ (a student of poorer quality)
are not counted as copying less. numpy and scipy only.
"""
from __future__ import annotations

import numpy as np

from .io import pyplot, save_png, write_json


def flat_images(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC images as float64 rows in [-1, 1] (the models' data scale)."""
    return images.reshape(len(images), -1).astype(np.float64) / 127.5 - 1.0


def mean_random_pair_cost(s: np.ndarray, t: np.ndarray) -> float:
    """mean over i != j of ||s_i - t_j||^2, from sums: no m x m matrix."""
    m = len(s)
    total = m * (s ** 2).sum() + m * (t ** 2).sum() - 2 * s.sum(0) @ t.sum(0)
    return float((total - ((s - t) ** 2).sum()) / (m * (m - 1)))


def optimal_matching_cost(s: np.ndarray, t: np.ndarray) -> float:
    """min over permutations of the mean squared distance (scipy's Hungarian solver, exact)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    cost = cdist(s, t, "sqeuclidean")
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def _class_terms(s: np.ndarray, t: np.ndarray, labels: np.ndarray | None,
                 optimal: bool) -> tuple[float, float, float | None, int]:
    """(matched, random, optimal or None, pairs left out) of paired rows. With `labels`, every term keeps
    re-pairings within a class: a class of one pair has none and is left out of all three; `random` is
    each remaining sample's expected cost under a random re-pairing within its class (the class mean
    over i != j, weighted by the class's size), `optimal` the matching within each class."""
    if labels is None:
        return (float(((s - t) ** 2).sum(1).mean()), mean_random_pair_cost(s, t),
                optimal_matching_cost(s, t) if optimal else None, 0)
    classes, counts = np.unique(labels, return_counts=True)
    kept = classes[counts > 1]
    if not len(kept):
        raise ValueError("every class holds one pair: there is no re-pairing within a class to compare with")
    used = matched = random = best = 0.0
    for c in kept:
        rows = np.flatnonzero(labels == c)
        m = len(rows)
        used += m
        matched += float(((s[rows] - t[rows]) ** 2).sum(1).sum())
        random += mean_random_pair_cost(s[rows], t[rows]) * m
        if optimal:
            best += optimal_matching_cost(s[rows], t[rows]) * m
    return matched / used, random / used, (best / used if optimal else None), int(len(s) - used)


def pairing_stats(student: np.ndarray, teacher: np.ndarray, max_matching: int = 512,
                  labels: np.ndarray | None = None) -> dict:
    """The pairing statistics of paired rows (module docstring). The optimal matching is solved on the
    first `max_matching` pairs (it costs O(m^3)); the ratio uses every pair. `labels`: each pair's
    class for class-conditional sets, whose re-pairings stay within the class (classes of one pair,
    which have no re-pairing, are left out and counted in `dropped_pairs`)."""
    s, t = np.asarray(student, dtype=np.float64), np.asarray(teacher, dtype=np.float64)
    if s.shape != t.shape or s.ndim != 2 or len(s) < 2:
        raise ValueError(f"paired sets must be two (m, d) arrays with m >= 2, got {s.shape} and {t.shape}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(s),):
            raise ValueError(f"{labels.shape} labels for {len(s)} pairs")
    matched, random, _, dropped = _class_terms(s, t, labels, optimal=False)
    k = min(len(s), max_matching)
    sub_matched, sub_random, optimal, sub_dropped = _class_terms(s[:k], t[:k], None if labels is None else labels[:k],
                                                                 optimal=True)
    return {"n_pairs": len(s), "dimension": s.shape[1], "matched": matched, "random": random,
            "pairing_ratio": matched / random if random > 0 else float("nan"),
            "n_matching": k, "optimal": optimal, "within_class": labels is not None,
            "dropped_pairs": dropped, "dropped_pairs_matching": sub_dropped,
            "pairing_inefficiency": (sub_matched - optimal) / (sub_random - optimal) if sub_random > optimal else float("nan")}


def pair_sets(student_manifest, teacher_manifest) -> tuple[np.ndarray, np.ndarray, dict]:
    """The two sets' images, checked to start from the same noise: equal per-sample seeds (and classes)."""
    from .shards import read_samples

    s_img, s_table, s_meta = read_samples(student_manifest)
    t_img, t_table, t_meta = read_samples(teacher_manifest)
    if len(s_img) != len(t_img):
        raise ValueError(f"{student_manifest} holds {len(s_img)} samples, {teacher_manifest} {len(t_img)}")
    for column in ("seed", "label"):
        if column in s_table.column_names or column in t_table.column_names:
            a, b = s_table.column(column).to_numpy(), t_table.column(column).to_numpy()
            if not np.array_equal(a, b):
                raise ValueError(f"{student_manifest} and {teacher_manifest} differ in their samples' {column}: they "
                                 "were not drawn from the same noise (different run seeds?)")
    labels = s_table.column("label").to_numpy() if "label" in s_table.column_names else None
    if labels is not None and (labels < 0).all():  # unconditional samples carry label -1 (sample.py)
        labels = None
    return (flat_images(s_img), flat_images(t_img),
            {"student": str(student_manifest), "teacher": str(teacher_manifest), "labels": labels})


def write_pairing(student_manifest, teacher_manifest, out, max_matching: int = 512) -> dict:
    s, t, meta = pair_sets(student_manifest, teacher_manifest)
    labels = meta.pop("labels")
    result = {**meta, **pairing_stats(s, t, max_matching, labels)}
    write_json(out, result)
    return result


def _stats(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _fmt(values, percent: bool = False) -> str:
    mean, sd = _stats(values)
    scale, unit = (100, "%") if percent else (1, "")
    mean = round(scale * mean, 3) + 0.0  # no "-0.000" for a value that is zero to rounding
    return f"{mean:.3f}{unit}" + (f" ± {scale * sd:.3f}{unit}" if len(values) > 1 else "")


def report_rows(rows: list[dict]) -> list[dict]:
    """One entry per configured row (label): its replicates' pairing and memorization numbers."""
    from .io import read_json

    grouped: dict[str, dict] = {}
    for row in rows:
        pairing = read_json(row["pairing"])
        entry = grouped.setdefault(row["label"], {"label": row["label"], "series": row.get("series", row["label"]),
                                                   "models": [], "references": [], "sampler": row["sampler"],
                                                   "dimension": pairing["dimension"], "ratio": [],
                                                   "n_matching": pairing.get("n_matching"),
                                                   "inefficiency": [], "student_mem": [], "teacher_mem": []})
        entry["models"].append(row["model"])
        entry["references"].append(row["reference"])
        entry["ratio"].append(pairing["pairing_ratio"])
        entry["inefficiency"].append(pairing["pairing_inefficiency"])
        entry["student_mem"].append(read_json(row["metrics"])["memorization"]["mem_ratio"])
        entry["teacher_mem"].append(read_json(row["reference_metrics"])["memorization"]["mem_ratio"])
    return list(grouped.values())


def write_pairing_report(rows: list[dict], out_md, out_png, teacher_sampler: str) -> list[dict]:
    """The table and figure of the configured rows: pairing ratio and inefficiency beside the student's
    and the teacher's L2 memorization, mean ± sd over replicates."""
    from .io import atomic_output

    entries = report_rows(rows)
    lines = [
        "# Pairing: does the student send each noise where its teacher's ODE does?",
        "",
        f"Student and teacher ({teacher_sampler}) sample sets drawn from the same noise. Pairing ratio: mean squared",
        "distance of matched pairs over that of a random re-pairing (0: the teacher's own pairing, 1: no",
        "relation). Pairing inefficiency: the matched pairs' excess over the optimal matching of the two sets,",
        "as a share of a random pairing's excess, solved on the first k pairs (it depends on k: compare rows of",
        "equal k). Class-conditional sets are re-paired within each class. Both are invariant to rescaling the",
        "data. L2 Mem: the share of samples copying a training image (the pipeline's L2 ratio criterion).",
        "Mean ± sd over replicates.",
        "",
        "| row | student | sampler | teacher | d | pairing ratio | k | pairing inefficiency | student L2 Mem | teacher L2 Mem |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in entries:
        lines.append(f"| {e['label']} | {e['models'][0]} (x{len(e['models'])}) | {e['sampler']} | {e['references'][0]} | "
                     f"{e['dimension']} | {_fmt(e['ratio'])} | {e['n_matching']} | {_fmt(e['inefficiency'])} | "
                     f"{_fmt(e['student_mem'], True)} | {_fmt(e['teacher_mem'], True)} |")
    with atomic_output(out_md) as tmp:
        tmp.write_text("\n".join(lines) + "\n")

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[str, list] = {}
    for e in entries:
        series.setdefault(e["series"], []).append(e)
    for k, (name, items) in enumerate(series.items()):
        items = sorted(items, key=lambda e: e["dimension"])
        x = [e["dimension"] for e in items]
        ratios = [_stats(e["ratio"]) for e in items]
        left.errorbar(x, [m for m, _ in ratios], yerr=[s for _, s in ratios], fmt="o-", color=f"C{k}", label=name)
        for e, (ratio, ratio_sd) in zip(items, ratios):
            mem, mem_sd = _stats(e["student_mem"])
            right.errorbar(mem * 100, ratio, xerr=mem_sd * 100, yerr=ratio_sd, fmt="o", color=f"C{k}")
            right.annotate(e["label"], (mem * 100, ratio), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for ax in (left, right):
        ax.axhline(0, color="k", ls="--", lw=0.8)
        ax.axhline(1, color="k", ls=":", lw=0.8)
        ax.set_ylabel("pairing ratio (0: teacher's pairing, 1: random)")
    left.set_xscale("log", base=2)
    left.set_xlabel("data dimension (pixels x channels)")
    left.set_title("pairing against dimension")
    left.legend(fontsize=7)
    right.set_xlabel("student L2 Mem (%)")
    right.set_title("pairing against the student's memorization")
    fig.tight_layout()
    save_png(fig, out_png)
    plt.close(fig)
    return entries
