"""The training loop: batches of views through an engine, density control, logs, checkpoints,
evaluation and export. Engines decide where Gaussians live and the method (3DGS, 2DGS, yours)
what they are; everything here is the same for all."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from clm.data.images import ImageCache
from clm.data.scene import load_scene
from clm.devices import resolve_device
from clm.engine.base import STREAM_ROWS, Engine, RowSource
from clm.errors import ClmError
from clm.files import write_json
from clm.methods.base import Method
from clm.methods.registry import make_method
from clm.optim.lazy_adam import AdamConfig
from clm.optim.learning_rates import LearningRates, adam_betas
from clm.render.base import RenderOutput, View
from clm.train.batch_loss import batch_loss
from clm.train.checkpoint import Checkpoint
from clm.train.checkpoint_source import checkpoint_source, stored_key
from clm.train.config import TrainConfig, config_to_dict
from clm.train.densify import DensifyConfig, DensityController
from clm.train.engine_factory import EngineOptions, make_engine
from clm.train.evaluate import evaluate
from clm.train.hooks import TrainerHook, make_hooks
from clm.train.log import LogWindow, TrainLog, format_count
from clm.train.recipe import sh_degree_at
from clm.train.run_setup import (
    attach_file_log,
    detach_file_log,
    prepare_output,
    seed_everything,
)
from clm.train.targets import TargetStager
from clm.train.trainer_checkpoints import TrainerCheckpoints
from clm.train.views import BatchSampler, frame_to_view

log = logging.getLogger("clm")


class Interrupted(Exception):
    """Training stopped on request after saving a checkpoint."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint saved to {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint


def method_of(cfg: TrainConfig) -> Method:
    """The method ``cfg`` names, with its options (``--ssim-weight`` unless an option sets it)."""
    return make_method(cfg.method, {"ssim_weight": cfg.ssim_weight, **cfg.method_options})


