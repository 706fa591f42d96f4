"""Stage 6b: aggregate per-model metrics into the study's tables (their figures: pipeline.figures)."""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .io import atomic_output, read_json
from .selection import CLOSE_FACTOR as SELECTION_FACTOR
from .yardsticks import parse_id as parse_yardstick


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}%"


_f2, _f3, _f4 = "{:.2f}".format, "{:.3f}".format, "{:.4f}".format  # cell formats


# A row's per-group columns: the group of each sample's nearest training image, or of the class a
# class-conditional model generated it for (config.table_rows decides which, per row).
GROUPINGS = {"neighbour": "by_group", "class": "by_class_group"}


def _by(summary: Mapping[str, Any], key: str) -> dict:
    if key in summary:
        return summary[key]
    raise ValueError(f"the metrics have no {key!r}: per-class figures need every sample to carry its class "
                     "(the `label` column of the samples); rerun the sample and search rules")


def table_rows(rows_cfg: Sequence[Mapping[str, Any]], metric_paths: Sequence[str | Path]) -> tuple[list[str], list[dict]]:
    """One row per configured (model, sampler); returns (group names in order, rows of values).

    `metric_paths` holds, per row in turn, the metrics of each of its `replicates` (default: the row's
    model alone), then of each point of its convergence `window` (config.table_metrics gives the order).
    A row's numeric values are the mean over its replicates, each with `<key>_sd` beside it (the sample
    standard deviation; None for a single replicate)."""
    paths = list(metric_paths)
    want = sum(len(c.get("replicates") or [None]) + sum(len(w) for w in c.get("window", [])) for c in rows_cfg)
    if len(paths) != want:
        raise ValueError(f"{len(paths)} metrics files for {want} (rows x replicates, and convergence windows)")
    taken = iter(read_json(p) for p in paths)
    per_row = [([next(taken) for _ in c.get("replicates") or [None]],
                [[next(taken) for _ in ids] for ids in c.get("window", [])]) for c in rows_cfg]
    grouping = [GROUPINGS[cfg.get("group_by", "neighbour")] for cfg in rows_cfg]
    groups = sorted({g for (reps, _), key in zip(per_row, grouping) for m in reps for g in _by(m["memorization"], key)})
    rows, raws = [], []
    for cfg, (reps, window), key in zip(rows_cfg, per_row, grouping):
        raw = [_raw_row(cfg, m, key, groups) for m in reps]
        raws.append(raw)
        row = aggregate(raw)
        if "selection_model" in row:  # each replicate selects from its own run: name every choice
            row["selection_model"] = ", ".join(dict.fromkeys(r["selection_model"] for r in raw))
            row["selection_close"] = all(r["selection_close"] for r in raw)
        row.update(_convergence(reps, window))
        rows.append(row)
    for cfg, row, raw in zip(rows_cfg, rows, raws):
        if cfg.get("teacher_row") is not None:
            row.update(_versus_teacher(raw, raws[cfg["teacher_row"]], rows[cfg["teacher_row"]]))
    return groups, rows


def _versus_teacher(student: Sequence[Mapping[str, Any]], teacher: Sequence[Mapping[str, Any]],
                    teacher_row: Mapping[str, Any]) -> dict:
    """A student row against its own teacher's, replicate by replicate (replicate r distilled from
    teacher replicate r): quality (lower is better) and L2 Mem in percentage points, each as the mean
    difference, its 95% t interval and the verdict word (pipeline.stats)."""
    from .stats import MEMORIZATION_WORDS, QUALITY_WORDS, paired_difference

    out = {"vs_teacher": f"{teacher_row['label']} ({teacher_row['model']}, {teacher_row['sampler']})"}
    for key, scale, words in (("quality", 1.0, QUALITY_WORDS), ("mem", 100.0, MEMORIZATION_WORDS)):
        d = paired_difference([scale * r[key] for r in student], [scale * r[key] for r in teacher], words=words)
        out.update({f"vs_teacher_{key}": d.interval.mean, f"vs_teacher_{key}_low": d.interval.low,
                    f"vs_teacher_{key}_high": d.interval.high, f"vs_teacher_{key}_verdict": d.verdict,
                    f"vs_teacher_{key}_cell": d.cell()})
    return out


