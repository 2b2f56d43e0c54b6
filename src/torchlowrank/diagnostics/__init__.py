"""Spectral diagnostics: track spectra and ranks during training, plot them, inspect checkpoints."""

from .inspect import WeightDiff, compare_weights, load_peft_adapter, load_weights, weights_spectrum
from .plots import angle_plot, rank_curves, rank_heatmap, singular_value_plot, tracker_plots
from .tracker import HISTORY_COLUMNS, QUANTITIES, SpectrumTracker, analyse_matrix, load_history

__all__ = [
    "SpectrumTracker",
    "analyse_matrix",
    "load_history",
    "QUANTITIES",
    "HISTORY_COLUMNS",
    "singular_value_plot",
    "rank_heatmap",
    "rank_curves",
    "angle_plot",
    "tracker_plots",
    "load_weights",
    "load_peft_adapter",
    "compare_weights",
    "weights_spectrum",
    "WeightDiff",
]