class Trainer(TrainerCheckpoints):
    """Trains ``cfg.scene`` with ``method`` (default: the one ``cfg.method`` names)."""

    def __init__(
        self, cfg: TrainConfig, checkpoint: Checkpoint | None = None, method: Method | None = None
    ) -> None:
        self.cfg = cfg
        self.method = method if method is not None else method_of(cfg)
        cfg.method = self.method.name
        self.device = resolve_device(cfg.device)
        prepare_output(cfg.output, resuming=checkpoint is not None)
        self._log_handler = attach_file_log(cfg.output)
        self.hooks: list[TrainerHook] = []
        try:
            self.hooks = make_hooks(cfg, 0 if checkpoint is None else checkpoint.step, self.device)
            self._setup(checkpoint)
        except BaseException:  # no file log or hook may outlive a trainer that never started
            for hook in self.hooks:
                hook.close()
            detach_file_log(self._log_handler)
            raise

    def _setup(self, checkpoint: Checkpoint | None) -> None:
        """Scene, images, model and engine, density control, sampler, log; a resumed run's state."""
        cfg = self.cfg
        seed_everything(cfg.seed, self.device)
        if cfg.scene is None:
            raise ClmError("no scene given")
        self.scene = load_scene(cfg.scene, cfg.data_factor, cfg.test_every, seed=cfg.seed)
        scene = self.scene
        frames = scene.train + scene.test
        cache_dir = cfg.cache_dir or cfg.output / "cache"
        self.images = ImageCache(frames, cache_dir, scene.background)
        self.background = torch.tensor(scene.background, dtype=torch.float32, device=self.device)
        self.train_views = [frame_to_view(f, self.device) for f in scene.train]

        self.spec = self.method.spec(cfg.sh_degree)
        self.total_steps = cfg.total_steps()
        batch = min(cfg.batch_size, len(scene.train))
        self.batch_size = batch
        self.targets = TargetStager.for_frames(self.images, self.device, batch, scene.train)
        lrs = LearningRates(self.spec, self.total_steps, extent=scene.extent, batch_size=batch)
        adam = AdamConfig(betas=adam_betas(batch))
        key = None  # the attributes the engine keeps on the GPU (None: its own choice)
        if checkpoint is not None:  # rows as they were, for an engine that takes them so
            lazy = cfg.offload == "clm"
            rows = checkpoint_source(checkpoint, self.spec, lazy=lazy)
            key = stored_key(checkpoint, self.spec) if lazy else None  # as they were kept
        elif cfg.init_ply is not None:
            rows = self.method.ply_source(cfg.init_ply, self.spec, scene.to_train)
        else:
            rows = RowSource.of(
                self.method.initial_params(self.spec, scene.points, scene.colors, cfg.init_opacity)
            )
        max_pixels = max(f.width * f.height for f in frames)
        self.engine: Engine = make_engine(
            EngineOptions.of(cfg),
            self.spec,
            rows,
            self.method.renderer(self.device, training=True),
            lrs,
            adam,
            self.device,
            max_pixels,
            self.train_views,
            key,
        )
        densify = DensifyConfig(
            start=cfg.densify_start,
            stop=cfg.densify_stop,
            every=cfg.densify_every,
            reset_every=cfg.opacity_reset_every,
            grad_threshold=cfg.grad_threshold,
        )
        self.density = DensityController(
            densify,
            self.method,
            self.spec,
            scene.extent,
            batch,
            self.device,
            max_gaussians=self.engine.max_gaussians,
            seed=cfg.seed,
        )
        self.sampler = BatchSampler(len(scene.train), batch, cfg.seed)
        self.log = TrainLog(cfg.output)
        self.elapsed = 0.0
        self.window = LogWindow()
        if checkpoint is not None:
            self._restore(checkpoint)
        write_json(cfg.output / "config.json", config_to_dict(cfg))
        self._stop_requested = False
        self._saved: tuple[int, Path] | None = None

    # ---- one step ----------------------------------------------------------------------------

    def train_step(self, batch: list[int]) -> tuple[Tensor, Tensor]:
        """One optimiser step; returns the summed loss and summed squared error (no host sync)."""
        targets = self.targets.take(batch)
        views: list[View] = [self.train_views[i] for i in batch]
        step = self.engine.step + 1
        degree = sh_degree_at(step, self.batch_size, self.cfg.sh_degree, self.cfg.sh_degree_every)
        loss_fn = batch_loss(self.method, targets, views, step * self.batch_size)

        def observe(ids: Tensor, out: RenderOutput, view: View) -> None:
            self.density.observe(ids, out, view, self.engine.num_gaussians)

        self.engine.train_step(views, loss_fn, observe, degree, self.background)
        return loss_fn.loss_sum, loss_fn.mse_sum

    # ---- the loop ----------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        tqdm.write("stopping after this step and saving a checkpoint (press Ctrl-C again to abort)")

    def sh_degree_now(self) -> int:
        """The SH degree the model has reached (what evaluation and previews render with)."""
        return sh_degree_at(
            max(self.engine.step, 1), self.batch_size, self.cfg.sh_degree, self.cfg.sh_degree_every
        )

    def _evaluate(self, render_dir: Path | None, with_lpips: bool) -> dict[str, Any]:
        offset = len(self.scene.train)
        ids = [offset + i for i in range(len(self.scene.test))]
        metrics = evaluate(
            self.engine,
            self.scene.test,
            self.images,
            ids,
            self.sh_degree_now(),
            self.background,
            render_dir=render_dir,
            with_lpips=with_lpips,
        )
        for hook in self.hooks:
            hook.after_eval(self, metrics)
        return metrics

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        log.info(
            "training %s: %d train / %d test images, %s Gaussians, %d steps of %d images, "
            "method %s, offload=%s on %s",
            cfg.scene,
            len(self.scene.train),
            len(self.scene.test),
            format_count(self.engine.num_gaussians),
            self.total_steps,
            self.batch_size,
            self.method.name,
            cfg.offload,
            self.device,
        )
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(
            total=self.total_steps,
            initial=self.engine.step,
            disable=not cfg.progress,
            dynamic_ncols=True,
            unit="step",
        )
        self.window.since = time.perf_counter()
        try:
            while self.engine.step < self.total_steps and not self._stop_requested:
                if cfg.max_seconds is not None and self.elapsed >= cfg.max_seconds:
                    log.info(
                        "time limit of %.0f s reached at step %d", cfg.max_seconds, self.engine.step
                    )
                    break
                t0 = time.perf_counter()
                batch = self.sampler.next_batch()
                upcoming = self.sampler.peek()
                self.images.prefetch(upcoming)  # decode ahead while this step runs
                self.targets.prepare(upcoming)
                loss_sum, mse_sum = self.train_step(batch)
                step = self.engine.step
                try:
                    report = self.density.after_step(self.engine, step)
                except ClmError:  # e.g. host memory ran out: rows were left as they were
                    self.save_checkpoint()
                    raise
                if report is not None and (report.cloned or report.split or report.pruned):
                    log.info(
                        "step %d: cloned %d, split %d, pruned %d%s -> %s Gaussians",
                        step,
                        report.cloned,
                        report.split,
                        report.pruned,
                        f", capped {report.capped}" if report.capped else "",
                        format_count(self.engine.num_gaussians),
                    )
                self.window.add(loss_sum, mse_sum, len(batch))
                self.elapsed += time.perf_counter() - t0
                bar.update(1)
                if (
                    (cfg.log_every and step % cfg.log_every == 0)
                    or step == self.total_steps
                    or self._out_of_time()
                ):
                    self._log_row(step, bar)
                if cfg.eval_every and step % cfg.eval_every == 0 and self.scene.test:
                    metrics = self._evaluate(None, with_lpips=False)
                    self.log.add_eval(step, metrics)
                    log.info(
                        "step %d: held-out PSNR %.2f SSIM %.4f",
                        step,
                        metrics["psnr"],
                        metrics["ssim"],
                    )
                if (
                    cfg.checkpoint_every
                    and step % cfg.checkpoint_every == 0
                    and step < self.total_steps
                ):
                    self.save_checkpoint()
                    self.log.plot()
                for hook in self.hooks:
                    hook.after_step(self)
        finally:
            bar.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        if self._stop_requested:
            path = self.save_checkpoint()
            self.log.plot()
            raise Interrupted(self.engine.step, path)
        return self.finish()

    def _out_of_time(self) -> bool:
        return self.cfg.max_seconds is not None and self.elapsed >= self.cfg.max_seconds

    def _log_row(self, step: int, bar: tqdm) -> None:
        """Write the log row of the steps since the last one, and show it on the bar."""
        cuda = self.device.type == "cuda"
        mem = torch.cuda.max_memory_reserved(self.device) / 2**30 if cuda else None
        row = self.window.close(step, self.batch_size, self.engine.num_gaussians, self.elapsed, mem)
        self.log.add(row)
        postfix = {
            "loss": f"{row['loss']:.4f}",
            "psnr": f"{row['train_psnr']:.2f}",
            "G": format_count(self.engine.num_gaussians),
            "img/s": f"{row['images_per_s']:.1f}",
        }
        if mem is not None:
            postfix["mem"] = f"{mem:.1f}G"
        bar.set_postfix(postfix, refresh=False)

    def finish(self) -> dict[str, Any]:
        """Final checkpoint, PLY, held-out metrics with renders, and the plot."""
        cfg = self.cfg
        path = self.save_checkpoint()
        t0 = time.perf_counter()
        written, dropped = self.method.export_ply(
            cfg.output / "point_cloud.ply",
            self.spec,
            (chunk.params for chunk in self.engine.state_chunks(STREAM_ROWS)),
            self.engine.num_gaussians,
            self.scene.to_train,
        )
        log.info("PLY: %d Gaussians in %.1f s", written, time.perf_counter() - t0)
        if dropped:
            log.warning("dropped %d Gaussians with non-finite values from the PLY", dropped)
        metrics: dict[str, Any] = {"step": self.engine.step, "num_gaussians": written}
        if self.scene.test:
            result = self._evaluate(cfg.output / "renders" / "test", with_lpips=True)
            self.log.add_eval(self.engine.step, result)
            metrics.update(result)
        else:
            metrics["note"] = "no held-out images"
        metrics["train_seconds"] = round(self.elapsed, 2)
        write_json(cfg.output / "metrics.json", metrics)
        self.log.plot()
        log.info(
            "done: %d Gaussians -> %s; checkpoint %s; held-out PSNR %s",
            written,
            cfg.output / "point_cloud.ply",
            path,
            f"{metrics['psnr']:.2f}" if metrics.get("psnr") is not None else "n/a",
        )
        for hook in self.hooks:
            hook.after_training(self)
        return metrics

    def close(self) -> None:
        for hook in self.hooks:
            hook.close()
        self.engine.close()
        self.targets.close()
        self.images.close()
        detach_file_log(self._log_handler)
