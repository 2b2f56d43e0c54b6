"""ALS's half-sweep, ``ridge_solve_rows``: every row's ridge least squares on its observed entries,
a block of rows at a time from gathered, zero-padded factor rows; checked against the dense
float64 definition, on blocks of several sizes, rows without entries, a singular row, and for
host syncs."""

import pytest
import torch

from host_syncs import HostSyncCounter
from torchlowrank.matrix import sparse
from torchlowrank.matrix.sparse import Entries, ridge_solve_rows


def _pattern(m=37, n=29, N=400, seed=0):
    """A random pattern with an empty row 0 and uneven row counts (so blocks get padded)."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(m * n, generator=g)[:N]
    rows, cols = flat // n, flat % n
    keep = rows != 0
    rows, cols = rows[keep], cols[keep]
    vals = torch.randn(rows.numel(), generator=g, dtype=torch.float64)
    return Entries(rows, cols, vals, (m, n)), g


def _dense_solve(E, F, t, diag, transpose):
    """The definition: for each row, the ridge normal equations over its entries, solved densely."""
    rows, cols = (E.cols, E.rows) if transpose else (E.rows, E.cols)
    m = E.shape[1] if transpose else E.shape[0]
    q = F.shape[1]
    x = torch.zeros(m, q, dtype=torch.float64)
    sse = torch.zeros((), dtype=torch.float64)
    for i in range(m):
        sel = rows == i
        Fi, ti = F[cols[sel]], t[sel]
        A = Fi.T @ Fi + torch.diag(diag)
        nz = A.diagonal() > 0  # a coordinate with no data and no ridge stays at 0
        x[i, nz] = torch.linalg.solve(A[nz][:, nz], (Fi.T @ ti)[nz])
        sse += (ti - Fi @ x[i]).square().sum()
    return x, sse


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("blocks", ["one", "many"])
def test_ridge_solve_rows_equals_the_dense_ridge_solve_of_every_row(transpose, blocks, monkeypatch):
    if blocks == "many":  # a few rows a block: padding, several widths, rows spread over blocks
        monkeypatch.setattr(sparse, "BLOCK_ROWS", 8)
        monkeypatch.setattr(sparse, "BLOCK_SLOTS", 60)
        monkeypatch.setattr(sparse, "GRAM_BLOCK_CELLS", 5 * 25)  # solved 5 rows at a time
        monkeypatch.setattr(sparse, "SLOT_BLOCK_CELLS", 40 * 5)
    E, g = _pattern()
    m, n = E.shape
    other = m if transpose else n
    F = torch.randn(other, 5, generator=g, dtype=torch.float64)
    offset = torch.randn(other, generator=g, dtype=torch.float64)
    diag = torch.tensor([0.3, 0.3, 0.3, 0.3, 0.0], dtype=torch.float64)  # no ridge on the last coordinate
    x, sse = ridge_solve_rows(E, F, E.values, diag, offset=offset, transpose=transpose)
    t = E.values - offset[E.rows if transpose else E.cols]
    x_ref, sse_ref = _dense_solve(E, F, t, diag, transpose)
    torch.testing.assert_close(x, x_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sse, sse_ref, rtol=1e-10, atol=1e-12)
    if not transpose:
        assert float(x[0].abs().max()) == 0.0  # the empty row


def test_blocks_cover_every_row_once_and_pad_only_with_the_sentinels():
    E, _ = _pattern()
    m, n = E.shape
    blocks = E.padded_blocks(max_rows=6, max_slots=40)
    assert len(blocks) > 3
    seen = torch.cat([b.rows for b in blocks])
    assert torch.equal(seen.sort().values, torch.arange(m))
    ents = torch.cat([b.ent for b in blocks])
    real = ents < len(E)
    assert torch.equal(ents[real].sort().values, torch.arange(len(E)))  # every entry once
    idx = torch.cat([b.idx for b in blocks])
    assert bool((idx[~real] == n).all()) and torch.equal(idx[real], E.cols[ents[real]])
    assert all(b.rows.numel() <= 6 and b.rows.numel() * b.width <= 40 for b in blocks if b.width > 0)


def test_a_singular_row_falls_back_to_least_squares():
    E, g = _pattern()
    F = torch.randn(E.shape[1], 3, generator=g, dtype=torch.float64)
    F[:, 2] = F[:, 1]  # every Gram matrix is singular; no ridge
    x, sse = ridge_solve_rows(E, F, E.values, torch.zeros(3, dtype=torch.float64))
    assert torch.isfinite(x).all()
    resid = E.values - (F[E.cols] * x[E.rows]).sum(1)
    torch.testing.assert_close(sse, resid.square().sum(), rtol=1e-8, atol=1e-10)
    for i in (1, 5, 20):
        sel = E.rows == i
        Fi, yi = F[E.cols[sel]], E.values[sel]
        best = torch.linalg.lstsq(Fi, yi.unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close((yi - Fi @ x[i]).norm(), (yi - Fi @ best).norm(), rtol=1e-6, atol=1e-9)


def test_ridge_solve_rows_reads_one_value_to_the_host_and_reuses_its_blocks():
    E, g = _pattern()
    F = torch.randn(E.shape[1], 4, generator=g, dtype=torch.float64)
    diag = torch.full((4,), 0.1, dtype=torch.float64)
    ridge_solve_rows(E, F, E.values, diag)  # builds and caches the blocks (one read, at setup)
    with HostSyncCounter() as syncs:
        ridge_solve_rows(E, F, E.values, diag)
    assert len(syncs.calls) == 1 and syncs.calls[0].endswith("__bool__")  # "any row not positive definite?"
