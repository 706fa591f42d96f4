# Config validation, name lookups and command lines shared by every rule file.
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)

from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod

from pipeline import config as pconfig
from pipeline import replicates
from pipeline.shards import num_shards
from pipeline.memorization import DEFAULT_RATIO, SSCD_THRESHOLD

# `--sdm conda` (or `software-deployment-method: conda` in a profile) without conda on PATH would
# otherwise fail later inside Snakemake ("Error running conda info") or in every job.
if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method and not any(
    shutil.which(tool) for tool in ("conda", "mamba")
):
    raise WorkflowError(
        "software deployment method `conda` was asked for (--sdm conda or the profile's "
        "software-deployment-method), but neither conda nor mamba is on PATH: install one, or drop the "
        "option to run every rule in the environment snakemake was started from (requirements.txt)"
    )

CFG = pconfig.validate(config, source="the Snakemake config")
# Published values beside the tables that name them (`paper`); the path is relative to the repository.
# Loading checks every such table against the file before any job starts.
pconfig.load_published(CFG, root=workflow.basedir)
PUBLISHED_FILE = os.path.join(workflow.basedir, CFG["published"]) if "published" in CFG else None
MODELS = pconfig.models_of(CFG)
STUDENTS = CFG.get("students", {})
SELECTIONS = CFG.get("teacher_selections", {})
SAMPLE_FIGURES = CFG.get("sample_figures", {})
SPACE = CFG["memorization"].get("space", "pixels")

# Every rule runs the package from this checkout (`python -m pipeline ...`), whichever
# environment it runs in; the prefix keeps Snakemake's strict bash mode.
shell.prefix(f'set -euo pipefail; export PYTHONPATH="{SRC}${{{{PYTHONPATH:+:$PYTHONPATH}}}}"; ')


def _names(names):
    names = list(names)
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) if names else "(?!)"


SNAPSHOT_RUNS = sorted(pconfig.base_model(m) for m, kind in MODELS.items() if kind == "snapshots")
YARDSTICKS = pconfig.yardstick_settings(CFG)
YARDSTICK_SAMPLER = pconfig.YARDSTICK_SAMPLER
# Every (model or yardstick, sampler) pair some table reads.
TABLE_ROWS = {t: pconfig.table_rows(CFG, t) for t in CFG["tables"]}
YARDSTICK_IDS = {m for rows in TABLE_ROWS.values() for r in rows if r["role"] == "yardstick" for m in r["replicates"]}
# With a calibrated copy threshold, every table row's real held-out yardstick, in tables without yardsticks too.
YARDSTICK_IDS = sorted(YARDSTICK_IDS | {pconfig.calibration_yardstick(CFG, m) for m, _ in pconfig.all_pairs(CFG)} - {None})
# The `ysubset` wildcard of a yardstick's directory `<kind>~<ysubset>`: a subset, or a replicate of it (`digits-48.r1`).
YARDSTICK_SUBSETS = sorted({m.partition("~")[2] for m in YARDSTICK_IDS})


wildcard_constraints:
    run=_names(set(SNAPSHOT_RUNS)),
    step=r"[1-9]\d*",
    subset=_names(CFG["subsets"]),
    refdata=_names(CFG["datasets"]),
    teacher=_names(CFG["teachers"]),
    student=_names(STUDENTS),
    model=_names(list(MODELS) + YARDSTICK_IDS),
    sampler=_names(list(CFG["samplers"]) + ([YARDSTICK_SAMPLER] if YARDSTICK_IDS else [])),
    kind=_names(YARDSTICKS["kinds"]),
    ysubset=_names(YARDSTICK_SUBSETS),
    table=_names(CFG["tables"]),
    curve=_names([t for t, spec in CFG["tables"].items() if "figure" in spec]),
    shard=r"\d{5}",


def as_json(obj):
    return json.dumps(obj, sort_keys=True)


def compute(entry):
    return entry.get("compute", {})


