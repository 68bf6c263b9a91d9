"""PSNR, SSIM and the LPIPS loader against independent references."""

import math
import sys
import types

import numpy as np
import pytest
import torch

from clm import metrics
from clm.metrics import LpipsMetric, load_lpips, psnr, ssim


def reference_ssim(img: np.ndarray, ref: np.ndarray) -> float:
    """SSIM of two [H, W, C] images, pixel by pixel with an explicit 11x11 window, in float64.

    Out-of-image window taps read zeros (the INRIA code's zero 'same' padding).
    """
    size, sigma, c1, c2 = 11, 1.5, 0.01**2, 0.03**2
    half = size // 2
    g = np.array([math.exp(-((i - half) ** 2) / (2 * sigma**2)) for i in range(size)])
    window = np.outer(g, g) / np.outer(g, g).sum()
    h, w, channels = img.shape
    total = 0.0
    for c in range(channels):
        x = np.pad(img[:, :, c].astype(np.float64), half)
        y = np.pad(ref[:, :, c].astype(np.float64), half)
        for i in range(h):
            for j in range(w):
                px, py = x[i : i + size, j : j + size], y[i : i + size, j : j + size]
                mx, my = (window * px).sum(), (window * py).sum()
                vx = (window * px * px).sum() - mx * mx
                vy = (window * py * py).sum() - my * my
                cov = (window * px * py).sum() - mx * my
                total += ((2 * mx * my + c1) * (2 * cov + c2)) / (
                    (mx * mx + my * my + c1) * (vx + vy + c2)
                )
    return total / (h * w * channels)


def test_psnr_against_hand_computation() -> None:
    img = torch.zeros(2, 2, 3)
    ref = torch.zeros(2, 2, 3)
    ref[0, 0, 0] = 0.5  # one of 12 values off by 0.5: MSE = 0.25 / 12
    assert psnr(img, ref).item() == pytest.approx(10 * math.log10(12 / 0.25), rel=1e-6)
    assert psnr(img, img).item() == math.inf


def test_psnr_batched_is_per_image() -> None:
    gen = torch.Generator().manual_seed(0)
    imgs, refs = torch.rand(3, 8, 9, 3, generator=gen), torch.rand(3, 8, 9, 3, generator=gen)
    batch = psnr(imgs, refs)
    assert batch.shape == (3,)
    for b in range(3):
        mse = ((imgs[b].double() - refs[b].double()) ** 2).mean().item()
        assert batch[b].item() == pytest.approx(-10 * math.log10(mse), rel=1e-5)


def test_ssim_matches_explicit_window_reference() -> None:
    rng = np.random.default_rng(1)
    img = rng.random((20, 17, 3))
    # A correlated reference, so the structure term is far from both 0 and 1.
    ref = np.clip(0.7 * img + 0.3 * rng.random((20, 17, 3)), 0, 1)
    expected = reference_ssim(img, ref)
    got = ssim(torch.from_numpy(img), torch.from_numpy(ref)).item()
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)
    got32 = ssim(torch.from_numpy(img).float(), torch.from_numpy(ref).float()).item()
    assert got32 == pytest.approx(expected, abs=1e-5)
    assert 0.2 < expected < 0.95


def test_ssim_of_identical_images_is_one() -> None:
    img = torch.rand(13, 21, 3, generator=torch.Generator().manual_seed(2))
    assert ssim(img, img).item() == pytest.approx(1.0, abs=1e-6)
    flat = torch.full((5, 4, 3), 0.3)
    assert ssim(flat, flat).item() == pytest.approx(1.0, abs=1e-6)


def test_ssim_batched_equals_per_image() -> None:
    gen = torch.Generator().manual_seed(3)
    imgs, refs = torch.rand(3, 16, 12, 3, generator=gen), torch.rand(3, 16, 12, 3, generator=gen)
    batch = ssim(imgs, refs)
    assert batch.shape == (3,)
    singles = torch.stack([ssim(imgs[b], refs[b]) for b in range(3)])
    torch.testing.assert_close(batch, singles)
    assert ssim(imgs[0], refs[0]).shape == ()


