"""TT-SVD of a matrix into MPO cores (tensor-train matrix), and back.

The numerical core: tensors in, tensors out; no files, no terminal.

An (out, in) matrix ``W`` with ``out = prod(out_modes)`` and ``in = prod(in_modes)`` (after
zero-padding) is viewed as the tensor ``W[o_1..o_d, i_1..i_d]``, its indices interleaved as
``(o_1 i_1)(o_2 i_2)...(o_d i_d)`` and split by the TT-SVD of Oseledets (2011, "Tensor-train
decomposition", SIAM J. Sci. Comput. 33(5)): reshape, SVD, truncate, carry ``S V^T`` to the right.
Core ``k`` has shape ``(r[k-1], out_modes[k], in_modes[k], r[k])`` with ``r[0] = r[d] = 1`` -- the
layout of TensorLy's ``TTMatrix`` and of the MPO papers (Gao et al. 2020; Sun et al. 2020).

Truncation is by maximum bond dimension, by relative Frobenius error ``eps`` (each of the ``d - 1``
bonds may discard at most ``eps * ||W|| / sqrt(d - 1)``, so the total error is at most
``eps * ||W||``: Oseledets 2011, Theorem 2.2), or both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

#: randomized SVD is used (``svd="auto"``) when ``bond + oversampling`` is at most this fraction of
#: the unfolding's smaller side
RANDOMIZED_FRACTION = 0.25
#: ... and the unfolding's smaller side is at least this (below it an exact SVD is cheap anyway)
RANDOMIZED_MIN_SIDE = 512
OVERSAMPLE = 10
POWER_ITERATIONS = 8


@dataclass
class TTMatrix:
    """MPO cores of an ``(out_features, in_features)`` matrix.

    Attributes:
        cores: ``d`` tensors of shape ``(r[k-1], out_modes[k], in_modes[k], r[k])``.
        shape: the true (unpadded) ``(out_features, in_features)``.
        spectra: singular values found at each of the ``d - 1`` bonds before truncation (all of them
            with a full SVD; the leading ones with a randomized SVD).
    """

    cores: list[torch.Tensor]
    shape: tuple[int, int]
    spectra: list[torch.Tensor] = field(default_factory=list)

    @property
    def out_modes(self) -> tuple[int, ...]:
        return tuple(int(c.shape[1]) for c in self.cores)

    @property
    def in_modes(self) -> tuple[int, ...]:
        return tuple(int(c.shape[2]) for c in self.cores)

    @property
    def bond_dims(self) -> list[int]:
        """Interior bond dimensions ``r[1..d-1]``."""
        return [int(c.shape[3]) for c in self.cores[:-1]]

    @property
    def padded_shape(self) -> tuple[int, int]:
        return math.prod(self.out_modes), math.prod(self.in_modes)

    @property
    def num_params(self) -> int:
        return sum(c.numel() for c in self.cores)

    def to_matrix(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` matrix (padding cropped)."""
        return cores_to_matrix(self.cores, self.shape)

    def transpose(self) -> TTMatrix:
        """The cores of the transposed matrix (each core's two mode axes swapped; same bonds)."""
        return TTMatrix([c.transpose(1, 2).contiguous() for c in self.cores], (self.shape[1], self.shape[0]),
                        [s.clone() for s in self.spectra])  # fmt: skip


    def to_tensorly(self):
        """The cores as TensorLy's ``TTMatrix`` (same core layout, shared tensors; TensorLy's own
        backend decides how it computes). Its ``to_matrix()`` is the *padded* matrix: crop it to
        ``self.shape`` where the modes were padded (``padded_shape != shape``).

        Raises:
            ImportError: TensorLy is not installed (``pip install tensorly``).
        """
        from tensorly.tt_matrix import TTMatrix as TLTTMatrix

        return TLTTMatrix([c for c in self.cores])

    @classmethod
    def from_tensorly(cls, tt_matrix, shape: tuple[int, int] | None = None) -> TTMatrix:
        """Take TensorLy's ``TTMatrix`` (or its list of factors) as MPO cores.

        Args:
            tt_matrix: a ``tensorly.tt_matrix.TTMatrix`` or a list of ``(r, out, in, r')`` factors
                (torch tensors, as with TensorLy's PyTorch backend).
            shape: the true ``(out, in)`` matrix shape when the modes cover a padded matrix
                (default: the product of the modes).
        """
        factors = list(getattr(tt_matrix, "factors", tt_matrix))
        cores = [f if isinstance(f, torch.Tensor) else torch.as_tensor(f) for f in factors]
        if len(cores) < 2 or any(c.dim() != 4 for c in cores):
            raise ValueError("a TT-matrix needs 2 or more factors of shape (rank, out_mode, in_mode, rank)")
        padded = (math.prod(int(c.shape[1]) for c in cores), math.prod(int(c.shape[2]) for c in cores))
        shape = padded if shape is None else (int(shape[0]), int(shape[1]))
        if shape[0] > padded[0] or shape[1] > padded[1]:
            raise ValueError(f"shape {shape} is larger than the modes cover {padded}")
        return cls(cores, shape)


