"""The shared training loop: learning on a tiny problem, and exact resumption from a checkpoint."""
import numpy as np
import pytest
import torch
from accelerate import Accelerator

from pipeline.diffusion import EDMDenoiser
from pipeline.diffusion.loss import EDMLoss
from pipeline.nets import build_net
from tiny import TINY_UNET
from pipeline.teacher import EDMObjective
from pipeline.train import TrainConfig, train



def objective(seed=0):
    torch.manual_seed(seed)
    return EDMObjective(EDMDenoiser(build_net(TINY_UNET, 8, 1)), EDMLoss())


def data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, 1, 8, 8, generator=g) * 2 - 1


def test_resume_from_checkpoint_reproduces_uninterrupted_run(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-3, ema_halflife_kimg=0.01, log_every=1, checkpoint_every=3)
    rows = np.array([0, 1, 2, 3, 4, 5, 5])  # image 5 repeated twice
    ema_a, stats_a = train(objective(), data(), rows, cfg, Accelerator(cpu=True), tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "progress.json").exists()
    # A fresh process would start from new random weights; resumption must restore everything.
    ema_b, stats_b = train(objective(seed=1), data(), rows, cfg, Accelerator(cpu=True), tmp_path / "ckpt")
    for (name, a), (_, b) in zip(ema_a.state_dict().items(), ema_b.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert [h["loss"] for h in stats_a["history"]] == pytest.approx([h["loss"] for h in stats_b["history"]])
    assert stats_b["steps"] == 6 and len(stats_b["history"]) == 6


def test_loss_decreases_and_stats_are_reported():
    cfg = TrainConfig(steps=60, batch_size=6, lr=3e-3, ema_halflife_kimg=0.05, log_every=20)
    ema, stats = train(objective(), data(), np.arange(6), cfg, Accelerator(cpu=True))
    losses = [h["loss"] for h in stats["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert stats["images_seen"] == 360 and stats["processes"] == 1
    assert all(not p.requires_grad for p in ema.parameters())


def test_batch_must_split_across_processes():
    class FakeAccelerator:
        num_processes = 4

    cfg = TrainConfig(steps=1, batch_size=6, lr=1e-3)
    with pytest.raises(ValueError, match="not divisible by 4"):
        train(objective(), data(), np.arange(6), cfg, FakeAccelerator())


def test_train_config_from_plain_data():
    cfg = TrainConfig.from_dict({"steps": 3, "batch_size": 2, "lr": 0.1, "betas": [0.5, 0.6], "optimizer": "radam"})
    assert cfg.betas == (0.5, 0.6) and cfg.optimizer == "radam"
