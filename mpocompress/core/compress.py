"""Compress one weight matrix: choose the structure, run the TT-SVD, measure honestly.

Numerical core (no I/O). For every layer we report, beside the MPO error, the error of a plain
truncated SVD with the same parameter count: on trained weights a post-hoc 3-4-core MPO is often far
worse than that SVD, and users must see it. ``cores="auto"`` picks, per layer, the core count with the
least error at the layer's parameter budget (2 cores *is* the truncated SVD).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from mpocompress.config import AUTO_CORES, AUTO_REFERENCE_CORES, MPOConfig
from mpocompress.core.modes import bond_dims_for, choose_modes, max_bond_for_budget, mpo_params
from mpocompress.core.tt import (
    TTMatrix,
    randomized_svd,
    relative_error,
    svd_tail_error,
    tt_svd,
    use_randomized,
)


@dataclass
class Candidate:
    """One structure tried for a layer. ``output_error``: after a fit to recorded inputs, the fit's
    objective (the relative output error, or with an output curvature the relative K-FAC loss error)."""

    cores: int
    params: int
    rel_error: float
    bond_dims: list[int]
    output_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The candidate as JSON-ready data (``output_error`` only when fitted to recorded inputs)."""
        out = {"cores": self.cores, "params": self.params, "rel_error": self.rel_error, "bond_dims": self.bond_dims}
        if self.output_error is not None:
            out["output_error"] = self.output_error
        return out


@dataclass
class MatrixResult:
    """The outcome for one matrix.

    Attributes:
        tt: the chosen cores, or None when the layer is kept dense.
        status: ``"mpo"`` or ``"dense"`` (an MPO would not be smaller than the dense matrix).
        reason: why the layer was kept dense, if it was.
        dense_params: ``out * in``.
        params: parameters stored (cores, or dense).
        rel_error: relative Frobenius error of the stored cores (0 when dense).
        svd_rank: rank of the truncated SVD with at most ``params`` parameters.
        svd_rel_error: that SVD's relative error (Eckart-Young, from the exact spectrum).
        candidates: every structure tried (one unless ``cores="auto"``).
        best_tt: the chosen cores even when the layer is kept dense (for callers that want an MPO
            layer regardless, such as ``MPOLinear.from_linear``).
        fit: with recorded inputs, how the chosen cores were fitted to them
            (:func:`mpocompress.core.whiten.fit_to_inputs`); None without.
    """

    tt: TTMatrix | None
    status: str
    reason: str | None
    dense_params: int
    params: int
    rel_error: float
    svd_rank: int
    svd_rel_error: float
    candidates: list[Candidate] = field(default_factory=list)
    best_tt: TTMatrix | None = None
    fit: dict[str, Any] | None = None


def singular_values(matrix: torch.Tensor, rank_hint: int | None = None, seed: int = 0) -> tuple[torch.Tensor, bool]:
    """Singular values of a matrix: exact, or by a randomized SVD where the TT-SVD would use one (a
    known rank small beside a large matrix, see :func:`mpocompress.core.tt.use_randomized`).

    Returns:
        ``(s, exact)``; when not exact, ``s`` holds the leading values of a randomized SVD followed by
        one value carrying the remaining energy, so tail errors are those of that randomized SVD.
    """
    w = matrix.double() if matrix.dtype == torch.float64 else matrix.float()
    if rank_hint is None or not use_randomized("auto", w.shape[0], w.shape[1], rank_hint):
        return torch.linalg.svdvals(w), True
    _, s, _ = randomized_svd(w, rank_hint, seed)
    rest = max(float(torch.linalg.vector_norm(w)) ** 2 - float((s.double() ** 2).sum()), 0.0)
    return torch.cat([s, s.new_tensor([math.sqrt(rest)])]), False


def _run(matrix: torch.Tensor, cores: int, config: MPOConfig, budget: int | None) -> TTMatrix:
    out_modes, in_modes = choose_modes(matrix.shape[0], matrix.shape[1], cores)
    if budget is not None:
        bond = max_bond_for_budget(out_modes, in_modes, budget)
        if config.bond_dim is not None:  # --bond-dim is a true maximum, also under cores="auto"
            bond = min(bond, config.bond_dim)
        return tt_svd(matrix, out_modes, in_modes, max_bond=bond, svd=config.svd, seed=config.seed)
    return tt_svd(
        matrix, out_modes, in_modes, max_bond=config.bond_dim, tol=config.tol, svd=config.svd, seed=config.seed
    )


def layer_budget(shape: tuple[int, int], config: MPOConfig) -> int | None:
    """The per-layer parameter budget that the candidates share, or None for a tolerance target."""
    out_f, in_f = shape
    if config.ratio is not None:
        return max(1, math.floor(out_f * in_f / config.ratio))
    if config.tol is not None:
        return None
    if config.cores == "auto":
        ref_modes = choose_modes(out_f, in_f, AUTO_REFERENCE_CORES)
        return mpo_params(*ref_modes, bond_dims_for(*ref_modes, config.bond_dim))
    return None


