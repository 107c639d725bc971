"""Bond-dimension spectra: what a bond dimension will cost in error, before compressing.

Numerical core (no I/O). For one matrix and one core count this gives the singular values at every
bond of the *untruncated* TT-SVD, the bond dimensions that keep 90 / 99 / 99.9 % of each bond's
energy, and the measured error-vs-compression curve of truncated TT-SVDs, each point beside the
truncated SVD with the same parameter count.
"""

from __future__ import annotations

from typing import Any

import torch

from mpocompress.core.modes import choose_modes, full_ranks
from mpocompress.core.tt import energy_ranks, relative_error, svd_tail_error, tt_svd

ENERGY_FRACTIONS = (0.9, 0.99, 0.999)


def normalized(s: torch.Tensor) -> list[float]:
    """Singular values scaled so their squares sum to 1 (each square is a share of the energy)."""
    s = s.double()
    norm = float(torch.linalg.vector_norm(s))
    return [float(v) / norm if norm else 0.0 for v in s]


def singular_values_of(matrix: torch.Tensor) -> torch.Tensor:
    """All singular values of a matrix, descending. A matrix at least twice as tall as wide (or wide
    as tall) goes through its small Gram matrix in float64 (``sqrt(eig(W^T W))``: a fraction of a
    full SVD's time on embedding-like shapes, accurate to ~1e-7 of the largest value)."""
    m = matrix.double()
    rows, cols = m.shape
    if max(rows, cols) >= 2 * min(rows, cols):
        g = m.T @ m if rows >= cols else m @ m.T
        ev = torch.linalg.eigvalsh(g).clamp_min(0).flip(0)
        return ev.sqrt().to(torch.float64 if matrix.dtype == torch.float64 else torch.float32)
    return torch.linalg.svdvals(matrix.double() if matrix.dtype == torch.float64 else matrix.float())


def bond_grid(max_rank: int) -> list[int]:
    """Powers of two up to ``max_rank``, and ``max_rank`` itself."""
    grid, b = [], 1
    while b < max_rank:
        grid.append(b)
        b *= 2
    grid.append(max_rank)
    return grid


def analyze_matrix(matrix: torch.Tensor, cores: int, *, svd: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Spectra and error-vs-compression curve of one ``(out, in)`` matrix.

    Args:
        matrix: floating ``(out, in)`` tensor.
        cores: number of MPO cores (>= 2).
        svd: SVD method for the truncated points of the curve.

    Returns:
        A JSON-ready dict: ``out_modes``, ``in_modes``, ``bonds`` (per bond: ``full_rank``,
        ``spectrum`` normalised, ``energy_ranks`` for 90/99/99.9 %), ``svd`` (the plain matrix
        spectrum, the same way), and ``curve`` (per max bond: ``params``, ``ratio``, ``rel_error``,
        ``svd_rank``, ``svd_rel_error``), stopping where the MPO stops being smaller than dense.
    """
    out_f, in_f = (int(x) for x in matrix.shape)
    dense = out_f * in_f
    out_modes, in_modes = choose_modes(out_f, in_f, cores)
    # the untruncated run's exact SVDs are shared with every point of the curve that reaches the
    # same unfolding (all points share the first; points above a bond's full rank share the next)
    cache: dict = {}
    full = tt_svd(matrix, out_modes, in_modes, svd="full", svd_cache=cache)
    s_mat = singular_values_of(matrix)
    bonds = [
        {"bond": k + 1, "full_rank": int(s.numel()), "spectrum": normalized(s), "energy_ranks": energy_ranks(s, ENERGY_FRACTIONS)}
        for k, s in enumerate(full.spectra)
    ]
    curve = []
    for b in bond_grid(max(full_ranks(out_modes, in_modes), default=1)):
        tt = tt_svd(matrix, out_modes, in_modes, max_bond=b, svd=svd, seed=seed, svd_cache=cache)
        params = tt.num_params
        if params >= dense and curve:
            break
        rank = params // (out_f + in_f)
        curve.append(
            {
                "max_bond": b,
                "bond_dims": tt.bond_dims,
                "params": params,
                "ratio": dense / params,
                "rel_error": relative_error(matrix, tt.to_matrix()),
                "svd_rank": rank,
                "svd_rel_error": svd_tail_error(s_mat, rank) if rank > 0 else 1.0,
            }
        )
    return {
        "cores": cores,
        "matrix_shape": [out_f, in_f],
        "out_modes": list(out_modes),
        "in_modes": list(in_modes),
        "energy_fractions": list(ENERGY_FRACTIONS),
        "bonds": bonds,
        "svd": {"full_rank": int(s_mat.numel()), "spectrum": normalized(s_mat), "energy_ranks": energy_ranks(s_mat, ENERGY_FRACTIONS)},
        "curve": curve,
    }