def accelerate_launch(spec):
    """The launcher of a rule's training process: N GPUs (optionally DeepSpeed ZeRO) through `accelerate launch`.

    A one-process CPU job skips the launcher: `accelerate launch` would import torch and accelerate
    only to start one child process (seconds per job), and for one CPU process it sets nothing but the
    environment that `Accelerator()` reads, set here directly (accelerate/utils/launch.py,
    `prepare_simple_launcher_cmd_env`).
    """
    c = compute(spec)
    gpus = c.get("gpus", 0)
    precision = c.get("mixed_precision", "no")
    dynamo = "inductor" if c.get("compile") else "no"
    if gpus == 0 and not c.get("accelerate_config"):
        env = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": precision,
               "ACCELERATE_DYNAMO_BACKEND": dynamo.upper(), "KMP_AFFINITY": "granularity=fine,compact,1,0",
               "KMP_BLOCKTIME": "1"}
        return " ".join(f"{k}={v}" for k, v in env.items()) + " python -m pipeline"
    args = ["accelerate launch", "--num_machines 1", f"--mixed_precision {precision}", f"--dynamo_backend {dynamo}"]
    if gpus == 0:
        args += ["--cpu", "--num_processes 1"]
    elif gpus == 1:
        args += ["--num_processes 1"]
    else:
        args += ["--multi_gpu", f"--num_processes {gpus}"]
    if c.get("accelerate_config"):
        args += [f"--config_file {c['accelerate_config']}"]
    return " ".join(args) + " -m pipeline"


# Training starts before the sampling and measuring that is ready beside it: it is the long work, and
# everything after it waits on it (in the evidence run, a teacher scheduled behind sampling jobs and
# its student then ran alone for the last quarter of an hour). Teachers first: students wait on them.
TEACHER_PRIORITY, STUDENT_PRIORITY = 2, 1


def cpus_per_task(spec, default=2):
    """A job's CPU threads, which is also what the scheduler is asked for: `compute.cpus_per_task`,
    by default 2 for a training rule and 1 for the sampling stages (SAMPLING_CPUS)."""
    return compute(spec).get("cpus_per_task", default)


def gpu_resources(spec, runtime=60, mem_mb=8000, attempt=1):
    """A rule's scheduler request from its config entry's `compute`. A retry (attempt 2, 3, ...) asks
    for `attempt` times the runtime and half as much memory again per attempt: a job that ran out of
    time resumes from its checkpoint with more of it."""
    c = compute(spec)
    return dict(
        gpu=c.get("gpus", 0),
        runtime=c.get("runtime", runtime) * attempt,
        mem_mb=int(c.get("mem_mb", mem_mb) * (1 + (attempt - 1) / 2)),
        cpus_per_task=cpus_per_task(spec),
    )


def partition_for(gpus):
    """A job's SLURM partition by its GPU count: $MEMDISTILL_SLURM_GPU_PARTITION when it asks for GPUs,
    else $MEMDISTILL_SLURM_PARTITION (the profile's default for rules without GPUs), so a rule
    configured with `compute.gpus: 0` queues with the CPU work. Read from the environment like the
    profile's values; an unset variable stays literal and fails on submission, as there."""
    return os.path.expandvars("$MEMDISTILL_SLURM_GPU_PARTITION" if gpus else "$MEMDISTILL_SLURM_PARTITION")


def preemptible_shell(command):
    """The shell of a training rule, which SLURM may stop at its time limit, on scancel or preemption.

    SLURM's `--signal` (and `scancel -s TERM`) sends SIGTERM to every process of the job step; training
    then saves a checkpoint and exits non-zero. The shell and `accelerate launch` between Snakemake and
    it ignore SIGTERM/SIGUSR1, so neither ends the step first (Python re-arms its own handlers).
    Snakemake removes a rule's log before each attempt, so every attempt writes its own file beside the
    checkpoints and the rule's log is rebuilt from all of them: a retry keeps the failed attempt's lines.
    While an attempt runs, the rule's log is a symbolic link to its file, so `tail -f` on the log the
    README names follows training live; the link is replaced by the assembled file at the end.
    """
    start = (
        "trap '' TERM USR1; mkdir -p {params.ckpt}/logs; attempt={params.ckpt}/logs/attempt-$(date +%s%N).log; "
        'echo "=== attempt started $(date -Is) on $(hostname)${{SLURM_JOB_ID:+, SLURM job $SLURM_JOB_ID}}" > $attempt; '
        'ln -sfn "$PWD/$attempt" {log.main}'
    )
    end = ("rm -f {log.main}; cat {params.ckpt}/logs/attempt-*.log > {log.main}; "
           "if [ $status -eq 0 ]; then rm -r {params.ckpt}/logs; fi; exit $status")
    return f"{start}; status=0; {command} >> $attempt 2>&1 || status=$?; {end}"


