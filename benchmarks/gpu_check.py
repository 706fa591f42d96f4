"""One prepared check of every CUDA path, for the few minutes of a lent GPU (see BENCHMARKS.md).

Usage (on the GPU machine, from the repository root, results under $OUT):
  python benchmarks/gpu_check.py --out "$OUT" --budget-s 480
  python benchmarks/gpu_check.py --tiny --out /tmp/gpu-check     # CPU, tiny shapes, under a minute (tested)

Sections, in order (each timed, its result or its error recorded; a section that would start past the
budget is skipped and says so): the environment; teacher training steps/s and peak memory of the paper
backbones (ncsnpp-cifar10 at batch 512 in fp32 and bf16, adm-imagenet64-cond in bf16 at the largest batch
that fits), through the project's own training loop; NVlabs/edm's own training step on the same networks
and batches (from a checkout, --edm-repo) and our images/s over its as a ratio; consistency distillation
with LPIPS (the `lpips` package's VGG, random backbone); sampling images/s of a 1-step student against the Heun-18 teacher;
the exact search (pipeline.search.nearest_neighbours) on 50k x 50k x 512 float32 descriptors and on
10k x 50k x 3072 uint8 pixels, beside the float32 GEMM that bounds it and torch.cdist + topk, TF32 off,
with its answer checked against an exact float64 search on a slice; SSCD-shaped (ResNet-50, 512-d
head, 288 px) and CLIP-shaped (ViT-L/14, 224 px) embedding throughput with random weights; an
SD1.5-shaped UNet (random weights, the real config) fine-tune and LCM steps with bf16, gradient
checkpointing and a frozen teacher; torch.compile of the teacher; ZeRO-2 through the project's
accelerate config. gpu-check.json is rewritten after every section (a run cut short keeps what it
measured), gpu-check.md summarises it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pipeline import config as pconfig  # noqa: E402
from pipeline.nets import build_net, net_data_shape, trainable_parameters  # noqa: E402

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD15_TINY = dict(SD15_UNET, sample_size=8, layers_per_block=1, cross_attention_dim=32, block_out_channels=(32, 64),
                 attention_head_dim=4, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


class Check:
    """The shapes of one run: the paper's on a GPU, tiny ones on a CPU (--tiny)."""

    def __init__(self, tiny: bool):
        self.tiny = tiny
        self.device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
        self.cuda = self.device.type == "cuda"
        self.paper = pconfig.load(ROOT / "config" / "config.yaml")
        self.embedded = pconfig.load(ROOT / "config" / "embedded.yaml")

    def net(self, name: str):
        """(config, net config, resolution, channels) of a paper net, or of the embedded unet-tiny when tiny."""
        cfg = self.embedded if self.tiny else self.paper
        name = "unet-tiny" if self.tiny else name
        resolution, channels = net_data_shape(cfg, name)
        return cfg, cfg["nets"][name], resolution, channels

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def peak_mb(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2 ** 20 if self.cuda else None

    def reset_peak(self):
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def timed(check: Check, fn, repeats: int) -> float:
    """Best of `repeats` wall times of fn(), synchronised."""
    best = float("inf")
    for _ in range(repeats):
        check.sync()
        start = time.perf_counter()
        fn()
        check.sync()
        best = min(best, time.perf_counter() - start)
    return best


def environment(check: Check) -> dict:
    import faiss

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if check.cuda else f"CPU ({platform.machine()}, "
           f"{torch.get_num_threads()} threads)", "faiss": faiss.__version__, "faiss_gpus": int(faiss.get_num_gpus())}
    if check.cuda:
        out["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    return out


def _train(check: Check, net_name: str, batch: int, steps: int, precision: str, objective: str = "edm",
           distance=None) -> dict:
    """Steps of the project's training loop (pipeline.train.train) on random images, as
    benchmarks/train_throughput.py runs it: images/s over the steps after the first."""
    from accelerate import Accelerator

    from pipeline.diffusion import ConsistencyFunction, EDMDenoiser, karras_sigmas
    from pipeline.diffusion.loss import EDMLoss
    from pipeline.distill.cd import ConsistencyDistillation
    from pipeline.teacher import EDMObjective
    from pipeline.train import TrainConfig, train

    from accelerate.state import AcceleratorState

    cfg, net_cfg, resolution, channels = check.net(net_name)
    AcceleratorState._reset_state(True)  # one process measures several precisions
    accelerator = Accelerator(cpu=not check.cuda, mixed_precision=precision)
    torch.manual_seed(0)
    model = EDMDenoiser(build_net(net_cfg, resolution, channels))
    images = torch.rand(batch * 2, channels, resolution, resolution) * 2 - 1
    classes = pconfig.num_classes(net_cfg)
    labels = None if classes is None else torch.randint(0, classes, (len(images),))
    warmup = 1
    tcfg = TrainConfig(steps=warmup + steps, batch_size=batch, lr=1e-4, log_every=1)
    if objective == "cd":
        net = build_net(net_cfg, resolution, channels)
        net.load_state_dict(model.net.state_dict())
        student = ConsistencyFunction(net, model.sigma_data, 0.002).train()
        sigmas = karras_sigmas(18, 0.002, 80.0).flip(0).to(torch.float32)
        obj = ConsistencyDistillation(student, model.to(accelerator.device), sigmas, distance, 0.0)
    else:
        obj = EDMObjective(model, EDMLoss())
    check.reset_peak()
    _, stats = train(obj, images, np.arange(len(images)), tcfg, accelerator, labels=labels)
    history = stats["history"]
    seconds = history[-1]["seconds"] - history[0]["seconds"]
    losses = [r["loss"] for r in history]
    return {"net": net_name if not check.tiny else "unet-tiny", "parameters_m": trainable_parameters(model) / 1e6,
            "batch": batch, "precision": precision, "steps": steps, "steps_per_s": steps / seconds,
            "images_per_s": steps * batch / seconds, "peak_memory_mb": check.peak_mb(),
            "loss_first": losses[0], "loss_last": losses[-1]}


def teacher_training(check: Check) -> dict:
    steps = 2 if check.tiny else 100
    batch = 4 if check.tiny else 512
    out = {f"ncsnpp-cifar10 {p}": _train(check, "ncsnpp-cifar10", batch, steps, p) for p in ("no", "bf16")}
    for b in ([4] if check.tiny else [256, 128, 64, 32]):  # the largest that fits
        try:
            out["adm-imagenet64-cond bf16"] = _train(check, "adm-imagenet64-cond", b, 2 if check.tiny else 40, "bf16")
            break
        except torch.cuda.OutOfMemoryError:
            out.setdefault("adm_batches_out_of_memory", []).append(b)
            torch.cuda.empty_cache()
    return out


# NVlabs/edm's presets for the paper backbones: network kwargs from train.py (`--arch=ncsnpp` with CIFAR-10's
# `--dropout=0.13 --augment=0`, so no augment_dim: 56.40 M parameters as our net's `reference`; `--arch=adm
# --cond=1` with ImageNet-64's `--dropout=0.10`), and the step settings README.md gives each (CIFAR-10: lr 1e-3,
# EMA 500 kimg, loss scaling 1; ImageNet-64: `--lr=1e-4 --ema=50 --ls=100`). The learning-rate and EMA
# ramp-ups of training_loop.py are left out: they change no step's cost.
EDM_NETS = {
    "ncsnpp-cifar10": dict(img_resolution=32, img_channels=3, label_dim=0, model_type="SongUNet",
                           embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                           channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128,
                           channel_mult=[2, 2, 2], dropout=0.13),
    "adm-imagenet64-cond": dict(img_resolution=64, img_channels=3, label_dim=1000, model_type="DhariwalUNet",
                                model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.10),
}
EDM_STEP = {"ncsnpp-cifar10": dict(lr=10e-4, ema_kimg=500, loss_scaling=1.0),
            "adm-imagenet64-cond": dict(lr=1e-4, ema_kimg=50, loss_scaling=100.0)}
EDM_TINY = {"ncsnpp-cifar10": dict(img_resolution=8, img_channels=1, label_dim=0, model_type="SongUNet",
                                   model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]),
            "adm-imagenet64-cond": dict(img_resolution=8, img_channels=1, label_dim=10, model_type="DhariwalUNet",
                                        model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])}
