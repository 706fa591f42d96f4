"""Table 5's baselines: progressive distillation, DMD and the teacher's refine, on the Gaussian test
bed (tests/gaussian.py) where the teacher's denoiser and flow are exact, and on a tiny net."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gaussian import F64, MU, S, SIGMA_MAX, SIGMA_MIN, exact_denoiser
from pipeline.diffusion import edm_sample, euler_sample, euler_step, karras_sigmas, refine_sample
from pipeline.distill.distances import l2
from pipeline.diffusion.karras import karras_curve
from pipeline.distill.pd import inverted_target, pd_loss, stage_plan, truncated_snr


class LookupStudent:
    """The exact stage-k PD student of the Gaussian teacher: at each level t of an N-step grid it
    returns the inverted target of the teacher's two Euler steps (affine in x, so exact)."""

    def __init__(self, teacher, n):
        self.teacher, self.n = teacher, n
        self.levels = [karras_curve(torch.tensor(i / n, dtype=F64), SIGMA_MIN, SIGMA_MAX, 7.0) for i in range(n + 1)]
        self.mids = [karras_curve(torch.tensor((i + 0.5) / n, dtype=F64), SIGMA_MIN, SIGMA_MAX, 7.0) for i in range(n)]

    def __call__(self, x, sigma):
        out = torch.empty_like(x)
        for row, s in enumerate(torch.as_tensor(sigma).expand(x.shape[0])):
            i = min(range(self.n), key=lambda k: abs(float(self.levels[k]) - float(s)))
            t, t2, t3 = self.levels[i], self.mids[i], self.levels[i + 1]
            xr = x[row:row + 1]
            x3 = euler_step(self.teacher, euler_step(self.teacher, xr, t, t2), t2, t3)
            out[row] = inverted_target(xr, t.reshape(1), x3, t3.reshape(1))[0]
        return out


def test_pd_grids_nest_and_the_target_inverts_one_step_to_two_teacher_steps():
    """N student steps of the exact inverted student = 2N teacher Euler steps, to float64 rounding,
    and its PD loss is zero; the teacher's N-step sampler is not (so the test can fail)."""
    assert torch.allclose(karras_sigmas(9)[::2], karras_sigmas(5), rtol=0, atol=1e-12)
    torch.manual_seed(0)
    z = torch.randn(16, 4, dtype=F64)
    for n in (1, 2, 4):
        student = LookupStudent(exact_denoiser, n)
        two_n = euler_sample(exact_denoiser, z, 2 * n)
        assert torch.allclose(euler_sample(student, z, n), two_n, rtol=0, atol=1e-9)
        assert not torch.allclose(euler_sample(exact_denoiser, z, n), two_n, atol=1e-4)
        x = (MU + S * torch.randn(32, 4, dtype=F64)).reshape(32, 4, 1, 1)
        loss = pd_loss(student, exact_denoiser, x, n, SIGMA_MIN, SIGMA_MAX, 7.0, l2,
                       torch.Generator().manual_seed(1))
        assert loss.max() < 1e-18
        assert pd_loss(exact_denoiser, exact_denoiser, x, n, SIGMA_MIN, SIGMA_MAX, 7.0, l2,
                       torch.Generator().manual_seed(1)).max() > 1e-8


def test_inverted_target_and_weight_by_hand():
    x_t, t = torch.tensor([[[[2.0]]]]), torch.tensor([4.0])
    x_t3, t3 = torch.tensor([[[[1.0]]]]), torch.tensor([2.0])
    # x_t3 = x_t + (t3 - t)(x_t - D)/t  ->  1 = 2 - 2 (2 - D)/4  ->  D = 0
    assert inverted_target(x_t, t, x_t3, t3).item() == pytest.approx(0.0)
    assert truncated_snr(torch.tensor([0.5, 1.0, 3.0])).tolist() == pytest.approx([4.0, 1.0, 1.0])


def test_stage_plan_halves_steps_and_doubles_the_last_two_stages():
    assert stage_plan(8, 100) == [(8, 100), (4, 100), (2, 200), (1, 200)]
    assert stage_plan(1, 10, 15) == [(1, 15)]
    with pytest.raises(ValueError, match="power of 2"):
        stage_plan(12, 10)


