"""Replicates as an axis of the study: names and seeds, the config expansion, the DAG, the spread and the
convergence flag of a table computed from known metric files."""
from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import config as pconfig
from pipeline import replicates
from pipeline.tables import aggregate, write_table

ROOT = Path(__file__).resolve().parents[1]


def evidence(**top) -> dict:
    """The evidence config (16x16 digits, 48 and 160 images, student snapshots at 500/1000/1500), replicated as asked."""
    cfg = yaml.safe_load((ROOT / "config" / "embedded-evidence.yaml").read_text())
    cfg.pop("replicates"), cfg.pop("convergence")
    return {**cfg, **top}


def test_names_round_trip_and_replicate_zero_keeps_the_name():
    assert replicates.of("cd-48", 3) == ["cd-48", "cd-48.r1", "cd-48.r2"]
    assert replicates.of("cd-48@200", 2) == ["cd-48@200", "cd-48.r1@200"]
    assert replicates.of("real~digits-48", 2) == ["real~digits-48", "real~digits-48.r1"]
    for name in ("cd-48", "cd-48.r7", "cd-48.r2@200", "v1.5", "a.rx", "real~digits-48.r1"):
        base, r = replicates.split(name)
        assert replicates.of(base, r + 1)[r] == name
    assert replicates.split("cd-48.r2@200") == ("cd-48@200", 2)


def test_replicate_seeds_differ_and_replicate_zero_is_the_configured_seed():
    assert replicates.seed(7, 0) == 7
    seeds = {replicates.seed(s, r) for s in range(3) for r in range(1, 4)}
    assert len(seeds) == 9 and all(0 <= x < 2**31 for x in seeds) and not seeds & {0, 1, 2}


def test_schema_reserves_the_replicate_suffix():
    cfg = evidence()
    cfg["teachers"]["teacher-48.r1"] = cfg["teachers"]["teacher-48"]
    with pytest.raises(pconfig.ConfigError, match="teachers"):
        pconfig.validate(cfg)


def test_expansion_derives_seeds_and_pairs_each_student_with_its_teachers_replicate():
    cfg = pconfig.validate(evidence(replicates=3))
    assert [t for t in cfg["teachers"]] == ["teacher-48", "teacher-160", "teacher-48.r1", "teacher-48.r2",
                                            "teacher-160.r1", "teacher-160.r2"]
    assert cfg["students"]["cd-48.r2"]["teacher"] == "teacher-48.r2"
    seeds = [cfg["teachers"][t]["train"]["seed"] for t in replicates.of("teacher-48", 3)]
    assert seeds[0] == 0 and len(set(seeds)) == 3
    assert cfg["students"]["cd-48.r1"]["train"]["seed"] == replicates.seed(0, 1)
    # everything but the seed is the configured entry's
    a, b = copy.deepcopy(cfg["teachers"]["teacher-48"]), copy.deepcopy(cfg["teachers"]["teacher-48.r1"])
    del a["train"]["seed"], b["train"]["seed"]
    assert a == b
    assert pconfig.models_of(cfg)["cd-48.r1@500"] == "snapshots"
    assert pconfig.model_dir(cfg, "cd-48.r1@500") == "results/snapshots/cd-48.r1/step-500"
    assert pconfig.sampling_seed(cfg, "teacher-48") == 0
    assert pconfig.sampling_seed(cfg, "cd-48.r1@500") == pconfig.sampling_seed(cfg, "teacher-48.r1") != 0
    assert pconfig.subset_of(cfg, "real~digits-160.r2") == "digits-160"
    # one replicate (the default) changes nothing
    assert pconfig.validate(evidence())["teachers"].keys() == {"teacher-48", "teacher-160"}