EDM_REPO = ROOT / "benchmarks" / "third_party" / "edm"
# What training_loop.py sets before its first step (cudnn_benchmark=True is its default).
EDM_BACKENDS = {"cudnn.benchmark": True, "cudnn.allow_tf32": False, "cuda.matmul.allow_tf32": False}


def _backends() -> dict:
    return {"cudnn.benchmark": torch.backends.cudnn.benchmark, "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def _set_backends(flags: dict) -> None:
    torch.backends.cudnn.benchmark = flags["cudnn.benchmark"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn.allow_tf32"]
    torch.backends.cuda.matmul.allow_tf32 = flags["cuda.matmul.allow_tf32"]


def _edm_train(check: Check, edm_dir: Path, kwargs: dict, settings: dict, batch: int, steps: int,
               use_fp16: bool) -> dict:
    """Steps of NVlabs/edm's own training step on random images held on the device: its EDMPrecond network
    and EDMLoss, and the step of training/training_loop.py (loss.sum() x loss scaling / batch, gradients
    through nan_to_num, Adam, the EMA by lerp), under the backend flags that loop sets. Imported from a
    checkout, never copied: it is the yardstick for the project's own loop on the same network and batch."""
    import copy

    if str(edm_dir) not in sys.path:
        sys.path.insert(0, str(edm_dir))
    from training.loss import EDMLoss  # NVlabs/edm
    from training.networks import EDMPrecond  # NVlabs/edm

    torch.manual_seed(0)
    net = EDMPrecond(use_fp16=use_fp16, **kwargs).train().requires_grad_(True).to(check.device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=settings["lr"], betas=(0.9, 0.999), eps=1e-8)
    loss_fn = EDMLoss()
    res, channels = kwargs["img_resolution"], kwargs["img_channels"]
    images = torch.rand(batch, channels, res, res, device=check.device) * 2 - 1
    labels = None
    if kwargs["label_dim"]:  # one-hot rows, as EDM's dataset hands them over
        labels = torch.eye(kwargs["label_dim"], device=check.device)[torch.randint(0, kwargs["label_dim"], (batch,))]
    beta = 0.5 ** (batch / (settings["ema_kimg"] * 1000))
    losses = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net=net, images=images, labels=labels)
        loss.sum().mul(settings["loss_scaling"] / batch).backward()
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        optimizer.step()
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, beta))
        losses.append(float(loss.detach().mean()))

    check.reset_peak()
    step()  # warm-up, as _train leaves out its first step
    check.sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    check.sync()
    seconds = time.perf_counter() - start
    return {"parameters_m": sum(p.numel() for p in net.parameters()) / 1e6, "batch": batch,
            "precision": "fp16" if use_fp16 else "fp32", "steps": steps, "steps_per_s": steps / seconds,
            "images_per_s": steps * batch / seconds, "peak_memory_mb": check.peak_mb(),
            "loss_first": losses[0], "loss_last": losses[-1]}


