"""Shared by the tests: the smallest UNet layout that builds (8x8 inputs, two resolutions)."""

TINY_UNET = {
    "block_out_channels": [8, 16], "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4, "add_attention": False,
}
