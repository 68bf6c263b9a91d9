"""CUDA kernels from kernels/*.cu, compiled at run time through CuPy/NVRTC (cached by CuPy).

CuPy is optional: without it (or without CUDA) callers use their pure-torch twins.
"""

from __future__ import annotations

import functools
from typing import Any

from clm.package_data import kernel_source


@functools.cache
def cupy_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver, no device: all mean "use the torch path"
        return False


@functools.cache
def kernel(source: str, name: str) -> Any:
    """A compiled kernel function ``name`` from ``kernels/<source>``."""
    import cupy

    code = kernel_source(source).decode()
    module = cupy.RawModule(code=code, options=("--std=c++17",), name_expressions=None)
    return module.get_function(name)


def pointer(tensor: Any) -> Any:
    """A contiguous CUDA tensor as a kernel argument: its address, with none of the per-call
    cost of wrapping it in a CuPy array."""
    import numpy as np

    if not tensor.is_contiguous():
        raise ValueError("kernel arguments must be contiguous")
    return np.uint64(tensor.data_ptr())


def launch(fn: Any, n: int, args: tuple, stream: Any = None, block: int = 256) -> None:
    """Launch over ``n`` threads on a torch CUDA stream (the current one by default)."""
    import torch

    if n == 0:
        return
    torch_stream = stream if stream is not None else torch.cuda.current_stream()
    grid = ((n + block - 1) // block,)
    with _cupy_stream(torch_stream.cuda_stream):  # CuPy launches on its current stream
        fn(grid, (block,), args)


@functools.cache
def side_kernel(source: str, name: str) -> Any:
    """:func:`kernel`, for a kernel that runs on a side stream beside the render and uses no
    shared memory: it asks for an SM's largest shared-memory carveout.

    An SM splits its on-chip memory between L1 and shared memory, and changes the split only
    when it is empty. A kernel that uses none gets an SM configured with none, and a render
    kernel that needs shared memory then waits for that SM to drain: in the (e) benchmark the
    render of a view waited for a whole 18 ms gather of the next view's rows."""
    fn = kernel(source, name)
    fn.preferred_shared_memory_carveout = 100  # percent of the most an SM can have
    return fn


def launch_strided(
    fn: Any, n: int, args: tuple, stream: Any, blocks: int, block: int = 256
) -> None:
    """Launch a grid-stride kernel over ``n`` items in at most ``blocks`` blocks on a torch
    CUDA stream (each thread covers items ``i, i + grid size, ...``)."""
    if n == 0:
        return
    grid = (max(1, min(blocks, (n + block - 1) // block)),)
    with _cupy_stream(stream.cuda_stream):
        fn(grid, (block,), args)


def launch_blocks(fn: Any, blocks: int, block: tuple[int, ...], args: tuple) -> None:
    """Launch ``blocks`` blocks of ``block`` threads (a tile, a run of rows: the kernel says
    what each covers), on the current torch CUDA stream."""
    import torch

    if blocks == 0:
        return
    with _cupy_stream(torch.cuda.current_stream().cuda_stream):
        fn((blocks,), (*block, 1, 1)[:3], args)


@functools.cache
def _cupy_stream(handle: int) -> Any:
    """CuPy's view of a torch stream (one per stream handle)."""
    import cupy

    return cupy.cuda.ExternalStream(handle)
