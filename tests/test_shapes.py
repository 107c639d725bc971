import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpocompress.core.modes import (
    MAX_PAD,
    balanced_factors,
    bond_dims_for,
    choose_modes,
    full_ranks,
    max_bond_for_budget,
    middle_heavy,
    mpo_params,
    padded_size,
)

PRIMES = [2, 3, 5, 7, 61, 127, 161, 257, 521, 1031]


def test_balanced_factors_known():
    assert balanced_factors(600, 3) == (6, 10, 10)
    assert balanced_factors(4096, 4) == (8, 8, 8, 8)
    assert balanced_factors(7, 3) == (1, 1, 7)


def test_middle_heavy_puts_large_modes_in_the_middle():
    assert middle_heavy((2, 3, 5, 7)) == (2, 5, 7, 3)
    assert middle_heavy((4, 4, 16)) == (4, 16, 4)


def test_awkward_sizes_are_padded_not_left_alone():
    assert padded_size(257, 3) > 257
    assert padded_size(30522, 3) == 30720  # 30 * 32 * 32
    assert padded_size(1024, 3) == 1024  # powers of two split well enough as they are
    out_modes, in_modes = choose_modes(257, 161, 3)
    assert max(out_modes) < 257 and max(in_modes) < 161


def test_two_cores_is_the_plain_matrix():
    assert choose_modes(257, 512, 2) == ((257, 1), (1, 512))


@settings(max_examples=150, deadline=None)
@given(n=st.one_of(st.integers(1, 5000), st.sampled_from(PRIMES)), d=st.integers(2, 5))
def test_padding_is_bounded_and_factors_multiply(n, d):
    m = padded_size(n, d)
    assert n <= m <= max(n, math.floor(n * (1 + MAX_PAD)))
    f = balanced_factors(m, d)
    assert len(f) == d and math.prod(f) == m


@settings(max_examples=100, deadline=None)
@given(o=st.integers(1, 700), i=st.integers(1, 700), d=st.integers(2, 4))
def test_choose_modes_cover_the_matrix(o, i, d):
    om, im = choose_modes(o, i, d)
    assert len(om) == len(im) == d
    assert math.prod(om) >= o and math.prod(im) >= i


@pytest.mark.parametrize("budget", [50, 500, 5000, 50000])
def test_max_bond_for_budget_is_the_largest_that_fits(budget):
    om, im = choose_modes(96, 160, 3)
    b = max_bond_for_budget(om, im, budget)
    p = mpo_params(om, im, bond_dims_for(om, im, b))
    assert b == 1 or p <= budget
    if b < max(full_ranks(om, im)):
        assert mpo_params(om, im, bond_dims_for(om, im, b + 1)) > budget
