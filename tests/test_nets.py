"""Backbones from config: EDM's layouts on diffusers blocks, and their parameter counts beside EDM's."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import config as pconfig
from pipeline.nets import NoAttention, ResidualInput, build_net, parameter_report, trainable_parameters

ROOT = Path(__file__).resolve().parents[1]

# The tiny NCSN++: every layout key of our own at 8x8 with two resolutions.
TINY_NCSNPP = {
    "block_out_channels": [8, 16], "layers_per_block": 2,
    "down_block_types": ["AttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "AttnUpBlock2D"],
    "attention_head_dim": 8, "norm_num_groups": 4, "norm_eps": 1e-6, "downsample_type": "resnet",
    "upsample_type": "resnet", "resample_filter": [1, 3, 3, 1], "encoder_input": "residual",
    "decoder_attention": "last", "noise_embedding": "fourier", "noise_channels": 16, "time_embedding_dim": 32,
}


def test_count_parameters_lists_every_paper_net_beside_edm():
    """The command's table has each net of the paper config, ours within 3.5% of EDM's own network
    (the differences are explained in README)."""
    out = subprocess.run([sys.executable, "-m", "pipeline", "count-parameters", "--config", "config/config.yaml"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    cfg = pconfig.load(ROOT / "config/config.yaml")
    rows = {r["net"]: r for r in parameter_report(cfg)}
    assert set(rows) == set(cfg["nets"])
    for name, row in rows.items():
        assert f"| {name} | {row['parameters'] / 1e6:.2f}M | {row['reference'] / 1e6:.2f}M |" in out
        assert abs(row["difference"]) < 0.035, (name, row)
    assert rows["ncsnpp-cifar10"]["reference"] == 56395523 and rows["adm-imagenet64-cond"]["reference"] == 295899267
    # width and depth move the count as EDM's do
    assert rows["ncsnpp-cifar10-narrow"]["parameters"] < rows["ncsnpp-cifar10"]["parameters"] \
        < rows["ncsnpp-cifar10-wide"]["parameters"]
    assert rows["ncsnpp-cifar10-2blocks"]["parameters"] < rows["ncsnpp-cifar10"]["parameters"] \
        < rows["ncsnpp-cifar10-6blocks"]["parameters"]
    # the embedded config's nets, which cite no reference, are counted too
    embedded = parameter_report(pconfig.load(ROOT / "config/embedded.yaml"))
    assert all(r["parameters"] > 0 and r["reference"] is None and r["channels"] == 1 for r in embedded)


def test_ncsnpp_layout_runs_on_edm_noise_labels():
    """Fourier embedding of c_noise = ln(sigma)/4 (negative below sigma = 1, where diffusers' own
    'fourier' mode takes a log and divides by t), FIR resampling, the residual input path and
    attention only in the last decoder block of a level."""
    torch.manual_seed(0)
    net = build_net(TINY_NCSNPP, 8, 1).eval()
    x = torch.randn(3, 1, 8, 8)
    c_noise = torch.log(torch.tensor([0.002, 1.0, 80.0])) / 4
    out = net(x, c_noise)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(net(x, c_noise.flip(0)), out)  # the noise level matters
    proj = net.unet.time_proj
    assert proj.weight.shape == (8,) and not proj.weight.requires_grad  # 16 channels: 8 frequencies
    assert trainable_parameters(net) == sum(p.numel() for p in net.parameters()) - 8
    attn_up = net.unet.up_blocks[1]
    assert [isinstance(a, NoAttention) for a in attn_up.attentions] == [True, True, False]
    assert [type(a).__name__ for a in net.unet.down_blocks[0].attentions] == ["Attention", "Attention"]
    # the residual input path takes part: without it the output changes, and it holds no image after a call
    assert isinstance(net.residual_input, ResidualInput) and net.residual_input.aux is None
    with torch.no_grad():
        for conv in net.residual_input.convs:
            conv.weight.zero_(), conv.bias.zero_()
    assert not torch.allclose(net(x, c_noise), out)


def test_a_deep_copy_has_its_own_residual_input_path():
    """The EMA and the consistency target are deep copies: their residual path must be their own."""
    import copy

    torch.manual_seed(0)
    net = build_net(TINY_NCSNPP, 8, 1).eval()
    twin = copy.deepcopy(net)
    x, c = torch.randn(2, 1, 8, 8), torch.zeros(2)
    before = twin(x, c)
    with torch.no_grad():
        for conv in net.residual_input.convs:
            conv.weight.add_(1.0)
    torch.testing.assert_close(twin(x, c), before)
    assert not torch.allclose(net(x, c), before)


def test_fir_and_box_resampling_differ_only_in_filter():
    torch.manual_seed(0)
    fir = build_net(TINY_NCSNPP, 8, 1)
    box = build_net({**TINY_NCSNPP, "resample_filter": [1, 1]}, 8, 1)
    box.load_state_dict(fir.state_dict())  # the filter holds no parameters
    x, c = torch.randn(2, 1, 8, 8), torch.zeros(2)
    assert not torch.allclose(fir(x, c), box(x, c))


def test_positional_embedding_with_endpoint_is_edms():
    """noise_endpoint: EDM's PositionalEmbedding(endpoint=True) then SongUNet's sin/cos swap:
    freqs = (1/10000)^(k/(C/2-1)), [sin, cos] (edm training/networks.py)."""
    net = build_net({**TINY_NCSNPP, "noise_embedding": "positional", "noise_endpoint": True}, 8, 1)
    c = torch.tensor([-1.5, 0.0, 1.1])
    half = 8
    freqs = (1 / 10000) ** (torch.arange(half) / (half - 1))
    ours = net.unet.time_proj(c)
    torch.testing.assert_close(ours, torch.cat([(c[:, None] * freqs).sin(), (c[:, None] * freqs).cos()], 1))
    assert net.unet.time_embedding.linear_1.in_features == 16 and net.unet.time_embedding.linear_2.out_features == 32


def test_class_conditional_net_uses_its_labels():
    net = build_net({**TINY_NCSNPP, "num_class_embeds": 10}, 8, 1).eval()
    x, c = torch.randn(2, 1, 8, 8), torch.zeros(2)
    a = net(x, c, torch.tensor([3, 3]))
    b = net(x, c, torch.tensor([3, 7]))
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="class_labels should be provided"):
        net(x, c)


def test_unknown_layout_values_are_rejected_by_the_schema():
    cfg = pconfig.load(ROOT / "config/config.yaml")
    cfg["nets"]["ncsnpp-cifar10"]["resample_filter"] = [1, 2, 1]
    with pytest.raises(Exception, match="resample_filter"):
        pconfig.validate(cfg)
    assert math.isclose(parameter_report(pconfig.load(ROOT / "config/config.yaml"))[0]["difference"], -0.0198,
                        abs_tol=0.001)


def test_tiny_ncsnpp_trains_through_the_shared_loop():
    """Teacher training with every layout key: the EMA (a deep copy) follows the online weights,
    and the loss falls over a few steps."""
    import numpy as np
    from accelerate import Accelerator

    from pipeline.diffusion import EDMDenoiser
    from pipeline.diffusion.loss import EDMLoss
    from pipeline.teacher import EDMObjective
    from pipeline.train import TrainConfig, train

    torch.manual_seed(0)
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cfg = TrainConfig(steps=30, batch_size=8, lr=2e-3, ema_halflife_kimg=0.01, log_every=10)
    ema, stats = train(EDMObjective(EDMDenoiser(build_net(TINY_NCSNPP, 8, 1)), EDMLoss()), images, np.arange(8),
                       cfg, Accelerator(cpu=True))
    losses = [h["loss"] for h in stats["history"]]
    assert losses[-1] < losses[0]
    assert ema.net.residual_input is not None
    out = ema(images[:2], torch.tensor([0.5, 5.0]))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
