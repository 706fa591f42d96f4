"""Aggregation: known metric files in, each number in its own cell of the table out, published
values beside the rows they belong to."""
from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import config as pconfig
from pipeline.tables import write_table

ROOT = Path(__file__).resolve().parents[1]


def metric(model, sampler, nfe, fid, mem, by_group, sscd=None, n=50000):
    m = {"model": model, "sampler": sampler, "nfe": nfe, "num_samples": n,
         "quality": {"name": "FID", "value": fid, "reference": "the full cifar10 dataset (50000 images)"},
         "memorization": {"space": "pixels", "mem_ratio": mem, "ratio_median": 0.5 + mem, "ratio_p05": 0.1,
                          "n_samples": n, "by_group": {g: {"mem_ratio": v} for g, v in by_group.items()}}}
    if sscd:
        m["sscd"] = {"mem_ratio": sscd[0], "p95": sscd[1], "mean": 0.3, "max": 0.99, "threshold": 0.5,
                     "by_group": {g: {"mem_ratio": v / 2, "p95": sscd[1] / 2} for g, v in by_group.items()}}
    return m


def metric_files(tmp_path, metrics, prefix="m") -> list[Path]:
    """Each metrics dict written to its own JSON file, in order."""
    paths = [tmp_path / f"{prefix}{i}.json" for i in range(len(metrics))]
    for path, m in zip(paths, metrics):
        path.write_text(json.dumps(m))
    return paths


