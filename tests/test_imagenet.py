"""ImageNet-64 preparation on a tiny ImageNet-shaped tree the test writes itself (class folders of
JPEGs, and the same images as the official tar of per-class tars)."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.data import build_subset, load_source
from pipeline.data.imagenet import HOW_TO_GET, center_crop_resize, load_prepared, prepare_imagenet
from pipeline.io import CorruptFileError

# wnid -> sizes (w, h) of its images: non-square, landscape and portrait, so the crop matters
CLASSES = {"n02000000": [(80, 60), (50, 90)], "n01000000": [(64, 64), (120, 70), (33, 47)],
           "n03000000": [(70, 100)]}


def jpeg(size, seed) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    a = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    train = root / "ILSVRC" / "Data" / "CLS-LOC" / "train"
    archive = root / "ILSVRC2012_img_train.tar"
    files = {}
    for c, (wnid, sizes) in enumerate(CLASSES.items()):
        (train / wnid).mkdir(parents=True)
        for k, size in enumerate(sizes):
            data = jpeg(size, 10 * c + k)
            (train / wnid / f"{wnid}_{k}.JPEG").write_bytes(data)
            files[(wnid, k)] = data
        (train / wnid / "notes.txt").write_text("not an image")
    with tarfile.open(archive, "w") as outer:
        for wnid in reversed(list(CLASSES)):  # archive order differs from name order
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for k in reversed(range(len(CLASSES[wnid]))):
                    info = tarfile.TarInfo(f"{wnid}_{k}.JPEG")
                    info.size = len(files[(wnid, k)])
                    inner.addfile(info, io.BytesIO(files[(wnid, k)]))
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = len(buf.getvalue())
            outer.addfile(info, io.BytesIO(buf.getvalue()))
    return root, train, archive, files


def test_center_crop_resize_is_edm_dataset_tool():
    """dataset_tool.py center_crop: the centred square of side min(w, h), then a Lanczos resize."""
    data = jpeg((90, 40), 0)
    with Image.open(io.BytesIO(data)) as im:
        a = np.asarray(im.convert("RGB"))
    square = a[:, 25:65]
    expected = np.asarray(Image.fromarray(square).resize((16, 16), Image.Resampling.LANCZOS))
    assert np.array_equal(center_crop_resize(data, 16), expected)


def test_prepare_from_folder_and_archive_agree(tree, tmp_path):
    root, train, archive, files = tree
    m1 = prepare_imagenet(tmp_path / "a", train_dir=train, resolution=16)
    m2 = prepare_imagenet(tmp_path / "b", archive=archive, resolution=16, workers=2)
    assert m1["images"] == m2["images"] == 6 and m1["classes"] == 3
    a_img, a_lab = load_prepared(tmp_path / "a")
    b_img, b_lab = load_prepared(tmp_path / "b")
    assert isinstance(a_img, np.memmap) and a_img.shape == (6, 16, 16, 3)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    # labels index the sorted wnids; rows run through classes, then files, in name order
    assert a_lab.tolist() == [0, 0, 0, 1, 1, 2]
    assert np.array_equal(a_img[3], center_crop_resize(files[("n02000000", 0)], 16))
    assert not (tmp_path / "a.tmp").exists()


def test_prepared_dataset_is_a_source_for_subsets(tree, tmp_path):
    _, train, _, _ = tree
    prepare_imagenet(tmp_path / "p", train_dir=train, resolution=16)
    images, labels = load_source({"source": "imagenet64", "prepared": str(tmp_path / "p")})
    assert images.shape == (6, 16, 16, 3) and labels.dtype == np.int64
    # Table 4's ImageNet design in miniature: anchors of class 0 repeated, singles from every other class
    subset = build_subset(images, labels, {"kind": "repetition", "repeated_classes": [0], "per_class": 2,
                                           "repeats": 10, "others_per_class": 1, "seed": 0})
    assert sorted(subset.labels.tolist()) == [0, 0, 1, 2]
    assert {int(l): int(r) for l, r in zip(subset.labels, subset.repeat)} == {0: 10, 1: 1, 2: 1}
    with pytest.raises(ValueError, match="others_per_class=2"):
        build_subset(images, labels, {"kind": "repetition", "repeated_classes": [0], "per_class": 1,
                                      "repeats": 2, "others_per_class": 2, "seed": 0})


def test_missing_source_and_missing_or_corrupt_preparation(tmp_path, tree):
    _, train, _, _ = tree
    with pytest.raises(FileNotFoundError, match="ImageNet source not found") as err:
        prepare_imagenet(tmp_path / "x", train_dir=tmp_path / "nowhere")
    assert HOW_TO_GET in str(err.value)
    with pytest.raises(FileNotFoundError, match="prepare_imagenet64"):
        load_prepared(tmp_path / "never-prepared")
    prepare_imagenet(tmp_path / "p", train_dir=train, resolution=16)
    images = tmp_path / "p" / "images.npy"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(CorruptFileError, match="prepare_imagenet64"):
        load_prepared(tmp_path / "p")
