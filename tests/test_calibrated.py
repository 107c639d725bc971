"""Data-aware compression: whitened SVD, activation-aware MPO, GPTQ, and Gram recording from a model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from mpocompress.codecs import parse_codec
from mpocompress.core.gptq import gptq
from mpocompress.core.modes import choose_modes
from mpocompress.core.refine import activation_refit, output_error
from mpocompress.core.tt import tt_svd
from mpocompress.core.whiten import activation_aware_tt, fit_to_inputs, kron_factors, whitened_svd
from mpocompress.jobs.calibrate import record_grams


def _correlated(n: int, feats: int, seed: int) -> torch.Tensor:
    mix = torch.randn(feats, feats, generator=torch.Generator().manual_seed(99)) / math.sqrt(feats)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, feats, generator=g) @ mix.T) * torch.logspace(0, -1.5, feats)


@pytest.fixture
def layer():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 60, generator=g) * 0.1
    x = _correlated(3000, 60, 1)
    return w, x.T @ x, _correlated(3000, 60, 2)


def test_whitened_svd_error_is_its_dropped_singular_values(layer):
    w, c, _ = layer
    for r in (4, 12):
        tt = whitened_svd(w, c, r, ridge=0.0)
        s = tt.spectra[0].double()
        predicted = math.sqrt(float((s[r:] ** 2).sum() / (s**2).sum()))
        assert output_error(w, tt.to_matrix(), c) == pytest.approx(predicted, rel=1e-6)
        plain = tt_svd(w, (48, 1), (1, 60), max_bond=r)
        assert output_error(w, tt.to_matrix(), c) < 0.9 * output_error(w, plain.to_matrix(), c)


def test_whitened_svd_generalises_to_held_out_inputs(layer):
    w, c, held_out = layer
    ch = held_out.T @ held_out
    tt = whitened_svd(w, c, 8)
    plain = tt_svd(w, (48, 1), (1, 60), max_bond=8)
    assert output_error(w, tt.to_matrix(), ch) < output_error(w, plain.to_matrix(), ch)


def test_kron_factors_recover_a_kronecker_gram():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 4, generator=g).double()
    b = torch.randn(5, 5, generator=g).double()
    a, b = a @ a.T + torch.eye(4, dtype=torch.float64), b @ b.T + torch.eye(5, dtype=torch.float64)
    fa, fb = kron_factors(torch.kron(a, b), (4, 5))
    assert torch.allclose(torch.kron(fa, fb) / torch.kron(fa, fb)[0, 0], torch.kron(a, b) / torch.kron(a, b)[0, 0])


def test_activation_aware_mpo_is_exact_whitening_for_kronecker_inputs():
    """With a Kronecker Gram, the whitened TT-SVD is the output-optimal TT-SVD: far better than plain."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(40, 60, generator=g)
    om, im = choose_modes(40, 60, 3)
    facs = []
    for m in im:
        f = torch.randn(m, m, generator=g).double()
        facs.append(f @ f.T * torch.logspace(0, -2, m, dtype=torch.float64) + 1e-3 * torch.eye(m, dtype=torch.float64))
    c = torch.kron(torch.kron(facs[0], facs[1]), facs[2])[:60, :60]
    plain = tt_svd(w, om, im, max_bond=6)
    aware = activation_aware_tt(w, c, om, im, plain.bond_dims, ridge=1e-9)
    assert aware.bond_dims == plain.bond_dims
    assert output_error(w, aware.to_matrix(), c) < 0.8 * output_error(w, plain.to_matrix(), c)


