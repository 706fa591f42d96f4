"""Distance functions d(x, y) for the consistency loss, by name, one value per sample.

l2 and l1 reduce like the reference code (openai/consistency_models cm/karras_diffusion.py:
mean_flat of the squared or absolute difference); pseudo-Huber is improved consistency training's;
LPIPS, the study's metric (Section 4.1), comes from the `lpips` package with its ImageNet backbone
read from a fetched file (see `lpips_distance`).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per sample (Song et al. 2023 use the squared L2 norm)."""
    return ((x - y) ** 2).flatten(1).mean(1)


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per sample (the reference's `loss_norm="l1"`)."""
    return (x - y).abs().flatten(1).mean(1)


def pseudo_huber(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sqrt(||x - y||^2 + c^2) - c with c = 0.00054 sqrt(d) (Song & Dhariwal 2023, improved CT)."""
    d = x[0].numel()
    c = 0.00054 * math.sqrt(d)
    return (((x - y) ** 2).flatten(1).sum(1) + c * c).sqrt() - c


DISTANCES: dict[str, Distance] = {"l2": l2, "l1": l1, "pseudo_huber": pseudo_huber}
METRICS = (*DISTANCES, "lpips")

# The torchvision ImageNet checkpoints LPIPS's backbones are cut from (lpips/pretrained_networks.py
# builds them with tv.vgg16/tv.alexnet(pretrained=True), which would download at run time).
LPIPS_BACKBONES = {"vgg": "vgg16", "alex": "alexnet"}


class LPIPSDistance(torch.nn.Module):
    """LPIPS between two image batches in [-1, 1], one value per sample.

    As in openai/consistency_models (cm/karras_diffusion.py consistency_losses), images smaller than
    256 pixels are upsampled bilinearly to 224 first, the resolution LPIPS was calibrated at.
    The reference uses piq's LPIPS, which wants [0, 1] and is fed (x + 1) / 2; the `lpips` package
    wants [-1, 1] (its ScalingLayer does the ImageNet normalisation), so images go in unchanged.
    piq also swaps VGG's max-pooling for average pooling (replace_pooling=True); the `lpips` package
    keeps the original max-pooling network of Zhang et al. (2018). Grey images are repeated to RGB.
    """

    def __init__(self, module: torch.nn.Module, resize: int = 224):
        super().__init__()
        self.lpips = module.eval().requires_grad_(False)
        self.resize = int(resize)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] < 256 and x.shape[-1] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return x

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lpips(self._prepare(x), self._prepare(y), normalize=False).flatten()


def build_lpips(net: str = "vgg", backbone_weights: str | Path | None = None) -> torch.nn.Module:
    """The `lpips` package's LPIPS with its calibrated linear heads (shipped inside the package) and
    the ImageNet backbone loaded from `backbone_weights`, a torchvision state dict.

    backbone_weights=None leaves the backbone randomly initialised (tests); a real run always names
    the file the `fetch_lpips_backbone` rule provides, since nothing here may download at run time.
    """
    import lpips

    if net not in LPIPS_BACKBONES:
        raise ValueError(f"unknown LPIPS backbone {net!r}; available: {sorted(LPIPS_BACKBONES)}")
    with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if backbone_weights is not None:
        load_backbone(model, backbone_weights)
    return model.eval().requires_grad_(False)


def load_backbone(model: torch.nn.Module, path: str | Path) -> int:
    """Copy a torchvision checkpoint's `features.*` into LPIPS's slices; returns the tensors loaded.

    lpips/pretrained_networks.py registers torchvision's `features[i]` under slice_k as child `str(i)`,
    so child name i is torchvision's index i.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: it is the LPIPS backbone, fetched on a login node by the "
                                f"fetch_lpips_backbone rule: `snakemake --profile profiles/slurm {path}`")
    state = torch.load(path, map_location="cpu", weights_only=True)
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise ValueError(f"{path} holds no `features.*` tensors: not a torchvision {LPIPS_BACKBONES} checkpoint")
    loaded = 0
    for slice_ in model.net.children():
        for index, layer in slice_.named_children():
            if not list(layer.parameters()):
                continue  # ReLU, pooling
            want = {k.split(".", 1)[1]: v for k, v in features.items() if k.split(".", 1)[0] == index}
            layer.load_state_dict(want)  # strict: a missing or misshapen tensor names itself
            loaded += len(want)
    return loaded


def get_distance(name: str, options: Mapping[str, Any] | None = None) -> Distance:
    """The distance called `name`; LPIPS takes {net, weights, resize} from `options`."""
    if name == "lpips":
        opts = dict(options or {})
        if not opts.get("weights"):
            raise ValueError("the lpips metric needs `weights`, the path of its torchvision backbone checkpoint")
        return LPIPSDistance(build_lpips(opts.get("net", "vgg"), opts["weights"]), opts.get("resize", 224))
    if name not in DISTANCES:
        raise ValueError(f"unknown consistency metric {name!r}; available: {sorted(METRICS)}")
    return DISTANCES[name]
