"""Data layer: sources, subsets and checksummed fetch, all offline and fast."""
from __future__ import annotations

import hashlib
import io
import pickle
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import (
    KNOWN_FILES,
    ChecksumError,
    FetchError,
    Subset,
    build_subset,
    build_text_subset,
    fetch,
    load_captioned,
    load_source,
    read_subset,
    verify,
    write_subset,
)
from pipeline.data.sources import DIGIT_NAMES, resize_center_crop
from pipeline.io import CorruptFileError, write_image_table

# ---------------------------------------------------------------- sources


def test_digits_shape_dtype_range_and_labels():
    images, labels = load_source({"source": "digits"})
    assert images.shape == (1797, 16, 16, 1)
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    assert images.min() == 0 and images.max() == 255
    assert set(np.unique(labels)) == set(range(10))


def test_digits_deterministic_and_native_resolution():
    a, la = load_source({"source": "digits", "resolution": 16})
    b, lb = load_source({"source": "digits", "resolution": 16})
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    native, _ = load_source({"source": "digits", "resolution": 8})
    from sklearn.datasets import load_digits

    expected = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    assert np.array_equal(native[..., 0], expected)
    big, _ = load_source({"source": "digits", "resolution": 32})
    assert big.shape == (1797, 32, 32, 1)


def test_digits_rejects_bad_resolution():
    with pytest.raises(ValueError, match="multiple of 8"):
        load_source({"source": "digits", "resolution": 12})


def test_unknown_source_lists_known():
    with pytest.raises(ValueError, match="cifar10.*digits"):
        load_source({"source": "mnist"})


def _fake_cifar(path, per_batch=3, seed=0):
    """Write a tiny archive in the real cifar-10-python layout; return the raw rows per member."""
    rng = np.random.default_rng(seed)
    rows = {}
    with tarfile.open(path, "w:gz") as tar:
        for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
            data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
            labels = [(i + j) % 10 for j in range(per_batch)]
            rows[name] = (data, labels)
            blob = pickle.dumps({b"data": data, b"labels": labels, b"batch_label": name.encode()})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return rows