def test_kronecker_preconditioner_solves_each_core_in_one_step_for_kronecker_inputs():
    """With a Kronecker Gram and unpadded modes the preconditioner is the exact inverse Hessian of each
    core's quadratic: one preconditioned CG step per visit lands where 300 plain steps do."""
    g = torch.Generator().manual_seed(5)
    om, im = (4, 3, 4), (3, 4, 5)
    w = torch.randn(48, 60, generator=g).double()
    facs = []
    for m in im:
        f = torch.randn(m, m, generator=g).double()
        facs.append(f @ f.T + 0.1 * torch.eye(m, dtype=torch.float64))
    c = torch.kron(torch.kron(facs[0], facs[1]), facs[2])
    tt = tt_svd(w, om, im, max_bond=5)
    one = activation_refit(w, tt, c, sweeps=2, cg_iters=1, tol=0.0)
    plain_one = activation_refit(w, tt, c, sweeps=2, cg_iters=1, tol=0.0, precondition=False)
    exact = activation_refit(w, tt, c, sweeps=2, cg_iters=300, tol=0.0, precondition=False)
    assert one.history == pytest.approx(exact.history, rel=1e-6)
    assert plain_one.history[-1] > 1.01 * exact.history[-1]  # without it one step is far from the minimiser


def test_refit_stops_early_without_losing_the_optimum(layer):
    """The tolerance stops CG once steps gain little: the result matches a long run to within it."""
    w, c, _ = layer
    om, im = choose_modes(48, 60, 3)
    tt = tt_svd(w, om, im, max_bond=5)
    fast = activation_refit(w, tt, c)
    long = activation_refit(w, tt, c, cg_iters=500, tol=0.0)
    assert fast.history[-1] <= long.history[-1] * 1.02
    assert fast.history[-1] < 0.9 * fast.history[0]


def test_fit_to_inputs_never_worse_than_refit_and_keeps_bonds(layer):
    w, c, _ = layer
    om, im = choose_modes(48, 60, 3)
    tt = tt_svd(w, om, im, max_bond=5)
    best, info = fit_to_inputs(w, tt, c)
    assert best.bond_dims == tt.bond_dims and best.num_params == tt.num_params
    assert info["output_error_after"] <= min(info["output_error_refit"], info["output_error_aware_refit"]) * (1 + 1e-5)
    assert info["output_error_after"] < info["output_error_before"]
    two = tt_svd(w, (48, 1), (1, 60), max_bond=7)
    best2, info2 = fit_to_inputs(w, two, c)
    assert info2["method"] == "whitened_svd" and best2.bond_dims == [7]


@pytest.mark.parametrize("spec", ["int8", "kmeans:16", "kmeans:4", "rowkmeans:4"])
def test_gptq_beats_rounding_on_held_out_outputs_and_is_stored_exactly(layer, spec):
    w, c, held_out = layer
    ch = held_out.T @ held_out
    codec = parse_codec(spec)
    grid = codec.grid(w)
    rounded = torch.stack([codec.snap(grid, w[:, j]) for j in range(w.shape[1])], 1)
    q = gptq(w, c, lambda col: codec.snap(grid, col))
    assert output_error(w, q, ch) < 0.9 * output_error(w, rounded, ch)
    parts, meta = codec.encode(q.reshape(-1), w.shape[0], grid=grid)
    assert torch.equal(codec.decode(parts, meta, torch.float32).reshape(w.shape), q)