def test_refine_at_the_top_level_is_teacher_sampling_from_the_same_noise():
    torch.manual_seed(0)
    z, x0 = torch.randn(8, 4, dtype=F64), torch.rand(8, 4, dtype=F64) * 2 - 1
    refined = refine_sample(exact_denoiser, x0, z, SIGMA_MAX, 18, SIGMA_MIN)
    assert torch.equal(refined, edm_sample(exact_denoiser, z + x0 / SIGMA_MAX, 18, SIGMA_MIN, SIGMA_MAX))
    fresh = edm_sample(exact_denoiser, z, 18, SIGMA_MIN, SIGMA_MAX)
    # the starts differ by x0 at sigma_max, which the exact flow shrinks by s / sqrt(s^2 + 80^2) on the
    # way to sigma = 0; 18 Heun steps approximate that linear map to within 15 %
    bound = x0.abs().max() * S / math.sqrt(S ** 2 + SIGMA_MAX ** 2)
    assert (refined - fresh).abs().max() <= bound * 1.15
    # at a low level the refine stays near x0 (within the 0.05 z it added); at the top it forgets x0
    low = refine_sample(exact_denoiser, x0, z, 0.05, 18, SIGMA_MIN)
    assert (low - x0).abs().mean() < 0.05 < 0.3 < (refined - x0).abs().mean()
    with pytest.raises(ValueError, match="above sigma_min"):
        refine_sample(exact_denoiser, x0, z, SIGMA_MIN, 18, SIGMA_MIN)


def test_euler_sample_with_denoise_is_one_denoiser_call_at_sigma_max():
    z = torch.randn(4, 4, dtype=F64)
    one = euler_sample(exact_denoiser, z, 1, SIGMA_MIN, SIGMA_MAX, denoise=True)
    assert torch.allclose(one, exact_denoiser(z * SIGMA_MAX, SIGMA_MAX), rtol=0, atol=1e-12)


class GaussianScore(torch.nn.Module):
    """A denoiser of the family N(m, s^2 I) (the exact one for Gaussian data), with m and log s learnt."""

    def __init__(self, m, s):
        super().__init__()
        self.m = torch.nn.Parameter(torch.as_tensor(m, dtype=torch.float32).clone())
        self.log_s = torch.nn.Parameter(torch.tensor(math.log(s), dtype=torch.float32))
        self.sigma_data = 0.5

    def forward(self, x, sigma):
        s2 = self.log_s.exp() ** 2
        sig = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        m = self.m.reshape(1, -1, 1, 1)
        return m + s2 / (s2 + sig ** 2) * (x - m)


class GaussianGenerator(torch.nn.Module):
    """G(z) = D(sigma_max z, sigma_max) = m + s z: a one-step generator of N(m, s^2 I)."""

    def __init__(self, m, s):
        super().__init__()
        self.m = torch.nn.Parameter(torch.as_tensor(m, dtype=torch.float32).clone())
        self.s = s
        self.sigma_data = 0.5

    def forward(self, x, sigma):
        sig = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return self.m.reshape(1, -1, 1, 1) + self.s * x / sig


def _dmd(generator, teacher, fake, **over):
    from accelerate import Accelerator

    from pipeline.distill.dmd import DistributionMatching

    cfg = {**dict(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, fake_lr=0.05, fake_updates=1, fake_weight_decay=0.0), **over}
    return DistributionMatching(generator, teacher, fake, cfg, Accelerator(cpu=True), 256, 0, (2, 1, 1))


def test_dmd_fake_score_converges_to_the_generators_score():
    """Trained online on the generator's samples, the fake score's Gaussian learns the generator's
    mean and spread (0.8, -0.3; 0.5), starting from the teacher's (0, 0; 1)."""
    generator = GaussianGenerator([0.8, -0.3], 0.5).requires_grad_(False)
    objective = _dmd(generator, GaussianScore([0.0, 0.0], 1.0), GaussianScore([0.0, 0.0], 1.0))
    for step in range(400):
        objective.after_step(generator, step)
    fake = objective.fake
    assert fake.m.detach().tolist() == pytest.approx([0.8, -0.3], abs=0.05)
    assert fake.log_s.exp().item() == pytest.approx(0.5, abs=0.05)


def test_dmd_generator_gradient_moves_its_mean_toward_the_teachers():
    """With exact Gaussian scores, the distribution-matching gradient on the generator's mean points
    from the teacher's mean to the generator's (descent moves it back), and vanishes when they agree."""
    from pipeline.diffusion.noise import BatchNoise

    teacher = GaussianScore([0.0, 0.0], 0.5)
    for m, expect in (([0.6, -0.4], (1, -1)), ([0.0, 0.0], (0, 0))):
        generator = GaussianGenerator(m, 0.5)
        objective = _dmd(generator, teacher, GaussianScore(m, 0.5))
        y = torch.zeros(256, 2, 1, 1)
        loss = objective.loss(generator, y, BatchNoise(torch.Generator().manual_seed(0), 256)).mean()
        loss.backward()
        grad = generator.m.grad
        for g, e in zip(grad.tolist(), expect):
            assert (g > 1e-4) if e > 0 else (g < -1e-4) if e < 0 else abs(g) < 1e-7


