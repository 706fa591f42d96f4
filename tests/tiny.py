"""Shared by the tests: the smallest UNet layout that builds (8x8 inputs, two resolutions)."""

TINY_UNET = {
    "block_out_channels": [8, 16], "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4, "add_attention": False,
}


def train_teacher_args(workdir, spec, out="teacher", checkpoint_dir=None) -> list[str]:
    """`pipeline train-teacher` arguments for TINY_UNET on 8 digits (8x8), the subset written into `workdir`."""
    import json
    from pathlib import Path

    from pipeline.data import build_subset, load_source, write_subset

    subset = Path(workdir) / "s.parquet"
    images, labels = load_source({"source": "digits", "resolution": 8})
    write_subset(subset, build_subset(images, labels, {"kind": "uniform", "n": 8, "seed": 0}), {})
    args = ["train-teacher", "--subset", str(subset), "--net", json.dumps(TINY_UNET), "--spec", json.dumps(spec),
            "--out", str(Path(workdir) / out)]
    return args + (["--checkpoint-dir", str(checkpoint_dir)] if checkpoint_dir else [])

# A Stable Diffusion in miniature for 16-pixel one-channel digits: word-level tokenizer, 2-layer CLIP
# text model, AutoencoderKL with one downsampling (8x8x4 latents), UNet2DConditionModel with cross-attention.
TINY_T2I = {
    "tokenizer": {"max_length": 12},
    "text_encoder": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
    "vae": {"block_out_channels": [8, 16], "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 4},
    "unet": {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 4,
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
}
TINY_CAPTIONS = ["a handwritten digit {name}", "the number {name}, written by hand"]
