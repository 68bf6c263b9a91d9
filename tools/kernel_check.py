"""Exercise every CUDA kernel once on small inputs, for ``compute-sanitizer`` (memcheck,
racecheck, initcheck): ``compute-sanitizer --tool memcheck python tools/kernel_check.py``."""

from __future__ import annotations

import types

import torch

from clm.offload.culling import Culler, cull_bits_torch, pack_cameras
from clm.offload.flush import GradientFlush
from clm.offload.gather import RowGather
from clm.offload.host_store import HostStore
from clm.offload.worker import wait_for
from clm.optim.gpu_adam import adam_step_table
from clm.optim.lazy_adam import AdamConfig, adam_step_columns
from clm.render.base import View


def main() -> None:
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    n = 10_000
    means = ((torch.rand(n, 3, generator=g) - 0.5) * 6).to(device)
    scales = torch.log(torch.rand(n, 3, generator=g) * 0.1 + 0.01).to(device)
    opac = torch.randn(n, generator=g).to(device)
    views = []
    for z in (3.0, 4.0, 5.0):
        vm = torch.eye(4)
        vm[2, 3] = z
        K = torch.tensor([[100.0, 0, 64], [0, 100.0, 48], [0, 0, 1]])
        views.append(View(vm.to(device), K.to(device), 128, 96))
    culler = Culler(device, chunk=4096)
    result = culler.cull(means, scales, opac, views)
    twin = cull_bits_torch(means, scales, opac, pack_cameras(views))
    assert torch.equal(result.ids, torch.nonzero(twin).squeeze(1))
    surfels = Culler(device, chunk=4096, bound="surfel").cull(means, scales[:, :2], opac, views)
    assert surfels.ids.numel() > 0

    store = HostStore(48, chunk_shift=8, pinned=True)
    host = torch.randn(3000, 48, generator=g)
    store.append(host, step=0)
    gather = RowGather(store, device)
    rows = torch.randperm(3000, generator=g)[:700].to(device)
    slots = torch.randperm(1000, generator=g)[:700].to(device)
    out = torch.zeros(1000, 48, device=device)
    grad = torch.ones(1000, 48, device=device)
    gather.gather(rows, slots, 27, out, grad)
    torch.cuda.synchronize()
    assert torch.equal(out[slots, :27].cpu(), host[rows.cpu(), :27])

    host_rows = types.SimpleNamespace(width=48, adam=types.SimpleNamespace(threads=2))
    flush = GradientFlush(host_rows, device, staging_rows=4096)
    grads = torch.randn(700, 27, device=device)
    grads[::3] = 0
    start, done = flush._download(grads, rows)
    wait_for(done)
    kept = int(flush.staging.filled[start])
    assert kept == int((grads != 0).any(1).sum())
    flush.close()

    table = [torch.randn(900, 48, generator=g).abs().to(device) for _ in range(4)]
    twin = [t.clone() for t in table]
    lrs, config = [(0, 3, 1e-3), (3, 27, 2e-2)], AdamConfig()
    adam_step_table(*(t[:, :27] for t in table), 7, lrs, config, zero_grad=True)
    adam_step_columns(*(t[:, :27] for t in twin), 7, lrs, config)
    assert all(torch.equal(table[i], twin[i]) for i in (0, 2, 3))  # (param, both moments)
    print(
        f"kernels ok: {result.ids.numel()} culled rows ({surfels.ids.numel()} as surfels), "
        f"700 gathered rows, {kept} of 700 gradient rows packed, 900 rows stepped by Adam"
    )


if __name__ == "__main__":
    main()
