"""Data-free and activation-based refinement of MPO cores after TT-SVD (no I/O).

* :func:`als_refine` - alternating least squares: one core at a time is replaced by the exact
  least-squares solution given the others, lowering ``||W - MPO||_F`` at fixed bond dimensions.
* :func:`refit_quantized` - quantize the cores one at a time and refit the not-yet-quantized ones
  to absorb the quantization error.
* :func:`activation_refit` - minimise the *output* error ``||X W^T - X W_mpo^T||_F`` over recorded
  inputs ``X`` of the layer (through their Gram matrix ``X^T X``) instead of the weight error.

A TT-matrix with cores ``G_k`` of shape ``(r_{k-1}, o_k, i_k, r_k)`` is, after interleaving the row
and column modes of ``W``, a plain tensor train with mode sizes ``n_k = o_k * i_k``; ALS works on
that view. Padding (``TTMatrix.padded_shape`` larger than the matrix) is handled by imputation: the
padded target carries the current approximation outside the real matrix, so every sweep can only
lower the error on the real entries (the classic EM argument). Each routine also keeps the best
cores it has seen, so none ever returns cores worse than the ones it was given.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mpocompress.core.tt import TTMatrix, cores_to_matrix, relative_error

#: relative rcond of the pseudo-inverses of the interface Gram matrices
_RCOND = 1e-12


@dataclass
class RefineResult:
    """Refined cores and the error history (relative Frobenius error after each sweep/step,
    ``history[0]`` being the error of the cores given)."""

    tt: TTMatrix
    history: list[float] = field(default_factory=list)

    @property
    def rel_error(self) -> float:
        return min(self.history)


def _interleaved(weight: torch.Tensor, tt: TTMatrix) -> torch.Tensor:
    """``weight`` zero-padded to the TT's padded shape, as a tensor of modes ``(o_1 i_1, ..., o_d i_d)``."""
    out_modes, in_modes = tt.out_modes, tt.in_modes
    d = len(out_modes)
    rows, cols = tt.padded_shape
    w = torch.zeros(rows, cols, dtype=torch.float64, device=weight.device)
    w[: weight.shape[0], : weight.shape[1]] = weight.double()
    perm = [p for k in range(d) for p in (k, d + k)]
    return w.reshape(*out_modes, *in_modes).permute(perm).reshape([o * i for o, i in zip(out_modes, in_modes)])


def _full(cores3: list[torch.Tensor]) -> torch.Tensor:
    """Contract 3-D cores ``(r, n, r')`` into the full tensor of shape ``(n_1, ..., n_d)``."""
    acc = cores3[0].reshape(-1, cores3[0].shape[-1])
    for c in cores3[1:]:
        acc = (acc @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[-1])
    return acc.reshape([c.shape[1] for c in cores3])


def _real_error(weight: torch.Tensor, cores4: list[torch.Tensor]) -> float:
    return relative_error(weight.double(), cores_to_matrix(cores4, tuple(weight.shape)))


