"""What every distillation job of an EDM teacher does around its objective: load and check the
teacher, fingerprint the run for resuming, train with the shared loop, publish snapshots and the
student. One place, so the methods (cd, cd-continuous, dmd; pd per stage) differ only in their loss."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

import torch

from ..io import sha256_file
from ..modelio import load_model, model_snapshots, save_model
from ..train import TrainConfig, publish_snapshots, train


def load_edm_teacher(teacher_dir: str | Path, device, method: str) -> tuple[torch.nn.Module, dict]:
    teacher, meta = load_model(teacher_dir, device)
    if meta["kind"] != "edm":
        raise ValueError(f"{teacher_dir} is a {meta['kind']} model; {method} needs an EDM teacher")
    return teacher, meta


# In the fingerprint of every run whose trained nets are the teacher's without dropout (PD, DMD): a
# checkpoint of the same config written while they kept the teacher's dropout is not resumed.
NO_DROPOUT = {"trained_nets_dropout": 0.0}


def _dropout_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]


def has_dropout(module: torch.nn.Module) -> bool:
    """Whether any dropout layer of `module` drops anything (p > 0)."""
    return any(m.p > 0 for m in _dropout_layers(module))


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with every dropout layer at p = 0 (its net config: `dict(net, dropout=0.0)`).

    The networks a distillation method trains from its teacher (PD's students, DMD's generator and fake
    score) run without the teacher's dropout, as the references build them: consistency_models_cifar10
    configs/cifar10_ve_progressive_distillation.py (`model.dropout = 0.0`), google-research
    diffusion_distillation config/cifar_distill.py ("same as teacher but with 0 dropout"), DMD2
    main/edm/edm_network.py (`dropout=0.0` for real score, fake score and generator); CD's student
    likewise (cd.student_net_config). The layers stay, so the weights load into the same architecture.
    """
    out = copy.deepcopy(model)
    for m in _dropout_layers(out):
        m.p = 0.0
    return out


def run_fingerprint(cfg: Mapping[str, Any], subset_path: str | Path, teacher_dir: str | Path, **extra) -> str:
    """The run's identity for resuming: its spec without the training settings (train() adds those),
    the subset's and the teacher's checksums."""
    return json.dumps({"spec": {k: v for k, v in cfg.items() if k != "train"}, "subset": sha256_file(subset_path),
                       "teacher": sha256_file(Path(teacher_dir) / "model.safetensors"), **extra}, sort_keys=True)


def train_student(objective, images: torch.Tensor, rows, tcfg: TrainConfig, accelerator, cfg: Mapping[str, Any],
                  subset_path: str | Path, teacher_dir: str | Path, out_dir: str | Path, meta: Mapping[str, Any],
                  method: str, checkpoint_dir: str | Path | None, metrics_log: str | Path | None,
                  labels: torch.Tensor | None = None, fingerprint_extra: Mapping[str, Any] | None = None,
                  **stats) -> dict:
    """Train `objective` with its snapshots, then write the student (main process) and return its stats.
    `fingerprint_extra`: what the method's code fixes beyond its config, so that a checkpoint written
    before it changed is not resumed."""
    snapshots = model_snapshots(cfg.get("snapshots"), checkpoint_dir, out_dir, meta, method)
    ema, out = train(objective, images, rows, tcfg, accelerator, checkpoint_dir,
                     run_fingerprint(cfg, subset_path, teacher_dir, **(fingerprint_extra or {})), snapshots,
                     metrics_log, labels)
    out.update(method=method, teacher=str(teacher_dir), **stats)
    if accelerator.is_main_process:
        publish_snapshots(snapshots, out_dir)
        save_model(out_dir, ema, meta, out)
    accelerator.end_training()
    return out