def _raw_row(cfg: Mapping[str, Any], m: Mapping[str, Any], key: str, groups: Sequence[str]) -> dict:
    """One replicate's values of a table row."""
    mem, q, training = m["memorization"], m["quality"], m.get("training") or {}
    row = {"setting": cfg.get("setting", ""), "label": cfg.get("label", m["model"]), "model": m["model"],
           "sampler": m["sampler"], "nfe": m["nfe"], "quality_name": q["name"], "quality": q["value"],
           "quality_reference": q.get("reference", ""), "subset": cfg.get("subset", ""),
           "role": cfg.get("role", ""), "step": training.get("step") or training.get("steps"),
           "mem": mem["mem_ratio"], "ratio_median": mem["ratio_median"], "ratio_p05": mem["ratio_p05"],
           "num_samples": mem["n_samples"], "group_by": cfg.get("group_by", "neighbour"),
           "refine_sigma": cfg.get("refine_sigma"), "criterion_ratio": mem.get("criterion_ratio")}
    selection = training.get("selection")
    if selection:  # a teacher chosen by memorization rate: the target beside the rate it reached
        row.update(selection_target=selection["threshold"], selection_reached=selection["mem_ratio"],
                   selection_model=selection["model"], selection_close=selection.get("within_factor") is not None)
    for g in groups:
        row[f"mem_{g}"] = _by(mem, key).get(g, {}).get("mem_ratio")
    if "clip" in m:
        row["clip_score"] = m["clip"]["value"] / 100  # the study's Table 3 unit: the cosine itself
    if "prompt_class" in m:
        row["prompt_class"] = m["prompt_class"]["value"]
    if "sscd" in m:
        row.update(sscd_mem=m["sscd"]["mem_ratio"], sscd_p95=m["sscd"]["p95"], sscd_mean=m["sscd"]["mean"],
                   sscd_max=m["sscd"]["max"], sscd_threshold=m["sscd"]["threshold"],
                   sscd_descriptor=m["sscd"].get("descriptor", "sscd"),
                   sscd_quantile=(m["sscd"].get("calibration") or {}).get("quantile"))
        for g in groups:
            by = _by(m["sscd"], key).get(g)
            row[f"sscd_mem_{g}"], row[f"sscd_p95_{g}"] = (by["mem_ratio"], by["p95"]) if by else (None, None)
        if "text" in m["sscd"]:
            row.update(_text_cells(m["sscd"]["text"]))
    return row


# Values that describe a row rather than measure it: taken from replicate 0, never averaged.
_FIXED = ("nfe", "step", "num_samples", "sscd_threshold", "sscd_quantile", "refine_sigma", "criterion_ratio",
          "selection_target")


def _threshold_note(rows: Sequence[Mapping[str, Any]]) -> str:
    """The copy threshold: fixed, or calibrated per training subset on its real held-out images."""
    quantile = rows[0].get("sscd_quantile")
    if quantile is None:
        return f"{rows[0]['sscd_threshold']:g}"
    per_subset = {r["subset"]: r["sscd_threshold"] for r in rows if r.get("sscd_threshold") is not None}
    listed = ", ".join(f"{t:.4f} for {s}" for s, t in per_subset.items())
    return (f"a threshold calibrated on the real held-out images of the same training subset, the "
            f"{100 * quantile:g}th percentile of their similarity ({listed}): images never trained on "
            f"score at most {100 * (1 - quantile):.3g}% by construction")


