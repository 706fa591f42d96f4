"""Load and validate the pipeline config, and expand it into the files the study needs.

Snakemake and the CLI both go through `validate`, so a bad key fails before any job starts, with
a message that names it. Cross-references (a teacher's subset, a table row's model) are checked
here too, since JSON Schema cannot see them.
"""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import jsonschema
import yaml

from . import replicates
from .yardsticks import KINDS as YARDSTICK_KINDS
from .yardsticks import LABELS as YARDSTICK_LABELS
from .yardsticks import SAMPLER as YARDSTICK_SAMPLER
from .yardsticks import parse_id as parse_yardstick
from .yardsticks import replicated_kinds
from .yardsticks import yardstick_id


class ConfigError(ValueError):
    pass


# libyaml's safe loader where PyYAML was built with it: every Snakemake start parses the schema, 7x
# faster than the pure-Python loader.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def safe_load(stream) -> Any:
    return yaml.load(stream, Loader=_Loader)


def schema() -> dict:
    return safe_load(resources.files("pipeline").joinpath("schemas/config.schema.yaml").read_text())


def load(path: str | Path) -> dict:
    with open(path) as f:
        cfg = safe_load(f)
    return validate(cfg, source=str(path))


def validate(cfg: Mapping[str, Any], source: str = "config") -> dict:
    cfg = copy.deepcopy(dict(cfg))
    validator = jsonschema.Draft7Validator(schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {'.'.join(str(p) for p in e.absolute_path) or '<top level>'}: {e.message}" for e in errors[:10]]
        raise ConfigError(f"invalid configuration in {source}:\n" + "\n".join(lines))
    _check_references(cfg, source)
    return expand_replicates(cfg)


def expand_replicates(cfg: dict) -> dict:
    """Add replicates 1..R-1 of every teacher and student (`<name>.r<r>`, see replicates.py): the
    configured entry with its training seed derived from r; a student's replicate distils its teacher's.
    Replicate 0 is the configured entry itself. Idempotent: an expanded config expands to itself."""
    count = cfg.setdefault("replicates", 1)
    for kind in ("teachers", "students"):
        entries = cfg.get(kind, {})
        for name in [n for n in entries if replicates.split(n)[1] == 0]:
            for r in range(1, count):
                entry = copy.deepcopy(entries[name])
                entry["train"]["seed"] = replicates.seed(entry["train"].get("seed", 0), r)
                if kind == "students":
                    entry["teacher"] = replicates.replicate_id(entry["teacher"], r)
                entries.setdefault(replicates.replicate_id(name, r), entry)
    selections = cfg.get("teacher_selections", {})
    for name in [n for n in selections if replicates.split(n)[1] == 0]:
        for r in range(1, count):
            entry = dict(selections[name], run=replicates.replicate_id(selections[name]["run"], r))
            selections.setdefault(replicates.replicate_id(name, r), entry)
    return cfg


def replicate_count(cfg: Mapping[str, Any]) -> int:
    return int(cfg.get("replicates", 1))


def sampling_seed(cfg: Mapping[str, Any], model: str) -> int:
    """The run seed a model's samples draw from: the config's `seed` for replicate 0, derived for the others."""
    return replicates.seed(cfg["seed"], replicates.split(model)[1])


def _check_references(cfg: Mapping[str, Any], source: str) -> None:
    problems = []

    def need(kind: str, name: str, where: str):
        if name not in cfg.get(kind, {}):
            problems.append(f"  {where}: {name!r} is not defined under {kind}")

    for name, s in cfg["subsets"].items():
        need("datasets", s["dataset"], f"subsets.{name}.dataset")
        if "extra_dataset" in s:
            need("datasets", s["extra_dataset"], f"subsets.{name}.extra_dataset")
        if s["kind"] == "text_memorization":
            for key in ("dataset", "extra_dataset"):
                d = cfg["datasets"].get(s.get(key))
                if d is not None and not _captioned(d):
                    problems.append(f"  subsets.{name}.{key}: {s[key]!r} has no captions; a text_memorization subset "
                                    "draws image-prompt pairs (source pairs or coco2017, or digits with caption_templates)")
        elif any(k in s for k in ("extra_dataset", "extra_ratio", "held_out_prompts")):
            problems.append(f"  subsets.{name}: extra_dataset, extra_ratio and held_out_prompts belong to "
                            "text_memorization subsets")
        for other in s.get("disjoint_from", []):
            o = cfg["subsets"].get(other)
            if s["kind"] != "uniform":
                problems.append(f"  subsets.{name}.disjoint_from: only a uniform subset is drawn disjoint from others")
            elif o is None or other == name:
                problems.append(f"  subsets.{name}.disjoint_from: {other!r} is not another configured subset")
            elif o["dataset"] != s["dataset"] or o.get("disjoint_from"):
                problems.append(f"  subsets.{name}.disjoint_from: {other!r} must draw from the same dataset "
                                f"({s['dataset']!r}) and name no `disjoint_from` of its own")
    for name, b in cfg.get("backbones", {}).items():
        if b["kind"] == "miniature":
            need("datasets", b["dataset"], f"backbones.{name}.dataset")
            d = cfg["datasets"].get(b["dataset"])
            if d is not None and not _captioned(d):
                problems.append(f"  backbones.{name}.dataset: {b['dataset']!r} has no captions; a miniature backbone "
                                "is built from image-prompt pairs (digits with caption_templates, pairs or coco2017)")
    for name, t in cfg["teachers"].items():
        need("subsets", t["subset"], f"teachers.{name}.subset")
        if "net" in t:
            need("nets", t["net"], f"teachers.{name}.net")
        else:
            need("backbones", t["backbone"], f"teachers.{name}.backbone")
            kind = cfg["subsets"].get(t["subset"], {}).get("kind", "text_memorization")
            if kind != "text_memorization":
                problems.append(f"  teachers.{name}.subset: a text-to-image teacher trains on image-prompt pairs, "
                                f"{t['subset']!r} is a {kind} subset (use a text_memorization subset)")
    selections = cfg.get("teacher_selections", {})
    for name, sel in selections.items():
        need("teachers", sel["run"], f"teacher_selections.{name}.run")
        need("samplers", sel["sampler"], f"teacher_selections.{name}.sampler")
        run = cfg["teachers"].get(sel["run"])
        if run is not None and ("backbone" in run or not run.get("snapshots")):
            problems.append(f"  teacher_selections.{name}.run: {sel['run']!r} must be an EDM teacher with `snapshots` "
                            "(the candidates the selection picks from)")
        if cfg["samplers"].get(sel["sampler"], {}).get("kind") not in (None, *EDM_SAMPLERS):
            problems.append(f"  teacher_selections.{name}.sampler: measure a teacher with a heun or stochastic sampler")
    for k, row in enumerate(cfg.get("theory", {}).get("bridge", {}).get("rows", [])):
        need("teachers", row["model"], f"theory.bridge.rows[{k}].model")
        need("samplers", row["sampler"], f"theory.bridge.rows[{k}].sampler")
        if "backbone" in cfg["teachers"].get(row["model"], {}):
            problems.append(f"  theory.bridge.rows[{k}].model: {row['model']!r} is a text-to-image teacher; the "
                            "bridge reads an EDM UNet's penultimate features")
    pairing = cfg.get("pairing", {})
    if pairing:
        need("samplers", pairing["teacher_sampler"], "pairing.teacher_sampler")
        if cfg["samplers"].get(pairing["teacher_sampler"], {}).get("kind") not in (None, "heun", "euler"):
            problems.append(f"  pairing.teacher_sampler: {pairing['teacher_sampler']!r} is not a deterministic EDM "
                            "sampler (heun or euler): the teacher's pairing is its ODE's")
    for k, row in enumerate(pairing.get("rows", [])):
        where = f"pairing.rows[{k}]"
        if row["model"] not in models_of(cfg):
            problems.append(f"  {where}.model: {row['model']!r} is not a configured model")
        elif "reference" not in row and base_model(row["model"]) not in cfg.get("students", {}):
            problems.append(f"  {where}.model: {row['model']!r} is not a student: name its `reference`")
        need("samplers", row["sampler"], f"{where}.sampler")
        if "reference" in row and row["reference"] not in models_of(cfg):
            problems.append(f"  {where}.reference: {row['reference']!r} is not a configured model")
    edge = cfg.get("edge", {})
    for key in ("times", "sample_times"):
        if key in edge and edge[key]["min"] >= edge[key]["max"]:
            problems.append(f"  edge.{key}: min {edge[key]['min']} must be below max {edge[key]['max']}")
    for name, case in edge.get("cases", {}).items():
        if (case["data"] == "gaussian") != ("d" in case):
            problems.append(f"  edge.cases.{name}: `d` is for gaussian data (digit_templates are 64-dimensional)")
        if case["data"] == "digit_templates" and case["k"] > 10:
            problems.append(f"  edge.cases.{name}.k: {case['k']} modes, but the digits have 10 classes")
        if "classes" in case and len(case["classes"]) != case["k"]:
            problems.append(f"  edge.cases.{name}.classes: {len(case['classes'])} classes for k = {case['k']}")
    for name, s in cfg.get("students", {}).items():
        if s["teacher"] not in selections:
            need("teachers", s["teacher"], f"students.{name}.teacher")
        if "net" in s:
            need("nets", s["net"], f"students.{name}.net")
        teacher = cfg["teachers"].get(selections.get(s["teacher"], {}).get("run", s["teacher"]))
        if teacher is not None and (s["method"] == "lcm") != ("backbone" in teacher):
            problems.append(f"  students.{name}.method: {s['method']} cannot distil {s['teacher']!r} "
                            "(lcm distils text-to-image teachers, which have a backbone; cd distils EDM teachers)")
        lcm = s.get("lcm", {})
        if lcm.get("w_min", 0) > lcm.get("w_max", float("inf")):
            problems.append(f"  students.{name}.lcm: w_min {lcm['w_min']} exceeds w_max {lcm['w_max']}")
    if not problems:
        for name, s in cfg.get("students", {}).items():
            ours, theirs = num_classes(net_of(cfg, name)), num_classes(net_of(cfg, s["teacher"]))
            if ours != theirs:
                problems.append(f"  students.{name}.net: conditioned on {ours} classes, its teacher {s['teacher']!r} "
                                f"on {theirs} (num_class_embeds; None = unconditional): they must agree")
    for kind in ("teachers", "students"):
        for name, entry in cfg.get(kind, {}).items():
            late = [k for k in entry.get("snapshots", []) if k > entry["train"]["steps"]]
            if late:
                problems.append(f"  {kind}.{name}.snapshots: steps {late} lie beyond train.steps = {entry['train']['steps']}")
    for name, sampler in cfg["samplers"].items():
        ts, idx = sampler.get("ts"), sampler.get("ts_index")
        by_grid = [k for k in ("grid_steps", "ts_index") if k in sampler]
        one_way = (ts is not None) != bool(by_grid) and len(by_grid) != 1
        if sampler["kind"] == "consistency" and not one_way:
            problems.append(f"  samplers.{name}: a consistency sampler takes either 'ts' (noise levels) or "
                            f"'grid_steps' with 'ts_index' (Karras grid indices), not both or neither")
            continue
        if ts and any(a <= b for a, b in zip(ts, ts[1:])):
            problems.append(f"  samplers.{name}.ts: noise levels must decrease, got {ts}")
        if idx:
            if any(a >= b for a, b in zip(idx, idx[1:])):
                problems.append(f"  samplers.{name}.ts_index: grid indices must increase, got {idx}")
            if max(idx) >= sampler["grid_steps"] - 1:
                problems.append(f"  samplers.{name}.ts_index: indices must be below grid_steps - 1 = "
                                f"{sampler['grid_steps'] - 1} (the last level is sigma_min, where f(x, sigma_min) = x)")
    for name, sampler in cfg["samplers"].items():
        if sampler["kind"] == "refine":
            base = cfg["samplers"].get(sampler["base"])
            if base is None:
                problems.append(f"  samplers.{name}.base: {sampler['base']!r} is not defined under samplers")
            elif base["kind"] in ("refine", "diffusion", "lcm"):
                problems.append(f"  samplers.{name}.base: refines the samples of a one- or few-step sampler of an EDM "
                                f"teacher's student, not of a {base['kind']} sampler")
    if YARDSTICK_SAMPLER in cfg["samplers"]:
        problems.append(f"  samplers.{YARDSTICK_SAMPLER}: the name is reserved for the yardstick sample sets")
    clash = ((set(cfg["teachers"]) & set(cfg.get("students", {}))) | (set(selections) & set(cfg["teachers"]))
             | (set(selections) & set(cfg.get("students", {}))))
    if clash:
        problems.append(f"  teachers, students and teacher_selections share names {sorted(clash)}: model names must be unique")
    need("datasets", cfg["quality"]["reference"], "quality.reference")
    reference = cfg["datasets"].get(cfg["quality"]["reference"])
    if cfg["quality"]["kind"] == "digits_fd" and reference is not None:
        # the digits classifier sees images at its reference dataset's resolution, or integer multiples of it
        # (block means, pipeline.digits_classifier)
        want = reference.get("resolution", 16)
        for name, s in cfg["subsets"].items():
            d = cfg["datasets"].get(s["dataset"], {})
            if d.get("source") == "digits" and d.get("resolution", 16) % want:
                problems.append(f"  subsets.{name}: its dataset {s['dataset']!r} is {d.get('resolution', 16)} px, but "
                                f"digits-FD's classifier is trained on quality.reference {cfg['quality']['reference']!r} "
                                f"at {want} px: give its datasets that resolution or a multiple of it")
    sscd = cfg["memorization"].get("sscd") or {}
    if "calibrate" in sscd and "threshold" in sscd:
        problems.append("  memorization.sscd: give a fixed `threshold` or `calibrate`, not both")
    if "calibrate" in sscd and "real" not in yardstick_settings(cfg)["kinds"]:
        problems.append("  memorization.sscd.calibrate: calibrates on the real held-out yardstick, but "
                        "yardsticks.kinds leaves out `real`")
    ys = yardstick_settings(cfg)
    if ys["reserve"] < ys["num_samples"]:
        problems.append(f"  yardsticks.reserve: {ys['reserve']} held-out images cannot give the real yardstick's "
                        f"{ys['num_samples']} (yardsticks.num_samples)")
    if cfg["quality"].get("prompt_class") and cfg["quality"]["kind"] != "digits_fd":
        problems.append("  quality.prompt_class: reads samples with the digits classifier, which only digits_fd trains")
    if cfg["quality"]["kind"] == "inception_fid" and "weights" not in cfg["quality"]:
        problems.append("  quality.weights: inception_fid needs the path of inception-2015-12-05.pt")
    models = models_of(cfg)
    for tname, table in cfg["tables"].items():
        for i, row in enumerate(table["rows"]):
            if row["model"] not in models:
                problems.append(f"  tables.{tname}.rows[{i}].model: {row['model']!r} is neither a teacher nor a student")
            need("samplers", row["sampler"], f"tables.{tname}.rows[{i}].sampler")
            if row["model"] in models and row["sampler"] in cfg["samplers"] and not problems:
                want = samplers_for(cfg, row["model"])
                sampler = cfg["samplers"][row["sampler"]]
                if sampler["kind"] == "refine" and cfg["samplers"].get(sampler["base"], {}).get("kind") not in want:
                    problems.append(f"  tables.{tname}.rows[{i}]: sampler {row['sampler']!r} refines {sampler['base']!r}, "
                                    f"which cannot sample {row['model']!r} (needs a {' or '.join(want)} sampler)")
                elif sampler["kind"] == "refine" and teacher_run(cfg, row["model"]) in cfg["teachers"]:
                    problems.append(f"  tables.{tname}.rows[{i}]: {row['sampler']!r} refines a student's samples with "
                                    f"its teacher; {row['model']!r} is a teacher")
                elif sampler["kind"] not in want:
                    problems.append(f"  tables.{tname}.rows[{i}]: sampler {row['sampler']!r} cannot sample {row['model']!r} "
                                    f"(needs a {' or '.join(want)} sampler)")
    for fname, fig in cfg.get("sample_figures", {}).items():
        for i, panel in enumerate(fig["panels"]):
            where = f"sample_figures.{fname}.panels[{i}]"
            if panel["model"] not in models:
                problems.append(f"  {where}.model: {panel['model']!r} is neither a teacher nor a student")
            need("samplers", panel["sampler"], f"{where}.sampler")
    if problems:
        raise ConfigError(f"invalid configuration in {source}:\n" + "\n".join(problems))


def paper_key(row: Mapping[str, Any]) -> str:
    """The key of a table row in the published values: its `paper`, else '<setting> / <label>'."""
    return row.get("paper") or f"{row.get('setting', '')} / {row.get('label', '')}"


def load_published(cfg: Mapping[str, Any], root: str | Path = ".") -> dict | None:
    """The published values (config key `published`), checked against every table that names them.

    Returns None when no table has `paper`. A table naming an entry the file lacks, or a row whose key
    the entry lacks, is an error: a silent blank would pass for "not reported"."""
    wanted = {t: spec["paper"] for t, spec in cfg["tables"].items() if "paper" in spec}
    if not wanted:
        return None
    if "published" not in cfg:
        raise ConfigError(f"tables {sorted(wanted)} name published values (`paper`), but `published` names no file")
    path = Path(root) / cfg["published"]
    if not path.exists():
        raise ConfigError(f"published: {path} does not exist (the repository ships config/published.yaml)")
    with open(path) as f:
        published = safe_load(f)
    problems = []
    for tname, entry in wanted.items():
        if entry not in published.get("tables", {}):
            problems.append(f"  tables.{tname}.paper: {entry!r} is not an entry of {path}")
            continue
        table = published["tables"][entry]
        for i, row in enumerate(cfg["tables"][tname]["rows"]):
            values = table["rows"].get(paper_key(row))
            if values is None:
                problems.append(f"  tables.{tname}.rows[{i}]: {path} has no row {paper_key(row)!r} in {entry!r} "
                                f"(rows: {sorted(table['rows'])}); set the row's `paper` key")
            elif len(values) != len(table["columns"]):
                problems.append(f"  {path}: {entry}.{paper_key(row)} has {len(values)} cells for {len(table['columns'])} columns")
    if problems:
        raise ConfigError("published values do not match the tables:\n" + "\n".join(problems))
    return published


def published_table(published: Mapping[str, Any], entry: str) -> dict:
    """One printed table of the published values, with the file's `source` and `full_protocol`: what
    the table writer shows beside its rows."""
    return {**published["tables"][entry], "source": published["source"], "full_protocol": published["full_protocol"]}


EDM_SAMPLERS = ("heun", "stochastic")
SNAPSHOT_SEP = "@"  # never part of a configured name (see the schema's name pattern)


def snapshot_id(model: str, step: int) -> str:
    return f"{model}{SNAPSHOT_SEP}{int(step)}"


def base_model(model: str) -> str:
    """The configured teacher or student a model id belongs to: itself, or the run a snapshot is from."""
    return model.split(SNAPSHOT_SEP, 1)[0]


def models_of(cfg: Mapping[str, Any]) -> dict[str, str]:
    """model id -> 'teachers', 'students' or 'snapshots' (`<teacher or student>@<step>`)."""
    out = {name: "teachers" for name in cfg["teachers"]}
    out.update({name: "students" for name in cfg.get("students", {})})
    out.update({name: "selections" for name in cfg.get("teacher_selections", {})})
    for kind in ("teachers", "students"):
        for name, entry in cfg.get(kind, {}).items():
            out.update({snapshot_id(name, k): "snapshots" for k in entry.get("snapshots", [])})
    return out


def model_dir(cfg: Mapping[str, Any], model: str, models: Mapping[str, str] | None = None) -> str:
    """A model's directory; `models` is models_of(cfg) when the caller has it (the DAG asks per job)."""
    kind = (models if models is not None else models_of(cfg))[model]
    if kind == "snapshots":
        base, step = model.split(SNAPSHOT_SEP)
        return f"results/snapshots/{base}/step-{step}"
    if kind == "selections":
        return f"results/selected/{model}"
    return f"results/{kind}/{model}"


def teacher_run(cfg: Mapping[str, Any], model: str) -> str:
    """The configured teacher or student a model stands for: a snapshot's run, a selection's teacher
    run (a selected teacher is one of that run's models), else the model itself."""
    model = base_model(model)
    return cfg.get("teacher_selections", {}).get(model, {}).get("run", model)


def selection_candidates(cfg: Mapping[str, Any], selection: str) -> list[str]:
    """The models a teacher selection picks from, in step order: the run's snapshots, then its end."""
    run = cfg["teacher_selections"][selection]["run"]
    return [snapshot_id(run, k) for k in sorted(cfg["teachers"][run]["snapshots"])] + [run]


def _captioned(dataset: Mapping[str, Any]) -> bool:
    return dataset["source"] in ("pairs", "coco2017") or "caption_templates" in dataset


def backbone_of(cfg: Mapping[str, Any], model: str) -> str | None:
    """The latent diffusion backbone of a text-to-image teacher or student (or snapshot), None for EDM models."""
    model = teacher_run(cfg, model)
    teacher = model if model in cfg["teachers"] else teacher_run(cfg, cfg["students"][model]["teacher"])
    return cfg["teachers"][teacher].get("backbone")


def backbone_dir(cfg: Mapping[str, Any], backbone: str) -> str:
    """Where a backbone's diffusers folder lies: a pretrained one's configured path, a miniature's build."""
    entry = cfg["backbones"][backbone]
    return entry["path"] if entry["kind"] == "pretrained" else f"results/backbones/{backbone}"


def samplers_for(cfg: Mapping[str, Any], model: str) -> tuple[str, ...]:
    """The sampler kinds that can sample a model."""
    model = teacher_run(cfg, model)
    if backbone_of(cfg, model) is not None:
        return ("diffusion",) if model in cfg["teachers"] else ("lcm",)
    if model in cfg["teachers"]:
        return (*EDM_SAMPLERS, "euler")
    return ("consistency", "refine") if cfg["students"][model]["method"].startswith("cd") else ("euler", "refine")


def teacher_of(cfg: Mapping[str, Any], model: str) -> str:
    """The teacher a student (or a snapshot of one) was distilled from."""
    model = base_model(model)
    if model not in cfg.get("students", {}):
        raise ConfigError(f"{model!r} is not a student, so it has no teacher")
    return cfg["students"][model]["teacher"]


def sampler_spec(cfg: Mapping[str, Any], name: str) -> dict:
    """A sampler's config as the sample command gets it: a refine sampler carries its base inline.
    `shard_size` is left out: it says how the samples are split into jobs, not how they are drawn."""
    spec = {k: v for k, v in cfg["samplers"][name].items() if k != "shard_size"}
    if spec["kind"] == "refine":
        spec["base_spec"] = {k: v for k, v in cfg["samplers"][spec["base"]].items() if k != "shard_size"}
    return spec


def shard_size(cfg: Mapping[str, Any], sampler: str) -> int:
    """Samples per shard job of a sampler: its own `shard_size`, else `sampling.shard_size`. A one-step
    sampler's whole sample set is minutes of one GPU, where ten jobs would each pay start-up and queueing."""
    return int(cfg["samplers"].get(sampler, {}).get("shard_size", cfg["sampling"]["shard_size"]))


def net_of(cfg: Mapping[str, Any], model: str) -> dict:
    """The net config of a teacher or student (or snapshot): a student's own `net`, else its teacher's.
    A text-to-image model's UNet comes from its backbone and takes no class: its net config is empty."""
    model = teacher_run(cfg, model)
    if backbone_of(cfg, model) is not None:
        return {}
    if model in cfg["teachers"]:
        return cfg["nets"][cfg["teachers"][model]["net"]]
    student = cfg["students"][model]
    return cfg["nets"][student["net"]] if "net" in student else net_of(cfg, student["teacher"])


def class_conditional(cfg: Mapping[str, Any], model: str) -> bool:
    return num_classes(net_of(cfg, model)) is not None


def num_classes(net: Mapping[str, Any]) -> int | None:
    """The number of classes a net is conditioned on (diffusers' `num_class_embeds`), None if unconditional."""
    n = net.get("num_class_embeds")
    return None if n is None else int(n)


def subset_of(cfg: Mapping[str, Any], model: str) -> str:
    """The training subset a model saw: its own for a teacher, its teacher's for a student; for a
    yardstick, the subset it stands beside."""
    parsed = parse_yardstick(model)
    if parsed:
        return parsed[1]
    model = teacher_run(cfg, model)
    if model in cfg["teachers"]:
        return cfg["teachers"][model]["subset"]
    return cfg["teachers"][teacher_run(cfg, cfg["students"][model]["teacher"])]["subset"]


# What each source's images are when its dataset entry does not say (src/pipeline/data/sources.py).
SOURCE_RESOLUTION = {"digits": 16, "cifar10": 32, "imagenet64": 64, "pairs": 512, "coco2017": 512}
SOURCE_CLASSES = {"digits": 10, "cifar10": 10, "imagenet64": 1000}
SSCD_DIM = 512  # SSCD's descriptor (sscd_disc_mixup)


def subset_size(cfg: Mapping[str, Any], subset: str) -> tuple[int, int]:
    """(unique images, uint8 values per image) of a configured subset, from its spec alone."""
    spec = cfg["subsets"][subset]
    dataset = dataset_of_subset(cfg, subset)
    source = dataset["source"]
    resolution = dataset.get("resolution", SOURCE_RESOLUTION[source])
    values = resolution * resolution * (1 if source == "digits" else 3)
    if spec["kind"] == "uniform":
        images = spec["n"]
    elif spec["kind"] == "repetition":
        classes = SOURCE_CLASSES.get(source, 10)
        others = spec.get("others", spec.get("others_per_class", 0) * (classes - len(spec["repeated_classes"])))
        images = spec["per_class"] * len(spec["repeated_classes"]) + others
    else:  # text_memorization: the memorized pairs and the extra pairs beside each
        images = int(spec["n"] * (1 + spec["extra_ratio"]))
    return int(images), int(values)


def stage_mem_mb(cfg: Mapping[str, Any], model: str, stage: str, num_samples: int, descriptors: bool = False) -> int:
    """The memory a per-set job needs, from the sizes it holds (a job reads a whole sample set and, for
    the search, the whole training subset): 2 GB of interpreter, libraries and batches, plus
      search   float32 copies of both sets for the FAISS short list and the exact re-rank (x2), and the
               SSCD descriptors of both (`descriptors`);
      metrics  the set's uint8 images and a float32 copy (the feature passes and the L2 statistics);
      embed    the set's uint8 images (one float32 batch at a time on top).
    `model` "subset:<name>" sizes an embedding of the training subset itself. With half again as margin,
    in MB, at least the profile's 4000."""
    if model.startswith("subset:"):
        images, values = subset_size(cfg, model.split(":", 1)[1])
        held, train = images, 0
    else:
        train, values = subset_size(cfg, subset_of(cfg, model))
        held = num_samples
    if stage == "search":
        need = 2 * 4 * values * (held + train) + (4 * SSCD_DIM * (held + train) if descriptors else 0)
    elif stage == "metrics":
        need = (1 + 4) * values * held
    elif stage == "embed":
        need = values * held
    else:
        raise ValueError(f"unknown stage {stage!r}: search, metrics or embed")
    return max(4000, int(2048 + 1.5 * need / 2 ** 20))


def dataset_of_subset(cfg: Mapping[str, Any], subset: str) -> dict:
    return cfg["datasets"][cfg["subsets"][subset]["dataset"]]


def extra_dataset_of_subset(cfg: Mapping[str, Any], subset: str) -> dict | None:
    """The dataset a text_memorization subset draws its extra pairs from, when it is not its own."""
    name = cfg["subsets"][subset].get("extra_dataset")
    return None if name is None or name == cfg["subsets"][subset]["dataset"] else cfg["datasets"][name]


def yardstick_settings(cfg: Mapping[str, Any]) -> dict:
    ys = dict(cfg.get("yardsticks", {}))
    ys.setdefault("kinds", list(YARDSTICK_KINDS))
    ys.setdefault("num_samples", cfg["sampling"]["num_samples"])
    ys.setdefault("blur_sigma", 1.0)
    ys.setdefault("reserve", ys["num_samples"])
    return ys


def table_rows(cfg: Mapping[str, Any], table: str) -> list[dict]:
    """A table's configured rows, then one yardstick row per kind for each training subset its models saw;
    every row names its model's training subset (`subset`), which places it among its yardsticks, and
    how its per-group columns group samples (`group_by`): by the class a class-conditional model
    generated each sample for, else by each sample's nearest training image; a yardstick groups as the
    models of its subset do. `replicates` lists the ids whose metrics a row aggregates, and `window` the
    replicate ids of the row's earlier quality points (its run's last snapshots, oldest first), which the
    convergence criterion compares with the row's own (see convergence_window)."""
    count = replicate_count(cfg)
    rows = [{**r, "subset": subset_of(cfg, r["model"]),
             "role": "teacher" if teacher_run(cfg, r["model"]) in cfg["teachers"] else "student",
             "group_by": "class" if class_conditional(cfg, r["model"]) else "neighbour",
             "replicates": replicates.of(r["model"], count),
             "window": [replicates.of(m, count) for m in convergence_window(cfg, r["model"])],
             **({"refine_sigma": cfg["samplers"][r["sampler"]]["sigma"]}
                if cfg["samplers"][r["sampler"]]["kind"] == "refine" else {})}
            for r in cfg["tables"][table]["rows"]]
    _pair_students_with_teachers(cfg, rows)
    if not cfg["tables"][table].get("yardsticks", True):
        return rows
    subsets = []
    for r in rows:
        if r["subset"] not in subsets:
            subsets.append(r["subset"])
    ys = yardstick_settings(cfg)
    sigma, replicated = ys["blur_sigma"], replicated_kinds(ys["reserve"], ys["num_samples"])
    for s in subsets:
        for kind in ys["kinds"]:
            label = YARDSTICK_LABELS[kind] + (f" (sigma = {sigma:g} px)" if kind == "blur" else "")
            by_class = any(r["group_by"] == "class" for r in rows if r["subset"] == s and r["role"] != "yardstick")
            yid = yardstick_id(kind, s)
            rows.append({"setting": s, "label": label, "model": yid, "sampler": YARDSTICK_SAMPLER,
                         "subset": s, "role": "yardstick", "group_by": "class" if by_class else "neighbour",
                         "replicates": replicates.of(yid, count if kind in replicated else 1), "window": []})
    return rows


def _pair_students_with_teachers(cfg: Mapping[str, Any], rows: list[dict]) -> None:
    """`teacher_row`: for a student row, the index of its own teacher's row in the same table (the last
    one above it, else the first below), whose replicate r it was distilled from; the table reports the
    per-replicate differences (pipeline.stats). Rows whose teacher the table does not show get none."""
    for i, r in enumerate(rows):
        if r["role"] != "student" or base_model(r["model"]) not in cfg.get("students", {}):
            continue
        teacher = teacher_of(cfg, r["model"])
        found = [j for j, q in enumerate(rows) if q["model"] == teacher and len(q["replicates"]) == len(r["replicates"])]
        above = [j for j in found if j < i]
        if found:
            r["teacher_row"] = above[-1] if above else found[0]


def convergence_window(cfg: Mapping[str, Any], model: str) -> list[str]:
    """The snapshots of a student's run whose quality the convergence criterion compares with the
    student's own: the last `convergence.window - 1` snapshots (default window 2: the last snapshot and
    the end). None for a teacher, a snapshot or a yardstick, or a run without snapshots."""
    if parse_yardstick(model) or model != base_model(model) or model not in cfg.get("students", {}):
        return []
    steps = sorted(cfg["students"][model].get("snapshots", []))
    want = cfg.get("convergence", {}).get("window", 2) - 1
    return [snapshot_id(model, k) for k in steps[-want:]] if steps else []


def calibration_yardstick(cfg: Mapping[str, Any], model: str) -> str | None:
    """The real held-out yardstick whose similarities set a model's copy threshold
    (`memorization.sscd.calibrate`), or None with a fixed threshold."""
    sscd = cfg["memorization"].get("sscd") or {}
    if "calibrate" not in sscd:
        return None
    return yardstick_id("real", replicates.split(subset_of(cfg, model))[0])


def table_metrics(rows: list[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Every (model id, sampler) whose metrics a table reads, in the order the table writer takes them:
    per row, its replicates, then each window point's replicates."""
    return [(m, r["sampler"]) for r in rows for ids in [r["replicates"], *r["window"]] for m in ids]


def table_pairs(cfg: Mapping[str, Any], table: str) -> list[tuple[str, str]]:
    return [(r["model"], r["sampler"]) for r in cfg["tables"][table]["rows"]]


def all_pairs(cfg: Mapping[str, Any]) -> list[tuple[str, str]]:
    seen = []
    for table in cfg["tables"]:
        for pair in table_pairs(cfg, table):
            if pair not in seen:
                seen.append(pair)
    return seen
