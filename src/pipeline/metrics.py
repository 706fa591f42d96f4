"""Stage 6a: one JSON per (model, sampler) with the memorization figures and the quality metric."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from .io import read_json, write_json
from .memorization import SSCD_THRESHOLD, calibrated_threshold, similarity_summary, summarize
from .quality import compute_quality
from .shards import read_samples


def write_metrics(model: str, sampler: str, neighbours_path: str | Path, manifest_path: str | Path,
                  quality_kind: str, feature_net: str | Path, reference_stats: str | Path,
                  model_stats_path: str | Path | None, out_path: str | Path, sscd_neighbours: str | Path | None = None,
                  sscd_threshold: float | None = None, clip_images: str | Path | None = None,
                  clip_texts: str | Path | None = None, prompt_classifier: str | Path | None = None,
                  sscd_calibration: str | Path | None = None, calibration_quantile: float = 0.99) -> dict:
    """With `sscd_calibration` (the real held-out yardstick's similarities), the copy threshold is their
    `calibration_quantile` instead of `sscd_threshold`: a descriptor not trained to recognise copies
    (the digits classifier's features) then flags 1 - quantile of images never trained on."""
    images, table, manifest = read_samples(manifest_path)
    neighbours = pq.read_table(neighbours_path)
    if neighbours.num_rows != manifest["num_samples"]:
        raise ValueError(f"{neighbours_path} has {neighbours.num_rows} rows, {manifest_path} lists {manifest['num_samples']} samples")
    space = (neighbours.schema.metadata or {}).get(b"space", b"pixels").decode()
    model_stats = read_json(model_stats_path) if model_stats_path else {}  # yardsticks were never trained
    result = {
        "model": model,
        "sampler": sampler,
        "nfe": manifest["nfe"],
        "num_samples": manifest["num_samples"],
        "memorization": {"space": space, **summarize(neighbours)},
        "quality": compute_quality(quality_kind, feature_net, images, reference_stats),
        "training": {k: model_stats.get(k) for k in ("steps", "batch_size", "images_seen", "seconds", "final_loss",
                                                       "parameters", "method", "unique_images", "step", "selection")},
    }
    if sscd_neighbours:
        sim = pq.read_table(sscd_neighbours)
        if sim.num_rows != manifest["num_samples"]:
            raise ValueError(f"{sscd_neighbours} has {sim.num_rows} rows, {manifest_path} lists {manifest['num_samples']}")
        calibration = None
        if sscd_threshold is None:
            sscd_threshold = SSCD_THRESHOLD
        if sscd_calibration:
            real = pq.read_table(sscd_calibration, columns=["similarity"]).column("similarity").to_numpy()
            sscd_threshold = calibrated_threshold(real, calibration_quantile)
            calibration = {"yardstick": Path(sscd_calibration).parent.name, "quantile": calibration_quantile,
                           "n_samples": int(real.size)}
        result["sscd"] = similarity_summary(sim.column("similarity").to_numpy(),
                                            sim.column("nn1_group").to_numpy(zero_copy_only=False), sscd_threshold,
                                            table=sim)
        if calibration:
            result["sscd"]["calibration"] = calibration
        result["sscd"]["descriptor"] = (sim.schema.metadata or {}).get(b"space", b"sscd").decode()
    if clip_images or clip_texts:
        from .clip import clip_score
        from .embed import read_embeddings

        if not (clip_images and clip_texts):
            raise ValueError("a CLIP score needs both the image and the text embeddings of the samples")
        images_emb, texts_emb = read_embeddings(clip_images), read_embeddings(clip_texts)
        if len(images_emb) != manifest["num_samples"]:
            raise ValueError(f"{clip_images} has {len(images_emb)} rows, {manifest_path} lists {manifest['num_samples']}")
        result["clip"] = clip_score(images_emb, texts_emb)
    if prompt_classifier:
        from .clip import prompts_of
        from .quality import prompt_class_agreement

        result["prompt_class"] = prompt_class_agreement(images, prompts_of(table), prompt_classifier)
    write_json(out_path, result)
    return result
