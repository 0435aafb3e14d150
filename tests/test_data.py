"""Datasets: generated ones (MNIST-1D, digits) and readers for MNIST / CIFAR-10 files on disk.

The file readers are tested on tiny files written here in the official formats, so the tests need
neither the real datasets nor a network connection.
"""

from __future__ import annotations

import gzip
import pickle
import random
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bnn_align import data
from bnn_align.data import DataSplit

# ---------------------------------------------------------------------------------------------
# MNIST-1D
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist1d_std() -> DataSplit:
    return data.mnist1d()


@pytest.fixture(scope="module")
def mnist1d_raw() -> DataSplit:
    return data.mnist1d(standardize=False)


def test_mnist1d_shapes_dtypes_labels(mnist1d_std: DataSplit) -> None:
    s = mnist1d_std
    assert s.name == "mnist1d" and s.num_classes == 10
    assert s.x_train.shape == (4000, 40) and s.x_test.shape == (1000, 40)
    assert s.y_train.shape == (4000,) and s.y_test.shape == (1000,)
    assert s.x_train.dtype == s.x_test.dtype == torch.float32
    assert s.y_train.dtype == s.y_test.dtype == torch.int64
    assert s.input_shape == (40,)
    for y in (s.y_train, s.y_test):
        assert set(y.tolist()) == set(range(10))
    x, y = s.train
    assert x is s.x_train and y is s.y_train
    assert s.test[0] is s.x_test and s.test[1] is s.y_test


def test_mnist1d_default_is_the_packages_standard_dataset(mnist1d_raw: DataSplit) -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    ref = make_dataset(get_dataset_args())  # seed 42, 5000 samples, 80 % train
    np.testing.assert_array_equal(mnist1d_raw.x_train.numpy(), ref["x"].astype(np.float32))
    np.testing.assert_array_equal(mnist1d_raw.x_test.numpy(), ref["x_test"].astype(np.float32))
    np.testing.assert_array_equal(mnist1d_raw.y_train.numpy(), ref["y"])
    np.testing.assert_array_equal(mnist1d_raw.y_test.numpy(), ref["y_test"])
    # Pinned so a change in the generator (package or numpy upgrade) is noticed.
    assert mnist1d_raw.y_train[:20].tolist() == [2, 6, 4, 5, 6, 6, 6, 0, 3, 1,
                                                 6, 9, 4, 3, 4, 5, 1, 9, 0, 3]
    assert mnist1d_raw.y_test[:10].tolist() == [2, 6, 3, 9, 4, 3, 1, 9, 5, 2]


def test_mnist1d_standardized_with_train_statistics_only(mnist1d_std: DataSplit,
                                                         mnist1d_raw: DataSplit) -> None:
    assert abs(mnist1d_std.x_train.mean().item()) < 1e-5
    assert abs(mnist1d_std.x_train.std(correction=0).item() - 1) < 1e-5
    raw_train = mnist1d_raw.x_train.double()
    mean, std = raw_train.mean(), raw_train.std(correction=0)
    expected_test = (mnist1d_raw.x_test.double() - mean) / std
    torch.testing.assert_close(mnist1d_std.x_test.double(), expected_test, atol=1e-5, rtol=0)
    # Test-set statistics must not enter: the test split is not exactly centred by them.
    assert abs(mnist1d_std.x_test.mean().item()) > 1e-4
    assert torch.equal(mnist1d_std.y_test, mnist1d_raw.y_test)


def test_mnist1d_deterministic_per_seed() -> None:
    a = data.mnist1d(seed=3, num_train=80, num_test=20)
    b = data.mnist1d(seed=3, num_train=80, num_test=20)
    c = data.mnist1d(seed=4, num_train=80, num_test=20)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.x_train, c.x_train)


def test_mnist1d_channel_axis() -> None:
    flat = data.mnist1d(seed=1, num_train=40, num_test=10)
    chan = data.mnist1d(seed=1, num_train=40, num_test=10, channel_axis=True)
    assert chan.x_train.shape == (40, 1, 40) and chan.x_test.shape == (10, 1, 40)
    assert chan.input_shape == (1, 40)
    assert torch.equal(chan.x_train[:, 0], flat.x_train)


def test_mnist1d_exact_sizes_where_float_split_would_round_down() -> None:
    # int(110 * (7 / 110)) == 6: the package's own split would be one example short.
    s = data.mnist1d(num_train=7, num_test=103)
    assert len(s.y_train) == 7 and len(s.y_test) == 103