def edm_reference(check: Check, results: dict, edm_dir: Path) -> dict:
    """NVlabs/edm's training step on the same networks, batches and device as teacher_training, and the
    project's images/s over EDM's as a ratio, each loop with its own precision and backend flags (our fp32
    against EDM's fp32; our bf16 against EDM's own mixed precision, fp16). On --tiny the networks differ
    (unet-tiny against a tiny SongUNet and DhariwalUNet): numbers only, no ratio."""
    if not (edm_dir / "training" / "networks.py").is_file():
        return {"skipped": f"no NVlabs/edm checkout at {edm_dir} (git clone https://github.com/NVlabs/edm there, "
                           "or pass --edm-repo; BENCHMARKS.md says how to carry it to a lent GPU)"}
    ours = results.get("teacher_training", {})
    mixed = not check.tiny  # EDM's fp16 runs on CUDA only
    cases = [("ncsnpp-cifar10 no", "ncsnpp-cifar10", 4 if check.tiny else 512, False),
             ("ncsnpp-cifar10 bf16", "ncsnpp-cifar10", 4 if check.tiny else 512, mixed)]
    out = {"edm_dir": str(edm_dir), "ours_backends": _backends(), "edm_backends": EDM_BACKENDS}
    adm = ours.get("adm-imagenet64-cond bf16")
    if check.tiny or isinstance(adm, dict):
        cases.append(("adm-imagenet64-cond bf16", "adm-imagenet64-cond", 4 if check.tiny else adm["batch"], mixed))
    else:
        out["adm-imagenet64-cond bf16"] = {"skipped": "teacher_training measured no adm-imagenet64-cond batch"}
    for key, net_name, batch, fp16 in cases:
        kwargs = (EDM_TINY if check.tiny else EDM_NETS)[net_name]
        steps = 2 if check.tiny else (20 if "adm" in net_name else 50)  # a steady rate after the warm-up step
        _set_backends(EDM_BACKENDS)
        try:
            edm = _edm_train(check, edm_dir, kwargs, EDM_STEP[net_name], batch, steps, fp16)
        except torch.cuda.OutOfMemoryError:
            edm = {"error": f"out of memory at batch {batch}"}
            torch.cuda.empty_cache()
        finally:
            _set_backends(out["ours_backends"])
        if not check.tiny and key in ours and "images_per_s" in edm:
            edm["ours_precision"] = ours[key]["precision"]
            edm["ours_parameters_m"] = ours[key]["parameters_m"]
            edm["ours_over_edm_images_per_s"] = ours[key]["images_per_s"] / edm["images_per_s"]
        out[key] = edm
    return out


