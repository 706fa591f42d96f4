"""Network configs by name -> diffusers UNet2DModel, adapted to the EDM call F(x, c_noise).

The study's backbones are NVlabs/edm's SongUNet (DDPM++, NCSN++) and DhariwalUNet (ADM) layouts
(edm train.py `--arch`). diffusers' UNet2DModel expresses most of them; a few `nets:` keys of our
own adjust what it builds, each where UNet2DModel has no option for the EDM layout:
- `noise_embedding` (positional | fourier), `noise_channels`, `noise_endpoint`, `fourier_scale`:
  the noise-level embedding. UNet2DModel sizes it by the first block's width, and its "fourier" mode
  takes log(t) and divides the output by t (score_sde's VE convention), which EDM's c_noise = ln(sigma)/4
  (negative below sigma = 1) cannot go through; so its time projection is replaced by diffusers'
  own Timesteps or GaussianFourierProjection (log=False) of EDM's size (edm networks.py
  PositionalEmbedding with endpoint=True is Timesteps with downscale_freq_shift=1; SongUNet's
  sin-before-cos order is flip_sin_to_cos=False).
- `resample_filter`: [1, 1] (box: average-pool down, nearest up, UNet2DModel's resnet up/down) or
  [1, 3, 3, 1] (NCSN++'s FIR filter, diffusers' upsample_2d/downsample_2d in those blocks).
- `encoder_input: residual`: NCSN++'s progressive input path (edm SongUNet encoder_type='residual'),
  which UNet2DModel lacks (its Skip blocks are score_sde's 'input_skip', another path): `ResidualInput`.
- `decoder_attention: last`: SongUNet attends only in the last block of a decoder level, where
  diffusers' AttnUpBlock2D attends after every block: the others become `NoAttention`.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Mapping

import numpy as np
import torch
from diffusers import UNet2DModel
from diffusers.models.downsampling import downsample_2d
from diffusers.models.embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import upsample_2d
from torch import nn

from .config import num_classes

# Keys passed straight to diffusers.UNet2DModel; everything else in a net config is rejected by the schema.
UNET_KEYS = (
    "block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
    "attention_head_dim", "norm_num_groups", "dropout", "resnet_time_scale_shift",
    "add_attention", "downsample_type", "upsample_type", "time_embedding_dim", "num_class_embeds", "norm_eps",
)
FIR = (1, 3, 3, 1)


class NoAttention(nn.Module):
    """Stands in for an attention layer the EDM layout does not have (diffusers calls attn(h))."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class ResidualInput(nn.Module):
    """NCSN++'s progressive residual input: after each downsampling, the image path `aux` goes through
    a 3x3 conv and the resolution's filter, and x = aux = (x + conv(aux)) / sqrt(2), also as the skip
    connection that downsampling left (edm networks.py SongUNet.forward, `aux_residual`). Attached to
    UNet2DModel's down blocks by forward hooks, since its forward has no place for a second path."""

    def __init__(self, in_channels: int, widths: list[int], resample_filter):
        super().__init__()
        chans = [in_channels, *widths]
        self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1) for i in range(len(widths)))
        self.filter = tuple(resample_filter)
        self.aux = None

    def down(self, x):
        if self.filter == FIR:
            return downsample_2d(x, kernel=FIR)
        return nn.functional.avg_pool2d(x, 2)

    def attach(self, down_blocks) -> None:
        """Hook every down block that downsamples. The hook is this module's bound method, which
        copy.deepcopy rebinds to the copy (the EMA and consistency target are deep copies)."""
        for level, block in enumerate(down_blocks):
            block.residual_level = level
            block.register_forward_hook(self.add)

    def add(self, block, inputs, output):
        sample, res = output
        self.aux = (sample + self.down(self.convs[block.residual_level](self.aux))) / np.sqrt(2)
        return self.aux, (*res[:-1], self.aux)


class UNetBackbone(nn.Module):
    """Calls a diffusers UNet2DModel with EDM's c_noise as its (continuous) timestep, and class labels
    where the net is class-conditional (`num_class_embeds`)."""

    def __init__(self, unet: UNet2DModel, residual_input: ResidualInput | None = None):
        super().__init__()
        self.unet = unet
        self.residual_input = residual_input

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.residual_input is not None:
            self.residual_input.aux = x
        try:
            return self.unet(x, c_noise, class_labels=class_labels, return_dict=False)[0]
        finally:
            if self.residual_input is not None:
                self.residual_input.aux = None


def _noise_embedding(cfg: Mapping[str, Any]) -> tuple[nn.Module, int] | None:
    """EDM's noise embedding (module docstring), or None for UNet2DModel's own."""
    kind = cfg.get("noise_embedding", "positional")
    channels = cfg.get("noise_channels")
    if kind == "positional" and channels is None and not cfg.get("noise_endpoint", False):
        return None
    channels = channels or cfg["block_out_channels"][0]
    if kind == "fourier":
        return GaussianFourierProjection(channels // 2, scale=cfg.get("fourier_scale", 16.0), log=False,
                                         flip_sin_to_cos=False), channels
    if kind != "positional":
        raise ValueError(f"unknown noise_embedding {kind!r}; known: positional, fourier")
    return Timesteps(channels, flip_sin_to_cos=False, downscale_freq_shift=int(cfg.get("noise_endpoint", False))), \
        channels


