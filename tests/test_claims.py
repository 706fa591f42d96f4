"""The replication report: verdicts computed from planted metric files, and config/claims.yaml itself
(valid, at least 25 claims of the main study, every measure naming outputs some shipped config plans)."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import claims
from pipeline import config as pconfig
from pipeline.stats import DISAGREES, INCONCLUSIVE, NOT_MEASURED, REPRODUCED

ROOT = Path(__file__).resolve().parents[1]
CLAIMS = ROOT / "config" / "claims.yaml"

# Layered configs as the README runs them (each later file updates the earlier ones, as Snakemake does).
SHIPPED = [["embedded.yaml"], ["embedded-evidence.yaml"], ["config.yaml"],
           ["embedded-evidence.yaml", "embedded-quality.yaml"], ["embedded.yaml", "embedded-baselines.yaml"],
           ["embedded.yaml", "embedded-grid.yaml"], ["embedded.yaml", "embedded-edge.yaml"],
           ["embedded.yaml", "embedded-pairing.yaml"], ["embedded.yaml", "embedded-text2image.yaml"]]


def layered(names, **overrides) -> dict:
    from snakemake.common.configfile import load_configfile
    from snakemake.utils import update_config

    cfg: dict = {}
    for name in names:
        update_config(cfg, load_configfile(str(ROOT / "config" / name)))
    cfg.update(overrides)
    return pconfig.validate(cfg)


def claim(id_, measures, kind="direction", needs="the paper grid"):
    return {"id": id_, "study": "001", "where": "Table 1", "statement": id_, "paper": "", "kind": kind,
            "reading": "", "measures": measures, "needs": needs}


def metric(model, sampler, fid, mem):
    return {"model": model, "sampler": sampler, "nfe": 1, "num_samples": 100,
            "quality": {"name": "digits-FD", "value": fid, "reference": "digits"},
            "memorization": {"space": "pixels", "mem_ratio": mem, "ratio_median": 0.8, "ratio_p05": 0.3,
                             "n_samples": 100, "by_group": {"all": {"mem_ratio": mem}}}}


# Planted replicates (digits-FD, L2 Mem) of the embedded default's demo table, three replicates each:
# 48 digits: the student copies far less (a reproduction) and is worse by about 5 (a disagreement with
# "better"); 96 digits: copying differs by -1, +... (an interval holding 0) and quality is equal within 2.
PLANTED = {
    ("teacher-48", "heun-18"): [(50.0, 0.30), (52.0, 0.26), (49.0, 0.34)],
    ("cd-48", "1-step"): [(55.0, 0.01), (57.9, 0.0), (53.6, 0.02)],
    ("teacher-96", "heun-18"): [(50.0, 0.05), (50.0, 0.04), (50.0, 0.06)],
    ("cd-96", "1-step"): [(50.5, 0.06), (49.8, 0.03), (50.2, 0.05)],
}


def plant(root: Path, replicates: int) -> None:
    from pipeline.replicates import replicate_id

    for (model, sampler), values in PLANTED.items():
        for r, (fid, mem) in enumerate(values[:replicates]):
            path = root / "results" / "metrics" / replicate_id(model, r) / f"{sampler}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(metric(replicate_id(model, r), sampler, fid, mem)))


def verdicts(tmp_path, entries, replicates=3):
    cfg = layered(["embedded.yaml"], replicates=replicates)
    plant(tmp_path, replicates)
    rows = claims.evaluate(claims.plan(entries, cfg, "embedded.yaml"), tmp_path)
    return {r["id"]: r for r in rows}


def test_verdicts_from_planted_metric_files(tmp_path):
    demo = lambda setting, **m: {"table": "demo", "rows": {"setting": setting, "label": "Student"}, "against": "teacher", **m}
    got = verdicts(tmp_path, [
        claim("001-reproduced", [demo("48 digits", metric="mem", expect="less")]),
        claim("001-disagrees", [demo("48 digits", metric="quality", expect="less")]),
        claim("001-holds-zero", [demo("96 digits", metric="mem", expect="less")]),
        claim("001-equal-inside", [demo("96 digits", metric="quality", expect="equal", tolerance=2.0)], kind="equality"),
        claim("001-equal-straddles", [demo("96 digits", metric="quality", expect="equal", tolerance=0.1)], kind="equality"),
        claim("001-equal-outside", [demo("48 digits", metric="quality", expect="equal", tolerance=1.0)], kind="equality"),
        claim("001-equal-relative", [demo("96 digits", metric="quality", expect="equal", relative_tolerance=0.05)],
              kind="equality"),
        claim("001-pattern", [{"table": "demo", "rows": {"label": "Student"}, "against": "teacher", "metric": "mem",
                               "expect": "less"}]),
        claim("001-pattern-broken", [{"table": "demo", "rows": {"label": "Student"}, "against": "teacher",
                                      "metric": "quality", "expect": "less"}]),
        claim("001-missing", [{"table": "table1", "rows": {"label": "Student"}, "against": "teacher", "metric": "mem",
                               "expect": "less"}], needs="the paper config's table1 on a GPU cluster"),
    ])
    assert got["001-reproduced"]["verdict"] == REPRODUCED and got["001-reproduced"]["scale"] == "digits miniature"
    assert "-29.00 [-36.45, -21.55] points (n = 3)" in got["001-reproduced"]["ours"]
    assert got["001-disagrees"]["verdict"] == DISAGREES and "+5.17" in got["001-disagrees"]["ours"]
    assert got["001-holds-zero"]["verdict"] == INCONCLUSIVE
    assert got["001-holds-zero"]["why"] == "interval holds 0; leans toward the claim"  # -0.33 points on average
    assert got["001-equal-inside"]["verdict"] == REPRODUCED
    assert got["001-equal-straddles"]["verdict"] == INCONCLUSIVE
    assert got["001-equal-outside"]["verdict"] == DISAGREES
    assert got["001-equal-relative"]["verdict"] == REPRODUCED  # 5% of the teacher's 50: within 2.5
    assert got["001-pattern"]["verdict"] == INCONCLUSIVE and got["001-pattern"]["why"].startswith("1 of 2")
    assert got["001-pattern-broken"]["verdict"] == DISAGREES and got["001-pattern-broken"]["why"] == "1 of 2 comparisons disagree"
    assert got["001-missing"]["verdict"] == NOT_MEASURED and got["001-missing"]["needs"].startswith("the paper config")


def test_one_replicate_is_inconclusive_and_says_which_way_it_leans(tmp_path):
    got = verdicts(tmp_path, [claim("001-one", [{"table": "demo", "rows": {"setting": "48 digits", "label": "Student"},
                                                 "against": "teacher", "metric": "mem", "expect": "less"}])], replicates=1)
    assert got["001-one"]["verdict"] == INCONCLUSIVE
    assert got["001-one"]["why"] == "not resolved (1 replicate); leans toward the claim"


def test_a_lab_value_against_its_threshold_and_the_written_report(tmp_path):
    analysis = tmp_path / "results" / "theory" / "analysis"
    analysis.mkdir(parents=True)
    for seed, share in enumerate((0.97, 0.95, 0.96)):
        np.savez(analysis / f"seed-{seed}.npz", simulated_gen_share=np.float64(share))
    entry = claim("001-nearly-all", [{"requires": "theory", "files": "results/theory/analysis/seed-{seed}.npz",
                                      "key": "simulated_gen_share", "expect": "more", "threshold": 0.9,
                                      "scale": "random features, d = {theory[d]}"}], kind="value")
    missing = claim("001-not-here", [{"table": "table3", "rows": {"label": "LCM"}, "against": "teacher",
                                      "metric": "sscd_mem", "expect": "less"}], needs="Stable Diffusion 1.5 (a download)")
    cfg = layered(["embedded.yaml"])
    plan = claims.plan([entry, missing], cfg, "embedded.yaml")
    assert claims.planned_files(plan) == [f"results/theory/analysis/seed-{s}.npz" for s in (0, 1, 2)]
    rows = claims.evaluate(plan, tmp_path)
    assert rows[0]["verdict"] == REPRODUCED and rows[0]["scale"] == "random features, d = 40"
    (tmp_path / "out").mkdir()
    json_plan = tmp_path / "plan.json"
    json_plan.write_text(json.dumps({"config": "embedded.yaml", "claims": plan}))
    claims.run(json_plan, tmp_path / "out", tmp_path)
    md = (tmp_path / "out" / "claims.md").read_text()
    assert md.splitlines()[2] == ("Verdicts per scale: random features, d = 40: 1 REPRODUCED; "
                                  "not measured: 1 NOT MEASURED.")
    assert "REPRODUCED (random features, d = 40)" in md and "NOT MEASURED: needs Stable Diffusion 1.5" in md
    csv_text = (tmp_path / "out" / "claims.csv").read_text()
    assert csv_text.splitlines()[0].startswith("id,study,where,statement")
    assert "<table>" in (tmp_path / "out" / "claims.html").read_text()


def test_claims_file_is_checked_against_its_schema(tmp_path):
    good = {"claims": [claim("001-x", [])]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(good))
    assert claims.load(path)[0]["id"] == "001-x"
    for broken, why in ((dict(good["claims"][0], verdict=REPRODUCED), "verdict"),  # a typed verdict is refused
                        (dict(good["claims"][0], id="x"), "id"),
                        (dict(good["claims"][0], kind="maybe"), "kind")):
        path.write_text(yaml.safe_dump({"claims": [broken]}))
        with pytest.raises(ValueError, match=why):
            claims.load(path)
    path.write_text(yaml.safe_dump({"claims": [good["claims"][0], good["claims"][0]]}))
    with pytest.raises(ValueError, match="used twice"):
        claims.load(path)


@pytest.fixture(scope="module")
def shipped():
    return claims.load(CLAIMS), {" + ".join(names): layered(names) for names in SHIPPED}


def test_shipped_claims_cover_the_study_and_its_neighbours(shipped):
    entries, _ = shipped
    by_study = {s: [c for c in entries if c["study"] == s] for s in ("001", "003", "004")}
    assert len(by_study["001"]) >= 25 and len(by_study["003"]) >= 3 and len(by_study["004"]) >= 3
    for c in entries:
        if c["kind"] == "equality":
            assert all(m.get("tolerance") is not None or m.get("relative_tolerance") is not None for m in c["measures"]), c["id"]
            assert c["reading"], f"{c['id']}: a claim of equality says how the project reads it"


def test_every_measure_names_outputs_some_shipped_config_plans(shipped):
    """A table measure must match rows of its table in at least one shipped config; a lab measure must
    name a section some config has and files its rules write. Claims without a measure say what they need."""
    entries, configs = shipped
    for c in entries:
        for i, m in enumerate(c["measures"]):
            found = []
            for name, cfg in configs.items():
                one = copy.deepcopy(c)
                one["measures"] = [m]
                if claims.plan([one], cfg, name)[0]["planned"]:
                    found.append(name)
            assert found, f"{c['id']} measure {i} ({m.get('table') or m.get('files')}) matches no shipped config"
        if not c["measures"]:
            assert len(c["needs"]) > 10, c["id"]


def test_one_output_against_another_replicate_by_replicate(tmp_path):
    """A lab measure may set replicate r of one output against replicate r of another ({r}: '', '.r1', ...)."""
    for suffix, (student, unrelated) in zip(("", ".r1", ".r2"), ((0.14, 0.55), (0.14, 0.56), (0.15, 0.54))):
        for model, ratio in (("dmd", student), ("unrelated", unrelated)):
            path = tmp_path / "results" / "pairing" / f"t{suffix}" / f"{model}{suffix}" / "dmd-1.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps({"pairing_ratio": ratio}))
    entry = claim("004-pairs-like-its-teacher", [{"requires": "theory", "files": "results/pairing/t{r}/dmd{r}/dmd-1.json",
                                                  "against": "results/pairing/t{r}/unrelated{r}/dmd-1.json",
                                                  "key": "pairing_ratio", "expect": "less", "scale": "digits miniature"}])
    plan = claims.plan([entry], layered(["embedded.yaml"], replicates=3), "embedded.yaml")
    assert plan[0]["planned"][0]["files"][1] == "results/pairing/t.r1/dmd.r1/dmd-1.json"
    (row,) = claims.evaluate(plan, tmp_path)
    assert row["verdict"] == REPRODUCED and "-0.41" in row["ours"], row


def test_a_lab_measure_applies_only_where_the_config_holds_what_it_requires(tmp_path):
    """`requires` paths (a list step `key=value` picks an element): a measure on an edge case or a pairing
    row another config lacks is not planned there; `against_key` reads two scalars of one file, seed by seed."""
    lab = tmp_path / "results" / "edge" / "lab" / "gaussian"
    lab.mkdir(parents=True)
    for seed, (transition, crossover) in enumerate(((0.80, 0.81), (0.80, 0.805))):  # the default's seeds: 0, 1
        np.savez(lab / f"seed-{seed}.npz", measured_transition=np.float64(transition), mc_crossover=np.float64(crossover))
    edge = {"requires": "edge.cases.gaussian", "files": "results/edge/lab/gaussian/seed-{seed}.npz",
            "key": "measured_transition", "against_key": "mc_crossover", "expect": "equal", "tolerance": 0.05,
            "scale": "edge lab, n = {edge[cases][gaussian][n]}"}
    pair = {"requires": ["pairing.rows.model=dmd-48"], "files": "results/pairing/t{r}/dmd-48{r}/dmd-1.json",
            "threshold": 0.5, "key": "pairing_ratio", "expect": "less", "scale": "digits"}
    entries = [claim("003-transition", [edge], kind="equality"), claim("004-pairs", [pair])]
    cfg = layered(["embedded.yaml"])
    plan = {c["id"]: c for c in claims.plan(entries, cfg, "embedded.yaml")}
    assert plan["003-transition"]["planned"] and not plan["004-pairs"]["planned"]  # no pairing rows in the default
    assert not claims.plan(entries, layered(["config.yaml"]), "config.yaml")[0]["planned"]  # other edge cases there
    assert claims.plan(entries, layered(["embedded.yaml", "embedded-pairing.yaml"]), "")[1]["planned"]
    (row, _) = claims.evaluate(list(plan.values()), tmp_path)
    assert row["verdict"] == REPRODUCED and row["scale"] == "edge lab, n = 60", row
    assert "measured_transition - mc_crossover: -0.0075" in row["ours"] and "(n = 2)" in row["ours"]


def test_readme_states_the_rules_and_every_reading_the_claims_use(shipped):
    """The verdict rules are written once in README (the text the report prints), and README's list of
    readings names every threshold and tolerance config/claims.yaml uses."""
    import re

    readme = " ".join((ROOT / "README.md").read_text().split())
    assert " ".join(claims.RULES.split()) in readme
    start = readme.index("Readings of judgement words")
    readings = readme[start:readme.index("## ", start)]
    entries, _ = shipped
    values = {m[k] for c in entries for m in c["measures"] for k in ("tolerance", "relative_tolerance", "threshold") if k in m}
    for v in sorted(values):
        assert re.search(rf"(?<![\d.]){re.escape(f'{v:g}' if v != int(v) else f'{v:.1f}')}(?!\d)", readings), v


def test_a_fixed_yardstick_is_a_constant_and_undefined_values_do_not_crash(tmp_path):
    """Three replicates against the one fixed held-out set: the set's value is a constant, the interval is the
    replicates' own; a NaN (no crossover in the lab's grid) leaves a lab measure INCONCLUSIVE, or DISAGREES
    where the measure says so; a row the config's table lacks is not compared (never an error at DAG time)."""
    from pipeline.replicates import replicate_id

    cfg = layered(["embedded.yaml"], replicates=3)
    for r, mem in enumerate((0.30, 0.26, 0.34)):
        path = tmp_path / "results" / "metrics" / replicate_id("teacher-48", r) / "heun-18.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metric(replicate_id("teacher-48", r), "heun-18", 50.0, mem)))
    real = tmp_path / "results" / "metrics" / "real~digits-48" / "data.json"
    real.parent.mkdir(parents=True)
    real.write_text(json.dumps(metric("real~digits-48", "data", 7.0, 0.0)))
    versus_real = {"table": "demo", "rows": {"setting": "48 digits", "label": "Teacher"}, "against": {"label": "Real held-out"},
                   "metric": "mem", "expect": "more"}
    missing_row = dict(versus_real, against={"label": "no such row"})
    lab = tmp_path / "results" / "theory" / "analysis"
    lab.mkdir(parents=True)
    for seed, share in enumerate((0.97, float("nan"), 0.96)):
        np.savez(lab / f"seed-{seed}.npz", simulated_gen_share=np.float64(share))
    nan = {"requires": "theory", "files": "results/theory/analysis/seed-{seed}.npz", "key": "simulated_gen_share",
           "expect": "more", "threshold": 0.9, "scale": "theory"}
    entries = [claim("001-vs-real", [versus_real]), claim("001-no-row", [missing_row]), claim("001-nan", [nan], kind="value"),
               claim("001-nan-disagrees", [dict(nan, undefined="disagrees")], kind="value")]
    plan = claims.plan(entries, cfg, "embedded.yaml")
    assert plan[0]["planned"][0]["comparisons"][0]["second"] == ["results/metrics/real~digits-48/data.json"]
    assert not plan[1]["planned"]
    got = {r["id"]: r for r in claims.evaluate(plan, tmp_path)}
    assert got["001-vs-real"]["verdict"] == REPRODUCED and "+30.00 [+20.06, +39.94] points (n = 3)" in got["001-vs-real"]["ours"]
    assert got["001-no-row"]["verdict"] == NOT_MEASURED
    assert got["001-nan"]["verdict"] == INCONCLUSIVE and "undefined" in got["001-nan"]["why"]
    assert got["001-nan-disagrees"]["verdict"] == DISAGREES


def test_rows_with_different_replicate_counts_get_welchs_interval():
    from pipeline.claims import _welch

    got = _welch([1.0, 2.0, 3.0, 4.0], [0.5, 0.7, 2.9])
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 0.7, 2.9])
    va, vb = a.var(ddof=1) / 4, b.var(ddof=1) / 3
    from scipy.stats import t

    half = t.ppf(0.975, (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)) * np.sqrt(va + vb)
    assert got.mean == pytest.approx(a.mean() - b.mean()) and got.n == 3
    assert (got.low, got.high) == pytest.approx((got.mean - half, got.mean + half))