@pytest.fixture
def built(tmp_path):
    published = yaml.safe_load((ROOT / "config" / "published.yaml").read_text())
    paper = pconfig.published_table(published, "table1")
    rows_cfg = [{"setting": "3000-data", "label": "Teacher", "model": "teacher-3000", "sampler": "heun-18",
                 "subset": "c3000"},
                {"setting": "3000-data", "label": "Student", "model": "cd-3000", "sampler": "1-step", "subset": "c3000"},
                {"setting": "c3000", "label": "Real held-out", "model": "real~c3000", "sampler": "data",
                 "subset": "c3000"}]
    metrics = [metric("teacher-3000", "heun-18", 35, 21.1, 0.0512, {"a": 0.06, "b": 0.04}, (0.2101, 0.81234)),
               metric("cd-3000", "1-step", 1, 19.9, 0.0003, {"a": 0.0004, "b": 0.0002}, (0.0301, 0.55557), n=2000),
               metric("real~c3000", "data", 0, 2.5, 0.0, {"a": 0.0}, (0.001, 0.4), n=2000)]
    paths = metric_files(tmp_path, metrics)
    write_table("Table 1", rows_cfg, paths, tmp_path / "t.csv", tmp_path / "t.md", paper, tmp_path / "t.html")
    md = (tmp_path / "t.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    return head, cells, rows, md


def test_html_page_holds_the_same_cells_and_notes(built, tmp_path):
    """The report's page of a table: the Markdown's cells, row by row, and every note's text."""
    from html.parser import HTMLParser

    head, cells, _, md = built

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.text, self.inside = [], [], None

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.rows.append([])
            elif tag in ("td", "th"):
                self.inside = ""

        def handle_endtag(self, tag):
            if tag in ("td", "th"):
                self.rows[-1].append(self.inside)
                self.inside = None

        def handle_data(self, data):
            if self.inside is not None:
                self.inside += data
            else:
                self.text.append(data)

    page = Cells()
    page.feed((tmp_path / "t.html").read_text())
    assert page.rows[0] == head
    assert [dict(zip(head, r)) for r in page.rows[1:]] == cells
    text = " ".join(" ".join(page.text).split())
    for note in (line for line in md.splitlines() if line and not line.startswith(("|", "#"))):
        assert " ".join(note.removeprefix("- ").replace("`", "").split()) in text, note


def test_every_metric_lands_in_its_cell(built):
    head, cells, rows, _ = built
    assert head == ["Setting", "Model", "Sampler", "NFE", "FID", "L2 Mem", "L2 Mem (a)", "L2 Mem (b)", "median d1/d2",
                    "SSCD Mem / p95", "SSCD Mem / p95 (a)", "SSCD Mem / p95 (b)", "Paper FID", "Paper Mem", "Paper SSCD Mem / p95", "Protocol"]
    teacher, student, real = cells
    assert (teacher["Model"], teacher["Sampler"], teacher["NFE"], teacher["FID"]) == ("Teacher", "heun-18", "35", "21.10")
    assert (teacher["L2 Mem"], teacher["L2 Mem (a)"], teacher["L2 Mem (b)"]) == ("5.12%", "6.00%", "4.00%")
    assert teacher["median d1/d2"] == "0.551" and teacher["SSCD Mem / p95"] == "21.01% / 0.8123"
    assert teacher["SSCD Mem / p95 (a)"] == "3.00% / 0.4062" and teacher["SSCD Mem / p95 (b)"] == "2.00% / 0.4062"
    assert (student["FID"], student["L2 Mem"], student["L2 Mem (a)"]) == ("19.90", "0.03%", "0.04%")
    assert student["SSCD Mem / p95"] == "3.01% / 0.5556"
    # a yardstick has no sampler, and no value for a group it never matched
    assert (real["Sampler"], real["NFE"], real["L2 Mem (b)"], real["SSCD Mem / p95 (b)"]) == ("-", "-", "", "")
    assert rows[0]["sscd_p95"] == "0.81234" and rows[1]["mem_a"] == "0.0004"


def test_published_values_stand_beside_their_rows_with_the_protocol(built):
    _, cells, rows, md = built
    teacher, student, real = cells
    assert (teacher["Paper FID"], teacher["Paper Mem"], teacher["Paper SSCD Mem / p95"]) == ("21.78", "4.88%",
                                                                                          "21.68% / 0.8164")
    assert (student["Paper FID"], student["Paper Mem"]) == ("20.82", "0.01%")
    assert real["Paper FID"] == "" and real["Paper Mem"] == ""
    assert teacher["Protocol"] == "full" and student["Protocol"] == "reduced (2000 samples)"
    assert rows[0]["paper_FID"] == "21.78"
    assert "Table 1 (CIFAR-10" in md and "On the Memorization of Consistency Distillation" in md


def test_published_values_are_checked_against_the_tables():
    cfg = pconfig.load(ROOT / "config" / "config.yaml")
    published = pconfig.load_published(cfg, root=ROOT)
    assert set(published["tables"]) >= {"table1", "table2", "table3", "table4", "table6", "table7"}
    for entry in published["tables"].values():
        assert all(len(v) == len(entry["columns"]) for v in entry["rows"].values())
        assert all(isinstance(c, str) for v in entry["rows"].values() for c in v)  # as printed, never re-rounded
    bad = copy.deepcopy(cfg)
    bad["tables"]["table1"]["rows"][0]["setting"] = "3000 data"
    with pytest.raises(pconfig.ConfigError, match="no row '3000 data / Teacher'"):
        pconfig.load_published(bad, root=ROOT)
    bad = copy.deepcopy(cfg)
    bad["tables"]["table1"]["paper"] = "table9"
    with pytest.raises(pconfig.ConfigError, match="'table9' is not an entry"):
        pconfig.load_published(bad, root=ROOT)
    bad = copy.deepcopy(cfg)
    del bad["published"]
    with pytest.raises(pconfig.ConfigError, match="`published` names no file"):
        pconfig.load_published(bad, root=ROOT)
    assert pconfig.load_published(pconfig.load(ROOT / "config" / "embedded.yaml"), root=ROOT) is None


def test_curve_figure_draws_students_along_training(tmp_path):
    """Figure 1 from a table's CSV: one panel per training subset, students at their steps."""
    from PIL import Image

    from pipeline.figures import curve_figure

    rows_cfg, paths = [], []
    for subset in ("c3000", "c4000"):
        entries = [("teacher-" + subset, "heun-18", 35, 20.0, 0.05, "teacher", 500000)]
        entries += [(f"cd-{subset}@{k}", "1-step", 1, 30.0 - k / 1e5, k / 1e7, "student", k) for k in (100000, 200000)]
        entries += [(f"real~{subset}", "data", 0, 2.0, 0.0, "yardstick", None)]
        for model, sampler, nfe, fid, mem, role, step in entries:
            m = metric(model, sampler, nfe, fid, mem, {"a": mem})
            m["training"] = {"step": step} if role == "student" else {"steps": step}
            paths.append(tmp_path / f"m{len(paths)}.json")
            paths[-1].write_text(json.dumps(m))
            rows_cfg.append({"setting": subset, "label": role, "model": model, "sampler": sampler, "subset": subset,
                             "role": role})
    rows = write_table("fig", rows_cfg, paths, tmp_path / "t.csv", tmp_path / "t.md")
    assert [r["step"] for r in rows[:4]] == [500000, 100000, 200000, None]
    curve_figure(tmp_path / "t.csv", tmp_path / "fig.png")
    with Image.open(tmp_path / "fig.png") as im:
        assert im.size[0] > 1.6 * im.size[1]  # two panels side by side
        colours = np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)
        assert len(colours) > 20  # drawn, not blank
    only_teachers = tmp_path / "teachers.csv"
    with open(tmp_path / "t.csv") as f:
        kept = [line for i, line in enumerate(f) if i == 0 or ",student," not in line]
    only_teachers.write_text("".join(kept))
    with pytest.raises(ValueError, match="no student rows"):
        curve_figure(only_teachers, tmp_path / "none.png")


