"""Data-aware low rank: fit SVD factors and MPO cores to a layer's *outputs* on recorded inputs (no I/O).

With the inputs ``X`` (one row per sample) a layer sees and ``C = X^T X`` their Gram matrix, the
output error of an approximation ``V`` of the weight ``W`` is
``||X W^T - X V^T||_F^2 = tr((W - V) C (W - V)^T) = ||(W - V) S||_F^2`` for any square root
``S S^T = C``. So:

* :func:`whitened_svd` - SVD-LLM's truncation-aware whitening (Wang et al. 2024): the truncated SVD
  of ``W S`` times ``S^{-1}``. Its dropped singular values are exactly the output error, so it is
  the best rank-``r`` weight for these inputs (up to the ridge).
* :func:`activation_aware_tt` - the same idea for MPO cores (ours; no published method does this):
  ``C`` is approximated by a Kronecker product ``C_1 (x) ... (x) C_d`` whose factors match the
  cores' input modes, ``W`` is whitened mode by mode, cut by TT-SVD, and each core's input leg is
  multiplied by ``S_k^{-1}``: an exact unwhitening, because the Kronecker structure matches the MPO.
* :func:`fit_to_inputs` - the data-aware decomposition of a layer at the bond dimensions a data-free
  TT-SVD chose: whitened SVD for 2 cores; for more, both the TT-SVD and the activation-aware cores
  are refit on the true Gram (:func:`mpocompress.core.refine.activation_refit`) for one sweep and
  the better one refit further (:func:`continue_fit`).

**Ridge** (our choice): every Gram is used as ``C + ridge * mean(diag C) * I``. Inputs rarely span
every direction (dead channels, fewer samples than features); without it the fit is free to put
arbitrary weight where the calibration data has no energy, and the weight error there then shows on
new data. It is the output error plus a small weight error, so unseen directions keep the weight.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mpocompress.core.refine import activation_refit, kron_factors, output_error
from mpocompress.core.tt import TTMatrix, relative_error, tt_svd

#: ridge added to every Gram matrix, relative to its mean diagonal (see the module docstring)
DEFAULT_RIDGE = 1e-2
#: ridge added to an output curvature (``out_gram``), relative to its mean diagonal (our choice: on
#: SmolLM2-135M at 20 % fewer parameters, perplexity 85.5 with 0.1 against 86.7 with 1e-2)
CURVATURE_RIDGE = 0.1


def ridged(gram: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """``gram`` (symmetrised, float64) plus ``ridge * mean(diag) * I``."""
    c = gram.double()
    c = (c + c.T) / 2
    scale = float(torch.diagonal(c).mean())
    if not scale > 0:
        raise ValueError("the recorded inputs are all zero: nothing to fit")
    return c + (ridge * scale) * torch.eye(c.shape[0], dtype=torch.float64, device=c.device)


def _roots(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root of a positive definite ``c`` and its inverse (from one eigendecomposition)."""
    lam, q = torch.linalg.eigh(c)
    lam = lam.clamp(min=float(lam.max()) * 1e-12)
    root = (q * lam.sqrt()) @ q.T
    inv = (q * lam.rsqrt()) @ q.T
    return root, inv


