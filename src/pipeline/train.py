"""The accelerate training loop shared by teacher training and every distillation method.

A method supplies an objective (what to minimize, and what to update after each optimizer step);
this loop owns everything else: data sharding across processes, optimizer, learning-rate ramp,
weight EMA, gradient clipping, resumable checkpoints, progress and loss logging.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .checkpoint import CheckpointStore, StopSignals
from .diffusion.noise import BatchNoise, step_seed
from .io import atomic_output
from .cluster import TrainingInterrupted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    lr: float
    batch_per_process: int | None = None
    optimizer: str = "adam"
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    lr_rampup_steps: int = 0
    lr_decay: str = "constant"
    ema_halflife_kimg: float = 500.0
    ema_rate: float | None = None
    ema_rampup_ratio: float | None = 0.05
    grad_clip: float | None = None
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 0
    channels_last: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        kw = {k: (tuple(v) if k == "betas" else v) for k, v in d.items() if k in names}
        return cls(**kw)


class Objective(Protocol):
    model: torch.nn.Module

    def loss(self, model: torch.nn.Module, y: torch.Tensor, noise: BatchNoise,
             labels: torch.Tensor | None = None) -> torch.Tensor: ...

    def after_step(self, model: torch.nn.Module, step: int) -> None: ...

    def extra_modules(self) -> dict[str, torch.nn.Module]: ...


def ema_beta(cfg: TrainConfig, images_seen: int) -> float:
    """EDM's EMA: half-life in images, ramped up over the first part of training; or a fixed rate
    per step (`ema_rate`; 0 keeps the raw weights, as progressive distillation's reference does)."""
    if cfg.ema_rate is not None:
        return float(cfg.ema_rate)
    halflife = cfg.ema_halflife_kimg * 1000
    if cfg.ema_rampup_ratio is not None:
        halflife = min(halflife, images_seen * cfg.ema_rampup_ratio)
    return 0.5 ** (cfg.batch_size / max(halflife, 1e-8))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, beta: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - beta)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


class _IndexStream:
    """Epoch-style shuffled indices of the global batch: every training row is seen once per epoch.

    Every process follows the same stream and keeps its slice of each global batch, so the data order
    does not depend on the number of processes. Subsets here fit in device memory, so batches are
    gathered from a resident tensor instead of a DataLoader, which would spend more time in worker
    plumbing than in the model on small images.
    """

    def __init__(self, rows: np.ndarray, seed: int):
        self.rows = rows
        self.rng = np.random.default_rng(seed)
        self.buf = np.empty(0, dtype=np.int64)

    def take(self, n: int) -> np.ndarray:
        while self.buf.size < n:
            self.buf = np.concatenate([self.buf, self.rng.permutation(self.rows)])
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state, "buf": self.buf.tolist()}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]
        self.buf = np.asarray(state["buf"], dtype=np.int64)


class Snapshots:
    """EMA weights saved at chosen steps along training, for memorization and quality along the way.

    They are written as they happen into `root` (beside the resumable checkpoint, so a job killed and
    retried keeps the ones it already wrote) by `save(directory, ema_model, step)`, then published
    into the model's output directory once training ends.
    """

    def __init__(self, steps, root: str | Path, save: Callable[[Path, torch.nn.Module, int], None]):
        self.steps = sorted({int(s) for s in steps})
        self.root = Path(root)
        self.save = save

    def path(self, step: int) -> Path:
        return self.root / f"step-{step}"

    def prune_after(self, step: int) -> None:
        """Drop snapshots past `step`: a (re)start from `step` writes them again."""
        if self.root.exists():
            for d in self.root.glob("step-*"):
                if d.name[5:].isdigit() and int(d.name[5:]) > step:
                    shutil.rmtree(d)

    def publish(self, out_root: str | Path) -> list[Path]:
        """Copy every snapshot into `out_root/step-K`, failing loudly if one was never written."""
        out_root = Path(out_root)
        out_root.mkdir(parents=True, exist_ok=True)
        published = []
        for step in self.steps:
            src, dst = self.path(step), out_root / f"step-{step}"
            if not (src / "model.safetensors").exists():
                raise RuntimeError(f"snapshot at step {step} was not written to {src}")
            if src.resolve() != dst.resolve():
                if dst.exists():
                    shutil.rmtree(dst)
                shutil.copytree(src, dst)
            published.append(dst)
        return published