def cores_to_matrix(cores: list[torch.Tensor], shape: tuple[int, int] | None = None) -> torch.Tensor:
    """Contract MPO cores back into a matrix, cropped to ``shape`` when given.

    Args:
        cores: tensors of shape ``(r[k-1], out_modes[k], in_modes[k], r[k])``.
        shape: the true ``(out, in)``; defaults to the padded shape.

    Returns:
        Tensor of shape ``shape``.
    """
    d = len(cores)
    t = cores[0].reshape(cores[0].shape[1], cores[0].shape[2], cores[0].shape[3])  # (o1, i1, r1)
    for core in cores[1:]:
        # (..., r) x (r, o, i, r') -> (..., o, i, r')
        t = torch.tensordot(t, core, dims=([t.dim() - 1], [0]))
    t = t.reshape(t.shape[:-1])  # drop r_d = 1: (o1, i1, ..., od, id)
    perm = [2 * k for k in range(d)] + [2 * k + 1 for k in range(d)]
    out = math.prod([c.shape[1] for c in cores])
    inp = math.prod([c.shape[2] for c in cores])
    m = t.permute(perm).reshape(out, inp)
    if shape is not None:
        m = m[: shape[0], : shape[1]]
    return m


def use_randomized(svd: str, rows: int, cols: int, bond: int | None) -> bool:
    """Whether the TT-SVD uses a randomized SVD for an unfolding of this size at this bond."""
    if svd == "full" or bond is None:
        return False
    small = min(rows, cols)
    if svd == "randomized":
        return bond + OVERSAMPLE < small
    return small >= RANDOMIZED_MIN_SIDE and bond + OVERSAMPLE <= RANDOMIZED_FRACTION * small


