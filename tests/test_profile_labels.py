"""tools/profile_step.py times the engine's phases from outside without changing its path: a
local loss stays local (views in pieces still train in one pass under --host-timers)."""

from pathlib import Path

import torch
from test_pieces import ring_views

from clm.engine.base import LocalLoss
from clm.methods.gaussians import GaussianSplatting
from clm.render.base import RenderOutput
from clm.train.batch_loss import batch_loss


def test_a_timed_local_loss_stays_local(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "tools"))
    import profile_step

    view = ring_views(1)[0]
    target = torch.rand(view.height, view.width, 3, generator=torch.Generator().manual_seed(0))
    loss = batch_loss(GaussianSplatting(), [target], [view], 1)
    timed = profile_step.labelled_loss(loss)
    assert isinstance(timed, LocalLoss) and timed.reach == loss.reach
    image = torch.rand(view.height, view.width, 3, generator=torch.Generator().manual_seed(1))
    out = RenderOutput(image, torch.ones(view.height, view.width, 1), *[torch.zeros(0)] * 3)
    monkeypatch.setattr(profile_step.CLOCK, "active", True)
    monkeypatch.setattr(profile_step.CLOCK, "seconds", {})
    box = (16, 16, 48, 40)
    crop = RenderOutput(out.image[16:40, 16:48], out.alpha[16:40, 16:48], *[torch.zeros(0)] * 3)
    torch.testing.assert_close(timed.crop(0, crop, box), loss.crop(0, crop, box))
    torch.testing.assert_close(timed(0, out), loss(0, out))
    assert profile_step.CLOCK.seconds["loss"] > 0
    assert not isinstance(profile_step.labelled_loss(lambda i, out: out.image.mean()), LocalLoss)
