"""CLIP image and text features, and the CLIP score of prompt-conditioned samples.

The study reports text-to-image quality as CLIP score (Table 3). Its definition and default model
are torchmetrics' (`functional/multimodal/clip_score.py`): 100 x the cosine similarity between
the CLIP image embedding of a sample and the CLIP text embedding of its prompt, averaged over
samples and clamped at 0, with `openai/clip-vit-large-patch14` and its own `CLIPProcessor`
(bicubic resize of the short side to 224, centre crop, CLIP mean/std; prompts truncated to the
text model's 77 positions). The model is transformers' `CLIPModel`, loaded only from a local
directory that the `fetch_clip` rule fills on a login node at a pinned revision.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

CLIP_REPO = "openai/clip-vit-large-patch14"
# The Hugging Face commit pinned for the weights (a git revision fixes every file's content).
CLIP_REVISION = "32bd64288804d66eefd0ccbe215aa642df71cc41"
CLIP_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
              "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
CHECKSUMS = "checksums.json"


def fetch_clip(dest: str | Path, repo: str = CLIP_REPO, revision: str = CLIP_REVISION) -> Path:
    """Download the model's inference files at `revision` into `dest`, with a sha256 manifest."""
    from .data.fetch import fetch_hub_snapshot

    return fetch_hub_snapshot(dest, repo, revision, list(CLIP_FILES), ["config.json", "model.safetensors"],
                              "a transformers CLIP model")


def load_clip(model_dir: str | Path, device: str = "cpu"):
    """(CLIPModel in eval mode, CLIPProcessor) from a local directory, never downloading."""
    from transformers import CLIPModel, CLIPProcessor

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} holds no CLIP model (config.json is missing): it is fetched on a login "
                                f"node by the fetch_clip rule (`snakemake {model_dir / CHECKSUMS}`)")
    model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True).to(device).eval()
    processor = CLIPProcessor.from_pretrained(str(model_dir), local_files_only=True)
    return model, processor


def _projected(out):
    """transformers 4 returns the projected embedding as a tensor, 5 as the output's pooler_output."""
    import torch

    return out if isinstance(out, torch.Tensor) else out.pooler_output


def image_features(images: np.ndarray, model_dir: str | Path, batch_size: int = 64,
                   device: str | None = None) -> np.ndarray:
    """L2-normalised CLIP image embeddings (float32, one row per uint8 NHWC image; grey repeated to RGB)."""
    import torch

    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 NHWC images with 1 or 3 channels, got {images.dtype} {images.shape}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_clip(model_dir, device)
    rgb = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
    out = []
    with torch.no_grad():
        for start in range(0, len(rgb), batch_size):
            pixels = processor(images=list(rgb[start:start + batch_size]), return_tensors="pt")["pixel_values"]
            feats = _projected(model.get_image_features(pixel_values=pixels.to(device)))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
    return torch.cat(out).numpy().astype(np.float32) if out else np.empty((0, model.config.projection_dim), np.float32)


def text_features(prompts: Sequence[str], model_dir: str | Path, batch_size: int = 256,
                  device: str | None = None) -> np.ndarray:
    """L2-normalised CLIP text embeddings of prompts, truncated to the text model's positions."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_clip(model_dir, device)
    max_len = model.config.text_config.max_position_embeddings
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            tok = processor(text=list(prompts[start:start + batch_size]), return_tensors="pt", padding=True,
                            truncation=True, max_length=max_len)
            feats = _projected(model.get_text_features(input_ids=tok["input_ids"].to(device),
                                                       attention_mask=tok["attention_mask"].to(device)))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
    return torch.cat(out).numpy().astype(np.float32) if out else np.empty((0, model.config.projection_dim), np.float32)


def clip_score(image_feats: np.ndarray, text_feats: np.ndarray) -> dict:
    """torchmetrics' CLIP score of paired, L2-normalised embeddings: max(mean(100 cos), 0)."""
    a = np.asarray(image_feats, dtype=np.float64)
    b = np.asarray(text_feats, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need one text embedding per image embedding, got {a.shape} and {b.shape}")
    if len(a) == 0:
        raise ValueError("a CLIP score needs at least one sample")
    per_sample = 100.0 * np.einsum("ij,ij->i", a, b)
    return {"name": "CLIP score", "value": float(max(per_sample.mean(), 0.0)), "lower_is_better": False,
            "std": float(per_sample.std()), "num_samples": len(a)}


def prompts_of(table) -> list[str]:
    """The `prompt` column of a sample (or training) table; prompt-conditioned sets carry one."""
    if "prompt" not in table.column_names:
        raise ValueError("these images carry no `prompt` column: a CLIP score needs prompt-conditioned samples "
                         "(text-to-image models write the prompt of every sample)")
    return [str(p) for p in table.column("prompt").to_pylist()]