def publish_snapshots(snapshots: Snapshots | None, out_dir: str | Path) -> None:
    """Fill `out_dir/snapshots` (a declared output of every training rule, empty without snapshots)."""
    root = Path(out_dir) / "snapshots"
    root.mkdir(parents=True, exist_ok=True)
    if snapshots is not None:
        snapshots.publish(root)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The rate of optimizer step `step` (0-based): EDM's linear ramp-up over `lr_rampup_steps`, times a
    linear decay to 0 at the run's end with `lr_decay: linear` (progressive distillation, per stage:
    consistency_models_cifar10 jcm/losses.py get_optimizer, optax.linear_schedule(lr, 0, steps))."""
    lr = cfg.lr
    if cfg.lr_rampup_steps:
        lr *= min((step + 1) / cfg.lr_rampup_steps, 1.0)
    if cfg.lr_decay == "linear":
        lr *= 1.0 - step / cfg.steps
    elif cfg.lr_decay != "constant":
        raise ValueError(f"unknown lr_decay {cfg.lr_decay!r}; known: constant, linear")
    return lr


def _optimizer(cfg: TrainConfig, params):
    opts = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}
    if cfg.optimizer not in opts:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; known: {sorted(opts)}")
    return opts[cfg.optimizer](params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def _max_memory_mb(device: torch.device) -> float:
    """Peak memory so far: the device's allocator on CUDA, this process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLog:
    """One JSON line per log point (step, loss, lr, images/s, peak memory, attempt) for plotting while
    training runs. The records travel in the checkpoint, so a resumed job rewrites the earlier ones
    first and the file always holds the whole run."""

    def __init__(self, path: str | Path | None, enabled: bool):
        self.path = Path(path) if path and enabled else None

    def restart(self, records: list[dict]) -> None:
        if self.path:
            with atomic_output(self.path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in records))

    def append(self, record: dict) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def split_batch(batch_size: int, processes: int, batch_per_process: int | None) -> tuple[int, int]:
    """(micro-batch, accumulation steps): the global batch split over processes, then into micro-batches
    of at most `batch_per_process` rows (NVlabs/edm training/training_loop.py: `batch_gpu`,
    `num_accumulation_rounds = batch_gpu_total // batch_gpu`)."""
    if batch_size % processes:
        raise ValueError(f"batch_size {batch_size} is not divisible by {processes} processes")
    local = batch_size // processes
    micro = min(local, batch_per_process or local)
    if local % micro:
        raise ValueError(f"{local} rows per process do not split into micro-batches of {micro} "
                         f"(batch_per_process); choose a divisor of {local}")
    return micro, local // micro


