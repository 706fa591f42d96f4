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
