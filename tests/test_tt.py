import math

import pytest
import torch
from conftest import low_rank
from hypothesis import given, settings
from hypothesis import strategies as st

from mpocompress.core.modes import choose_modes
from mpocompress.core.tt import (
    cores_to_matrix,
    energy_ranks,
    relative_error,
    svd_tail_error,
    tt_svd,
)


@pytest.mark.parametrize("shape", [(64, 64), (257, 100), (161, 30), (12, 600)])
@pytest.mark.parametrize("cores", [2, 3, 4])
def test_full_bond_reconstructs_exactly(shape, cores):
    w = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    om, im = choose_modes(*shape, cores)
    tt = tt_svd(w, om, im, svd="full")
    assert tt.to_matrix().shape == shape
    assert torch.allclose(tt.to_matrix(), w, atol=1e-9, rtol=0)


def test_padding_round_trip_crops_exactly():
    w = torch.randn(257, 161, dtype=torch.float64)
    om, im = choose_modes(257, 161, 3)
    assert (math.prod(om), math.prod(im)) != (257, 161)
    tt = tt_svd(w, om, im)
    assert tt.padded_shape == (math.prod(om), math.prod(im))
    full = cores_to_matrix(tt.cores)  # padded
    assert torch.allclose(full[:257, :161], w, atol=1e-9)
    assert full[257:].abs().max() < 1e-9 and full[:, 161:].abs().max() < 1e-9