def cd_lpips(check: Check) -> dict:
    from pipeline.distill.distances import LPIPSDistance, build_lpips

    # LPIPS sees 224 px as in training (distances.py); 64 px in --tiny keeps the CPU run short
    distance = LPIPSDistance(build_lpips("vgg", None), resize=64 if check.tiny else 224).to(check.device)
    result = _train(check, "ncsnpp-cifar10", 2 if check.tiny else 128, 2 if check.tiny else 200, "bf16" if check.cuda
                    else "no", objective="cd", distance=distance)
    result["loss_fell"] = result["loss_last"] < result["loss_first"]
    return result


def sampling(check: Check) -> dict:
    from pipeline.diffusion import ConsistencyFunction, EDMDenoiser
    from pipeline.diffusion.solvers import consistency_sample, heun_sample

    _, net_cfg, resolution, channels = check.net("ncsnpp-cifar10")
    batch = 8 if check.tiny else 1024
    torch.manual_seed(0)
    teacher = EDMDenoiser(build_net(net_cfg, resolution, channels)).to(check.device).eval()
    student = ConsistencyFunction(build_net(net_cfg, resolution, channels), 0.5, 0.002).to(check.device).eval()
    noise = torch.randn(batch, channels, resolution, resolution, device=check.device)
    steps = 2 if check.tiny else 18
    with torch.no_grad(), torch.autocast(check.device.type, dtype=torch.bfloat16, enabled=check.cuda):
        teacher_s = timed(check, lambda: heun_sample(teacher, noise, steps), 1 if check.tiny else 2)
        student_s = timed(check, lambda: consistency_sample(student, [noise], [80.0], 0.002), 1 if check.tiny else 3)
    return {"batch": batch, "teacher_heun_steps": steps, "teacher_images_per_s": batch / teacher_s,
            "student_images_per_s": batch / student_s, "speedup": teacher_s / student_s,
            "nfe_ratio": 2 * steps - 1}


def search(check: Check) -> dict:
    from pipeline.search import nearest_neighbours

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import faiss

    device = "cuda" if check.cuda and faiss.get_num_gpus() > 0 else "cpu"
    rng = np.random.default_rng(0)
    cases = {"descriptors float32": (500, 1000, 64, np.float32), "pixels uint8": (100, 1000, 3072, np.uint8)} if check.tiny \
        else {"descriptors float32": (50000, 50000, 512, np.float32), "pixels uint8": (10000, 50000, 3072, np.uint8)}
    out = {"faiss_device": device, "tf32": False}
    for name, (n, m, dim, dtype) in cases.items():
        if dtype == np.uint8:
            q, b = (rng.integers(0, 256, (k, dim), dtype=np.uint8) for k in (n, m))
        else:
            q, b = (rng.standard_normal((k, dim)).astype(np.float32) for k in (n, m))
        q[: n // 10] = b[: n // 10]  # planted copies: the nearest is at distance 0
        start = time.perf_counter()
        idx, dist = nearest_neighbours(q, b, k=2, device=device)
        search_s = time.perf_counter() - start
        tq, tb = (torch.as_tensor(x.astype(np.float32), device=check.device) for x in (q, b))
        gemm_s = timed(check, lambda: tq @ tb.T, 2)
        cdist_s = timed(check, lambda: torch.cdist(tq[:2048], tb).topk(2, largest=False), 1) * (n / min(n, 2048))
        # float64 GEMM form (exact for the integer pixels), never a (queries x database x dim) array
        q64, b64 = q[:256].astype(np.float64), b.astype(np.float64)
        exact = (q64 ** 2).sum(1)[:, None] + (b64 ** 2).sum(1)[None] - 2 * q64 @ b64.T
        order = np.argsort(exact, axis=1, kind="stable")[:, :2]
        out[name] = {"queries": n, "database": m, "dim": dim, "search_s": search_s, "gemm_floor_s": gemm_s,
                     "cdist_topk_s": cdist_s, "search_over_floor": search_s / gemm_s,
                     "exact_on_checked_queries": bool(np.array_equal(order, idx[:256])), "checked_queries": min(n, 256)}
    return out


def embedding(check: Check) -> dict:
    import torchvision
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    out = {}
    batch = 2 if check.tiny else 256
    sscd = torchvision.models.resnet50(num_classes=512).to(check.device).eval()  # SSCD: ResNet-50 trunk, 512-d
    size = 64 if check.tiny else 288
    x = torch.randn(batch, 3, size, size, device=check.device)
    with torch.no_grad(), torch.autocast(check.device.type, dtype=torch.bfloat16, enabled=check.cuda):
        out["sscd_shaped"] = {"input": size, "batch": batch, "images_per_s": batch / timed(check, lambda: sscd(x), 2)}
    vit = (CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=32) if check.tiny else
           CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=224, patch_size=14, projection_dim=768))  # openai/clip-vit-large-patch14
    clip = CLIPVisionModelWithProjection(vit).to(check.device).eval()
    x = torch.randn(batch, 3, vit.image_size, vit.image_size, device=check.device)
    with torch.no_grad(), torch.autocast(check.device.type, dtype=torch.bfloat16, enabled=check.cuda):
        out["clip_shaped"] = {"input": vit.image_size, "batch": batch,
                              "images_per_s": batch / timed(check, lambda: clip(pixel_values=x), 2)}
    return out


