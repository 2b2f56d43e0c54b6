"""Small reference networks and the offline MiniLM loader."""

from .lenet import LeNet5
from .minilm import load_minilm, minilm_path
from .mlp import MLP
from .vit import SmallViT

__all__ = ["MLP", "LeNet5", "SmallViT", "load_minilm", "minilm_path"]
