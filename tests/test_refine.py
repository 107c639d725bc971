"""ALS refinement, quantization refit and activation refit of MPO cores (mpocompress.core.refine)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpocompress.codecs import decode, encode, parse_codec
from mpocompress.core.modes import choose_modes
from mpocompress.core.refine import activation_refit, als_refine, output_error, refit_quantized
from mpocompress.core.tt import TTMatrix, cores_to_matrix, relative_error, tt_svd


def decaying(out_f, in_f, seed=0, scale=8.0):
    g = torch.Generator().manual_seed(seed)
    k = min(out_f, in_f)
    u, _ = torch.linalg.qr(torch.randn(out_f, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(in_f, k, generator=g))
    return (u * torch.exp(-torch.arange(k) / scale)) @ v.T


@settings(max_examples=25, deadline=None)
@given(
    out_f=st.integers(4, 70),
    in_f=st.integers(4, 70),
    cores=st.integers(2, 4),
    bond=st.integers(1, 6),
    seed=st.integers(0, 10),
)
def test_als_never_raises_the_weight_error(out_f, in_f, cores, bond, seed):
    w = decaying(out_f, in_f, seed) + 0.05 * torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    om, im = choose_modes(out_f, in_f, cores)
    tt = tt_svd(w, om, im, max_bond=bond)
    res = als_refine(w, tt, sweeps=3)
    start = relative_error(w, tt.to_matrix())
    assert res.history[0] == pytest.approx(start, rel=1e-6, abs=1e-6)
    assert relative_error(w, res.tt.to_matrix()) <= start + 1e-6
    # padding is imputed, so each sweep lowers the error on the real entries (up to rounding)
    for a, b in zip(res.history, res.history[1:]):
        assert b <= a + 1e-9
    assert [c.shape for c in res.tt.cores] == [c.shape for c in tt.cores]  # bonds fixed


def test_als_lowers_the_error_on_a_planted_case():
    """A low-rank TT signal plus a distractor that dominates the first unfolding but is full rank in
    the second: TT-SVD's greedy first truncation keeps the distractor, ALS moves away from it."""
    g = torch.Generator().manual_seed(0)
    cores = [torch.randn(1, 4, 4, 2, generator=g), torch.randn(2, 4, 4, 2, generator=g), torch.randn(2, 4, 4, 1, generator=g)]
    signal = cores_to_matrix(cores)
    signal = signal / signal.norm()
    u = torch.randn(16, generator=g)
    v = torch.randn(256, generator=g)
    distractor = (u[:, None] * v[None, :] / (u.norm() * v.norm())).reshape(4, 4, 4, 4, 4, 4)
    distractor = distractor.permute(0, 2, 4, 1, 3, 5).reshape(64, 64)
    w = signal + 0.6 * distractor
    tt = tt_svd(w, (4, 4, 4), (4, 4, 4), max_bond=2)
    res = als_refine(w, tt, sweeps=10)
    assert res.history[0] > 0.6
    assert res.rel_error < res.history[0] - 0.08
    assert relative_error(w, res.tt.to_matrix()) == pytest.approx(res.rel_error, rel=1e-5)


def test_als_keeps_frozen_cores_and_dtype():
    w = decaying(48, 40)
    om, im = choose_modes(48, 40, 3)
    tt = tt_svd(w, om, im, max_bond=4)
    res = als_refine(w, tt, sweeps=2, frozen={0})
    assert torch.equal(res.tt.cores[0], tt.cores[0])
    assert all(c.dtype == torch.float32 for c in res.tt.cores)
    with pytest.raises(ValueError, match="does not match"):
        als_refine(w[:10], tt)


def _kmeans_roundtrip(k):
    chain = [parse_codec(f"kmeans:{k}")]

    def rt(_i, core):
        return decode(*encode(core, chain))

    return rt


def test_quantization_refit_returns_exactly_the_quantized_cores_and_lowers_the_error():
    w = decaying(96, 80, seed=3, scale=20.0)
    om, im = choose_modes(96, 80, 3)
    tt = als_refine(w, tt_svd(w, om, im, max_bond=8), sweeps=2).tt
    rt = _kmeans_roundtrip(4)
    direct = TTMatrix([rt(k, c) for k, c in enumerate(tt.cores)], tt.shape)
    seen = {}

    def spy(k, core):
        seen[k] = rt(k, core)
        return seen[k]

    refit = refit_quantized(w, tt, spy, sweeps=2)
    assert sorted(seen) == [0, 1, 2]
    for k, c in enumerate(refit.cores):
        assert torch.equal(c, seen[k])  # what is returned is what the codec stores
        assert c.unique().numel() <= 4
    err_direct = relative_error(w, direct.to_matrix())
    err_refit = relative_error(w, refit.to_matrix())
    assert err_refit < err_direct


