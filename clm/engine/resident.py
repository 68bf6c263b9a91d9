"""``--offload none``: every attribute and its Adam state on the compute device, dense Adam.

The GPU-only baseline and the reference the offloading engines must match number for number.
Each view is culled against the batch before rendering (the pre-render frustum culling of the
offloaded engine, no more), so the renderer only projects the Gaussians that can reach the
image: the best GPU-only baseline, not gsplat's trainer as it ships. On the CPU it is simply the
whole model in RAM.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from clm.engine.base import STREAM_ROWS, Engine, LossFn, ObserveFn, RowChunk, RowSource, StepStats
from clm.model.table import Compaction, RowTable
from clm.offload.culling import Culler, CullResult
from clm.optim.gpu_adam import adam_step_table
from clm.render.base import RenderOutput, View


class ResidentEngine(Engine):
    def __init__(self, params: Mapping[str, Tensor], **kwargs) -> None:
        super().__init__(**kwargs)
        on_device = {n: params[n].to(self.device, torch.float32) for n in self.spec.names}
        self.params = RowTable(on_device)
        self.exp_avg = RowTable({n: torch.zeros_like(t) for n, t in on_device.items()})
        self.exp_avg_sq = RowTable({n: torch.zeros_like(t) for n, t in on_device.items()})
        self.culler = Culler(self.device, bound=self.spec.cull.shape)

    @property
    def num_gaussians(self) -> int:
        return len(self.params)

    def key_param(self, name: str) -> Tensor:
        return self.params[name]

    def attribute_rows(self, name: str, ids: Tensor) -> Tensor:
        return self.params[name][ids.to(self.device)]

    def train_step(
        self,
        views: Sequence[View],
        loss_fn: LossFn,
        observe: ObserveFn,
        sh_degree: int,
        background: Tensor,
    ) -> None:
        leaves = {n: t.detach().requires_grad_() for n, t in self.params.items()}
        culled = self._cull(views)
        for i, view in enumerate(views):
            rows = culled.ids[culled.vis[i]]
            out = self.render_fn(
                {n: t[rows] for n, t in leaves.items()}, view, sh_degree, background
            )
            loss_fn(i, out).backward()
            observe(rows[out.ids], out, view)
        step = self.step + 1
        config = self.adam
        with torch.no_grad():
            for name, leaf in leaves.items():
                grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                lr = self.lrs.at(name, step)
                p, m, v = (_as_rows(t[name]) for t in (self.params, self.exp_avg, self.exp_avg_sq))
                adam_step_table(p, _as_rows(grad), m, v, step, [(0, p.shape[1], lr)], config)
        self.step = step
        self.last_stats = StepStats(visible_rows=int(culled.ids.numel()))

    def _cull(self, views: Sequence[View]) -> CullResult:
        p = self.params
        return self.culler.cull(*self.spec.cull_inputs(p), views)

    @torch.no_grad()
    def render(self, view: View, sh_degree: int, background: Tensor) -> RenderOutput:
        rows = self._cull([view]).ids
        out = self.render_fn(
            {n: t[rows] for n, t in self.params.items()}, view, sh_degree, background
        )
        out.ids = rows[out.ids]
        return out

    def append(self, src: Tensor, overrides: Mapping[str, Tensor]) -> None:
        src = src.to(self.device)
        self.extend({n: overrides[n] if n in overrides else t[src] for n, t in self.params.items()})

    def reserve(self, rows: int) -> None:
        for table in (self.params, self.exp_avg, self.exp_avg_sq):
            table.reserve(rows)

    def extend(self, params: Mapping[str, Tensor]) -> None:
        rows = {n: params[n].to(self.device, torch.float32) for n in self.spec.names}
        self.params.append(rows)
        zeros = {n: torch.zeros_like(t) for n, t in rows.items()}
        self.exp_avg.append(zeros)
        self.exp_avg_sq.append(zeros)

    def compact(self, plan: Compaction) -> None:
        for table in (self.params, self.exp_avg, self.exp_avg_sq):
            table.compact(plan)

    def reset_opacity(self, max_logit: float) -> None:
        name = self.spec.cull.opacity_logit
        self.params[name].clamp_(max=max_logit)
        self.exp_avg[name].zero_()
        self.exp_avg_sq[name].zero_()

    def state_chunks(self, rows: int = STREAM_ROWS, lazy: bool = False) -> Iterator[RowChunk]:
        # (every row takes every step here: nothing is lazy)
        for start in range(0, len(self.params), rows):
            yield RowChunk(
                *(
                    {n: t[start : start + rows].cpu() for n, t in table.items()}
                    for table in (self.params, self.exp_avg, self.exp_avg_sq)
                )
            )

    def load_rows(self, source: RowSource) -> None:
        capacity = max(self.params.capacity, source.count)
        empty = {a.name: torch.zeros(0, *a.shape, device=self.device) for a in self.spec}
        self.params, self.exp_avg, self.exp_avg_sq = (RowTable(empty) for _ in range(3))
        self.reserve(capacity)
        for chunk in source.chunks:
            for table, values in zip(
                (self.params, self.exp_avg, self.exp_avg_sq),
                (chunk.params, *chunk.moments()),
                strict=True,
            ):
                table.append({n: values[n].to(self.device, torch.float32) for n in self.spec.names})
        self.step = source.step


def _as_rows(t: Tensor) -> Tensor:
    """An attribute as ``[n, W]`` rows, a view of the same memory (so steps land in it)."""
    rows = t.unsqueeze(1) if t.dim() == 1 else t.flatten(1)
    assert rows.data_ptr() == t.data_ptr()
    return rows