def test_table_rows_list_replicates_and_the_convergence_window():
    cfg = pconfig.validate(evidence(replicates=2, convergence={"window": 3}))
    rows = {(r["model"], r["sampler"]): r for r in pconfig.table_rows(cfg, "demo")}
    student = rows[("cd-48", "1-step")]
    assert student["replicates"] == ["cd-48", "cd-48.r1"]
    assert student["window"] == [["cd-48@1000", "cd-48.r1@1000"], ["cd-48@1500", "cd-48.r1@1500"]]
    assert rows[("teacher-48", "heun-18")]["window"] == []  # teachers are not judged by it
    assert rows[("replay~digits-48", "data")]["replicates"] == ["replay~digits-48", "replay~digits-48.r1"]
    for kind in ("real", "blur", "train"):  # one fixed set each (yardsticks.REPLICATED)
        assert rows[(f"{kind}~digits-48", "data")]["replicates"] == [f"{kind}~digits-48"]
    order = pconfig.table_metrics(list(rows.values()))
    assert order[:2] == [("teacher-48", "heun-18"), ("teacher-48.r1", "heun-18")]
    assert order[2:8] == [("cd-48", "1-step"), ("cd-48.r1", "1-step"), ("cd-48@1000", "1-step"),
                          ("cd-48.r1@1000", "1-step"), ("cd-48@1500", "1-step"), ("cd-48.r1@1500", "1-step")]


