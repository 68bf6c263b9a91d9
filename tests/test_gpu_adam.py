"""GPU tests: the one-pass Adam kernel gives torch's own Adam bits."""

import pytest
import torch

from clm.offload.cuda_kernels import cupy_available
from clm.optim.gpu_adam import adam_step_table
from clm.optim.lazy_adam import AdamConfig

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def needs_kernel() -> None:
    if not cupy_available():
        pytest.skip("the Adam kernel needs CuPy")


def gradients(shape, steps: int, seed: int) -> list[torch.Tensor]:
    """Gradients of mixed scales, with zero rows (unseen rows step with zero gradients)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        grad = torch.randn(*shape, generator=g) * torch.logspace(-6, 0, shape[-1])
        grad[torch.rand(shape[0], generator=g) < 0.3] = 0
        out.append(grad.to(CUDA))
    return out


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.3, 0.99)])  # both forms of torch's lerp
def test_kernel_steps_as_torch_optim_adam(betas):
    """Bit for bit against torch.optim.Adam (single tensor, as the engines' reference)."""
    needs_kernel()
    torch.manual_seed(0)
    start = torch.randn(3000, 11, device=CUDA)
    ref = torch.nn.Parameter(start.clone())
    adam = torch.optim.Adam([ref], lr=3e-3, betas=betas, eps=1e-15, foreach=False, fused=False)
    param, m, v = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
    config = AdamConfig(betas=betas, eps=1e-15)
    for step, grad in enumerate(gradients(start.shape, 6, seed=1), start=1):
        ref.grad = grad.clone()
        adam.step()
        adam_step_table(param, grad.clone(), m, v, step, [(0, 11, 3e-3)], config)
        state = adam.state[ref]
        assert torch.equal(param, ref.detach()), f"parameters differ at step {step}"
        assert torch.equal(m, state["exp_avg"]) and torch.equal(v, state["exp_avg_sq"])


def test_kernel_steps_column_ranges_of_a_wider_table_and_zeroes_the_gradient():
    """Column slices (only the active width of each row), a learning rate per range and a
    column in none, each range as torch's Adam steps it alone."""
    needs_kernel()
    torch.manual_seed(2)
    n, stride, width = 1500, 48, 12
    table = {k: torch.randn(n, stride, device=CUDA).abs() for k in ("param", "m", "v", "grad")}
    ranges = [(0, 3, 1e-3), (3, 4, 5e-2), (5, 12, 2.5e-3)]  # column 4 has no learning rate
    config = AdamConfig()
    refs = []
    for a, b, lr in ranges:
        ref = torch.nn.Parameter(table["param"][:, a:b].clone())
        adam = torch.optim.Adam([ref], lr=lr, eps=config.eps, foreach=False, fused=False)
        adam.state[ref] = {
            "step": torch.tensor(4.0),
            "exp_avg": table["m"][:, a:b].clone(),
            "exp_avg_sq": table["v"][:, a:b].clone(),
        }
        refs.append((a, b, ref, adam))
    untouched = {k: t[:, width:].clone() for k, t in table.items()}
    grad = table["grad"][:, :width].clone()
    for a, b, ref, adam in refs:
        ref.grad = grad[:, a:b].clone()
        adam.step()  # its step 5
    p, m, v, g = (table[k][:, :width] for k in ("param", "m", "v", "grad"))
    column4 = p[:, 4].clone()
    adam_step_table(p, g, m, v, 5, ranges, config, zero_grad=True)
    for a, b, ref, adam in refs:
        assert torch.equal(p[:, a:b], ref.detach())
        assert torch.equal(m[:, a:b], adam.state[ref]["exp_avg"])
        assert torch.equal(v[:, a:b], adam.state[ref]["exp_avg_sq"])
    assert torch.equal(p[:, 4], column4)
    assert not torch.equal(m[:, 4], torch.zeros_like(m[:, 4]))  # its moments still moved
    assert torch.count_nonzero(g) == 0
    for k, t in table.items():
        assert torch.equal(t[:, width:], untouched[k]), f"{k} changed past the active width"


def test_kernel_refuses_moments_laid_out_otherwise():
    needs_kernel()
    p = torch.zeros(10, 4, device=CUDA)
    m = torch.zeros(10, 8, device=CUDA)[:, :4]  # rows as wide as another table's
    with pytest.raises(ValueError, match="moments"):
        adam_step_table(
            p, torch.zeros_like(p), m, torch.zeros_like(p), 1, [(0, 4, 1)], AdamConfig()
        )
