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