def aggregate(replicate_rows: Sequence[Mapping[str, Any]]) -> dict:
    """A row from its replicates' rows: each measured number as the mean over the replicates that have
    it, with `<key>_sd`, their sample standard deviation (ddof 1; None with fewer than 2 values);
    everything else as replicate 0 has it. `replicates` counts them."""
    first = dict(replicate_rows[0])
    out = {**first, "replicates": len(replicate_rows)}
    for k, v in first.items():
        if k in _FIXED or isinstance(v, (bool, str)) or not (v is None or isinstance(v, (int, float))):
            continue
        values = [r[k] for r in replicate_rows if r.get(k) is not None]
        out[k] = float(np.mean(values)) if values else None
        out[f"{k}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return out


PLATEAU_POINTS = 4  # points per replicate the plateau test needs (2 degrees of freedom for the slope)


def _convergence(reps: Sequence[Mapping[str, Any]], window: Sequence[Sequence[Mapping[str, Any]]]) -> dict:
    """The convergence criterion of a trained row (config/README.md, `convergence`): per replicate, the
    least-squares slope of quality over the row's last points (its run's last snapshots and its end)
    with its 95% t interval (pipeline.stats.plateau); converged when the interval holds 0 in every
    replicate, not converged when any replicate is still moving, not assessed (None) with fewer than
    PLATEAU_POINTS points. A still-falling student is never called converged, however noisy its replicates."""
    from .stats import plateau

    if not window:
        return {}
    tests = []
    for r, final in enumerate(reps):
        points = [ms[r] for ms in window] + [final]
        steps = [(m.get("training") or {}).get("step") or (m.get("training") or {}).get("steps") for m in points]
        if any(k is None for k in steps):
            raise ValueError(f"{final['model']}: the metrics of its convergence points lack their training step")
        tests.append(plateau(steps, [m["quality"]["value"] for m in points], fraction=1.0, min_points=PLATEAU_POINTS))
    moving = [t for t in tests if t.verdict.startswith("still")]
    assessed = all(not t.verdict.startswith("not assessed") for t in tests)
    steps = [(ms[0].get("training") or {}).get("step") for ms in window]
    return {"converged": False if moving else (True if assessed else None),
            "convergence_verdicts": "; ".join(t.verdict for t in tests),
            "convergence_slopes": " ".join(f"{t.slope:.3g}" for t in tests),
            "convergence_points": len(window) + 1, "convergence_steps": " ".join(str(k) for k in steps)}


# How tables name a copy-detection descriptor: SSCD, or the embedded data's download-free stand-in.
DESCRIPTORS = {"sscd": "SSCD", "digits": "Digit-feature"}
TEXT_STATS = (("own", "memorized_prompts", "own_image"), ("nearest", "memorized_prompts", "nearest_memorized"),
              ("heldout", "held_out_prompts", "nearest_memorized"))


def _text_cells(text: Mapping[str, Any]) -> dict:
    """Table 3's similarity statistics of a text-to-image row (None where the row has no such prompts)."""
    out = {}
    for name, prompts, stat in TEXT_STATS:
        got = text.get(prompts, {}).get(stat)
        for k in ("mean", "max", "p95"):
            out[f"text_{name}_{k}"] = got[k] if got else None
    return out


def _triple(r, name) -> str:
    if r.get(f"text_{name}_mean") is None:
        return ""
    return " / ".join(_f4(r[f"text_{name}_{k}"]) for k in ("mean", "max", "p95"))


def _references(rows) -> str:
    refs = sorted({r["quality_reference"] for r in rows if r["quality_reference"]})
    if not refs:
        return "reference statistics as configured"
    if len(refs) == 1:
        return f"measured against {refs[0]}"
    return "each row measured against its own training subset's statistics"


def _placement(rows, qname: str) -> list[str]:
    """One line per generated row: its quality between the neighbouring yardstick values of its own
    training subset (lower is better), and its memorization beside the real-data and replay rates."""
    marks: dict[str, list[dict]] = {}
    for r in rows:
        if r["nfe"] == 0 and r["subset"]:
            marks.setdefault(r["subset"], []).append(r)
    lines = []
    for r in rows:
        ys = sorted(marks.get(r["subset"], []), key=lambda y: y["quality"])
        if r["nfe"] == 0 or not ys:
            continue
        # yardstick values at or below the row's (scoring as well or better) and above it
        below = [y for y in ys if y["quality"] <= r["quality"]]
        above = [y for y in ys if y["quality"] > r["quality"]]

        def name(y):
            return f"{y['label'].lower()} {y['quality']:.2f}"

        if not below:
            where = f"better than every yardstick (best: {name(ys[0])})"
            shown = [ys[0]]
        elif not above:
            where = f"worse than every yardstick (worst: {name(ys[-1])})"
            shown = [ys[-1]]
        else:
            where = f"between {name(below[-1])} and {name(above[0])}"
            shown = [below[-1], above[0]]
        by_kind = {parse_yardstick(y["model"])[0]: y for y in ys}
        if "real" in by_kind and by_kind["real"] not in shown:
            where += f" (floor: {name(by_kind['real'])})"
        mem = {kind: y["mem"] for kind, y in by_kind.items()}
        beside = ", ".join(f"{label} {_pct(mem[k])}" for k, label in (("real", "real held-out"), ("train", "train vs train"),
                                                                     ("replay", "training replay")) if k in mem)
        lines.append(f"{r['label']} ({r['sampler']}): {qname} {r['quality']:.2f}, {where}; "
                     f"L2 Mem {_pct(r['mem'])}" + (f" ({beside})" if beside else "") + ".")
    return lines


def _paper_cells(rows_cfg, rows, paper: Mapping[str, Any] | None) -> None:
    """Attach the published cells of each configured row (`paper_<column>`, as printed; blank for
    yardsticks and rows the study has no value for)."""
    from .config import paper_key

    if paper is None:
        return
    for cfg, row in zip(rows_cfg, rows):
        values = paper["rows"].get(paper_key(cfg)) if row["nfe"] > 0 else None
        for col, value in zip(paper["columns"], values or [""] * len(paper["columns"])):
            row[f"paper_{col}"] = value


def write_table(title: str, rows_cfg, metric_paths, out_csv: str | Path, out_md: str | Path,
                paper: Mapping[str, Any] | None = None, out_html: str | Path | None = None) -> list[dict]:
    """The table as CSV, Markdown and (for the Snakemake report) a standalone HTML page. `paper`: one
    entry of the published values (config/published.yaml) with `source` and `full_protocol` added,
    shown as `Paper ...` columns beside ours."""
    groups, rows = table_rows(rows_cfg, metric_paths)
    _paper_cells(rows_cfg, rows, paper)
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))  # rows differ: convergence only on students
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_output(out_csv) as tmp:
        tmp.write_text(buf.getvalue())
    head, body, notes = _layout(groups, rows, paper)
    with atomic_output(out_md) as tmp:
        tmp.write_text(render_markdown(title, head, body, notes))
    if out_html is not None:
        with atomic_output(out_html) as tmp:
            tmp.write_text(render_html(title, head, body, notes))
    return rows


