"""Adaptive density control, the 3DGS strategy: clone small Gaussians and split large ones where
the screen-space gradient is high, prune transparent and oversized ones, reset opacities.

The method says which gradient drives it (:meth:`Method.densify_gradient`: 2DGS has its own)
and how a Gaussian splits (:meth:`Method.split`); the spec's culling roles say which attributes
hold sizes and opacities. Decisions read only those key attributes, which every engine keeps on
the compute device, and what the split reads of the rows being split; the engine copies the
rest of each row itself. Unlike gsplat 1.5.3's DefaultStrategy, the opacity reset really
happens every ``reset_every`` images.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from clm.engine.base import Engine
from clm.methods.base import Method
from clm.model.spec import GaussianSpec
from clm.model.table import Compaction
from clm.render.base import RenderOutput, View
from clm.train.recipe import images_to_steps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DensifyConfig:
    """The 3DGS recipe; intervals are in images (converted to steps with the batch size)."""

    start: int = 500
    stop: int = 15_000
    every: int = 100
    reset_every: int = 3_000
    grad_threshold: float = 0.0002
    grow_scale3d: float = 0.01
    prune_opacity: float = 0.005
    prune_scale3d: float = 0.1
    reset_opacity: float = 0.01


@dataclass
class DensifyReport:
    cloned: int = 0
    split: int = 0
    pruned: int = 0
    capped: int = 0


class DensityController:
    def __init__(
        self,
        cfg: DensifyConfig,
        method: Method,
        spec: GaussianSpec,
        extent: float,
        batch_size: int,
        device: torch.device,
        max_gaussians: int | None = None,
        seed: int = 0,
    ) -> None:
        self.cfg = cfg
        self.method, self.spec = method, spec
        self.extent = extent
        self.batch_size = batch_size
        self.device = device
        self.max_gaussians = max_gaussians
        self.start = images_to_steps(cfg.start, batch_size)
        self.stop = images_to_steps(cfg.stop, batch_size)
        self.every = images_to_steps(cfg.every, batch_size)
        self.reset_every = images_to_steps(cfg.reset_every, batch_size)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.grad2d = torch.zeros(0, device=device)
        self.count = torch.zeros(0, device=device)
        self._warned_cap = False

    def _ensure_size(self, n: int) -> None:
        if self.grad2d.shape[0] != n:
            self.grad2d = torch.zeros(n, device=self.device)
            self.count = torch.zeros(n, device=self.device)

    def observe(self, ids: Tensor, out: RenderOutput, view: View, num_gaussians: int) -> None:
        """Accumulate the screen-space gradient of each rendered Gaussian (after backward)."""
        grad = self.method.densify_gradient(out) if self.stop > 0 else None
        if grad is None:
            return
        self._ensure_size(num_gaussians)
        # Undo the 1/B of the batch loss and scale to NDC, as a batched gsplat render would.
        # (Python scalars, not a device tensor: making one would wait for this view's backward.)
        grad = grad.detach()
        sx, sy = view.width / 2.0 * self.batch_size, view.height / 2.0 * self.batch_size
        norms = torch.hypot(grad[..., 0] * sx, grad[..., 1] * sy)
        ids = ids.to(self.device)
        self.grad2d.index_add_(0, ids, norms.to(self.device))
        self.count.index_add_(0, ids, torch.ones_like(norms, device=self.device))

    def after_step(self, engine: Engine, step: int) -> DensifyReport | None:
        """Refine and/or reset at the steps the schedule says; None when nothing was due."""
        if step >= self.stop:
            return None
        report = None
        if step > self.start and self.every and step % self.every == 0:
            report = self._refine(engine, step)
        if self.reset_every and step % self.reset_every == 0:
            report = report or DensifyReport()
            engine.reset_opacity(math.log(self.cfg.reset_opacity / (1 - self.cfg.reset_opacity)))
        return report

    @torch.no_grad()
    def _refine(self, engine: Engine, step: int) -> DensifyReport:
        n = engine.num_gaussians
        self._ensure_size(n)
        report = DensifyReport()
        grads = self.grad2d / self.count.clamp_min(1)
        scales = self._largest_scales(engine)
        high = grads > self.cfg.grad_threshold
        small = scales <= self.cfg.grow_scale3d * self.extent
        clone, split = high & small, high & ~small
        clone, split, report.capped = self._cap_growth(clone, split, grads, n)

        clone_ids = torch.nonzero(clone).squeeze(1)
        if clone_ids.numel():
            engine.append(clone_ids, {})
        report.cloned = int(clone_ids.numel())

        split_ids = torch.nonzero(split).squeeze(1)
        if split_ids.numel():
            self._split(engine, split_ids)
        report.split = int(split_ids.numel())

        total = engine.num_gaussians
        keep = torch.ones(total, dtype=torch.bool, device=self.device)
        keep[split_ids] = False
        opacity = torch.sigmoid(engine.key_param(self.spec.cull.opacity_logit).reshape(-1))
        keep &= opacity >= self.cfg.prune_opacity
        if step > self.reset_every:
            keep &= self._largest_scales(engine) <= self.cfg.prune_scale3d * self.extent
        report.pruned = int((~keep).sum()) - report.split
        if not bool(keep.all()):
            engine.compact(Compaction.from_keep(keep))
        self.grad2d = torch.zeros(engine.num_gaussians, device=self.device)
        self.count = torch.zeros(engine.num_gaussians, device=self.device)
        return report

    def _largest_scales(self, engine: Engine) -> Tensor:
        return torch.exp(engine.key_param(self.spec.cull.log_scales)).max(dim=-1).values

    def _split(self, engine: Engine, ids: Tensor) -> None:
        """Two children per Gaussian, as the method splits it."""
        parents = {name: engine.attribute_rows(name, ids) for name in self.method.split_reads}
        engine.append(ids.repeat(2), self.method.split(self.spec, parents, self.generator))

    def _cap_growth(
        self, clone: Tensor, split: Tensor, grads: Tensor, n: int
    ) -> tuple[Tensor, Tensor, int]:
        """Keep the highest-gradient candidates when growth would pass ``max_gaussians``."""
        if self.max_gaussians is None:
            return clone, split, 0
        room = max(self.max_gaussians - n, 0)
        wanted = int(clone.sum()) + int(split.sum())  # a split adds one row net
        if wanted <= room:
            return clone, split, 0
        if not self._warned_cap:
            log.warning(
                "densification capped at %d Gaussians (memory budget); growth limited from now on",
                self.max_gaussians,
            )
            self._warned_cap = True
        candidates = clone | split
        score = torch.where(candidates, grads, torch.full_like(grads, -1.0))
        chosen = torch.zeros_like(candidates)
        if room:
            chosen[torch.topk(score, room).indices] = True
        chosen &= candidates
        return clone & chosen, split & chosen, wanted - int(chosen.sum())

    ROW_STATE = ("grad2d", "count")  # per-Gaussian statistics, saved as checkpoint columns

    def row_state(self, start: int, stop: int) -> dict[str, Tensor]:
        """Rows ``[start, stop)`` of the statistics, on the CPU (zeros before the first view)."""
        out = {}
        for name in self.ROW_STATE:
            values = getattr(self, name)
            out[name] = values[start:stop].cpu() if values.numel() else torch.zeros(stop - start)
        return out

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(
        self, state: dict[str, Tensor], rows: Iterable[dict[str, Tensor]], count: int
    ) -> None:
        """Restore the generator, and the statistics from blocks of ``density/<name>`` columns."""
        self.generator.set_state(state["generator"])
        self._ensure_size(count)
        start = 0
        for block in rows:
            n = len(next(iter(block.values())))
            for name in self.ROW_STATE:
                getattr(self, name)[start : start + n] = block[f"density/{name}"].to(self.device)
            start += n
