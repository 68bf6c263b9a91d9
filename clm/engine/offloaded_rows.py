"""The offload engine's rows across their three homes: the key table on the GPU, the host
store, and the resident slots. Density control and checkpoints change or read all three the
same way, so row ``i`` stays one Gaussian everywhere."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from clm.engine.base import STREAM_ROWS, RowChunk, RowSource
from clm.model.table import Compaction


class RowsAcrossSets:
    """Mixed into :class:`clm.engine.offloaded.OffloadEngine`: appending, compacting, saving
    and loading rows."""

    # ---- density control ------------------------------------------------------------------

    def _make_room(self, count: int) -> None:
        """Room for ``count`` more key rows. When the key table must grow under a hard budget,
        the resident rows go back to the host and the cache is freed first, so the growth has
        their memory (they are chosen again at the next step)."""
        needed = len(self.key) + count
        if needed <= self.key.table.capacity:
            return
        if self.key.grow_through_host:  # a hard budget: old and new tables never coexist
            self.resident.release(self.host, self.step)
            self.cache_param = torch.empty(0, self.host.width, device=self.device)
            self.cache_grad = torch.empty(0, self.host.width, device=self.device)
        room = self.key.room_for(count)
        if self.max_gaussians is not None:
            room = min(room, max(self.max_gaussians, needed))
        self.key.reserve(room)

    def append(self, src: Tensor, overrides: Mapping[str, Tensor]) -> None:
        self._drain()
        self._make_room(src.numel())
        src = src.to(self.device)
        src_cpu = src.cpu()
        self.host.catch_up(torch.unique(src_cpu), self.step)
        first = len(self.host)
        # Host rows first: if host memory runs out, nothing has been added anywhere.
        self.host.append_copies(src_cpu, self.step)
        copies = torch.nonzero(self.resident.slots(src) >= 0).squeeze(1)
        if copies.numel():  # copies of resident rows: their values are on the GPU
            values = self.resident.param[self.resident.slots(src[copies])].cpu()
            zeros = torch.zeros_like(values)
            self.host.store.write_rows(copies.cpu() + first, values, zeros, zeros, self.step)
        self.resident.grow(src)
        keys = self.key.views()
        self.key.append({n: overrides[n] if n in overrides else t[src] for n, t in keys.items()})

    def reserve(self, rows: int) -> None:
        self.key.reserve(rows)

    def extend(self, params: Mapping[str, Tensor]) -> None:
        self._drain()
        count = next(iter(params.values())).shape[0]
        self._make_room(count)
        self.host.append({a.name: params[a.name].cpu() for a in self.spec.host}, self.step)
        self.resident.extend(count)
        self.key.append({a.name: params[a.name] for a in self.spec.key})

    def compact(self, plan: Compaction) -> None:
        self._drain()
        self.key.compact(plan)
        self.host.compact(Compaction(plan.holes.cpu(), plan.movers.cpu(), plan.new_len))
        self.resident.compact(plan)

    def reset_opacity(self, max_logit: float) -> None:
        name = self.spec.cull.opacity_logit
        self.key.views()[name].clamp_(max=max_logit)
        self.key.zero_moments(name)

    # ---- checkpoints ----------------------------------------------------------------------

    def state_chunks(self, rows: int = STREAM_ROWS, lazy: bool = False) -> Iterator[RowChunk]:
        self._drain()
        # The host copies of resident rows (stale while resident) take their values first.
        self.resident.write_range(self.host, 0, len(self.host), self.step)
        for start, stop, host, last in self.host.state_chunks(self.step, rows, lazy):
            key = self.key.state_chunk(start, stop)
            yield RowChunk(*({**k, **h} for k, h in zip(key, host, strict=True)), last=last)

    def load_rows(self, source: RowSource) -> None:
        self._drain()
        self.key.clear(max(self.key.table.capacity, source.count))
        self.host.clear()
        self.host.store.reserve(source.count)
        key_names = [a.name for a in self.spec.key]
        host_names = [a.name for a in self.spec.host]
        for chunk in source.chunks:
            state = (chunk.params, *chunk.moments())
            self.key.append_state(*({n: d[n] for n in key_names} for d in state))
            host_state = ({n: d[n] for n in host_names} for d in state)
            self.host.append_state(*host_state, source.step, last=chunk.last)
        self.host.advance_to(source.step)
        self.resident.reset(source.count)
        self.step = source.step