def output_weighting(out_gram: torch.Tensor, ridge: float = CURVATURE_RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, R^{-1})`` with ``R^T R`` = the ridged output curvature ``G`` (a full ``(out, out)``
    matrix, or its diagonal as an ``(out,)`` vector, which gives diagonal ``R``), float64."""
    g = out_gram.double()
    if g.dim() == 1:
        scale = float(g.mean())
        if not scale > 0:
            raise ValueError("the output curvature is all zero: nothing to weight by")
        d = (g + ridge * scale).sqrt()
        return torch.diag(d), torch.diag(1 / d)
    return _roots(ridged(g, ridge))


def whitened_factors(
    weight: torch.Tensor,
    gram: torch.Tensor,
    *,
    ridge: float = DEFAULT_RIDGE,
    out_gram: torch.Tensor | None = None,
    out_ridge: float = CURVATURE_RIDGE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, s, V^T S^{-1})`` from the SVD of ``W S`` (``S S^T`` = the ridged Gram), float64: the
    rank-``r`` output-optimal weight is ``U[:, :r] diag(s[:r]) (V^T S^{-1})[:r]``, for every ``r``.

    ``out_gram``: the curvature ``G`` of the model's loss at the layer's outputs (the Gauss-Newton /
    Fisher second moment of the output gradients, :func:`mpocompress.jobs.calibrate.record_output_curvature`;
    full or diagonal). The factors then come from the SVD of ``R W S`` (``R^T R = G``) and ``U`` is
    ``R^{-1} U'``: the rank-``r`` weight minimising ``tr(G (W - V) C (W - V)^T)``, the K-FAC estimate of
    the loss increase, instead of the output error (errors in outputs the loss ignores cost nothing).
    ``U`` is then not orthonormal. ``out_ridge``: the ridge added to ``G`` (relative to its mean diagonal)."""
    out_f, in_f = weight.shape
    if tuple(gram.shape) != (in_f, in_f):
        raise ValueError(f"Gram matrix must be ({in_f}, {in_f}) for a weight with {in_f} inputs, got {tuple(gram.shape)}")
    root, inv = _roots(ridged(gram, ridge))
    if out_gram is None:
        u, s, vh = torch.linalg.svd(weight.double() @ root, full_matrices=False)
        return u, s, vh @ inv
    if tuple(out_gram.shape) not in ((out_f,), (out_f, out_f)):
        raise ValueError(f"output curvature must be ({out_f},) or ({out_f}, {out_f}), got {tuple(out_gram.shape)}")
    left, left_inv = output_weighting(out_gram, out_ridge)
    u, s, vh = torch.linalg.svd(left @ weight.double() @ root, full_matrices=False)
    return left_inv @ u, s, vh @ inv


def whitened_svd(
    weight: torch.Tensor,
    gram: torch.Tensor,
    rank: int,
    *,
    ridge: float = DEFAULT_RIDGE,
    factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    out_gram: torch.Tensor | None = None,
) -> TTMatrix:
    """Rank-``rank`` factors minimising the output error on inputs with Gram ``gram``, as a 2-core MPO.

    The left core holds ``U_r`` and the right one ``S_r V_r^T S^{-1}``, the layout of a 2-core
    TT-SVD (:func:`mpocompress.core.tt.tt_svd`). ``factors``: :func:`whitened_factors` of the same
    weight and Gram, to share one SVD between ranks. ``out_gram``: weight the outputs by the loss's
    curvature (:func:`whitened_factors`).
    """
    out_f, in_f = weight.shape
    u, s, vhi = factors if factors is not None else whitened_factors(weight, gram, ridge=ridge, out_gram=out_gram)
    r = max(1, min(int(rank), s.numel()))
    left = u[:, :r]
    right = s[:r, None] * vhi[:r]
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    cores = [left.reshape(1, out_f, 1, r).to(dtype).contiguous(), right.reshape(r, 1, in_f, 1).to(dtype).contiguous()]
    return TTMatrix(cores, (out_f, in_f), spectra=[s.to(dtype)])