def test_weighted_kmeans_follows_the_weights():
    values = torch.tensor([0.0, 0.1, 0.2, 1.0, 1.1, 5.0])
    heavy = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1e6])
    c = parse_codec("kmeans:2").grid(values, heavy)
    assert float(c[-1]) == pytest.approx(5.0, abs=1e-3)
    c_plain = parse_codec("kmeans:2").grid(values)
    assert torch.equal(c_plain, parse_codec("kmeans:2").encode(values)[0]["codebook"])


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 2, (2, 3), stride=(1, 2), padding="valid")
        self.rnn = nn.LSTM(4, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.cell = nn.GRUCell(10, 6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, T)
        y = self.conv1(x)  # (B, 4, T)
        z = self.conv2(y[:, None])  # (B, 2, 3, T')
        h, _ = self.rnn(y.transpose(1, 2))  # (B, T, 10)
        hx = torch.zeros(x.shape[0], 6) + z.mean()
        for t in range(h.shape[1]):
            hx = self.cell(h[:, t], hx)
        return self.fc(hx)


def _energy(w: torch.Tensor, gram: torch.Tensor) -> float:
    w = w.detach().reshape(w.shape[0], -1).double()
    return float(torch.einsum("oi,ij,oj->", w, gram, w))


def test_record_grams_match_each_layers_outputs():
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(3, 3, 7)
    grams, info = record_grams(net, [x[:2], x[2:]])
    assert info["samples"] == 3
    # tr(W C W^T) is the energy of the weight's part of the layer's output
    y = net.conv1(x)
    assert _energy(net.conv1.weight, grams["conv1.weight"]) == pytest.approx(float(((y - net.conv1.bias[:, None]) ** 2).sum()), rel=1e-6)
    z = net.conv2(y[:, None])
    assert _energy(net.conv2.weight, grams["conv2.weight"]) == pytest.approx(float(((z - net.conv2.bias[:, None, None]) ** 2).sum()), rel=1e-6)
    # layer 1 of the LSTM sees layer 0's outputs (both directions)
    first = nn.LSTM(4, 5, bidirectional=True, batch_first=True)
    first.load_state_dict({k.replace("_l0", "_l0"): v for k, v in net.rnn.state_dict().items() if "_l0" in k})
    y0, _ = first(y.transpose(1, 2))
    assert torch.allclose(grams["rnn.weight_ih_l1"], (y0.reshape(-1, 10).double().T @ y0.reshape(-1, 10).double()), atol=1e-8)
    # the recurrent weight sees h_{t-1}: outputs one step behind (forward) / ahead (reverse)
    fwd, bwd = y0[..., :5], y0[..., 5:]
    prev = fwd[:, :-1].reshape(-1, 5).double()
    assert torch.allclose(grams["rnn.weight_hh_l0"], prev.T @ prev, atol=1e-8)
    nxt = bwd[:, 1:].reshape(-1, 5).double()
    assert torch.allclose(grams["rnn.weight_hh_l0_reverse"], nxt.T @ nxt, atol=1e-8)
    assert {"cell.weight_ih", "cell.weight_hh", "fc.weight"} <= set(grams)
    assert grams["fc.weight"].shape == (6, 6)


def test_record_grams_sample_cap():
    net = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(10, 4)
    grams, info = record_grams(net, [x[:4], x[4:8], x[8:]], max_samples=6)
    assert info["samples"] == 6
    assert torch.allclose(grams["0.weight"], x[:6].double().T @ x[:6].double())


def test_layers_fed_fewer_rows_than_inputs_are_named_with_one_warning(caplog):
    from mpocompress.jobs.calibrate import record_pairs, thin_inputs

    net = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 3))
    x = torch.randn(10, 4)  # 10 rows: enough for the first layer's 4 inputs, not the second's 16
    grams, info = record_grams(net, [x[:6], x[6:]])
    assert info["rows"] == {"0.weight": 10, "1.weight": 10}
    with caplog.at_level("WARNING", logger="mpocompress"):
        assert thin_inputs(info["rows"], grams) == ["1.weight"]
    assert [r.getMessage() for r in caplog.records if "fewer input rows" in r.getMessage()] == [
        "calibration: 1 of 2 weight(s) saw fewer input rows than they have inputs (fewest: 1.weight, 10 rows for 16 inputs); "
        "data-aware fits follow the calibration samples there: give more --data"]
    more, info = record_grams(net, [torch.randn(20, 4)])
    assert thin_inputs(info["rows"], more) == []
    counts: dict[str, int] = {}
    record_pairs(copy.deepcopy(net), net, [x[:6], x[6:]], weights={"0.weight", "1.weight"}, row_counts=counts)
    assert counts == {"0.weight": 10, "1.weight": 10}  # the sequential path counts the same


