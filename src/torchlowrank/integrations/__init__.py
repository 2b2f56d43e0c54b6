"""Integrations with other libraries, imported on demand (``import torchlowrank`` imports none of them).

- :mod:`torchlowrank.integrations.hf`: Hugging Face ``Trainer`` callbacks (spectrum tracker,
  regularizer / Q3R, end-of-training truncation) and gradient checkpointing for adapted models.
  Needs ``pip install 'torchlowrank[hf]'``.
"""

import importlib

__all__ = ["hf"]


def __getattr__(name: str):
    if name == "hf":  # lazily, so that `import torchlowrank` never imports transformers
        return importlib.import_module(f"{__name__}.hf")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
