"""Static checks of the Snakemake profiles and the conda environment files.

Fast (one cached `snakemake --help` plus one tiny dry run) and independent of the
workflow's own rules and configs, which may not exist yet.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "profiles" / "slurm" / "config.yaml"
LOCAL = ROOT / "profiles" / "local" / "config.yaml"
ENVS = ROOT / "workflow" / "envs"
ENV_NAMES = ("data", "torch", "search", "report")


def load(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


@functools.lru_cache(maxsize=None)
def snakemake_long_options() -> frozenset[str]:
    """Every `--long-option` snakemake (with its installed plugins) accepts."""
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    return frozenset(re.findall(r"(?<![\w-])--([a-z0-9][a-z0-9-]*)", out))


def walk(obj, key=None):
    """Yield (key, value) for every mapping entry and `key=value` list item, recursively."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k, v
            yield from walk(v, k)
    elif isinstance(obj, list):
        for item in obj:
            if isinstance(item, str) and "=" in item:
                k, v = item.split("=", 1)
                yield k.split(":")[-1].strip(), v
            else:
                yield from walk(item, key)


@pytest.fixture(scope="module")
def slurm():
    return load(SLURM)


@pytest.fixture(scope="module")
def local():
    return load(LOCAL)


# --- SLURM profile -----------------------------------------------------------------

def test_slurm_uses_executor_plugin(slurm):
    assert slurm["executor"] == "slurm"
    # works with and without accounting, and sees a cancelled job as failed (sacct says "CANCELLED by 0")
    assert slurm["slurm-status-command"] == "squeue"
    for key in ("jobs", "latency-wait", "retries"):
        assert isinstance(slurm[key], int) and slurm[key] >= 0, key


def test_no_gpu_request_through_slurm_extra(slurm, local):
    for profile in (slurm, local):
        for k, v in walk(profile):
            if k == "slurm_extra":
                assert not re.search(r"gres|gpu", str(v), re.I), f"GPUs via slurm_extra: {v!r}"
            assert k != "gres", "request GPUs with the plugin's `gpu` resource, not `gres`"


def test_default_resources_partition_and_account(slurm):
    res = slurm["default-resources"]
    assert isinstance(res, dict)
    for name in ("slurm_partition", "slurm_account"):
        assert res.get(name), f"default-resources lacks {name}"
        # one documented place: an environment variable, quoted to stay a string
        assert re.fullmatch(r"'\$MEMDISTILL_SLURM_[A-Z_]+'", res[name]), res[name]
    assert isinstance(res["runtime"], int) and isinstance(res["mem_mb"], int)
    # a constant, not Snakemake's default from every job's input sizes (a stat per input per job)
    assert isinstance(res["disk_mb"], int)


def test_set_resources_never_set_gpus_or_partitions(slurm):
    """GPU counts and partitions come from the rules (config `compute.gpus`), never from the profile."""
    for rule, res in slurm.get("set-resources", {}).items():
        assert set(res) <= {"gpu_model", "runtime", "mem_mb", "constraint", "slurm_extra"}, rule


def rule_blocks() -> dict[str, str]:
    """Rule name -> its source text, from workflow/rules/*.smk (may be empty)."""
    blocks, derived = {}, {}
    for f in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        parts = re.split(r"^(?:rule|checkpoint|use rule)\s+(\w+(?:\s+as\s+\w+\s+with)?)\s*:", f.read_text(), flags=re.M)
        for head, text in zip(parts[1::2], parts[2::2]):
            base, _, name = head.partition(" as ")
            if name:
                derived[name.split()[0]] = (base, text)
            else:
                blocks[head] = text
    # `use rule A as B with:` is rule A's text with B's overrides
    blocks.update({name: blocks[base] + text for name, (base, text) in derived.items()})
    return blocks


def test_set_resources_name_existing_rules(slurm):
    blocks = rule_blocks()
    assert blocks, "no rules found in workflow/rules"
    missing = set(slurm.get("set-resources", {})) - set(blocks)
    assert not missing, f"set-resources for rules that do not exist: {sorted(missing)}"


def test_every_gpu_rule_routes_by_its_gpu_count():
    """Every rule that declares a GPU count declares its partition from the same count."""
    blocks = rule_blocks()
    gpu_rules = {name for name, text in blocks.items() if re.search(r"^\s*gpu\s*=", text, re.M)}
    assert {"train_teacher", "distill", "sample_shard", "sample_set", "search"} <= gpu_rules
    for name in gpu_rules:
        gpu = re.search(r"^\s*gpu\s*=\s*(?:lambda wc: )?(.+),$", blocks[name], re.M).group(1)
        assert re.search(rf"^\s*slurm_partition\s*=\s*(?:lambda wc: )?partition_for\({re.escape(gpu)}\),$",
                         blocks[name], re.M), name


def test_configfiles(slurm, local):
    """The SLURM profile says where jobs run, not what runs: no configfile of its own."""
    assert "configfile" not in slurm
    assert local["configfile"] == "config/embedded.yaml"