def build_net(cfg: Mapping[str, Any], resolution: int, channels: int) -> UNetBackbone:
    """Build the raw network F from a config entry of `nets:` and the data shape."""
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in UNET_KEYS}
    unet = UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        time_embedding_type="positional",
        flip_sin_to_cos=True,
        freq_shift=0,
        **kwargs,
    )
    embedding = _noise_embedding(cfg)
    if embedding is not None:
        unet.time_proj, width = embedding
        unet.time_embedding = TimestepEmbedding(width, unet.time_embedding.linear_2.out_features)
    if tuple(cfg.get("resample_filter", (1, 1))) == FIR:
        for block in unet.modules():
            if isinstance(block, ResnetBlock2D) and (block.up or block.down):
                del block.upsample, block.downsample  # parameter-free modules: replaced by the FIR filter
                block.upsample = partial(upsample_2d, kernel=FIR) if block.up else None
                block.downsample = partial(downsample_2d, kernel=FIR) if block.down else None
    if cfg.get("decoder_attention", "every") == "last":
        for block in unet.up_blocks:
            for i in range(len(getattr(block, "attentions", [])) - 1):
                block.attentions[i] = NoAttention()
    residual = None
    if cfg.get("encoder_input", "none") == "residual":
        widths = list(cfg["block_out_channels"][:-1])
        residual = ResidualInput(channels, widths, cfg.get("resample_filter", (1, 1)))
        residual.attach(unet.down_blocks[:-1])
    return UNetBackbone(unet, residual)


def class_labels(cfg: Mapping[str, Any], labels, source: str = "the training set") -> torch.Tensor | None:
    """The per-image classes a net trains on: None for an unconditional net, else `labels` as int64,
    each checked to lie in [0, num_class_embeds) so a wrong label cannot index a wrong embedding."""
    n = num_classes(cfg)
    if n is None:
        return None
    labels = torch.as_tensor(np.array(labels, dtype=np.int64))
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
        raise ValueError(f"{source} has class labels in [{int(labels.min())}, {int(labels.max())}], the "
                         f"class-conditional net embeds {n} classes (num_class_embeds): labels must lie in [0, {n})")
    return labels


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def inherit_parameters(student: nn.Module, teacher: nn.Module) -> dict:
    """Copy every teacher tensor whose name and shape the student shares (App. D.3 "fine-tuning" init).

    With the same architecture that is all of them; a student with fewer or more residual blocks per
    stage keeps its own random initialisation where the teacher has nothing of that name and shape.
    Returns how many tensors and parameters were inherited, out of how many the student has.
    """
    theirs = teacher.state_dict()
    ours = student.state_dict()
    take = {k: v for k, v in theirs.items() if k in ours and ours[k].shape == v.shape}
    student.load_state_dict(take, strict=False)
    params = dict(student.named_parameters())
    return {
        "inherited_tensors": len(take),
        "tensors": len(ours),
        "inherited_parameters": sum(params[k].numel() for k in take if k in params),
        "parameters": count_parameters(student),
    }


def trainable_parameters(module: nn.Module) -> int:
    """Parameters the optimizer updates (a frozen Fourier frequency table is a buffer in EDM)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


DATA_SHAPES = {"digits": (8, 1), "cifar10": (32, 3), "imagenet64": (64, 3)}


def net_data_shape(cfg: Mapping[str, Any], net: str) -> tuple[int, int]:
    """(resolution, channels) of the first dataset a teacher using `net` trains on; (32, 3) if none does."""
    for teacher in cfg.get("teachers", {}).values():
        if teacher.get("net") == net:
            dataset = cfg["datasets"][cfg["subsets"][teacher["subset"]]["dataset"]]
            resolution, channels = DATA_SHAPES[dataset["source"]]
            return dataset.get("resolution", resolution), channels
    return 32, 3


def parameter_report(cfg: Mapping[str, Any]) -> list[dict]:
    """Every net of a pipeline config with its trainable parameter count, beside its `reference` if any.

    Built on the meta device, so ImageNet's 296M-parameter ADM costs no memory. The data shape is the
    net's `net_data_shape` (the count does not depend on resolution).
    """
    rows = []
    for name, net_cfg in cfg["nets"].items():
        resolution, channels = net_data_shape(cfg, name)
        with torch.device("meta"):
            ours = trainable_parameters(build_net(net_cfg, resolution, channels))
        ref = net_cfg.get("reference") or {}
        published = ref.get("parameters")
        rows.append({"net": name, "parameters": ours, "reference": published, "source": ref.get("source", ""),
                     "difference": (ours - published) / published if published else None, "channels": channels})
    return rows


def format_parameter_report(rows: list[dict]) -> str:
    lines = ["| net | parameters (ours) | published | difference | published source |",
             "|---|---:|---:|---:|---|"]
    for r in rows:
        ref = f"{r['reference'] / 1e6:.2f}M" if r["reference"] else "-"
        diff = f"{100 * r['difference']:+.1f}%" if r["difference"] is not None else "-"
        lines.append(f"| {r['net']} | {r['parameters'] / 1e6:.2f}M | {ref} | {diff} | {r['source'] or '-'} |")
    return "\n".join(lines) + "\n"
