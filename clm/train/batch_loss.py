"""The loss of one batch of views, as the engines call it, and its sums for the log."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from clm.engine.base import Box
from clm.methods.base import Method
from clm.render.base import RenderOutput, View


def batch_loss(
    method: Method, targets: Sequence[Tensor], views: Sequence[View], images: int
) -> BatchLoss:
    """The batch's loss; a :class:`LocalBatchLoss` when the method says how far its loss
    looks (:meth:`Method.loss_reach`). ``images``: the images training has taken, this
    batch's included."""
    reach = method.loss_reach()
    if reach is None:
        return BatchLoss(method, targets, views, images)
    return LocalBatchLoss(method, targets, views, images, reach)


class BatchLoss:
    """``loss(i, out)``: the method's loss of view ``i`` of the batch against its target,
    divided by the batch size, with the loss and squared error summed for the log (no host
    sync)."""

    def __init__(
        self, method: Method, targets: Sequence[Tensor], views: Sequence[View], images: int
    ) -> None:
        self.method, self.targets, self.views, self.images = method, targets, views, images
        self.scale = 1.0 / len(views)
        device = targets[0].device if targets else torch.device("cpu")
        self.loss_sum = torch.zeros((), device=device)
        self.mse_sum = torch.zeros((), device=device)

    def __call__(self, i: int, out: RenderOutput) -> Tensor:
        target = self.targets[i]
        loss = self.method.loss(out, target, self.views[i], self.images)
        self.loss_sum = self.loss_sum + loss.detach()
        self.mse_sum = self.mse_sum + torch.mean((out.image[..., :3].detach() - target) ** 2)
        return loss * self.scale


class LocalBatchLoss(BatchLoss):
    """A :class:`BatchLoss` whose loss looks at most ``reach`` pixels away: a
    :class:`clm.engine.base.LocalLoss`, so an engine may train views in pieces in one pass."""

    def __init__(
        self,
        method: Method,
        targets: Sequence[Tensor],
        views: Sequence[View],
        images: int,
        reach: int,
    ) -> None:
        super().__init__(method, targets, views, images)
        self.reach = reach

    def crop(self, i: int, out: RenderOutput, box: Box) -> Tensor:
        """The loss of view ``i``'s pixels ``box``, held by ``out``, weighted by their share
        of the image: the loss being a mean over pixels, a pixel's gradient well inside the
        box is then its whole-image gradient."""
        x0, y0, x1, y1 = box
        target, view = self.targets[i], self.views[i]
        share = (x1 - x0) * (y1 - y0) / (view.width * view.height)
        loss = self.method.loss(out, target[y0:y1, x0:x1], view.crop(*box), self.images)
        return loss * (share * self.scale)