def _digits_subset(tmp_path):
    from pipeline.data import build_subset, load_source, write_subset

    subset = tmp_path / "s.parquet"
    images, labels = load_source({"source": "digits", "resolution": 8})
    write_subset(subset, build_subset(images, labels, {"kind": "uniform", "n": 8, "seed": 0}), {})
    return subset


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from pipeline.diffusion import EDMDenoiser
    from pipeline.modelio import model_meta, save_model
    from pipeline.nets import build_net
    from tiny import TINY_UNET

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("baselines")
    teacher = EDMDenoiser(build_net(TINY_UNET, 8, 1), 0.5)
    save_model(root / "teacher", teacher, model_meta("edm", TINY_UNET, 8, 1, 0.5, SIGMA_MIN, SIGMA_MAX), {})
    return root


def test_pd_runs_its_stages_and_resumes_a_finished_stage(tiny_teacher, tmp_path):
    """Two stages (2 steps, then 1) of a tiny net: each stage's result is kept, and a second run with the
    same config reuses them instead of training again; the student samples in one Euler step."""
    from pipeline.distill.pd import distill_pd
    from pipeline.modelio import load_model
    from pipeline.sample import generate

    subset = _digits_subset(tmp_path)
    spec = {"pd": {"start_scales": 2, "stage_steps": 2, "final_stage_steps": 3}, "metric": "l2",
            "train": {"steps": 1, "batch_size": 4, "lr": 1e-3, "grad_clip": 1.0, "lr_decay": "linear",
                      "ema_rate": 0.0, "log_every": 1}}
    log = tmp_path / "pd.jsonl"
    stats = distill_pd(subset, tiny_teacher / "teacher", tmp_path / "pd", spec, tmp_path / "ckpt", log)
    assert [(s["student_steps"], s["steps"]) for s in stats["stages"]] == [(2, 3), (1, 3)]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["step"], r["student_steps"]) for r in records] == [(1, 2), (2, 2), (3, 2), (4, 1), (5, 1), (6, 1)]
    assert records[0]["lr"] == pytest.approx(1e-3) and records[2]["lr"] == pytest.approx(1e-3 / 3)
    first = load_model(tmp_path / "pd", "cpu")[0].state_dict()
    again = distill_pd(subset, tiny_teacher / "teacher", tmp_path / "pd2", spec, tmp_path / "ckpt", None)
    assert again["stages"] == stats["stages"]
    second, meta = load_model(tmp_path / "pd2", "cpu")
    assert all(torch.equal(first[k], v) for k, v in second.state_dict().items())
    assert meta["kind"] == "edm" and meta["method"] == "pd" and meta["pd_steps"] == 1
    images = generate(second, meta, {"kind": "euler", "steps": 1}, [1, 2, 3])
    assert images.shape == (3, 8, 8, 1)


def test_dmd_trains_resumes_its_fake_score_and_samples_in_one_step(tiny_teacher, tmp_path):
    from pipeline.distill.dmd import distill_dmd
    from pipeline.modelio import load_model
    from pipeline.sample import generate

    subset = _digits_subset(tmp_path)
    spec = {"dmd": {"fake_lr": 1e-3, "fake_updates": 2},
            "train": {"steps": 2, "batch_size": 4, "lr": 1e-3, "optimizer": "adamw", "weight_decay": 0.01,
                      "grad_clip": 10.0, "ema_rate": 0.0, "checkpoint_every": 1, "log_every": 1}}
    stats = distill_dmd(subset, tiny_teacher / "teacher", tmp_path / "a", spec, tmp_path / "ckpt-a")
    saved = torch.load(sorted((tmp_path / "ckpt-a").glob("ckpt-*"))[-1] / "extras.pt", weights_only=True)
    assert set(saved) >= {"fake", "fake_opt"} and saved["fake_opt"]["state"]
    longer = dict(spec, train=dict(spec["train"], steps=3))
    resumed = distill_dmd(subset, tiny_teacher / "teacher", tmp_path / "b", longer, tmp_path / "ckpt-a")
    straight = distill_dmd(subset, tiny_teacher / "teacher", tmp_path / "c", longer, tmp_path / "ckpt-c")
    assert resumed["attempts"][-1]["from_step"] == 2 and stats["method"] == "dmd"
    b, meta = load_model(tmp_path / "b", "cpu")
    c, _ = load_model(tmp_path / "c", "cpu")
    assert all(torch.allclose(v, c.state_dict()[k], atol=1e-6) for k, v in b.state_dict().items())
    images = generate(b, meta, {"kind": "euler", "steps": 1, "denoise": True}, [0, 1])
    assert images.shape == (2, 8, 8, 1)