@pytest.mark.parametrize("spec", ["kmeans:4", "kmeans:16", "rowkmeans:4"])
def test_gptq_factors_beat_rounding_the_factors(layer, spec):
    """(int8's rounding error is too small for compensation to matter: convert keeps the better of the two.)"""
    from mpocompress.codecs import decode, encode
    from mpocompress.jobs.plan import gptq_factor_codes

    w, c, held_out = layer
    ch = held_out.T @ held_out
    tt = whitened_svd(w, c, 12)
    codec = parse_codec(spec)
    plain = [decode(*encode(core, [codec])) for core in tt.cores]
    ours = [decode(p, m) for p, m in gptq_factor_codes(w, tt, codec, c)]
    recon = lambda cores: cores[0].reshape(48, 12) @ cores[1].reshape(12, 60)  # noqa: E731
    assert output_error(w, recon(ours), ch) < output_error(w, recon(plain), ch)


def _kfac_loss(w, v, c, g):
    e = (w - v).double()
    g = torch.diag(g) if g.dim() == 1 else g
    return float(torch.trace(g.double() @ e @ c.double() @ e.T))


def test_kfac_whitened_svd_minimises_the_curvature_weighted_error(layer):
    w, c, _ = layer
    gen = torch.Generator().manual_seed(3)
    b = torch.randn(48, 48, generator=gen) * torch.logspace(0, -2, 48)
    g = (b @ b.T).double()  # an output curvature far from the identity
    plain = whitened_svd(w, c, 8).to_matrix()
    weighted = whitened_svd(w, c, 8, out_gram=g).to_matrix()
    assert _kfac_loss(w, weighted, c, g) < 0.7 * _kfac_loss(w, plain, c, g)
    assert output_error(w, plain, c) < output_error(w, weighted, c)  # each is optimal for its own objective
    for _ in range(5):  # and a local optimum: nearby rank-8 weights are worse
        near = whitened_svd(w + 1e-3 * torch.randn(w.shape, generator=gen), c, 8, out_gram=g).to_matrix()
        assert _kfac_loss(w, weighted, c, g) <= _kfac_loss(w, near, c, g) * (1 + 1e-6)
    # a diagonal curvature as a vector is the same as the diagonal matrix; the identity changes nothing
    d = torch.diagonal(g).clone()
    assert torch.allclose(whitened_svd(w, c, 8, out_gram=d).to_matrix(), whitened_svd(w, c, 8, out_gram=torch.diag(d)).to_matrix(), atol=1e-5)
    eye = torch.eye(48, dtype=torch.float64)
    assert torch.allclose(whitened_svd(w, c, 8, out_gram=eye).to_matrix(), plain, atol=1e-5)
    with pytest.raises(ValueError, match="output curvature"):
        whitened_svd(w, c, 8, out_gram=torch.ones(7))


def test_record_output_curvature_is_the_gauss_newton_matrix():
    from mpocompress.jobs.calibrate import record_output_curvature

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Linear(5, 4, bias=False), nn.Conv1d(4, 3, 1, bias=False))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.conv = net[0], net[1], net[2]

        def forward(self, x):  # (batch, time, 6) -> (batch, 3, time)
            return self.conv(self.b(self.a(x)).transpose(1, 2))

    model = Model()
    for p in model.parameters():
        p.requires_grad_(False)  # a frozen teacher
    batches = [torch.randn(4, 50, 6) for _ in range(25)]
    g = record_output_curvature(model, batches, weights={"a.weight", "b.weight", "conv.weight"})
    rows = 25 * 4 * 50
    # MSE: the loss <y, z>, z ~ N(0, I), has E[g g^T] = J^T J at each layer's output
    k = model.conv.weight[:, :, 0]
    assert torch.allclose(g["conv.weight"] / rows, torch.eye(3, dtype=torch.float64), atol=0.05)
    assert torch.allclose(g["b.weight"] / rows, (k.T @ k).double(), atol=0.05)
    jb = k @ model.b.weight
    assert torch.allclose(g["a.weight"] / rows, (jb.T @ jb).double(), atol=0.05)
    assert not any(p.requires_grad for p in model.parameters())  # restored


def _spd(m, g, scale=1.0):
    f = torch.randn(m, m, generator=g).double() * scale
    return f @ f.T + 0.1 * torch.eye(m, dtype=torch.float64)


