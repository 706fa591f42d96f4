"""The shared training loop: learning on a tiny problem, and exact resumption from a checkpoint."""
import json
import os
import signal

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from pipeline.diffusion import EDMDenoiser
from pipeline.diffusion.loss import EDMLoss
from pipeline.nets import build_net
from tiny import TINY_UNET, train_teacher_args
from pipeline.teacher import EDMObjective
from pipeline.checkpoint import CheckpointStore
from pipeline.cluster import TrainingInterrupted
from pipeline.train import Snapshots, TrainConfig, split_batch, train



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
    assert [d.name for d in CheckpointStore(tmp_path / "ckpt").candidates()] == ["ckpt-000000006", "ckpt-000000003"]
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


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; a test with other precision settings starts and ends clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_bf16_autocast_trains_on_cpu(fresh_accelerate_state):
    """compute.mixed_precision: bf16 (what `accelerate launch --mixed_precision bf16` sets): the network
    runs in bfloat16, the weights, their EMA and the loss stay float32, and it still learns."""
    cfg = TrainConfig(steps=60, batch_size=6, lr=3e-3, ema_halflife_kimg=0.05, log_every=20)
    obj = objective()
    seen = []
    conv = next(m for m in obj.model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    assert accelerator.mixed_precision == "bf16"
    ema, stats = train(obj, data(), np.arange(6), cfg, accelerator)
    assert set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in ema.parameters())
    losses = [h["loss"] for h in stats["history"]]
    assert losses[-1] < losses[0]


def test_global_batch_splits_over_processes_then_micro_batches():
    assert split_batch(512, 8, None) == (64, 1)
    assert split_batch(512, 2, 64) == (64, 4)  # EDM's --batch 512 --batch-gpu 64 on 2 GPUs
    assert split_batch(512, 1, 1024) == (512, 1)
    with pytest.raises(ValueError, match="not divisible by 4"):
        split_batch(6, 4, None)
    with pytest.raises(ValueError, match="micro-batches of 48"):
        split_batch(512, 2, 48)


def test_accumulated_micro_batches_train_the_same_model_as_one_batch():
    """batch_per_process splits the step's batch into micro-batches whose gradients are summed: the same
    rows with the same sigma and noise, so the same weights up to float summation order."""
    rows = np.array([0, 1, 2, 3, 4, 5, 5, 2])
    runs = {}
    for per_process in (None, 2):
        cfg = TrainConfig(steps=5, batch_size=8, lr=1e-3, ema_halflife_kimg=0.01, log_every=1,
                          batch_per_process=per_process)
        runs[per_process] = train(objective(), data(), rows, cfg, Accelerator(cpu=True))
    (one, stats_one), (four, stats_four) = runs[None], runs[2]
    assert (stats_one["accumulation_steps"], stats_four["accumulation_steps"]) == (1, 4)
    for (name, a), (_, b) in zip(one.state_dict().items(), four.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert [h["loss"] for h in stats_four["history"]] == pytest.approx([h["loss"] for h in stats_one["history"]],
                                                                       rel=1e-4)


def test_class_labels_travel_with_their_rows():
    """Every micro-batch hands the objective each image's own class: images whose pixels spell their
    index, labels a function of the index, with repeats and accumulation."""
    class Recording(EDMObjective):
        seen = []

        def loss(self, model, y, noise, labels=None):
            index = y[:, 0, 0, 0].round().long()
            assert torch.equal(labels, (7 * index) % 5), (index, labels)
            self.seen += index.tolist()
            return super().loss(model, y / 10, noise, labels)

    torch.manual_seed(0)
    net = build_net({**TINY_UNET, "num_class_embeds": 5}, 8, 1)
    images = torch.arange(6, dtype=torch.float32).reshape(6, 1, 1, 1).expand(6, 1, 8, 8).contiguous()
    labels = (7 * torch.arange(6)) % 5
    rows = np.array([0, 1, 2, 3, 4, 5, 5, 2])
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, ema_halflife_kimg=0.01, batch_per_process=2)
    objective = Recording(EDMDenoiser(net), EDMLoss())
    train(objective, images, rows, cfg, Accelerator(cpu=True), labels=labels)
    assert sorted(objective.seen) == sorted(rows.tolist() * 3)  # every row of every step, once
    with pytest.raises(ValueError, match="one class per image"):
        train(objective, images, rows, cfg, Accelerator(cpu=True), labels=labels[:4])


