"""Training throughput of the shared loop (teacher objective) for a net of a pipeline config.

Usage:
  python benchmarks/train_throughput.py --config config/embedded.yaml --net unet-tiny --batch 64 --steps 60
  python benchmarks/train_throughput.py --net ncsnpp-cifar10 --batch 512 --precision bf16 --steps 60  # a GPU
  python benchmarks/train_throughput.py --config config/embedded-evidence.yaml --net unet-wide --objective cd --batch 48

`--objective cd` times a consistency-distillation student step instead (the cd stage's objective: N = 18
Heun teacher steps, the online weights as target, l2), with a teacher of the same net at random weights:
a student step's cost does not depend on what its teacher has learnt.

Random images of the net's data shape go through `pipeline.train.train` exactly as in a teacher run
(EMA, checkpoint-free); the first `--warmup` steps (allocator, cuDNN autotuning, compilation) are
excluded: images/s is the timed steps' images over the seconds between the loop's log points at the
end of warm-up and at the last step (its `seconds` field). Prints one Markdown row.
"""
from __future__ import annotations

import argparse
import platform
import sys

import numpy as np
import torch
from accelerate import Accelerator

from pipeline import config as pconfig
from pipeline.diffusion import ConsistencyFunction, EDMDenoiser, karras_sigmas
from pipeline.diffusion.loss import EDMLoss
from pipeline.distill.cd import ConsistencyDistillation
from pipeline.distill.distances import get_distance
from pipeline.nets import build_net, net_data_shape, trainable_parameters
from pipeline.teacher import EDMObjective
from pipeline.train import TrainConfig, train


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config/config.yaml")
    p.add_argument("--net", required=True)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--batch-per-process", type=int)
    p.add_argument("--steps", type=int, default=60, help="timed steps")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--objective", choices=["edm", "cd"], default="edm")
    a = p.parse_args(argv)

    cfg = pconfig.load(a.config)
    resolution, channels = net_data_shape(cfg, a.net)
    accelerator = Accelerator(cpu=a.cpu or not torch.cuda.is_available(), mixed_precision=a.precision)
    torch.manual_seed(0)
    model = EDMDenoiser(build_net(cfg["nets"][a.net], resolution, channels))
    images = torch.rand(max(a.batch, 1024), channels, resolution, resolution) * 2 - 1
    tcfg = TrainConfig(steps=a.warmup + a.steps, batch_size=a.batch, lr=1e-4, log_every=a.warmup,
                       batch_per_process=a.batch_per_process, channels_last=a.channels_last)
    classes = pconfig.num_classes(cfg["nets"][a.net])  # a class-conditional net trains with a class per image
    labels = None if classes is None else torch.randint(0, classes, (len(images),), generator=torch.Generator().manual_seed(0))
    if a.objective == "cd":
        net = build_net(cfg["nets"][a.net], resolution, channels)
        net.load_state_dict(model.net.state_dict())
        student = ConsistencyFunction(net, model.sigma_data, 0.002).train()
        sigmas = karras_sigmas(18, 0.002, 80.0).flip(0).to(torch.float32)
        objective = ConsistencyDistillation(student, model.to(accelerator.device), sigmas, get_distance("l2"), 0.0)
    else:
        objective = EDMObjective(model, EDMLoss())
    _, stats = train(objective, images, np.arange(len(images)), tcfg, accelerator, labels=labels)
    warm = next(r for r in stats["history"] if r["step"] == a.warmup)
    last = stats["history"][-1]
    images_per_second = a.steps * a.batch / (last["seconds"] - warm["seconds"])
    device = torch.cuda.get_device_name() if accelerator.device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print("| net | objective | parameters | device | precision | channels-last | batch (micro) | images/s | peak memory MB |")
    print("|---|---|---:|---|---|---|---|---:|---:|")
    print(f"| {a.net} | {a.objective} | {trainable_parameters(model) / 1e6:.2f}M | {device} | {a.precision} | {a.channels_last} | "
          f"{a.batch} ({stats['micro_batch']}) | {images_per_second:.1f} | {last['max_memory_mb']:.0f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