def gpus_required(spec):
    """What the job computes on: `python -m pipeline` stops at once when CUDA sees fewer GPUs."""
    return compute(spec).get("gpus", 0)


# Text-to-image branch: latent diffusion backbones, their fine-tuned teachers and LCM students.
BACKBONES = CFG.get("backbones", {})
MINIATURES = [b for b, e in BACKBONES.items() if e["kind"] == "miniature"]
PRETRAINED_DIRS = {e["path"]: b for b, e in BACKBONES.items() if e["kind"] == "pretrained"}
TEXT_TEACHERS = [t for t, e in CFG["teachers"].items() if "backbone" in e]
EDM_TEACHERS = [t for t in CFG["teachers"] if t not in TEXT_TEACHERS]
LCM_STUDENTS = [s for s, e in STUDENTS.items() if e["method"] == "lcm"]
EDM_STUDENTS = [s for s in STUDENTS if s not in LCM_STUDENTS]  # cd, pd, dmd: students of EDM teachers


def backbone_file(backbone):
    """The file that stands for a backbone folder: fetch_sd15's manifest, or build_backbone's model index."""
    d = pconfig.backbone_dir(CFG, backbone)
    return f"{d}/checksums.json" if BACKBONES[backbone]["kind"] == "pretrained" else f"{d}/model_index.json"


def latents_file(subset, backbone):
    return f"results/latents/{subset}/{backbone}.safetensors"


def text_teacher_latents(teacher):
    entry = CFG["teachers"][teacher]
    return latents_file(entry["subset"], entry["backbone"])


def refine_teacher_files(wc):
    """A refine sampler's teacher: the weights and config of the student's own teacher."""
    if CFG["samplers"].get(wc.sampler, {}).get("kind") != "refine":
        return []
    files = model_files(pconfig.teacher_of(CFG, wc.model))
    return [files["weights"], files["config"]]


def model_files(model):
    d = pconfig.model_dir(CFG, model, MODELS)
    return {"weights": f"{d}/model.safetensors", "config": f"{d}/config.json", "stats": f"{d}/stats.json"}


def yardstick_subset(wc):
    """The configured subset of a yardstick job (its `ysubset` may name a replicate)."""
    return replicates.split(wc.ysubset)[0]


def subset_file(subset):
    return f"results/subsets/{subset}.parquet"


def dataset_subset_files(dataset):
    """Every configured subset of a dataset: the images its held-out split must avoid."""
    return [subset_file(s) for s, spec in CFG["subsets"].items() if spec["dataset"] == dataset]


SSCD = CFG["memorization"].get("sscd")


def sscd_weights_file():
    """The SSCD TorchScript file: `memorization.sscd.weights`, else the one fetch_sscd places."""
    return (SSCD or {}).get("weights", SSCD_WEIGHTS)


def sscd_preprocessing():
    return (SSCD or {}).get("preprocessing", "official")


CLIP = CFG["quality"].get("clip")
# Descriptor spaces whose sample embeddings some rule reads.
# The copy-detection descriptor: SSCD, or on the embedded data the digits classifier's features (`digits`).
SIM = "digits" if (SSCD or {}).get("descriptor") == "digits_classifier" else "sscd"
EMBED_SPACES = ([SIM] if SSCD is not None else []) + (["clip", "clip-text"] if CLIP is not None else [])


def clip_model_dir():
    return (CLIP or {}).get("weights", CLIP_DIR)


def embedding_weights(space):
    """What a space embeds with: the SSCD file, or the CLIP directory (its fetch manifest when fetch_clip
    provides it, its config.json for a directory placed by hand)."""
    if space == "sscd":
        return sscd_weights_file()
    if space == "digits":
        return f"{DIGITS_CLASSIFIER}/model.safetensors"
    if "weights" in (CLIP or {}):
        return os.path.join(CLIP["weights"], "config.json")
    return os.path.join(CLIP_DIR, "checksums.json")


