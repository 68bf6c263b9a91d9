"""What the pieces of a view add up to: the stitched render and the whole-image gradients.

Both ways of training a view in pieces (:mod:`clm.offload.pieces`) end the same: the rows the
pieces drew, their centres and radii, and their screen-space gradients summed per row, as
density control would get them from a whole-image render (:class:`PieceGrads`).
:class:`ImageGrad` backpropagates the loss of an image stitched beforehand (two passes);
:class:`CropGrad` backpropagates the loss of each piece's own region (one pass).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from clm.engine.base import LocalLoss
from clm.offload.pieces import Piece
from clm.render.base import RenderOutput


class Canvas:
    """A whole view stitched from its pieces' renders (no gradients), with the rows they drew."""

    def __init__(self) -> None:
        self.image: Tensor | None = None
        self.alpha: Tensor | None = None
        self._drawn: list[tuple[Tensor, Tensor, Tensor]] = []  # global rows, centres, radii
        self._unread: list[Tensor] = []  # global rows drawn but left out of the renders

    def paint(self, piece: Piece, out: RenderOutput, rows: Tensor) -> None:
        """Keep the window of ``out``, a render of ``piece.full`` from ``rows`` alone."""
        if self.image is None or self.alpha is None:
            self.image, self.alpha = torch.empty_like(out.image), torch.empty_like(out.alpha)
        with torch.no_grad():
            piece.cut(self.image).copy_(piece.cut(out.image))
            piece.cut(self.alpha).copy_(piece.cut(out.alpha))
        self._drawn.append((rows[out.ids], out.means2d.detach(), out.radii))

    def also_drawn(self, rows: Tensor) -> None:
        """Rows the view draws that no piece renders, as none of its pixels reads them
        (:mod:`clm.offload.read_rows`)."""
        self._unread.append(rows)

    def output(self) -> RenderOutput:
        """The whole render; ``ids`` are the drawn rows (global, ascending), as each piece's
        render projects a row the same way their centres and radii are taken from any one
        (zeros for rows drawn but left out of every render)."""
        if self.image is None or self.alpha is None:
            raise ValueError("nothing painted")
        rendered = torch.cat([d[0] for d in self._drawn])
        ids, inverse = torch.unique(torch.cat([rendered, *self._unread]), return_inverse=True)
        inverse = inverse[: rendered.numel()]
        means2d = torch.cat([d[1] for d in self._drawn])
        radii = torch.cat([d[2] for d in self._drawn])
        means2d = means2d.new_zeros(ids.numel(), 2).index_copy_(0, inverse, means2d)
        radii = radii.new_zeros(ids.numel(), radii.shape[1]).index_copy_(0, inverse, radii)
        return RenderOutput(self.image, self.alpha, means2d, radii, ids)


class PieceGrads:
    """The screen-space gradients of a view's pieces, summed per row over the whole render."""

    def __init__(self) -> None:
        self._grads: list[tuple[Tensor, Tensor]] = []  # global rows, their centres' gradients

    def record(self, out: RenderOutput, rows: Tensor) -> None:
        """Keep the screen-space gradients of ``out`` (rendered from ``rows``, after backward)."""
        if out.means2d.grad is not None:
            self._grads.append((rows[out.ids], out.means2d.grad))

    def _observed(self, whole: RenderOutput) -> tuple[Tensor, RenderOutput]:
        out = RenderOutput(
            whole.image.detach(), whole.alpha.detach(), whole.means2d, whole.radii, whole.ids
        )
        if self._grads:
            grad = torch.zeros_like(whole.means2d)
            for rows, g in self._grads:
                grad.index_add_(0, torch.searchsorted(whole.ids, rows), g)
            out.means2d.grad = grad
        return whole.ids, out


class ImageGrad(PieceGrads):
    """Pass 2 of a view rendered in two passes: the loss gradient with respect to its image
    stitched in pass 1 (and alpha), applied to each piece's window."""

    paints = False  # pass 1 has painted the whole view

    def __init__(self, canvas: Canvas, loss: Callable[[RenderOutput], Tensor]) -> None:
        super().__init__()
        self.whole = canvas.output()
        image = self.whole.image.requires_grad_()
        alpha = self.whole.alpha.requires_grad_()
        loss(self.whole).backward()
        self.wrt_image, self.wrt_alpha = image.grad, alpha.grad

    def loss(self, piece: Piece, out: RenderOutput) -> Tensor | None:
        """What a render of ``piece.full`` backpropagates: its window times the image gradient
        (None when the loss does not depend on the image)."""
        pairs = ((out.image, self.wrt_image), (out.alpha, self.wrt_alpha))
        terms = [(piece.cut(o) * piece.cut(g)).sum() for o, g in pairs if g is not None]
        return torch.stack(terms).sum() if terms else None

    def backward(self, piece: Piece, out: RenderOutput, rows: Tensor) -> None:
        """Backpropagate the window of ``out``, a render of ``piece.full`` from ``rows``."""
        loss = self.loss(piece, out)
        if loss is not None:
            loss.backward()
        self.record(out, rows)

    def observed(self) -> tuple[Tensor, RenderOutput]:
        """Global rows and the whole render, its ``means2d.grad`` the sum of the pieces': what
        ``observe`` gets for a view rendered whole."""
        return self._observed(self.whole)


class CropGrad(PieceGrads):
    """A view trained in one pass: each piece backpropagates the loss of its region (the
    window and a margin of at least the loss's reach) to the window's pixels alone.

    The loss is a mean of terms that look at most ``reach`` pixels away, and the region's
    render is exact, so a window pixel's gradient from the crop is its whole-image gradient;
    the windows tile the image, so every pixel's gradient is taken once.
    """

    paints = True  # the pieces' renders are the only ones

    def __init__(self, i: int, loss: LocalLoss) -> None:
        super().__init__()
        self.i, self.local_loss = i, loss
        self.canvas = Canvas()

    def backward(self, piece: Piece, out: RenderOutput, rows: Tensor) -> None:
        """Backpropagate the window of ``out``, a render of ``piece.full`` from ``rows``
        (none: the piece is background, only painted)."""
        self.canvas.paint(piece, out, rows)
        if rows.numel() == 0:
            return
        x0, y0, x1, y1 = piece.box
        image = out.image[y0:y1, x0:x1].detach().requires_grad_()
        alpha = out.alpha[y0:y1, x0:x1].detach().requires_grad_()
        crop = RenderOutput(image, alpha, out.means2d.detach(), out.radii, out.ids)
        with torch.enable_grad():
            loss = self.local_loss.crop(self.i, crop, piece.box)
        wrt = torch.autograd.grad(loss, (image, alpha), allow_unused=True)
        # The window inside the region: its pixels' gradients are exact, the margin's are not.
        dx, dy = piece.x0 - x0, piece.y0 - y0
        terms = [
            (piece.cut(o) * g[dy : dy + piece.height, dx : dx + piece.width]).sum()
            for o, g in zip((out.image, out.alpha), wrt, strict=True)
            if g is not None
        ]
        if terms:
            torch.stack(terms).sum().backward()
        self.record(out, rows)

    def observed(self) -> tuple[Tensor, RenderOutput]:
        """As :meth:`ImageGrad.observed`; the loss of the stitched view is also evaluated,
        without gradients, so the caller's log sees the whole view's loss."""
        whole = self.canvas.output()
        with torch.no_grad():
            self.local_loss(self.i, whole)
        return self._observed(whole)
