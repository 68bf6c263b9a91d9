"""City scale end to end, as a user runs it: generate the scene and a dense initial model, train
under the GPU and host budgets, kill the run (-9) after its first checkpoint, resume it, train
more, export the PLY and evaluate the held-out views; print one Markdown table.

    python tools/bench_city.py --scene runs/metro --images 400 --gaussians 100e6 \\
        --max-gpu-gb 24 --max-host-gb 120 --steps 30 --checkpoint-at 15

Every stage runs the installed commands (clm-synth, clm-train, clm-export) as subprocesses; the
peak host RSS of each is read from /proc (VmHWM) while it runs, and the peak GPU memory from the
run's own log. Stages whose output already exists are skipped (``--stages`` picks some), so the
work can be split over several calls on a machine that keeps its disk.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("scene", "dense", "train", "resume", "export", "none")


def clm(command: str, *args: str) -> list[str]:
    """What ``clm-<command> args`` runs, without needing the console scripts installed."""
    return [sys.executable, "-m", f"clm.cli.{command}", *args]


def peak_rss(pid: int) -> int:
    """VmHWM of a live process, in bytes (0 once it has gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(match.group(1)) * 1024 if match else 0


def run(cmd: list[str], log: Path, until: Path | None = None) -> dict[str, float]:
    """Run ``cmd`` (output to ``log``), sampling its peak RSS; with ``until``, kill it (-9) as
    soon as that file exists. Returns seconds and peak RSS."""
    print("$", " ".join(cmd), flush=True)
    start, peak = time.perf_counter(), 0
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            peak = max(peak, peak_rss(proc.pid))
            if until is not None and until.exists():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.2)
    seconds = time.perf_counter() - start
    if until is None and proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        sys.exit(f"{cmd[0]} failed ({proc.returncode}):\n" + "\n".join(tail))
    return {"seconds": seconds, "peak_rss": peak}


def log_figures(text: str) -> dict[str, float]:
    """Checkpoint size/seconds, PLY seconds and load figures from a run's train.log lines."""
    found: dict[str, float] = {}
    if m := re.findall(r"checkpoint at step \d+: ([\d.]+) GB in ([\d.]+) s", text):
        found["ckpt_gb"], found["ckpt_s"] = float(m[-1][0]), float(m[-1][1])
    if m := re.findall(r"PLY: \d+ Gaussians in ([\d.]+) s", text):
        found["ply_s"] = float(m[-1])
    if m := re.findall(r"up to ([\d.]+)M Gaussians at (\d+) B each", text):
        found["host_plan_m"] = float(m[0][0])
    return found


def scene_size(scene: Path) -> str:
    info = json.loads((scene / "synthetic.json").read_text())["generator"]
    return f"{info['images']} images of {info['width']}x{info['height']}"


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scene", type=Path, required=True)
    parser.add_argument("--size", default="metro")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--gaussians", type=float, default=100e6)
    parser.add_argument("--output", type=Path, help="run folder (default: SCENE-run)")
    parser.add_argument("--max-gpu-gb", type=float, default=24)
    parser.add_argument("--max-host-gb", type=float, default=120)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="steps in all (both runs)")
    parser.add_argument("--checkpoint-at", type=int, default=15, help="first run killed after")
    parser.add_argument("--stages", default=",".join(STAGES))
    args = parser.parse_args()
    stages = set(args.stages.split(","))
    n = int(args.gaussians)
    out = args.output or args.scene.with_name(args.scene.name + "-run")
    figures_path = out.with_suffix(".json")
    figures = json.loads(figures_path.read_text()) if figures_path.exists() else {}
    logs = args.scene.parent
    logs.mkdir(parents=True, exist_ok=True)
    ply = args.scene / f"dense_{n}.ply"

    def save() -> None:
        figures_path.write_text(json.dumps(figures, indent=1))

    if "scene" in stages and not (args.scene / "synthetic.json").exists():
        cmd = clm("synth", str(args.scene), "--size", args.size, "--images", str(args.images))
        figures["scene"] = run([*cmd, "--quiet"], logs / "synth.log")
        save()
    if "dense" in stages and not ply.exists():
        cmd = clm("synth", str(args.scene), "--dense", str(n), "--dense-only", "--quiet")
        figures["dense"] = run(cmd, logs / "dense.log")
        figures["dense"]["bytes"] = ply.stat().st_size
        save()
    train = [
        *clm("train", str(args.scene), "--output", str(out), "--init-ply", str(ply)),
        *("--max-gpu-gb", str(args.max_gpu_gb), "--max-host-gb", str(args.max_host_gb)),
        *("--batch-size", str(args.batch_size), "--steps", str(args.steps)),
        *("--checkpoint-every", str(args.checkpoint_at), "--keep-checkpoints", "1"),
        *("--densify-start", "100000000", "--log-every", "5", "--no-progress"),
    ]
    first = out / "checkpoints" / f"step_{args.checkpoint_at:07d}.ckpt"
    if "train" in stages and "train" not in figures:
        if out.exists():
            shutil.rmtree(out)
        figures["train"] = run(train, logs / "train.log", until=first)
        figures["train"].update(log_figures((out / "train.log").read_text()))
        save()
    if "resume" in stages and "resume" not in figures:
        cmd = clm("train", "--resume", "--output", str(out), "--no-progress")
        figures["resume"] = run(cmd, logs / "resume.log")
        text = (out / "train.log").read_text()
        figures["resume"].update(log_figures(text))
        starts = re.findall(r"resumed from step", text)
        figures["resume"]["resumed"] = bool(starts)
        with open(out / "train_log.csv") as fh:
            rows = list(csv.DictReader(fh))
        tail = [r for r in rows if int(r["step"]) > args.checkpoint_at]
        figures["resume"]["images_per_s"] = sum(float(r["images_per_s"]) for r in tail) / max(
            len(tail), 1
        )
        figures["resume"]["gpu_gb"] = max(float(r["gpu_mem_gb"]) for r in rows)
        figures["metrics"] = json.loads((out / "metrics.json").read_text())
        save()
    if "export" in stages and "export" not in figures:
        (out / "point_cloud.ply").unlink(missing_ok=True)  # the disk holds one PLY at a time
        cmd = clm("export", str(out), "--output", str(out / "point_cloud.ply"))
        figures["export"] = run(cmd, logs / "export.log")
        save()
    if "none" in stages and "none" not in figures:
        figures["none"] = none_capacity(args)
        save()
    report(args, n, figures)