def test_mnist1d_leaves_global_rng_untouched() -> None:
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.rand(), random.random())
    np.random.seed(123)
    random.seed(123)
    data.mnist1d(num_train=10, num_test=10)
    assert (np.random.rand(), random.random()) == expected


@pytest.mark.parametrize("kwargs, arg", [
    ({"num_train": 0}, "num_train"),
    ({"num_train": -10}, "num_train"),
    ({"num_test": 0}, "num_test"),
    ({"num_train": 2.5}, "num_train"),
    ({"num_train": 13, "num_test": 5}, "multiple of 10"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**32}, "seed"),
])
def test_mnist1d_bad_arguments(kwargs: dict, arg: str) -> None:
    with pytest.raises(ValueError, match=arg):
        data.mnist1d(**kwargs)


def test_mnist1d_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match=r"pip install mnist1d.*bnn_align\[data\]"):
        data.mnist1d(num_train=10, num_test=10)


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------


def test_digits_shapes_and_raw_range() -> None:
    s = data.digits(standardize=False)
    assert s.name == "digits" and s.num_classes == 10
    assert len(s.y_train) + len(s.y_test) == 1797
    assert s.x_train.shape == (len(s.y_train), 64) and s.x_test.shape[1:] == (64,)
    assert abs(len(s.y_test) - 0.2 * 1797) <= 1
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    both = torch.cat([s.x_train, s.x_test])
    assert both.min().item() == 0 and both.max().item() == 16
    assert torch.equal(both, both.round())  # raw pixel counts, untouched


def test_digits_stratified() -> None:
    s = data.digits(test_fraction=0.3, standardize=False)
    train = torch.bincount(s.y_train, minlength=10).double() / len(s.y_train)
    test = torch.bincount(s.y_test, minlength=10).double() / len(s.y_test)
    assert (train - test).abs().max().item() < 0.01


def test_digits_deterministic_per_seed() -> None:
    a, b, c = data.digits(seed=5), data.digits(seed=5), data.digits(seed=6)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)


def test_digits_image_and_standardize() -> None:
    raw = data.digits(image=True, standardize=False)
    std = data.digits(image=True)
    assert raw.x_train.shape == (len(raw.y_train), 1, 8, 8) and raw.input_shape == (1, 8, 8)
    assert abs(std.x_train.mean().item()) < 1e-5
    assert abs(std.x_train.std(correction=0).item() - 1) < 1e-5
    mean, sd = raw.x_train.double().mean(), raw.x_train.double().std(correction=0)
    torch.testing.assert_close(std.x_test.double(), (raw.x_test.double() - mean) / sd,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs, arg", [
    ({"test_fraction": 0.0}, "test_fraction"),
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"test_fraction": -0.2}, "test_fraction"),
    ({"test_fraction": float("nan")}, "test_fraction"),
    ({"test_fraction": 0.001}, "test_fraction"),  # 2 test examples cannot hold 10 classes
    ({"seed": -3}, "seed"),
])
def test_digits_bad_arguments(kwargs: dict, arg: str) -> None:
    with pytest.raises(ValueError, match=arg):
        data.digits(**kwargs)


def test_digits_missing_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="scikit-learn"):
        data.digits()


# ---------------------------------------------------------------------------------------------
# MNIST IDX files
# ---------------------------------------------------------------------------------------------

MNIST_NAMES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
               "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array, written independently of the reader under test."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def mnist_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x_train": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
            "y_train": rng.integers(0, 10, 12, dtype=np.uint8),
            "x_test": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
            "y_test": rng.integers(0, 10, 5, dtype=np.uint8)}