def test_refine_sampler_draws_after_the_base_and_needs_the_teacher(tiny_teacher):
    from pipeline.modelio import load_model
    from pipeline.sample import generate, sampler_nfe

    teacher = load_model(tiny_teacher / "teacher", "cpu")
    base = {"kind": "euler", "steps": 1, "denoise": True}
    refine = {"kind": "refine", "base": "one", "sigma": 2.0, "steps": 4, "base_spec": base}
    assert sampler_nfe(refine) == 1 + 7
    a = generate(*teacher, refine, [5, 6], teacher=teacher)
    assert a.shape == (2, 8, 8, 1) and (a == generate(*teacher, refine, [5, 6], teacher=teacher)).all()
    with pytest.raises(ValueError, match="teacher"):
        generate(*teacher, refine, [5])


def _embedded_with_baselines():
    import yaml

    from pipeline import config as pconfig

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "embedded.yaml").read_text())
    cfg["teachers"]["teacher-48"]["snapshots"] = [200, 400]
    cfg["teacher_selections"] = {"teacher-mem30": {"run": "teacher-48", "memorization": 0.3, "sampler": "heun-18"}}
    train = {"steps": 10, "batch_size": 8, "lr": 5e-5, "grad_clip": 1.0, "lr_decay": "linear", "ema_rate": 0.0}
    cfg["students"]["pd-48"] = {"method": "pd", "teacher": "teacher-mem30", "metric": "l2",
                                "pd": {"start_scales": 4, "stage_steps": 5}, "train": train}
    cfg["students"]["dmd-48"] = {"method": "dmd", "teacher": "teacher-48", "dmd": {"fake_lr": 1e-4}, "train": train}
    cfg["students"]["ccd-48"] = {"method": "cd-continuous", "teacher": "teacher-48", "stopgrad": True, "train": train}
    cfg["sample_figures"] = {"fig5": {"count": 8, "panels": [{"model": "ccd-48", "sampler": "1-step"}]}}
    cfg["samplers"].update({"pd-1": {"kind": "euler", "steps": 1},
                            "dmd-1": {"kind": "euler", "steps": 1, "denoise": True},
                            "refine-2": {"kind": "refine", "base": "pd-1", "sigma": 2.0, "steps": 18}})
    return cfg, pconfig


def test_config_knows_pd_dmd_refine_and_selected_teachers():
    cfg, pconfig = _embedded_with_baselines()
    cfg["replicates"] = 2
    cfg["tables"]["t5"] = {"rows": [{"model": "pd-48", "sampler": "pd-1"}, {"model": "pd-48", "sampler": "refine-2"},
                                    {"model": "teacher-mem30", "sampler": "heun-18"},
                                    {"model": "dmd-48", "sampler": "dmd-1"}]}
    out = pconfig.validate(cfg)
    assert pconfig.samplers_for(out, "pd-48") == ("euler", "refine")
    assert pconfig.samplers_for(out, "teacher-mem30") == ("heun", "stochastic", "euler")
    assert pconfig.model_dir(out, "teacher-mem30.r1") == "results/selected/teacher-mem30.r1"
    assert out["teacher_selections"]["teacher-mem30.r1"]["run"] == "teacher-48.r1"
    assert out["students"]["pd-48.r1"]["teacher"] == "teacher-mem30.r1"
    assert pconfig.subset_of(out, "pd-48.r1") == "digits-48" and pconfig.teacher_of(out, "pd-48") == "teacher-mem30"
    assert pconfig.selection_candidates(out, "teacher-mem30") == ["teacher-48@200", "teacher-48@400", "teacher-48"]
    assert [r["role"] for r in pconfig.table_rows(out, "t5")][:3] == ["student", "student", "teacher"]
    assert pconfig.sampler_spec(out, "refine-2")["base_spec"] == {"kind": "euler", "steps": 1}
    assert pconfig.samplers_for(out, "ccd-48.r1") == ("consistency", "refine")