def embedding_options(space):
    if space == "sscd":
        return f"--preprocessing {sscd_preprocessing()} --weights {sscd_weights_file()}"
    if space == "digits":
        return f"--weights {DIGITS_CLASSIFIER}"
    return f"--weights {clip_model_dir()}"


def prompt_conditioned(model):
    """Whether a model's samples (or a yardstick's images) carry prompts: text-to-image models and the
    yardsticks of image-prompt subsets."""
    parsed = pconfig.parse_yardstick(model)
    if parsed:
        return CFG["subsets"][parsed[1]]["kind"] == "text_memorization"
    return pconfig.backbone_of(CFG, model) is not None


# ImageNet cannot be fetched (each user obtains it under its licence): the configured local copy
# (`train_dir` folder or `archive`) is converted once into memory-mappable 64x64 arrays.
IMAGENET = {name: d for name, d in CFG["datasets"].items() if d["source"] == "imagenet64"}


def imagenet_raw(dataset_cfg):
    """The user's ImageNet copy a dataset entry names: its training folder or its archive."""
    return dataset_cfg.get("train_dir", dataset_cfg.get("archive"))


IMAGENET_RAW = {imagenet_raw(d): name for name, d in IMAGENET.items()}
COCO = {name: d for name, d in CFG["datasets"].items() if d["source"] == "coco2017"}
COCO_CAPTIONS = sorted({d["captions_file"] for d in COCO.values()})
COCO_IMAGES = {d["images_dir"]: d["captions_file"] for d in COCO.values()}
IMAGENET_PREPARED = {d["prepared"]: name for name, d in IMAGENET.items()}


def imagenet_entry(wc):
    """The dataset entry whose prepared directory a prepare_imagenet64 job writes."""
    return IMAGENET[IMAGENET_PREPARED[wc.imagenet_dir]]


def dataset_inputs(dataset_cfg):
    """Raw files a dataset source reads (none for digits: it ships with scikit-learn)."""
    if dataset_cfg["source"] == "cifar10":
        return [dataset_cfg.get("archive", CIFAR10_ARCHIVE)]
    if dataset_cfg["source"] == "imagenet64":
        return [os.path.join(dataset_cfg["prepared"], "manifest.json")]
    if dataset_cfg["source"] == "pairs":
        return [os.path.join(dataset_cfg["dir"], "metadata.jsonl")]
    if dataset_cfg["source"] == "coco2017":
        return [dataset_cfg["captions_file"], dataset_cfg["images_dir"]]
    return []


def subset_inputs(wc):
    """Raw files of the subset's dataset, and of its extra pairs' dataset where that is another."""
    extra = pconfig.extra_dataset_of_subset(CFG, wc.subset)
    return dataset_inputs(pconfig.dataset_of_subset(CFG, wc.subset)) + (dataset_inputs(extra) if extra else [])


def extra_dataset_args(wc):
    extra = pconfig.extra_dataset_of_subset(CFG, wc.subset)
    return "" if extra is None else f"--extra-dataset {shlex.quote(as_json(dataset_spec(extra)))}"


def dataset_spec(dataset_cfg):
    spec = dict(dataset_cfg)
    if spec["source"] == "cifar10":
        spec.setdefault("archive", CIFAR10_ARCHIVE)
    return spec


SAMPLING = CFG["sampling"]
SAMPLING_CPUS = cpus_per_task(SAMPLING, 1)


def on_sampling_gpus(command):
    """Shell commands on the sampling GPUs (sample, search, embed, metrics, audit) say how many they need."""
    return f"MEMDISTILL_GPUS={gpus_required(SAMPLING)} {command}"


def shard_files(model, sampler):
    count = num_shards(SAMPLING["num_samples"], pconfig.shard_size(CFG, sampler))
    return [f"results/samples/{model}/{sampler}/shard-{k:05d}.parquet" for k in range(count)]


