import pytest
import torch

from mpocompress.config import MPOConfig
from mpocompress.core.compress import compress_matrix
from mpocompress.core.tt import relative_error, svd_tail_error
from mpocompress.errors import ConfigError


def decaying(o, i, seed=0, tau=6.0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(o, min(o, i), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(i, min(o, i), generator=g, dtype=torch.float64))
    return (u * torch.exp(-torch.arange(min(o, i), dtype=torch.float64) / tau)) @ v.T


def test_ratio_budget_is_met_and_svd_reference_is_exact():
    w = decaying(120, 200)
    res = compress_matrix(w, MPOConfig(ratio=4, cores=3))
    assert res.status == "mpo"
    assert res.params <= 120 * 200 / 4
    assert res.rel_error == pytest.approx(relative_error(w, res.tt.to_matrix()))
    s = torch.linalg.svdvals(w)
    assert res.svd_rank == res.params // (120 + 200)
    assert res.svd_rel_error == pytest.approx(svd_tail_error(s, res.svd_rank))


def test_auto_picks_the_least_error_at_the_budget():
    w = decaying(128, 128, tau=4.0)
    res = compress_matrix(w, MPOConfig(ratio=5, cores="auto"))
    errors = {c.cores: c.rel_error for c in res.candidates}
    assert set(errors) == {2, 3, 4}
    assert res.rel_error == min(errors.values())
    assert all(c.params <= 128 * 128 / 5 for c in res.candidates)


def test_auto_with_tolerance_picks_the_smallest():
    w = decaying(96, 96)
    res = compress_matrix(w, MPOConfig(tol=0.1, cores="auto"))
    assert res.params == min(c.params for c in res.candidates)
    assert res.rel_error <= 0.1 + 1e-12


def test_never_larger_than_dense():
    w = torch.randn(6, 5)
    res = compress_matrix(w, MPOConfig(bond_dim=64, cores=3))
    assert res.status == "dense" and res.tt is None
    assert res.params == 30 and "not be smaller" in res.reason


@pytest.mark.parametrize("kwargs", [{}, {"bond_dim": 0}, {"tol": 1.5}, {"ratio": 0.5}, {"ratio": 2, "tol": 0.1}, {"bond_dim": 4, "cores": 1}, {"bond_dim": 4, "svd": "qr"}])
def test_bad_config(kwargs):
    with pytest.raises(ConfigError):
        MPOConfig(**kwargs)


def test_config_round_trips_through_json():
    c = MPOConfig(bond_dim=8, tol=0.1, cores=3, include=("a*",), exclude=["re:b"])
    assert MPOConfig.from_json(c.to_json()) == c