@pytest.mark.parametrize("change, message", [
    (lambda c: c["samplers"]["refine-2"].update(base="nope"), "refine-2.base"),
    (lambda c: c["samplers"]["refine-2"].update(base="heun-18") or c["tables"]["demo"]["rows"].append(
        {"model": "pd-48", "sampler": "refine-2"}), "cannot sample 'pd-48'"),
    (lambda c: c["tables"]["demo"]["rows"].append({"model": "teacher-48", "sampler": "refine-2"}), "is a teacher"),
    (lambda c: c["tables"]["demo"]["rows"].append({"model": "pd-48", "sampler": "1-step"}), "euler or refine"),
    (lambda c: c["teachers"]["teacher-48"].pop("snapshots"), "with `snapshots`"),
    (lambda c: c["students"]["pd-48"].update(num_scales=18), "pd-48"),
    (lambda c: c["students"]["dmd-48"].pop("dmd"), "dmd"),
    (lambda c: c["samplers"]["pd-1"].update(ts=[80.0]), "pd-1"),
    (lambda c: c["students"]["ccd-48"].update(num_scales=18), "ccd-48"),
    (lambda c: c["students"]["cd-48"].update(stopgrad=True), "cd-48"),
    (lambda c: c["sample_figures"]["fig5"]["panels"].append({"model": "nope", "sampler": "1-step"}),
     r"fig5.panels\[1\].model"),
])
def test_baseline_config_errors_name_the_key(change, message):
    cfg, pconfig = _embedded_with_baselines()
    change(cfg)
    with pytest.raises(pconfig.ConfigError, match=message):
        pconfig.validate(cfg)


def test_selection_picks_the_model_nearest_the_rate(tmp_path):
    """The nearest rate by absolute difference, ties to the earlier model (the study's "30%" teacher
    copies 26.57%); the first model past the rate would take 0.35 below, 0.12 above."""
    from pipeline.modelio import CONFIG, STATS, WEIGHTS
    from pipeline.selection import close_to_target, nearest_rate, select_teacher

    assert nearest_rate([0.02, 0.08, 0.12, 0.09, 0.3], 0.1) == 3
    assert nearest_rate([0.25, 0.75], 0.5) == 0 and nearest_rate([0.0, 0.0, 0.5], 0.0) == 0
    assert close_to_target(0.1462, 0.1) and close_to_target(0.0667, 0.1) and not close_to_target(0.2246, 0.1)
    assert not close_to_target(0.0391, 0.1) and close_to_target(0.0, 0.0)
    dirs, metrics = [], []
    for k, rate in enumerate([0.04, 0.26, 0.35]):
        d = tmp_path / f"m{k}"
        d.mkdir()
        (d / WEIGHTS).write_bytes(bytes([k]) * 8)
        (d / CONFIG).write_text(json.dumps({"kind": "edm", "step": k}))
        (d / STATS).write_text(json.dumps({"steps": k}))
        metrics.append(tmp_path / f"m{k}.json")
        metrics[-1].write_text(json.dumps({"memorization": {"mem_ratio": rate}}))
        dirs.append(d)
    chosen = select_teacher(["a@1", "a@2", "a"], dirs, metrics, 0.3, tmp_path / "out")
    assert chosen["model"] == "a@2" and (tmp_path / "out" / WEIGHTS).read_bytes() == bytes([1]) * 8
    stats = json.loads((tmp_path / "out" / STATS).read_text())
    assert stats["steps"] == 1 and [c["mem_ratio"] for c in stats["selection"]["candidates"]] == [0.04, 0.26, 0.35]
    assert stats["selection"]["mem_ratio"] == 0.26 and stats["selection"]["within_factor"] == 1.5
    far = select_teacher(["a@1", "a@2", "a"], dirs, metrics, 0.1, tmp_path / "o2")
    assert far["model"] == "a@1" and far["within_factor"] is None  # 4% is not within 1.5x of 10%