def test_activation_refit_lowers_the_output_error():
    """Inputs living in a low-dimensional subspace: a fit to the outputs beats a fit to the weights."""
    g = torch.Generator().manual_seed(0)
    w = decaying(64, 48, seed=1, scale=30.0)
    basis = torch.randn(48, 6, generator=g)
    x = torch.randn(500, 6, generator=g) @ basis.T + 0.01 * torch.randn(500, 48, generator=g)
    gram = x.T @ x
    om, im = choose_modes(64, 48, 3)
    tt = tt_svd(w, om, im, max_bond=6)
    before = output_error(w, tt.to_matrix(), gram)
    res = activation_refit(w, tt, gram, sweeps=4)
    after = output_error(w, res.tt.to_matrix(), gram)
    assert res.history[0] == pytest.approx(before, rel=1e-6)
    assert before > 0.5
    assert after < 0.1 * before
    assert after == pytest.approx(min(res.history), rel=1e-5)
    # and the outputs themselves agree better
    y = x @ w.T
    assert (y - x @ res.tt.to_matrix().T).norm() < (y - x @ tt.to_matrix().T).norm()
    with pytest.raises(ValueError, match="Gram matrix"):
        activation_refit(w, tt, gram[:5, :5])


@pytest.mark.parametrize("shape,modes", [((48, 60), ((4, 3, 4), (3, 4, 5))), ((45, 58), ((4, 3, 4), (3, 4, 5))), ((40, 30), ((2, 2, 2, 5), (2, 3, 5, 1)))])
def test_core_maps_match_the_contraction_and_its_transpose(shape, modes):
    """The refit's per-core map (through contracted environments) equals contracting the cores with the
    core replaced, cropped to the matrix; its adjoint equals autograd's transpose of that map."""
    from mpocompress.core.refine import _CoreMaps

    g = torch.Generator().manual_seed(3)
    tt = tt_svd(torch.randn(*shape, generator=g), modes[0], modes[1], max_bond=4)
    cores = [c.double() for c in tt.cores]
    for k in range(len(cores)):
        maps = _CoreMaps(cores, k, shape, torch.float64)
        x = torch.randn(cores[k].shape, generator=g, dtype=torch.float64)
        m = torch.randn(*shape, generator=g, dtype=torch.float64)
        assert torch.allclose(maps.matrix(x), cores_to_matrix([x if j == k else c for j, c in enumerate(cores)], shape), atol=1e-12)
        gk = torch.zeros_like(x, requires_grad=True)
        (want,) = torch.autograd.grad((cores_to_matrix([gk if j == k else c for j, c in enumerate(cores)], shape) * m).sum(), gk)
        assert torch.allclose(maps.adjoint(m), want, atol=1e-10)


def test_activation_refit_float32_products_fit_like_float64_and_sweeps_stop_when_flat():
    g = torch.Generator().manual_seed(1)
    w = decaying(60, 72, seed=2, scale=20.0).double()
    x = torch.randn(400, 72, generator=g, dtype=torch.float64) * torch.logspace(0, 3, 72, dtype=torch.float64)  # channel scales 1..1000
    gram = x.T @ x
    om, im = choose_modes(60, 72, 3)
    tt = tt_svd(w, om, im, max_bond=5)
    full = activation_refit(w, tt, gram, sweeps=6, sweep_tol=0.0, product_dtype=torch.float64)
    fast = activation_refit(w, tt, gram, sweeps=6, sweep_tol=0.0)
    assert fast.history[-1] == pytest.approx(full.history[-1], rel=2e-3)
    assert len(full.history) == 7
    stopped = activation_refit(w, tt, gram, sweeps=6, sweep_tol=0.05)
    gains = [1 - (b / a) ** 2 for a, b in zip(stopped.history, stopped.history[1:])]
    assert all(gn >= 0.05 for gn in gains[:-1]) and gains[-1] < 0.05  # stopped at the first flat sweep
    assert len(stopped.history) < 7


def test_activation_refit_is_scale_free_in_float32():
    """A Gram (and output weighting) scaled by 1e30 fits exactly as at unit scale: the float32
    products work on unit-scale copies."""
    g = torch.Generator().manual_seed(4)
    w = decaying(40, 30, seed=3, scale=10.0).double()
    x = torch.randn(300, 30, generator=g, dtype=torch.float64) * torch.logspace(0, 2, 30, dtype=torch.float64)
    om, im = choose_modes(40, 30, 3)
    tt = tt_svd(w, om, im, max_bond=4)
    gw = torch.rand(40, generator=g, dtype=torch.float64) + 0.5
    unit = activation_refit(w, tt, x.T @ x, out_gram=gw)
    huge = activation_refit(w, tt, 1e30 * (x.T @ x), out_gram=1e30 * gw)
    assert huge.history == pytest.approx(unit.history, rel=1e-6)
    assert huge.history[-1] < 0.8 * huge.history[0]