def test_kfac_refit_preconditioner_is_exact_for_kronecker_input_and_output_curvature():
    """With ``C`` and the output weighting ``G`` both Kronecker products matching the modes, the
    preconditioner is the exact inverse Hessian of the K-FAC loss: one step per visit lands where 300
    plain steps do. ``G = I`` changes nothing."""
    g = torch.Generator().manual_seed(7)
    om, im = (4, 3, 4), (3, 4, 5)
    w = torch.randn(48, 60, generator=g).double()
    c = torch.kron(torch.kron(_spd(3, g), _spd(4, g)), _spd(5, g))
    gg = torch.kron(torch.kron(_spd(4, g), _spd(3, g)), _spd(4, g))
    tt = tt_svd(w, om, im, max_bond=5)
    kw = {"sweeps": 2, "tol": 0.0, "sweep_tol": 0.0, "product_dtype": torch.float64}
    one = activation_refit(w, tt, c, cg_iters=1, out_gram=gg, **kw)
    more = activation_refit(w, tt, c, cg_iters=20, out_gram=gg, **kw)  # nothing left to gain after one step
    plain = activation_refit(w, tt, c, cg_iters=300, precondition=False, out_gram=gg, **kw)
    assert one.history == pytest.approx(more.history, rel=1e-7)
    assert one.history == pytest.approx(plain.history, rel=1e-4)
    assert activation_refit(w, tt, c, cg_iters=1, precondition=False, out_gram=gg, **kw).history[-1] > 1.01 * one.history[-1]
    same = activation_refit(w, tt, c, out_gram=torch.eye(48, dtype=torch.float64), **kw)
    assert same.history == pytest.approx(activation_refit(w, tt, c, **kw).history, rel=1e-9)
    diag = activation_refit(w, tt, c, out_gram=torch.ones(48, dtype=torch.float64), **kw)  # a diagonal G as a vector
    assert diag.history == pytest.approx(same.history, rel=1e-9)
    with pytest.raises(ValueError, match="output weighting"):
        activation_refit(w, tt, c, out_gram=torch.eye(5))


def test_activation_aware_tt_unwhitens_the_output_legs_exactly():
    """At bonds that keep everything, the doubly whitened TT-SVD is exact after unwhitening (input and
    output legs, padded modes included)."""
    g = torch.Generator().manual_seed(8)
    for (out_f, in_f), om, im in (((48, 60), (4, 3, 4), (3, 4, 5)), ((45, 58), (4, 3, 4), (3, 4, 5))):
        w = torch.randn(out_f, in_f, generator=g).double()
        x = torch.randn(400, in_f, generator=g).double()
        gg = _spd(out_f, g)
        full = [min(math.prod(om[: k + 1]) * math.prod(im[: k + 1]), math.prod(om[k + 1 :]) * math.prod(im[k + 1 :])) for k in range(2)]
        tt = activation_aware_tt(w, x.T @ x, om, im, full, out_gram=gg)
        assert torch.allclose(tt.to_matrix(), w, atol=1e-8)


def test_fit_to_inputs_with_curvature_lowers_the_kfac_loss_for_every_core_count(layer):
    """With an output curvature, the fit minimises ``tr(G E C E^T)``: lower there than the plain fit
    (whose output error is the lower one), for 2 and 3 cores."""
    from mpocompress.core.whiten import loss_error, weighted_curvature

    w, c, _ = layer
    g = torch.Generator().manual_seed(9)
    scales = torch.logspace(-2, 1, 48, dtype=torch.float64)[torch.randperm(48, generator=g)]
    u = torch.randn(48, 48, generator=g).double()
    gg = (u * scales) @ u.T  # a strongly non-uniform output curvature
    for om, im, bond in (((48, 1), (1, 60), 8), (*choose_modes(48, 60, 3), 5)):
        tt = tt_svd(w, om, im, max_bond=bond)
        plain, p_info = fit_to_inputs(w, tt, c)
        kfac, k_info = fit_to_inputs(w, tt, c, out_gram=gg)
        ridged_g = weighted_curvature(gg)
        assert k_info["objective"] == "K-FAC loss" and p_info["objective"] == "output error"
        assert k_info["objective_after"] == pytest.approx(loss_error(w, kfac.to_matrix(), c, ridged_g), rel=1e-6)
        assert loss_error(w, kfac.to_matrix(), c, ridged_g) < 0.95 * loss_error(w, plain.to_matrix(), c, ridged_g)
        assert p_info["output_error_after"] < k_info["output_error_after"]
        assert kfac.bond_dims == tt.bond_dims