def _grad(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("stopgrad", [True, False])
def test_continuous_cd_gradient_is_the_limit_of_the_discrete_one(stopgrad):
    """On Gaussian data (exact teacher) with a tiny float64 student, the discrete CD gradient at step dt,
    rescaled (2 dt / d with the online weights as stop-gradient target; 2 dt^2 ||diffs|| / d without
    stop-gradient), approaches the continuous-time loss's gradient as dt -> 0, at first order."""
    from pipeline.diffusion import ConsistencyFunction
    from pipeline.distill.cd_continuous import continuous_cd_loss
    from pipeline.nets import build_net
    from tiny import TINY_UNET

    torch.manual_seed(0)
    mu = torch.linspace(-0.5, 0.5, 64, dtype=F64)

    def teacher(x, sigma):
        return exact_denoiser(x, sigma, mu=mu, s=S)

    student = ConsistencyFunction(build_net(TINY_UNET, 8, 1), 0.5, SIGMA_MIN).double()
    for p in student.parameters():  # a generic point: the zero-initialised output layer would make f = c_skip x
        p.data.add_(0.05 * torch.randn_like(p))
    x = (mu + S * torch.randn(64, dtype=F64)).reshape(1, 1, 8, 8)
    gen = torch.Generator().manual_seed(3)
    cont_loss = continuous_cd_loss(student, teacher, x, SIGMA_MIN, SIGMA_MAX, 7.0, gen, stopgrad).sum()
    g_cont = _grad(student, cont_loss)
    # the same draws: t from the first uniform, z from the first normal of a generator seeded alike
    gen = torch.Generator().manual_seed(3)
    lo, hi = SIGMA_MIN ** (1 / 7), SIGMA_MAX ** (1 / 7)
    t = (lo + torch.rand((1,), generator=gen, dtype=F64) * (hi - lo)) ** 7
    x_t = x + t.reshape(1, 1, 1, 1) * torch.randn((1, 1, 8, 8), generator=gen, dtype=F64)
    with torch.no_grad():
        _, diffs = torch.func.jvp(student, (x_t, t), ((x_t - teacher(x_t, t)) / t.reshape(1, 1, 1, 1) * -1, -torch.ones_like(t)))
    errors = []
    for dt in (0.1, 0.01, 0.001):
        dt_abs = dt * float(t)
        with torch.no_grad():
            x_n = euler_step(teacher, x_t, t, t - dt_abs)
        online = student(x_t, t)
        other = student(x_n, t - dt_abs)
        if stopgrad:
            g = _grad(student, l2(online, other.detach()).sum()) * 64 / (2 * dt_abs)
        else:
            g = _grad(student, l2(online, other).sum()) * 64 / (2 * dt_abs ** 2 * diffs.flatten().norm())
        errors.append(float((g - g_cont).norm() / g_cont.norm()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.01, errors
    assert errors[1] / errors[2] > 5, errors  # first order in dt


def test_continuous_cd_distils_a_tiny_student(tiny_teacher, tmp_path):
    from pipeline.distill.cd_continuous import distill_cd_continuous
    from pipeline.modelio import load_model
    from pipeline.sample import generate

    spec = {"stopgrad": True, "train": {"steps": 2, "batch_size": 4, "lr": 1e-3, "optimizer": "radam", "log_every": 1}}
    stats = distill_cd_continuous(_digits_subset(tmp_path), tiny_teacher / "teacher", tmp_path / "c", spec)
    model, meta = load_model(tmp_path / "c", "cpu")
    assert stats["method"] == "cd-continuous" and stats["stopgrad"] and meta["kind"] == "consistency"
    assert all(math.isfinite(r["loss"]) for r in stats["history"])
    assert generate(model, meta, {"kind": "consistency", "ts": [80.0]}, [0, 1]).shape == (2, 8, 8, 1)


def test_curve_figure_draws_each_run_of_a_setting_and_sample_grids(tmp_path):
    """Fig. 8: several student runs share a setting (one line each); Figs. 4 and 5: sample grids."""
    import csv as csv_module

    from PIL import Image

    from pipeline.io import write_image_table
    from pipeline.shards import write_manifest
    from pipeline.figures import curve_figure, sample_grid_figure

    fields = ["setting", "model", "role", "step", "mem", "quality", "quality_name", "subset"]
    rows = [{"setting": "10% teacher", "model": "t", "role": "teacher", "step": "", "mem": "0.1", "quality": "20",
             "quality_name": "FID", "subset": "s"}]
    for run in ("cd-a", "cd-b"):
        rows += [{"setting": "10% teacher", "model": f"{run}@{k}" if k < 300 else run, "role": "student", "step": str(k),
                  "mem": str(k / 1e4), "quality": str(30 - k / 100), "quality_name": "FID", "subset": "s"}
                 for k in (100, 200, 300)]
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv_module.DictWriter(f, fields)
        w.writeheader()
        w.writerows(rows)
    curve_figure(tmp_path / "t.csv", tmp_path / "fig.png")
    with Image.open(tmp_path / "fig.png") as im:
        assert im.size[0] > 300
    manifests = []
    for k in range(2):
        shard = tmp_path / f"s{k}" / "shard-00000.parquet"
        images = np.full((6, 8, 8, 1), 40 * (k + 1), dtype=np.uint8)
        write_image_table(shard, images, {"sample_id": np.arange(6), "nfe": np.ones(6, dtype=np.int64)}, {"shard": 0})
        manifests.append(tmp_path / f"s{k}" / "manifest.json")
        write_manifest([shard], manifests[-1], 6, 6)
    sample_grid_figure(manifests, ["PD", "CD"], tmp_path / "grid.png", count=4, per_row=2)
    with Image.open(tmp_path / "grid.png") as im:
        pixels = np.asarray(im.convert("L"))
        assert im.size[0] > im.size[1] and {40, 80} <= set(np.unique(pixels))
    with pytest.raises(ValueError, match="one label per sample set"):
        sample_grid_figure(manifests, ["PD"], tmp_path / "bad.png")


def test_dmd_regression_pairs_are_teacher_samples_and_enter_the_loss():
    """DMD's optional regression loss: the pairs are the teacher's Heun samples from their own noise, and
    with weight w the loss grows by w d(G(z_k), y_k) on top of the same distribution-matching term."""
    from pipeline.diffusion.noise import BatchNoise
    from pipeline.distill.dmd import regression_pairs

    teacher = GaussianScore([0.2, -0.1], 0.5)
    z, y = regression_pairs(teacher, 6, (2, 1, 1), seed=0, steps=4, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                            device="cpu")
    assert torch.allclose(y, edm_sample(teacher, z, 4, SIGMA_MIN, SIGMA_MAX))
    generator = GaussianGenerator([0.6, 0.3], 0.5)
    plain = _dmd(generator, teacher, GaussianScore([0.6, 0.3], 0.5))
    with_reg = _dmd(generator, teacher, GaussianScore([0.6, 0.3], 0.5), regression={"weight": 0.25, "pairs": 6})
    with_reg.pairs, with_reg.distance = (z.float(), y.float()), l2
    y_batch = torch.zeros(4, 2, 1, 1)
    a = plain.loss(generator, y_batch, BatchNoise(torch.Generator().manual_seed(0), 4))
    b = with_reg.loss(generator, y_batch, BatchNoise(torch.Generator().manual_seed(0), 4))
    assert (b > a).all()


# ------------------------------------------------------------------ no teacher dropout in what a method trains

@pytest.fixture(scope="module")
def dropout_teacher(tmp_path_factory):
    """A tiny EDM teacher whose net has dropout 0.3 (the paper grid's NCSN++ has 0.13)."""
    from pipeline.diffusion import EDMDenoiser
    from pipeline.modelio import model_meta, save_model
    from pipeline.nets import build_net
    from tiny import TINY_UNET

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("dropout")
    net = dict(TINY_UNET, dropout=0.3)
    save_model(root / "teacher", EDMDenoiser(build_net(net, 8, 1), 0.5), model_meta("edm", net, 8, 1, 0.5, SIGMA_MIN, SIGMA_MAX), {})
    return root / "teacher"


def _captured(monkeypatch, module, name):
    """Wrap module.name so the objective it is called with is kept (first positional argument)."""
    seen = []
    real = getattr(module, name)

    def wrapper(objective, *args, **kwargs):
        seen.append(objective)
        return real(objective, *args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return seen


def test_pd_students_train_without_the_teachers_dropout(dropout_teacher, tmp_path, monkeypatch):
    """Every PD stage's student has no active dropout although its teacher's net has 0.3, and the
    written student says dropout 0 (jcm configs/cifar10_ve_progressive_distillation.py)."""
    from pipeline.distill import pd
    from pipeline.distill.run import has_dropout

    stages = _captured(monkeypatch, pd, "train")
    spec = {"pd": {"start_scales": 2, "stage_steps": 1, "final_stage_steps": 1}, "metric": "l2",
            "train": {"steps": 1, "batch_size": 4, "lr": 1e-3, "ema_rate": 0.0, "log_every": 1}}
    pd.distill_pd(_digits_subset(tmp_path), dropout_teacher, tmp_path / "pd", spec)
    assert len(stages) == 2 and has_dropout(stages[0].teacher)
    assert not any(has_dropout(s.model) for s in stages)
    assert json.loads((tmp_path / "pd" / "config.json").read_text())["net"]["dropout"] == 0.0


def test_dmd_nets_have_no_dropout_and_the_matching_gradient_is_zero_at_the_start(dropout_teacher, tmp_path,
                                                                                  monkeypatch):
    """DMD's generator and fake score are the teacher without dropout (DMD2 edm_network.py), so at
    initialisation the fake score equals the real one bit for bit, although the fake score runs in
    training mode and the real one in eval mode, and the distribution-matching gradient is exactly 0."""
    from pipeline.diffusion.noise import BatchNoise
    from pipeline.distill import dmd
    from pipeline.distill.run import has_dropout

    seen = _captured(monkeypatch, dmd, "train_student")
    monkeypatch.setattr(dmd.DistributionMatching, "after_step", lambda self, model, step: None)
    spec = {"dmd": {"fake_lr": 1e-3, "fake_updates": 1},
            "train": {"steps": 0, "batch_size": 4, "lr": 1e-3, "optimizer": "adamw", "ema_rate": 0.0}}
    dmd.distill_dmd(_digits_subset(tmp_path), dropout_teacher, tmp_path / "dmd", spec)
    objective = seen[0]
    assert has_dropout(objective.teacher) and not has_dropout(objective.model) and not has_dropout(objective.fake)
    assert objective.model.training and objective.fake.training and not objective.teacher.training
    y = torch.zeros(8, 1, 8, 8)
    loss = objective.loss(objective.model, y, BatchNoise(torch.Generator().manual_seed(1), 8)).sum()
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in objective.model.parameters())


def test_dmd_first_fake_update_reuses_the_generators_samples_and_warms_up(monkeypatch):
    """DMD2 train_one_step: the fake score learns from the samples the generator's loss drew (before the
    generator's update); later updates draw fresh ones; its learning rate ramps over `fake_lr_rampup_updates`."""
    from pipeline.diffusion.noise import BatchNoise
    from pipeline.distill import dmd

    generator = GaussianGenerator([0.8, -0.3], 0.5)
    objective = _dmd(generator, GaussianScore([0.0, 0.0], 0.5), GaussianScore([0.0, 0.0], 0.5), fake_updates=3,
                     fake_lr_rampup_updates=6)
    trained_on, rates = [], []
    real_loss = dmd.fake_score_loss

    def recording(fake, x, *args):
        trained_on.append(x.clone())
        rates.append(objective.fake_opt.param_groups[0]["lr"])
        return real_loss(fake, x, *args)

    monkeypatch.setattr(dmd, "fake_score_loss", recording)
    y = torch.zeros(256, 2, 1, 1)
    objective.loss(generator, y, BatchNoise(torch.Generator().manual_seed(0), 256))
    drawn = objective._drawn[0].clone()
    objective.after_step(generator, 0)
    assert torch.equal(trained_on[0], drawn) and not torch.equal(trained_on[1], drawn)
    assert not torch.equal(trained_on[1], trained_on[2]) and objective._drawn == []
    assert rates == pytest.approx([0.05 / 6, 0.05 * 2 / 6, 0.05 * 3 / 6])
    objective.after_step(generator, 1)  # no loss this step: three fresh draws, the ramp goes on to its top
    assert rates[3:] == pytest.approx([0.05 * 4 / 6, 0.05 * 5 / 6, 0.05])


def test_dmd_first_fake_update_takes_every_micro_batch_of_the_step(monkeypatch):
    """With gradient accumulation the generator's loss runs per micro-batch: the first fake-score update
    trains on all of them, in row order; a count that is not the process's share of the batch is refused."""
    from pipeline.diffusion.noise import BatchNoise
    from pipeline.distill import dmd

    generator = GaussianGenerator([0.8, -0.3], 0.5)
    objective = _dmd(generator, GaussianScore([0.0, 0.0], 0.5), GaussianScore([0.0, 0.0], 0.5))
    seen = []
    objective.fake_opt.step = lambda: seen.append(True)  # the update itself is not under test
    y = torch.zeros(128, 2, 1, 1)
    for lo in (0, 128):
        objective.loss(generator, y, BatchNoise(torch.Generator().manual_seed(3), 256, lo, lo + 128))
    drawn = torch.cat(objective._drawn)
    trained_on = []
    real = dmd.fake_score_loss
    monkeypatch.setattr(dmd, "fake_score_loss", lambda fake, x, *a: (trained_on.append(x.clone()), real(fake, x, *a))[1])
    objective.after_step(generator, 0)
    assert len(trained_on) == 1 and torch.equal(trained_on[0], drawn) and len(drawn) == 256
    objective.loss(generator, y, BatchNoise(torch.Generator().manual_seed(3), 256, 0, 128))
    with pytest.raises(RuntimeError, match="drew 128 samples on this process, its share of the batch is 256"):
        objective.after_step(generator, 1)