def write_mnist(directory: Path, arrays: dict[str, np.ndarray], *, gz: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for key, name in MNIST_NAMES.items():
        payload = idx_bytes(arrays[key])
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (directory / name).write_bytes(payload)


@pytest.mark.parametrize("subdir, gz", [("", False), ("", True), ("MNIST/raw", True),
                                        ("MNIST/raw", False)])
def test_load_mnist_exact_values(tmp_path: Path, mnist_arrays: dict, subdir: str,
                                 gz: bool) -> None:
    write_mnist(tmp_path / subdir, mnist_arrays, gz=gz)
    s = data.load_mnist(tmp_path, standardize=False)
    assert s.name == "mnist" and s.num_classes == 10
    assert s.x_train.shape == (12, 1, 28, 28) and s.x_test.shape == (5, 1, 28, 28)
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    expected = mnist_arrays["x_train"][:, None].astype(np.float32) / 255
    np.testing.assert_array_equal(s.x_train.numpy(), expected)
    np.testing.assert_array_equal(s.x_test.numpy()[:, 0] * 255,
                                  mnist_arrays["x_test"].astype(np.float32))
    assert s.y_train.tolist() == mnist_arrays["y_train"].tolist()
    assert s.y_test.tolist() == mnist_arrays["y_test"].tolist()
    assert s.x_train.min() >= 0 and s.x_train.max() <= 1


def test_load_mnist_flatten_and_standardize(tmp_path: Path, mnist_arrays: dict) -> None:
    write_mnist(tmp_path, mnist_arrays, gz=False)
    flat = data.load_mnist(str(tmp_path), flatten=True, standardize=False)
    assert flat.x_train.shape == (12, 784) and flat.x_test.shape == (5, 784)
    np.testing.assert_array_equal(flat.x_train[3].numpy(),
                                  mnist_arrays["x_train"][3].reshape(-1) / np.float32(255))
    std = data.load_mnist(tmp_path, flatten=True)
    train = mnist_arrays["x_train"].astype(np.float64) / 255
    test = mnist_arrays["x_test"].reshape(5, -1).astype(np.float64) / 255
    np.testing.assert_allclose(std.x_test.numpy(), (test - train.mean()) / train.std(),
                               atol=1e-5)
    assert abs(std.x_train.mean().item()) < 1e-5


@pytest.mark.parametrize("damage", ["magic", "dtype", "truncated", "padded", "labels_range",
                                    "label_count", "bad_gzip"])
def test_load_mnist_corrupt_file_names_it(tmp_path: Path, mnist_arrays: dict,
                                          damage: str) -> None:
    write_mnist(tmp_path, mnist_arrays, gz=False)
    target = tmp_path / MNIST_NAMES["y_train" if damage.startswith("label") else "x_train"]
    payload = bytearray(target.read_bytes())
    if damage == "magic":
        payload[0] = 1
    elif damage == "dtype":
        payload[2] = 0x0D  # float
    elif damage == "truncated":
        del payload[-1]
    elif damage == "padded":
        payload += b"\0"
    elif damage == "labels_range":
        payload[-1] = 10
    elif damage == "label_count":
        payload = bytearray(idx_bytes(mnist_arrays["y_train"][:-1]))
    elif damage == "bad_gzip":
        target.unlink()
        target = target.with_name(target.name + ".gz")
        payload = bytearray(b"\x1f\x8b not really gzip")
    target.write_bytes(bytes(payload))
    with pytest.raises(ValueError, match=target.name):
        data.load_mnist(tmp_path)


def test_load_mnist_missing_file(tmp_path: Path, mnist_arrays: dict) -> None:
    write_mnist(tmp_path, mnist_arrays, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        data.load_mnist(tmp_path)
    message = str(info.value)
    assert str(Path("MNIST", "raw", "t10k-labels-idx1-ubyte.gz")) in message


# ---------------------------------------------------------------------------------------------
# CIFAR-10 batches
# ---------------------------------------------------------------------------------------------

CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


@pytest.fixture
def cifar_batches() -> dict[str, dict[bytes, object]]:
    rng = np.random.default_rng(1)
    return {name: {b"batch_label": name.encode(),
                   b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
                   b"labels": rng.integers(0, 10, 3).tolist()}
            for name in CIFAR_BATCHES}


def write_cifar(directory: Path, batches: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, batch in batches.items():
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f)


def cifar_images(rows: np.ndarray) -> np.ndarray:
    """(N, 3072) CIFAR rows -> (N, 3, 32, 32) by explicit index arithmetic, not reshape."""
    c, r, k = np.ix_(range(3), range(32), range(32))
    return rows[:, c * 1024 + r * 32 + k]


@pytest.mark.parametrize("subdir", ["", "cifar-10-batches-py"])
def test_load_cifar10_exact_values(tmp_path: Path, cifar_batches: dict, subdir: str) -> None:
    cifar_batches["data_batch_1"][b"data"][0, 1024 + 5 * 32 + 7] = 200  # green, row 5, col 7
    write_cifar(tmp_path / subdir, cifar_batches)
    s = data.load_cifar10(tmp_path, standardize=False)
    assert s.name == "cifar10" and s.num_classes == 10
    assert s.x_train.shape == (15, 3, 32, 32) and s.x_test.shape == (3, 3, 32, 32)
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    assert s.x_train[0, 1, 5, 7].item() == pytest.approx(200 / 255)
    train_rows = np.concatenate([cifar_batches[n][b"data"] for n in CIFAR_BATCHES[:5]])
    np.testing.assert_array_equal(s.x_train.numpy() * 255, cifar_images(train_rows))
    np.testing.assert_array_equal(s.x_test.numpy() * 255,
                                  cifar_images(cifar_batches["test_batch"][b"data"]))
    assert s.y_train.tolist() == sum((cifar_batches[n][b"labels"] for n in CIFAR_BATCHES[:5]), [])
    assert s.y_test.tolist() == cifar_batches["test_batch"][b"labels"]


def test_load_cifar10_per_channel_standardization(tmp_path: Path, cifar_batches: dict) -> None:
    write_cifar(tmp_path, cifar_batches)
    raw = data.load_cifar10(tmp_path, standardize=False)
    std = data.load_cifar10(tmp_path)
    train = raw.x_train.double()
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    sd = train.std(dim=(0, 2, 3), keepdim=True, correction=0)
    torch.testing.assert_close(std.x_test.double(), (raw.x_test.double() - mean) / sd,
                               atol=1e-5, rtol=0)
    per_channel = std.x_train.double()
    assert per_channel.mean(dim=(0, 2, 3)).abs().max().item() < 1e-5
    assert (per_channel.std(dim=(0, 2, 3), correction=0) - 1).abs().max().item() < 1e-5


def test_load_cifar10_missing_batch(tmp_path: Path, cifar_batches: dict) -> None:
    write_cifar(tmp_path, cifar_batches)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        data.load_cifar10(tmp_path)


@pytest.mark.parametrize("damage", ["data_length", "data_dtype", "label_count", "label_range",
                                    "no_labels", "not_a_dict", "not_a_pickle"])
def test_load_cifar10_malformed_batch_names_it(tmp_path: Path, cifar_batches: dict,
                                               damage: str) -> None:
    batch = cifar_batches["data_batch_4"]
    if damage == "data_length":
        batch[b"data"] = batch[b"data"][:, :3000]
    elif damage == "data_dtype":
        batch[b"data"] = batch[b"data"].astype(np.float32)
    elif damage == "label_count":
        batch[b"labels"] = batch[b"labels"][:2]
    elif damage == "label_range":
        batch[b"labels"][0] = 10
    elif damage == "no_labels":
        del batch[b"labels"]
    elif damage == "not_a_dict":
        cifar_batches["data_batch_4"] = [batch[b"data"], batch[b"labels"]]
    write_cifar(tmp_path, cifar_batches)
    if damage == "not_a_pickle":
        (tmp_path / "data_batch_4").write_bytes(b"definitely not a pickle")
    with pytest.raises(ValueError, match="data_batch_4"):
        data.load_cifar10(tmp_path)


# ---------------------------------------------------------------------------------------------
# DataSplit
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_split() -> DataSplit:
    return data.digits(standardize=False)


def test_subset_sizes_and_contents(small_split: DataSplit) -> None:
    sub = small_split.subset(10, 4)
    assert sub.x_train.shape == (10, 64) and sub.x_test.shape == (4, 64)
    assert torch.equal(sub.x_train, small_split.x_train[:10])
    assert torch.equal(sub.y_test, small_split.y_test[:4])
    assert sub.name == small_split.name and sub.num_classes == 10
    only_train = small_split.subset(num_train=len(small_split.y_train))
    assert len(only_train.y_train) == len(small_split.y_train)
    assert len(only_train.y_test) == len(small_split.y_test)
    assert len(small_split.subset(num_test=1).y_test) == 1


@pytest.mark.parametrize("kwargs, arg", [
    ({"num_train": 0}, "num_train"), ({"num_train": -1}, "num_train"),
    ({"num_train": 10_000}, "num_train"), ({"num_test": 10_000}, "num_test"),
    ({"num_test": 2.0}, "num_test"), ({"num_train": True}, "num_train"),
])
def test_subset_bad_sizes(small_split: DataSplit, kwargs: dict, arg: str) -> None:
    with pytest.raises(ValueError, match=arg):
        small_split.subset(**kwargs)


def test_datasplit_validates_and_is_frozen(small_split: DataSplit) -> None:
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="y_test"):
        DataSplit(x, y, x, y[:3], num_classes=2, name="toy")
    with pytest.raises(ValueError, match="y_train"):
        DataSplit(x, y + 2, x, y, num_classes=2, name="toy")
    with pytest.raises(ValueError, match="x_test"):
        DataSplit(x, y, torch.zeros(4, 5), y, num_classes=2, name="toy")
    with pytest.raises(ValueError, match="x_train"):
        DataSplit(x.double(), y, x, y, num_classes=2, name="toy")
    with pytest.raises(AttributeError):
        small_split.name = "other"  # type: ignore[misc]
    assert repr(small_split).startswith("DataSplit(name='digits', num_train=1437")