def _layout(groups, rows, paper) -> tuple[list[str], list[list[str]], list[str | list[str]]]:
    """(column heads, formatted cells per row, notes): each note a paragraph or a list of bullets."""
    qname = rows[0]["quality_name"]
    sscd = all("sscd_mem" in r for r in rows)
    clip = all("clip_score" in r for r in rows)
    prompt_class = all("prompt_class" in r for r in rows)
    head = ["Setting", "Model", "Sampler", "NFE", qname] + (["CLIP (cosine)"] if clip else []) + (["Prompt digit"] if prompt_class else []) + ["L2 Mem"] + [f"L2 Mem ({g})" for g in groups] + ["median d1/d2"]
    kinds = {r.get("sscd_descriptor", "sscd") for r in rows} if sscd else set()
    if len(kinds) > 1:
        raise ValueError(f"a table's rows were measured with different descriptors {sorted(kinds)}")
    d = DESCRIPTORS[kinds.pop()] if sscd else "SSCD"
    head += [f"{d} Mem / p95"] if sscd else []
    split = sscd and len(groups) > 1  # per-group SSCD columns (Table 4's repeated / non-repeated)
    head += [f"{d} Mem / p95 ({g})" for g in groups] if split else []
    text = sscd and any("text_own_mean" in r for r in rows)  # Table 3: text-to-image rows
    head += [f"{d} own pair mean / max / p95", f"{d} nearest memorized mean / max / p95",
             f"held-out prompts: {d} nearest memorized mean / max / p95"] if text else []
    head += ([f"Paper {c}" for c in paper["columns"]] + ["Protocol"]) if paper else []
    full = paper["full_protocol"]["num_samples"] if paper else None
    paired = any("vs_teacher" in r for r in rows)
    head += [f"{qname} vs own teacher", "L2 Mem vs own teacher (points)"] if paired else []
    converge = any("converged" in r for r in rows)
    head += ["Converged"] if converge else []
    replicated = max(r.get("replicates", 1) for r in rows) > 1
    body = []
    for r in rows:
        generated = r["nfe"] > 0
        cells = [r["setting"], _label_cell(r), r["sampler"] if generated else "-", str(r["nfe"]) if generated else "-",
                 _spread(r, "quality", _f2)] + ([_spread(r, "clip_score", _f4)] if clip else [])
        cells += ([_spread(r, "prompt_class", _pct)] if prompt_class else []) + [_spread(r, "mem", _pct)]
        cells += [_spread(r, f"mem_{g}", _pct) for g in groups] + [_spread(r, "ratio_median", _f3)]
        cells += [f"{_spread(r, 'sscd_mem', _pct)} / {_spread(r, 'sscd_p95', _f4)}"] if sscd else []
        if split:
            cells += ["" if r[f"sscd_mem_{g}"] is None else
                      f"{_spread(r, f'sscd_mem_{g}', _pct)} / {_spread(r, f'sscd_p95_{g}', _f4)}" for g in groups]
        if text:
            cells += [_triple(r, name) for name, _, _ in TEXT_STATS]
        if paper:
            cells += [r[f"paper_{c}"] for c in paper["columns"]]
            cells += ["full" if r["num_samples"] >= full else f"reduced ({r['num_samples']} samples)"]
        if paired:
            cells += [r.get("vs_teacher_quality_cell", ""), r.get("vs_teacher_mem_cell", "")]
        if converge:
            cells += [_converged_cell(r)]
        body.append(cells)
    notes: list[str | list[str]] = []
    if replicated:
        counts = sorted({r.get("replicates", 1) for r in rows})
        resampled = any((parse_yardstick(r["model"]) or ("",))[0] == "real" and r.get("replicates", 1) > 1 for r in rows)
        heldout = ("the real held-out and blurred images drawn per replicate without replacement from a larger "
                   "held-out reserve (a resample of the reserve: replicates share images, so their spread understates "
                   "that of independent held-out sets)" if resampled else
                   "the real held-out and blurred images are one fixed set (the whole held-out reserve)")
        notes.append(f"Each cell: mean ± sample standard deviation over the row's replicates ({_counts(counts)}): "
                     "models trained, distilled and sampled once per replicate seed on the same training subset; "
                     f"the training replay drawn afresh per replicate; {heldout}, and train vs train is the training "
                     "set itself. A cell without ± has one replicate.")
    if paired:
        notes.append(f"vs own teacher: the student minus its own teacher, replicate by replicate (replicate r of the "
                     f"student is distilled from replicate r of the teacher), in {qname} and in L2 Mem percentage "
                     "points: the mean difference, its 95% t interval over replicates [low, high], and the verdict "
                     "the interval gives (better / worse, less / more copying: the whole interval on that side of 0; "
                     "no difference resolved: it holds 0; not resolved: one replicate, no interval). The teacher "
                     "row is the student's own teacher's nearest row above it in this table.")
    if converge:
        notes.append("Converged: per replicate, the least-squares slope of quality over the student's last points "
                     "(its run's last snapshots and its end) and its 95% t interval; yes when the interval holds 0 in "
                     "every replicate (a plateau), no when it lies on one side of 0 in any (still improving or "
                     f"worsening), n/a with fewer than {PLATEAU_POINTS} points per replicate (no slope interval to "
                     "speak of).")
    notes += [
        f"L2 Mem: share of {rows[0]['num_samples']} samples whose nearest training image is closer than "
        f"{_ratio_words(rows)} the second nearest (true Euclidean distances in pixel space, unique training images). "
        f"{_grouping_note(rows)} "
        f"{qname}: lower is better; {_references(rows)}."]
    if clip:
        notes.append("CLIP (cosine): the cosine similarity of each sample's CLIP image embedding and its prompt's "
                     "text embedding, averaged and clamped at 0, in the study's Table 3 units (torchmetrics' CLIP "
                     "score / 100, the value the metrics files keep); higher is better.")
    if prompt_class:
        notes.append("Prompt digit: share of samples the digits classifier (the quality metric's network) reads as "
                     "the digit their prompt names, the embedded data's download-free stand-in for the CLIP score "
                     "(how well a sample matches its prompt); real captioned digits score the classifier's accuracy.")
    if sscd:
        if d != "SSCD":
            notes.append(f"{d}: cosine similarity of the digits classifier's penultimate features (the quality "
                         "metric's network), the embedded data's stand-in for SSCD, whose weights it does not have. "
                         "It is trained to recognise classes, not copies: read it against the yardsticks measured "
                         "with it, not against SSCD's thresholds.")
        notes.append(f"{d} Mem: share of samples whose most similar training image has {d} cosine similarity "
                     f"above {_threshold_note(rows)}; p95: the 95th percentile of that similarity.")
    if text:
        notes.append("Text-to-image rows (Table 3) are sampled on the memorized pairs' prompts and on held-out "
                     f"prompts in turn. {d} own pair: on memorized prompts, the {d} cosine similarity of each sample "
                     "to the training image of its own prompt; nearest memorized: to the most similar of the memorized "
                     "training images, whatever its prompt; held-out prompts: the same for prompts never trained on, "
                     "what similarity without recall looks like. Each cell: mean / max / 95th percentile over samples.")
    if paper:
        notes.append(f"Paper columns: {paper['printed_as']} of {paper['source']}, as printed there. Protocol: "
                     f"a row of ours is `full` when it measures at least {full} samples (the study's protocol), "
                     "`reduced` otherwise; reduced rows (fewer samples, shorter training) are not expected to "
                     "match the printed numbers, only their direction.")
    placement = _placement(rows, qname)
    if placement:
        notes += ["Where each model sits among the yardsticks of its training subset:", placement]
    failing = _below_evidence(rows, qname)
    if failing:
        notes += ["Not evidence yet: a memorization rate says something only about samples that are what they are "
                  f"asked to be, so a row counts once it scores better than blurred real images in {qname} and, "
                  f"for prompt-conditioned rows, shows the prompt's digit in at least {PROMPT_CLASS_FLOOR:.0%} of "
                  "its samples. These rows do not:", failing]
    chosen = [r for r in rows if "selection_target" in r]
    if chosen:
        notes.append("Teachers chosen by memorization rate (\"<target> teacher (<rate reached>: <model>)\"): the "
                     "model along the run whose L2 Mem under the selection's sampler lies nearest the target, with the "
                     "rate it reached and which model it is (the run's snapshots bound how near it can get).")
        far = sorted({f"{100 * r['selection_target']:g}%" for r in chosen if not r.get("selection_close")})
        if far:
            notes.append(f"No model of the run lies within a factor of {SELECTION_FACTOR:g} of the target "
                         f"{', '.join(far)}: those rows are not teachers of that rate; finer snapshots would be.")
    if any(r["nfe"] == 0 for r in rows):
        notes.append("Yardsticks (no sampler, measured by the same code on the same number of images): real "
                     "held-out images of the dataset, never in any training subset (what a model that generalises "
                     "perfectly scores); the training set replayed with its repeats (what a pure memorizer scores); "
                     "the held-out images blurred (what losing detail costs); train vs train, each unique training "
                     "image against the other training images (what counts as \"similar\" within the data itself: "
                     "near-duplicates there are memorized by this criterion without any copying).")
    return head, body, notes


