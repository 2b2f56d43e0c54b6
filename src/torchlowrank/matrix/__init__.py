"""Matrix recovery with deep (over-parameterised) factorizations and their compressed dynamics.

``DeepFactorization`` (the original width-d network), ``CompressedFactorization`` (the
2 r_hat-dimensional network built from the first gradient, DESIGN §4.4), problems
(``Completion``, ``Sensing``, ``Factorization``; loss ``c/2 ||residual||^2`` with ``reduction``
"mean" (default) or "sum"), the gradient-descent trainer ``train_gd`` and ``complete`` (one call).
"""
from .baselines import soft_impute, svt
from .complete import CompletionResult, complete
from .compressed import CompressedFactorization
from .factorization import DeepFactorization
from .problems import Completion, Factorization, Sensing, low_rank_target, random_mask, relative_error
from .steps import reference_lr, suggest_lr, suggest_rank
from .theory import invariant_bases, rho_trajectory
from .trainer import History, train_gd

__all__ = ["DeepFactorization", "CompressedFactorization", "Completion", "Sensing", "Factorization",
           "complete", "CompletionResult", "train_gd", "History", "soft_impute", "svt",
           "low_rank_target", "random_mask", "relative_error", "suggest_lr", "suggest_rank", "reference_lr",
           "rho_trajectory", "invariant_bases"]
