"""Consistency distillation on Gaussian data, distances, target EMA and a tiny end-to-end step.

With data ~ N(mu, s^2 I) the exact consistency function is
f(x, sigma) = mu + (x - mu) sqrt(s^2 + sigma_min^2) / sqrt(s^2 + sigma^2), and the exact teacher is
D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu). With both exact, the CD loss measures only the
local error of one teacher Heun step, O(h^3) per step, so O(h^6) for the squared L2 distance.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from pipeline.diffusion import ConsistencyFunction, EDMDenoiser, karras_sigmas
from pipeline.diffusion import euler_step
from pipeline.distill.cd import ConsistencyDistillation, build_student, cd_loss, has_dropout, student_net_config
from pipeline.distill.distances import (DISTANCES, LPIPSDistance, build_lpips, get_distance, l1, l2, load_backbone,
                                        pseudo_huber)
from pipeline.nets import build_net, count_parameters
from gaussian import (CLASS_MUS, F64, MU, S, SIGMA_MAX, SIGMA_MIN, exact_class_consistency, exact_class_denoiser,
                      exact_consistency, exact_denoiser)
from tiny import TINY_UNET
from pipeline.train import TrainConfig, ema_beta, ema_update

IMAGE_MU = MU.reshape(1, 1, 2, 2)  # the 4-d Gaussian as tiny 1x2x2 images


def perturbed_consistency(x, sigma):
    return exact_consistency(x, sigma) + 0.1


def gaussian_batch(n, seed):
    return IMAGE_MU + S * torch.randn(n, 1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))


def ascending(n):
    return karras_sigmas(n, SIGMA_MIN, SIGMA_MAX).flip(0)


# ---------------------------------------------------------------------------------------- cd_loss

@pytest.mark.parametrize("metric,rel_bound", [("l2", 1e-6), ("l1", 1e-3), ("pseudo_huber", 1e-4)])
def test_cd_loss_vanishes_for_exact_consistency_function(metric, rel_bound):
    dist = get_distance(metric)
    x = gaussian_batch(8192, seed=0)
    sig = ascending(80)
    exact = cd_loss(exact_consistency, exact_consistency, exact_denoiser, x, sig, dist,
                    noise=torch.Generator().manual_seed(1))
    off = cd_loss(perturbed_consistency, exact_consistency, exact_denoiser, x, sig, dist,
                  noise=torch.Generator().manual_seed(1))
    assert exact.shape == off.shape == (8192,)
    assert torch.all(exact >= 0)
    ref = off.mean().item()
    # perturbation by 0.1 in each of the 4 dims: l2 = 0.01, l1 = 0.1, pseudo-Huber ~ ||0.1 * 1||= 0.2
    expected_ref = {"l2": 0.01, "l1": 0.1, "pseudo_huber": 0.2}[metric]
    assert ref == pytest.approx(expected_ref, rel=0.02)
    assert exact.mean().item() < rel_bound * ref, exact.mean().item() / ref
    assert exact.max().item() < 1e3 * rel_bound * ref


def test_cd_loss_gives_each_rows_class_to_teacher_student_and_target():
    """Class-conditional Gaussians: with the exact conditional teacher and consistency function the loss
    vanishes only when all three networks see each row's class (openai/consistency_models passes
    model_kwargs to each); a target or teacher given another class leaves a large loss."""
    labels = torch.arange(6000) % 3
    x = CLASS_MUS[labels].reshape(-1, 1, 2, 2) + S * torch.randn(6000, 1, 2, 2, dtype=F64,
                                                                   generator=torch.Generator().manual_seed(2))
    sig, l2 = ascending(80), get_distance("l2")

    def shifted(fn):
        return lambda x, sigma, class_labels: fn(x, sigma, (class_labels + 1) % 3)

    def loss(student, target, teacher):
        return cd_loss(student, target, teacher, x, sig, l2, torch.Generator().manual_seed(3), labels=labels).mean()

    exact = loss(exact_class_consistency, exact_class_consistency, exact_class_denoiser).item()
    assert exact < 1e-6
    assert loss(exact_class_consistency, shifted(exact_class_consistency), exact_class_denoiser).item() > 1e3 * exact
    assert loss(exact_class_consistency, exact_class_consistency, shifted(exact_class_denoiser)).item() > 1e3 * exact
    assert loss(shifted(exact_class_consistency), exact_class_consistency, exact_class_denoiser).item() > 1e3 * exact


def test_cd_loss_exact_student_converges_at_heun_local_order():
    """Squared L2 of a Heun local error O(h^3): doubling N divides the loss by ~2^6 (Euler would give 2^4)."""
    x = gaussian_batch(16384, seed=2)
    losses = []
    for n in (40, 80, 160):
        losses.append(cd_loss(exact_consistency, exact_consistency, exact_denoiser, x, ascending(n), l2,
                              noise=torch.Generator().manual_seed(3)).mean().item())
    for a, b in zip(losses[:-1], losses[1:]):
        assert a / b > 32, losses


def test_cd_loss_euler_teacher_converges_at_first_order():
    """The Euler teacher solver (config `solver: euler`): local error O(h^2), squared L2 O(h^4),
    so doubling N divides the loss by ~2^4, against ~2^6 for Heun above."""
    x = gaussian_batch(16384, seed=2)
    losses = [cd_loss(exact_consistency, exact_consistency, exact_denoiser, x, ascending(n), l2,
                      noise=torch.Generator().manual_seed(3), solver=euler_step).mean().item()
              for n in (40, 80, 160)]
    for a, b in zip(losses[:-1], losses[1:]):
        assert 10 < a / b < 24, losses


def test_cd_loss_uses_target_at_teacher_step_and_student_at_next_level():
    """With a recording student/target, check the indices: student sees t_{n+1}, target t_n, adjacent levels."""
    x = gaussian_batch(512, seed=4)
    sig = ascending(18)
    seen = {}

    def student(xx, t):
        seen["student"] = t.clone()
        return exact_consistency(xx, t)

    def target(xx, t):
        seen["target"] = t.clone()
        return exact_consistency(xx, t)

    cd_loss(student, target, exact_denoiser, x, sig, l2, noise=torch.Generator().manual_seed(5))
    idx_next = torch.searchsorted(sig, seen["student"])
    idx_cur = torch.searchsorted(sig, seen["target"])
    torch.testing.assert_close(sig[idx_next], seen["student"])
    torch.testing.assert_close(sig[idx_cur], seen["target"])
    assert torch.equal(idx_next, idx_cur + 1)
    # every adjacent pair (t_n, t_{n+1}), n = 1..N-1, is drawn, and sigma_min is never the student's level
    assert set(idx_cur.tolist()) == set(range(17))
    assert idx_next.min().item() == 1


def test_cd_loss_deterministic_given_generator():
    x = gaussian_batch(64, seed=6)
    sig = ascending(18)
    a = cd_loss(perturbed_consistency, exact_consistency, exact_denoiser, x, sig, l2, torch.Generator().manual_seed(7))
    b = cd_loss(perturbed_consistency, exact_consistency, exact_denoiser, x, sig, l2, torch.Generator().manual_seed(7))
    c = cd_loss(perturbed_consistency, exact_consistency, exact_denoiser, x, sig, l2, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# -------------------------------------------------------------------------------------- distances

def test_l2_by_hand():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]], dtype=F64)
    y = torch.tensor([[[[1.0, 0.0], [3.0, 1.0]]], [[[0.5, -0.5], [0.0, 0.0]]]], dtype=F64)
    torch.testing.assert_close(l2(x, y), torch.tensor([(0 + 4 + 0 + 9) / 4, (0.25 + 0.25) / 4], dtype=F64))


def test_pseudo_huber_by_hand():
    x = torch.zeros(3, 3, 8, 8, dtype=F64)
    y = torch.zeros(3, 3, 8, 8, dtype=F64)
    y[0, 0, 0, 0] = 3.0
    y[0, 1, 2, 3] = 4.0        # ||x - y|| = 5
    y[1] = 1e-5                # ||x - y||^2 = 192e-10, below c^2: quadratic regime
    d = 3 * 8 * 8
    c = 0.00054 * math.sqrt(d)
    assert c == pytest.approx(0.00748246, rel=1e-5)
    expected = [math.sqrt(25 + c * c) - c, math.sqrt(d * 1e-10 + c * c) - c, 0.0]
    torch.testing.assert_close(pseudo_huber(x, y), torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-15)
    # large errors: ~ ||x - y|| - c; small errors: ~ ||x - y||^2 / (2c)
    assert pseudo_huber(x, y)[0].item() == pytest.approx(5 - c, rel=1e-5)
    assert pseudo_huber(x, y)[1].item() == pytest.approx(d * 1e-10 / (2 * c), rel=1e-3)
    # symmetric
    torch.testing.assert_close(pseudo_huber(y, x), pseudo_huber(x, y))


def test_l1_by_hand():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=F64)
    y = torch.tensor([[[[1.5, 0.0], [3.0, 5.0]]]], dtype=F64)
    torch.testing.assert_close(l1(x, y), torch.tensor([(0.5 + 2 + 0 + 1) / 4], dtype=F64))


def test_get_distance_names():
    assert get_distance("l2") is l2
    assert get_distance("l1") is l1
    assert get_distance("pseudo_huber") is pseudo_huber
    assert set(DISTANCES) >= {"l1", "l2", "pseudo_huber"}
    with pytest.raises(ValueError, match="unknown consistency metric"):
        get_distance("lpips_but_misspelled")
    with pytest.raises(ValueError, match="needs `weights`"):
        get_distance("lpips", {"net": "vgg"})


# ------------------------------------------------------------------------------------------- LPIPS

@pytest.fixture(scope="module")
def vgg_checkpoint(tmp_path_factory):
    """A torchvision-format VGG16 checkpoint with random weights, written by the test itself: its
    `features.*` (all LPIPS reads) and a stand-in for the classifier tensors a real file also holds."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lpips") / "vgg16-test.pth"
    state = {k: v for k, v in torchvision.models.vgg16(weights=None).state_dict().items() if k.startswith("features.")}
    state["classifier.0.bias"] = torch.zeros(4096)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def lpips_vgg(vgg_checkpoint):
    return build_lpips("vgg", vgg_checkpoint)


