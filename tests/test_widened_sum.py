"""Sums into a wider type (float32 terms into a float64 total): ``compiled.context.widened_sum``.

The terms are summed 256 at a time in their own type, then the partial sums in float64. Integer-valued
terms make every order of summation exact, so the split into partial sums and a remainder is checked with
``torch.equal``; for real terms the error is held to the bound of a float32 sum of 256 non-negative terms.
"""
from __future__ import annotations

import re

import pytest
import torch

from opdsl.compiled.context import PARTIAL_SUM_LENGTH, widened_sum

UNIT_ROUNDOFF = 2.0 ** -24  # float32


@pytest.mark.parametrize("numel", [0, 1, 255, 256, 257, 256 * 40 + 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_term_is_summed_once(numel, dtype):
    terms = (torch.arange(numel) % 7 - 3).to(dtype)  # small integers: exact in any order, in float32 partial sums
    total = widened_sum(terms, torch.float64)
    assert total.dtype == torch.float64 and total.shape == ()
    assert torch.equal(total, terms.double().sum())


def test_error_stays_within_a_float32_sum_of_one_partial_sums_terms():
    """Squares over eight decades: the relative error is at most (256 - 1) float32 roundings, the worst case
    of any order of summing 256 non-negative terms; the float64 sum of the partial sums adds nothing visible."""
    generator = torch.Generator().manual_seed(0)
    g = torch.randn(256 * 977 + 101, generator=generator) * 10.0 ** (8 * torch.rand(256 * 977 + 101, generator=generator) - 4)
    squares = g * g
    exact = squares.double().sum()  # float32 squares are exact in float64; this sum errs by ~1e-13 relative
    error = (widened_sum(squares, torch.float64) - exact).abs() / exact
    assert error <= (PARTIAL_SUM_LENGTH - 1) * UNIT_ROUNDOFF
    # and it is a wider sum's accuracy, not float32's: a plain float32 sum of the same terms is further off
    assert error < (squares.sum().double() - exact).abs() / exact


@pytest.mark.parametrize("where", [3, 256 * 3 + 5])  # in a partial sum, in the remainder
def test_inf_and_nan_reach_the_total(where):
    terms = torch.ones(256 * 3 + 7)
    terms[where] = float("inf")
    assert widened_sum(terms, torch.float64) == float("inf")
    terms[where] = float("nan")
    assert widened_sum(terms, torch.float64).isnan()


def test_compiled_the_terms_are_summed_in_their_own_type():
    """Converting every float32 term to float64 made the pass arithmetic-bound on a CPU (2.5x the time of its
    read): compiled, no loop runs over all the terms; the loop of 256 sums float32 and float64 appears only
    over the 64 partial sums and the remainder."""
    from torch._inductor.utils import run_and_get_code

    numel = 256 * 64 + 5
    g = torch.randn(numel)
    out, (code,) = run_and_get_code(torch.compile(lambda x: widened_sum(x * x, torch.float64)), g)
    torch.testing.assert_close(out, (g.double() ** 2).sum(), rtol=(PARTIAL_SUM_LENGTH - 1) * UNIT_ROUNDOFF, atol=0)
    bounds = {int(n) for n in re.findall(r"x\d+<static_cast<int64_t>\((\d+)L\)", code)}
    assert PARTIAL_SUM_LENGTH in bounds and numel not in bounds and numel - 5 not in bounds, code
