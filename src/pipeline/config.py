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


class ConfigError(ValueError):
    pass


def schema() -> dict:
    return yaml.safe_load(resources.files("pipeline").joinpath("schemas/config.schema.yaml").read_text())


def load(path: str | Path) -> dict:
    with open(path) as f:
        cfg = yaml.safe_load(f)
    return validate(cfg, source=str(path))


def validate(cfg: Mapping[str, Any], source: str = "config") -> dict:
    cfg = copy.deepcopy(dict(cfg))
    validator = jsonschema.Draft7Validator(schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {'.'.join(str(p) for p in e.absolute_path) or '<top level>'}: {e.message}" for e in errors[:10]]
        raise ConfigError(f"invalid configuration in {source}:\n" + "\n".join(lines))
    _check_references(cfg, source)
    return cfg


def _check_references(cfg: Mapping[str, Any], source: str) -> None:
    problems = []

    def need(kind: str, name: str, where: str):
        if name not in cfg.get(kind, {}):
            problems.append(f"  {where}: {name!r} is not defined under {kind}")

    for name, s in cfg["subsets"].items():
        need("datasets", s["dataset"], f"subsets.{name}.dataset")
    for name, t in cfg["teachers"].items():
        need("subsets", t["subset"], f"teachers.{name}.subset")
        need("nets", t["net"], f"teachers.{name}.net")
    for name, s in cfg.get("students", {}).items():
        need("teachers", s["teacher"], f"students.{name}.teacher")
    clash = set(cfg["teachers"]) & set(cfg.get("students", {}))
    if clash:
        problems.append(f"  teachers and students share names {sorted(clash)}: model names must be unique")
    need("datasets", cfg["quality"]["reference"], "quality.reference")
    if cfg["quality"]["kind"] == "inception_fid" and "weights" not in cfg["quality"]:
        problems.append("  quality.weights: inception_fid needs the path of inception-2015-12-05.pt")
    models = models_of(cfg)
    for tname, table in cfg["tables"].items():
        for i, row in enumerate(table["rows"]):
            if row["model"] not in models:
                problems.append(f"  tables.{tname}.rows[{i}].model: {row['model']!r} is neither a teacher nor a student")
            need("samplers", row["sampler"], f"tables.{tname}.rows[{i}].sampler")
            if row["model"] in models and row["sampler"] in cfg["samplers"]:
                want = "heun" if row["model"] in cfg["teachers"] else "consistency"
                if cfg["samplers"][row["sampler"]]["kind"] != want:
                    problems.append(f"  tables.{tname}.rows[{i}]: sampler {row['sampler']!r} cannot sample {row['model']!r} (needs a {want} sampler)")
    if problems:
        raise ConfigError(f"invalid configuration in {source}:\n" + "\n".join(problems))


def models_of(cfg: Mapping[str, Any]) -> dict[str, str]:
    """model name -> 'teachers' or 'students'."""
    out = {name: "teachers" for name in cfg["teachers"]}
    out.update({name: "students" for name in cfg.get("students", {})})
    return out


def model_dir(cfg: Mapping[str, Any], model: str) -> str:
    return f"results/{models_of(cfg)[model]}/{model}"


def subset_of(cfg: Mapping[str, Any], model: str) -> str:
    """The training subset a model saw: its own for a teacher, its teacher's for a student."""
    if model in cfg["teachers"]:
        return cfg["teachers"][model]["subset"]
    return cfg["teachers"][cfg["students"][model]["teacher"]]["subset"]


def dataset_of_subset(cfg: Mapping[str, Any], subset: str) -> dict:
    return cfg["datasets"][cfg["subsets"][subset]["dataset"]]


def table_pairs(cfg: Mapping[str, Any], table: str) -> list[tuple[str, str]]:
    return [(r["model"], r["sampler"]) for r in cfg["tables"][table]["rows"]]


def all_pairs(cfg: Mapping[str, Any]) -> list[tuple[str, str]]:
    seen = []
    for table in cfg["tables"]:
        for pair in table_pairs(cfg, table):
            if pair not in seen:
                seen.append(pair)
    return seen