def test_lpips_backbone_loads_from_a_torchvision_file(vgg_checkpoint, lpips_vgg):
    state = torch.load(vgg_checkpoint, weights_only=True)
    convs = [k for k in state if k.startswith("features.") and k.endswith(".weight")]
    assert len(convs) == 13  # VGG16's 13 conv layers, all used by LPIPS (relu1_2 ... relu5_3)
    lp = dict(lpips_vgg.net.named_parameters())
    for key in convs:
        index = key.split(".")[1]
        mine = [v for k, v in lp.items() if k.endswith(f".{index}.weight")]
        assert len(mine) == 1 and torch.equal(mine[0], state[key]), key
    # a second build from the same file is the same function; a random backbone is not
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    again = build_lpips("vgg", vgg_checkpoint)
    assert torch.equal(lpips_vgg(x, y), again(x, y))
    torch.manual_seed(123)
    assert not torch.allclose(build_lpips("vgg", None)(x, y), lpips_vgg(x, y))
    # the calibrated linear heads come from the package, non-negative as LPIPS requires
    assert all((p >= 0).all() for n, p in lpips_vgg.named_parameters() if n.startswith("lin"))


def test_lpips_backbone_errors(tmp_path, lpips_vgg):
    with pytest.raises(FileNotFoundError, match="fetch_lpips_backbone"):
        load_backbone(lpips_vgg, tmp_path / "absent.pth")
    torch.save({"classifier.0.weight": torch.zeros(2, 2)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="no `features"):
        load_backbone(build_lpips("vgg", None), tmp_path / "wrong.pth")


def test_lpips_distance_preprocessing(lpips_vgg):
    """Grey images become RGB, images under 256 pixels are upsampled bilinearly to `resize`, and the
    [-1, 1] images go to the package unchanged (normalize=False)."""
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, a, b, normalize=False):
            seen.append((a.clone(), b.clone(), normalize))
            return (a - b).abs().mean((1, 2, 3), keepdim=True)

    dist = LPIPSDistance(Recorder(), resize=224)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    out = dist(x, torch.zeros_like(x))
    a, b, normalize = seen[0]
    assert out.shape == (3,) and normalize is False
    assert a.shape == (3, 3, 224, 224)
    torch.testing.assert_close(a, torch.nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=(224, 224),
                                                                  mode="bilinear", align_corners=False))
    assert a.min() >= -1 and a.max() <= 1
    big = torch.rand(1, 3, 256, 256)
    dist(big, big)
    assert seen[-1][0].shape == (1, 3, 256, 256)  # 256 and above: left at its own size