PROMPT_CLASS_FLOOR = 0.9  # prompt-conditioned samples must show their prompt's digit this often to count


def _below_evidence(rows, qname: str) -> list[str]:
    """Generated rows that score no better than the blurred real images of their subset, or (with a
    Prompt digit column) show the prompt's digit in fewer than PROMPT_CLASS_FLOOR of their samples."""
    blur = {r["subset"]: r for r in rows if r["nfe"] == 0 and (parse_yardstick(r["model"]) or ("",))[0] == "blur"}
    out = []
    for r in rows:
        if r["nfe"] == 0:
            continue
        why = []
        if r["subset"] in blur and r["quality"] >= blur[r["subset"]]["quality"]:
            why.append(f"{qname} {r['quality']:.2f}, blurred real images {blur[r['subset']]['quality']:.2f}")
        if r.get("prompt_class") is not None and r["prompt_class"] < PROMPT_CLASS_FLOOR:
            why.append(f"prompt digit {_pct(r['prompt_class'])}")
        if why:
            out.append(f"{r['setting']} {r['label']} ({r['sampler']}): " + "; ".join(why) + ".")
    return out


def _ratio_words(rows) -> str:
    """The L2 criterion's ratio as the rows' metrics record it: 'a third of' for 1/3, else 'r times'."""
    from .memorization import DEFAULT_RATIO

    found = {r.get("criterion_ratio") for r in rows if r.get("criterion_ratio") is not None} or {DEFAULT_RATIO}
    if len(found) > 1:
        raise ValueError(f"the rows' memorization was judged with different ratios {sorted(found)}")
    ratio = found.pop()
    return "a third of" if abs(ratio - 1 / 3) < 1e-12 else f"{ratio:g} times"