def sd15_unet(check: Check) -> dict:
    """Fine-tune and LCM steps of an SD1.5-shaped UNet (random weights, the real config): bf16 autocast,
    gradient checkpointing, AdamW; the LCM step adds a frozen teacher's forward pass."""
    from diffusers import UNet2DConditionModel

    spec = SD15_TINY if check.tiny else SD15_UNET
    batch, steps = (2, 2) if check.tiny else (16, 10)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**spec).to(check.device)
    unet.enable_gradient_checkpointing()
    teacher = UNet2DConditionModel(**spec).to(check.device).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    latents = torch.randn(batch, 4, spec["sample_size"], spec["sample_size"], device=check.device)
    text = torch.randn(batch, 77, spec["cross_attention_dim"], device=check.device)
    t = torch.randint(0, 1000, (batch,), device=check.device)
    out = {"parameters_m": sum(p.numel() for p in unet.parameters()) / 1e6, "batch": batch}

    def finetune():
        with torch.autocast(check.device.type, dtype=torch.bfloat16, enabled=check.cuda):
            loss = (unet(latents, t, text).sample.float() - latents).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def lcm():
        with torch.autocast(check.device.type, dtype=torch.bfloat16, enabled=check.cuda):
            with torch.no_grad():
                target = teacher(latents, t, text).sample
            loss = (unet(latents, t, text).sample.float() - target.float()).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for name, step in (("finetune", finetune), ("lcm", lcm)):
        check.reset_peak()
        step()  # warm-up
        seconds = timed(check, lambda: [step() for _ in range(steps)], 1)
        out[name] = {"steps_per_s": steps / seconds, "peak_memory_mb": check.peak_mb()}
    return out


def compile_teacher(check: Check) -> dict:
    """torch.compile of the teacher's net: the first step (compilation) and the steady ones. On CPU
    (--tiny) the eager backend runs the same call without inductor's C++ build."""
    from pipeline.diffusion import EDMDenoiser

    _, net_cfg, resolution, channels = check.net("ncsnpp-cifar10")
    model = EDMDenoiser(build_net(net_cfg, resolution, channels)).to(check.device)
    compiled = torch.compile(model, backend="inductor" if check.cuda else "eager")
    batch = 2 if check.tiny else 128
    x = torch.randn(batch, channels, resolution, resolution, device=check.device)
    sigma = torch.full((batch,), 1.0, device=check.device)
    with torch.autocast(check.device.type, dtype=torch.bfloat16, enabled=check.cuda):
        first = timed(check, lambda: compiled(x, sigma).float().mean().backward(), 1)
        steady = timed(check, lambda: compiled(x, sigma).float().mean().backward(), 3)
        eager = timed(check, lambda: model(x, sigma).float().mean().backward(), 3)
    return {"backend": "inductor" if check.cuda else "eager", "first_step_s": first, "steady_step_s": steady,
            "eager_step_s": eager, "speedup": eager / steady}