@pytest.fixture
def one_thread():
    """Tiny convolutions on a busy 2-core machine stall in OpenMP spin-waits: use one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ssim_gradients_match_finite_differences(one_thread) -> None:
    gen = torch.Generator().manual_seed(4)
    img = torch.rand(6, 5, 3, generator=gen, dtype=torch.float64).requires_grad_()
    ref = torch.rand(6, 5, 3, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(ssim, (img, ref), eps=1e-6, atol=1e-6)


def test_ssim_loss_gradient_flows_to_the_render() -> None:
    img = torch.rand(12, 12, 3, generator=torch.Generator().manual_seed(5)).requires_grad_()
    ref = torch.rand(12, 12, 3, generator=torch.Generator().manual_seed(6))
    (1 - ssim(img, ref)).backward()
    assert img.grad is not None
    assert torch.isfinite(img.grad).all()
    assert img.grad.abs().sum() > 0


@pytest.mark.gpu
def test_ssim_on_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(7)
    img, ref = torch.rand(2, 40, 33, 3, generator=gen), torch.rand(2, 40, 33, 3, generator=gen)
    cpu_img = img.clone().requires_grad_()
    gpu_img = img.cuda().requires_grad_()
    cpu_val, gpu_val = ssim(cpu_img, ref), ssim(gpu_img, ref.cuda())
    torch.testing.assert_close(gpu_val.cpu(), cpu_val, atol=1e-6, rtol=1e-5)
    cpu_val.sum().backward()
    gpu_val.sum().backward()
    torch.testing.assert_close(gpu_img.grad.cpu(), cpu_img.grad, atol=1e-6, rtol=1e-4)


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        ssim(torch.rand(4, 4, 3), torch.rand(4, 5, 3))
    with pytest.raises(ValueError, match="shape"):
        psnr(torch.rand(4, 3), torch.rand(4, 3))


def test_lpips_missing_package_gives_reason(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lpips", None)  # makes `import lpips` fail
    fn, reason = load_lpips(torch.device("cpu"))
    assert fn is None
    assert "lpips" in reason and "\n" not in reason


def test_lpips_unknown_network() -> None:
    fn, reason = load_lpips("cpu", net="resnet")
    assert fn is None and "resnet" in reason


class FakeLpipsNet(torch.nn.Module):
    """Stands in for lpips.LPIPS: records its inputs, returns a per-image value [B, 1, 1, 1]."""

    def __init__(self, net: str) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen: list[tuple[torch.Tensor, torch.Tensor, bool]] = []

    def forward(self, x: torch.Tensor, y: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self.seen.append((x, y, normalize))
        return self.scale * (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)


def install_fake_lpips(monkeypatch, tmp_path, constructor) -> None:
    """Fake ``lpips`` and ``torchvision.models`` modules and a torch.hub cache under tmp_path."""
    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=constructor))
    weights = types.SimpleNamespace(
        IMAGENET1K_V1=types.SimpleNamespace(url="https://example.invalid/vgg16-abc.pth")
    )
    models = types.ModuleType("torchvision.models")
    models.VGG16_Weights = weights
    vision = types.ModuleType("torchvision")
    vision.models = models
    monkeypatch.setitem(sys.modules, "torchvision", vision)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    monkeypatch.setattr(metrics.torch.hub, "get_dir", lambda: str(tmp_path))


def test_lpips_refuses_to_download(monkeypatch, tmp_path) -> None:
    built = []
    install_fake_lpips(monkeypatch, tmp_path, lambda net: built.append(net))
    fn, reason = load_lpips("cpu", net="vgg")
    assert fn is None and "vgg16-abc.pth" in reason
    assert built == []  # never constructed, so nothing could have been fetched


def test_lpips_constructor_failure_is_caught(monkeypatch, tmp_path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "vgg16-abc.pth").write_bytes(b"")

    def broken(net: str) -> None:
        raise RuntimeError("corrupt\nweights")

    install_fake_lpips(monkeypatch, tmp_path, broken)
    fn, reason = load_lpips("cpu", net="vgg")
    assert fn is None and "corrupt weights" in reason


def test_lpips_wrapper_layout(monkeypatch, tmp_path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "vgg16-abc.pth").write_bytes(b"")
    install_fake_lpips(monkeypatch, tmp_path, FakeLpipsNet)
    fn, reason = load_lpips("cpu", net="vgg")
    assert isinstance(fn, LpipsMetric) and reason is None
    img, ref = torch.rand(2, 7, 5, 3), torch.rand(2, 7, 5, 3)
    out = fn(img, ref)
    assert out.shape == (2,)
    x, y, normalize = fn._net.seen[-1]
    assert normalize and x.shape == (2, 3, 7, 5)
    torch.testing.assert_close(x, img.permute(0, 3, 1, 2))
    torch.testing.assert_close(y, ref.permute(0, 3, 1, 2))
    torch.testing.assert_close(out, (img - ref).abs().mean(dim=(1, 2, 3)))
    assert fn(img[1], ref[1]).shape == ()
    assert not any(p.requires_grad for p in fn._net.parameters())
