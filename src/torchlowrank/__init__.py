"""torchlowrank: exploit low-rank structure in training and adapting PyTorch neural networks.

The public API is re-exported here; submodules not named below are internal.
"""

__version__ = "0.1.0"

from . import (  # noqa: F401  tlr.data.load_digits, tlr.matrix.complete, tlr.models.SmallViT, ...
    data,
    integrations,  # tlr.integrations.hf (imports transformers only when accessed)
    matrix,
    models,
    optim,
)
from .adapters import (
    AdapterBaseMismatchWarning,
    AdapterNotCalledWarning,
    DeepLoRAConfig,
    GeoLoRAConfig,
    LoRAConfig,
    NormBuffersNotSavedWarning,
    adapt,
    adapter_param_groups,
    adapter_ranks,
    export_peft,
    geolora_optimizer,
    init_compressed,
    load_adapter,
    merge,
    print_trainable_parameters,
    rebalance_ranks,
    save_adapter,
)
from .compress import CompressionReport, count_parameters, factorize, rank_for_fraction, truncate
from .diagnostics import SpectrumTracker, compare_weights, load_weights, weights_spectrum
from .factorized import FactorizedConv2d, FactorizedLinear, factorize_ab
from .layers import LowRankConv2d, LowRankLinear
from .linalg import orthogonal_init, orthonormal_basis, principal_angles, randomized_svd, truncated_svd
from .ranks import SpectrumTable, effective_rank, numerical_rank, singular_values, spectrum, stable_rank
from .regularizers import Q3R, NuclearNorm
from .report import load_result, write_report
from .results import Plot, Result, Series, Table

__all__ = [
    "__version__",
    "truncated_svd",
    "randomized_svd",
    "orthonormal_basis",
    "orthogonal_init",
    "principal_angles",
    "stable_rank",
    "effective_rank",
    "numerical_rank",
    "singular_values",
    "spectrum",
    "SpectrumTable",
    "LowRankLinear",
    "LowRankConv2d",
    "FactorizedLinear",
    "FactorizedConv2d",
    "factorize_ab",
    "optim",
    "factorize",
    "truncate",
    "count_parameters",
    "rank_for_fraction",
    "CompressionReport",
    "LoRAConfig",
    "DeepLoRAConfig",
    "GeoLoRAConfig",
    "geolora_optimizer",
    "rebalance_ranks",
    "adapter_ranks",
    "adapt",
    "merge",
    "save_adapter",
    "load_adapter",
    "export_peft",
    "adapter_param_groups",
    "init_compressed",
    "print_trainable_parameters",
    "AdapterNotCalledWarning",
    "NormBuffersNotSavedWarning",
    "AdapterBaseMismatchWarning",
    "Result",
    "Plot",
    "Series",
    "Table",
    "write_report",
    "load_result",
    "SpectrumTracker",
    "load_weights",
    "compare_weights",
    "weights_spectrum",
    "Q3R",
    "NuclearNorm",
]
