"""Lazy sparse Adam: rows are brought up to date only when they receive a gradient.

The reference is ``torch.optim.Adam`` stepped densely every step, where a row that is not seen
in a step gets a zero gradient, so its momentum keeps moving it. Here each row remembers
``last``, the step its state was last brought up to date. When the row next arrives at step
``t`` we first apply the ``k = t - 1 - last`` skipped zero-gradient steps in closed form and
then the normal Adam step with the new gradient.

Closed form of the skipped steps (t0 = last): at a zero-gradient step τ the state is
``m_τ = b1^(τ-t0) m`` and ``v_τ = b2^(τ-t0) v`` and the update is
``lr_τ / bc1_τ · m_τ / (sqrt(v_τ / bc2_τ) + eps)``. Dropping ``eps`` in the skipped steps only,
the sum factors into ``(m / sqrt(v)) · S(t0)`` with the per-step scalar sum
``S(t0) = Σ_τ lr_τ · sqrt(bc2_τ) / bc1_τ · (b1 / sqrt(b2))^(τ-t0)``, kept by :class:`SkipTable`.
The relative error of each skipped update is about ``eps / sqrt(v̂_τ)``: 1e-7 for eps = 1e-8 and
gradients of order 0.1, and 1e-10 for eps = 1e-15 and gradients of order 1e-5. Elements with
``v == 0`` (never had a non-zero gradient, so ``m == 0`` too) are left alone. The catch-up is
done in float64. The normal step is torch's single-tensor Adam (``foreach=False``), the same
float32 operations in the same order, so a row that is never skipped gets torch's bits.

A table that has seen steps 1..n serves updates at step n + 1 and catch-ups to step n. After a
checkpoint taken right after a full catch-up, every row has ``last = n``, so a resumed run only
needs new tables advanced through steps 1..n again (entries below n are never read).

Everything here works on plain 2-D tensors on any device: it runs on the GPU for GPU-resident
attributes and is the CPU fallback of :mod:`clm.optim.cpu_adam` (per chunk).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# Rows processed per block by the torch implementation: bounds the float64 temporaries.
_ROW_BLOCK = 1 << 16
# The skip sums ignore steps whose weight r^j has fallen below 2^-63 (1 - r); see SkipTable.
_TRUNCATION_LOG2 = -63


@dataclass(frozen=True)
class AdamConfig:
    """Adam hyper-parameters shared by every attribute (learning rates are per segment)."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-15

    def __post_init__(self) -> None:
        b1, b2 = self.betas
        if not (0.0 <= b1 < 1.0 and 0.0 < b2 < 1.0):
            raise ValueError(
                f"Adam betas must satisfy 0 <= b1 < 1 and 0 < b2 < 1, got {self.betas}"
            )
        if not self.eps > 0.0:
            raise ValueError(f"Adam eps must be positive, got {self.eps}")


def bias_corrections(config: AdamConfig, step: int) -> tuple[float, float]:
    """``(1 - b1^t, sqrt(1 - b2^t))`` in float64, computed exactly as torch.optim.Adam does."""
    b1, b2 = config.betas
    return 1 - b1**step, (1 - b2**step) ** 0.5


