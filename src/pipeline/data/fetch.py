"""Checksummed downloads of raw datasets.

Cluster compute nodes are often offline, so a failed download says exactly which file to copy
where (and its checksum) instead of surfacing a bare socket error from deep inside urllib.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from pipeline.io import atomic_directory, atomic_output

KNOWN_FILES: dict[str, dict[str, str | None]] = {
    "cifar10": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "dest": "cifar-10-python.tar.gz",
    },
    # clean-fid's TorchScript Inception. Neither clean-fid 0.1.35 (its downloader checks nothing)
    # nor its docs publish a digest, so none is invented here: the fetch rule logs the sha256 of
    # what it fetched, to be pinned here once verified on a login node.
    "inception": {
        "url": "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
        "sha256": None,
        "dest": "inception-2015-12-05.pt",
    },
    # The ImageNet backbones of LPIPS (the consistency metric), torchvision's own checkpoints. Their
    # names carry the first 8 hex digits of the file's sha256, which is what torch.hub checks
    # (torch/hub.py check_hash); the same prefix is checked here.
    "lpips-vgg": {
        "url": "https://download.pytorch.org/models/vgg16-397923af.pth",
        "sha256_prefix": "397923af",
        "dest": "vgg16-397923af.pth",
    },
    # SSCD copy-detection descriptor (Pizzi et al. 2022), the README's recommended default model.
    # No digest is published (facebookresearch/sscd-copy-detection README): the fetch logs the
    # sha256 of what it fetched, to be pinned here once verified.
    "sscd": {
        "url": "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt",
        "sha256": None,
        "dest": "sscd_disc_mixup.torchscript.pt",
    },
    # COCO 2017 (text-to-image extra pairs): the archives on images.cocodataset.org with the md5s
    # PaddlePaddle/PaddleDetection ppdet/utils/download.py publishes (tensorflow/datasets
    # url_checksums/coco.txt gives the same files' sha256 and sizes: 19.3 GB, 816 MB, 253 MB).
    "coco-train2017": {
        "url": "http://images.cocodataset.org/zips/train2017.zip",
        "md5": "cced6f7f71b7629ddf16f17bbcfab6b2",
        "dest": "train2017.zip",
    },
    "coco-val2017": {
        "url": "http://images.cocodataset.org/zips/val2017.zip",
        "md5": "442b8da7639aecaf257c1dceb8ba8c80",
        "dest": "val2017.zip",
    },
    "coco-annotations2017": {
        "url": "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
        "md5": "f4bbac642086de4f52a3fdda2de5fa2c",
        "dest": "annotations_trainval2017.zip",
    },
    "lpips-alex": {
        "url": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        "sha256_prefix": "7be5be79",
        "dest": "alexnet-owt-7be5be79.pth",
    },
}

# Stable Diffusion v1.5 on the Hub (the runwayml repository's successor) at a pinned commit, and the
# published sha256 of its three weight files at that commit (finegrain-ai/refiners
# src/refiners/conversion/models/{unet,autoencoder,clip_text}_sd15.py pin the same revision and digests).
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_REVISION = "f03de327dd89b501a01da37fc5240cf4fdba85a1"
SD15_SHA256 = {
    "unet/diffusion_pytorch_model.safetensors": "19da7aaa4b880e59d56843f1fcb4dd9b599c28a1d9d9af7c1143057c8ffae9f1",
    "vae/diffusion_pytorch_model.safetensors": "a2b5134f4dbc140d9c11f11cba3233099e00af40f262f136c691fb7d38d2194c",
    "text_encoder/model.safetensors": "d008943c017f0092921106440254dbbe00b6a285f7883ec8ba160c3faad88334",
}
# What the study uses: no safety checker, no feature extractor, no fp16/non-EMA/pickle variants.
SD15_FILES = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*", "text_encoder/config.json",
              "text_encoder/model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
              "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]

_CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A raw input could not be downloaded or failed its checksum."""


class ChecksumError(FetchError):
    """A file's digest differs from the expected one (corrupt or wrong file)."""


def _digests(path: Path, algorithms: list[str]) -> dict[str, str]:
    hashes = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            for h in hashes.values():
                h.update(block)
    return {name: h.hexdigest() for name, h in hashes.items()}


def _check(path: Path, md5: str | None, sha256: str | None, name: str, sha256_prefix: str | None = None) -> None:
    checks = [(algo, value.lower(), True) for algo, value in (("md5", md5), ("sha256", sha256)) if value]
    if sha256_prefix and not sha256:
        checks.append(("sha256", sha256_prefix.lower(), False))
    if not checks:
        return
    actual = _digests(path, sorted({algo for algo, _, _ in checks}))
    for algo, want, exact in checks:
        if not (actual[algo] == want if exact else actual[algo].startswith(want)):
            expected = want if exact else f"{want}..."
            raise ChecksumError(f"{name}: {algo} mismatch, expected {expected}, got {actual[algo]}")


def verify(dest: str | os.PathLike, md5: str | None = None, sha256: str | None = None,
           sha256_prefix: str | None = None) -> None:
    """Raise ChecksumError naming the file, expected and actual digest unless every given digest matches.

    `sha256_prefix` checks only the leading hex digits, torchvision's convention for its checkpoints."""
    _check(Path(dest), md5, sha256, str(dest), sha256_prefix)


def _expected_text(md5: str | None, sha256: str | None, sha256_prefix: str | None = None) -> str:
    parts = [f"{name} {value}" for name, value in (("md5", md5), ("sha256", sha256)) if value]
    if sha256_prefix and not sha256:
        parts.append(f"sha256 starting {sha256_prefix}")
    return f" (expected {', '.join(parts)})" if parts else ""