def test_dry_run_plans_one_model_per_replicate_and_one_table_reads_them_all(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
         "--config", "replicates=3", "--", "results/tables/demo.md"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    counts = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()
              if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert counts["train_teacher"] == 6 and counts["distill"] == 6
    # the replay's 3 replicates and one real, blurred and train-vs-train set, for each of the 2 subsets
    assert counts["yardstick"] == 2 * (3 + 3)
    # each student's last snapshot (step 75) per replicate, for the convergence criterion
    assert counts["snapshot"] == 6
    for name in ("teacher-48.r2", "cd-96.r1", "cd-48.r2"):
        assert f"results/metrics/{name}/" in out
    for path in ("results/samples/replay~digits-48.r2/data/manifest.json", "results/metrics/cd-96.r2@75/1-step.json"):
        assert path in out
    table = out[out.index("rule table:"):]
    table_inputs = table[table.index("input:"):table.index("\n", table.index("input:"))]
    assert table_inputs.count("results/metrics/") == 4 * 3 + 2 * 3 + 2 * (3 + 3)


def metric(model, sampler, fid, mem, step=None, nfe=1):
    return {"model": model, "sampler": sampler, "nfe": nfe, "num_samples": 100,
            "quality": {"name": "digits-FD", "value": fid, "reference": "the full digits dataset"},
            "memorization": {"space": "pixels", "mem_ratio": mem, "ratio_median": 0.8, "ratio_p05": 0.3,
                             "n_samples": 100, "by_group": {"all": {"mem_ratio": mem}}},
            "training": {"step": step} if step else None}


def write_metrics(tmp_path, metrics) -> list[Path]:
    paths = []
    for i, m in enumerate(metrics):
        paths.append(tmp_path / f"m{i}.json")
        paths[-1].write_text(json.dumps(m))
    return paths


def table_cells(md: str) -> list[dict]:
    lines = [line for line in md.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_spread_and_convergence_from_known_metric_files(tmp_path):
    """Three replicates of a teacher and two students: mean and sample standard deviation in each cell;
    per replicate, the slope of quality over the run's last snapshots (steps 300-500) and its end: the
    student on a noisy plateau is converged, the one still falling in every replicate is not, although its
    replicates agree closely (the former criterion, change of the mean below the spread, called a curve
    like it converged when the replicates were spread wider than its fall)."""
    window = lambda m: [[f"{m}@{k}", f"{m}.r1@{k}", f"{m}.r2@{k}"] for k in (300, 400, 500)]
    rows = [{"setting": "s", "label": "Teacher", "model": "t", "sampler": "heun", "role": "teacher",
             "replicates": ["t", "t.r1", "t.r2"], "window": []},
            {"setting": "s", "label": "Settled", "model": "a", "sampler": "1-step", "role": "student",
             "replicates": ["a", "a.r1", "a.r2"], "window": window("a")},
            {"setting": "s", "label": "Moving", "model": "b", "sampler": "1-step", "role": "student",
             "replicates": ["b", "b.r1", "b.r2"], "window": window("b")}]
    metrics = [metric("t", "heun", 10.0, 0.40, nfe=35), metric("t.r1", "heun", 12.0, 0.50, nfe=35),
               metric("t.r2", "heun", 14.0, 0.60, nfe=35)]
    settled = {"": (20.0, [21.0, 19.5, 20.5]), ".r1": (22.0, [21.0, 22.5, 21.5]), ".r2": (24.0, [23.5, 24.5, 23.0])}
    moving = {"": (30.0, [36.1, 34.0, 31.9]), ".r1": (31.0, [37.0, 35.1, 33.0]), ".r2": (32.0, [38.2, 36.0, 34.1])}
    for name, curves in (("a", settled), ("b", moving)):
        metrics += [metric(f"{name}{r}", "1-step", final, 0.0, 600) for r, (final, _) in curves.items()]
    for name, curves in (("a", settled), ("b", moving)):
        for i, k in enumerate((300, 400, 500)):
            metrics += [metric(f"{name}{r}@{k}", "1-step", points[i], 0.0, k) for r, (_, points) in curves.items()]
    # the table reads, per row, its replicates, then each window point's replicates: reorder to that
    order = {m["model"] + m["sampler"]: m for m in metrics}
    ids = [(m, r["sampler"]) for r in rows for group in [r["replicates"], *r["window"]] for m in group]
    out = write_table("T", rows, write_metrics(tmp_path, [order[m + s] for m, s in ids]), tmp_path / "t.csv",
                      tmp_path / "t.md")
    teacher, settled_row, moving_row = out
    assert teacher["quality"] == pytest.approx(12.0) and teacher["quality_sd"] == pytest.approx(2.0)
    assert teacher["mem"] == pytest.approx(0.5) and teacher["mem_sd"] == pytest.approx(0.1)
    assert teacher["replicates"] == 3 and teacher["nfe"] == 35 and teacher["model"] == "t"
    assert settled_row["converged"] is True and settled_row["convergence_verdicts"] == "plateau; plateau; plateau"
    assert moving_row["converged"] is False and moving_row["convergence_verdicts"].count("still improving") == 3
    assert moving_row["convergence_steps"] == "300 400 500" and moving_row["convergence_points"] == 4
    cells = table_cells((tmp_path / "t.md").read_text())
    assert cells[0]["digits-FD"] == "12.00 ± 2.00" and cells[0]["L2 Mem"] == "50.00% ± 10.00%"
    assert cells[0]["Converged"] == ""
    assert cells[1]["Converged"] == "yes: plateau in all 3 replicates (steps 300 400 500 and the end)"
    assert cells[2]["Converged"] == "no: still improving in 3 of 3 replicates (steps 300 400 500 and the end)"
    md = (tmp_path / "t.md").read_text()
    assert "mean ± sample standard deviation over the row's replicates (3)" in md
    with open(tmp_path / "t.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert float(csv_rows[2]["quality_sd"]) == pytest.approx(1.0) and csv_rows[2]["converged"] == "False"


def test_too_few_points_do_not_assess_convergence(tmp_path):
    """The last snapshot and the end (the default window of 2) give no slope interval: not assessed, with
    one replicate as with three."""
    rows = [{"setting": "s", "label": "Student", "model": "a", "sampler": "1-step", "role": "student",
             "replicates": ["a"], "window": [["a@400"]]}]
    out = write_table("T", rows, write_metrics(tmp_path, [metric("a", "1-step", 20.0, 0.1, 600),
                                                          metric("a@400", "1-step", 25.0, 0.1, 400)]),
                      tmp_path / "t.csv", tmp_path / "t.md")
    assert out[0]["quality_sd"] is None and out[0]["converged"] is None
    cell = table_cells((tmp_path / "t.md").read_text())[0]
    assert cell["digits-FD"] == "20.00"
    assert cell["Converged"] == "n/a: 2 points per replicate (steps 400 and the end), 4 needed: raise convergence.window"


def test_too_few_metric_files_for_the_replicates_is_an_error(tmp_path):
    rows = [{"model": "a", "sampler": "s", "replicates": ["a", "a.r1"], "window": []}]
    with pytest.raises(ValueError, match="1 metrics files for 2"):
        write_table("T", rows, write_metrics(tmp_path, [metric("a", "s", 1.0, 0.0)]), tmp_path / "t.csv",
                    tmp_path / "t.md")


def test_aggregate_skips_missing_group_values_and_keeps_descriptions():
    out = aggregate([{"label": "x", "nfe": 1, "mem_g": 0.2, "q": 1.0}, {"label": "x", "nfe": 1, "mem_g": None, "q": 3.0}])
    assert out["mem_g"] == 0.2 and out["mem_g_sd"] is None and out["q"] == 2.0
    assert out["q_sd"] == pytest.approx(np.std([1.0, 3.0], ddof=1)) and out["nfe"] == 1 and "nfe_sd" not in out


def test_replay_replicates_draw_afresh_and_held_out_yardsticks_have_none_at_the_default_reserve():
    from pipeline.data import Subset
    from pipeline.yardsticks import yardstick_rows

    subset = Subset(images=np.zeros((6, 2, 2, 1), np.uint8), labels=np.arange(6), index=np.arange(6),
                    repeat=np.full(6, 2, np.int64), group=np.array(["all"] * 6))
    reserve = np.arange(100, 140)
    draws = [yardstick_rows("replay", subset, reserve, 30, seed=0, replicate=r)[1] for r in range(3)]
    assert all(len(d) == 30 and set(d) <= set(range(6)) for d in draws)
    assert not np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[1], draws[2])
    assert np.array_equal(draws[0], yardstick_rows("replay", subset, reserve, 30, seed=0)[1])  # replicate 0 as before
    for kind in ("real", "blur", "train"):  # a reserve of exactly the set's size: one fixed set each
        with pytest.raises(ValueError, match="no replicates"):
            yardstick_rows(kind, subset, reserve[:30], 30, seed=0, replicate=1)
    with pytest.raises(ValueError, match="no replicates"):  # a larger one resamples real and blur, never train
        yardstick_rows("train", subset, reserve, 30, seed=0, replicate=1)


def test_evidence_config_regimes_share_every_budget_and_differ_in_data_net_and_precision():
    """config/embedded-evidence.yaml: the severe regime (unet-tiny, 48 digits, fp32) and the moderate one
    (unet-wide, 160 digits, bf16 autocast) train and distil with the same budgets and protocol."""
    cfg = pconfig.load(ROOT / "config" / "embedded-evidence.yaml")
    severe, moderate = cfg["teachers"]["teacher-48"], cfg["teachers"]["teacher-160"]
    assert (severe["net"], moderate["net"]) == ("unet-tiny", "unet-wide")
    assert cfg["nets"]["unet-wide"]["block_out_channels"] == [32, 64] and cfg["subsets"]["digits-160"]["n"] == 160
    assert "mixed_precision" not in severe["compute"] and moderate["compute"]["mixed_precision"] == "bf16"

    def protocol(entry):
        return {k: v for k, v in entry.items() if k not in ("net", "subset", "teacher", "compute")}

    assert protocol(severe) == protocol(moderate)
    assert protocol(cfg["students"]["cd-48"]) == protocol(cfg["students"]["cd-160"])
    assert cfg["students"]["cd-48"]["train"]["steps"] == 2000 and cfg["students"]["cd-48"]["snapshots"] == [500, 1000, 1500]
    assert cfg["students"]["cd-160"]["compute"]["mixed_precision"] == "bf16" and cfg["replicates"] == 3