def test_cd_loss_vanishes_for_exact_consistency_function_under_lpips(lpips_vgg):
    """LPIPS with a fixed random backbone: 0 between identical images, so the exact consistency
    function's loss is ~0 beside a perturbed student's (3x8x8 Gaussian images, upsampled to 64)."""
    mu = torch.linspace(-0.4, 0.4, 3 * 8 * 8, dtype=F64).reshape(1, 3, 8, 8)
    x = mu + S * torch.randn(256, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(9))

    def exact_f(xx, t):
        return exact_consistency(xx, t, mu=mu.flatten())

    def exact_d(xx, t):
        return exact_denoiser(xx, t, mu=mu.flatten())

    def perturbed(xx, t):
        return exact_f(xx, t) + 0.1 * torch.sign(torch.sin(torch.arange(xx[0].numel(), dtype=F64))).reshape(xx[0].shape)

    dist = LPIPSDistance(lpips_vgg.double(), resize=64)
    exact = cd_loss(exact_f, exact_f, exact_d, x, ascending(80), dist, torch.Generator().manual_seed(1))
    off = cd_loss(perturbed, exact_f, exact_d, x, ascending(80), dist, torch.Generator().manual_seed(1))
    assert exact.shape == (256,) and torch.all(exact >= 0)
    assert off.mean() > 0
    assert exact.mean() < 1e-3 * off.mean(), (exact.mean().item(), off.mean().item())
    lpips_vgg.float()


