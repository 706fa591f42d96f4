"""Raw image sources: every dataset enters the pipeline as (uint8 NHWC images, int64 labels).

One small registry maps a config's `source` name to a loader, so larger datasets (ImageNet, COCO)
plug in later without touching the subset or training code.
"""
from __future__ import annotations

import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.io import CorruptFileError

Loader = Callable[[dict], "tuple[np.ndarray, np.ndarray]"]
SOURCES: dict[str, Loader] = {}


def register_source(name: str) -> Callable[[Loader], Loader]:
    """Add a loader under `name`; a loader takes the dataset config and returns (images, labels)."""

    def wrap(fn: Loader) -> Loader:
        SOURCES[name] = fn
        return fn

    return wrap


def load_source(cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """Load the dataset named by `cfg["source"]` as (uint8 NHWC images, int64 labels)."""
    name = cfg.get("source")
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; known sources: {', '.join(sorted(SOURCES))}")
    images, labels = SOURCES[name](cfg)
    return np.ascontiguousarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64)


@register_source("digits")
def load_digits(cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (1797 images, ships with sklearn, so no download is ever needed).

    The default 16x16 lets a small UNet downsample twice (16 -> 8 -> 4) while staying fast enough
    for a CPU smoke run. Upscaling is bilinear with pixel-centre alignment and edge clamping
    (scipy.ndimage.zoom, order 1, grid_mode): torch's `interpolate(mode="bilinear",
    align_corners=False)` to the last bit at power-of-two factors (tested), without importing torch
    into every job that reads digits. The result is a fixed function of the sklearn pixels.
    """
    from scipy.ndimage import zoom

    resolution = int(cfg.get("resolution", 16))
    if resolution < 8 or resolution % 8:
        raise ValueError(f"digits resolution must be a positive multiple of 8, got {resolution}")
    pixels, target = _sklearn_digits()
    x = pixels.astype(np.float64) * (255.0 / 16.0)
    if resolution != 8:
        x = zoom(x, (1, resolution / 8, resolution / 8), order=1, grid_mode=True, mode="nearest")
    images = np.clip(np.round(x), 0, 255).astype(np.uint8)[..., None]
    return images, target


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (8x8 pixels 0..16, and classes) read from the CSV its wheel ships, the file
    `sklearn.datasets.load_digits` reads: importing sklearn.datasets costs about 2 s in every job that
    reads digits. Tested equal to load_digits; falls back to it where the file is not found."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits as sk_load_digits

        bunch = sk_load_digits()
        return bunch.images, bunch.target.astype(np.int64)
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_MEMBERS = {
    "train": [f"{_CIFAR_DIR}/data_batch_{i}" for i in range(1, 6)],
    "test": [f"{_CIFAR_DIR}/test_batch"],
}


@register_source("cifar10")
def load_cifar10(cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 read straight from the official `cifar-10-python.tar.gz`, without unpacking it.

    Reading the archive in place keeps one checksummed file as the only copy on disk. The batches
    are pickles, which is acceptable only because the archive's MD5 is verified when fetched.
    """
    archive = Path(cfg["archive"])
    split = cfg.get("split", "train")
    if split not in _CIFAR_MEMBERS:
        raise ValueError(f"cifar10 split must be one of {sorted(_CIFAR_MEMBERS)}, got {split!r}")
    if not archive.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 archive not found: {archive}. It is provided by `snakemake fetch_cifar10` "
            f"(which downloads it), or copy cifar-10-python.tar.gz there by hand."
        )
    images, labels = [], []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in _CIFAR_MEMBERS[split]:
                f = tar.extractfile(member)
                if f is None:
                    raise KeyError(member)
                batch = pickle.load(f, encoding="bytes")
                data = np.asarray(batch[b"data"], dtype=np.uint8)
                images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    except (KeyError, EOFError, tarfile.TarError, pickle.UnpicklingError, ValueError, OSError) as exc:
        raise CorruptFileError(
            f"{archive}: not a readable CIFAR-10 python archive ({type(exc).__name__}: {exc}); "
            f"delete it and rerun `snakemake fetch_cifar10`"
        ) from exc
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


@register_source("imagenet64")
def load_imagenet64(cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """ImageNet at 64x64 from the directory `prepare_imagenet64` wrote (`cfg["prepared"]`), memory-mapped:
    a subset job reads only the rows it selects."""
    from pipeline.data.imagenet import load_prepared

    return load_prepared(cfg["prepared"])


# ---------------------------------------------------------------------------------- image-prompt pairs

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NO_LABEL = -1  # the label of an image that has a caption but no class


@dataclass
class CaptionedSource:
    """Image-prompt pairs: prompts and labels in memory, images read on demand (`read(indices)`), so a
    subset of a few hundred COCO images never decodes the other 118,000."""

    prompts: list[str]
    labels: np.ndarray
    read: Callable[[np.ndarray], np.ndarray]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, rows) -> np.ndarray:
        """The images of an index array, read on demand (so a source stands in for an image array)."""
        return self.read(np.asarray(rows, dtype=np.int64))


CAPTIONED: dict[str, Callable[[dict], CaptionedSource]] = {}


def load_captioned(cfg: dict) -> CaptionedSource:
    """The image-prompt pairs of a dataset config: `pairs`, `coco2017`, or `digits` with caption templates."""
    name = cfg.get("source")
    if name not in CAPTIONED:
        raise ValueError(f"data source {name!r} has no captions; captioned sources: {', '.join(sorted(CAPTIONED))} "
                         f"(digits with `caption_templates`)")
    return CAPTIONED[name](cfg)


def _captioned_digits(cfg: dict) -> CaptionedSource:
    """Digits captioned by their class: image i gets template i mod T, with `{name}` the class's word
    and `{digit}` its numeral (the text-to-image branch in miniature, with no download)."""
    templates = cfg.get("caption_templates")
    if not templates:
        raise ValueError("a captioned digits dataset needs `caption_templates`, e.g. ['a handwritten digit {name}']")
    images, labels = load_digits(cfg)
    prompts = [templates[i % len(templates)].format(name=DIGIT_NAMES[c], digit=int(c)) for i, c in enumerate(labels)]
    return CaptionedSource(prompts, labels.astype(np.int64), lambda idx: images[np.asarray(idx, dtype=np.int64)])


CAPTIONED["digits"] = _captioned_digits


def resize_center_crop(image, resolution: int) -> np.ndarray:
    """diffusers' text-to-image preprocessing without augmentation (examples/text_to_image/
    train_text_to_image.py: Resize(resolution, bilinear) of the short side, then CenterCrop), as uint8 HWC RGB."""
    from PIL import Image

    img = image.convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.Resampling.BILINEAR)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return np.asarray(img.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


def _read_files(paths: list[Path], resolution: int, what: str):
    def read(indices) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        out = np.empty((len(indices), resolution, resolution, 3), np.uint8)
        for k, i in enumerate(np.asarray(indices, dtype=np.int64)):
            try:
                with Image.open(paths[i]) as img:
                    out[k] = resize_center_crop(img, resolution)
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"{paths[i]}: listed by {what} but missing") from exc
            except (UnidentifiedImageError, OSError) as exc:
                raise CorruptFileError(f"{paths[i]}: not a readable image ({exc})") from exc
        return out

    return read


def _pairs(cfg: dict) -> CaptionedSource:
    """A folder of images with `metadata.jsonl` ({"file_name": ..., "text": ...} per line: the Hugging
    Face imagefolder layout diffusers' text-to-image examples train from), in file order."""
    import json

    root = Path(cfg["dir"])
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: an image-prompt folder needs metadata.jsonl with one "
                                '{"file_name": ..., "text": ...} per image (datasets.<name>.dir)')
    paths, prompts = [], []
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            paths.append(root / row["file_name"])
            prompts.append(str(row["text"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CorruptFileError(f"{meta}:{n}: not a {{\"file_name\", \"text\"}} record ({exc})") from exc
    if not paths:
        raise CorruptFileError(f"{meta}: no image-prompt pairs")
    return CaptionedSource(prompts, np.full(len(paths), NO_LABEL, np.int64),
                           _read_files(paths, int(cfg.get("resolution", 512)), str(meta)))


CAPTIONED["pairs"] = _pairs


def _coco2017(cfg: dict) -> CaptionedSource:
    """COCO 2017 images with one caption each: the first annotation (lowest id) of every image, images in
    id order (annotations/captions_train2017.json, images in `images_dir`, from the fetch_coco rule)."""
    import json

    captions = Path(cfg["captions_file"])
    if not captions.is_file():
        raise FileNotFoundError(f"COCO captions not found: {captions}. It is provided by `snakemake fetch_coco`.")
    try:
        data = json.loads(captions.read_text())
        files = {int(im["id"]): im["file_name"] for im in data["images"]}
        first: dict[int, tuple[int, str]] = {}
        for ann in data["annotations"]:
            key = int(ann["image_id"])
            if key not in first or int(ann["id"]) < first[key][0]:
                first[key] = (int(ann["id"]), " ".join(str(ann["caption"]).split()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError(f"{captions}: not a COCO captions file ({exc}); rerun `snakemake fetch_coco`") from exc
    ids = sorted(k for k in files if k in first)
    paths = [Path(cfg["images_dir"]) / files[k] for k in ids]
    return CaptionedSource([first[k][1] for k in ids], np.full(len(ids), NO_LABEL, np.int64),
                           _read_files(paths, int(cfg.get("resolution", 512)), str(captions)))


CAPTIONED["coco2017"] = _coco2017
