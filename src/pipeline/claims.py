"""Stage 8: the replication report: every claim of the studies beside our measurement and a computed verdict.

`config/claims.yaml` holds each testable statement of the studies as data: where the study states it,
its printed numbers, how the project reads its judgement words, and its measures, the tests that
decide it. A measure names rows of a table (each against its own teacher, or against another row) or
one scalar of a lab's per-seed files; it applies where the active config has that table or lab, so
one claims file serves the digits miniature and the paper grid alike, and a claim measured at two
scales shows both. The verdict is computed (pipeline.stats.claim_verdict), never typed:

  REPRODUCED     the interval of the differences (over replicates, paired where the models are)
                 lies wholly on the claimed side of 0, or, for a claim of equality, wholly inside its
                 tolerance; for a pattern ("every student ..."), every comparison does so
  DISAGREES      it lies wholly on the other side (outside the tolerance); for a pattern, any
                 comparison does so
  INCONCLUSIVE   neither, or one replicate (no interval); the report says which way it leans
  NOT MEASURED   no output of this run measures it; `needs` names what would

Two steps: `plan` runs when the DAG is built (which files each measure reads, from the config alone),
`evaluate` in the job (reads them). Planning imports no more than the config does; no torch anywhere.
"""
from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .stats import (CLAIM_VERDICTS, DISAGREES, INCONCLUSIVE, NOT_MEASURED, REPRODUCED, ClaimVerdict, claim_verdict,
                    combine_verdicts, t_interval)

# What a dataset's tables measure at: a verdict on digits reads "REPRODUCED (digits miniature)".
SCALES = {"digits": "digits miniature", "cifar10": "CIFAR-10", "imagenet64": "ImageNet-64",
          "pairs": "text-to-image (image-caption pairs)", "coco2017": "text-to-image (COCO 2017)"}


def schema() -> dict:
    from importlib import resources

    from yaml import safe_load

    return safe_load(resources.files("pipeline").joinpath("schemas/claims.schema.yaml").read_text())