def zero2(check: Check, out_dir: Path) -> dict:
    """A few teacher steps through `accelerate launch` with config/accelerate/deepspeed-zero2.yaml on one
    GPU, on a digits subset the run writes itself."""
    if not check.cuda:
        return {"skipped": "needs CUDA (DeepSpeed ZeRO-2 runs on GPUs only)"}
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return {"skipped": "deepspeed is not installed (pip install -e '.[gpu]')"}
    work = out_dir / "zero2"
    work.mkdir(parents=True, exist_ok=True)
    # src first, then whatever PYTHONPATH already holds (on a lent GPU, the carried wheels' /tmp/site)
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "MEMDISTILL_GPUS": "1"}
    py = [sys.executable, "-m", "pipeline"]
    subset = work / "subset.parquet"
    subprocess.run(py + ["subset", "--dataset", json.dumps({"source": "digits", "resolution": 16}), "--spec",
                         json.dumps({"kind": "uniform", "n": 64, "seed": 0}), "--out", str(subset)], env=env, check=True)
    spec = {"train": {"steps": 20, "batch_size": 32, "lr": 1e-4, "log_every": 10, "seed": 0}}
    start = time.perf_counter()
    # the launcher the training rules build (workflow/rules/common.smk, accelerate_launch) for one GPU
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                           "--mixed_precision", "bf16", "--dynamo_backend", "no", "--num_processes", "1", "--config_file",
                           str(ROOT / "config" / "accelerate" / "deepspeed-zero2.yaml"),
                           "-m", "pipeline", "train-teacher", "--subset", str(subset),
                           "--net", json.dumps(check.embedded["nets"]["unet-tiny"]), "--spec", json.dumps(spec),
                           "--out", str(work / "teacher")], env=env, capture_output=True, text=True, timeout=300)
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - start,
            "trained": (work / "teacher" / "model.safetensors").exists(), "log_tail": (proc.stdout + proc.stderr)[-1500:]}


SECTIONS = ["environment", "teacher_training", "edm_reference", "cd_lpips", "sampling", "search", "embedding", "sd15_unet",
            "compile_teacher", "zero2"]


def summary(results: dict) -> str:
    lines = ["# GPU check", "", f"device: {results.get('environment', {}).get('device', '?')}", "",
             "| section | status | seconds | result |", "|---|---|---:|---|"]
    for name in SECTIONS:
        r = results.get(name)
        if r is None:
            continue
        body = {k: v for k, v in r.items() if k not in ("status", "seconds", "error")}
        text = json.dumps(body, default=float)[:400].replace("|", "/")
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', 0):.1f} | {r.get('error', text)} |")
    return "\n".join(lines) + "\n"


def write(results: dict, out_dir: Path) -> None:
    for name, text in (("gpu-check.json", json.dumps(results, indent=2, default=float)),
                       ("gpu-check.md", summary(results))):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out_dir / name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "results/gpu-check"))
    p.add_argument("--tiny", action="store_true", help="CPU, tiny shapes: what the test runs")
    p.add_argument("--budget-s", type=float, default=480.0, help="no section starts after this many seconds")
    p.add_argument("--sections", nargs="*", default=SECTIONS, choices=SECTIONS)
    p.add_argument("--edm-repo", default=str(EDM_REPO),
                   help="a checkout of NVlabs/edm, whose own training step edm_reference times beside ours")
    a = p.parse_args(argv)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    check = Check(a.tiny)
    results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "tiny": a.tiny, "budget_s": a.budget_s}
    start = time.perf_counter()
    for name in a.sections:
        if time.perf_counter() - start > a.budget_s:
            results[name] = {"status": "skipped", "error": "budget spent before it started"}
            write(results, out_dir)
            continue
        t0 = time.perf_counter()
        try:
            fn = globals()[name]
            extra = {"zero2": (out_dir,), "edm_reference": (results, Path(a.edm_repo))}.get(name, ())
            body = fn(check, *extra)
            status = "skipped" if "skipped" in body else "ok"
            results[name] = {"status": status, **body}
        except Exception as exc:  # a section's failure is a result, not the end of the check
            results[name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:500],
                             "traceback": traceback.format_exc()[-2000:]}
        results[name]["seconds"] = time.perf_counter() - t0
        print(f"{name}: {results[name]['status']} in {results[name]['seconds']:.1f} s", flush=True)
        write(results, out_dir)
    results["seconds"] = time.perf_counter() - start
    write(results, out_dir)
    return 1 if any(r.get("status") == "error" for r in results.values() if isinstance(r, dict)) else 0


if __name__ == "__main__":
    sys.exit(main())
