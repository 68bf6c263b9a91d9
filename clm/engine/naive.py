"""``--offload naive``: every attribute and its Adam state in host memory; each step uploads all
rows, renders, downloads all gradients and runs a dense CPU Adam. The baseline that shows what
culling, caching and overlap buy."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from clm.engine.base import STREAM_ROWS, Engine, LossFn, ObserveFn, RowChunk, RowSource, StepStats
from clm.model.spec import unpack_rows
from clm.model.table import Compaction
from clm.offload.lazy_rows import HostRows
from clm.render.base import RenderOutput, View


class NaiveEngine(Engine):
    def __init__(
        self,
        params: Mapping[str, Tensor],
        *,
        max_host_bytes: int | None = None,
        chunk_shift: int = 20,
        cpu_threads: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.host = HostRows(
            self.spec.attributes,
            self.lrs,
            self.adam,
            pinned=self.device.type == "cuda",
            max_bytes=max_host_bytes,
            chunk_shift=chunk_shift,
            threads=cpu_threads,
        )
        self.host.append(params, step=0)
        self._grads = torch.empty(0, self.host.width, pin_memory=self.device.type == "cuda")

    @property
    def num_gaussians(self) -> int:
        return len(self.host)

    def _upload(self) -> Tensor:
        """All parameter rows on the device."""
        store = self.host.store
        rows = torch.empty(len(store), store.width, device=self.device)
        for chunk, offset, start, count in store.chunk_slices(0, len(store)):
            rows[start : start + count].copy_(
                store.param_chunks[chunk][offset : offset + count], non_blocking=True
            )
        return rows

    def key_param(self, name: str) -> Tensor:
        return unpack_rows(self._upload(), self.host.layout)[name]

    def attribute_rows(self, name: str, ids: Tensor) -> Tensor:
        rows = unpack_rows(self.host.store.gather_params(ids.cpu()), self.host.layout)[name]
        return rows.to(self.device)

    def train_step(
        self,
        views: Sequence[View],
        loss_fn: LossFn,
        observe: ObserveFn,
        sh_degree: int,
        background: Tensor,
    ) -> None:
        step = self.step + 1
        leaf = self._upload().requires_grad_()
        params = unpack_rows(leaf, self.host.layout, sh_degree)
        for i, view in enumerate(views):
            out = self.render_fn(params, view, sh_degree, background)
            loss_fn(i, out).backward()
            observe(out.ids, out, view)
        n, width = leaf.shape
        if self._grads.shape[0] < n:
            self._grads = torch.empty(n, width, pin_memory=self.device.type == "cuda")
        grads = self._grads[:n]
        grads.copy_(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))
        self.host.step_rows(torch.arange(n), grads, width, step, skip_zero=False)  # dense Adam
        self.step = step
        moved = n * width * 4
        self.last_stats = StepStats(visible_rows=n, bytes_to_gpu=moved, bytes_to_host=moved)

    @torch.no_grad()
    def render(self, view: View, sh_degree: int, background: Tensor) -> RenderOutput:
        params = unpack_rows(self._upload(), self.host.layout, sh_degree)
        return self.render_fn(params, view, sh_degree, background)

    def append(self, src: Tensor, overrides: Mapping[str, Tensor]) -> None:
        src = src.cpu()
        rows = unpack_rows(self.host.store.gather_params(src), self.host.layout)
        rows.update({k: v.cpu() for k, v in overrides.items()})
        self.extend(rows)

    def extend(self, params: Mapping[str, Tensor]) -> None:
        self.host.append({k: v.cpu() for k, v in params.items()}, self.step)

    def compact(self, plan: Compaction) -> None:
        self.host.compact(Compaction(plan.holes.cpu(), plan.movers.cpu(), plan.new_len))

    def reset_opacity(self, max_logit: float) -> None:
        store = self.host.store
        seg = next(s for s in self.host.layout if s.attr.name == self.spec.cull.opacity_logit)
        for chunks in (store.exp_avg_chunks, store.exp_avg_sq_chunks):
            for chunk in chunks:
                chunk[:, seg.start : seg.end] = 0
        for chunk in store.param_chunks:
            chunk[:, seg.start : seg.end].clamp_(max=max_logit)

    def state_chunks(self, rows: int = STREAM_ROWS, lazy: bool = False) -> Iterator[RowChunk]:
        # (every row takes every step here: nothing is lazy)
        # Every row is stepped every step: the store's own rows are already up to date.
        for _, _, state, _ in self.host.state_chunks(self.step, rows, lazy=True):
            yield RowChunk(*state)

    def load_rows(self, source: RowSource) -> None:
        self.host.clear()
        self.host.store.reserve(source.count)
        for chunk in source.chunks:
            self.host.append_state(chunk.params, *chunk.moments(), source.step)
        self.host.advance_to(source.step)
        self.step = source.step
