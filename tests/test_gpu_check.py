"""benchmarks/gpu_check.py --tiny: the GPU check's every section runs on CPU with tiny shapes, so the
script a lent GPU runs cannot rot; its JSON holds the fields BENCHMARKS.md documents."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A stand-in for an NVlabs/edm checkout (CI cannot clone it): its constructor and call signatures
# (training/networks.py EDMPrecond, training/loss.py EDMLoss) on a one-layer network. MEMDISTILL_EDM_REPO
# names a real checkout instead, which the check then times (BENCHMARKS.md records such a run on CPU).
EDM_STAND_IN = {
    "training/__init__.py": "",
    "training/networks.py": """
import torch


class EDMPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_data=0.5, **model_kwargs):
        super().__init__()
        self.label_dim, self.sigma_data = label_dim, sigma_data
        self.conv = torch.nn.Conv2d(img_channels, img_channels, 3, padding=1)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        if self.label_dim:  # EDM's networks take one-hot float rows
            assert class_labels.dtype.is_floating_point and class_labels.shape == (len(x), self.label_dim)
        sigma = sigma.reshape(-1, 1, 1, 1)
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        return c_skip * x + c_out * self.conv(x)
""",
    "training/loss.py": """
import torch


class EDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None):
        sigma = (torch.randn([images.shape[0], 1, 1, 1], device=images.device) * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        noisy = images + torch.randn_like(images) * sigma
        return weight * ((net(noisy, sigma, labels, augment_labels=None) - images) ** 2)
""",
}


def edm_checkout(tmp_path: Path) -> Path:
    if os.environ.get("MEMDISTILL_EDM_REPO"):
        return Path(os.environ["MEMDISTILL_EDM_REPO"])
    for name, text in EDM_STAND_IN.items():
        (tmp_path / "edm" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "edm" / name).write_text(text)
    return tmp_path / "edm"


def test_gpu_check_runs_every_section_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--out", str(tmp_path / "out"),
                           "--edm-repo", str(edm_checkout(tmp_path))],
                          env=env, capture_output=True, text=True, timeout=600)
    result = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert proc.returncode == 0, {k: v.get("error") for k, v in result.items() if isinstance(v, dict)}
    assert result["tiny"] is True
    sections = ("environment", "teacher_training", "edm_reference", "cd_lpips", "sampling", "search", "embedding",
                "sd15_unet", "compile_teacher", "zero2")
    statuses = {name: result[name]["status"] for name in sections}
    assert statuses == {**{name: "ok" for name in statuses}, "zero2": "skipped"}, statuses
    training = result["teacher_training"]
    assert {"ncsnpp-cifar10 no", "ncsnpp-cifar10 bf16", "adm-imagenet64-cond bf16"} <= set(training)
    assert all(training[k]["steps_per_s"] > 0 for k in ("ncsnpp-cifar10 no", "ncsnpp-cifar10 bf16"))
    edm = result["edm_reference"]
    cases = [k for k, v in training.items() if isinstance(v, dict)]  # each measured (net, precision)
    assert len(cases) == 3 and all(edm[k]["steps_per_s"] > 0 and edm[k]["loss_last"] > 0 for k in cases)
    assert result["cd_lpips"]["steps_per_s"] > 0 and "loss_fell" in result["cd_lpips"]
    assert result["sampling"]["student_images_per_s"] > 0 and result["sampling"]["nfe_ratio"] == 3
    for case in ("descriptors float32", "pixels uint8"):
        assert result["search"][case]["exact_on_checked_queries"] is True
        assert result["search"][case]["search_over_floor"] > 0
    assert result["embedding"]["sscd_shaped"]["images_per_s"] > 0 and result["embedding"]["clip_shaped"]["images_per_s"] > 0
    assert result["sd15_unet"]["finetune"]["steps_per_s"] > 0 and result["sd15_unet"]["lcm"]["steps_per_s"] > 0
    assert result["compile_teacher"]["backend"] == "eager"
    assert "needs CUDA" in result["zero2"]["skipped"]
    md = (tmp_path / "out" / "gpu-check.md").read_text()
    assert md.startswith("# GPU check") and "| search | ok |" in md


def test_edm_reference_says_where_its_checkout_goes(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    body = gpu_check.edm_reference(gpu_check.Check(tiny=True), {}, tmp_path / "missing")
    assert "git clone https://github.com/NVlabs/edm" in body["skipped"] and str(tmp_path / "missing") in body["skipped"]
