"""Matrix recovery with deep (over-parameterised) factorizations and their compressed dynamics.

``DeepFactorization`` (the original width-d network), ``CompressedFactorization`` (the
2 r_hat-dimensional network built from the first gradient, DESIGN §4.4), problems
(``Completion``, ``Sensing``, ``Factorization``; loss ``c/2 ||residual||^2`` with ``reduction``
"mean" (default) or "sum"), the gradient-descent trainer ``train_gd`` and ``complete`` (one call,
scale / offset invariant, held-out validation by default), the baselines ``als`` (sparse ridge ALS
with biases) and ``soft_impute`` (factored iterates, sparse inputs), and the scikit-learn-style estimators ``DeepMatrixCompleter``,
``ALSCompleter``, ``SoftImputeCompleter`` and ``MeanModel`` (``fit(X, mask)``, ``predict(rows,
cols)``, ``completed_``).
"""

from .als import ALSResult, als
from .baselines import SoftImputeFit, soft_impute, soft_impute_fit, soft_impute_path, svt
from .centering import MeanModel, fit_mean_model
from .complete import MEAN_MODEL_STATUS, CompletionResult, complete, default_rank
from .compressed import CompressedFactorization
from .estimators import ALSCompleter, DeepMatrixCompleter, SoftImputeCompleter
from .factorization import DeepFactorization
from .problems import Completion, Factorization, Sensing, low_rank_target, random_mask, relative_error
from .steps import reference_lr, suggest_lr, suggest_rank
from .theory import invariant_bases, rho_trajectory
from .trainer import FAILURE_STATUSES, SUCCESS_STATUSES, History, train_gd

__all__ = [
    "DeepFactorization",
    "CompressedFactorization",
    "Completion",
    "Sensing",
    "Factorization",
    "complete",
    "CompletionResult",
    "default_rank",
    "train_gd",
    "History",
    "SUCCESS_STATUSES",
    "FAILURE_STATUSES",
    "soft_impute",
    "soft_impute_path",
    "soft_impute_fit",
    "SoftImputeFit",
    "svt",
    "als",
    "ALSResult",
    "MeanModel",
    "fit_mean_model",
    "DeepMatrixCompleter",
    "ALSCompleter",
    "SoftImputeCompleter",
    "MEAN_MODEL_STATUS",
    "low_rank_target",
    "random_mask",
    "relative_error",
    "suggest_lr",
    "suggest_rank",
    "reference_lr",
    "rho_trajectory",
    "invariant_bases",
]
