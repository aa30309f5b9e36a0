"""Tests for the closed-form attention compensation (elmm.pruning.compensation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elmm.pruning.compensation import (
    CompensationAccumulator,
    ErrorMeter,
    solve_paper,
    solve_ridge,
)

D, N = 8, 200


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # A nonzero offset makes x̄ well away from 0, as for real hidden states.
    return rng.normal(size=(N, D)) + 0.5, rng.normal(size=(N, D))


def _fit(x: np.ndarray, e: np.ndarray, method: str, damp: float = 0.0) -> torch.Tensor:
    acc = CompensationAccumulator(D)
    acc.update(torch.from_numpy(x), torch.from_numpy(e))
    assert acc.count == N
    return acc.solve(method, damp=damp)


@pytest.mark.parametrize("damp", [0.0, 1e-10])
def test_ridge_matches_lstsq(damp: float) -> None:
    x, e = _data()
    expected = np.linalg.lstsq(x, e, rcond=None)[0]
    W = _fit(x, e, "ridge", damp)
    assert W.dtype == torch.float32 and W.shape == (D, D)
    np.testing.assert_allclose(W.numpy(), expected, atol=1e-6)


def test_ridge_damped_matches_formula() -> None:
    x, e = _data(1)
    damp = 0.3
    xtx = x.T @ x
    lam = damp * np.mean(np.diag(xtx))
    expected = np.linalg.solve(xtx + lam * np.eye(D), x.T @ e)
    np.testing.assert_allclose(_fit(x, e, "ridge", damp).numpy(), expected, atol=1e-6)
    # The standalone solver agrees with the accumulator path.
    direct = solve_ridge(torch.from_numpy(xtx), torch.from_numpy(x.T @ e), damp)
    np.testing.assert_allclose(direct.numpy(), expected, atol=1e-6)


def test_ridge_singular_raises_with_hint() -> None:
    x = np.zeros((N, D))
    x[:, 0] = 1.0  # rank 1, so XᵀX is singular and undamped Cholesky must fail
    with pytest.raises(RuntimeError, match="larger damp"):
        _fit(x, np.ones((N, D)), "ridge", 0.0)


def test_paper_matches_formula_and_is_rank_one() -> None:
    x, e = _data(2)
    xm, em = x.mean(0), e.mean(0)
    expected = np.outer(xm, em) / (xm @ xm)
    W = _fit(x, e, "paper")
    np.testing.assert_allclose(W.numpy(), expected, rtol=1e-5, atol=1e-7)
    # Rank 1 up to float32 rounding: the second singular value is negligible.
    sv = torch.linalg.svdvals(W.double())
    assert sv[1] < 1e-6 * sv[0]
    direct = solve_paper(torch.from_numpy(xm), torch.from_numpy(em))
    np.testing.assert_allclose(direct.numpy(), expected, rtol=1e-5, atol=1e-7)


def _padded_batches(x: np.ndarray, e: np.ndarray, garbage: float, dtype=torch.float32):
    """Split tokens into [B, T, D] batches with ragged lengths, padding filled with `garbage`."""
    rng = np.random.default_rng(3)
    batches, start = [], 0
    for lengths in ([30, 50, 20], [70, 10], [5, 15]):
        B, T = len(lengths), max(lengths) + 3
        xb = torch.full((B, T, D), garbage, dtype=dtype)
        eb = torch.full((B, T, D), -garbage, dtype=dtype)
        mask = torch.zeros(B, T, dtype=torch.bool)
        for b, n in enumerate(lengths):
            off = int(rng.integers(0, T - n + 1))  # left/right padding both occur
            xb[b, off : off + n] = torch.from_numpy(x[start : start + n]).to(dtype)
            eb[b, off : off + n] = torch.from_numpy(e[start : start + n]).to(dtype)
            mask[b, off : off + n] = True
            start += n
        batches.append((xb, eb, mask))
    assert start == N
    return batches


@pytest.mark.parametrize("garbage", [0.0, 1e30])
@pytest.mark.parametrize("method", ["ridge", "paper"])
def test_streaming_with_padding_equals_one_shot(method: str, garbage: float) -> None:
    x, e = _data(4)
    # One-shot reference on the same float32-rounded real tokens.
    x32, e32 = x.astype(np.float32), e.astype(np.float32)
    one_shot = CompensationAccumulator(D)
    one_shot.update(torch.from_numpy(x32), torch.from_numpy(e32))

    streamed = CompensationAccumulator(D)
    for xb, eb, mask in _padded_batches(x, e, garbage):
        streamed.update(xb, eb, mask)

    assert streamed.count == N
    torch.testing.assert_close(streamed.solve(method, 1e-2), one_shot.solve(method, 1e-2))


def test_exact_linear_error_is_compensated() -> None:
    x, _ = _data(5)
    A = np.random.default_rng(6).normal(size=(D, D))
    e = x @ A
    W = _fit(x, e, "ridge", 0.0)

    meter = ErrorMeter()
    # float64 tokens so that only W's float32 rounding remains in the "after" error.
    for xb, eb, mask in _padded_batches(x, e, garbage=1e30, dtype=torch.float64):
        meter.update(xb, eb, W, mask)
    r = meter.result()
    assert r["tokens"] == N
    assert r["before"] > 1.0
    assert r["relative"] < 1e-6
    # The accumulator's closed-form residual agrees that the fit is (near) exact.
    acc = CompensationAccumulator(D)
    acc.update(torch.from_numpy(x), torch.from_numpy(e))
    energy = acc.residual_energy(W)
    assert energy["after"] < 1e-8 * energy["before"]


def test_error_meter_without_compensation() -> None:
    x, e = _data(7)
    meter = ErrorMeter()
    meter.update(torch.from_numpy(x), torch.from_numpy(e), None)
    r = meter.result()
    assert r["before"] == pytest.approx(np.linalg.norm(e, axis=1).mean())
    assert r["after"] == r["before"] and r["relative"] == 1.0
    assert ErrorMeter().result() == {"before": 0.0, "after": 0.0, "relative": 0.0, "tokens": 0}


def test_none_is_zero_and_unknown_method_raises() -> None:
    x, e = _data(8)
    acc = CompensationAccumulator(D)
    acc.update(torch.from_numpy(x), torch.from_numpy(e))
    W = acc.solve("none")
    assert W.dtype == torch.float32 and torch.count_nonzero(W) == 0 and W.shape == (D, D)
    with pytest.raises(ValueError, match="ridge, paper, none"):
        acc.solve("bogus")