def test_auto_cores_with_data_continues_only_the_winner(layer):
    """``cores="auto"`` with a Gram fits every core count one sweep, picks the least objective and
    refits only that one further: its reported error is its fit's, no worse than its first sweep,
    and no other candidate's one-sweep error is lower."""
    from mpocompress import MPOConfig
    from mpocompress.core.compress import compress_matrix

    w, c, _ = layer
    res = compress_matrix(w, MPOConfig(ratio=2, cores="auto"), gram=c)
    chosen = next(k for k in res.candidates if k.cores == len(res.tt.cores))
    assert chosen.output_error == pytest.approx(res.fit["objective_after"], rel=1e-9)
    assert res.fit["objective_after"] == pytest.approx(output_error(w, res.tt.to_matrix(), c), rel=1e-6)
    assert all(chosen.output_error <= k.output_error * (1 + 1e-9) for k in res.candidates)
    assert sorted(k.cores for k in res.candidates) == [2, 3, 4]


def test_activation_refit_keeps_frozen_cores(layer):
    w, c, _ = layer
    om, im = choose_modes(48, 60, 3)
    tt = tt_svd(w, om, im, max_bond=4)
    res = activation_refit(w, tt, c, sweeps=2, frozen=frozenset({0, 2}))
    assert torch.equal(res.tt.cores[0], tt.cores[0]) and torch.equal(res.tt.cores[2], tt.cores[2])
    assert not torch.equal(res.tt.cores[1], tt.cores[1])
    assert res.history[-1] < res.history[0]


@pytest.mark.parametrize("spec", ["kmeans:4", "kmeans:16", "int8"])
def test_core_quantization_compensated_on_inputs_beats_rounding_the_cores(layer, spec):
    """3 cores fitted to the inputs, then quantized one at a time with the free cores refit to the
    outputs after each: better on held-out inputs than rounding every core."""
    from mpocompress.codecs import decode, encode
    from mpocompress.core.refine import refit_quantized
    from mpocompress.core.tt import cores_to_matrix
    from mpocompress.core.whiten import ridged

    w, c, held_out = layer
    ch = held_out.T @ held_out
    om, im = choose_modes(48, 60, 3)
    tt, _ = fit_to_inputs(w, tt_svd(w, om, im, max_bond=6), c)
    codec = parse_codec(spec)
    stored: dict[int, torch.Tensor] = {}

    def roundtrip(k: int, core: torch.Tensor) -> torch.Tensor:
        stored[k] = decode(*encode(core, [codec]))
        return stored[k]

    ours = refit_quantized(w, tt, roundtrip, sweeps=1, gram=ridged(c))
    assert all(torch.equal(ours.cores[k], stored[k]) for k in range(3))  # exactly what the codec stores
    plain = [decode(*encode(core, [codec])) for core in tt.cores]
    err = lambda cores: output_error(w, cores_to_matrix(cores, (48, 60)), ch)  # noqa: E731
    assert err(ours.cores) < err(plain)


def test_which_core_codecs_are_compensated():
    """int8 on SVD factors is nearly lossless: compensation there fitted the calibration inputs and lost
    on held-out ones on every real layer measured, so it is rounded (benchmarks/calibrated.py --core-codes)."""
    from mpocompress.jobs.plan import compensates

    assert not compensates(parse_codec("int8"), 2)
    assert compensates(parse_codec("kmeans:16"), 2) and compensates(parse_codec("int8"), 3)
    assert not compensates(parse_codec("fp16"), 3)