def _label_cell(r: Mapping[str, Any]) -> str:
    """The row's label; a selected teacher's says its target and the rate it reached."""
    if "selection_target" not in r:
        return r["label"]
    return (f"{r['label']}: {100 * r['selection_target']:g}% teacher "
            f"({_spread(r, 'selection_reached', _pct)}: {r['selection_model']})")


def _spread(r: Mapping[str, Any], key: str, fmt) -> str:
    """A cell: the value, and ± its spread over replicates where the row has more than one."""
    if r.get(key) is None:
        return ""
    sd = r.get(f"{key}_sd")
    return fmt(r[key]) if sd is None else f"{fmt(r[key])} ± {fmt(sd)}"


def _converged_cell(r: Mapping[str, Any]) -> str:
    if "converged" not in r:
        return ""
    where = f"steps {r['convergence_steps']} and the end"
    n, verdicts = r["replicates"], r["convergence_verdicts"].split("; ")
    if r["converged"] is None:
        return (f"n/a: {r['convergence_points']} points per replicate ({where}), {PLATEAU_POINTS} needed: "
                f"raise convergence.window")
    if r["converged"]:
        return f"yes: plateau in {'all ' if n > 1 else ''}{n} replicate{'s' if n > 1 else ''} ({where})"
    moving = [v for v in verdicts if v.startswith("still")]
    return f"no: {moving[0]} in {len(moving)} of {n} replicate{'s' if n > 1 else ''} ({where})"