def test_channels_last_trains_the_same_model():
    """train.channels_last stores the network and batches NHWC (faster convolutions on tensor cores);
    the arithmetic is the same up to rounding."""
    runs = []
    for channels_last in (False, True):
        cfg = TrainConfig(steps=3, batch_size=4, lr=1e-3, ema_halflife_kimg=0.01, channels_last=channels_last)
        ema, _ = train(objective(), data(), np.arange(6), cfg, Accelerator(cpu=True))
        runs.append(ema)
    conv = runs[1].net.unet.down_blocks[0].resnets[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for (name, a), (_, b) in zip(runs[0].state_dict().items(), runs[1].state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=name)


def test_train_config_from_plain_data():
    cfg = TrainConfig.from_dict({"steps": 3, "batch_size": 2, "lr": 0.1, "betas": [0.5, 0.6], "optimizer": "radam"})
    assert cfg.betas == (0.5, 0.6) and cfg.optimizer == "radam"


def test_changed_config_restarts_and_longer_run_continues(tmp_path):
    rows = np.arange(6)
    base = dict(batch_size=4, lr=1e-3, ema_halflife_kimg=0.01, log_every=1, checkpoint_every=3)
    straight, _ = train(objective(), data(), rows, TrainConfig(steps=9, **base), Accelerator(cpu=True))

    train(objective(), data(), rows, TrainConfig(steps=6, **base), Accelerator(cpu=True), tmp_path / "ck", "run-a")
    continued, stats = train(objective(seed=3), data(), rows, TrainConfig(steps=9, **base), Accelerator(cpu=True),
                             tmp_path / "ck", "run-a")
    for a, b in zip(straight.state_dict().values(), continued.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert len(stats["history"]) == 9

    # Another learning rate (or another run description) must not pick up that checkpoint.
    other = dict(base, lr=2e-3)
    fresh, _ = train(objective(), data(), rows, TrainConfig(steps=3, **other), Accelerator(cpu=True))
    ignored, _ = train(objective(), data(), rows, TrainConfig(steps=3, **other), Accelerator(cpu=True), tmp_path / "ck", "run-a")
    for a, b in zip(fresh.state_dict().values(), ignored.state_dict().values()):
        torch.testing.assert_close(a, b)
    renamed, _ = train(objective(seed=5), data(), rows, TrainConfig(steps=9, **base), Accelerator(cpu=True),
                       tmp_path / "ck", "run-b")
    assert not torch.equal(next(iter(renamed.state_dict().values())), next(iter(continued.state_dict().values())))


def _snapshots(root, steps, saved):
    from pipeline.modelio import save_model

    def save(d, model, k):
        saved.append(k)
        save_model(d, model, {"kind": "edm", "step": k}, {"step": k})

    return Snapshots(steps, root, save)


def test_snapshots_are_the_ema_at_their_step_and_survive_a_resume(tmp_path):
    """A snapshot at step k equals the EMA of a run stopped at k; a job resumed past k keeps it, a
    changed run rewrites it, and publishing copies every configured step."""
    from safetensors.torch import load_file

    rows = np.arange(6)
    base = dict(batch_size=4, lr=1e-3, ema_halflife_kimg=0.01, log_every=1, checkpoint_every=2)
    short, _ = train(objective(), data(), rows, TrainConfig(steps=2, **base), Accelerator(cpu=True))
    saved = []
    snaps = _snapshots(tmp_path / "ck" / "snapshots", [2, 4], saved)
    train(objective(), data(), rows, TrainConfig(steps=4, **base), Accelerator(cpu=True), tmp_path / "ck", "a", snaps)
    assert saved == [2, 4]
    at2 = load_file(str(snaps.path(2) / "model.safetensors"))
    for name, value in short.state_dict().items():
        torch.testing.assert_close(at2[name], value, msg=name)
    # resumed at step 4 (the run grew to 6 steps): nothing before 4 is written again
    saved.clear()
    snaps6 = _snapshots(tmp_path / "ck" / "snapshots", [2, 4], saved)
    final, _ = train(objective(seed=2), data(), rows, TrainConfig(steps=6, **base), Accelerator(cpu=True),
                     tmp_path / "ck", "a", snaps6)
    assert saved == []
    published = snaps6.publish(tmp_path / "out" / "snapshots")
    assert [p.name for p in published] == ["step-2", "step-4"]
    assert torch.equal(load_file(str(published[0] / "model.safetensors"))[name], at2[name])
    # another run description ignores the checkpoint and rewrites every snapshot
    saved.clear()
    train(objective(), data(), rows, TrainConfig(steps=4, **base), Accelerator(cpu=True), tmp_path / "ck", "b",
          _snapshots(tmp_path / "ck" / "snapshots", [2, 4], saved))
    assert saved == [2, 4]


def test_snapshot_errors(tmp_path):
    saved = []
    with pytest.raises(ValueError, match="beyond"):
        train(objective(), data(), np.arange(6), TrainConfig(steps=2, batch_size=4, lr=1e-3), Accelerator(cpu=True),
              None, "", _snapshots(tmp_path / "s", [3], saved))
    with pytest.raises(RuntimeError, match="step 5 was not written"):
        _snapshots(tmp_path / "s", [5], saved).publish(tmp_path / "out")


def _launch(workdir, spec, processes, out, checkpoint_dir=None):
    """`pipeline train-teacher` in `processes` CPU processes over gloo (what N GPUs run); returns (weights, stats)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 \
        else [sys.executable]
    cmd = [*launcher, "-m", "pipeline", *train_teacher_args(workdir, spec, out, checkpoint_dir)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    out = workdir / out
    return load_file(out / "model.safetensors"), json.loads((out / "stats.json").read_text())


def test_two_processes_with_ddp_on_cpu(tmp_path):
    """The multi-process path exercised with 2 CPU processes: the final checkpoint resumes to the same
    model, and every process's data order is in the checkpoint."""
    spec = {"train": {"steps": 4, "batch_size": 4, "lr": 1e-3, "log_every": 2, "checkpoint_every": 2}}
    first, stats = _launch(tmp_path, spec, 2, "teacher", tmp_path / "ck")
    assert stats["processes"] == 2 and stats["images_seen"] == 16
    again, _ = _launch(tmp_path, spec, 2, "teacher", tmp_path / "ck")  # resumes from the final checkpoint
    assert all(torch.equal(first[k], again[k]) for k in first)
    newest = CheckpointStore(tmp_path / "ck").candidates()[0]
    assert {p.name for p in newest.glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}
    assert CheckpointStore.verify(newest)["processes"] == 2


def test_global_batch_trains_the_same_model_on_one_or_two_processes_with_or_without_accumulation(tmp_path):
    """Global batch B on 1 process, on 2 processes (B/2 each) and on 2 processes accumulating 2
    micro-batches of B/4: the same data order and noise per row, so the same weights up to float
    summation order (TINY_UNET has no dropout, whose masks are drawn per micro-batch)."""
    train = {"steps": 6, "batch_size": 8, "lr": 2e-3, "ema_halflife_kimg": 0.01, "log_every": 2}
    one, s1 = _launch(tmp_path, {"train": train}, 1, "one")
    two, s2 = _launch(tmp_path, {"train": train}, 2, "two")
    acc, s3 = _launch(tmp_path, {"train": {**train, "batch_per_process": 2}}, 2, "acc")
    assert [(s["processes"], s["micro_batch"], s["accumulation_steps"]) for s in (s1, s2, s3)] == \
        [(1, 8, 1), (2, 4, 1), (2, 2, 2)]
    # Adam's first steps divide by |gradient|, so a weight whose gradient is ~eps moves by up to lr on a
    # rounding difference: measured 4e-5 (micro-batches of 2) against the lr of 2e-3. The losses, which
    # change by 5-25 % from step to step (2.035, 1.940, 1.487, ...), must agree to 1e-4.
    atol = 0.05 * train["lr"]
    for other in (two, acc):
        for name in one:
            torch.testing.assert_close(other[name], one[name], rtol=0, atol=atol, msg=name)
    for s in (s2, s3):
        assert [h["loss"] for h in s["history"]] == pytest.approx([h["loss"] for h in s1["history"]], rel=1e-4)


class SignalAt(EDMObjective):
    """An objective that sends this process `signum` after a chosen step, as SLURM would mid-run."""

    def __init__(self, inner, step, signum):
        super().__init__(inner.model, inner.edm_loss)
        self.at, self.signum = step, signum

    def after_step(self, model, step):
        if step + 1 == self.at:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_a_checkpoint_stops_and_the_retry_finishes_identically(tmp_path, signum):
    """SIGTERM (time limit, scancel, preemption) or SIGUSR1 (sbatch --signal) mid-run: the step in
    flight finishes, its state is saved although no periodic checkpoint is due, training stops, and
    the next attempt resumes there and ends with the uninterrupted run's weights and loss history."""
    cfg = TrainConfig(steps=8, batch_size=4, lr=1e-3, ema_halflife_kimg=0.01, log_every=3, checkpoint_every=0)
    rows = np.arange(6)
    straight, stats_a = train(objective(), data(), rows, cfg, Accelerator(cpu=True))
    before = signal.getsignal(signum)
    with pytest.raises(TrainingInterrupted) as err:
        train(SignalAt(objective(), 5, signum), data(), rows, cfg, Accelerator(cpu=True), tmp_path / "ck",
              metrics_log=tmp_path / "train.jsonl")
    assert err.value.step == 5 and err.value.exit_code == 128 + signum
    assert signal.getsignal(signum) == before  # the handler is training's only
    (newest,) = CheckpointStore(tmp_path / "ck").candidates()
    assert newest == err.value.checkpoint and CheckpointStore.verify(newest)["step"] == 5
    resumed, stats_b = train(objective(seed=7), data(), rows, cfg, Accelerator(cpu=True), tmp_path / "ck",
                             metrics_log=tmp_path / "train.jsonl")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [h["loss"] for h in stats_b["history"]] == [h["loss"] for h in stats_a["history"]]
    assert [a["from_step"] for a in stats_b["attempts"]] == [0, 5]
    # the metrics log holds the whole run, the first attempt's line rewritten from the checkpoint
    lines = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert [(r["step"], r["attempt"]) for r in lines] == [(3, 1), (6, 2), (8, 2)]
    assert [r["loss"] for r in lines] == [h["loss"] for h in stats_a["history"]]
    assert stats_b["seconds"] >= stats_b["attempts"][0]["seconds"] + stats_b["attempts"][1]["seconds"] - 1e-6


def test_metrics_log_records_loss_lr_throughput_and_memory(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-3, lr_rampup_steps=4, ema_halflife_kimg=0.01, log_every=2)
    _, stats = train(objective(), data(), np.arange(6), cfg, Accelerator(cpu=True), metrics_log=tmp_path / "m.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert lines == stats["history"]
    assert [r["step"] for r in lines] == [2, 4, 6]
    assert [r["lr"] for r in lines] == pytest.approx([5e-4, 1e-3, 1e-3])  # the warm-up, then the set rate
    assert all(r["images_per_second"] > 0 and r["max_memory_mb"] > 0 and r["attempt"] == 1 for r in lines)
    assert lines[-1]["seconds"] <= stats["seconds"]


def test_corrupt_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-3, ema_halflife_kimg=0.01, log_every=1, checkpoint_every=2)
    rows = np.arange(6)
    straight, _ = train(objective(), data(), rows, cfg, Accelerator(cpu=True))
    store = CheckpointStore(tmp_path / "ck")
    with pytest.raises(TrainingInterrupted):
        train(SignalAt(objective(), 5, signal.SIGTERM), data(), rows, cfg, Accelerator(cpu=True), store.root)
    assert [d.name for d in store.candidates()] == ["ckpt-000000005", "ckpt-000000004"]  # the newest two kept
    # a node died while the newest was being flushed: one of its files is cut short
    extras = store.candidates()[0] / "extras.pt"
    extras.write_bytes(extras.read_bytes()[:100])
    # and a save cut off before its rename never counts
    (store.root / ".partial-ckpt-000000006").mkdir()
    with caplog.at_level("WARNING"):
        resumed, stats = train(objective(seed=4), data(), rows, cfg, Accelerator(cpu=True), store.root)
    assert "ckpt-000000005 is unusable" in caplog.text and "does not match its checksum" in caplog.text
    assert stats["attempts"][-1]["from_step"] == 4
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sigterm_to_the_training_command_exits_nonzero_with_a_valid_checkpoint(tmp_path):
    """The command a rule runs, killed the way SLURM kills it: exit 143 and a checkpoint that verifies."""
    import subprocess
    import sys
    import time

    spec = {"train": {"steps": 100000, "batch_size": 4, "lr": 1e-3, "log_every": 10, "checkpoint_every": 0}}
    cmd = [sys.executable, "-m", "pipeline", *train_teacher_args(tmp_path, spec, checkpoint_dir=tmp_path / "ck")]
    log = open(tmp_path / "log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while "step 10 loss" not in (tmp_path / "log").read_text() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, (tmp_path / "log").read_text()
    (newest,) = CheckpointStore(tmp_path / "ck").candidates()
    assert CheckpointStore.verify(newest)["step"] >= 10
    assert "stopped by SIGTERM after step" in (tmp_path / "log").read_text()
    assert not (tmp_path / "teacher" / "model.safetensors").exists()