def test_curve_figure_adds_each_student_against_its_own_teacher(tmp_path, monkeypatch):
    """Where the table pairs students with their teachers (three replicates), a second row of panels
    draws student minus teacher against the step with the 95% interval: the values drawn are the
    table's paired differences."""
    from PIL import Image

    from pipeline import figures

    rows_cfg = [{"setting": "s", "label": "teacher", "model": "t", "sampler": "heun-18", "role": "teacher",
                 "replicates": ["t", "t.r1", "t.r2"]}]
    metrics = [dict(metric(f"t{r}", "heun-18", 35, q, 0.3, {"a": 0.3}), training={"steps": 900})
               for r, q in enumerate((50.0, 52.0, 49.0))]
    for k, shift in ((300, 9.0), (600, 3.0), (900, -2.0)):
        model = f"cd@{k}" if k < 900 else "cd"
        rows_cfg.append({"setting": "s", "label": "student", "model": model, "sampler": "1-step", "role": "student",
                         "teacher_row": 0, "replicates": [model.replace("cd", f"cd{r}") for r in ("", ".r1", ".r2")]})
        metrics += [dict(metric(f"cd{r}@{k}", "1-step", 1, q + shift + e, 0.0, {"a": 0.0}), training={"step": k})
                    for r, q, e in zip(("", ".r1", ".r2"), (50.0, 52.0, 49.0), (0.3, -0.2, 0.1))]
    write_table("fig", rows_cfg, metric_files(tmp_path, metrics), tmp_path / "t.csv", tmp_path / "t.md")
    drawn = []
    real = figures._versus_teacher_panel
    monkeypatch.setattr(figures, "_versus_teacher_panel",
                        lambda ax, students, q: (drawn.append(students), real(ax, students, q))[1])
    figures.curve_figure(tmp_path / "t.csv", tmp_path / "fig.png")
    means = [float(r["vs_teacher_quality"]) for r in drawn[0]]
    assert means == pytest.approx([9.0 + 0.2 / 3, 3.0 + 0.2 / 3, -2.0 + 0.2 / 3])
    assert all(float(r["vs_teacher_quality_low"]) < m < float(r["vs_teacher_quality_high"]) for r, m in zip(drawn[0], means))
    with Image.open(tmp_path / "fig.png") as im:
        assert im.size[1] > 1.3 * im.size[0]  # one setting: two panels, one above the other


def test_class_conditional_rows_group_by_the_class_they_were_generated_for(tmp_path):
    """Table 4 on ImageNet: a class-conditional row's per-group cells come from `by_class_group`, an
    unconditional row's from `by_group`; the note says which."""
    def with_classes(m, by_class):
        m["memorization"]["by_class_group"] = {g: {"mem_ratio": v} for g, v in by_class.items()}
        m["sscd"]["by_class_group"] = {g: {"mem_ratio": v, "p95": 0.5} for g, v in by_class.items()}
        return m

    rows_cfg = [{"setting": "CIFAR-10", "label": "Teacher", "model": "t-c", "sampler": "heun-18", "group_by": "neighbour"},
                {"setting": "ImageNet", "label": "Teacher", "model": "t-i", "sampler": "heun-40", "group_by": "class"}]
    metrics = [with_classes(metric("t-c", "heun-18", 35, 12.0, 0.14, {"repeated": 0.74, "non_repeated": 0.0}, (0.1, 0.8)),
                            {"repeated": 0.99, "non_repeated": 0.99}),
               with_classes(metric("t-i", "heun-40", 79, 25.0, 0.0037, {"repeated": 0.5, "non_repeated": 0.5}, (0.0037, 0.25)),
                            {"repeated": 0.0735, "non_repeated": 0.0})]
    paths = metric_files(tmp_path, metrics)
    rows = write_table("Table 4", rows_cfg, paths, tmp_path / "t.csv", tmp_path / "t.md")
    assert (rows[0]["mem_repeated"], rows[0]["mem_non_repeated"]) == (0.74, 0.0)
    assert (rows[1]["mem_repeated"], rows[1]["mem_non_repeated"]) == (0.0735, 0.0)
    assert rows[1]["sscd_mem_repeated"] == 0.0735 and rows[0]["sscd_mem_repeated"] == 0.37
    md = (tmp_path / "t.md").read_text()
    assert "for class-conditional models and their yardsticks, the group of the class each sample was generated for" in md
    del metrics[1]["memorization"]["by_class_group"]
    paths[1].write_text(json.dumps(metrics[1]))
    with pytest.raises(ValueError, match="by_class_group"):
        write_table("Table 4", rows_cfg, paths, tmp_path / "t.csv", tmp_path / "t.md")