class SkipTable:
    """Closed-form sums over skipped zero-gradient steps, one table per learning-rate group.

    After :meth:`advance` has been called for steps 1..n, ``sums[t0]`` holds
    ``Σ_{τ=t0+1}^{n} lr_τ · sqrt(bc2_τ) / bc1_τ · r^(τ-t0)`` with ``r = b1 / sqrt(b2)``, and
    ``decay[i, k]`` holds ``b_i^k``. Advancing adds the new step's term to every entry; the term
    shrinks like ``r^(τ-t0)``, so only the last ``window`` entries change: the ones left out
    would change by less than ``2^-63`` relative to their first term, below float64 rounding even
    when the per-step weights vary a thousandfold within the window. That needs ``r < 1``, i.e.
    ``b1 < sqrt(b2)``, which Adam's convergence analysis assumes anyway.
    """

    def __init__(self, config: AdamConfig, device: torch.device | str = "cpu") -> None:
        b1, b2 = config.betas
        ratio = b1 / math.sqrt(b2)
        if ratio >= 1.0:
            raise ValueError(
                f"lazy Adam needs b1 < sqrt(b2) so skipped steps decay, got betas {config.betas}"
            )
        self.config = config
        self.device = torch.device(device)
        self.window = _window(ratio)
        # ratio^window .. ratio^1: the weights of the new step for t0 = t-window .. t-1.
        exponents = torch.arange(self.window, 0, -1, dtype=torch.float64)
        self._ratio_powers = torch.pow(ratio, exponents).to(self.device)
        self._step = 0
        self._sums = torch.zeros(0, dtype=torch.float64, device=self.device)
        self._decay = torch.zeros(2, 0, dtype=torch.float64, device=self.device)
        self._reserve(1024)

    @property
    def step(self) -> int:
        """The last step whose learning rate has been folded in."""
        return self._step

    @property
    def sums(self) -> Tensor:
        """float64 ``[step + 1]``: skip sums indexed by a row's ``last``."""
        return self._sums[: self._step + 1]

    @property
    def decay(self) -> Tensor:
        """float64 ``[2, step + 1]``: ``b1^k`` and ``b2^k``, indexed by the skipped step count."""
        return self._decay[:, : self._step + 1]

    def advance(self, step: int, lr: float) -> None:
        """Fold in step ``step`` (which must be ``self.step + 1``), taken with learning rate ``lr``.

        Call it once per optimiser step after every row update of that step: updates at step t
        need the table at t - 1, a catch-up to step t needs it at t.
        """
        if step != self._step + 1:
            raise ValueError(f"SkipTable is at step {self._step}; cannot advance to step {step}")
        if step >= self._sums.numel():
            self._reserve(2 * self._sums.numel())
        bc1, bc2_sqrt = bias_corrections(self.config, step)
        lo = max(0, step - self.window)
        weights = self._ratio_powers[self.window - (step - lo) :]
        self._sums[lo:step].add_(weights, alpha=lr * bc2_sqrt / bc1)
        self._step = step

    def _reserve(self, capacity: int) -> None:
        old = self._sums.numel()
        sums = torch.zeros(capacity, dtype=torch.float64, device=self.device)
        sums[:old] = self._sums
        b1, b2 = self.config.betas
        powers = [[b**k for k in range(capacity)] for b in (b1, b2)]
        self._sums = sums
        self._decay = torch.tensor(powers, dtype=torch.float64).to(self.device)


def _window(ratio: float) -> int:
    """Steps after which a skip term ``ratio^j`` is negligible (see SkipTable)."""
    if ratio == 0.0:
        return 1
    bound = _TRUNCATION_LOG2 * math.log(2.0) + math.log1p(-ratio)
    return max(1, math.ceil(bound / math.log(ratio)))


@dataclass(frozen=True)
class Segment:
    """Columns ``[start, end)`` of a row belonging to one attribute: its lr at this step and
    the skip table holding its learning-rate history."""

    start: int
    end: int
    lr: float
    table: SkipTable


def check_segments(segments: Sequence[Segment], n_cols: int, table_step: int) -> AdamConfig:
    """Validate segments for rows of ``n_cols`` columns whose tables must be at ``table_step``;
    returns their shared config."""
    if not segments:
        raise ValueError("at least one segment is needed")
    config = segments[0].table.config
    prev_end = 0
    for seg in segments:
        if not (prev_end <= seg.start < seg.end <= n_cols):
            raise ValueError(
                f"segments must be sorted, non-empty, disjoint and within {n_cols} columns: "
                f"got [{seg.start}, {seg.end}) after column {prev_end}"
            )
        if seg.table.config != config:
            raise ValueError("all segments must share one AdamConfig")
        if seg.table.step != table_step:
            raise ValueError(
                f"segment [{seg.start}, {seg.end}) table is at step {seg.table.step}, "
                f"expected {table_step}"
            )
        prev_end = seg.end
    return config


def active_width(width: int | None, n_cols: int) -> int:
    """The number of leading columns an update may touch: ``width``, or all when None."""
    if width is None:
        return n_cols
    if not 0 < width <= n_cols:
        raise ValueError(f"width must be in 1..{n_cols}, got {width}")
    return width


def adam_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float,
    config: AdamConfig,
) -> None:
    """One dense Adam step in place, with torch.optim.Adam's exact single-tensor arithmetic
    (no weight decay, no amsgrad); ``step`` counts from 1."""
    bc1, denom = _moments(grad, exp_avg, exp_avg_sq, step, config)
    param.addcdiv_(exp_avg, denom, value=-(lr / bc1))


def adam_step_columns(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    column_lrs: Sequence[tuple[int, int, float]],
    config: AdamConfig,
) -> None:
    """:func:`adam_step` for ``[n, W]`` rows whose column ranges ``(start, end, lr)`` have
    their own learning rates: the moments are updated once over all columns, then each range's
    parameters. Per element the arithmetic is :func:`adam_step`'s, in fewer launches."""
    bc1, denom = _moments(grad, exp_avg, exp_avg_sq, step, config)
    for start, end, lr in column_lrs:
        cols = slice(start, end)
        param[:, cols].addcdiv_(exp_avg[:, cols], denom[:, cols], value=-(lr / bc1))