def test_cifar_tarball_read_back_exactly(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    rows = _fake_cifar(archive)
    images, labels = load_source({"source": "cifar10", "archive": str(archive)})
    assert images.shape == (15, 32, 32, 3) and images.dtype == np.uint8
    train_data = np.concatenate([rows[f"data_batch_{k}"][0] for k in range(1, 6)])
    train_labels = sum((rows[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    assert labels.tolist() == train_labels and labels.dtype == np.int64
    # channel-major: byte c*1024 + y*32 + x of a row is pixel (y, x), channel c
    n, y, x, c = 7, 2, 5, 1
    assert images[n, y, x, c] == train_data[n, c * 1024 + y * 32 + x]
    for c in range(3):
        assert np.array_equal(images[:, :, :, c].reshape(15, 1024), train_data[:, c * 1024 : (c + 1) * 1024])

    test_images, test_labels = load_source({"source": "cifar10", "archive": str(archive), "split": "test"})
    assert test_images.shape == (3, 32, 32, 3)
    assert test_labels.tolist() == rows["test_batch"][1]
    assert test_images[0, 31, 0, 2] == rows["test_batch"][0][0, 2 * 1024 + 31 * 32 + 0]


def test_cifar_missing_archive_message(tmp_path):
    missing = tmp_path / "nope" / "cifar-10-python.tar.gz"
    with pytest.raises(FileNotFoundError) as info:
        load_source({"source": "cifar10", "archive": str(missing)})
    assert str(missing) in str(info.value) and "fetch_cifar10" in str(info.value)


def test_cifar_truncated_archive_is_corrupt(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    _fake_cifar(archive)
    archive.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(CorruptFileError, match="fetch_cifar10"):
        load_source({"source": "cifar10", "archive": str(archive)})


# ---------------------------------------------------------------- subsets


def _toy(n=200, classes=10, seed=1):
    """Distinct random images with labels cycling through the classes."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256  # guarantees distinct rows together with the next line
    images[:, 0, 0, 1] = np.arange(n) // 256
    return images, np.arange(n, dtype=np.int64) % classes


def test_uniform_subset():
    images, labels = _toy()
    spec = {"kind": "uniform", "n": 50, "seed": 3}
    s = build_subset(images, labels, spec)
    assert len(s) == 50 and len(np.unique(s.index)) == 50
    assert np.all(np.diff(s.index) > 0)
    assert np.array_equal(s.images, images[s.index]) and np.array_equal(s.labels, labels[s.index])
    assert np.all(s.repeat == 1) and set(s.group) == {"uniform"}
    assert np.array_equal(s.expanded_indices(), np.arange(50))
    again = build_subset(images, labels, spec)
    assert np.array_equal(again.index, s.index) and np.array_equal(again.images, s.images)
    other = build_subset(images, labels, {**spec, "seed": 4})
    assert not np.array_equal(other.index, s.index)


def test_subset_command_draws_a_uniform_subset_disjoint_from_others(tmp_path):
    """`pipeline subset --disjoint-from` (the subset rule's command): the new subset holds none of the
    named subsets' source indices; without them a spec that names `disjoint_from` is refused; and with no
    exclusion the draw is the plain uniform draw, so existing subsets keep their images."""
    import json

    from pipeline.cli import main

    dataset = json.dumps({"source": "digits", "resolution": 8})
    first = tmp_path / "a.parquet"
    main(["subset", "--dataset", dataset, "--spec", json.dumps({"kind": "uniform", "n": 600, "seed": 0}), "--out", str(first)])
    spec = {"kind": "uniform", "n": 600, "seed": 0, "disjoint_from": ["a"]}
    main(["subset", "--dataset", dataset, "--spec", json.dumps(spec), "--disjoint-from", str(first),
          "--out", str(tmp_path / "b.parquet")])
    a, b = read_subset(first).index, read_subset(tmp_path / "b.parquet").index
    assert len(b) == 600 and not set(a) & set(b)
    with pytest.raises(ValueError, match=r"disjoint from \['a'\]"):
        main(["subset", "--dataset", dataset, "--spec", json.dumps(spec), "--out", str(tmp_path / "c.parquet")])
    images, labels = load_source({"source": "digits", "resolution": 8})
    plain = np.sort(np.random.default_rng(0).choice(len(labels), size=600, replace=False))
    assert np.array_equal(a, plain)
    with pytest.raises(ValueError, match="only 597 of the dataset's 1797"):
        build_subset(images, labels, {"kind": "uniform", "n": 1200, "seed": 1, "disjoint_from": ["a", "b"]},
                     np.concatenate([a, b]))


def test_uniform_subset_too_large():
    images, labels = _toy(20)
    with pytest.raises(ValueError, match="n=21"):
        build_subset(images, labels, {"kind": "uniform", "n": 21, "seed": 0})


def test_unknown_kind():
    images, labels = _toy(20)
    with pytest.raises(ValueError, match="repetition, uniform"):
        build_subset(images, labels, {"kind": "weird", "seed": 0})


def test_repetition_subset():
    images, labels = _toy(300)
    spec = {"kind": "repetition", "repeated_classes": [0, 1], "per_class": 5, "repeats": 4, "others": 40, "seed": 7}
    s = build_subset(images, labels, spec)
    rep = s.group == "repeated"
    non = s.group == "non_repeated"
    assert rep.sum() == 10 and non.sum() == 40 and len(s) == 50
    assert np.all(s.repeat[rep] == 4) and np.all(s.repeat[non] == 1)
    assert np.bincount(s.labels[rep], minlength=2)[:2].tolist() == [5, 5]
    assert set(s.labels[rep].tolist()) <= {0, 1}
    assert not set(s.labels[non].tolist()) & {0, 1}
    assert np.all(np.diff(s.index) > 0)
    expanded = s.expanded_indices()
    assert len(expanded) == 10 * 4 + 40
    assert np.array_equal(np.bincount(expanded, minlength=len(s)), s.repeat)
    again = build_subset(images, labels, spec)
    assert np.array_equal(again.index, s.index) and np.array_equal(again.group, s.group)


def test_repetition_not_enough_images():
    images, labels = _toy(30)
    with pytest.raises(ValueError, match="per_class=4"):
        build_subset(images, labels, {"kind": "repetition", "repeated_classes": [0], "per_class": 4, "repeats": 2, "others": 0, "seed": 0})


def test_identical_images_collapse():
    images, labels = _toy(40, classes=2)
    # plant copies: 4 == 10 == 30 (class 0) and 7 == 21 (class 1)
    images[10] = images[4]
    images[30] = images[4]
    images[21] = images[7]
    s = build_subset(images, labels, {"kind": "uniform", "n": 40, "seed": 0})
    assert len(s) == 37 and len(s.expanded_indices()) == 40
    for gone in (10, 30, 21):
        assert gone not in s.index
    assert s.repeat[s.index == 4].item() == 3 and s.repeat[s.index == 7].item() == 2
    assert len({img.tobytes() for img in s.images}) == len(s)

    # a copy drawn as "repeated" and another as "non_repeated" merges into one "repeated" row
    images, labels = _toy(40, classes=4)
    images[5] = images[0]  # class 0 (repeated) and class 1 (non-repeated)
    spec = {"kind": "repetition", "repeated_classes": [0], "per_class": 10, "repeats": 3, "others": 30, "seed": 0}
    s = build_subset(images, labels, spec)
    row = s.index == 0
    assert 5 not in s.index
    assert s.group[row].item() == "repeated" and s.repeat[row].item() == 4
    assert len(s) == 39 and len(s.expanded_indices()) == 10 * 3 + 30


def test_subset_round_trip(tmp_path):
    images, labels = _toy(100)
    spec = {"kind": "repetition", "repeated_classes": [2], "per_class": 3, "repeats": 5, "others": 7, "seed": 1}
    s = build_subset(images, labels, spec)
    path = tmp_path / "sub" / "subset.parquet"
    write_subset(path, s, {"spec": "x"})
    back = read_subset(path)
    assert isinstance(back, Subset)
    for name in ("images", "labels", "index", "repeat", "group"):
        assert np.array_equal(getattr(back, name), getattr(s, name)), name
    assert back.index.dtype == np.int64 and back.repeat.dtype == np.int64
    assert pq.read_schema(path).metadata[b"spec"] == b"x"


def test_read_subset_missing_columns(tmp_path):
    path = tmp_path / "bad.parquet"
    write_image_table(path, np.zeros((2, 4, 4, 1), np.uint8), {"index": pa.array([0, 1])}, {})
    with pytest.raises(CorruptFileError, match="repeat"):
        read_subset(path)


# ---------------------------------------------------------------- fetch


def test_known_files_cifar():
    entry = KNOWN_FILES["cifar10"]
    assert entry["dest"] == "cifar-10-python.tar.gz" and len(entry["md5"]) == 32


def test_fetch_file_url(tmp_path):
    src = tmp_path / "src.bin"
    payload = bytes(range(256)) * 1000
    src.write_bytes(payload)
    md5 = hashlib.md5(payload).hexdigest()
    sha = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "out" / "file.bin"
    assert fetch(src.as_uri(), dest, md5=md5, sha256=sha) == dest
    assert dest.read_bytes() == payload
    verify(dest, md5=md5, sha256=sha)
    # an existing verified file is kept without touching the source
    src.unlink()
    fetch(src.as_uri(), dest, md5=md5)
    assert dest.read_bytes() == payload
    assert [p.name for p in dest.parent.iterdir()] == ["file.bin"]


def test_fetch_wrong_checksum_leaves_nothing(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello")
    dest = tmp_path / "out" / "file.bin"
    wrong = "0" * 32
    with pytest.raises(ChecksumError) as info:
        fetch(src.as_uri(), dest, md5=wrong)
    msg = str(info.value)
    assert str(dest) in msg and wrong in msg and hashlib.md5(b"hello").hexdigest() in msg
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_fetch_replaces_stale_file(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"good")
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"stale")
    fetch(src.as_uri(), dest, sha256=hashlib.sha256(b"good").hexdigest())
    assert dest.read_bytes() == b"good"


def test_fetch_unreachable(tmp_path):
    dest = tmp_path / "cifar-10-python.tar.gz"
    md5 = KNOWN_FILES["cifar10"]["md5"]
    with pytest.raises(FetchError) as info:
        fetch("http://127.0.0.1:9/x", dest, md5=md5, timeout=5)
    msg = str(info.value)
    assert str(dest) in msg and "http://127.0.0.1:9/x" in msg and "offline" in msg and md5 in msg
    assert not isinstance(info.value, ChecksumError)
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_verify_mismatch(tmp_path):
    f = tmp_path / "a"
    f.write_bytes(b"abc")
    verify(f)
    verify(f, sha256=hashlib.sha256(b"abc").hexdigest().upper())
    with pytest.raises(ChecksumError, match=str(f)):
        verify(f, sha256="f" * 64)


def test_lpips_backbones_are_known_by_their_torchvision_hash_prefix():
    for key in ("lpips-vgg", "lpips-alex"):
        entry = KNOWN_FILES[key]
        assert entry["sha256_prefix"] in entry["dest"] and entry["url"].endswith(entry["dest"])


def test_fetch_with_sha256_prefix(tmp_path):
    """torchvision's convention: the file name carries the first hex digits of its sha256."""
    payload = b"backbone weights" * 100
    prefix = hashlib.sha256(payload).hexdigest()[:8]
    src = tmp_path / f"net-{prefix}.pth"
    src.write_bytes(payload)
    dest = tmp_path / "weights" / src.name
    assert fetch(src.as_uri(), dest, sha256_prefix=prefix) == dest
    verify(dest, sha256_prefix=prefix.upper())
    with pytest.raises(ChecksumError, match=f"expected {'0' * 8}..."):
        verify(dest, sha256_prefix="0" * 8)
    bad = tmp_path / "weights2" / "x.pth"
    with pytest.raises(ChecksumError):
        fetch(src.as_uri(), bad, sha256_prefix="deadbeef")
    assert not bad.exists()
    with pytest.raises(FetchError, match="sha256 starting deadbeef"):
        fetch("http://127.0.0.1:9/x", tmp_path / "y.pth", sha256_prefix="deadbeef", timeout=5)


# ---------------------------------------------------------------- image-prompt pairs

TEMPLATES = ["a handwritten digit {name}", "the number {digit}, written by hand"]


def test_captioned_digits_carry_their_class_in_the_prompt():
    source = load_captioned({"source": "digits", "resolution": 8, "caption_templates": TEMPLATES})
    images, labels = load_source({"source": "digits", "resolution": 8})
    assert len(source) == len(images) and np.array_equal(source.labels, labels)
    assert source.prompts[0] == f"a handwritten digit {DIGIT_NAMES[labels[0]]}"
    assert source.prompts[1] == f"the number {labels[1]}, written by hand"
    np.testing.assert_array_equal(source.read(np.array([5, 2])), images[[5, 2]])
    with pytest.raises(ValueError, match="caption_templates"):
        load_captioned({"source": "digits"})
    with pytest.raises(ValueError, match="has no captions"):
        load_captioned({"source": "cifar10", "archive": "x"})


def test_text_memorization_subset_from_one_source(tmp_path):
    """n pairs seen `repeats` times, extra_ratio x n others seen once, never a memorized one again."""
    source = load_captioned({"source": "digits", "resolution": 8, "caption_templates": TEMPLATES})
    spec = {"kind": "text_memorization", "n": 20, "repeats": 10, "extra_ratio": 3, "seed": 4}
    subset = build_text_subset(source, source, spec, same_source=True)
    mem, ext = subset.group == "memorized", subset.group == "extra"
    assert (mem.sum(), ext.sum()) == (20, 60) and len(subset.expanded_indices()) == 20 * 10 + 60
    assert set(subset.repeat[mem]) == {10} and set(subset.repeat[ext]) == {1}
    assert not set(subset.index[mem]) & set(subset.index[ext])
    for i in range(len(subset)):  # each row is its source pair: image, class and prompt
        j = subset.index[i]
        assert subset.prompts[i] == source.prompts[j] and subset.labels[i] == source.labels[j]
        np.testing.assert_array_equal(subset.images[i], source.read([j])[0])
    write_subset(tmp_path / "t.parquet", subset)
    back = read_subset(tmp_path / "t.parquet")
    assert list(back.prompts) == list(subset.prompts) and np.array_equal(back.images, subset.images)
    again = build_text_subset(source, source, spec, same_source=True)
    assert np.array_equal(again.index, subset.index)
    for ratio in (4, 5):
        assert (build_text_subset(source, source, {**spec, "extra_ratio": ratio}, True).group == "extra").sum() == 20 * ratio
    with pytest.raises(ValueError, match="extra pairs"):
        build_text_subset(source, source, {**spec, "n": 500, "extra_ratio": 3}, True)
    assert read_subset_prompts_absent(tmp_path)


def test_text_memorization_subset_lists_held_out_prompts(tmp_path):
    """Prompts to sample beside the set's own: of pairs outside it, with text it never trained on."""
    source = load_captioned({"source": "digits", "resolution": 8, "caption_templates": TEMPLATES})
    spec = {"kind": "text_memorization", "n": 2, "repeats": 10, "extra_ratio": 1, "seed": 0, "held_out_prompts": 3}
    subset = build_text_subset(source, source, spec, same_source=True)
    assert len(subset.held_out_prompts) == 3 and len(set(subset.held_out_prompts)) == 3
    assert not set(subset.held_out_prompts) & set(subset.prompts)
    assert set(subset.held_out_prompts) <= set(source.prompts)
    write_subset(tmp_path / "h.parquet", subset)
    assert read_subset(tmp_path / "h.parquet").held_out_prompts == subset.held_out_prompts
    assert build_text_subset(source, source, {**spec, "held_out_prompts": 0}, True).held_out_prompts == []
    with pytest.raises(ValueError, match="held_out_prompts asks for 40"):  # digits x 2 templates: 20 texts at most
        build_text_subset(source, source, {**spec, "held_out_prompts": 40}, True)


def read_subset_prompts_absent(tmp_path) -> bool:
    """A class-image subset has no prompt column and reads back without prompts."""
    images, labels = load_source({"source": "digits", "resolution": 8})
    write_subset(tmp_path / "u.parquet", build_subset(images, labels, {"kind": "uniform", "n": 4, "seed": 0}))
    return read_subset(tmp_path / "u.parquet").prompts is None


def _png(path, size, colour):
    from PIL import Image

    Image.new("RGB", size, colour).save(path)


def test_pairs_folder_is_read_resized_and_centre_cropped(tmp_path):
    import json

    from PIL import Image

    d = tmp_path / "pairs"
    d.mkdir()
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 10:30] = 255  # the centre square of a 40 x 20 image is all white, the sides black
    Image.fromarray(img).save(d / "wide.png")
    _png(d / "small.png", (4, 4), (10, 20, 30))
    (d / "metadata.jsonl").write_text(json.dumps({"file_name": "wide.png", "text": "a white square"}) + "\n\n"
                                      + json.dumps({"file_name": "small.png", "text": "a dark tile"}) + "\n")
    source = load_captioned({"source": "pairs", "dir": str(d), "resolution": 8})
    assert source.prompts == ["a white square", "a dark tile"] and list(source.labels) == [-1, -1]
    out = source.read([0, 1])
    assert out.shape == (2, 8, 8, 3) and out.dtype == np.uint8
    # the crop keeps the centre square only (bilinear resizing blends its outermost columns a little)
    assert out[0, :, 1:7].min() == 255 and out[0].min() > 200
    assert (out[1] == [10, 20, 30]).all()
    assert resize_center_crop(Image.fromarray(img), 8).shape == (8, 8, 3)
    (d / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "x"}\n')
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_captioned({"source": "pairs", "dir": str(d), "resolution": 8}).read([0])
    (d / "bad.png").write_bytes(b"not an image")
    (d / "metadata.jsonl").write_text('{"file_name": "bad.png", "text": "x"}\n{"file": 1}\n')
    with pytest.raises(CorruptFileError, match="metadata.jsonl:2"):
        load_captioned({"source": "pairs", "dir": str(d)})
    (d / "metadata.jsonl").write_text('{"file_name": "bad.png", "text": "x"}\n')
    with pytest.raises(CorruptFileError, match="bad.png"):
        load_captioned({"source": "pairs", "dir": str(d), "resolution": 8}).read([0])
    (d / "metadata.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        load_captioned({"source": "pairs", "dir": str(d)})


def test_coco_captions_first_annotation_per_image_in_id_order(tmp_path):
    import json

    images_dir = tmp_path / "train2017"
    images_dir.mkdir()
    for name, colour in (("b.jpg", (200, 0, 0)), ("a.jpg", (0, 0, 200))):
        _png(images_dir / name, (16, 12), colour)
    captions = {"images": [{"id": 9, "file_name": "b.jpg"}, {"id": 3, "file_name": "a.jpg"}, {"id": 5, "file_name": "x.jpg"}],
                "annotations": [{"id": 40, "image_id": 9, "caption": "A red  card.\n"},
                                {"id": 12, "image_id": 3, "caption": "second caption"},
                                {"id": 11, "image_id": 3, "caption": "A blue card."}]}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    cfg = {"source": "coco2017", "images_dir": str(images_dir), "captions_file": str(tmp_path / "captions.json"),
           "resolution": 8}
    source = load_captioned(cfg)
    assert source.prompts == ["A blue card.", "A red card."]  # image 3 then 9; image 5 has no caption
    out = source.read([0, 1])
    assert out.shape == (2, 8, 8, 3) and out[0, 4, 4, 2] > 150 and out[1, 4, 4, 0] > 150
    (tmp_path / "captions.json").write_text("{}")
    with pytest.raises(CorruptFileError, match="not a COCO captions file"):
        load_captioned(cfg)
    with pytest.raises(FileNotFoundError, match="fetch_coco"):
        load_captioned({**cfg, "captions_file": str(tmp_path / "none.json")})


def test_text_memorization_subset_from_two_sources(tmp_path):
    """The study's layout: memorized pairs from one collection, extras from COCO; `index` is the row
    in each pair's own source and the group says which source that is."""
    import json

    d = tmp_path / "pairs"
    d.mkdir()
    for i in range(3):
        _png(d / f"{i}.png", (8, 8), (i * 50, 0, 0))
    (d / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"pair {i}"}) + "\n"
                                              for i in range(3)))
    pairs = load_captioned({"source": "pairs", "dir": str(d), "resolution": 8})
    extra_images = np.stack([np.full((8, 8, 3), 200 + i, np.uint8) for i in range(5)])
    from pipeline.data import CaptionedSource

    extra = CaptionedSource([f"coco {i}" for i in range(5)], np.full(5, -1), lambda idx: extra_images[np.asarray(idx)])
    subset = build_text_subset(pairs, extra, {"n": 2, "repeats": 10, "extra_ratio": 2, "seed": 0}, same_source=False)
    assert list(subset.group) == ["memorized", "memorized", "extra", "extra", "extra", "extra"]
    for i, p in enumerate(subset.prompts):
        assert p == (f"pair {subset.index[i]}" if i < 2 else f"coco {subset.index[i]}")


def test_subset_command_builds_a_text_memorization_set(tmp_path):
    """`pipeline subset` (the subset rule's command) with a text_memorization spec and an extra dataset."""
    import json

    from pipeline.cli import main

    dataset = {"source": "digits", "resolution": 8, "caption_templates": TEMPLATES}
    spec = {"kind": "text_memorization", "n": 5, "repeats": 10, "extra_ratio": 4, "seed": 1}
    assert main(["subset", "--dataset", json.dumps(dataset), "--spec", json.dumps(spec),
                 "--out", str(tmp_path / "t.parquet")]) in (None, 0)
    subset = read_subset(tmp_path / "t.parquet")
    assert (subset.group == "memorized").sum() == 5 and (subset.group == "extra").sum() == 20
    assert all("digit" in p or "number" in p for p in subset.prompts)


@pytest.mark.parametrize("resolution", [16, 32])
def test_digits_upscaling_equals_torch_bilinear(resolution):
    """Digits are upscaled without torch (scipy's zoom), to the same pixels as torch's bilinear
    interpolation with align_corners=False, which produced them before."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits as sk_load_digits

    images, labels = load_source({"source": "digits", "resolution": resolution})
    x = torch.from_numpy(sk_load_digits().images.astype(np.float64) * (255.0 / 16.0)).unsqueeze(1)
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=False)
    expected = torch.round(x).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert images.shape == (1797, resolution, resolution, 1) and np.array_equal(images, expected)


def test_digits_read_without_sklearn_equal_load_digits():
    from sklearn.datasets import load_digits as sk_load_digits

    from pipeline.data.sources import _sklearn_digits

    pixels, target = _sklearn_digits()
    bunch = sk_load_digits()
    assert np.array_equal(pixels, bunch.images) and np.array_equal(target, bunch.target)