def test_rows_below_the_blur_yardstick_or_the_prompt_floor_are_not_evidence(tmp_path):
    """A text-to-image row whose samples score worse than blurred real images, or rarely show the digit
    their prompt names, is listed as not evidence yet; a row that passes both is not."""
    def m(model, nfe, fd, prompt_class=None):
        out = metric(model, "s" if nfe else "data", nfe, fd, 0.1, {"memorized": 0.1})
        if prompt_class is not None:
            out["prompt_class"] = {"value": prompt_class}
        return out

    rows_cfg = [{"setting": "3x", "label": "Teacher", "model": "t", "sampler": "s", "subset": "x"},
                {"setting": "3x", "label": "Student", "model": "u", "sampler": "s", "subset": "x"},
                {"setting": "x", "label": "Blur", "model": "blur~x", "sampler": "data", "subset": "x"}]
    metrics = [m("t", 50, 500.0, 0.95), m("u", 4, 100.0, 0.5), m("blur~x", 0, 200.0, 0.99)]
    paths = metric_files(tmp_path, metrics)
    write_table("T", rows_cfg, paths, tmp_path / "t.csv", tmp_path / "t.md")
    md = (tmp_path / "t.md").read_text()
    assert "Not evidence yet" in md
    assert "- 3x Teacher (s): FID 500.00, blurred real images 200.00." in md
    assert "- 3x Student (s): prompt digit 50.00%." in md


def test_l2_note_states_the_ratio_the_metrics_were_judged_with(tmp_path):
    """The criterion's ratio has one home (memorization.DEFAULT_RATIO); the search records the one it used
    and the table's note reads it from there, so a configured ratio is not described as a third."""
    paths = []
    for k, ratio in enumerate((0.5, 0.5)):
        m = metric(f"m{k}", "heun-18", 35, 20.0, 0.1, {"a": 0.1})
        m["memorization"]["criterion_ratio"] = ratio
        paths.append(tmp_path / f"m{k}.json")
        paths[-1].write_text(json.dumps(m))
    write_table("t", [{"label": "a"}, {"label": "b"}], paths, tmp_path / "t.csv", tmp_path / "t.md")
    assert "closer than 0.5 times the second nearest" in (tmp_path / "t.md").read_text()
    m = json.loads(paths[1].read_text())
    m["memorization"]["criterion_ratio"] = 0.25
    paths[1].write_text(json.dumps(m))
    with pytest.raises(ValueError, match="different ratios"):
        write_table("t", [{"label": "a"}, {"label": "b"}], paths, tmp_path / "t2.csv", tmp_path / "t2.md")