def activation_aware_tt(
    weight: torch.Tensor,
    gram: torch.Tensor,
    out_modes: tuple[int, ...],
    in_modes: tuple[int, ...],
    bond_dims: list[int],
    *,
    ridge: float = DEFAULT_RIDGE,
    cache: dict | None = None,
    out_gram: torch.Tensor | None = None,
) -> TTMatrix:
    """MPO cores at bond dimensions ``bond_dims`` that approximately minimise the output error: TT-SVD of
    ``W (S_1 (x) ... (x) S_d)`` with ``S_k`` the square roots of :func:`kron_factors` (each with
    the ridge), then each core's input leg multiplied by ``S_k^{-1}`` (exact: the whitening has the
    cores' own Kronecker structure). ``cache``: a dict shared by calls on the same weight, Gram and
    modes (the whitening and the TT-SVD's exact SVDs are computed once). ``out_gram``: an output
    weighting ``G`` (ridged, as :func:`weighted_curvature` gives it), whitened the same way on the
    output legs (``R_1 (x) ... (x) R_d`` from its Kronecker factors over ``out_modes``): the cores then
    approximately minimise the K-FAC loss ``tr(G E C E^T)``."""
    out_f, in_f = weight.shape
    out_p, in_p = math.prod(out_modes), math.prod(in_modes)
    cache = {} if cache is None else cache
    if "roots" not in cache:
        roots = [_roots(ridged(f, ridge)) for f in kron_factors(gram, in_modes)]
        out_roots = None if out_gram is None else [_roots(f) for f in kron_factors(out_gram, out_modes)]
        w = torch.zeros(out_p, in_p, dtype=torch.float64, device=weight.device)
        w[:out_f, :in_f] = weight.double()
        t = w.reshape(out_p, *in_modes)
        for k, (root, _) in enumerate(roots):
            t = (t.movedim(1 + k, -1) @ root).movedim(-1, 1 + k)
        if out_roots is not None:
            t = t.reshape(*out_modes, in_p)
            for k, (root, _) in enumerate(out_roots):
                t = (t.movedim(k, -1) @ root).movedim(-1, k)
        cache.update(roots=roots, out_roots=out_roots, whitened=t.reshape(out_p, in_p), svd={})
    roots, out_roots = cache["roots"], cache["out_roots"]
    tt = tt_svd(cache["whitened"], out_modes, in_modes, bond_dims=bond_dims, svd="full", svd_cache=cache["svd"])
    cores = [torch.einsum("aoib,ij->aojb", g.double(), inv) for g, (_, inv) in zip(tt.cores, roots)]
    if out_roots is not None:
        cores = [torch.einsum("aoib,op->apib", g, inv) for g, (_, inv) in zip(cores, out_roots)]
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    return TTMatrix([c.to(dtype).contiguous() for c in cores], (out_f, in_f))


def weighted_curvature(out_gram: torch.Tensor, ridge: float = CURVATURE_RIDGE) -> torch.Tensor:
    """The output curvature ``G`` as the MPO refit uses it: float64, plus ``ridge * mean(diag) * I``
    (a diagonal stays a vector)."""
    g = out_gram.double()
    if g.dim() == 1:
        scale = float(g.mean())
        if not scale > 0:
            raise ValueError("the output curvature is all zero: nothing to weight by")
        return g + ridge * scale
    return ridged(g, ridge)


def loss_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor, out_gram: torch.Tensor) -> float:
    """Relative K-FAC loss error ``sqrt(tr(G E C E^T) / tr(G W C W^T))`` (``G`` used as given)."""
    w, e, c, g = weight.double(), (weight - approx).double(), gram.double(), out_gram.double()

    def gm(m: torch.Tensor) -> torch.Tensor:
        return g[:, None] * m if g.dim() == 1 else g @ m

    return math.sqrt(float((e * gm(e @ c)).sum()) / float((w * gm(w @ c)).sum()))


