"""The text-to-image branch on a Stable Diffusion in miniature built from config alone (tests/tiny.py:
word-level tokenizer, CLIP text model, AutoencoderKL, UNet2DConditionModel; no download): fine-tuning
in the shared training loop, LCM distillation against diffusers' own schedulers, 4-step sampling."""
import shutil

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from pipeline.data.sources import DIGIT_NAMES as DIGIT_NAMES_
from pipeline.data.sources import load_captioned
from pipeline.diffusion.noise import BatchNoise
from pipeline.text2image.backbone import build_tiny_backbone, load_backbone, save_backbone, save_unet
from pipeline.text2image.finetune import LatentDenoisingObjective, PromptTable
from pipeline.text2image.generate import build_pipeline, generate_text2image
from pipeline.text2image.latents import embed_prompts, encode_posteriors, sample_latents
from pipeline.text2image.lcm import (DDIMSolver, LCMObjective, consistency_output, guidance_scale_embedding,
                                     lcm_student, predicted_x0_and_noise)
from pipeline.text2image.tokenizer import build_word_tokenizer, words
from pipeline.text2image.vae import VAEObjective, latent_scaling_factor
from pipeline.train import TrainConfig, train
from tiny import TINY_CAPTIONS, TINY_T2I

RES = 16


@pytest.fixture(scope="module")
def digits():
    src = load_captioned({"source": "digits", "resolution": RES, "caption_templates": TINY_CAPTIONS})
    idx = np.arange(12)
    return src.read(idx), [src.prompts[i] for i in idx]


@pytest.fixture(scope="module")
def tiny(digits, tmp_path_factory):
    """The miniature backbone with its VAE trained briefly, prompts and posteriors cached."""
    images, prompts = digits
    torch.set_num_threads(1)
    bb = build_tiny_backbone(TINY_T2I, prompts, RES, 1, tmp_path_factory.mktemp("tok"), seed=0)
    vae_cfg = TrainConfig(steps=30, batch_size=12, lr=2e-3, ema_halflife_kimg=1e-6, ema_rampup_ratio=None,
                          log_every=30)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    bb.vae, _ = train(VAEObjective(bb.vae), x, np.arange(len(x)), vae_cfg, Accelerator(cpu=True))
    bb.frozen()
    post = encode_posteriors(bb.vae, images, batch_size=5)
    bb.vae.register_to_config(scaling_factor=latent_scaling_factor(post))
    table = PromptTable(embed_prompts(bb.tokenizer, bb.text_encoder, prompts),
                        embed_prompts(bb.tokenizer, bb.text_encoder, [""])[0])
    return bb, post, table


def test_word_tokenizer_gives_each_caption_word_one_token(tmp_path):
    prompts = ["a handwritten digit seven", "the number eight, written by hand"]
    tok = build_word_tokenizer(prompts, tmp_path, max_length=10)
    ids = tok(prompts[1], padding="max_length", max_length=10).input_ids
    assert tok.convert_ids_to_tokens(ids)[:8] == ["<|startoftext|>", "the</w>", "number</w>", "eight</w>", ",</w>",
                                                  "written</w>", "by</w>", "hand</w>"]
    assert ids[8:] == [tok.eos_token_id] * 2  # padded with end-of-text, like Stable Diffusion's tokenizer
    assert tok.eos_token_id == len(tok) - 1  # CLIP's text model pools at the highest id
    assert words("A  Digit, 7") == ["a", "digit", ",", "7"]