def _pinv(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.pinv(a, rtol=_RCOND, hermitian=True)


def _sweep(target: torch.Tensor, cores3: list[torch.Tensor], frozen: set[int], order: list[int]) -> None:
    """Replace each non-frozen core in ``order`` by its least-squares optimum, in place."""
    d = len(cores3)
    dims = list(target.shape)
    for k in order:
        if k in frozen:
            continue
        # left interface L: (N_<k, r_{k-1}); right interface R: (r_k, N_>k)
        left = torch.ones(1, 1, dtype=torch.float64, device=target.device)
        for j in range(k):
            c = cores3[j]
            left = (left @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[-1])
        right = torch.ones(1, 1, dtype=torch.float64, device=target.device)
        for j in range(d - 1, k, -1):
            c = cores3[j]
            right = (c.reshape(-1, c.shape[-1]) @ right).reshape(c.shape[0], -1)
        t = target.reshape(left.shape[0], dims[k], right.shape[1])
        rhs = torch.einsum("ar,anb,sb->rns", left, t, right)
        g = torch.einsum("rq,qns,st->rnt", _pinv(left.T @ left), rhs, _pinv(right @ right.T))
        cores3[k] = g


def _to3(tt: TTMatrix) -> list[torch.Tensor]:
    return [c.double().reshape(c.shape[0], c.shape[1] * c.shape[2], c.shape[3]) for c in tt.cores]


def _to4(cores3: list[torch.Tensor], tt: TTMatrix, dtype: torch.dtype) -> list[torch.Tensor]:
    return [c.reshape(ref.shape).to(dtype).contiguous() for c, ref in zip(cores3, tt.cores)]


def _impute(target: torch.Tensor, real: torch.Tensor | None, cores3: list[torch.Tensor]) -> torch.Tensor:
    """The ALS target: ``target`` on the real entries, the current approximation on the padding
    (``real`` marks the real entries; None when there is no padding)."""
    return target if real is None else torch.where(real, target, _full(cores3))


def als_refine(
    weight: torch.Tensor,
    tt: TTMatrix,
    *,
    sweeps: int = 2,
    frozen: set[int] | frozenset[int] = frozenset(),
    min_gain: float = 0.0,
) -> RefineResult:
    """Lower ``||weight - MPO||_F`` by alternating least squares over the cores, bonds fixed.

    A sweep visits every core once, left to right then right to left on the next sweep; each visit
    replaces the core by the exact least-squares solution given the other cores (normal equations
    with pseudo-inverted interface Gram matrices, in float64).

    Args:
        weight: the ``(out, in)`` matrix ``tt`` approximates.
        tt: starting cores (e.g. from :func:`mpocompress.core.tt.tt_svd`).
        sweeps: number of sweeps.
        frozen: indices of cores to keep as they are.
        min_gain: stop early when a sweep lowers the relative error by less than this.

    Returns:
        The best cores seen (never worse than ``tt``) and the error after each sweep.
    """
    if tuple(weight.shape) != tuple(tt.shape):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match the TT's {tuple(tt.shape)}")
    dtype = tt.cores[0].dtype
    cores3 = _to3(tt)
    best = list(tt.cores)
    history = [_real_error(weight, [c.double() for c in tt.cores])]
    d = len(cores3)
    base = _interleaved(weight, tt)
    real = None if tuple(weight.shape) == tt.padded_shape else _interleaved(torch.ones_like(weight), tt).bool()
    for s in range(sweeps):
        target = _impute(base, real, cores3)
        order = list(range(d)) if s % 2 == 0 else list(range(d - 1, -1, -1))
        _sweep(target, cores3, set(frozen), order)
        cores4 = _to4(cores3, tt, torch.float64)
        err = _real_error(weight, cores4)
        history.append(err)
        if err < min(history[:-1]):
            best = [c.to(dtype) for c in cores4]
        if history[-2] - err < min_gain:
            break
    return RefineResult(TTMatrix(best, tt.shape), history)


def refit_quantized(
    weight: torch.Tensor,
    tt: TTMatrix,
    quantize: Callable[[int, torch.Tensor], torch.Tensor],
    *,
    sweeps: int = 1,
    gram: torch.Tensor | None = None,
) -> TTMatrix:
    """Quantize the cores one at a time, refitting the not-yet-quantized ones after each.

    ``quantize(k, core)`` is called once per core, largest core first, with the core as it is at
    that moment; it must return the core as it will be stored (encode + decode), and may keep the
    encoded parts. The refit between calls lets the remaining cores absorb the quantization error,
    so the result is never worse than quantizing the TT-SVD cores directly *when measured in the
    same order* (each refit only lowers the error it is given). The refit is ALS on the weight
    error, or with ``gram`` (``X^T X`` of recorded inputs, ridge included) :func:`activation_refit`
    on the output error: the error compensation of GPTQ/OBQ (quantize a part, move the parts still
    free to undo its error on the data) at the granularity of cores.

    Returns:
        The quantized cores (each exactly what ``quantize`` returned).
    """
    d = len(tt.cores)
    order = sorted(range(d), key=lambda k: -tt.cores[k].numel())
    dtype = tt.cores[0].dtype
    cores = [c.clone() for c in tt.cores]
    done: set[int] = set()
    for k in order:
        cores[k] = quantize(k, cores[k]).to(dtype)
        done.add(k)
        if len(done) < d and sweeps > 0:
            current = TTMatrix(cores, tt.shape)
            if gram is None:
                res = als_refine(weight, current, sweeps=sweeps, frozen=done)
            else:
                res = activation_refit(weight, current, gram, sweeps=sweeps, frozen=frozenset(done), sweep_tol=0.0)
            cores = [cores[j] if j in done else res.tt.cores[j] for j in range(d)]
    return TTMatrix(cores, tt.shape)


def kron_factors(gram: torch.Tensor, in_modes: tuple[int, ...]) -> list[torch.Tensor]:
    """A Kronecker approximation ``C ~ C_1 (x) ... (x) C_d`` matching ``in_modes``: each factor is the
    partial trace of ``C`` (zero-padded to ``prod(in_modes)``) over the other modes, scaled to unit
    mean diagonal (the overall scale does not change a whitening or a preconditioner). Exact, up to
    scale, when ``C`` is a Kronecker product of positive definite factors. A 1-D ``gram`` is a
    diagonal one (diagonal factors)."""
    n = math.prod(in_modes)
    if gram.dim() == 1:  # a diagonal Gram: diagonal factors, without forming the matrix
        v = torch.zeros(n, dtype=torch.float64, device=gram.device)
        v[: gram.shape[0]] = gram.double()
        t = v.reshape(in_modes)
        out = []
        for k in range(len(in_modes)):
            f = t.movedim(k, 0).reshape(in_modes[k], -1).sum(1)
            out.append(torch.diag(f / f.mean()) if float(f.mean()) > 0 else torch.eye(in_modes[k], dtype=torch.float64, device=gram.device))
        return out
    c = torch.zeros(n, n, dtype=torch.float64, device=gram.device)
    c[: gram.shape[0], : gram.shape[1]] = gram.double()
    d = len(in_modes)
    t = c.reshape(*in_modes, *in_modes)
    factors = []
    for k in range(d):
        m = in_modes[k]
        moved = t.movedim((k, d + k), (0, d)).reshape(m, n // m, m, n // m)
        f = torch.einsum("arbr->ab", moved)
        f = (f + f.T) / 2
        mean = float(torch.diagonal(f).mean())
        factors.append(f / mean if mean > 0 else torch.eye(m, dtype=torch.float64, device=gram.device))
    return factors


def _spd_inverse(m: torch.Tensor) -> torch.Tensor:
    m = (m + m.T) / 2
    shift = max(float(torch.diagonal(m).mean()), 1e-300) * 1e-8
    return torch.linalg.inv(m + shift * torch.eye(m.shape[0], dtype=m.dtype, device=m.device))


def kron_preconditioner(
    cores: list[torch.Tensor], factors: list[torch.Tensor], k: int, out_factors: list[torch.Tensor] | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The inverse of core ``k``'s output-error Hessian when the Gram were ``C_1 (x) ... (x) C_d``
    (:func:`kron_factors`): then the Hessian is ``A (x) I (x) C_k (x) B`` on a core ``(r0, o, i, r1)``,
    ``A``/``B`` the Gram matrices of the left/right interfaces under the other factors, and its inverse
    is three small matrix products. ``out_factors``: Kronecker factors of an output weighting ``G``
    (the K-FAC loss ``tr(G E C E^T)``): ``I`` becomes ``G_k`` and ``A``/``B`` carry the other ``G_j``.
    Used as the preconditioner of :func:`activation_refit`'s CG."""
    one = torch.ones(1, 1, dtype=torch.float64, device=cores[k].device)

    def side(j: int) -> torch.Tensor:
        return torch.eye(cores[j].shape[1], dtype=torch.float64, device=cores[j].device) if out_factors is None else out_factors[j]

    a = one
    for j in range(k):
        a = torch.einsum("ab,aoic,op,ij,bpjd->cd", a, cores[j], side(j), factors[j], cores[j])
    b = one
    for j in range(len(cores) - 1, k, -1):
        b = torch.einsum("cd,aoic,op,ij,bpjd->ab", b, cores[j], side(j), factors[j], cores[j])
    ai, fi, bi = _spd_inverse(a), _spd_inverse(factors[k]), _spd_inverse(b)
    gi = None if out_factors is None else _spd_inverse(out_factors[k])

    def apply(r: torch.Tensor) -> torch.Tensor:
        t = torch.einsum("ab,bojc->aojc", ai, r)
        if gi is not None:
            t = torch.einsum("op,apjc->aojc", gi, t)
        return torch.einsum("aoic,cd->aoid", torch.einsum("aojc,ij->aoic", t, fi), bi)

    return apply


class _CoreMaps:
    """Core ``k``'s linear map into the matrix and its transpose, through the contracted left and right
    environments (the other cores are fixed during a visit): ``A(g)`` is the ``(out, in)`` matrix with
    ``g`` in slot ``k``, ``A^T(M)`` contracts ``M`` (zero-padded to the padded shape) with both
    environments. Kept in ``dtype`` (the Hessian-vector products run in float32: the loss and the
    right-hand side stay float64)."""

    def __init__(self, cores: list[torch.Tensor], k: int, shape: tuple[int, int], dtype: torch.dtype) -> None:
        d = len(cores)
        om, im = [c.shape[1] for c in cores], [c.shape[2] for c in cores]
        self.k, self.shape, self.dtype = k, shape, dtype
        self.padded = (math.prod(om), math.prod(im))
        self.dims = (math.prod(om[:k]), om[k], math.prod(om[k + 1 :]), math.prod(im[:k]), im[k], math.prod(im[k + 1 :]))
        left = torch.ones(1, 1, 1, dtype=dtype, device=cores[0].device)  # (O_<k, I_<k, a)
        for j in range(k):
            c = cores[j].to(dtype)
            t = torch.einsum("xya,aoib->xoyib", left, c)
            left = t.reshape(left.shape[0] * c.shape[1], left.shape[1] * c.shape[2], c.shape[3])
        right = torch.ones(1, 1, 1, dtype=dtype, device=cores[0].device)  # (b, O_>k, I_>k)
        for j in range(d - 1, k, -1):
            c = cores[j].to(dtype)
            t = torch.einsum("aoib,bzw->aoziw", c, right)
            right = t.reshape(c.shape[0], c.shape[1] * right.shape[1], c.shape[2] * right.shape[2])
        self.left, self.right = left, right

    def cast(self, dtype: torch.dtype) -> _CoreMaps:
        """The same maps in ``dtype`` (the environments cast, not contracted again)."""
        out = object.__new__(_CoreMaps)
        out.k, out.shape, out.dtype, out.padded, out.dims = self.k, self.shape, dtype, self.padded, self.dims
        out.left, out.right = self.left.to(dtype), self.right.to(dtype)
        return out

    def matrix(self, g: torch.Tensor) -> torch.Tensor:
        t = torch.einsum("xya,aoib->xyoib", self.left, g.to(self.dtype))
        t = torch.einsum("xyoib,bzw->xozyiw", t, self.right).reshape(self.padded)
        return t[: self.shape[0], : self.shape[1]]

    def adjoint(self, m: torch.Tensor) -> torch.Tensor:
        m = m.to(self.dtype)
        if tuple(m.shape) != self.padded:
            m = torch.nn.functional.pad(m, (0, self.padded[1] - m.shape[1], 0, self.padded[0] - m.shape[0]))
        t = torch.einsum("xozyiw,bzw->xoyib", m.reshape(self.dims), self.right)
        return torch.einsum("xoyib,xya->aoib", t, self.left)


def _solve_core(
    x: torch.Tensor,
    hess: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    wcw: float,
    cg_iters: int,
    tol: float,
    precondition: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Preconditioned CG on one core's quadratic ``H g = b``, ``H g = A^T (A(g) C)``, ``b = A^T (W C)``.
    Stops after ``cg_iters`` steps or when a step lowers the relative squared output error by less than
    ``tol`` of its current value (each step's decrease is ``alpha * r.z``, known without a product).
    ``x``: the core's current value; losses are relative to ``wcw = tr(W C W^T)``."""
    r = b - hess(x)
    current = (wcw - float((x * (b + r)).sum())) / wcw  # the loss at x, from the residual
    z = precondition(r)
    p = z.clone()
    rz = float((r * z).sum())
    for _ in range(cg_iters):
        if rz <= 0:
            break
        hp = hess(p)
        curv = float((p * hp).sum())
        if curv <= 0:
            break
        alpha = rz / curv
        x = x + alpha * p
        drop = alpha * rz / wcw
        current -= drop
        if drop < tol * max(current, 0.0):
            break
        r = r - alpha * hp
        z = precondition(r)
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x.detach()


def activation_refit(
    weight: torch.Tensor,
    tt: TTMatrix,
    gram: torch.Tensor,
    *,
    sweeps: int = 4,
    cg_iters: int = 60,
    tol: float = 1e-4,
    precondition: bool = True,
    sweep_tol: float = 1e-2,
    product_dtype: torch.dtype = torch.float32,
    out_gram: torch.Tensor | None = None,
    frozen: set[int] | frozenset[int] = frozenset(),
) -> RefineResult:
    """Refit the cores to minimise the output error on recorded inputs instead of the weight error.

    With inputs ``X`` (rows) of the layer and ``C = X^T X``, the output error of a weight ``V`` is
    ``||X W^T - X V^T||_F^2 = tr((W - V) C (W - V)^T)``. That is a convex quadratic in each core
    with the others fixed, so the cores are visited in ALS sweeps and each is moved toward the
    minimiser of its quadratic by conjugate gradients. A Hessian-vector product is ``A^T (A(p) C)``
    (``A`` the core's linear map into the matrix, through the contracted environments of the other
    cores, :class:`_CoreMaps`): one ``(out x in) @ (in x in)`` product per step, in
    ``product_dtype`` (float32 by default: faster than float64 at the same fit, see ``benchmarks/lm.py refit``; the loss,
    the right-hand side ``A^T (W C)`` and the cores stay float64). The CG is preconditioned by the
    exact inverse Hessian of a Kronecker-factored Gram (:func:`kron_preconditioner`) and stops when
    a step gains less than ``tol`` (relative): the edge cores converge in a few steps, the middle
    ones get the rest. The sweeps stop when one lowers the squared output error by less than
    ``sweep_tol`` of its value (on SmolLM2 the sweeps after the first gain ~0.3 % of the error, far
    below the gap to held-out inputs; ``python benchmarks/lm.py refit``). ``history`` holds
    the *relative output error* ``sqrt(tr(E C E^T) / tr(W C W^T))`` at the start and after each
    sweep; the best cores seen are returned (never worse than ``tt`` on this objective).

    Args:
        weight: ``(out, in)`` matrix.
        tt: starting cores.
        gram: ``(in, in)`` Gram matrix ``X^T X`` of the recorded inputs.
        sweeps: ALS sweeps at most (left to right, then right to left, ...).
        cg_iters: conjugate-gradient steps per core visit at most.
        tol: stop a core's CG when a step lowers the squared relative output error by less than this
            share of its value.
        precondition: use the Kronecker preconditioner (else plain CG).
        sweep_tol: stop sweeping when a sweep gains less than this share (0: all ``sweeps``).
        product_dtype: dtype of the Hessian-vector products.
        out_gram: an ``(out, out)`` weighting ``G`` of the outputs (or its diagonal, ``(out,)``), used
            as given (add any ridge first): the objective becomes ``tr(G E C E^T)``, the K-FAC
            estimate of a loss's increase when ``G`` is the loss's curvature at the outputs
            (:func:`mpocompress.core.whiten.output_weighting`); ``history`` is then relative to
            ``tr(G W C W^T)``, and the preconditioner uses ``G``'s Kronecker factors too.
        frozen: indices of cores kept as they are (the others absorb their error).
    """
    out_f, in_f = weight.shape
    if tuple(gram.shape) != (in_f, in_f):
        raise ValueError(f"Gram matrix must be ({in_f}, {in_f}) for a weight with {in_f} inputs, got {tuple(gram.shape)}")
    w = weight.double()
    c = gram.double()
    c = (c + c.T) / 2
    g = None if out_gram is None else out_gram.double()
    if g is not None and tuple(g.shape) not in ((out_f,), (out_f, out_f)):
        raise ValueError(f"output weighting must be ({out_f},) or ({out_f}, {out_f}), got {tuple(g.shape)}")
    # the fast products on unit-scale copies (float32's range is far smaller than float64's)
    c_scale = max(float(torch.diagonal(c).abs().mean()), 1e-300)
    g_scale = 1.0 if g is None else max(float((g if g.dim() == 1 else torch.diagonal(g)).abs().mean()), 1e-300)
    c_fast = (c / c_scale).to(product_dtype)
    g_fast = None if g is None else (g / g_scale).to(product_dtype)

    def weigh(m: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:  # G m
        return m if g is None else g[:, None] * m if g.dim() == 1 else g @ m

    wc = weigh(w @ c, g)  # once: every right-hand side below is the adjoint of it
    wcw = float((w * wc).sum())
    if wcw <= 0:
        raise ValueError("the recorded inputs are all zero: nothing to fit")
    dtype = tt.cores[0].dtype
    cores = [p.detach().double().clone() for p in tt.cores]
    factors = kron_factors(c, tt.in_modes) if precondition else None
    out_factors = None
    if precondition and g is not None:
        out_factors = kron_factors(g, tt.out_modes)

    def loss(cs: list[torch.Tensor]) -> float:
        e = w - cores_to_matrix(cs, (out_f, in_f))
        return float((e * weigh(e @ c, g)).sum()) / wcw

    start = loss(cores)
    history = [math.sqrt(max(start, 0.0))]
    best_loss, best = start, [p.clone() for p in cores]
    d = len(cores)
    for s in range(sweeps):
        for k in range(d) if s % 2 == 0 else range(d - 1, -1, -1):
            if k in frozen:
                continue
            pre = kron_preconditioner(cores, factors, k, out_factors) if factors is not None else (lambda r: r)
            exact = _CoreMaps(cores, k, (out_f, in_f), torch.float64)
            b, maps = exact.adjoint(wc), exact.cast(product_dtype)

            def hess(p: torch.Tensor, maps: _CoreMaps = maps) -> torch.Tensor:
                size = max(float(p.abs().max()), 1e-300)  # (the CG's directions can have any scale)
                return maps.adjoint(weigh(maps.matrix(p / size) @ c_fast, g_fast)).double() * (c_scale * g_scale * size)

            cores[k] = _solve_core(cores[k], hess, b, wcw, cg_iters, tol, pre)
        current = loss(cores)
        history.append(math.sqrt(max(current, 0.0)))
        gain = (best_loss - current) / best_loss if best_loss > 0 else 0.0
        if current < best_loss:
            best_loss, best = current, [p.clone() for p in cores]
        if gain < sweep_tol:
            break
    return RefineResult(TTMatrix([b.to(dtype) for b in best], tt.shape), history)


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative output error ``sqrt(tr(E C E^T) / tr(W C W^T))`` of ``approx`` on inputs with Gram ``C``."""
    w, e, c = weight.double(), (weight - approx).double(), gram.double()
    return math.sqrt(float(torch.einsum("oi,ij,oj->", e, c, e)) / float(torch.einsum("oi,ij,oj->", w, c, w)))