def fetch(
    url: str,
    dest: str | os.PathLike,
    md5: str | None = None,
    sha256: str | None = None,
    timeout: float = 60,
    sha256_prefix: str | None = None,
) -> Path:
    """Download `url` to `dest` unless a file with the right checksum is already there.

    The download goes to a temporary file beside `dest` and is renamed only after its checksum
    passes, so `dest` either holds a verified file or nothing. An existing `dest` that fails its
    checksum is removed first for the same reason. Without any checksum an existing file is kept.
    """
    dest = Path(dest)
    if dest.exists():
        try:
            verify(dest, md5=md5, sha256=sha256, sha256_prefix=sha256_prefix)
            return dest
        except ChecksumError as exc:
            tqdm.write(f"{exc}; downloading it again")
            dest.unlink()
    with atomic_output(dest) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                total = response.headers.get("Content-Length")
                with tqdm(
                    total=int(total) if total and total.isdigit() else None,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                ) as bar:
                    while block := response.read(_CHUNK):
                        out.write(block)
                        bar.update(len(block))
        except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException, ValueError) as exc:
            raise FetchError(
                f"could not download {url} to {dest} ({exc}); this machine may be offline. "
                f"Download it on a machine with internet (e.g. the cluster login node) and copy it to "
                f"{dest}{_expected_text(md5, sha256, sha256_prefix)}."
            ) from exc
        _check(tmp, md5, sha256, f"{dest} (downloaded from {url})", sha256_prefix)
    return dest


HUB_MANIFEST = "checksums.json"


def fetch_hub_snapshot(dest: str | os.PathLike, repo: str, revision: str, patterns: list[str], required: list[str],
                       what: str, expected: dict[str, str] | None = None) -> Path:
    """Download the files of a Hugging Face Hub repository matching `patterns` at `revision` into `dest`,
    with a sha256 manifest (checksums.json) of every file.

    Files land in a temporary directory beside `dest`, which is renamed into place only when the
    download is complete and holds every `required` file, so `dest` holds a whole model or nothing.
    A `dest` already holding the required files (copied there by hand onto an offline cluster) is kept
    and only its manifest is written. `expected` maps files to their published sha256, checked either way.
    """
    import shutil

    from pipeline.io import sha256_file, write_json

    dest = Path(dest)
    if (dest / HUB_MANIFEST).exists():
        return dest

    def manifest(root: Path, source: str) -> None:
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts)
        digests = {f: sha256_file(root / f) for f in files}
        for f, want in (expected or {}).items():
            if digests.get(f) != want:
                raise ChecksumError(f"{dest / f}: sha256 mismatch, expected {want} ({repo}@{revision}), "
                                    f"got {digests.get(f, 'no such file')}")
        write_json(root / HUB_MANIFEST, {"repo": repo, "revision": revision, "source": source, "sha256": digests})

    if all((dest / f).exists() for f in required):
        manifest(dest, "placed by hand")
        return dest
    with atomic_directory(dest) as tmp:
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(repo_id=repo, revision=revision, local_dir=str(tmp), allow_patterns=list(patterns))
        except Exception as exc:
            raise FetchError(
                f"could not download {what} ({repo}@{revision}) into {dest}: {type(exc).__name__}: {exc}. Run the "
                f"fetch on a machine with internet (snakemake {dest / HUB_MANIFEST}), or copy the files there "
                f"({', '.join(required)}) and rerun it") from exc
        missing = [f for f in required if not (tmp / f).exists()]
        if missing:
            raise FetchError(f"{repo}@{revision} lacks {missing}: not {what}")
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
        manifest(tmp, f"https://huggingface.co/{repo}")
    return dest


def coco_split(captions_file: str | os.PathLike) -> str:
    """train2017 or val2017, from the captions file's name (captions_<split>.json)."""
    import re

    m = re.fullmatch(r"captions_(train2017|val2017)\.json", Path(captions_file).name)
    if not m:
        raise ValueError(f"{captions_file}: a COCO 2017 captions file is named captions_train2017.json or "
                         f"captions_val2017.json")
    return m.group(1)


def fetch_coco_captions(captions_file: str | os.PathLike, zips_dir: str | os.PathLike) -> Path:
    """The captions file of one COCO 2017 split, from the annotations archive (md5-checked, kept in
    `zips_dir`; one copied there by hand is checked, not fetched), written atomically."""
    import shutil
    import zipfile

    split = coco_split(captions_file)
    ann = KNOWN_FILES["coco-annotations2017"]
    ann_zip = fetch(ann["url"], Path(zips_dir) / ann["dest"], md5=ann["md5"])
    with zipfile.ZipFile(ann_zip) as z, atomic_output(captions_file) as tmp:
        with z.open(f"annotations/captions_{split}.json") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)
    return Path(captions_file)


def fetch_coco_images(images_dir: str | os.PathLike, split: str, zips_dir: str | os.PathLike) -> Path:
    """The images of one COCO 2017 split, extracted from its archive (md5-checked, kept in `zips_dir`)
    into a directory beside `images_dir` that is renamed into place only when every image is out."""
    import shutil
    import zipfile

    img = KNOWN_FILES[f"coco-{split}"]
    img_zip = fetch(img["url"], Path(zips_dir) / img["dest"], md5=img["md5"])
    with atomic_directory(images_dir) as tmp, zipfile.ZipFile(img_zip) as z:
        members = [m for m in z.namelist() if m.startswith(f"{split}/") and not m.endswith("/")]
        for m in tqdm(members, desc=f"extract {split}", mininterval=5):
            with z.open(m) as src, open(tmp / Path(m).name, "wb") as out:
                shutil.copyfileobj(src, out)
    return Path(images_dir)
