"""benchmarks/fd_sampling_noise.py runs end to end on a tiny model, so the sampling-noise numbers
BENCHMARKS.md reads cannot rot: independent sets differ, the same sets repeat exactly, and joined sets
give the larger sizes. No timing is asserted."""
import importlib.util
from pathlib import Path

import torch

from pipeline.data import load_source
from pipeline.diffusion import ConsistencyFunction
from pipeline.digits_classifier import train_digits_classifier
from pipeline.modelio import model_meta, save_model
from pipeline.nets import build_net
from pipeline.quality import write_reference_stats
from tiny import TINY_UNET

ROOT = Path(__file__).resolve().parents[1]


def test_fd_sampling_noise_measures_independent_sample_sets(tmp_path):
    spec = importlib.util.spec_from_file_location("fd_sampling_noise", ROOT / "benchmarks" / "fd_sampling_noise.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    images, labels = load_source({"source": "digits", "resolution": 8})
    train_digits_classifier(images[:300], labels[:300], tmp_path / "clf", epochs=1)
    write_reference_stats("digits_fd", tmp_path / "clf", images, tmp_path / "ref.npz")
    torch.manual_seed(0)
    save_model(tmp_path / "student", ConsistencyFunction(build_net(TINY_UNET, 8, 1)),
               model_meta("consistency", TINY_UNET, 8, 1, 0.5, 0.002, 80.0), {"steps": 0})
    args = ["--model", str(tmp_path / "student"), "--sampler", '{"kind": "consistency", "ts": [80.0]}',
            "--feature-net", str(tmp_path / "clf"), "--reference", str(tmp_path / "ref.npz"),
            "--num-samples", "24", "--sets", "4", "--out", str(tmp_path / "noise.json")]
    result = bench.main(args)
    sizes = [(r["num_samples"], len(r["values"])) for r in result["by_size"]]
    assert sizes == [(24, 4), (48, 2)]
    values = result["by_size"][0]["values"]
    assert len(set(values)) == 4 and result["by_size"][0]["sd"] > 0  # independent sets, not one set four times
    assert bench.main(args)["by_size"][0]["values"] == values  # seeded: the same sets again
    assert (tmp_path / "noise.json").exists()