def none_capacity(args: argparse.Namespace) -> float:
    """The most Gaussians ``--offload none`` plans for under the same GPU budget and images."""
    import torch

    from clm.data.scene import load_scene
    from clm.model.spec import gaussian_splatting_spec
    from clm.offload.budget import GIB, plan_gpu

    scene = load_scene(args.scene, 1, 8)
    pixels = max(f.width * f.height for f in scene.train)
    total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0
    budget = min(int(args.max_gpu_gb * GIB), total or int(args.max_gpu_gb * GIB))
    plan = plan_gpu(gaussian_splatting_spec(3), "none", budget, pixels)
    return plan.max_gaussians


def report(args: argparse.Namespace, n: int, f: dict) -> None:
    train, resume = f.get("train", {}), f.get("resume", {})
    metrics = f.get("metrics", {})
    steps = args.steps - args.checkpoint_at
    rate = resume.get("images_per_s", 0)
    rss = max(train.get("peak_rss", 0), resume.get("peak_rss", 0))
    rows = [
        ("Gaussians", f"{n / 1e6:.0f}M, SH degree 3"),
        ("scene", f"{args.size}, {scene_size(args.scene)}"),
        ("dense PLY written", f"{f['dense']['seconds']:.0f} s" if "dense" in f else "-"),
        ("budgets", f"--max-gpu-gb {args.max_gpu_gb:g} --max-host-gb {args.max_host_gb:g}"),
        ("host plan", f"up to {train.get('host_plan_m', 0):.1f}M Gaussians"),
        (
            "images/s (resumed run)",
            f"{rate:.2f} ({rate / args.batch_size:.2f} steps/s)",
        ),
        ("peak GPU reserved", f"{resume.get('gpu_gb', 0):.2f} GiB"),
        ("peak host RSS, training", gib(train.get("peak_rss", 0))),
        ("peak host RSS, resumed", gib(resume.get("peak_rss", 0))),
        (
            "host RSS per Gaussian",
            f"{rss / n:.0f} B",
        ),
        ("checkpoint", f"{train.get('ckpt_gb', 0):.1f} GB in {train.get('ckpt_s', 0):.1f} s"),
        ("first run (load, train, checkpoint), killed -9", f"{train.get('seconds', 0):.0f} s"),
        (f"resume + {steps} steps + checkpoint + PLY + eval", f"{resume.get('seconds', 0):.0f} s"),
        ("PLY at the end of training", f"{resume.get('ply_s', 0):.1f} s"),
        (
            "clm-export from the checkpoint",
            f"{f['export']['seconds']:.0f} s, {gib(f['export']['peak_rss'])} peak RSS"
            if "export" in f
            else "-",
        ),
        ("held-out PSNR / SSIM", f"{metrics.get('psnr', 0):.2f} / {metrics.get('ssim', 0):.3f}"),
        ("--offload none under the same GPU budget", f"{f.get('none', 0) / 1e6:.1f}M (planned)"),
    ]
    print(f"{time.strftime('%Y-%m-%d')}; command: {' '.join(sys.argv)}")
    print("| what | measured |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
