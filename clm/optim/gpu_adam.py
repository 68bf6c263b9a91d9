"""Dense Adam on the GPU in one pass over memory (``kernels/adam.cu``), with torch's bits.

The key rows, the resident rows and ``--offload none`` step every row every step. In torch ops
that is seven kernels, each reading and writing whole tables, and a temporary: 25 ms of the
GPU's time a step at 40M Gaussians, where the step is bound by the GPU. The kernel reads and
writes each element once, with the same float operations rounded the same way. Off CUDA, or
without CuPy, the torch ops of :func:`clm.optim.lazy_adam.adam_step_columns` run instead.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from clm.offload.cuda_kernels import cupy_available, kernel, launch_blocks, pointer
from clm.optim.lazy_adam import AdamConfig, adam_step_columns, bias_corrections

ROWS_PER_BLOCK = 64  # as kernels/adam.cu
THREADS = 256


def adam_step_table(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    column_lrs: Sequence[tuple[int, int, float]],
    config: AdamConfig,
    zero_grad: bool = False,
) -> None:
    """Adam step ``step`` of ``[n, W]`` rows in place, whose column ranges ``(start, end, lr)``
    have their own learning rates (columns in no range keep their parameters but move their
    moments, as :func:`adam_step_columns`). The tables may be column slices of wider ones;
    ``zero_grad`` leaves zeros in ``grad``."""
    if not (param.is_cuda and cupy_available()):
        adam_step_columns(param, grad, exp_avg, exp_avg_sq, step, column_lrs, config)
        if zero_grad:
            grad.zero_()
        return
    n, width = param.shape
    if n == 0 or width == 0:
        return
    _check_rows(param, grad, exp_avg, exp_avg_sq)
    b1, b2 = config.betas
    bc1, bc2_sqrt = bias_corrections(config, step)
    step_size = _step_sizes(tuple(column_lrs), bc1, width, param.device)
    args = (
        _base(param),
        _base(exp_avg),
        _base(exp_avg_sq),
        np.int64(param.stride(0)),
        _base(grad),
        np.int64(grad.stride(0)),
        np.int64(n),
        np.int32(width),
        pointer(step_size),
        np.float32(1 - b1),
        np.float32(b2),
        np.float32(1 - b2),
        np.float32(1.0 / bc2_sqrt),
        np.float32(config.eps),
        np.int32(zero_grad),
    )
    blocks = -(-n // ROWS_PER_BLOCK)
    launch_blocks(kernel("adam.cu", "adam_columns"), blocks, (THREADS,), args)


@functools.lru_cache(maxsize=8)
def _step_sizes(
    column_lrs: tuple[tuple[int, int, float], ...], bc1: float, width: int, device: torch.device
) -> Tensor:
    """``-lr / bc1`` of each column (zero outside the ranges) on the GPU, made once for the
    chunks of a step that share them."""
    sizes = torch.zeros(width, dtype=torch.float32)
    for start, end, lr in column_lrs:
        sizes[start:end] = -(lr / bc1)
    return sizes.pin_memory().to(device, non_blocking=True)


def _check_rows(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
    """The kernel's layout: float32 rows of one shape, columns next to each other, and both
    moments laid out as the parameters."""
    for t in (param, grad, exp_avg, exp_avg_sq):
        if t.dtype != torch.float32 or t.dim() != 2 or t.shape != param.shape:
            raise ValueError("Adam tables must be float32 [n, W] of one shape")
        if t.stride(1) != 1 or t.device != param.device:
            raise ValueError("Adam tables must hold their columns next to each other")
    if exp_avg.stride() != param.stride() or exp_avg_sq.stride() != param.stride():
        raise ValueError("Adam's moments must be laid out as the parameters")


def _base(t: Tensor) -> np.uint64:
    """The address of a (possibly column-sliced) table's first element."""
    return np.uint64(t.data_ptr())
