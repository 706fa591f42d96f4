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


def _check(path: Path, md5: str | None, sha256: str | None, name: str) -> None:
    expected = {algo: value.lower() for algo, value in (("md5", md5), ("sha256", sha256)) if value}
    if not expected:
        return
    actual = _digests(path, list(expected))
    for algo, want in expected.items():
        if actual[algo] != want:
            raise ChecksumError(f"{name}: {algo} mismatch, expected {want}, got {actual[algo]}")


def verify(dest: str | os.PathLike, md5: str | None = None, sha256: str | None = None) -> None:
    """Raise ChecksumError naming the file, expected and actual digest unless every given digest matches."""
    _check(Path(dest), md5, sha256, str(dest))


def _expected_text(md5: str | None, sha256: str | None) -> str:
    parts = [f"{name} {value}" for name, value in (("md5", md5), ("sha256", sha256)) if value]
    return f" (expected {', '.join(parts)})" if parts else ""


def fetch(
    url: str,
    dest: str | os.PathLike,
    md5: str | None = None,
    sha256: str | None = None,
    timeout: float = 60,
) -> Path:
    """Download `url` to `dest` unless a file with the right checksum is already there.

    The download goes to a temporary file beside `dest` and is renamed only after its checksum
    passes, so `dest` either holds a verified file or nothing. An existing `dest` that fails its
    checksum is removed first for the same reason. Without any checksum an existing file is kept.
    """
    dest = Path(dest)
    if dest.exists():
        try:
            verify(dest, md5=md5, sha256=sha256)
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
                f"{dest}{_expected_text(md5, sha256)}."
            ) from exc
        _check(tmp, md5, sha256, f"{dest} (downloaded from {url})")
    return dest