# A sampler whose sets fit one shard writes shard and manifest in one job (sample_set); the others one
# job per shard and a manifest job. The split is by sampler name, so the rules' wildcards never overlap.
ONE_SHARD_SAMPLERS = [s for s in CFG["samplers"] if num_shards(SAMPLING["num_samples"], pconfig.shard_size(CFG, s)) == 1]
SHARDED_SAMPLERS = [s for s in CFG["samplers"] if s not in ONE_SHARD_SAMPLERS]


def table_files(table):
    return [f"results/tables/{table}.{ext}" for ext in ("csv", "md", "html")]


def figure_file(model, sampler):
    return f"results/figures/{model}/{sampler}-neighbours.png"


def all_targets():
    out = []
    for table in CFG["tables"]:
        out += table_files(table)
    out += [figure_file(m, s) for m, s in pconfig.all_pairs(CFG)]
    out += [f"results/figures/{t}.png" for t, spec in CFG["tables"].items() if "figure" in spec]
    out += [f"results/figures/{f}.png" for f in SAMPLE_FIGURES]
    return out


def student_teacher(wc):
    return STUDENTS[wc.student]["teacher"]


def lpips_options(student):
    """The LPIPS metric's options with the backbone file resolved (fetched by fetch_lpips_backbone)."""
    opts = dict(student.get("lpips", {}))
    opts.setdefault("net", "vgg")
    opts.setdefault("weights", os.path.join("data", "weights", KNOWN_FILES[f"lpips-{opts['net']}"]["dest"]))
    return opts


def distill_spec(student):
    """What the distill command gets: the student entry with its network and metric files resolved."""
    spec = {k: v for k, v in student.items() if k not in ("teacher", "method", "compute", "net")}
    if "net" in student:
        spec["net_config"] = CFG["nets"][student["net"]]
    if uses_lpips(student):
        spec["lpips"] = lpips_options(student)
    return spec


def uses_lpips(student):
    """Whether a student's loss (or DMD's regression loss) is LPIPS, which reads a fetched backbone."""
    regression = student.get("dmd", {}).get("regression", {})
    return student.get("metric") == "lpips" or regression.get("metric", "lpips" if regression else None) == "lpips"


def distill_extra_inputs(wc):
    student = STUDENTS[wc.student]
    return [lpips_options(student)["weights"]] if uses_lpips(student) else []


def output_dir(wc, output):
    """The model directory of a training rule, derived from its declared weights file."""
    return os.path.dirname(output.weights)


# Quality metric: reference statistics and the network that embeds images for it.
QUALITY = CFG["quality"]
REFERENCE = CFG["datasets"][QUALITY["reference"]]
REFERENCE_SET = QUALITY.get("reference_set", "dataset")


def reference_file(dataset):
    """The full dataset's statistics: what models trained on its subsets are judged against."""
    return f"results/quality/reference/{QUALITY['kind']}-{dataset}.npz"


def subset_reference_file(subset):
    return f"results/quality/reference/{QUALITY['kind']}-subset-{subset}.npz"


def reference_stats_input(wc):
    """The statistics a (model, sampler) is judged against: those of the dataset its training subset
    was drawn from (CIFAR-10 rows against CIFAR-10, ImageNet rows against ImageNet), or of the subset."""
    subset = pconfig.subset_of(CFG, wc.model)
    # Image-prompt collections (COCO's 118k images, a pairs folder) are never loaded whole: their rows are
    # judged against their training subset's statistics.
    if REFERENCE_SET == "subset" or pconfig.dataset_of_subset(CFG, subset)["source"] in ("coco2017", "pairs"):
        return subset_reference_file(subset)
    return reference_file(CFG["subsets"][subset]["dataset"])


DIGITS_CLASSIFIER = "results/quality/digits-classifier"


def feature_net_arg(wc, input):
    """What the quality metric embeds with: the digits classifier's directory, or clean-fid's Inception weights."""
    if QUALITY["kind"] == "digits_fd":
        return os.path.dirname(input.feature_net)
    return input.feature_net