def compress_matrix(
    matrix: torch.Tensor,
    config: MPOConfig,
    *,
    reference_svd: bool = True,
    gram: torch.Tensor | None = None,
    out_gram: torch.Tensor | None = None,
) -> MatrixResult:
    """Compress one ``(out, in)`` matrix under ``config``.

    Args:
        matrix: floating ``(out, in)`` tensor.
        config: bond-dimension choice and structure.
        reference_svd: compute ``svd_rel_error`` (False leaves it NaN, for callers that measure the
            same-size SVD themselves, after encoding).
        gram: Gram matrix ``X^T X`` of the inputs the layer sees: each candidate's cores (at the bond
            dimensions the data-free TT-SVD chose) are fitted to the outputs on them
            (:func:`mpocompress.core.whiten.fit_to_inputs`) and ``cores="auto"`` picks the least
            *output* error (one refit sweep per core count, the rest for the winner).
        out_gram: with ``gram``, the curvature of the model's loss at the layer's outputs: every
            candidate minimises the K-FAC estimate of the loss instead of the output error, and
            ``cores="auto"`` compares that.

    Returns:
        A :class:`MatrixResult`; ``tt`` is None when no MPO would be smaller than the matrix.
    """
    if matrix.dim() != 2:
        raise ValueError(f"compress_matrix needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    out_f, in_f = (int(s) for s in matrix.shape)
    dense_params = out_f * in_f
    budget = layer_budget((out_f, in_f), config)
    core_counts = AUTO_CORES if config.cores == "auto" else (int(config.cores),)

    tried: list[tuple[Candidate, TTMatrix]] = []
    fits: dict[int, dict[str, Any]] = {}
    for d in core_counts:
        tt = _run(matrix, d, config, budget)
        if config.als_sweeps and d > 2:  # 2 cores: TT-SVD is already the optimal truncated SVD
            from mpocompress.core.refine import als_refine

            tt = als_refine(matrix, tt, sweeps=config.als_sweeps).tt
        out_err = None
        if gram is not None:
            from mpocompress.core.whiten import fit_to_inputs

            # several core counts: one refit sweep each, the rest for the winner (below)
            tt, fits[d] = fit_to_inputs(matrix, tt, gram, out_gram=out_gram, sweeps=1 if len(core_counts) > 1 else 4)
            out_err = fits[d]["objective_after"]
        err = relative_error(matrix, tt.to_matrix())
        tried.append((Candidate(d, tt.num_params, err, tt.bond_dims, out_err), tt))

    def error(c: Candidate) -> float:
        return c.rel_error if c.output_error is None else c.output_error

    if config.tol is not None:
        # every candidate meets the tolerance: the smallest wins
        best, best_tt = min(tried, key=lambda ct: (ct[0].params, error(ct[0])))
    else:
        best, best_tt = min(tried, key=lambda ct: (error(ct[0]), ct[0].params))

    if gram is not None and len(core_counts) > 1:
        from mpocompress.core.whiten import continue_fit

        best_tt, fits[best.cores] = continue_fit(matrix, best_tt, gram, fits[best.cores], out_gram=out_gram)
        out_err = fits[best.cores]["objective_after"]
        best = replace(best, rel_error=relative_error(matrix, best_tt.to_matrix()), output_error=out_err)
        tried = [(best, best_tt) if c.cores == best.cores else (c, t) for c, t in tried]
    candidates = [c for c, _ in tried]
    if best.params >= dense_params:
        return MatrixResult(
            tt=None,
            status="dense",
            reason=f"an MPO ({best.params} params) would not be smaller than dense ({dense_params})",
            dense_params=dense_params,
            params=dense_params,
            rel_error=0.0,
            svd_rank=min(out_f, in_f),
            svd_rel_error=0.0,
            candidates=candidates,
            best_tt=best_tt,
            fit=fits.get(best.cores),
        )
    svd_rank = best.params // (out_f + in_f)
    svd_rel_error = math.nan
    if reference_svd:
        s, exact = singular_values(matrix, rank_hint=svd_rank, seed=config.seed)
        svd_rel_error = svd_tail_error(s, svd_rank) if svd_rank > 0 else 1.0
        if not exact and best.cores == 2 and best.bond_dims[0] <= svd_rank:
            # a randomized reference can miss energy; our own rank-r SVD bounds the optimum
            svd_rel_error = min(svd_rel_error, best.rel_error)
    return MatrixResult(
        tt=best_tt,
        status="mpo",
        reason=None,
        dense_params=dense_params,
        params=best.params,
        rel_error=best.rel_error,
        svd_rank=svd_rank,
        svd_rel_error=svd_rel_error,
        candidates=candidates,
        best_tt=best_tt,
        fit=fits.get(best.cores),
    )