def train(objective: Objective, images: torch.Tensor, rows: np.ndarray, cfg: TrainConfig,
          accelerator: Accelerator, checkpoint_dir: str | Path | None = None,
          fingerprint: str = "", snapshots: Snapshots | None = None,
          metrics_log: str | Path | None = None, labels: torch.Tensor | None = None) -> tuple[torch.nn.Module, dict]:
    """Run `cfg.steps` optimizer steps; return (EMA model on CPU, stats).

    images: unique training images (N, C, H, W) in [-1, 1]; rows: positions into `images`, with a
    row repeated as often as that image is repeated in the training set; labels: the class of each
    image (N,), given to the objective with its batch for a class-conditional model, else None.
    The global batch is split
    evenly across processes, then into micro-batches whose gradients are accumulated; its data order
    and noise are drawn for the whole global batch (diffusion/noise.py), so the same config trains the
    same model on 1 or N GPUs with or without accumulation, up to float summation order (dropout
    masks, drawn per micro-batch, are the exception).
    A checkpoint is resumed only if it carries the same `fingerprint` (the caller's description of
    data, network and method) and the same training config up to its length and logging, so a
    changed run restarts instead of continuing a different one, while a longer run continues.
    `snapshots` saves the EMA weights at its steps (main process only); `metrics_log` is the JSON-lines
    file of the log points (main process only).
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    micro, accumulation = split_batch(cfg.batch_size, world, cfg.batch_per_process)
    local_batch = micro * accumulation
    device = accelerator.device
    images = images.to(device)
    if labels is not None:
        if labels.shape != (len(images),):
            raise ValueError(f"{tuple(labels.shape)} labels for {len(images)} images: need one class per image")
        labels = labels.to(device=device, dtype=torch.long)

    model = objective.model
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=layout)  # NHWC convolutions: faster on tensor cores, identical results
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = _optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    accelerator.gradient_accumulation_steps = accumulation
    deepspeed = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed is not None:  # no DataLoader goes through prepare() to tell DeepSpeed the micro-batch
        deepspeed.deepspeed_config.update(train_micro_batch_size_per_gpu=micro,
                                          gradient_accumulation_steps=accumulation)
    model, opt = accelerator.prepare(model, opt)
    stream = _IndexStream(rows, cfg.seed)
    gen = torch.Generator(device=device)

    start, history, running, prior_seconds, attempts = 0, [], [], 0.0, []
    store = CheckpointStore(checkpoint_dir) if checkpoint_dir else None
    extras = {"ema": ema, **objective.extra_modules()}
    for m in extras.values():
        if isinstance(m, torch.nn.Module):  # an objective's optimizer (DMD's fake score) travels as it is
            m.to(device)
    resumable = {k: v for k, v in asdict(cfg).items()
                 if k not in ("steps", "log_every", "checkpoint_every", "batch_per_process", "channels_last")}
    fingerprint = json.dumps({"run": fingerprint, "train": resumable, "noise": "global-batch"}, sort_keys=True)
    found = store.newest_valid(fingerprint, cfg.steps) if store else None
    if found:
        directory, progress = found
        state = store.load(directory, progress, accelerator, extras)
        stream.load_state_dict(state["stream"])
        start, history, running = progress["step"], progress["history"], progress.get("running", [])
        prior_seconds, attempts = progress.get("seconds", 0.0), progress.get("attempts", [])
        log.info("resumed from %s at step %d", directory, start)
    elif store:
        store.discard(accelerator)
    accelerator.step = 0  # accelerate's micro-batch counter: every optimizer step starts a new round
    if snapshots is not None and accelerator.is_main_process:
        snapshots.prune_after(start)
        pending = [k for k in snapshots.steps if k > cfg.steps]
        if pending:
            raise ValueError(f"snapshot steps {pending} lie beyond the run's {cfg.steps} steps")

    metrics = MetricsLog(metrics_log, accelerator.is_main_process)
    metrics.restart(history)
    t0 = last_log = time.time()
    last_step = start
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not accelerator.is_main_process,
               desc="train", mininterval=5)
    running = [torch.tensor(x, device=device) for x in running]

    def save(done: int) -> Path:
        elapsed = time.time() - t0
        progress = {"history": history, "fingerprint": fingerprint, "seconds": prior_seconds + elapsed,
                    "running": [float(x) for x in running],  # losses since the last log line
                    "attempts": attempts + [{"from_step": start, "seconds": elapsed}]}
        return store.save(accelerator, done, extras, {"stream": stream.state_dict()}, progress)

    # fp16's loss scaler finds inf gradients itself and skips that step; clamping them would hide them.
    scaled = accelerator.mixed_precision == "fp16"
    with StopSignals() as stop:
        for step in bar:
            if cfg.lr_rampup_steps or cfg.lr_decay != "constant":
                for g in opt.param_groups:
                    g["lr"] = learning_rate(cfg, step)
            batch = torch.from_numpy(stream.take(cfg.batch_size)).to(device)
            seed = step_seed(cfg.seed, step)
            loss = 0.0
            for j in range(accumulation):
                lo = rank * local_batch + j * micro
                gen.manual_seed(seed)  # every micro-batch draws the global batch's noise and keeps its rows
                torch.manual_seed(step_seed(seed, lo))  # dropout masks: per micro-batch, reproducible on resume
                with accelerator.accumulate(model):
                    rows_j = batch[lo:lo + micro]
                    y = images[rows_j].contiguous(memory_format=layout)
                    # Under mixed precision the frozen networks an objective calls (a distillation teacher,
                    # a consistency target, DMD's scores) run under the same autocast as the trained one,
                    # as the references run them; accelerate's prepare() reaches the trained net only.
                    with accelerator.autocast():
                        part = objective.loss(model, y, BatchNoise(gen, cfg.batch_size, lo, lo + micro),
                                              None if labels is None else labels[rows_j]).mean()
                    accelerator.backward(part)
                    loss = loss + part.detach() / accumulation
                    if accelerator.sync_gradients:
                        if cfg.grad_clip:
                            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                        if not scaled:  # EDM: keep a rare inf/nan from poisoning the weights
                            for p in model.parameters():
                                if p.grad is not None:
                                    torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
                        opt.step()
                        opt.zero_grad(set_to_none=True)
            images_seen = (step + 1) * cfg.batch_size
            ema_update(ema, accelerator.unwrap_model(model), ema_beta(cfg, images_seen))
            objective.after_step(accelerator.unwrap_model(model), step)
            running.append(loss.detach())
            if snapshots is not None and step + 1 in snapshots.steps and accelerator.is_main_process:
                snapshots.save(snapshots.path(step + 1), ema, step + 1)
                log.info("snapshot of the EMA weights at step %d in %s", step + 1, snapshots.path(step + 1))
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                mean = accelerator.gather(torch.stack(running).mean().reshape(1)).mean().item()
                running = []
                now = time.time()
                record = {"step": step + 1, "loss": mean, "lr": opt.param_groups[0]["lr"],
                          "images_per_second": (step + 1 - last_step) * cfg.batch_size / max(now - last_log, 1e-9),
                          "max_memory_mb": _max_memory_mb(device), "seconds": prior_seconds + now - t0,
                          "attempt": len(attempts) + 1}
                last_log, last_step = now, step + 1
                history.append(record)
                metrics.append(record)
                bar.set_postfix(loss=f"{mean:.4f}")
                log.info("step %d loss %.5f lr %.3g %.1f images/s", step + 1, mean, record["lr"],
                         record["images_per_second"])
            periodic = cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps)
            signum = stop.requested(accelerator)
            if store and (periodic or signum):
                saved = save(step + 1)
                log.info("checkpoint of step %d in %s", step + 1, saved)
            if signum:
                raise TrainingInterrupted(signum, step + 1, saved if store else None)
    accelerator.wait_for_everyone()
    seconds = time.time() - t0
    stats = {"steps": cfg.steps, "batch_size": cfg.batch_size, "processes": world, "micro_batch": micro,
             "accumulation_steps": accumulation,
             "images_seen": cfg.steps * cfg.batch_size, "seconds": prior_seconds + seconds,
             "attempts": attempts + [{"from_step": start, "seconds": seconds}],
             "final_loss": history[-1]["loss"] if history else math.nan, "history": history,
             "train_config": asdict(cfg)}
    return ema.to("cpu"), stats
