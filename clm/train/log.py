"""The run's record: a CSV row per logged step, held-out results, and the PNG plot of both."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