def _counts(counts: Sequence[int]) -> str:
    return " or ".join(str(c) for c in counts)


def _grouping_note(rows) -> str:
    ways = {r["group_by"] for r in rows}
    by_class = ("the group of the class each sample was generated for (a class is repeated if any of its "
                "training images is; real images count under their own class)")
    by_neighbour = "the group of each sample's nearest training image"
    if ways == {"class"}:
        return f"Per-group columns use {by_class}."
    if ways == {"neighbour"}:
        return f"Per-group columns use {by_neighbour}."
    return (f"Per-group columns use, for class-conditional models and their yardsticks, {by_class}; "
            f"for the others, {by_neighbour}.")


def render_markdown(title: str, head, body, notes) -> str:
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    for note in notes:
        if isinstance(note, list):
            lines += [f"- {item}" for item in note]
        else:
            lines += ["", note]
    return "\n".join(lines) + "\n"


def render_html(title: str, head, body, notes) -> str:
    """A self-contained page (the Snakemake report shows HTML results in a frame; it has no Markdown view)."""
    from html import escape

    def code(text: str) -> str:
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text))

    parts = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">', f"<title>{escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:1.5em;max-width:80em}table{border-collapse:collapse}"
             "th,td{border:1px solid #bbb;padding:0.25em 0.6em;text-align:right}"
             "td:nth-child(-n+3),th{text-align:left}tr.yardstick{color:#555;background:#f4f4f4}"
             "p,li{font-size:0.9em}</style></head><body>", f"<h1>{escape(title)}</h1>", "<table>",
             "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    for cells in body:
        cls = ' class="yardstick"' if cells[2] == "-" else ""
        parts.append(f"<tr{cls}>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>")
    parts.append("</table>")
    for note in notes:
        if isinstance(note, list):
            parts.append("<ul>" + "".join(f"<li>{code(item)}</li>" for item in note) + "</ul>")
        else:
            parts.append(f"<p>{code(note)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
