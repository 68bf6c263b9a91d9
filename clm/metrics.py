"""Image quality metrics: PSNR, SSIM (also the D-SSIM training term) and optional LPIPS.

Images are float tensors in [0, 1], ``[H, W, C]`` or batched ``[B, H, W, C]``. Every metric
returns one value per image: a scalar tensor for one image, ``[B]`` for a batch.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2

# torchvision backbone that each LPIPS variant downloads through torch.hub when not cached.
_LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights"}


def psnr(img: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for data range 1 (``inf`` where the images are equal)."""
    _check_pair(img, ref)
    mse = (img - ref).square().mean(dim=(-3, -2, -1))
    return -10.0 * torch.log10(mse)


def ssim(img: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Structural similarity as in the INRIA 3DGS code, differentiable in both arguments.

    Gaussian window 11, sigma 1.5, zero 'same' padding, mean over pixels and channels. The 2-D
    window is the outer product of a 1-D Gaussian, so two 1-D passes give the same result at a
    fraction of the cost; the five local statistics go through those passes as one batch.
    """
    _check_pair(img, ref)
    batched = img.dim() == 4
    x = (img if batched else img[None]).permute(0, 3, 1, 2)
    y = (ref if batched else ref[None]).permute(0, 3, 1, 2)
    # Measured: the depthwise convolutions run fastest channels-last on CPU (the layout the
    # permute above already gives) and in plain NCHW on CUDA (nearly twice as fast there).
    layout = torch.channels_last if x.device.type == "cpu" else torch.contiguous_format
    stats = torch.cat([x, y, x * x, y * y, x * y], dim=1).contiguous(memory_format=layout)
    mu_x, mu_y, xx, yy, xy = _gaussian_blur(stats).chunk(5, dim=1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x, var_y, cov = xx - mu_xx, yy - mu_yy, xy - mu_xy
    numerator = (2 * mu_xy + SSIM_C1) * (2 * cov + SSIM_C2)
    denominator = (mu_xx + mu_yy + SSIM_C1) * (var_x + var_y + SSIM_C2)
    per_image = (numerator / denominator).mean(dim=(1, 2, 3))
    return per_image if batched else per_image[0]


def _gaussian_blur(images: torch.Tensor) -> torch.Tensor:
    """Blur each channel of ``[B, C, H, W]`` with the normalised SSIM Gaussian, zero padded.

    Depthwise (grouped) convolutions: on CPU they run forward and backward several times faster
    than single-channel ones of the same arithmetic, and on CUDA faster than one 11x11 pass.
    """
    channels, half = images.shape[1], SSIM_WINDOW // 2
    offsets = torch.arange(SSIM_WINDOW, device=images.device, dtype=images.dtype) - half
    kernel = torch.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    kernel = kernel / kernel.sum()
    column = kernel.view(1, 1, SSIM_WINDOW, 1).expand(channels, 1, SSIM_WINDOW, 1)
    row = kernel.view(1, 1, 1, SSIM_WINDOW).expand(channels, 1, 1, SSIM_WINDOW)
    blurred = F.conv2d(images, column, padding=(half, 0), groups=channels)
    return F.conv2d(blurred, row, padding=(0, half), groups=channels)


def _check_pair(img: torch.Tensor, ref: torch.Tensor) -> None:
    if img.shape != ref.shape or img.dim() not in (3, 4):
        raise ValueError(
            f"images must share a shape [H, W, C] or [B, H, W, C], got {tuple(img.shape)} "
            f"and {tuple(ref.shape)}"
        )


class LpipsMetric:
    """LPIPS from the ``lpips`` package, on images in this module's layout."""

    def __init__(self, net: torch.nn.Module) -> None:
        self._net = net

    def __call__(self, img: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """LPIPS per image (lower is more similar), on the device the metric was loaded for."""
        _check_pair(img, ref)
        batched = img.dim() == 4
        x = (img if batched else img[None]).permute(0, 3, 1, 2)
        y = (ref if batched else ref[None]).permute(0, 3, 1, 2)
        per_image = self._net(x, y, normalize=True).reshape(-1)
        return per_image if batched else per_image[0]


def load_lpips(
    device: torch.device | str = "cpu", net: str = "vgg"
) -> tuple[LpipsMetric | None, str | None]:
    """LPIPS on ``device`` if it can be built from files already on disk, else ``(None, reason)``.

    ``net`` is ``"vgg"`` (the backbone of the numbers in the 3DGS paper) or ``"alex"``.

    Never downloads: the ``lpips`` package fetches its torchvision backbone through torch.hub
    when that is not cached, so the cache is checked first. Any other failure (package missing,
    broken install, bad weights) is caught too, because LPIPS is optional for a run.
    """
    if net not in _LPIPS_BACKBONES:
        return None, f"unknown LPIPS network {net!r} (choose from {', '.join(_LPIPS_BACKBONES)})"
    try:
        import lpips
        import torchvision.models
    except Exception as exc:
        return None, f"lpips package not importable ({_one_line(exc)})"
    try:
        weights = getattr(torchvision.models, _LPIPS_BACKBONES[net]).IMAGENET1K_V1
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        if not cached.is_file():
            return None, f"LPIPS-{net} backbone weights not in the torch.hub cache ({cached})"
        # lpips prints set-up banners, and torchvision warns about its deprecated arguments.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            model = lpips.LPIPS(net=net).eval().to(device)
    except Exception as exc:
        return None, f"LPIPS-{net} could not be loaded ({_one_line(exc)})"
    for param in model.parameters():
        param.requires_grad_(False)
    return LpipsMetric(model), None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