def _planted(out_modes, in_modes, bond, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = len(out_modes)
    ranks = [1] + [bond] * (d - 1) + [1]
    cores = [torch.randn(ranks[k], out_modes[k], in_modes[k], ranks[k + 1], generator=g, dtype=torch.float64) for k in range(d)]
    return cores_to_matrix(cores)


@pytest.mark.parametrize("svd", ["full", "randomized"])
def test_planted_low_tt_rank_is_recovered(svd):
    om, im = (4, 8, 4), (4, 8, 4)
    w = _planted(om, im, bond=3)
    tt = tt_svd(w, om, im, max_bond=3, svd=svd)
    assert tt.bond_dims == [3, 3]
    assert relative_error(w, tt.to_matrix()) < 1e-9


def test_tolerance_finds_the_planted_rank():
    om, im = (4, 8, 4), (4, 8, 4)
    w = _planted(om, im, bond=5, seed=3)
    tt = tt_svd(w, om, im, tol=1e-8)
    assert tt.bond_dims == [5, 5]


def test_error_within_discarded_spectrum_bound_and_monotone():
    w = torch.randn(120, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    om, im = choose_modes(120, 96, 3)
    full = tt_svd(w, om, im, svd="full")
    prev = math.inf
    for bond in (1, 2, 4, 8, 16, 32, 64):
        tt = tt_svd(w, om, im, max_bond=bond, svd="full")
        err = relative_error(w, tt.to_matrix())
        # Oseledets 2011: ||W - TT||^2 <= sum over bonds of the discarded energy; the first bond's
        # spectrum is exactly the untruncated one, later ones are bounded by it (projection shrinks)
        bound = math.sqrt(sum(svd_tail_error(s, r) ** 2 for s, r in zip(tt.spectra, tt.bond_dims)))
        assert err <= bound + 1e-12
        assert tt.spectra[0].shape == full.spectra[0].shape
        assert err <= prev + 1e-12
        prev = err


@pytest.mark.parametrize("tol", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("cores", [2, 3, 4])
def test_tolerance_bound_holds(tol, cores):
    w = torch.randn(90, 140, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    om, im = choose_modes(90, 140, cores)
    tt = tt_svd(w, om, im, tol=tol)
    assert relative_error(w, tt.to_matrix()) <= tol + 1e-12


def test_two_cores_equals_truncated_svd():
    w = low_rank(80, 50, 50, seed=4)
    s = torch.linalg.svdvals(w)
    tt = tt_svd(w, (80, 1), (1, 50), max_bond=7, svd="full")
    assert relative_error(w, tt.to_matrix()) == pytest.approx(svd_tail_error(s, 7), rel=1e-9)


def test_dtype_is_kept_and_half_precision_works():
    w = torch.randn(48, 40).to(torch.bfloat16)
    tt = tt_svd(w, *choose_modes(48, 40, 3), max_bond=4)
    assert all(c.dtype == torch.bfloat16 for c in tt.cores)
    # the bf16 cores compute what the float32 TT-SVD computes, to bf16 precision (8 mantissa bits)
    ref = tt_svd(w.float(), *choose_modes(48, 40, 3), max_bond=4)
    assert relative_error(w.float(), tt.to_matrix().float()) == pytest.approx(relative_error(w.float(), ref.to_matrix()), abs=0.02)
    # exact at full rank, within bf16 rounding
    full = tt_svd(w, *choose_modes(48, 40, 3))
    assert relative_error(w.float(), full.to_matrix().float()) < 0.02


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        tt_svd(torch.randn(10, 10), (2, 4), (2, 5))  # 8 < 10 rows
    with pytest.raises(ValueError):
        tt_svd(torch.randn(10, 10), (10,), (10,), max_bond=0)


def test_randomized_is_deterministic():
    w = torch.randn(200, 300)
    om, im = choose_modes(200, 300, 2)
    a = tt_svd(w, om, im, max_bond=8, svd="randomized", seed=5)
    b = tt_svd(w, om, im, max_bond=8, svd="randomized", seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.cores, b.cores))


def test_energy_ranks():
    s = torch.tensor([10.0, 1.0, 0.5, 0.1])  # cumulative energy .988, .997, .9999, 1
    assert energy_ranks(s, (0.9, 0.99, 0.999)) == [1, 2, 3]


@settings(max_examples=40, deadline=None)
@given(
    o=st.one_of(st.integers(1, 90), st.sampled_from([2, 3, 5, 7, 11, 13, 31, 61, 89])),
    i=st.one_of(st.integers(1, 90), st.sampled_from([2, 3, 5, 7, 11, 13, 31, 61, 89])),
    cores=st.integers(2, 4),
    bond=st.integers(1, 12),
)
def test_hypothesis_shapes(o, i, cores, bond):
    w = torch.randn(o, i, dtype=torch.float64)
    om, im = choose_modes(o, i, cores)
    exact = tt_svd(w, om, im)
    assert relative_error(w, exact.to_matrix()) < 1e-9
    tt = tt_svd(w, om, im, max_bond=bond)
    assert max(tt.bond_dims) <= bond
    assert relative_error(w, tt.to_matrix()) <= 1.0 + 1e-9
    assert all(c.shape[0] == (1 if k == 0 else tt.bond_dims[k - 1]) for k, c in enumerate(tt.cores))


def test_shared_svd_cache_gives_the_full_svd_result_at_every_bond():
    """inspect shares exact SVDs between truncations of one matrix: each must equal a fresh
    full-SVD TT-SVD at that bond (same cores up to float rounding)."""
    w = low_rank(96, 80, 30, seed=3)
    modes = choose_modes(96, 80, 4)
    cache: dict = {}
    tt_svd(w, *modes, svd="full", svd_cache=cache)
    assert len(cache) >= 1
    for b in (1, 3, 8, 40, 200):
        shared = tt_svd(w, *modes, max_bond=b, svd="full", svd_cache=cache)
        fresh = tt_svd(w, *modes, max_bond=b, svd="full")
        assert shared.bond_dims == fresh.bond_dims
        assert torch.allclose(shared.to_matrix(), fresh.to_matrix(), atol=1e-9)


def test_tensorly_interop_round_trip():
    tl = pytest.importorskip("tensorly")
    from tensorly.tt_matrix import tt_matrix_to_matrix

    from mpocompress.core.tt import TTMatrix

    w = low_rank(12, 20, 3, seed=5)
    tt = tt_svd(w, (3, 4), (4, 5), max_bond=3)
    theirs = tt.to_tensorly()
    with tl.backend_context("pytorch"):
        assert torch.allclose(tt_matrix_to_matrix(theirs), tt.to_matrix(), atol=1e-12)
    back = TTMatrix.from_tensorly(theirs)
    assert back.shape == (12, 20) and torch.equal(back.to_matrix(), tt.to_matrix())
    # a padded matrix: the caller gives the true shape
    padded = tt_svd(low_rank(11, 19, 3, seed=6), (3, 4), (4, 5), max_bond=3)
    assert TTMatrix.from_tensorly(padded.to_tensorly(), shape=(11, 19)).to_matrix().shape == (11, 19)
    with pytest.raises(ValueError):
        TTMatrix.from_tensorly([torch.zeros(1, 2, 2)])


@pytest.mark.parametrize("cores", [2, 3])
def test_transposed_cores_are_the_transposed_matrix(cores):
    from mpocompress.core.modes import choose_modes

    w = torch.randn(12, 20, generator=torch.Generator().manual_seed(3))
    tt = tt_svd(w, *choose_modes(12, 20, cores), max_bond=4)
    t = tt.transpose()
    assert t.shape == (20, 12) and t.bond_dims == tt.bond_dims and t.out_modes == tt.in_modes
    assert torch.allclose(t.to_matrix(), tt.to_matrix().T, atol=1e-6)
