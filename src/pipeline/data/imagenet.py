"""ImageNet at 64x64: prepared once from the user's own copy of the ILSVRC-2012 training set.

ImageNet cannot be downloaded by a pipeline (its licence requires each user to obtain it), so the
`prepare_imagenet64` rule converts a local copy into one array file that every later job memory-maps:
either the training folder (`ILSVRC/Data/CLS-LOC/train/<wnid>/*.JPEG`, as in the Kaggle download) or
the official `ILSVRC2012_img_train.tar` (a tar of one tar per class). The preprocessing is NVlabs/edm's
`dataset_tool.py --transform=center-crop --resolution=64x64` (its README's ImageNet recipe): RGB,
crop the centred square of side min(w, h), resize with PIL's Lanczos filter; labels are the indices
of the sorted class folder names (wnids), as dataset_tool derives them from top-level folder names.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pipeline.io import CorruptFileError

log = logging.getLogger(__name__)

IMAGES, LABELS, CLASSES, MANIFEST = "images.npy", "labels.npy", "classes.json", "manifest.json"
EXTENSIONS = (".jpeg", ".jpg", ".png")
HOW_TO_GET = ("ImageNet is not downloaded by the pipeline (its licence requires you to obtain it): get the "
              "ILSVRC-2012 training set (image-net.org, or the Kaggle 'ImageNet Object Localization Challenge') "
              "and point `datasets.<name>.train_dir` at ILSVRC/Data/CLS-LOC/train, or `archive` at "
              "ILSVRC2012_img_train.tar; then `snakemake prepare_imagenet64` writes the 64x64 arrays.")


def center_crop_resize(data: bytes, resolution: int) -> np.ndarray:
    """One encoded image as uint8 HWC at `resolution`, by dataset_tool's center-crop transform."""
    with Image.open(io.BytesIO(data)) as img:
        a = np.asarray(img.convert("RGB"))
    crop = min(a.shape[:2])
    a = a[(a.shape[0] - crop) // 2:(a.shape[0] + crop) // 2, (a.shape[1] - crop) // 2:(a.shape[1] + crop) // 2]
    return np.asarray(Image.fromarray(a).resize((resolution, resolution), Image.Resampling.LANCZOS))


def _is_image(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS)


def _folder_classes(train_dir: Path) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """(wnid, [(file name, bytes)]) per class folder: one class in memory at a time."""
    for d in sorted(p for p in train_dir.iterdir() if p.is_dir()):
        yield d.name, [(p.name, p.read_bytes()) for p in sorted(d.iterdir()) if _is_image(p.name)]


def _archive_classes(archive: Path) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """(wnid, [(file name, bytes)]) per inner tar of the tar of per-class tars, in archive order."""
    try:
        with tarfile.open(archive) as outer:
            for member in outer:
                if not (member.isfile() and member.name.endswith(".tar")):
                    continue
                with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                    files = [(Path(m.name).name, inner.extractfile(m).read())
                             for m in inner if m.isfile() and _is_image(m.name)]
                yield Path(member.name).stem, files
    except tarfile.TarError as exc:
        raise CorruptFileError(f"{archive}: not a readable ILSVRC2012 training archive ({exc}). {HOW_TO_GET}") from exc


def prepare_imagenet(out_dir: str | Path, train_dir: str | Path | None = None, archive: str | Path | None = None,
                     resolution: int = 64, workers: int = 1) -> dict:
    """Write `out_dir/{images.npy, labels.npy, classes.json, manifest.json}` from a folder or archive.

    Classes are converted one at a time (the archive is a stream of per-class tars) into parts, then
    assembled in sorted-wnid order, files in name order within a class, so both sources give the
    same rows. The directory is built beside its destination and renamed into place, so an
    interrupted run leaves no half-written dataset behind. Returns the manifest."""
    if (train_dir is None) == (archive is None):
        raise ValueError("give exactly one of train_dir (the class folders) or archive (ILSVRC2012_img_train.tar)")
    source = Path(train_dir if train_dir is not None else archive)
    if not source.exists():
        raise FileNotFoundError(f"ImageNet source not found: {source}. {HOW_TO_GET}")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "parts").mkdir(parents=True)
    counts: dict[str, int] = {}
    classes_iter = _folder_classes(source) if train_dir is not None else _archive_classes(source)
    with ProcessPoolExecutor(max_workers=workers) if workers > 1 else contextlib.nullcontext() as pool:
        for wnid, files in tqdm(classes_iter, desc="imagenet classes", mininterval=10):
            if wnid in counts:
                raise CorruptFileError(f"{source}: class {wnid} appears twice")
            files.sort(key=lambda f: f[0])
            datas = [data for _, data in files]
            sizes = itertools.repeat(resolution, len(datas))
            converted = list(pool.map(center_crop_resize, datas, sizes, chunksize=64) if pool
                             else map(center_crop_resize, datas, sizes))
            part = np.stack(converted) if converted else np.zeros((0, resolution, resolution, 3), np.uint8)
            np.save(tmp / "parts" / f"{wnid}.npy", part)
            counts[wnid] = len(part)
    classes = sorted(counts)
    total = sum(counts.values())
    if total == 0:
        raise CorruptFileError(f"{source}: no images found. {HOW_TO_GET}")
    images = np.lib.format.open_memmap(tmp / IMAGES, mode="w+", dtype=np.uint8, shape=(total, resolution, resolution, 3))
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [counts[c] for c in classes])
    row = 0
    for wnid in classes:
        images[row:row + counts[wnid]] = np.load(tmp / "parts" / f"{wnid}.npy")
        row += counts[wnid]
    images.flush()
    del images
    shutil.rmtree(tmp / "parts")
    np.save(tmp / LABELS, labels)
    (tmp / CLASSES).write_text(json.dumps(classes))
    manifest = {"source": str(source), "images": total, "classes": len(classes), "resolution": resolution,
                "transform": "center-crop, Lanczos (NVlabs/edm dataset_tool.py)"}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    log.info("prepared %d images of %d classes at %dx%d in %s", total, len(classes), resolution, resolution, out_dir)
    return manifest


def load_prepared(prepared_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images memory-mapped read-only, labels) of a prepared directory, checked against its manifest."""
    d = Path(prepared_dir)
    if not (d / MANIFEST).is_file():
        raise FileNotFoundError(f"prepared ImageNet not found: {d}. Run `snakemake prepare_imagenet64`. {HOW_TO_GET}")
    manifest = json.loads((d / MANIFEST).read_text())
    try:
        images = np.load(d / IMAGES, mmap_mode="r")
        labels = np.load(d / LABELS)
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"{d}: unreadable prepared arrays ({exc}); rerun `snakemake prepare_imagenet64`") from exc
    r = manifest["resolution"]
    if images.shape != (manifest["images"], r, r, 3) or labels.shape != (manifest["images"],):
        raise CorruptFileError(f"{d}: arrays of shape {images.shape} / {labels.shape} do not match its manifest "
                               f"({manifest['images']} images at {r}x{r}); rerun `snakemake prepare_imagenet64`")
    return images, labels
