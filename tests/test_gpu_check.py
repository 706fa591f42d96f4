"""benchmarks/gpu_check.py --tiny: the GPU check's every section runs on CPU with tiny shapes, so the
script a lent GPU runs cannot rot; its JSON holds the fields BENCHMARKS.md documents."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_section_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    assert proc.returncode == 0, {k: v.get("error") for k, v in result.items() if isinstance(v, dict)}
    assert result["tiny"] is True
    statuses = {name: result[name]["status"] for name in ("environment", "teacher_training", "cd_lpips", "sampling",
                                                          "search", "embedding", "sd15_unet", "compile_teacher", "zero2")}
    assert statuses == {**{name: "ok" for name in statuses}, "zero2": "skipped"}, statuses
    training = result["teacher_training"]
    assert {"ncsnpp-cifar10 no", "ncsnpp-cifar10 bf16", "adm-imagenet64-cond bf16"} <= set(training)
    assert all(training[k]["steps_per_s"] > 0 for k in ("ncsnpp-cifar10 no", "ncsnpp-cifar10 bf16"))
    assert result["cd_lpips"]["steps_per_s"] > 0 and "loss_fell" in result["cd_lpips"]
    assert result["sampling"]["student_images_per_s"] > 0 and result["sampling"]["nfe_ratio"] == 3
    for case in ("descriptors float32", "pixels uint8"):
        assert result["search"][case]["exact_on_checked_queries"] is True
        assert result["search"][case]["search_over_floor"] > 0
    assert result["embedding"]["sscd_shaped"]["images_per_s"] > 0 and result["embedding"]["clip_shaped"]["images_per_s"] > 0
    assert result["sd15_unet"]["finetune"]["steps_per_s"] > 0 and result["sd15_unet"]["lcm"]["steps_per_s"] > 0
    assert result["compile_teacher"]["backend"] == "eager"
    assert "needs CUDA" in result["zero2"]["skipped"]
    md = (tmp_path / "gpu-check.md").read_text()
    assert md.startswith("# GPU check") and "| search | ok |" in md