def test_vae_learns_and_latents_get_unit_variance(tiny, digits):
    bb, post, _ = tiny
    images, _ = digits
    assert post.shape == (12, 8, RES // 2, RES // 2)  # mean and log-variance of 4 latent channels at 8x8
    z = sample_latents(post, BatchNoise(torch.Generator().manual_seed(0), 12), bb.vae.config.scaling_factor)
    assert abs(float(z.std()) - 1.0) < 0.15
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        recon = bb.vae.decode(post[:, :4]).sample
    blank = float(x.square().mean())
    assert float((recon - x).square().mean()) < 0.5 * blank  # it reconstructs far better than a blank image


def test_backbone_round_trips_through_the_stable_diffusion_layout(tiny, tmp_path):
    bb, post, _ = tiny
    out = save_backbone(bb, tmp_path / "sd")
    assert (out / "model_index.json").exists() and (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    again = load_backbone(out, "the test")
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    cond = embed_prompts(again.tokenizer, again.text_encoder, ["a handwritten digit one", ""])
    with torch.no_grad():
        a = bb.unet(latents, t, encoder_hidden_states=cond).sample
        b = again.unet(latents, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(a, b)
    assert again.scheduler.config.beta_schedule == "scaled_linear"
    assert again.vae.config.scaling_factor == bb.vae.config.scaling_factor
    unet_only = save_unet(bb.unet, tmp_path / "u")
    shutil.rmtree(out / "unet")
    assert load_backbone(out, "the test", unet_dir=unet_only).unet.config.cross_attention_dim == 16
    shutil.rmtree(out / "text_encoder")
    with pytest.raises(FileNotFoundError, match=r"lacks text_encoder/, unet/: snakemake fetch_sd15 provides it"):
        load_backbone(out, "snakemake fetch_sd15")


def _fixed_batch_losses(objective, model, post, labels, steps, lr):
    """Loss of `objective` on one fixed batch (same latents, noise, timesteps) over Adam steps."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss = objective.loss(model, post, BatchNoise(torch.Generator().manual_seed(0), len(post)), labels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        objective.after_step(model, step)
        losses.append(float(loss.detach()))
    return losses


def test_finetune_trains_in_the_shared_loop(tiny, tmp_path):
    bb, post, table = tiny
    torch.manual_seed(0)
    unet = build_tiny_backbone(TINY_T2I, ["a"], RES, 1, tmp_path, seed=1).unet
    objective = LatentDenoisingObjective(unet, bb.scheduler, bb.vae.config.scaling_factor, table, empty_prompt_ratio=0.1)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-3, optimizer="adamw", grad_clip=1.0, ema_halflife_kimg=1e-6,
                      ema_rampup_ratio=None, log_every=3)
    rows = np.repeat(np.arange(12), 2)
    ema, stats = train(objective, post, rows, cfg, Accelerator(cpu=True), labels=torch.arange(12))
    assert len(stats["history"]) == 2 and all(np.isfinite(r["loss"]) for r in stats["history"])
    assert any(not torch.equal(before[k], v) for k, v in ema.state_dict().items())
    losses = _fixed_batch_losses(objective, unet, post[:6], torch.arange(6), steps=25, lr=2e-3)
    assert losses[-1] < 0.7 * losses[0]


def test_empty_prompt_ratio_drops_prompts_per_row(tiny):
    bb, _, table = tiny
    objective = LatentDenoisingObjective(bb.unet, bb.scheduler, 1.0, table, empty_prompt_ratio=0.5)
    cond = objective.conditioning(torch.arange(12).repeat(20), BatchNoise(torch.Generator().manual_seed(0), 240), "cpu")
    empty = (cond == table.table[-1]).flatten(1).all(1)
    assert 0.35 < float(empty.float().mean()) < 0.65


def test_ddim_solver_is_diffusers_ddim_step_on_lcm_grid(tiny):
    from diffusers import DDIMScheduler

    bb, _, _ = tiny
    solver = DDIMSolver(bb.scheduler.alphas_cumprod, 1000, 50)
    assert solver.timesteps[:3].tolist() == [19, 39, 59] and solver.timesteps[-1] == 999
    ddim = DDIMScheduler.from_config(bb.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=False,
                                     steps_offset=0)
    ddim.set_timesteps(50)
    assert sorted(ddim.timesteps.tolist()) == solver.timesteps.tolist()
    torch.manual_seed(0)
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for n in (0, 1, 24, 49):
        t = solver.timesteps[n:n + 1]
        x0, noise = predicted_x0_and_noise(eps, t, x, bb.scheduler)
        ours = solver.step(x0, noise, torch.tensor([n]))
        theirs = ddim.step(eps, int(t), x, eta=0.0).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_guidance_embedding_and_boundary_match_the_lcm_pipeline():
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    w = torch.tensor([4.0, 7.5, 14.0])
    theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    torch.testing.assert_close(guidance_scale_embedding(w, 256), theirs)
    assert guidance_scale_embedding(w, 7).shape == (3, 7)
    boundary = LCMScheduler(timestep_scaling=10.0).get_scalings_for_boundary_condition_discrete
    c_skip, c_out = boundary(torch.tensor([0, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0  # f(x, 0) = x: the consistency boundary condition
    assert float(c_skip[1]) < 1e-7 and abs(float(c_out[1]) - 1) < 1e-7


def test_lcm_student_is_the_teacher_plus_a_guidance_embedding(tiny):
    bb, _, _ = tiny
    student = lcm_student(bb.unet, time_cond_proj_dim=32)
    assert student.config.time_cond_proj_dim == 32
    teacher_sd = bb.unet.state_dict()
    new = [k for k in student.state_dict() if k not in teacher_sd]
    assert new == ["time_embedding.cond_proj.weight"]
    for k, v in teacher_sd.items():
        assert torch.equal(student.state_dict()[k], v)


def test_lcm_huber_loss_decreases_on_a_fixed_batch(tiny):
    bb, post, table = tiny
    student = lcm_student(bb.unet, time_cond_proj_dim=32)
    objective = LCMObjective(student, bb.unet, bb.scheduler, bb.vae.config.scaling_factor, table,
                             {"time_cond_proj_dim": 32})
    labels = torch.arange(6)
    first = objective.loss(student, post[:6], BatchNoise(torch.Generator().manual_seed(0), 6), labels)
    assert first.shape == (6,) and torch.isfinite(first).all()
    losses = _fixed_batch_losses(objective, student, post[:6], labels, steps=25, lr=1e-3)
    assert losses[-1] < 0.7 * losses[0]
    # the target follows the student at rate 0.95 per step and never takes a gradient
    assert all(not p.requires_grad for p in objective.target.parameters())
    gap = sum(float((a - b).abs().sum().detach()) for a, b in zip(objective.target.parameters(), student.parameters()))
    assert gap > 0


def test_consistency_output_at_timestep_zero_is_the_input(tiny):
    from diffusers import LCMScheduler

    bb, _, _ = tiny
    boundary = LCMScheduler.from_config(bb.scheduler.config).get_scalings_for_boundary_condition_discrete
    x = torch.randn(2, 4, 8, 8)
    out = consistency_output(torch.randn(2, 4, 8, 8), torch.tensor([0, 0]), x, bb.scheduler, boundary)
    torch.testing.assert_close(out, x)


def test_four_step_student_samples_on_the_lcm_timesteps(tiny):
    bb, _, _ = tiny
    student = lcm_student(bb.unet, time_cond_proj_dim=32).eval()
    sampler = {"kind": "lcm", "steps": 4, "guidance_scale": 8.5}
    pipe = build_pipeline(bb, student, sampler)
    prompts, seeds = ["a handwritten digit seven", "the number two, written by hand", ""], [11, 12, 13]
    images = generate_text2image(pipe, prompts, seeds, sampler, RES)
    assert images.shape == (3, RES, RES, 1) and images.dtype == np.uint8
    assert pipe.scheduler.timesteps.tolist() == [999, 759, 499, 259]  # LCM's 4 of 50 original steps
    alone = generate_text2image(pipe, prompts[1:2], seeds[1:2], sampler, RES)
    np.testing.assert_array_equal(alone[0], images[1])  # a sample does not depend on its batch


def test_teacher_samples_with_its_scheduler(tiny):
    bb, _, _ = tiny
    sampler = {"kind": "diffusion", "scheduler": "PNDMScheduler", "steps": 5, "guidance_scale": 7.5}
    pipe = build_pipeline(bb, bb.unet, sampler)
    images = generate_text2image(pipe, ["a handwritten digit one", "a handwritten digit two"], [1, 2], sampler, RES)
    assert images.shape == (2, RES, RES, 1)
    again = generate_text2image(pipe, ["a handwritten digit two"], [2], sampler, RES)
    np.testing.assert_array_equal(again[0], images[1])
    with pytest.raises(ValueError, match="needs an LCM student"):
        build_pipeline(bb, bb.unet, {"kind": "lcm", "steps": 4})
    with pytest.raises(ValueError, match="unknown teacher scheduler"):
        build_pipeline(bb, bb.unet, {"kind": "diffusion", "scheduler": "Nope", "steps": 4})


def test_stage_commands_chain_on_the_miniature(tmp_path):
    """build-backbone -> subset -> cache-latents -> finetune-teacher -> distill --method lcm -> sample, as the
    rules run them: every file the next stage reads, text-to-image shards with each sample's prompt."""
    import json

    import pyarrow.parquet as pq

    from pipeline.cli import main
    from pipeline.data import read_subset
    from pipeline.io import read_json

    ds = {"source": "digits", "resolution": RES, "caption_templates": TINY_CAPTIONS}
    train = {"ema_halflife_kimg": 0.5, "log_every": 5, "optimizer": "adamw"}
    spec_bb = dict(TINY_T2I, seed=0, vae_train={"steps": 10, "batch_size": 64, "lr": 2e-3, "log_every": 5,
                                                 "ema_halflife_kimg": 1e-6, "ema_rampup_ratio": None})
    sub = {"kind": "text_memorization", "n": 6, "repeats": 10, "extra_ratio": 3, "seed": 0, "held_out_prompts": 2}
    d = tmp_path
    assert main(["build-backbone", "--dataset", json.dumps(ds), "--spec", json.dumps(spec_bb), "--out", str(d / "bb"),
                 "--work-dir", str(d / "work")]) == 0
    assert (d / "bb" / "model_index.json").exists() and (d / "bb" / "vae" / "config.json").exists()
    assert read_json(d / "bb" / "vae" / "config.json")["scaling_factor"] > 0
    assert main(["subset", "--dataset", json.dumps(ds), "--spec", json.dumps(sub), "--out", str(d / "s.parquet")]) == 0
    assert main(["cache-latents", "--subset", str(d / "s.parquet"), "--backbone", str(d / "bb"),
                 "--out", str(d / "lat.safetensors")]) == 0
    teacher = {"train": dict(train, steps=6, batch_size=8, lr=1e-3), "latent": {"empty_prompt_ratio": 0.1},
               "snapshots": [3]}
    assert main(["finetune-teacher", "--subset", str(d / "s.parquet"), "--latents", str(d / "lat.safetensors"),
                 "--backbone", str(d / "bb"), "--spec", json.dumps(teacher), "--out", str(d / "teacher"),
                 "--checkpoint-dir", str(d / "ckpt-t")]) == 0
    meta = read_json(d / "teacher" / "config.json")
    subset = read_subset(d / "s.parquet")
    assert meta["kind"] == "latent-diffusion" and meta["backbone"] == str(d / "bb")
    assert meta["prompts"]["memorized"] == list(dict.fromkeys(subset.prompts[subset.group == "memorized"]))
    assert meta["prompts"]["held_out"] == subset.held_out_prompts and len(subset.held_out_prompts) == 2
    assert (d / "teacher" / "snapshots" / "step-3" / "model.safetensors").exists()
    student = {"train": dict(train, steps=4, batch_size=8, lr=1e-4), "lcm": {"time_cond_proj_dim": 16}}
    assert main(["distill", "--method", "lcm", "--subset", str(d / "s.parquet"), "--latents", str(d / "lat.safetensors"),
                 "--teacher", str(d / "teacher"), "--spec", json.dumps(student), "--out", str(d / "student")]) == 0
    smeta = read_json(d / "student" / "config.json")
    assert smeta["kind"] == "latent-consistency" and smeta["unet"]["time_cond_proj_dim"] == 16
    assert smeta["lcm"]["loss"] == "huber" and smeta["lcm"]["huber_c"] == 0.001
    for model, sampler in (("teacher", {"kind": "diffusion", "scheduler": "DDIMScheduler", "steps": 5}),
                           ("student", {"kind": "lcm", "steps": 4})):
        out = d / f"{model}.parquet"
        assert main(["sample", "--model", str(d / model), "--model-id", model, "--sampler-name", "x", "--sampler",
                     json.dumps(sampler), "--shard", "0", "--shard-size", "10", "--num-samples", "10", "--seed", "0",
                     "--batch-size", "4", "--out", str(out)]) == 0
        table = pq.read_table(out)
        prompts = meta["prompts"]["memorized"] + meta["prompts"]["held_out"]
        assert table.column("prompt").to_pylist() == [prompts[i % len(prompts)] for i in range(10)]
        groups = table.column("prompt_group").to_pylist()
        assert groups.count("held_out") == sum(1 for i in range(10) if i % len(prompts) >= len(prompts) - 2)
    assert pq.read_table(d / "student.parquet").column("nfe").to_pylist() == [4] * 10
    with pytest.raises(ValueError, match="samples with a lcm sampler"):
        main(["sample", "--model", str(d / "student"), "--model-id", "s", "--sampler-name", "x", "--sampler",
              json.dumps({"kind": "diffusion", "steps": 3}), "--shard", "0", "--shard-size", "2", "--num-samples", "2",
              "--seed", "0", "--out", str(d / "bad.parquet")])


def test_latent_cache_refuses_another_subset_and_names_its_rule(tmp_path):
    from pipeline.io import CorruptFileError
    from pipeline.text2image.latents import read_latent_cache, write_latent_cache

    path = tmp_path / "lat.safetensors"
    write_latent_cache(path, torch.zeros(3, 8, 4, 4), torch.zeros(3, 5, 16), torch.zeros(5, 16), 0.5, "abc", "bb")
    tensors, meta = read_latent_cache(path, "abc")
    assert meta["scaling_factor"] == 0.5 and tensors["posteriors"].shape == (3, 8, 4, 4)
    with pytest.raises(ValueError, match="another version of the subset"):
        read_latent_cache(path, "def")
    with pytest.raises(FileNotFoundError, match="cache_latents rule"):
        read_latent_cache(tmp_path / "none.safetensors")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CorruptFileError, match="rerun cache_latents"):
        read_latent_cache(path)


def _unit(v):
    v = np.asarray(v, np.float64)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_text_to_image_similarity_statistics_reach_the_table(tmp_path):
    """Table 3's statistics from descriptors built by hand: a sample that copies its own prompt's training
    image scores 1 against it, one that copies another memorized image scores 1 only as nearest memorized,
    held-out prompts only have a nearest memorized image; the table shows both next to its yardsticks."""
    import json

    import pyarrow.parquet as pq

    from pipeline.data.subsets import Subset, write_subset
    from pipeline.embed import write_embeddings
    from pipeline.io import write_image_table
    from pipeline.memorization import similarity_summary
    from pipeline.search import similarity_table
    from pipeline.shards import write_manifest
    from pipeline.tables import write_table

    rng = np.random.default_rng(0)
    train = _unit(rng.normal(size=(4, 16)))  # rows 0, 1 memorized ("a", "b"), 2, 3 extra
    subset = Subset(images=np.zeros((4, 2, 2, 1), np.uint8), labels=np.full(4, -1), index=np.arange(4),
                    repeat=[10, 10, 1, 1], group=["memorized", "memorized", "extra", "extra"],
                    prompts=["a", "b", "c", "d"])
    write_subset(tmp_path / "s.parquet", subset)
    other = _unit(rng.normal(size=(1, 16)))[0]
    samples = np.stack([train[0], train[1], train[1], _unit([train[2] + 0.01])[0], other])
    prompts = ["a", "b", "a", "held out one", "held out two"]
    groups = ["memorized", "memorized", "memorized", "held_out", "held_out"]
    write_image_table(tmp_path / "shard-00000.parquet", np.zeros((5, 2, 2, 1), np.uint8),
                      {"sample_id": np.arange(5), "seed": np.arange(5), "label": np.full(5, -1), "model": ["m"] * 5,
                       "sampler": ["x"] * 5, "nfe": np.full(5, 4), "prompt": prompts, "prompt_group": groups})
    write_manifest([tmp_path / "shard-00000.parquet"], tmp_path / "manifest.json", 5, 5)
    write_embeddings(samples, tmp_path / "samples.npy", {"space": "sscd"})
    write_embeddings(train, tmp_path / "train.npy", {"space": "sscd"})
    similarity_table(tmp_path / "samples.npy", tmp_path / "train.npy", tmp_path / "s.parquet", tmp_path / "manifest.json",
                     tmp_path / "sim.parquet", device="cpu")
    sim = pq.read_table(tmp_path / "sim.parquet")
    gt = sim.column("gt_similarity").to_numpy()
    np.testing.assert_allclose(gt[:2], 1.0, atol=1e-6)
    assert gt[2] == pytest.approx(float(train[1] @ train[0]))  # copies b while prompted with a
    assert np.isnan(gt[3:]).all()
    nearest = sim.column("memorized_similarity").to_numpy()
    np.testing.assert_allclose(nearest[:3], 1.0, atol=1e-6)
    assert nearest[3] < 0.99  # a copy of an extra image is not a memorized one
    assert sim.column("similarity").to_numpy()[3] > 0.99  # though it is the global nearest neighbour
    summary = similarity_summary(sim.column("similarity").to_numpy(), table=sim)
    own = summary["text"]["memorized_prompts"]["own_image"]
    assert own["n_samples"] == 3 and own["max"] == pytest.approx(1.0)
    assert own["mean"] == pytest.approx((2 + float(train[1] @ train[0])) / 3)
    assert summary["text"]["held_out_prompts"]["nearest_memorized"]["n_samples"] == 2

    def metrics(model, nfe, text):
        return {"model": model, "sampler": "x" if nfe else "data", "nfe": nfe,
                "quality": {"name": "FID", "value": 10.0}, "clip": {"value": 25.0},
                "memorization": {"mem_ratio": 0.0, "ratio_median": 0.9, "ratio_p05": 0.5, "n_samples": 5,
                                 "by_group": {}},
                "sscd": {"mem_ratio": 0.2, "p95": 0.9, "mean": 0.5, "max": 1.0, "threshold": 0.5, "by_group": {},
                         "text": text}}

    paths = []
    for i, m in enumerate([metrics("m", 4, summary["text"]),
                           metrics("replay~s", 0, {"memorized_prompts": {"own_image": {"mean": 1.0, "max": 1.0, "p95": 1.0},
                                                                         "nearest_memorized": {"mean": 1.0, "max": 1.0, "p95": 1.0}}})]):
        paths.append(tmp_path / f"m{i}.json")
        paths[-1].write_text(json.dumps(m))
    rows_cfg = [{"setting": "3 extra", "label": "Student", "model": "m", "sampler": "x"},
                {"setting": "3 extra", "label": "Training pairs replayed", "model": "replay~s", "sampler": "data",
                 "subset": "s"}]
    rows = write_table("Table 3", rows_cfg, paths, tmp_path / "t.csv", tmp_path / "t.md")
    assert rows[0]["text_own_mean"] == pytest.approx(own["mean"]) and rows[1]["text_heldout_mean"] is None
    md = (tmp_path / "t.md").read_text()
    assert "SSCD own pair mean / max / p95" in md and "1.0000 / 1.0000 / 1.0000" in md
    assert "held-out prompts: SSCD nearest memorized" in md and "what similarity without recall looks like" in md


def test_yardsticks_of_image_prompt_subsets_keep_their_captions():
    from pipeline.data import build_text_subset
    from pipeline.yardsticks import heldout_split, yardstick_images, yardstick_prompts

    source = load_captioned({"source": "digits", "resolution": 8, "caption_templates": TINY_CAPTIONS})
    subset = build_text_subset(source, source, {"n": 5, "repeats": 4, "extra_ratio": 1, "seed": 0}, True)
    reserve, _ = heldout_split(len(source), [subset.index], 30, seed=0)
    for kind in ("real", "replay", "train"):
        images, labels, _ = yardstick_images(kind, source, source.labels, subset, reserve, 30, seed=0)
        prompts = yardstick_prompts(kind, source.prompts, subset, reserve, 30, seed=0)
        assert len(prompts) == len(images) == 30
        for img, label, prompt in zip(images, labels, prompts):  # each image keeps its own caption and class
            assert prompt.endswith(("digit " + DIGIT_NAMES_[label], DIGIT_NAMES_[label] + ", written by hand"))
    real = yardstick_prompts("real", source.prompts, subset, reserve, 30, seed=0)
    assert real == [source.prompts[i] for i in reserve[:30]]



def test_prompt_digits_reads_the_digit_a_caption_names():
    from pipeline.quality import prompt_digits

    got = prompt_digits(["a handwritten digit seven", "the number zero, written by hand", "a picture of the digit 4",
                         "a cat", ""])
    assert got.tolist() == [7, 0, 4, -1, -1]


def test_digits_descriptor_is_named_as_the_stand_in_it_is(tmp_path):
    """A table measured with the digits classifier's features never calls them SSCD."""
    import json

    from pipeline.tables import write_table

    m = {"model": "m", "sampler": "x", "nfe": 4, "quality": {"name": "digits FD", "value": 3.0},
         "prompt_class": {"value": 0.9, "n_samples": 10},
         "memorization": {"mem_ratio": 0.1, "ratio_median": 0.8, "ratio_p05": 0.3, "n_samples": 10, "by_group": {}},
         "sscd": {"mem_ratio": 0.2, "p95": 0.97, "mean": 0.9, "max": 0.99, "threshold": 0.95, "by_group": {},
                  "descriptor": "digits"}}
    (tmp_path / "m.json").write_text(json.dumps(m))
    write_table("t", [{"setting": "s", "label": "Teacher", "model": "m", "sampler": "x"}], [tmp_path / "m.json"],
                tmp_path / "t.csv", tmp_path / "t.md")
    md = (tmp_path / "t.md").read_text()
    assert "SSCD" not in md.replace("stand-in for SSCD", "").replace("SSCD's thresholds", "")
    assert "Digit-feature Mem / p95" in md and "Prompt digit" in md and "90.00%" in md
    assert "the embedded data's stand-in for SSCD" in md


def test_lcm_distillation_resumes_to_the_same_student(tiny, tmp_path):
    """A run stopped after 4 steps and resumed to 6 (online weights, EMA target, optimizer, data order,
    noise all restored from the checkpoint) ends where an uninterrupted 6-step run does."""
    bb, post, table = tiny

    def run(steps, ckpt):
        torch.manual_seed(0)
        student = lcm_student(bb.unet, time_cond_proj_dim=16)
        objective = LCMObjective(student, bb.unet, bb.scheduler, 1.0, table, {"time_cond_proj_dim": 16})
        cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-3, optimizer="adamw", ema_halflife_kimg=1e-6,
                          ema_rampup_ratio=None, log_every=2, checkpoint_every=2)
        out, stats = train(objective, post, np.arange(len(post)), cfg, Accelerator(cpu=True), ckpt, "lcm",
                           labels=torch.arange(len(post)))
        return out, objective.target, stats

    run(4, tmp_path / "a")
    resumed, resumed_target, stats = run(6, tmp_path / "a")
    assert stats["attempts"][-1]["from_step"] == 4
    straight, straight_target, _ = run(6, tmp_path / "b")
    for a, b in zip(resumed.parameters(), straight.parameters()):
        torch.testing.assert_close(a, b)
    for a, b in zip(resumed_target.parameters(), straight_target.parameters()):
        torch.testing.assert_close(a, b)


def test_lcm_teacher_and_target_run_under_the_training_autocast(tiny):
    """With bf16 mixed precision the teacher and target passes run in bf16 too (the recipe's autocast);
    the loss stays close to the float32 one."""
    bb, post, table = tiny
    student = lcm_student(bb.unet, time_cond_proj_dim=16)
    losses = {}
    for dtype in (None, torch.bfloat16):
        objective = LCMObjective(student, bb.unet, bb.scheduler, 1.0, table, {"time_cond_proj_dim": 16},
                                 autocast_dtype=dtype)
        with torch.no_grad():
            losses[dtype] = objective.loss(student, post[:4], BatchNoise(torch.Generator().manual_seed(0), 4),
                                           torch.arange(4))
    assert torch.isfinite(losses[torch.bfloat16]).all()
    torch.testing.assert_close(losses[torch.bfloat16], losses[None], rtol=0.2, atol=0.02)