def load(path: str | Path) -> list[dict]:
    """The claims of `path`, validated against the schema; ids must be unique."""
    import jsonschema
    from yaml import safe_load

    with open(path) as f:
        data = safe_load(f)
    errors = sorted(jsonschema.Draft7Validator(schema()).iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {'.'.join(str(p) for p in e.absolute_path) or '<top level>'}: {e.message}" for e in errors[:10]]
        raise ValueError(f"invalid claims file {path}:\n" + "\n".join(lines))
    ids = Counter(c["id"] for c in data["claims"])
    if any(n > 1 for n in ids.values()):
        raise ValueError(f"claims file {path}: ids used twice: {sorted(i for i, n in ids.items() if n > 1)}")
    return data["claims"]


# --------------------------------------------------------------------------- planning (DAG time)

def _matches(row: Mapping[str, Any], selector: Mapping[str, Any]) -> bool:
    for key, want in selector.items():
        allowed = [want] if isinstance(want, str) else list(want)
        if str(row.get(key, "")) not in allowed:
            return False
    return True


def _metric_paths(row: Mapping[str, Any]) -> list[str]:
    return [f"results/metrics/{m}/{row['sampler']}.json" for m in row["replicates"]]


def _scale_of_rows(cfg: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    from .config import dataset_of_subset

    sources = []
    for r in rows:
        source = dataset_of_subset(cfg, r["subset"]).get("source", "")
        if SCALES.get(source, source) not in sources:
            sources.append(SCALES.get(source, source))
    return " + ".join(sources)


def _plan_table(cfg: Mapping[str, Any], m: Mapping[str, Any]) -> dict | None:
    from .config import table_rows

    if m["table"] not in cfg.get("tables", {}):
        return None
    rows = table_rows(cfg, m["table"])
    comparisons = []
    for i, row in enumerate(rows):
        if row["role"] == "yardstick" or not _matches(row, m["rows"]):
            continue
        if m["against"] == "teacher":
            j = row.get("teacher_row")
            if j is None:
                continue
        else:
            selector = {"setting": row["setting"], **m["against"]}
            found = [k for k, other in enumerate(rows) if k != i and _matches(other, selector)]
            if not found and "setting" not in m["against"]:  # a yardstick row: set under the row's training subset
                found = [k for k, other in enumerate(rows) if other["role"] == "yardstick"
                         and other["subset"] == row["subset"] and _matches(other, m["against"])]
            if len(found) != 1:  # this config's table lacks the row to compare with (or has several): not measured
                continue
            j = found[0]
        other = rows[j]
        where = "" if other["setting"] == row["setting"] else f"{other['setting']} / "
        comparisons.append({"row": f"{row['setting']} / {row['label']} ({row['sampler']})",
                            "against": f"{where}{other['label']} ({other['sampler']})",
                            "first": _metric_paths(row), "second": _metric_paths(other),
                            "first_cfg": {k: row[k] for k in ("group_by",)},
                            "second_cfg": {k: other[k] for k in ("group_by",)}})
    if not comparisons:
        return None
    used = [r for r in rows if any(c["first"] == _metric_paths(r) or c["second"] == _metric_paths(r) for c in comparisons)]
    return {"source": f"table {m['table']}", "scale": _scale_of_rows(cfg, used), "metric": m["metric"],
            "expect": m["expect"], "tolerance": m.get("tolerance"), "relative_tolerance": m.get("relative_tolerance"),
            "comparisons": comparisons}


def _expand(pattern: str, cfg: Mapping[str, Any], section: Mapping[str, Any]) -> list[str]:
    """A lab's per-replicate files: `{seed}` over the section's seeds, `{r}` over the run's replicate
    suffixes ("", ".r1", ...: replicate r of every model the path names)."""
    if "{seed}" in pattern:
        return [pattern.format(seed=s) for s in section.get("seeds") or [0]]
    if "{r}" in pattern:
        from .replicates import replicate_id

        return [pattern.replace("{r}", replicate_id("", r)) for r in range(cfg.get("replicates", 1))]
    return [pattern]


def _lookup(cfg: Mapping[str, Any], path: str):
    """The config entry at a dotted path (`edge.cases.gaussian`); a list step `key=value` picks the element
    whose `key` is `value` (`pairing.rows.model=dmd-mem30`). None where the config has no such entry."""
    node: Any = cfg
    for step in path.split("."):
        if isinstance(node, Mapping):
            node = node.get(step)
        elif isinstance(node, list) and "=" in step:
            key, value = step.split("=", 1)
            node = next((e for e in node if isinstance(e, Mapping) and str(e.get(key)) == value), None)
        else:
            return None
        if node is None:
            return None
    return node


def _plan_files(cfg: Mapping[str, Any], m: Mapping[str, Any]) -> dict | None:
    requires = [m["requires"]] if isinstance(m["requires"], str) else list(m["requires"])
    if any(not _lookup(cfg, path) for path in requires):
        return None
    section = cfg[requires[0].split(".")[0]]
    planned = {"source": m["files"].replace("{seed}", "*").replace("{r}", ""), "scale": m["scale"].format(**cfg),
               "metric": m["key"], "expect": m["expect"], "tolerance": m.get("tolerance"),
               "undefined": m.get("undefined", "inconclusive"), "files": _expand(m["files"], cfg, section)}
    if "against" in m:
        planned["against_files"] = _expand(m["against"], cfg, section)
        planned["against"] = m["against"].replace("{seed}", "*").replace("{r}", "")
    elif "against_key" in m:
        planned["against_key"] = m["against_key"]
    else:
        planned["threshold"] = m["threshold"]
    return planned


def plan(claims: Sequence[Mapping[str, Any]], cfg: Mapping[str, Any], config_name: str = "") -> list[dict]:
    """Each claim with the measures the active (validated) config can take, and the files they read."""
    out = []
    for c in claims:
        measures = [p for p in ((_plan_table(cfg, m) if "table" in m else _plan_files(cfg, m)) for m in c["measures"])
                    if p is not None]
        out.append({**{k: c[k] for k in ("id", "study", "where", "statement", "paper", "kind", "reading", "needs")},
                    "config": config_name, "planned": measures})
    return out


def planned_files(planned: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every file the planned measures read, once each, in order: the claims rule's inputs."""
    files: list[str] = []
    for c in planned:
        for m in c["planned"]:
            for path in (m.get("files", []) + m.get("against_files", [])
                         + [p for comp in m.get("comparisons", []) for p in comp["first"] + comp["second"]]):
                if path not in files:
                    files.append(path)
    return files


# --------------------------------------------------------------------------- evaluation (job time)

# Columns read in percentage points (a rate), as the tables print them.
def _unit(metric: str) -> tuple[float, str]:
    if metric == "mem" or metric.startswith(("mem_", "sscd_mem")):
        return 100.0, " points"
    return 1.0, ""


def _table_values(paths: Sequence[str], row_cfg: Mapping[str, Any], metric: str, root: Path) -> list[float]:
    from .io import read_json
    from .tables import GROUPINGS, _raw_row

    values = []
    for p in paths:
        m = read_json(root / p)
        key = GROUPINGS[row_cfg.get("group_by", "neighbour")]
        groups = sorted((m["memorization"].get(key) or {}).keys())
        row = _raw_row(row_cfg, m, key, groups)
        if row.get(metric) is None:
            raise ValueError(f"{p} has no {metric!r} (a column of the tables: quality, mem, sscd_mem, clip_score, mem_<group>, ...)")
        values.append(float(row[metric]))
    return values


def _file_value(path: Path, key: str) -> float:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if key not in data.files:
                raise ValueError(f"{path} has no {key!r}; it holds {sorted(data.files)}")
            return float(np.asarray(data[key]).reshape(()))
    from .io import read_json

    return float(read_json(path)[key])


def _fmt(v: float) -> str:
    return f"{v:+.3g}" if abs(v) < 0.01 else f"{v:+.2f}"


def _interval_text(interval, unit: str) -> str:
    span = "" if interval.low is None else f" [{_fmt(interval.low)}, {_fmt(interval.high)}]"
    return f"{_fmt(interval.mean)}{span}{unit} (n = {interval.n})"


def _evaluate_measure(m: Mapping[str, Any], root: Path) -> dict:
    scale, unit = _unit(m["metric"])
    verdicts, parts = [], []
    if "files" in m:
        values = [_file_value(root / f, m["metric"]) for f in m["files"]]
        undefined = [f for f, v in zip(m["files"], values) if not np.isfinite(v)]
        if "against_key" in m:
            undefined += [f for f in m["files"] if not np.isfinite(_file_value(root / f, m["against_key"]))]
        if "against_files" in m:
            undefined += [f for f in m["against_files"] if not np.isfinite(_file_value(root / f, m["metric"]))]
        if undefined:  # e.g. no crossover inside the lab's size grid
            word = DISAGREES if m.get("undefined") == "disagrees" else INCONCLUSIVE
            verdicts.append(ClaimVerdict(word, f"{len(set(undefined))} value(s) undefined (NaN)"))
            parts.append(f"{m['metric']} undefined in {', '.join(sorted(set(undefined)))}")
        elif "against_files" in m:  # replicate r of one output against replicate r of another: paired
            others = [_file_value(root / f, m["metric"]) for f in m["against_files"]]
            interval = t_interval([a - b for a, b in zip(values, others)])
            parts.append(f"{m['metric']}: {m['source']} - {m['against']}: {_interval_text(interval, '')}")
        elif "against_key" in m:  # two quantities of the same file (seed), paired
            others = [_file_value(root / f, m["against_key"]) for f in m["files"]]
            interval = t_interval([a - b for a, b in zip(values, others)])
            parts.append(f"{m['metric']} - {m['against_key']}: {_interval_text(interval, '')}")
        else:
            interval = t_interval([v - m["threshold"] for v in values])
            mean = t_interval(values)
            span = "" if mean.low is None else f" [{mean.low:.3g}, {mean.high:.3g}]"
            parts.append(f"{m['metric']} {mean.mean:.3g}{span} (n = {mean.n}) against {m['threshold']:g}")
        if not undefined:
            verdicts.append(claim_verdict(interval, m["expect"], m.get("tolerance")))
    else:
        for comp in m["comparisons"]:
            a = [scale * v for v in _table_values(comp["first"], comp["first_cfg"], m["metric"], root)]
            b = [scale * v for v in _table_values(comp["second"], comp["second_cfg"], m["metric"], root)]
            if not np.all(np.isfinite(a + b)):
                verdicts.append(ClaimVerdict(INCONCLUSIVE, "a value is undefined (NaN)"))
                parts.append(f"{comp['row']} - {comp['against']}: undefined")
                continue
            if len(a) == len(b):  # replicate r of each comes from the same teacher replicate or seed: paired
                interval = t_interval([x - y for x, y in zip(a, b)])
            elif len(b) == 1 or len(a) == 1:  # one side is one fixed set (a held-out yardstick): a constant
                interval = t_interval([x - y for x in a for y in b])
            else:
                interval = _welch(a, b)
            tolerance = m.get("tolerance")
            if m.get("relative_tolerance") is not None:
                tolerance = m["relative_tolerance"] * abs(float(np.mean(b)))
            v = claim_verdict(interval, m["expect"], tolerance)
            verdicts.append(v)
            parts.append(f"{comp['row']} - {comp['against']}: {_interval_text(interval, unit)}")
    combined = combine_verdicts(verdicts)
    return {"scale": m["scale"], "source": m["source"], "metric": m["metric"], "verdict": combined.verdict,
            "why": combined.why, "ours": "; ".join(parts)}


def _welch(a: Sequence[float], b: Sequence[float]):
    """Unpaired difference of means with Welch's t interval (rows with different replicate counts, both
    replicated): scipy's ttest_ind without equal variances."""
    from scipy.stats import ttest_ind

    from .stats import CONFIDENCE, Interval

    ci = ttest_ind(a, b, equal_var=False).confidence_interval(CONFIDENCE)
    return Interval(float(np.mean(a) - np.mean(b)), float(ci.low), float(ci.high), min(len(a), len(b)))


def evaluate(planned: Sequence[Mapping[str, Any]], root: str | Path = ".") -> list[dict]:
    """One result row per claim and scale it was measured at (one NOT MEASURED row where none applies)."""
    root = Path(root)
    rows = []
    for c in planned:
        base = {k: c[k] for k in ("id", "study", "where", "statement", "paper", "kind", "reading", "config")}
        if not c["planned"]:
            rows.append({**base, "scale": "", "source": "", "metric": "", "verdict": NOT_MEASURED,
                         "why": "no output of this run measures it", "ours": "", "needs": c["needs"]})
            continue
        by_scale: dict[str, list[dict]] = {}
        for m in c["planned"]:
            by_scale.setdefault(m["scale"], []).append(_evaluate_measure(m, root))
        for scale, results in by_scale.items():
            verdict = combine_verdicts([ClaimVerdict(r["verdict"], r["why"]) for r in results])
            rows.append({**base, "scale": scale, "source": ", ".join(dict.fromkeys(r["source"] for r in results)),
                         "metric": ", ".join(dict.fromkeys(r["metric"] for r in results)), "verdict": verdict.verdict,
                         "why": verdict.why, "ours": " | ".join(r["ours"] for r in results), "needs": ""})
    return rows


# --------------------------------------------------------------------------- the report

RULES = ("REPRODUCED: the interval of the differences (95% t interval over replicates, paired where the models "
         "are paired) lies wholly on the claimed side of 0, or, for a claim of equality, wholly inside its "
         "tolerance; a pattern over several rows needs every comparison to. DISAGREES: wholly on the other side "
         "(wholly outside the tolerance); for a pattern, any comparison. INCONCLUSIVE: neither, or one replicate "
         "(no interval); the lean is the mean's side. NOT MEASURED: no output of this run measures it (`needs` "
         "says what would). A verdict holds at the scale it names: a digits-miniature verdict is not a CIFAR-10 one.")


def counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, Counter]:
    """{scale: Counter(verdict)} over the result rows (NOT MEASURED rows under scale 'not measured')."""
    out: dict[str, Counter] = {}
    for r in rows:
        out.setdefault(r["scale"] or "not measured", Counter())[r["verdict"]] += 1
    return out


def _verdict_cell(r: Mapping[str, Any]) -> str:
    if r["verdict"] == NOT_MEASURED:
        return f"NOT MEASURED: needs {r['needs']}"
    return f"{r['verdict']} ({r['scale']}): {r['why']}"


FIELDS = ("id", "study", "where", "statement", "paper", "kind", "reading", "config", "scale", "source", "metric",
          "ours", "verdict", "why", "needs")
HEAD = ("Claim", "Where", "Statement", "Paper", "Reading", "Ours", "Verdict")


def _cells(r: Mapping[str, Any]) -> list[str]:
    return [r["id"], r["where"], r["statement"], r["paper"], r["reading"],
            (f"{r['ours']} ({r['source']}, {r['metric']})" if r["ours"] else ""), _verdict_cell(r)]


def write_report(rows: Sequence[Mapping[str, Any]], out_md: str | Path, out_csv: str | Path, out_html: str | Path,
                 config_name: str = "") -> None:
    import csv
    import io

    from .io import atomic_output

    tally = counts(rows)
    summary = [f"{scale}: " + ", ".join(f"{n} {v}" for v in CLAIM_VERDICTS if (n := c.get(v))) for scale, c in tally.items()]
    title = f"Replication report{f' ({config_name})' if config_name else ''}: {len({r['id'] for r in rows})} claims"
    md = [f"# {title}", "", "Verdicts per scale: " + "; ".join(summary) + ".", "", RULES, "",
          "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    md += ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in _cells(r)) + " |" for r in rows]
    with atomic_output(out_md) as tmp:
        tmp.write_text("\n".join(md) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_output(out_csv) as tmp:
        tmp.write_text(buf.getvalue())
    colour = {REPRODUCED: "#e6f4ea", DISAGREES: "#fce8e6", INCONCLUSIVE: "#fef7e0", NOT_MEASURED: "#f1f3f4"}
    body = "".join(f"<tr style=\"background:{colour[r['verdict']]}\">" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r))
                   + "</tr>" for r in rows)
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:3px 6px;vertical-align:top}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>Verdicts per scale: {html.escape('; '.join(summary))}.</p>"
            f"<p>{html.escape(RULES)}</p><table><tr>{''.join(f'<th>{h}</th>' for h in HEAD)}</tr>{body}</table></body></html>")
    with atomic_output(out_html) as tmp:
        tmp.write_text(page)


def write_plan(plan_text: str, out: str | Path, log: str | Path) -> None:
    """The claims_plan rule: the plan (JSON text made from the config at DAG time) written atomically."""
    from .io import atomic_output

    planned = json.loads(plan_text)["claims"]
    with atomic_output(out) as tmp:
        tmp.write_text(plan_text)
    Path(log).write_text(f"{len(planned)} claims, {sum(bool(c['planned']) for c in planned)} measured by this config\n")


def run(plan_json: str | Path, out_dir: str | Path, root: str | Path = ".") -> list[dict]:
    """The claims job: evaluate the plan the rule wrote and write results/claims/claims.{md,csv,html}."""
    with open(plan_json) as f:
        planned = json.load(f)
    rows = evaluate(planned["claims"], root)
    out = Path(out_dir)
    write_report(rows, out / "claims.md", out / "claims.csv", out / "claims.html", planned.get("config", ""))
    return rows
