"""The run's record: a CSV row per logged step, held-out results, and the PNG plot of both."""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clm.files import write_text
from clm.report.plot import plot_training_log

COLUMNS = (
    "step",
    "images",
    "loss",
    "train_psnr",
    "num_gaussians",
    "gpu_mem_gb",
    "images_per_s",
    "elapsed_s",
)


@dataclass
class TrainLog:
    output: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def csv_path(self) -> Path:
        return self.output / "train_log.csv"

    @property
    def plot_path(self) -> Path:
        return self.output / "train_plot.png"

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        new_file = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            if new_file:
                writer.writeheader()
            writer.writerow({k: row.get(k) for k in COLUMNS})

    def add_eval(self, step: int, metrics: dict[str, Any]) -> None:
        self.evals.append({"step": step, "psnr": metrics["psnr"], "ssim": metrics["ssim"]})

    def rewrite(self) -> None:
        """Write the CSV from memory (after a resume drops rows logged past the checkpoint)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS)
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: row.get(k) for k in COLUMNS})
        write_text(self.csv_path, buf.getvalue())

    def plot(self) -> None:
        if not self.rows:
            return
        plot_training_log(
            self.plot_path,
            [r["step"] for r in self.rows],
            [r["loss"] for r in self.rows],
            [r["train_psnr"] for r in self.rows],
            eval_steps=[e["step"] for e in self.evals],
            eval_psnr=[e["psnr"] for e in self.evals],
        )

    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows), "evals": list(self.evals)}

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        self.rows = [r for r in state["rows"] if r["step"] <= step]
        self.evals = [e for e in state["evals"] if e["step"] <= step]
        self.rewrite()


def format_count(n: int) -> str:
    """A count as the progress bar and tables show it: 1.23M, 45.6k, 789."""
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


class LogWindow:
    """The steps since the last log row: their summed losses and squared errors (device scalars,
    read only when a row is written, so a step makes no host sync) and images."""

    def __init__(self) -> None:
        self._start()

    def _start(self) -> None:
        self.losses: list[Tensor] = []
        self.mses: list[Tensor] = []
        self.images = 0
        self.since = time.perf_counter()

    def add(self, loss_sum: Tensor, mse_sum: Tensor, images: int) -> None:
        self.losses.append(loss_sum)
        self.mses.append(mse_sum)
        self.images += images

    def close(
        self,
        step: int,
        batch_size: int,
        num_gaussians: int,
        elapsed: float,
        gpu_mem_gb: float | None,
    ) -> dict[str, Any]:
        """The log row of these steps (``gpu_mem_gb`` None off CUDA); the window starts over."""
        images = max(self.images, 1)
        loss = float(torch.stack(self.losses).sum()) / images
        mse = float(torch.stack(self.mses).sum()) / images
        row = {
            "step": step,
            "images": step * batch_size,
            "loss": round(loss, 6),
            "train_psnr": round(-10.0 * math.log10(max(mse, 1e-12)), 3),
            "num_gaussians": num_gaussians,
            "gpu_mem_gb": round(gpu_mem_gb or 0.0, 3),
            "images_per_s": round(self.images / max(time.perf_counter() - self.since, 1e-9), 2),
            "elapsed_s": round(elapsed, 2),
        }
        self._start()
        return row

    def state_dict(self) -> dict[str, Any]:
        """For a checkpoint, so a resumed run writes the same next row."""
        return {
            "loss": [float(x) for x in self.losses],
            "mse": [float(x) for x in self.mses],
            "images": self.images,
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.losses = [torch.tensor(x, device=device) for x in state["loss"]]
        self.mses = [torch.tensor(x, device=device) for x in state["mse"]]
        self.images = state["images"]
