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

from pipeline.io import atomic_output

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
    "lpips-alex": {
        "url": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        "sha256_prefix": "7be5be79",
        "dest": "alexnet-owt-7be5be79.pth",
    },
}

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