def test_a_selected_teacher_prints_its_target_beside_the_rate_it_reached(tmp_path):
    """App. A's "10% teacher" is whatever model of the run lay nearest 10%: its row says which and what
    it copies, and the table says when no model came within a factor of 1.5 of the target."""
    def selected(model, target, reached, chosen, close):
        m = metric(model, "heun-18", 35, 22.0, reached, {"a": reached})
        m["training"] = {"steps": 400, "selection": {"model": chosen, "threshold": target, "mem_ratio": reached,
                                                     "within_factor": 1.5 if close else None, "candidates": []}}
        return m

    rows_cfg = [{"setting": "PD", "label": "Teacher", "model": "teacher-mem10", "sampler": "heun-18"},
                {"setting": "DMD", "label": "Teacher", "model": "teacher-mem30", "sampler": "heun-18"},
                {"setting": "DMD", "label": "DMD", "model": "dmd-mem30", "sampler": "dmd-1"}]
    metrics = [selected("teacher-mem10", 0.1, 0.121, "teacher-48@400", True),
               selected("teacher-mem30", 0.3, 0.5469, "teacher-48", False),
               metric("dmd-mem30", "dmd-1", 1, 45.0, 0.004, {"a": 0.004})]
    paths = metric_files(tmp_path, metrics)
    write_table("Table 5", rows_cfg, paths, tmp_path / "t.csv", tmp_path / "t.md")
    md = (tmp_path / "t.md").read_text()
    assert "| PD | Teacher: 10% teacher (12.10%: teacher-48@400) |" in md
    assert "| DMD | Teacher: 30% teacher (54.69%: teacher-48) |" in md and "| DMD | DMD |" in md
    assert "No model of the run lies within a factor of 1.5 of the target 30%" in md
    assert "target 10%" not in md
    # replicates: each names its own choice, and one replicate far from the target flags the row
    metrics += [selected("teacher-mem10", 0.1, 0.094, "teacher-48.r1@350", True),
                selected("teacher-mem10", 0.1, 0.2246, "teacher-48.r2@450", False)]
    paths = metric_files(tmp_path, metrics[:1] + metrics[3:], "r")
    write_table("Table 5", [dict(rows_cfg[0], replicates=["a", "b", "c"])], paths, tmp_path / "r.csv", tmp_path / "r.md")
    md = (tmp_path / "r.md").read_text()
    assert "teacher-48@400, teacher-48.r1@350, teacher-48.r2@450) |" in md
    assert "No model of the run lies within a factor of 1.5 of the target 10%" in md


def test_students_against_their_own_teachers_replicate_by_replicate(tmp_path):
    """Planted metric files, three replicates: an improved student, a degraded one and one that only
    looks different on average (its replicates disagree); each gets the paired interval over replicates
    and the word it earns, in the quality metric and in L2 Mem points."""
    teacher = [(50.0, 0.30), (52.0, 0.26), (49.0, 0.34)]
    students = {"improved": [(45.0, 0.001), (47.5, 0.0), (44.2, 0.002)],
                "degraded": [(55.0, 0.002), (57.9, 0.0), (53.6, 0.001)],
                "null": [(58.0, 0.28), (45.0, 0.27), (51.0, 0.36)]}
    rows_cfg = [{"setting": "s", "label": "Teacher", "model": "t", "sampler": "heun-18", "replicates": ["t", "t.r1", "t.r2"]}]
    metrics = [metric(f"t{r}", "heun-18", 35, q, m, {"a": m}) for r, (q, m) in enumerate(teacher)]
    for name, values in students.items():
        rows_cfg.append({"setting": "s", "label": name, "model": name, "sampler": "1-step", "teacher_row": 0,
                         "replicates": [name, f"{name}.r1", f"{name}.r2"]})
        metrics += [metric(f"{name}{r}", "1-step", 1, q, m, {"a": m}) for r, (q, m) in enumerate(values)]
    paths = metric_files(tmp_path, metrics)
    rows = write_table("T", rows_cfg, paths, tmp_path / "t.csv", tmp_path / "t.md")
    by = {r["label"]: r for r in rows}
    assert by["improved"]["vs_teacher_quality_verdict"] == "better" and by["improved"]["vs_teacher_quality_high"] < 0
    assert by["degraded"]["vs_teacher_quality_verdict"] == "worse" and by["degraded"]["vs_teacher_quality_low"] > 0
    assert by["null"]["vs_teacher_quality_verdict"] == "no difference resolved"
    assert by["null"]["vs_teacher_quality"] == pytest.approx(1.0)  # (8 - 7 + 2) / 3, its interval holding 0
    assert by["improved"]["vs_teacher_mem_verdict"] == "less" and by["null"]["vs_teacher_mem_verdict"] == UNRESOLVED
    md = (tmp_path / "t.md").read_text()
    assert "| FID vs own teacher | L2 Mem vs own teacher (points) |" in md
    assert "| s | improved | 1-step | 1 | 45.57 ± 1.72 |" in md and "-4.77 [-5.39, -4.14] better" in md
    assert "-29.90 [-39.59, -20.21] less" in md
    with open(tmp_path / "t.csv") as f:
        assert float(next(r for r in csv.DictReader(f) if r["label"] == "degraded")["vs_teacher_quality"]) == \
            pytest.approx((5.0 + 5.9 + 4.6) / 3)


UNRESOLVED = "no difference resolved"
