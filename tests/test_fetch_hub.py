"""Checksummed fetches of Hub snapshots (Stable Diffusion v1.5) and COCO 2017 archives, exercised on
local stand-ins: tests never use the network."""
import hashlib
import importlib
import json
import zipfile
from pathlib import Path

import pytest

from pipeline.data.fetch import (SD15_FILES, SD15_REVISION, SD15_SHA256, ChecksumError, FetchError, coco_split,
                                 fetch_coco_captions, fetch_coco_images, fetch_hub_snapshot)
from pipeline.text2image.backbone import fetch_sd15

fetchmod = importlib.import_module("pipeline.data.fetch")  # the package exports a function of the same name


def _fake_hub(files):
    def download(repo_id, revision, local_dir, allow_patterns):
        for name, text in files.items():
            (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(local_dir) / name).write_text(text)
        return local_dir
    return download


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_hub_snapshot_checks_published_digests(tmp_path, monkeypatch):
    import huggingface_hub

    files = {"model_index.json": "{}", "unet/w.safetensors": "weights"}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_hub(files))
    dest = fetch_hub_snapshot(tmp_path / "m", "org/m", "a" * 40, ["*"], ["model_index.json"], "a model",
                              {"unet/w.safetensors": _sha("weights")})
    manifest = json.loads((dest / "checksums.json").read_text())
    assert manifest["sha256"]["unet/w.safetensors"] == _sha("weights") and manifest["revision"] == "a" * 40
    with pytest.raises(ChecksumError, match="unet/w.safetensors: sha256 mismatch"):
        fetch_hub_snapshot(tmp_path / "n", "org/m", "a" * 40, ["*"], ["model_index.json"], "a model",
                           {"unet/w.safetensors": _sha("other")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the failed one left nothing behind
    with pytest.raises(FetchError, match="lacks"):
        fetch_hub_snapshot(tmp_path / "o", "org/m", "a" * 40, ["*"], ["tokenizer/vocab.json"], "a model")


def test_sd15_fetch_pins_its_revision_and_accepts_a_copy_placed_by_hand(tmp_path, monkeypatch):
    import huggingface_hub

    assert len(SD15_REVISION) == 40 and set(SD15_SHA256) <= {f for f in SD15_FILES}
    seen = []

    def offline(repo_id, revision, local_dir, allow_patterns):
        seen.append(revision)
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FetchError, match=r"copy the files there \(model_index.json, .*unet/diffusion_pytorch_model"):
        fetch_sd15(tmp_path / "sd")
    assert seen == [SD15_REVISION]
    hand = tmp_path / "hand"
    for f in ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", *SD15_SHA256]:
        (hand / f).parent.mkdir(parents=True, exist_ok=True)
        (hand / f).write_text(f)
    with pytest.raises(ChecksumError, match="sha256 mismatch"):  # a copy that is not the pinned release
        fetch_sd15(hand)
    other = fetch_sd15(hand, revision="b" * 40)  # another revision has no published digests to check
    assert json.loads((other / "checksums.json").read_text())["source"] == "placed by hand"


def test_coco_fetch_extracts_a_split_from_checked_archives(tmp_path, monkeypatch):
    zips = tmp_path / "zips"
    zips.mkdir()
    with zipfile.ZipFile(zips / "annotations_trainval2017.zip", "w") as z:
        z.writestr("annotations/captions_val2017.json", json.dumps({"images": [], "annotations": []}))
        z.writestr("annotations/instances_val2017.json", "{}")
    with zipfile.ZipFile(zips / "val2017.zip", "w") as z:
        for name in ("000000000001.jpg", "000000000002.jpg"):
            z.writestr(f"val2017/{name}", name)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in zips.iterdir()}
    known = {k: dict(v) for k, v in fetchmod.KNOWN_FILES.items()}
    known["coco-annotations2017"]["md5"] = md5["annotations_trainval2017.zip"]
    known["coco-val2017"]["md5"] = md5["val2017.zip"]
    monkeypatch.setattr(fetchmod, "KNOWN_FILES", known)
    captions = tmp_path / "coco/annotations/captions_val2017.json"
    fetch_coco_captions(captions, zips)
    assert json.loads(captions.read_text()) == {"images": [], "annotations": []}
    images = fetch_coco_images(tmp_path / "coco/val2017", coco_split(captions), zips)
    assert sorted(p.name for p in images.iterdir()) == ["000000000001.jpg", "000000000002.jpg"]
    with pytest.raises(ValueError, match="captions_train2017.json or"):
        coco_split("captions.json")
    (zips / "val2017.zip").write_bytes(b"truncated")  # a damaged archive is refetched, which fails offline here
    def offline_url(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(fetchmod.urllib.request, "urlopen", offline_url)
    with pytest.raises(FetchError, match="val2017.zip"):
        fetch_coco_images(tmp_path / "coco/val2017-b", "val2017", zips)
