"""Closed-form linear compensation for pruned attention sub-blocks.

A pruned layer computes `x + x @ W_c` instead of `x + attn(LN(x))`. `W_c` is
fitted on calibration tokens so that `x @ W_c` approximates the error `eps` the
pruning introduces (e.g. the removed attention output).

Methods:
    `ridge`  least squares over all tokens, `W = (XᵀX + λI)⁻¹ XᵀE` with
               `λ = damp * mean(diag(XᵀX))`.
    `paper`  Theorem 1 taken literally, `W = pinv(x̄) ē = x̄ᵀ ē / ‖x̄‖²` (rank 1).
    `none`   no compensation, `W = 0`.

Everything is accumulated in float64 because XᵀX over many tokens of a large
residual stream loses too much precision in float32 for a stable solve.
"""

from __future__ import annotations

import torch

METHODS = ("ridge", "paper", "none")


def _real_tokens(
    x: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten `[..., D]` inputs to float64 `[N, D]` rows, dropping padding.

    Padding rows are removed by indexing (not by zeroing-and-multiplying) so that
    NaN/inf garbage in padded positions cannot leak into the sums.
    """
    if x.shape != eps.shape:
        raise ValueError(f"x and eps shapes differ: {tuple(x.shape)} vs {tuple(eps.shape)}")
    dim = x.shape[-1]
    x2 = x.detach().reshape(-1, dim)
    e2 = eps.detach().reshape(-1, dim)
    if mask is not None:
        if mask.shape != x.shape[:-1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match x {tuple(x.shape[:-1])}")
        keep = mask.detach().reshape(-1).to(device=x2.device, dtype=torch.bool)
        x2, e2 = x2[keep], e2[keep]
    return x2.to(torch.float64), e2.to(torch.float64)


def solve_ridge(xtx: torch.Tensor, xte: torch.Tensor, damp: float) -> torch.Tensor:
    """Solve `(XᵀX + λI) W = XᵀE` with `λ = damp * mean(diag(XᵀX))`; returns float32 `W`.

    The damping is relative to the mean diagonal so one `damp` value works across
    layers whose hidden-state scales differ by orders of magnitude.
    """
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    xtx = xtx.to(torch.float64)
    xte = xte.to(torch.float64)
    lam = damp * torch.diagonal(xtx).mean()
    a = xtx + lam * torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        raise RuntimeError(
            f"Cholesky failed: XᵀX + λI is not positive definite (damp={damp}, λ={float(lam):.3e}); "
            "use a larger damp or more calibration tokens."
        )
    return torch.cholesky_solve(xte, chol).to(torch.float32)


def solve_paper(mean_x: torch.Tensor, mean_e: torch.Tensor) -> torch.Tensor:
    """Rank-1 solution `pinv(x̄) ē = x̄ᵀ ē / ‖x̄‖²` from the mean token rows; returns float32 `W`."""
    mean_x = mean_x.reshape(-1).to(torch.float64)
    mean_e = mean_e.reshape(-1).to(torch.float64)
    norm_sq = mean_x.dot(mean_x)
    if norm_sq == 0:
        raise ValueError("mean calibration token is zero; its pseudo-inverse gives W = 0")
    return (torch.outer(mean_x, mean_e) / norm_sq).to(torch.float32)


class CompensationAccumulator:
    """Streams calibration tokens into float64 sufficient statistics for every method.

    Holds `xtx` = XᵀX [D, D], `xte` = XᵀE [D, D], `sum_x` [D], `sum_e` [D],
    the token count, and `sum_e_sq` = ‖E‖²_F so the fit's residual energy can be
    reported without a second pass (see `residual_energy`).
    """

    def __init__(self, dim: int, device: str | torch.device = "cpu") -> None:
        self.dim = dim
        kw = {"dtype": torch.float64, "device": device}
        self.xtx = torch.zeros(dim, dim, **kw)
        self.xte = torch.zeros(dim, dim, **kw)
        self.sum_x = torch.zeros(dim, **kw)
        self.sum_e = torch.zeros(dim, **kw)
        self.sum_e_sq = torch.zeros((), **kw)
        self._count = 0

    @property
    def count(self) -> int:
        """Number of real (non-padding) tokens seen."""
        return self._count

    def update(self, x: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add a batch: `x`, `eps` are `[..., D]`; `mask` is `[...]` with True = real token."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected last dim {self.dim}, got {x.shape[-1]}")
        xs, es = _real_tokens(x, eps, mask)
        xs, es = xs.to(self.xtx.device), es.to(self.xtx.device)
        self.xtx += xs.T @ xs
        self.xte += xs.T @ es
        self.sum_x += xs.sum(0)
        self.sum_e += es.sum(0)
        self.sum_e_sq += (es * es).sum()
        self._count += xs.shape[0]

    def solve(self, method: str, damp: float = 1e-2) -> torch.Tensor:
        """Return the float32 `[D, D]` compensation matrix for `method` (zeros for `none`)."""
        if method not in METHODS:
            raise ValueError(f"unknown compensation method {method!r}; valid: {', '.join(METHODS)}")
        if method == "none":
            return torch.zeros(self.dim, self.dim, dtype=torch.float32, device=self.xtx.device)
        if self._count == 0:
            raise ValueError("no calibration tokens accumulated")
        if method == "ridge":
            return solve_ridge(self.xtx, self.xte, damp)
        return solve_paper(self.sum_x / self._count, self.sum_e / self._count)

    def residual_energy(self, W: torch.Tensor) -> dict[str, float]:
        """Mean squared error per token on the calibration set, before and after `W`.

        Uses ‖E − XW‖² = ‖E‖² − 2·tr(Wᵀ XᵀE) + tr(Wᵀ XᵀX W), so no tokens are revisited.
        """
        n = max(self._count, 1)
        w = W.to(self.xtx)
        after = self.sum_e_sq - 2 * (w * self.xte).sum() + (w * (self.xtx @ w)).sum()
        return {"before": float(self.sum_e_sq) / n, "after": max(float(after), 0.0) / n}


class ErrorMeter:
    """Mean per-token L2 norm of the error before (‖eps‖) and after (‖eps − xW‖) compensation."""

    def __init__(self) -> None:
        self.sum_before = 0.0
        self.sum_after = 0.0
        self.tokens = 0

    def update(
        self,
        x: torch.Tensor,
        eps: torch.Tensor,
        W: torch.Tensor | None,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Add a batch; `W=None` means no compensation (after == before)."""
        xs, es = _real_tokens(x, eps, mask)
        before = es.norm(dim=-1)
        after = before if W is None else (es - xs @ W.to(xs)).norm(dim=-1)
        self.sum_before += float(before.sum())
        self.sum_after += float(after.sum())
        self.tokens += xs.shape[0]

    def result(self) -> dict:
        """`{"before", "after", "relative" (after/before, 0 if before == 0), "tokens"}`."""
        n = max(self.tokens, 1)
        before, after = self.sum_before / n, self.sum_after / n
        return {
            "before": before,
            "after": after,
            "relative": after / before if before > 0 else 0.0,
            "tokens": self.tokens,
        }
