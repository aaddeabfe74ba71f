"""The IDX loader: parsing (gzip and raw), the search order, the cache and every corrupt case.

The parser and error tests run on small IDX files generated into a temporary directory, so they
run everywhere; the checks against the real Fashion-MNIST files run only where those are
installed and are skipped (with the reason) elsewhere.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from engine.tasks import data
from engine.tasks.data import DataCorruptError, DataNotFoundError, find_data_dir, load_fashion_mnist, read_idx

REAL_DIR = data.SYSTEM_DIR
HAVE_REAL = any((REAL_DIR / f"train-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz"))


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic (0, 0, 0x08, ndim), big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def make_split(directory: Path, n: int = 20, gz: bool = True, split: str = "train", seed: int = 0):
    """A tiny, valid split of random images with labels 0..9; returns (images, labels)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    prefix = "train" if split == "train" else "t10k"
    ext = ".gz" if gz else ""
    directory.mkdir(parents=True, exist_ok=True)
    write(directory / f"{prefix}-images-idx3-ubyte{ext}", idx_bytes(images))
    write(directory / f"{prefix}-labels-idx1-ubyte{ext}", idx_bytes(labels))
    return images, labels


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    """No $AUTOLR_DATA and a working directory without ./data, so only the system dir is searched."""
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_generated_split_round_trips(tmp_path, gz):
    images, labels = make_split(tmp_path, gz=gz)
    ds = load_fashion_mnist("train", directory=tmp_path)
    assert np.array_equal(ds.images, images) and np.array_equal(ds.labels, labels)
    assert ds.labels.dtype == np.int64 and len(ds) == 20
    assert not ds.images.flags.writeable and not ds.labels.flags.writeable


def test_cache_returns_same_arrays_until_the_file_changes(tmp_path):
    make_split(tmp_path, seed=1)
    first = load_fashion_mnist("train", directory=tmp_path)
    assert load_fashion_mnist("train", directory=tmp_path) is first
    images, _ = make_split(tmp_path, n=30, seed=2)  # new size -> new identity -> decoded again
    second = load_fashion_mnist("train", directory=tmp_path)
    assert len(second) == 30 and np.array_equal(second.images, images)


def test_search_order_env_then_local_then_system(tmp_path, monkeypatch):
    env_dir, cwd = tmp_path / "env", tmp_path / "cwd"
    make_split(env_dir)
    make_split(cwd / "data")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv(data.DATA_ENV, str(env_dir))
    assert find_data_dir() == env_dir
    monkeypatch.delenv(data.DATA_ENV)
    assert find_data_dir() == Path("data")


def test_env_pointing_at_an_empty_dir_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    with pytest.raises(DataNotFoundError, match="AUTOLR_DATA=.*train-images-idx3-ubyte"):
        find_data_dir()


def test_missing_everywhere_says_how_to_install(tmp_path, monkeypatch, no_env):
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError) as err:
        load_fashion_mnist()
    message = str(err.value)
    for hint in ("make setup", "apt-get install dataset-fashion-mnist", "AUTOLR_DATA"):
        assert hint in message
    assert isinstance(err.value, FileNotFoundError)


def test_unknown_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown Fashion-MNIST split 'validation'"):
        load_fashion_mnist("validation", directory=tmp_path)


def test_labels_file_missing_from_a_directory(tmp_path):
    make_split(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError, match="train-labels-idx1-ubyte"):
        load_fashion_mnist("train", directory=tmp_path)


GOOD = idx_bytes(np.zeros((3, 28, 28), np.uint8))


@pytest.mark.parametrize(
    "payload, problem",
    [
        (b"\x00\x00", "too short"),
        (b"\x08\x03" + GOOD[2:], "bad magic number"),
        (GOOD[:2] + b"\x0d" + GOOD[3:], "type code 0x0d"),
        (GOOD[:-5], "truncated"),
        (GOOD + b"\x00", "trailing data"),
        (GOOD[:10], "header declares 3 dimensions"),
    ],
    ids=["short", "magic", "dtype", "truncated", "trailing", "header"],
)
@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_corrupt_files_are_named(tmp_path, payload, problem, gz):
    path = write(tmp_path / ("f.idx" + (".gz" if gz else "")), payload)
    with pytest.raises(DataCorruptError, match=problem) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_wrong_number_of_dimensions(tmp_path):
    path = write(tmp_path / "labels", idx_bytes(np.zeros((2, 2), np.uint8)))
    with pytest.raises(DataCorruptError, match="2 dimensions, expected 1"):
        read_idx(path, ndim=1)


def test_truncated_gzip_is_named(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(GOOD)[:-12])
    with pytest.raises(DataCorruptError, match="not a valid gzip file") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_images_and_labels_disagree(tmp_path):
    make_split(tmp_path, n=20)
    write(tmp_path / "train-labels-idx1-ubyte.gz", idx_bytes(np.zeros(19, np.uint8)))
    with pytest.raises(DataCorruptError, match="20 images but .* 19 labels"):
        load_fashion_mnist("train", directory=tmp_path)


def test_label_out_of_range(tmp_path):
    make_split(tmp_path, n=20)
    write(tmp_path / "train-labels-idx1-ubyte.gz", idx_bytes(np.full(20, 12, np.uint8)))
    with pytest.raises(DataCorruptError, match="label 12 outside 0..9"):
        load_fashion_mnist("train", directory=tmp_path)


@pytest.mark.skipif(not HAVE_REAL, reason=f"real Fashion-MNIST not installed in {REAL_DIR}")
def test_real_fashion_mnist(no_env):
    """On the real files: sizes, balanced classes, and the search finding the system directory."""
    assert find_data_dir() == REAL_DIR
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
