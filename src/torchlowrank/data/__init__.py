"""Real datasets that install offline (DESIGN §5). Each loader raises ``MissingDataError`` (a
``FileNotFoundError``) with the exact install command when its package is missing."""

from .datasets import (
    ImageData,
    RatingsData,
    TextData,
    load_digits,
    load_fashion_mnist,
    load_mnist_5k,
    load_movielens_100k,
    load_rotten_tomatoes,
)
from .sources import MissingDataError

__all__ = [
    "ImageData",
    "TextData",
    "RatingsData",
    "MissingDataError",
    "load_digits",
    "load_mnist_5k",
    "load_fashion_mnist",
    "load_rotten_tomatoes",
    "load_movielens_100k",
]
