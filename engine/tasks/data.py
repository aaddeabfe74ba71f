"""The Fashion-MNIST loader: IDX files, gzip or raw, found where `make setup` puts them.

Every candidate is trained on these images, so a worker must decode them once and only once: the
decoded arrays are cached in-process by file identity (path, size, mtime), which also means a test
that writes new files into a temporary directory never sees stale arrays. Arrays come back
read-only, so no caller can corrupt the cache for the next one.

Two failure modes get their own error, because they need different fixes: no data at all
(`DataNotFoundError`: install it) and a file that is there but wrong (`DataCorruptError`: delete
and reinstall that file, named in the message).
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DATA_ENV",
    "SYSTEM_DIR",
    "DataCorruptError",
    "DataNotFoundError",
    "FashionMNIST",
    "find_data_dir",
    "load_fashion_mnist",
    "read_idx",
]

DATA_ENV = "AUTOLR_DATA"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
_LOCAL_DIR = Path("data")  # relative to the working directory, as `make setup` sees it

# split -> (images stem, labels stem); each may be stored as `stem` or `stem.gz`.
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_NUM_CLASSES = 10
_IMAGE_SHAPE = (28, 28)
_UBYTE = 0x08  # the IDX type code for unsigned bytes, the only one Fashion-MNIST uses

_INSTALL_HINT = (
    "Install it with `make setup` (or `sudo apt-get install dataset-fashion-mnist`, which puts "
    f"the files in {SYSTEM_DIR}), or download the four *-ubyte.gz files from "
    "https://github.com/zalandoresearch/fashion-mnist into a directory and set "
    f"{DATA_ENV}=/that/directory."
)


class DataNotFoundError(FileNotFoundError):
    """No Fashion-MNIST files where we looked; the message lists the places and how to install."""


class DataCorruptError(ValueError):
    """A data file exists but cannot be decoded; the message names the file and what is wrong."""


@dataclass(frozen=True, eq=False)
class FashionMNIST:
    """One split: uint8 images (N, 28, 28) and int64 labels (N,), both read-only.

    Compared and hashed by identity: the loader hands out one object per file version, so it
    can key the caches of whatever is derived from it.
    """

    images: np.ndarray
    labels: np.ndarray
    directory: Path

    def __len__(self) -> int:
        return len(self.labels)


def _stored_name(directory: Path, stem: str) -> Path | None:
    """The file for `stem` in `directory`, raw preferred over gzip (no decompression needed)."""
    for name in (stem, stem + ".gz"):
        path = directory / name
        if path.is_file():
            return path
    return None


def _has_split(directory: Path, split: str) -> bool:
    return all(_stored_name(directory, stem) is not None for stem in _FILES[split])


def find_data_dir(split: str = "train") -> Path:
    """The first of $AUTOLR_DATA, ./data, /usr/share/datasets/fashion-mnist holding the split.

    A set $AUTOLR_DATA that lacks the files is an error rather than a silent fall-through: the
    user asked for that directory, and quietly training on other data would hide the mistake.
    """
    _check_split(split)
    env = os.environ.get(DATA_ENV)
    if env:
        directory = Path(env).expanduser()
        if _has_split(directory, split):
            return directory
        missing = [s for s in _FILES[split] if _stored_name(directory, s) is None]
        raise DataNotFoundError(
            f"{DATA_ENV}={env} but {directory} has no {' or '.join(missing)} (raw or .gz). "
            f"Point {DATA_ENV} at the directory holding the Fashion-MNIST IDX files, or unset "
            f"it to use ./data or {SYSTEM_DIR}. {_INSTALL_HINT}"
        )
    for directory in (_LOCAL_DIR, SYSTEM_DIR):
        if _has_split(directory, split):
            return directory
    raise DataNotFoundError(
        f"Fashion-MNIST ({split} split: {', '.join(_FILES[split])}, raw or .gz) was not found "
        f"in ${DATA_ENV} (unset), ./data (under {Path.cwd()}) or {SYSTEM_DIR}. {_INSTALL_HINT}"
    )


def _check_split(split: str) -> None:
    if split not in _FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; use one of {sorted(_FILES)}")


def _read_bytes(path: Path) -> bytes:
    """The file's decoded bytes; a gzip that is truncated or damaged is a DataCorruptError."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataCorruptError(
            f"{path}: not a valid gzip file ({err}); it is probably truncated. Delete it and "
            f"reinstall the data. {_INSTALL_HINT}"
        ) from err


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Decode one IDX file (gzip or raw) of unsigned bytes, checking every size it declares.

    IDX layout: two zero bytes, a type code, the number of dimensions, one big-endian uint32 per
    dimension, then the data. `ndim`, when given, is the number of dimensions the caller expects.
    """
    path = Path(path)
    raw = _read_bytes(path)

    def corrupt(what: str) -> DataCorruptError:
        return DataCorruptError(
            f"{path}: {what}. Delete the file and reinstall the data. {_INSTALL_HINT}"
        )

    if len(raw) < 4:
        raise corrupt(f"only {len(raw)} bytes, too short for an IDX header")
    if raw[0] != 0 or raw[1] != 0:
        raise corrupt(f"bad magic number 0x{raw[:4].hex()} (an IDX file starts with 0x0000)")
    if raw[2] != _UBYTE:
        raise corrupt(f"IDX type code 0x{raw[2]:02x}, expected 0x08 (unsigned byte)")
    dims = raw[3]
    if ndim is not None and dims != ndim:
        raise corrupt(f"{dims} dimensions, expected {ndim}")
    header = 4 + 4 * dims
    if len(raw) < header:
        raise corrupt(f"header declares {dims} dimensions but the file ends after {len(raw)} bytes")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=dims, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise corrupt(
            f"header declares shape {shape} ({expected} bytes with the header) but the file has "
            f"{len(raw)} bytes ({'truncated' if len(raw) < expected else 'trailing data'})"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(split: str = "train", directory: str | Path | None = None) -> FashionMNIST:
    """Images and labels of one split, decoded once per process and shared read-only.

    `directory` overrides the search (tests point it at generated files).
    """
    _check_split(split)
    directory = Path(directory) if directory is not None else find_data_dir(split)
    paths = [_stored_name(directory, stem) for stem in _FILES[split]]
    if any(p is None for p in paths):
        missing = [s for s, p in zip(_FILES[split], paths) if p is None]
        raise DataNotFoundError(
            f"{directory} has no {' or '.join(missing)} (raw or .gz). {_INSTALL_HINT}"
        )
    images, labels = (p.resolve() for p in paths)  # type: ignore[union-attr]
    return _load_cached(images, _identity(images), labels, _identity(labels), directory)


def _identity(path: Path) -> tuple[int, int]:
    """What changes when the file is replaced, so the cache never serves a stale decode."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _load_cached(
    images_path: Path,
    _images_id: tuple[int, int],
    labels_path: Path,
    _labels_id: tuple[int, int],
    directory: Path,
) -> FashionMNIST:
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if images.shape[1:] != _IMAGE_SHAPE:
        raise DataCorruptError(f"{images_path}: images are {images.shape[1:]}, expected {_IMAGE_SHAPE}")
    if len(images) != len(labels):
        raise DataCorruptError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
            "labels; one of them is from a different release or damaged. Reinstall the data."
        )
    if len(labels) and int(labels.max()) >= _NUM_CLASSES:
        raise DataCorruptError(f"{labels_path}: label {int(labels.max())} outside 0..{_NUM_CLASSES - 1}")
    labels = labels.astype(np.int64)  # what torch's cross-entropy wants; a copy, so owned
    images.setflags(write=False)  # a view of immutable bytes already; say so explicitly
    labels.setflags(write=False)
    return FashionMNIST(images=images, labels=labels, directory=directory)