# Input and argument functions of the per-set rules (sample, search, metrics): one input function and
# one params function per rule, because each callable costs Snakemake a signature inspection per job
# and these rules are most of the paper grid's jobs.
def search_inputs(wc):
    """A sample set and its training subset, and their SSCD descriptors where configured."""
    subset = pconfig.subset_of(CFG, wc.model)
    files = {"subset": subset_file(subset), "manifest": f"results/samples/{wc.model}/{wc.sampler}/manifest.json"}
    if SSCD is not None:
        files["sscd_samples"] = f"results/embeddings/{SIM}/{wc.model}/{wc.sampler}.npy"
        files["sscd_train"] = f"results/embeddings/{SIM}/subsets/{subset}.npy"
    return files


def metrics_inputs(wc):
    """What a (model, sampler) is measured from."""
    files = {"neighbours": f"results/neighbours/{SPACE}/{wc.model}/{wc.sampler}.parquet",
             "manifest": f"results/samples/{wc.model}/{wc.sampler}/manifest.json",
             "feature_net": FEATURE_NET, "reference": reference_stats_input(wc)}
    if not pconfig.parse_yardstick(wc.model):  # a trained model's stats.json; a yardstick has none
        files["model_stats"] = model_files(wc.model)["stats"]
    if SSCD is not None:
        files["sscd"] = f"results/neighbours/{SIM}/{wc.model}/{wc.sampler}.parquet"
        real = pconfig.calibration_yardstick(CFG, wc.model)  # its similarities set the copy threshold
        if real:
            files["sscd_calibration"] = f"results/neighbours/{SIM}/{real}/{YARDSTICK_SAMPLER}.parquet"
    if CLIP is not None and prompt_conditioned(wc.model):
        files["clip_images"], files["clip_texts"] = (f"results/embeddings/{s}/{wc.model}/{wc.sampler}.npy"
                                                     for s in ("clip", "clip-text"))
    return files


def metrics_options(wc, input):
    """The metrics command's optional flags, from the inputs metrics_inputs chose."""
    names = set(input.keys())
    flags = [f"--model-stats {input.model_stats}"] if "model_stats" in names else []
    if "sscd_calibration" in names:
        flags.append(f"--sscd-neighbours {input.sscd} --sscd-calibration {input.sscd_calibration} "
                     f"--sscd-calibration-quantile {SSCD['calibrate']['quantile']}")
    elif "sscd" in names:
        flags.append(f"--sscd-neighbours {input.sscd} --sscd-threshold {SSCD.get('threshold', SSCD_THRESHOLD)}")
    if "clip_images" in names:
        flags.append(f"--clip-images {input.clip_images} --clip-texts {input.clip_texts}")
    if QUALITY.get("prompt_class") and prompt_conditioned(wc.model):
        flags.append(f"--prompt-classifier {DIGITS_CLASSIFIER}")
    return " ".join(flags)


def sample_inputs(wc):
    """A sample job's inputs: the model, a text-to-image model's backbone, a refine sampler's teacher."""
    files = dict(model_files(wc.model))
    del files["stats"]
    backbone = pconfig.backbone_of(CFG, wc.model)  # a text-to-image model's; none for EDM models
    if backbone is not None:
        files["backbone"] = backbone_file(backbone)
    teacher = refine_teacher_files(wc)
    if teacher:
        files["teacher_weights"], files["teacher_config"] = teacher
    return files


def sample_arguments(wc, input, output):
    """The sample command's arguments for one job, quoted for the shell."""
    teacher = f" --teacher {os.path.dirname(input.teacher_weights)}" if "teacher_weights" in input.keys() else ""
    manifest = f" --manifest {output.manifest}" if "manifest" in output.keys() else ""
    return (f"--model {pconfig.model_dir(CFG, wc.model, MODELS)} --model-id {wc.model} --sampler-name {wc.sampler} "
            f"--sampler {shlex.quote(as_json(pconfig.sampler_spec(CFG, wc.sampler)))} "
            f"--shard {int(wc.shard) if 'shard' in wc.keys() else 0} --shard-size {pconfig.shard_size(CFG, wc.sampler)} "
            f"--num-samples {SAMPLING['num_samples']} --seed {pconfig.sampling_seed(CFG, wc.model)} "
            f"--batch-size {SAMPLING.get('batch_size', 256)}{teacher}{manifest}")