def fit_to_inputs(
    weight: torch.Tensor,
    tt: TTMatrix,
    gram: torch.Tensor,
    *,
    sweeps: int = 4,
    ridge: float = DEFAULT_RIDGE,
    out_gram: torch.Tensor | None = None,
) -> tuple[TTMatrix, dict[str, Any]]:
    """Data-aware cores with ``tt``'s modes and bond dimensions (``tt``: a data-free TT-SVD).

    2 cores: :func:`whitened_svd`. More: ``tt`` and :func:`activation_aware_tt` are each refit on the
    ridged Gram by :func:`mpocompress.core.refine.activation_refit` for one sweep, and the one with the
    lower error then gets the remaining ``sweeps`` (our choice: on SmolLM2 the later sweeps gain ~0.3
    % and never reorder the two starts by more than that, so refitting both to the end doubled the
    time for nothing). ``out_gram``: the loss's curvature at the outputs; every fit then minimises
    the K-FAC loss estimate ``tr(G E C E^T)`` instead of the output error (2 cores:
    :func:`whitened_factors`; more: the Kronecker-whitened start and the refit both weigh the
    outputs by ``G``). Returns ``(cores, info)``; ``info`` holds the method, the objective and
    its value before and after (``objective_before``/``objective_after``: the relative output error,
    or with ``out_gram`` the relative K-FAC loss error), the relative output errors (on the Gram as given) before, of both
    starts after their first sweep, and after, and the weight error.
    """
    w = weight.double()
    c = ridged(gram, ridge)
    g = None if out_gram is None else weighted_curvature(out_gram)
    before = output_error(w, tt.to_matrix().double(), gram)
    info: dict[str, Any] = {"output_error_before": before}
    info["objective_before"] = before if g is None else loss_error(w, tt.to_matrix().double(), gram, g)
    if len(tt.cores) == 2:
        best = whitened_svd(weight, gram, tt.bond_dims[0], ridge=ridge, out_gram=out_gram)
        info["method"] = "whitened_svd" if out_gram is None else "kfac_whitened_svd"
    else:
        def objective(t: TTMatrix) -> float:
            return output_error(w, t.to_matrix(), gram) if g is None else loss_error(w, t.to_matrix(), gram, g)

        plain = activation_refit(w, tt, c, sweeps=1, out_gram=g).tt
        aware0 = activation_aware_tt(w, gram, tt.out_modes, tt.in_modes, tt.bond_dims, ridge=ridge, out_gram=g)
        info["output_error_aware_init"] = output_error(w, aware0.to_matrix(), gram)
        aware = activation_refit(w, aware0, c, sweeps=1, out_gram=g).tt
        info["output_error_refit"] = output_error(w, plain.to_matrix(), gram)
        info["output_error_aware_refit"] = output_error(w, aware.to_matrix(), gram)
        use_aware = objective(aware) <= objective(plain)
        best = aware if use_aware else plain
        if sweeps > 1:
            best = activation_refit(w, best, c, sweeps=sweeps - 1, out_gram=g).tt
        info["method"] = ("activation_aware_mpo" if use_aware else "tt_svd_refit") + ("" if g is None else "_kfac")
        best = TTMatrix([t.to(tt.cores[0].dtype) for t in best.cores], tt.shape)
    return best, _errors_after(w, best, gram, g, info)


def _errors_after(w: torch.Tensor, best: TTMatrix, gram: torch.Tensor, g: torch.Tensor | None, info: dict[str, Any]) -> dict[str, Any]:
    m = best.to_matrix().double()
    info = {**info, "output_error_after": output_error(w, m, gram), "weight_error_after": relative_error(w, m)}
    info["objective"] = "output error" if g is None else "K-FAC loss"
    info["objective_after"] = info["output_error_after"] if g is None else loss_error(w, m, gram, g)
    return info


def continue_fit(
    weight: torch.Tensor,
    tt: TTMatrix,
    gram: torch.Tensor,
    info: dict[str, Any],
    *,
    sweeps: int = 3,
    ridge: float = DEFAULT_RIDGE,
    out_gram: torch.Tensor | None = None,
) -> tuple[TTMatrix, dict[str, Any]]:
    """More refit sweeps for cores :func:`fit_to_inputs` fitted with ``sweeps=1`` (2 cores: returned
    as they are, the whitened SVD is exact). ``cores="auto"`` fits every core count one sweep and
    continues only the winner. Returns ``(cores, info)`` with the errors after updated."""
    if len(tt.cores) == 2 or sweeps < 1:
        return tt, info
    w = weight.double()
    g = None if out_gram is None else weighted_curvature(out_gram)
    best = activation_refit(w, tt, ridged(gram, ridge), sweeps=sweeps, out_gram=g).tt
    best = TTMatrix([t.to(tt.cores[0].dtype) for t in best.cores], tt.shape)
    return best, _errors_after(w, best, gram, g, info)