def _moments(
    grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, config: AdamConfig
) -> tuple[float, Tensor]:
    """Update both moments in place; returns the first bias correction and Adam's denominator."""
    b1, b2 = config.betas
    exp_avg.lerp_(grad, 1 - b1)
    exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    bc1, bc2_sqrt = bias_corrections(config, step)
    return bc1, exp_avg_sq.sqrt().div_(bc2_sqrt).add_(config.eps)  # one temporary


def lazy_step_rows(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    last: Tensor,
    rows: Tensor,
    grads: Tensor,
    step: int,
    segments: Sequence[Segment],
    width: int | None = None,
    skip_zero: bool = True,
) -> int:
    """Lazy Adam step ``step`` for ``rows`` (unique int64) with gradients ``grads[:, :width]``;
    returns the number of rows stepped.

    ``param``, ``exp_avg``, ``exp_avg_sq`` are ``[N, W]`` float32, ``last`` is ``[N]`` int32.
    Only the first ``width`` columns (default W) are read or written. With ``skip_zero``, a row
    on the CPU whose gradient is all zero is not touched: that step is a skipped step, applied
    at its next catch-up. The segment tables must be at ``step - 1``.
    """
    width = active_width(width, param.shape[1])
    config = check_segments(segments, param.shape[1], step - 1)
    stepped = 0
    for lo in range(0, rows.numel(), _ROW_BLOCK):
        g = grads[lo : lo + _ROW_BLOCK, :width]
        r = rows[lo : lo + _ROW_BLOCK]
        if skip_zero and r.device.type == "cpu":  # (elsewhere this would wait for the device)
            live = g.ne(0).any(1)
            r, g = r[live], g[live]
        stepped += r.numel()
        p, m, v = param[r, :width], exp_avg[r, :width], exp_avg_sq[r, :width]
        catch_up_block(p, m, v, last[r], step - 1, segments, width)
        for seg in segments:
            cols = slice(seg.start, min(seg.end, width))
            if cols.start < cols.stop:
                adam_step(p[:, cols], g[:, cols], m[:, cols], v[:, cols], step, seg.lr, config)
        param[r, :width] = p
        exp_avg[r, :width] = m
        exp_avg_sq[r, :width] = v
        last.index_fill_(0, r, step)  # not last[r] = step: that copies the scalar to the device
    return stepped


def lazy_catch_up(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    last: Tensor,
    rows: Tensor | None,
    step: int,
    segments: Sequence[Segment],
    width: int | None = None,
) -> Tensor:
    """Apply every pending zero-gradient step up to and including ``step`` to ``rows`` (all rows
    when None), leaving ``last = step``; the segment tables must be at ``step``. Returns how
    many rows had steps pending, a 0-d tensor on their device (no host sync)."""
    width = active_width(width, param.shape[1])
    check_segments(segments, param.shape[1], step)
    n = param.shape[0] if rows is None else rows.numel()
    pending = torch.zeros((), dtype=torch.int64, device=last.device)
    for lo in range(0, n, _ROW_BLOCK):
        if rows is None:
            r = slice(lo, min(n, lo + _ROW_BLOCK))
            # Views: the catch-up writes straight into the tensors.
            p, m, v = param[r, :width], exp_avg[r, :width], exp_avg_sq[r, :width]
            pending += (last[r] < step).sum()
            catch_up_block(p, m, v, last[r], step, segments, width)
            last[r].fill_(step)
        else:
            r = rows[lo : lo + _ROW_BLOCK]
            p, m, v = param[r, :width], exp_avg[r, :width], exp_avg_sq[r, :width]
            pending += (last[r] < step).sum()
            catch_up_block(p, m, v, last[r], step, segments, width)
            param[r, :width] = p
            exp_avg[r, :width] = m
            exp_avg_sq[r, :width] = v
            last.index_fill_(0, r, step)
    return pending


def catch_up_block(
    p: Tensor,
    m: Tensor,
    v: Tensor,
    last: Tensor,
    upto: int,
    segments: Sequence[Segment],
    width: int,
) -> None:
    """Bring rows whose state is at ``last`` up to step ``upto`` with zero gradients, in place.

    Rows already at ``upto`` go through the same arithmetic with ``S = 0`` and decay 1, which
    leaves them unchanged; that avoids a device sync to select the rows that need it.
    """
    t0 = last.long().clamp_(max=upto)
    k = upto - t0
    decay = segments[0].table.decay
    d1, d2 = decay[0, k].unsqueeze(1), decay[1, k].unsqueeze(1)
    for seg in segments:
        cols = slice(seg.start, min(seg.end, width))
        if cols.start >= cols.stop:
            continue
        s = seg.table.sums[t0].unsqueeze(1)
        p64, m64, v64 = p[:, cols].double(), m[:, cols].double(), v[:, cols].double()
        p[:, cols] = torch.where(v64 > 0, p64 - m64 / v64.sqrt() * s, p64)
        m[:, cols] = m64 * d1
        v[:, cols] = v64 * d2
