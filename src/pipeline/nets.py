"""Network configs by name -> diffusers UNet2DModel, adapted to the EDM call F(x, c_noise)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import UNet2DModel
from torch import nn

# Keys passed straight to diffusers.UNet2DModel; everything else in a net config is rejected by the schema.
UNET_KEYS = (
    "block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
    "attention_head_dim", "norm_num_groups", "dropout", "resnet_time_scale_shift",
    "add_attention", "downsample_type", "upsample_type",
)


class UNetBackbone(nn.Module):
    """Calls a diffusers UNet2DModel with EDM's c_noise as its (continuous) timestep.

    Positional time embeddings of ln(sigma)/4, as in EDM's DDPM++ configuration.
    """

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        return self.unet(x, c_noise, return_dict=False)[0]


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
    return UNetBackbone(unet)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
