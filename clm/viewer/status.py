"""The text beside the viewer's frames: training progress, or what model is open, and memory.
Built from figures already on the host (the trainer's last log row), so it adds no sync."""

from __future__ import annotations

import torch

from clm.offload.host_budget import process_rss
from clm.train.log import format_count
from clm.train.trainer import Trainer

GIB = float(1 << 30)


def memory_line(device: torch.device) -> str:
    host = f"host {process_rss() / GIB:.2f} GiB"
    if device.type != "cuda":
        return host
    reserved = torch.cuda.memory_reserved(device) / GIB
    peak = torch.cuda.max_memory_reserved(device) / GIB
    return f"GPU {reserved:.2f} GiB reserved (peak {peak:.2f}) · {host}"


def training_status(trainer: Trainer, done: bool) -> str:
    """Markdown: step, loss and PSNR, held-out PSNR, Gaussians, images/s and memory."""
    step, total = trainer.engine.step, trainer.total_steps
    head = "Trained" if done else "Training"
    lines = [f"**{head}**: step {step:,} of {total:,} ({100.0 * step / max(total, 1):.0f}%)"]
    rate = ""
    if trainer.log.rows:
        row = trainer.log.rows[-1]
        lines.append(f"loss {row['loss']:.4f} · train PSNR {row['train_psnr']:.2f} dB")
        rate = f" · {row['images_per_s']:.1f} images/s"
    if trainer.log.evals:
        last = trainer.log.evals[-1]
        lines.append(f"held-out PSNR {last['psnr']:.2f} dB (step {last['step']:,})")
    gaussians = format_count(trainer.engine.num_gaussians)
    lines.append(f"{gaussians} Gaussians · SH degree {trainer.sh_degree_now()}{rate}")
    lines.append(memory_line(trainer.device))
    return "\n\n".join(lines)


def model_status(name: str, gaussians: int, sh_degree: int, device: torch.device) -> str:
    """Markdown: the open model, its size and memory."""
    return "\n\n".join(
        [
            f"**{name}**",
            f"{format_count(gaussians)} Gaussians · SH degree {sh_degree} · on {device.type}",
            memory_line(device),
        ]
    )