def _svd(
    a: torch.Tensor, bond: int | None, method: str, generator_seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``a = U diag(S) Vh``, randomized (Halko et al. 2011) when the bond is small."""
    rows, cols = a.shape
    if use_randomized(method, rows, cols, bond):
        return randomized_svd(a, bond, generator_seed)
    return _thin_svd(a)


def randomized_svd(a: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``rank + OVERSAMPLE`` singular triplets ``(U, S, Vh)`` of ``a`` by a randomized SVD
    (Halko et al. 2011, ``POWER_ITERATIONS`` power iterations): the one implementation, for the TT-SVD
    and for the reference spectra. Seeded on ``a``'s device, so results are reproducible there, and
    the caller's random state (CPU and CUDA) is left as it was."""
    q = min(rank + OVERSAMPLE, *a.shape)
    # torch.svd_lowrank draws from the global RNG of a's device: fork it (and only it) and seed it
    with torch.random.fork_rng(devices=[a.device] if a.device.type == "cuda" else []):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(a, q=q, niter=POWER_ITERATIONS)
    return u, s, v.mH


def _thin_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD; a very wide or tall unfolding goes through a QR first.

    TT-SVD unfoldings are often extremely unbalanced (64 x 262144 for the first bond of a 4-core
    4096^2 matrix). LAPACK's gesdd is several times slower on those than a Householder QR followed by
    the SVD of the small triangular factor, which is just as backward stable.
    """
    rows, cols = a.shape
    if cols >= 4 * rows:
        q, r = torch.linalg.qr(a.mH)  # a = r^H q^H
        u, s, vh = torch.linalg.svd(r.mH, full_matrices=False)
        return u, s, vh @ q.mH
    if rows >= 4 * cols:
        q, r = torch.linalg.qr(a)  # a = q r
        u, s, vh = torch.linalg.svd(r, full_matrices=False)
        return q @ u, s, vh
    return torch.linalg.svd(a, full_matrices=False)


def _rank_for_tol(s: torch.Tensor, delta: float) -> int:
    """Smallest r >= 1 whose discarded tail sqrt(sum_{i>=r} s_i^2) is <= delta."""
    # tail[r] = ||s[r:]||; tail is non-increasing in r
    energy = torch.flip(torch.cumsum(torch.flip(s.double() ** 2, [0]), 0), [0])
    tail = torch.cat([energy, energy.new_zeros(1)]).sqrt()
    ok = torch.nonzero(tail <= delta).flatten()
    r = int(ok[0]) if ok.numel() else s.numel()
    return max(r, 1)


def tt_svd(
    matrix: torch.Tensor,
    out_modes: tuple[int, ...],
    in_modes: tuple[int, ...],
    *,
    max_bond: int | None = None,
    tol: float | None = None,
    svd: str = "auto",
    seed: int = 0,
    svd_cache: dict | None = None,
    bond_dims: list[int] | tuple[int, ...] | None = None,
) -> TTMatrix:
    """Decompose a matrix into MPO cores by TT-SVD.

    Args:
        matrix: ``(out, in)`` floating tensor; ``out <= prod(out_modes)``, ``in <= prod(in_modes)``
            (the rest is zero padding).
        out_modes: output mode of each core.
        in_modes: input mode of each core (same length).
        max_bond: maximum bond dimension (None = unbounded).
        tol: relative Frobenius error target, split over the bonds (None = exact up to max_bond).
        svd: ``"full"``, ``"randomized"`` or ``"auto"``; randomized only applies with ``max_bond``.
        seed: seed for the randomized SVD.
        svd_cache: a dict shared by several TT-SVDs of the *same* matrix and modes (truncated at
            different bonds): the exact SVD of an unfolding is computed once and reused by every call
            that reaches that unfolding with the same ranks before it (results are unchanged: an
            exact SVD is used there even where ``svd`` would pick a randomized one).
        bond_dims: a cap on each of the ``d - 1`` bond dimensions (on top of ``max_bond``/``tol``), to
            reproduce the bonds of another decomposition of the same modes.

    Returns:
        A :class:`TTMatrix` whose cores have ``matrix``'s dtype (computed in at least float32).
    """
    if matrix.dim() != 2:
        raise ValueError(f"tt_svd needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    if len(out_modes) != len(in_modes) or len(out_modes) < 1:
        raise ValueError(f"out_modes {out_modes} and in_modes {in_modes} must have the same length >= 1")
    out_p, in_p = math.prod(out_modes), math.prod(in_modes)
    rows, cols = matrix.shape
    if rows > out_p or cols > in_p:
        raise ValueError(
            f"matrix {tuple(matrix.shape)} does not fit modes {out_modes} x {in_modes} "
            f"(padded shape ({out_p}, {in_p}))"
        )
    if max_bond is not None and max_bond < 1:
        raise ValueError(f"max_bond must be >= 1, got {max_bond}")
    d = len(out_modes)
    work_dtype = matrix.dtype if matrix.dtype in (torch.float32, torch.float64) else torch.float32
    w = matrix.to(work_dtype)
    if (rows, cols) != (out_p, in_p):
        w = torch.nn.functional.pad(w, (0, in_p - cols, 0, out_p - rows))

    # (o1..od, i1..id) -> (o1, i1, o2, i2, ...) -> (o1*i1, ..., od*id)
    t = w.reshape(*out_modes, *in_modes)
    perm = [p for k in range(d) for p in (k, d + k)]
    sizes = [o * i for o, i in zip(out_modes, in_modes)]
    c = t.permute(perm).reshape(sizes)

    delta = None
    if tol is not None and d > 1:
        delta = tol * float(torch.linalg.vector_norm(w)) / math.sqrt(d - 1)

    cores: list[torch.Tensor] = []
    spectra: list[torch.Tensor] = []
    r_prev = 1
    c = c.reshape(sizes[0], -1)
    ranks: tuple[int, ...] = ()
    exact_so_far = True
    for k in range(d - 1):
        c = c.reshape(r_prev * sizes[k], -1)
        key = (k, ranks)
        if svd_cache is not None and exact_so_far and key in svd_cache:
            u, s, vh = svd_cache[key]
        else:
            # a tolerance needs the whole spectrum, so randomized SVD only serves a pure max_bond
            bond = max_bond if delta is None else None
            exact = not use_randomized(svd, c.shape[0], c.shape[1], bond)
            u, s, vh = _svd(c, bond, svd, seed + k)
            exact_so_far = exact_so_far and exact
            if svd_cache is not None and exact_so_far:
                svd_cache[key] = (u, s, vh)
        spectra.append(s.detach().clone())
        r = s.numel()
        if delta is not None:
            r = min(r, _rank_for_tol(s, delta))
        if max_bond is not None:
            r = min(r, max_bond)
        if bond_dims is not None:
            r = min(r, int(bond_dims[k]))
        r = max(r, 1)
        cores.append(u[:, :r].reshape(r_prev, out_modes[k], in_modes[k], r))
        c = s[:r, None] * vh[:r]
        r_prev = r
        ranks = (*ranks, r)
    cores.append(c.reshape(r_prev, out_modes[-1], in_modes[-1], 1))
    cores = [core.to(matrix.dtype).contiguous() for core in cores]
    return TTMatrix(cores=cores, shape=(rows, cols), spectra=spectra)


#: elements per chunk of :func:`relative_error` (bounds its float64 temporaries to a few MB)
ERROR_CHUNK = 1 << 22


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``||reference - approx||_F / ||reference||_F`` computed in float64 (0 for a zero reference).

    Works through the flattened tensors in chunks, so a large weight needs no float64 copies."""
    ref, app = reference.reshape(-1), approx.reshape(-1)
    if ref.shape != app.shape:
        raise ValueError(f"relative_error: shapes {tuple(reference.shape)} and {tuple(approx.shape)} differ")
    norm2 = diff2 = 0.0
    for i in range(0, ref.numel(), ERROR_CHUNK):
        r = ref[i : i + ERROR_CHUNK].double()
        norm2 += float(r.square().sum())
        diff2 += float((r - app[i : i + ERROR_CHUNK].double()).square().sum())
    if norm2 == 0.0:
        return 0.0 if diff2 == 0.0 else math.inf
    return math.sqrt(diff2) / math.sqrt(norm2)


def snr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-noise ratio ``20 log10(||x|| / ||x - y||)`` in dB (torchao's ``compute_error``)."""
    err = relative_error(reference, approx)
    return math.inf if err == 0.0 else -20.0 * math.log10(err)


def svd_tail_error(singular_values: torch.Tensor, rank: int) -> float:
    """Relative error of the best rank-``rank`` approximation, from all singular values (Eckart-Young)."""
    s2 = singular_values.double() ** 2
    total = float(s2.sum())
    if total == 0.0:
        return 0.0
    return math.sqrt(max(float(s2[rank:].sum()), 0.0) / total)


def energy_ranks(singular_values: torch.Tensor, fractions: tuple[float, ...] = (0.9, 0.99, 0.999)) -> list[int]:
    """Smallest ranks that keep each fraction of the energy ``sum s_i^2``."""
    s2 = singular_values.double() ** 2
    total = float(s2.sum())
    if total == 0.0:
        return [1 for _ in fractions]
    cum = torch.cumsum(s2, 0) / total
    out = []
    for f in fractions:
        idx = torch.nonzero(cum >= f - 1e-12).flatten()
        out.append(int(idx[0]) + 1 if idx.numel() else s2.numel())
    return out