# ------------------------------------------------------------------------------------------- EMAs

def _tiny_net(seed=0):
    torch.manual_seed(seed)
    return build_net(TINY_UNET, resolution=8, channels=1)


def test_ema_update_arithmetic():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    bn_a, bn_b = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    ema, model = torch.nn.Sequential(a, bn_a), torch.nn.Sequential(b, bn_b)
    bn_b.running_mean.fill_(3.0)
    old = [p.detach().clone() for p in ema.parameters()]
    new = [p.detach().clone() for p in model.parameters()]
    ema_update(ema, model, 0.9)
    for e, o, n in zip(ema.parameters(), old, new):
        torch.testing.assert_close(e.detach(), 0.9 * o + 0.1 * n)
    assert torch.equal(bn_a.running_mean, bn_b.running_mean)  # buffers are copied, not averaged
    ema_update(ema, model, 1.0)
    for e, o, n in zip(ema.parameters(), old, new):
        torch.testing.assert_close(e.detach(), 0.9 * o + 0.1 * n)
    ema_update(ema, model, 0.0)
    for e, n in zip(ema.parameters(), new):
        assert torch.equal(e.detach(), n)


def test_ema_beta_arithmetic():
    cfg = TrainConfig(steps=10, batch_size=32, lr=1e-3, ema_halflife_kimg=500.0, ema_rampup_ratio=0.05)
    # ramp-up: half-life = min(500k, 0.05 * images_seen)
    assert ema_beta(cfg, 1000) == pytest.approx(0.5 ** (32 / 50), rel=1e-12)
    assert ema_beta(cfg, 10 ** 8) == pytest.approx(0.5 ** (32 / 500_000), rel=1e-12)
    assert ema_beta(cfg, 0) == pytest.approx(0.0, abs=1e-300)
    no_ramp = TrainConfig(steps=10, batch_size=32, lr=1e-3, ema_halflife_kimg=0.5, ema_rampup_ratio=None)
    assert ema_beta(no_ramp, 0) == pytest.approx(0.5 ** (32 / 500), rel=1e-12)
    # half-life semantics: after halflife / batch_size updates the weight of the start is 1/2
    assert ema_beta(no_ramp, 0) ** (500 / 32) == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("mu", [0.0, 0.5, 0.95])
