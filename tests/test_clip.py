"""CLIP features and CLIP score with a tiny CLIP built from a transformers config in the test.

The tiny model has the real one's interface (a `CLIPModel` directory with its `CLIPProcessor`:
a character-level BPE vocabulary, 32-pixel images), so loading, preprocessing, projection and
normalisation run exactly as they would for openai/clip-vit-large-patch14.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.fetch import FetchError
from pipeline.clip import CHECKSUMS, clip_score, fetch_clip, image_features, load_clip, prompts_of, text_features


def build_tiny_clip(path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    eot = vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=eot - 1,
                         eos_token_id=eot, pad_token_id=eot),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(str(path))
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def _images(n, seed=0, channels=3, size=16):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def test_image_features_are_the_models_normalised_projection(tiny_clip):
    model, processor = load_clip(tiny_clip)
    images = _images(5)
    feats = image_features(images, tiny_clip, batch_size=2, device="cpu")
    assert feats.dtype == np.float32 and feats.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    with torch.no_grad():
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        assert pixels.shape == (5, 3, 32, 32)  # upsampled to the model's resolution by its own processor
        tokens = processor(text=["x"] * 5, return_tensors="pt", padding=True)
        ref = model(pixel_values=pixels, **tokens).image_embeds
    np.testing.assert_allclose(feats, ref.numpy(), atol=1e-5)
    grey = image_features(images[..., :1], tiny_clip, device="cpu")
    rgb = image_features(np.repeat(images[..., :1], 3, axis=-1), tiny_clip, device="cpu")
    np.testing.assert_allclose(grey, rgb, atol=1e-6)
    with pytest.raises(ValueError, match="uint8 NHWC"):
        image_features(images.astype(np.float32), tiny_clip, device="cpu")


def test_text_features_match_the_model_and_long_prompts_are_truncated(tiny_clip):
    model, processor = load_clip(tiny_clip)
    prompts = ["a digit 3", "a cat", "z" * 40]
    feats = text_features(prompts, tiny_clip, batch_size=2, device="cpu")
    assert feats.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    with torch.no_grad():
        tok = processor(text=prompts[:2], return_tensors="pt", padding=True)
        ref = model(pixel_values=torch.zeros(2, 3, 32, 32), **tok).text_embeds
    np.testing.assert_allclose(feats[:2], ref.numpy(), atol=1e-5)
    # 40 characters exceed the 16 positions: truncated, as torchmetrics does, not an error
    assert np.isfinite(feats[2]).all()


def test_clip_score_is_torchmetrics_definition():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((50, 8))
    b = a + 0.5 * rng.standard_normal((50, 8))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    got = clip_score(a, b)
    assert got["value"] == pytest.approx(100 * np.mean(np.sum(a * b, axis=1)), rel=1e-12)
    assert got["num_samples"] == 50 and got["lower_is_better"] is False
    assert clip_score(a, a)["value"] == pytest.approx(100.0)
    assert clip_score(a, -a)["value"] == 0.0  # the mean is clamped at 0
    with pytest.raises(ValueError, match="one text embedding per image"):
        clip_score(a, b[:10])


def test_embed_command_writes_clip_image_and_prompt_embeddings(tiny_clip, tmp_path, monkeypatch):
    import pyarrow as pa

    from pipeline.cli import main
    from pipeline.embed import read_embeddings
    from pipeline.io import write_image_table
    from pipeline.shards import write_manifest

    monkeypatch.chdir(tmp_path)
    images = _images(6, seed=2, channels=1)
    prompts = [f"a handwritten digit {i}" for i in range(6)]
    write_image_table("shard-00000.parquet", images, {"sample_id": np.arange(6), "nfe": np.full(6, 4), "prompt": prompts},
                      {"model": "t2i", "sampler": "lcm-4"})
    write_manifest(["shard-00000.parquet"], "manifest.json", 6, 6)
    for space in ("clip", "clip-text"):
        main(["embed", "--space", space, "--images", "manifest.json", "--weights", str(tiny_clip),
              "--out", f"{space}.npy"])
    img, txt = read_embeddings("clip.npy"), read_embeddings("clip-text.npy")
    np.testing.assert_allclose(img, image_features(images, tiny_clip, device="cpu"), atol=1e-6)
    np.testing.assert_allclose(txt, text_features(prompts, tiny_clip, device="cpu"), atol=1e-6)
    assert json.loads((tmp_path / "clip-text.json").read_text())["space"] == "clip-text"
    with pytest.raises(ValueError, match="no `prompt` column"):
        prompts_of(pa.table({"sample_id": [0, 1]}))


def test_missing_clip_model_names_the_fetch_rule(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch_clip"):
        load_clip(tmp_path / "absent")


def test_fetch_clip_is_atomic_and_checksummed(tmp_path, monkeypatch):
    """The download (replaced here by a local stand-in: tests never use the network) lands beside the
    destination and is renamed into place with a sha256 manifest; a failed one leaves nothing."""
    import huggingface_hub

    calls = []

    def fake_download(repo_id, revision, local_dir, allow_patterns):
        calls.append((repo_id, revision))
        for name in ("config.json", "model.safetensors", "vocab.json"):
            (Path(local_dir) / name).write_text(name)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    dest = fetch_clip(tmp_path / "weights" / "clip", "org/model", "a" * 40)
    manifest = json.loads((dest / CHECKSUMS).read_text())
    assert manifest["revision"] == "a" * 40 and sorted(manifest["sha256"]) == ["config.json", "model.safetensors",
                                                                               "vocab.json"]
    fetch_clip(dest, "org/model", "a" * 40)
    assert len(calls) == 1  # already there: nothing fetched again
    assert [p.name for p in (tmp_path / "weights").iterdir()] == ["clip"]

    def broken(repo_id, revision, local_dir, allow_patterns):
        raise OSError("connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with pytest.raises(FetchError, match="connection refused"):
        fetch_clip(tmp_path / "weights" / "other", "org/model", "a" * 40)
    assert [p.name for p in (tmp_path / "weights").iterdir()] == ["clip"]


def test_clip_score_reaches_the_metrics_and_the_table(tiny_clip, tmp_path, monkeypatch):
    """Prompt-conditioned samples: the metrics JSON carries the CLIP score of its embeddings, and the
    table shows it in a CLIP column beside the Frechet distance."""
    from pipeline.cli import main
    from pipeline.data import build_subset, load_source, write_subset
    from pipeline.io import write_image_table
    from pipeline.metrics import write_metrics
    from pipeline.digits_classifier import train_digits_classifier
    from pipeline.quality import write_reference_stats
    from pipeline.search import search_samples
    from pipeline.shards import write_manifest
    from pipeline.tables import write_table

    monkeypatch.chdir(tmp_path)
    images, labels = load_source({"source": "digits", "resolution": 8})
    subset = build_subset(images, labels, {"kind": "repetition", "repeated_classes": [0], "per_class": 3,
                                           "repeats": 2, "others": 9, "seed": 0})
    write_subset("subset.parquet", subset, {})
    samples = images[-8:]
    prompts = [f"a handwritten digit {d}" for d in labels[-8:]]
    write_image_table("shard-00000.parquet", samples, {"sample_id": np.arange(8), "nfe": np.full(8, 4),
                                                       "prompt": prompts}, {"model": "t2i", "sampler": "lcm-4"})
    write_manifest(["shard-00000.parquet"], "manifest.json", 8, 8)
    search_samples("subset.parquet", "manifest.json", "neighbours.parquet", device="cpu")
    train_digits_classifier(images[:300], labels[:300], "clf", epochs=1)
    write_reference_stats("digits_fd", "clf", images[:300], "ref.npz", "the full digits dataset")
    for space in ("clip", "clip-text"):
        main(["embed", "--space", space, "--images", "manifest.json", "--weights", str(tiny_clip), "--out", f"{space}.npy"])
    result = write_metrics("t2i", "lcm-4", "neighbours.parquet", "manifest.json", "digits_fd", "clf", "ref.npz", None,
                           "metrics.json", clip_images="clip.npy", clip_texts="clip-text.npy")
    expected = clip_score(image_features(samples, tiny_clip, device="cpu"), text_features(prompts, tiny_clip, device="cpu"))
    assert result["clip"]["value"] == pytest.approx(expected["value"], abs=1e-4)
    write_table("t2i", [{"setting": "s", "label": "Student"}], ["metrics.json"], "t.csv", "t.md")
    md = (tmp_path / "t.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Setting"))
    assert "| digits-FD | CLIP (cosine) | L2 Mem |" in header
    assert f"| {expected['value'] / 100:.4f} |" in md and "torchmetrics' CLIP score / 100" in md
    with pytest.raises(ValueError, match="both the image and the text"):
        write_metrics("t2i", "lcm-4", "neighbours.parquet", "manifest.json", "digits_fd", "clf", "ref.npz", None,
                      "m2.json", clip_images="clip.npy")
