"""The native CPU rasterizer (``kernels/cpu_raster.c``): what :mod:`clm.render.torch_rasterizer`
computes, tile by tile in C with OpenMP, so a CPU step costs time and memory in pixels plus
Gaussians (plus tile-list entries) instead of (pixel, Gaussian) pairs.

The kernel is compiled at first use and cached like the CPU Adam (:mod:`clm.optim.native`);
without a compiler :func:`usable` is False and callers keep the torch rasterizer. Every buffer is
a torch tensor allocated here, so :data:`last_workspace_bytes` accounts for all of it.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch
from torch import Tensor

from clm.optim import native

TILE = 16
_GRAD_FIXED = 6  # per-Gaussian gradient columns before the colours: mean x, y, conic a, b, c, o

#: Bytes of the buffers the last forward and backward allocated (outputs and saved state).
last_workspace_bytes = 0

_SIGNATURES = {
    "clm_raster_order": ["p", "q", "p", "p", "p"],
    "clm_raster_boxes": ["p", "p", "q", "i", "i", "p", "i"],
    "clm_raster_count": ["p", "p", "q", "i", "q", "p", "i"],
    "clm_raster_fill": ["p", "p", "q", "i", "q", "p", "p", "i"],
    "clm_raster_forward": [*"ppppppp", *"iii", *"pppppp", "i"],
    "clm_raster_backward": [*"ppppppp", *"iii", *"ppppppp", "i"],
    "clm_raster_reduce": ["p", "p", "p", "q", "p", "q", "p", "q", "i"],
    "clm_raster_reach": [*"ppppppp", "i", "i", "p", "i"],
}
_CTYPES = {"p": ctypes.c_void_p, "q": ctypes.c_int64, "i": ctypes.c_int32}


def _kernel() -> ctypes.CDLL | None:
    """The built kernel with its signatures declared, or None without a compiler."""
    lib = native.load("cpu_raster")
    if lib is not None:
        for name, args in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = [_CTYPES[a] for a in args], None
    return lib


def usable(*tensors: Tensor | None) -> bool:
    """Whether the kernel is built and takes these inputs: on the CPU, floats in float32."""
    return _kernel() is not None and all(
        t is None
        or (t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()))
        for t in tensors
    )


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _bytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _Rasterize(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        means2d: Tensor,
        conics: Tensor,
        colors: Tensor,
        opacities: Tensor,
        depths: Tensor,
        radii: Tensor,
        width: int,
        height: int,
        background: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        global last_workspace_bytes
        lib = _kernel()
        assert lib is not None
        threads = torch.get_num_threads()
        means2d, conics, colors, opacities = (
            t.detach().contiguous() for t in (means2d, conics, colors, opacities)
        )
        radii = radii.to(torch.int32).contiguous()
        bg = None if background is None else background.detach().contiguous()
        channels = colors.shape[1]
        n_tiles = -(-width // TILE) * -(-height // TILE)
        boxes, ids, tile_offsets, binning = _bin(lib, means2d, radii, depths, width, height)

        image = torch.empty(height, width, channels, dtype=torch.float32)
        alpha = torch.empty(height, width, 1, dtype=torch.float32)
        trans = torch.empty(height, width, dtype=torch.float64)
        last = torch.empty(height, width, dtype=torch.int32)
        used = torch.empty(n_tiles, dtype=torch.int64)
        lib.clm_raster_forward(
            _ptr(means2d), _ptr(conics), _ptr(colors), _ptr(opacities), _ptr(boxes), _ptr(ids),
            _ptr(tile_offsets), channels, width, height, _ptr(bg), _ptr(image), _ptr(alpha),
            _ptr(trans), _ptr(last), _ptr(used), threads,
        )  # fmt: skip
        ctx.save_for_backward(means2d, conics, colors, opacities, bg, boxes, ids, tile_offsets)
        used_offsets = torch.zeros(n_tiles + 1, dtype=torch.int64)
        torch.cumsum(used, 0, out=used_offsets[1:])
        ctx.state = (trans, last, used_offsets, width, height, threads)
        last_workspace_bytes = binning + _bytes(
            boxes, ids, tile_offsets, image, alpha, trans, last, used, used_offsets
        )
        return image, alpha

    @staticmethod
    def backward(ctx: Any, grad_image: Tensor, grad_alpha: Tensor) -> tuple[Tensor | None, ...]:
        global last_workspace_bytes
        lib = _kernel()
        assert lib is not None
        means2d, conics, colors, opacities, bg, boxes, ids, tile_offsets = ctx.saved_tensors
        trans, last, used_offsets, width, height, threads = ctx.state
        n, channels = colors.shape
        stride = _GRAD_FIXED + channels
        grad_image = grad_image.to(torch.float32).contiguous()
        grad_alpha = grad_alpha.to(torch.float32).contiguous()
        # One row per tile entry that some pixel used (usually far fewer than all entries).
        entry_grads = torch.empty(int(used_offsets[-1]), stride, dtype=torch.float32)
        lib.clm_raster_backward(
            _ptr(means2d), _ptr(conics), _ptr(colors), _ptr(opacities), _ptr(boxes), _ptr(ids),
            _ptr(tile_offsets), channels, width, height, _ptr(bg), _ptr(trans), _ptr(last),
            _ptr(used_offsets), _ptr(grad_image), _ptr(grad_alpha), _ptr(entry_grads), threads,
        )  # fmt: skip
        grads = torch.zeros(n, stride, dtype=torch.float32)
        lib.clm_raster_reduce(
            _ptr(ids), _ptr(tile_offsets), _ptr(used_offsets), tile_offsets.numel() - 1,
            _ptr(entry_grads), stride, _ptr(grads), n, threads,
        )  # fmt: skip
        last_workspace_bytes += _bytes(entry_grads, grads)
        grad_bg = None
        if bg is not None and ctx.needs_input_grad[8]:
            final_t = trans.to(torch.float32)[..., None]
            grad_bg = (final_t * grad_image).sum((0, 1))
        return (
            grads[:, 0:2],
            grads[:, 2:5],
            grads[:, _GRAD_FIXED:],
            grads[:, 5],
            None,
            None,
            None,
            None,
            grad_bg,
        )


def _bin(
    lib: ctypes.CDLL, means2d: Tensor, radii: Tensor, depths: Tensor, width: int, height: int
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Each Gaussian's pixel box, and per tile the Gaussians whose box meets it in depth order
    (stable: ties by index), one chunk of that order per thread: boxes, entries, per-tile
    offsets, and the bytes of the temporaries."""
    threads = torch.get_num_threads()
    n = means2d.shape[0]
    tiles_x, tiles_y = -(-width // TILE), -(-height // TILE)
    n_tiles = tiles_x * tiles_y
    depths = depths.detach().to(torch.float32).contiguous()
    keys = torch.empty(2 * n, dtype=torch.int32)
    order = torch.empty(n, dtype=torch.int32)
    scratch = torch.empty(n, dtype=torch.int32)
    lib.clm_raster_order(_ptr(depths), n, _ptr(keys), _ptr(order), _ptr(scratch))
    boxes = torch.empty(n, 4, dtype=torch.int32)
    lib.clm_raster_boxes(_ptr(means2d), _ptr(radii), n, width, height, _ptr(boxes), threads)
    counts = torch.zeros(threads, n_tiles, dtype=torch.int64)
    lib.clm_raster_count(_ptr(boxes), _ptr(order), n, tiles_x, n_tiles, _ptr(counts), threads)
    tile_offsets = torch.zeros(n_tiles + 1, dtype=torch.int64)
    torch.cumsum(counts.sum(0), 0, out=tile_offsets[1:])
    cursor = tile_offsets[:-1] + torch.cumsum(counts, 0) - counts
    ids = torch.empty(int(tile_offsets[-1]), dtype=torch.int32)
    lib.clm_raster_fill(
        _ptr(boxes), _ptr(order), n, tiles_x, n_tiles, _ptr(cursor), _ptr(ids), threads
    )
    return boxes, ids, tile_offsets, _bytes(keys, order, scratch, counts, cursor)


def reach(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    depths: Tensor,
    radii: Tensor,
    width: int,
    height: int,
) -> Tensor:
    """``[M]`` bool: the Gaussians :func:`rasterize` reads at some pixel, or a superset by the
    margins of :mod:`clm.render.reach` (``kernels/cpu_raster.c``'s ``clm_raster_reach``)."""
    lib = _kernel()
    assert lib is not None
    means2d, conics, opacities = (t.detach().contiguous() for t in (means2d, conics, opacities))
    radii = radii.to(torch.int32).contiguous()
    depths = depths.detach().to(torch.float32).contiguous()
    boxes, ids, tile_offsets, _ = _bin(lib, means2d, radii, depths, width, height)
    marks = torch.zeros(means2d.shape[0], dtype=torch.uint8)
    lib.clm_raster_reach(
        _ptr(means2d), _ptr(conics), _ptr(opacities), _ptr(depths), _ptr(boxes), _ptr(ids),
        _ptr(tile_offsets), width, height, _ptr(marks), torch.get_num_threads(),
    )  # fmt: skip
    return marks.bool()


def rasterize(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    depths: Tensor,
    radii: Tensor,
    width: int,
    height: int,
    background: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`clm.render.torch_rasterizer.rasterize` in C: image ``[H, W, C]``, alpha
    ``[H, W, 1]``, differentiable in means2d, conics, colors, opacities and background.

    Needs :func:`usable` inputs.
    """
    return _Rasterize.apply(
        means2d, conics, colors, opacities, depths, radii, width, height, background
    )