def test_consistency_distillation_after_step_moves_target_by_mu(mu):
    teacher = EDMDenoiser(_tiny_net(0)).requires_grad_(False).eval()
    student = ConsistencyFunction(copy.deepcopy(teacher.net), 0.5, SIGMA_MIN)
    obj = ConsistencyDistillation(student, teacher, ascending(18).float(), l2, mu)
    assert obj.mu == mu and obj.model is student
    assert all(not p.requires_grad for p in obj.target.parameters())
    assert obj.target is not student and obj.target.net is not student.net
    assert set(obj.extra_modules()) == {"target"}  # the frozen teacher is reloaded from its file, not checkpointed
    old = [p.detach().clone() for p in obj.target.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    new = [p.detach().clone() for p in student.parameters()]
    obj.after_step(student, 1)
    for t, o, n in zip(obj.target.parameters(), old, new):
        torch.testing.assert_close(t.detach(), mu * o + (1 - mu) * n, rtol=1e-6, atol=1e-6)
    if mu == 0.0:
        for t, n in zip(obj.target.parameters(), student.parameters()):
            assert torch.equal(t, n)
    # the online student is untouched
    for p, n in zip(student.parameters(), new):
        assert torch.equal(p.detach(), n)


def test_lpips_distillation_steps_train_the_student_only(lpips_vgg):
    """CD with LPIPS as its metric: gradients reach the student through the (frozen) LPIPS network."""
    teacher = EDMDenoiser(_tiny_net(1), 0.5).requires_grad_(False).eval()
    student = ConsistencyFunction(copy.deepcopy(teacher.net), 0.5, SIGMA_MIN).requires_grad_(True).train()
    obj = ConsistencyDistillation(student, teacher, ascending(18).float(), LPIPSDistance(lpips_vgg, resize=32), 0.0)
    y = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    before = [p.detach().clone() for p in lpips_vgg.parameters()]
    losses = []
    for step in range(8):
        loss = obj.loss(student, y, torch.Generator().manual_seed(3)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert all(p.grad is None for p in lpips_vgg.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        opt.step()
        obj.after_step(student, step)
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(p, b) for p, b in zip(lpips_vgg.parameters(), before))


# -------------------------------------------------------------------------------- student dropout

class MaskNet(torch.nn.Module):
    """f(x, t) = dropout(ones): its output is the dropout mask itself (times 1 / (1 - p))."""

    def __init__(self, p):
        super().__init__()
        self.drop = torch.nn.Dropout(p)

    def forward(self, x, t):
        return self.drop(torch.ones_like(x))


@pytest.mark.parametrize("shared", [True, False])
def test_shared_dropout_gives_target_the_online_masks(shared):
    student, target = MaskNet(0.5).train(), MaskNet(0.5).train()
    x = gaussian_batch(256, seed=10)
    loss = cd_loss(student, target, exact_denoiser, x, ascending(18), l2,
                   torch.Generator().manual_seed(11), shared_dropout=shared)
    if shared:
        assert torch.equal(loss, torch.zeros_like(loss))
    else:
        assert loss.mean() > 0.5  # independent masks with p = 0.5 disagree on half the entries
    # the global RNG moves on after the pair, so the next step gets new masks
    a = student(x, None)
    b = student(x, None)
    assert not torch.equal(a, b)


def test_student_dropout_defaults_to_zero_and_target_is_eval_without_it():
    teacher_cfg = dict(TINY_UNET, dropout=0.13)
    teacher = EDMDenoiser(build_net(teacher_cfg, 8, 1)).requires_grad_(False).eval()
    assert has_dropout(teacher)
    student, net_cfg, counts = build_student(teacher, teacher_cfg, {}, 8, 1, 0.5, SIGMA_MIN)
    assert net_cfg["dropout"] == 0.0 and not has_dropout(student)
    assert counts["inherited_parameters"] == counts["parameters"] == count_parameters(student)
    obj = ConsistencyDistillation(student, teacher, ascending(18).float(), l2, 0.0)
    assert not obj.shared_dropout and not obj.target.training
    # identical weights, no dropout: online and target agree exactly on the same input
    x = torch.randn(4, 1, 8, 8)
    t = torch.full((4,), 1.0)
    assert torch.equal(student(x, t), obj.target(x, t))


def test_student_with_dropout_runs_target_in_train_mode_with_shared_masks():
    teacher_cfg = dict(TINY_UNET, dropout=0.13)
    teacher = EDMDenoiser(build_net(teacher_cfg, 8, 1)).requires_grad_(False).eval()
    student, net_cfg, _ = build_student(teacher, teacher_cfg, {"dropout": 0.3}, 8, 1, 0.5, SIGMA_MIN)
    assert net_cfg["dropout"] == 0.3 and has_dropout(student)
    obj = ConsistencyDistillation(student, teacher, ascending(18).float(), l2, 0.0)
    assert obj.shared_dropout and obj.target.training and student.training
    # same weights, same input, train mode: equal only because the masks are replayed
    x = torch.randn(4, 1, 8, 8)
    t = torch.full((4,), 1.0)
    with torch.no_grad():
        from pipeline.distill.cd import replayed_rng
        with replayed_rng(x.device):
            a = student(x, t)
        b = obj.target(x, t)
        c = obj.target(x, t)
    assert torch.equal(a, b) and not torch.equal(b, c)


# ------------------------------------------------------------------------- student initialisation

def test_mismatched_student_inherits_every_compatible_parameter():
    teacher_cfg = dict(TINY_UNET, layers_per_block=2)
    torch.manual_seed(0)
    teacher = EDMDenoiser(build_net(teacher_cfg, 8, 1)).requires_grad_(False).eval()
    for blocks in (1, 3):
        torch.manual_seed(1)
        spec = {"net_config": dict(teacher_cfg, layers_per_block=blocks)}
        student, net_cfg, counts = build_student(teacher, teacher_cfg, spec, 8, 1, 0.5, SIGMA_MIN)
        assert net_cfg["layers_per_block"] == blocks
        theirs, ours = teacher.net.state_dict(), student.net.state_dict()
        shared = [k for k in ours if k in theirs and ours[k].shape == theirs[k].shape]
        assert counts["inherited_tensors"] == len(shared) < len(ours)
        params = dict(student.net.named_parameters())
        assert counts["inherited_parameters"] == sum(params[k].numel() for k in shared if k in params)
        assert 0 < counts["inherited_parameters"] < counts["parameters"] == count_parameters(student.net)
        for k in shared:
            assert torch.equal(ours[k], theirs[k]), k
        # time embedding, the first conv and the stem are always compatible
        assert "unet.conv_in.weight" in shared and "unet.time_embedding.linear_1.weight" in shared


def test_random_student_inherits_nothing_and_is_seeded():
    teacher = EDMDenoiser(build_net(TINY_UNET, 8, 1)).requires_grad_(False).eval()
    torch.manual_seed(5)
    a, _, counts = build_student(teacher, TINY_UNET, {"init": "random"}, 8, 1, 0.5, SIGMA_MIN)
    torch.manual_seed(5)
    b, _, _ = build_student(teacher, TINY_UNET, {"init": "random"}, 8, 1, 0.5, SIGMA_MIN)
    assert counts["init"] == "random" and counts["inherited_parameters"] == 0 and counts["inherited_tensors"] == 0
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.net.unet.conv_in.weight, teacher.net.unet.conv_in.weight)
    with pytest.raises(ValueError, match="initialisation"):
        build_student(teacher, TINY_UNET, {"init": "pretrained"}, 8, 1, 0.5, SIGMA_MIN)


def test_student_net_config_overrides_only_dropout():
    assert student_net_config({"a": 1, "dropout": 0.13}, None, 0.0) == {"a": 1, "dropout": 0.0}
    assert student_net_config({"a": 1}, {"a": 2}, 0.1) == {"a": 2, "dropout": 0.1}


# ----------------------------------------------------------------------------- end-to-end gradient

def test_tiny_unet_distillation_steps_reduce_loss():
    teacher = EDMDenoiser(_tiny_net(1), 0.5).requires_grad_(False).eval()
    student = ConsistencyFunction(copy.deepcopy(teacher.net), 0.5, SIGMA_MIN).requires_grad_(True).train()
    obj = ConsistencyDistillation(student, teacher, ascending(18).to(torch.float32), l2, 0.9)
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    y = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)

    def batch_loss():
        return obj.loss(student, y, torch.Generator().manual_seed(3)).mean()  # fixed sigmas and noise

    losses = []
    for step in range(15):
        opt.zero_grad(set_to_none=True)
        loss = batch_loss()
        losses.append(loss.item())
        loss.backward()
        grads = [p.grad for p in student.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
        assert all(p.grad is None for p in obj.target.parameters())
        assert all(p.grad is None for p in teacher.parameters())
        opt.step()
        obj.after_step(student, step)
    with torch.no_grad():
        final = batch_loss().item()
    assert math.isfinite(losses[0]) and losses[0] > 0
    assert final < 0.5 * losses[0], (losses, final)
    for p, b in zip(teacher.parameters(), teacher_before):
        assert torch.equal(p, b)