def test_only_training_is_retried_and_warned_before_its_time_limit(slurm):
    assert slurm["retries"] == 0
    training = {"train_teacher", "distill", "finetune_teacher", "distill_lcm"}  # the rules that checkpoint
    assert set(slurm["preemptible-rules"]) == training and slurm["preemptible-retries"] >= 1
    for rule in slurm["preemptible-rules"]:
        assert re.fullmatch(r"'--signal=TERM@\d+'", slurm["set-resources"][rule]["slurm_extra"]), rule
    # rule-level `retries:` would also rerun a failed job inside its own allocation
    assert not any(re.search(r"^\s*retries:", text, re.M) for text in rule_blocks().values())


@pytest.mark.parametrize("path", [SLURM, LOCAL], ids=["slurm", "local"])
def test_profile_keys_are_snakemake_options(path):
    valid = snakemake_long_options()
    assert "configfile" in valid and "executor" in valid  # sanity of the parsing
    unknown = set(load(path)) - valid
    assert not unknown, f"{path.relative_to(ROOT)}: not snakemake options: {sorted(unknown)}"


def test_local_profile(local):
    assert local["cores"] == "all"
    assert local["keep-going"] is False
    assert local["printshellcmds"] is True and local["rerun-incomplete"] is True
    assert "executor" not in local
    assert "software-deployment-method" not in local  # opt-in, see its comment


def profile_dry_run(tmp_path, *args):
    env = dict(
        {k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        MEMDISTILL_SLURM_ACCOUNT="acct1",
        MEMDISTILL_SLURM_PARTITION="all",  # a Python builtin name: must stay a string
        MEMDISTILL_SLURM_GPU_PARTITION="gpu-a100",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", str(SLURM.parent), "-s", str(ROOT / "Snakefile"),
         "--directory", str(tmp_path), "-n", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    jobs = {}
    for block in re.split(r"\n(?=\[[^\n]*\]\nrule )", log):
        m = re.search(r"^rule (\w+):", block, re.M)
        if m:
            jobs.setdefault(m.group(1), []).append(block)
    return jobs


@pytest.mark.workflow
def test_slurm_profile_dry_run_of_one_paper_table(tmp_path):
    """As shipped, with no conda: the paper grid named by --configfile, one table's target after `--`,
    env-var partitions and account, GPU rules on the GPU partition with their threads shown."""
    jobs = profile_dry_run(tmp_path, "--configfile", str(ROOT / "config" / "config.yaml"), "--",
                           "results/tables/table1.md")
    assert "table" in jobs and "prepare_imagenet64" not in jobs  # table1 only: CIFAR-10, no ImageNet
    teacher = jobs["train_teacher"][0]
    assert "threads: 16" in teacher, teacher
    for word in ("slurm_partition=gpu-a100", "gpu=4", "runtime=4320", "cpus_per_task=16",
                 "slurm_extra=--signal=TERM@600", "MEMDISTILL_GPUS=4 OMP_NUM_THREADS=16 accelerate launch",
                 "--multi_gpu --num_processes 4"):
        assert word in teacher, word
    subset = jobs["subset"][0]
    assert "slurm_partition=all" in subset and "slurm_account=acct1" in subset and "gpu=" not in subset
    # the profile's constant disk_mb, in every job
    assert all(re.search(r"\bdisk_mb=1000\b", job) for rule_jobs in jobs.values() for job in rule_jobs)
    # the per-set rules compute on the sampling GPUs (`sampling.compute.gpus: 1` in the paper config)
    assert all("slurm_partition=gpu-a100" in job and "gpu=1" in job for job in jobs["search"])


@pytest.mark.workflow
def test_slurm_profile_dry_run_of_the_embedded_table(tmp_path):
    """No --configfile: the embedded study, and a target needs no `--`."""
    jobs = profile_dry_run(tmp_path, "results/tables/demo.md")
    assert len(jobs["train_teacher"]) == 2
    assert all("MEMDISTILL_GPUS=0 OMP_NUM_THREADS=1 ACCELERATE_USE_CPU=True" in t for t in jobs["train_teacher"])
    assert all("runtime=60" in t for t in jobs["train_teacher"])
    # the embedded study computes on CPU (`compute.gpus: 0`): its GPU-capable rules queue on the CPU partition
    for rule in ("train_teacher", "distill", "sample_set", "search", "metrics"):
        assert all("slurm_partition=all" in job and "gpu-a100" not in job for job in jobs[rule]), rule


def test_slurm_profile_needs_no_conda_and_says_so_when_asked_for_it(tmp_path):
    """Conda is a choice (`--sdm conda`), not a requirement; asking for it without conda on PATH stops
    the workflow before any job with a message naming the fix."""
    slurm = load(SLURM)
    assert "software-deployment-method" not in slurm
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    (tmp_path / "bin").mkdir()
    for tool in ("bash", "sh", "which"):  # all snakemake itself looks up; python is called by its path
        (tmp_path / "bin" / tool).symlink_to(shutil.which(tool))
    env["PATH"] = str(tmp_path / "bin")  # so no conda or mamba, whatever this machine has
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--sdm", "conda", "-s", str(ROOT / "Snakefile"),
                           "--directory", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "neither conda nor mamba is on PATH" in proc.stdout + proc.stderr


# --- conda environments ------------------------------------------------------------

@pytest.mark.parametrize("name", ENV_NAMES)
def test_env_file(name):
    env = load(ENVS / f"{name}.yaml")
    assert isinstance(env["channels"], list) and env["channels"]
    deps = env["dependencies"]
    conda = [d for d in deps if isinstance(d, str)]
    assert "python=3.11" in conda, "python must be pinned to 3.11"
    pip = [p for d in deps if isinstance(d, dict) for p in d.get("pip", [])]
    for spec in conda + pip:
        assert re.search(r"(==?|<|>)\d", spec), f"{name}.yaml: unpinned {spec!r}"
    names = {re.split(r"[=<> ]", s, maxsplit=1)[0] for s in conda + pip}
    # the package's own needs (run as `python -m pipeline` with PYTHONPATH=src)
    assert {"numpy", "pyarrow", "pyyaml", "jsonschema", "pillow", "tqdm"} <= names, name
    if name == "torch":
        assert {"torch", "torchvision", "accelerate", "diffusers", "clean-fid", "faiss-cpu"} <= names
        assert {"torch==2.14.1", "torchvision==0.29.1"} <= {s.split("#")[0].strip() for s in pip}, \
            "the cluster env pins the same torch as requirements.txt"
    if name == "search":
        assert "faiss-gpu" in names and not names & {"torch", "pytorch"}
    if name in ("data", "report"):
        assert not names & {"torch", "pytorch", "faiss-gpu", "faiss-cpu"}, name
    (numpy_spec,) = [s.split("#")[0].strip() for s in conda + pip if re.match(r"numpy(?![\w-])", s)]
    assert same_numpy_major(numpy_spec), f"{name}.yaml pins {numpy_spec!r}; the tests run numpy {np.__version__}"


def same_numpy_major(spec: str) -> bool:
    """Whether an env's numpy pin (conda's `numpy=2.3.3` or pip's `numpy>=2.0,<3`) runs the numpy major the
    tests run: numpy 2 changed scalar promotion and the C ABI, so code tested on one major is untested on the other."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    installed = Version(np.__version__)
    exact = re.fullmatch(r"numpy=([\d.]+)", spec)
    if exact:
        return Version(exact.group(1)).major == installed.major
    allowed = SpecifierSet(spec[len("numpy"):])
    other_majors = [Version(f"{installed.major - 1}.99"), Version(f"{installed.major + 1}.0")]
    return installed in allowed and not any(v in allowed for v in other_majors)


def test_rules_point_at_existing_envs():
    used = {
        m.group(1)
        for f in (ROOT / "workflow" / "rules").glob("*.smk")
        for m in re.finditer(r"conda:\s*\n?\s*[\"']\.\./envs/([\w.-]+)[\"']", f.read_text())
    }
    assert used == {f"{n}.yaml" for n in ENV_NAMES}, used
    rules = rule_blocks()
    without = [name for name, text in rules.items() if "conda:" not in text and name != "all"]
    assert not without, f"rules without a conda environment: {without}"


@pytest.mark.workflow
def test_slurm_profile_dry_run_of_the_gpu_smoke_rule(tmp_path):
    (smoke,) = profile_dry_run(tmp_path, "gpu_smoke")["gpu_smoke"]
    assert "slurm_partition=gpu-a100" in smoke and "gpu=1" in smoke and "nvidia-smi -L" in smoke


def test_state_checks_start_soon_after_a_submission(slurm):
    """The plugin's 40 s default pause before (and after each productive) state check made a finished job
    be noticed 20-45 s late; the profile shortens the first pause (it still grows while nothing finishes)."""
    assert 5 <= slurm["slurm-init-seconds-before-status-checks"] <= 20


def test_one_faiss_build_per_install():
    """pyproject's core pulls no faiss; the `cpu` and `gpu` extras each bring one build (faiss-gpu with
    DeepSpeed), and requirements.txt, the CPU/CI set, holds the core and the CPU extras."""
    import tomllib

    def name(requirement: str) -> str:
        return re.split(r"[<>=!\[ ]", requirement, maxsplit=1)[0].lower()

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {name(r) for r in project["dependencies"]}
    extras = {k: {name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    assert not {n for n in core if n.startswith("faiss")}
    assert extras["cpu"] == {"faiss-cpu"} and extras["gpu"] == {"faiss-gpu-cu12", "deepspeed"}
    assert {"transformers", "huggingface_hub"} <= extras["text2image"]
    requirements = {name(line) for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")}
    assert core | extras["cpu"] | extras["text2image"] | extras["workflow"] | extras["dev"] == requirements
