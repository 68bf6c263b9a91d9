"""``clm-view`` seen by a browser: headless Chromium loads the page and a frame is drawn.

Chromium is driven over the DevTools protocol on a pipe, with the standard library only. The
README's picture comes from this test: ``CLM_VIEWER_SCREENSHOT=docs/viewer.png`` keeps the
screenshot, and ``CLM_VIEWER_RUN=DIR`` shows that run instead of a few steps on a tiny scene."""

import base64
import contextlib
import fcntl
import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clm.cli.train import main as train_main
from clm.synthetic.generate import generate_scene

pytestmark = pytest.mark.browser


class Chromium:
    """Headless Chromium with ``--remote-debugging-pipe``: DevTools commands as JSON messages
    ending in NUL, read by the browser on fd 3, answered on fd 4."""

    def __init__(self, profile: Path, width: int, height: int) -> None:
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        to_browser, from_browser = os.pipe(), os.pipe()
        # Above 9, so bash's redirections onto fds 3 and 4 cannot overwrite them.
        theirs = [fcntl.fcntl(to_browser[0], fcntl.F_DUPFD, 10)]
        theirs.append(fcntl.fcntl(from_browser[1], fcntl.F_DUPFD, 10))
        for fd in (to_browser[0], from_browser[1]):
            os.close(fd)
        flags = [
            "--headless",
            "--no-sandbox",  # CI runs as root
            "--disable-dev-shm-usage",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{theirs[0]} 4>&{theirs[1]}', "bash", binary, *flags],
            pass_fds=theirs,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in theirs:
            os.close(fd)
        self._out = os.fdopen(to_browser[1], "wb", buffering=0)
        self._in = os.fdopen(from_browser[0], "rb", buffering=0)
        self._buffer = b""
        self._id = 0

    def call(self, method: str, session: str | None = None, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        self._out.write(json.dumps(message).encode() + b"\0")
        while True:  # events (messages without our id) are skipped
            while b"\0" not in self._buffer:
                chunk = self._in.read(1 << 16)
                if not chunk:
                    raise RuntimeError(f"chromium closed the pipe during {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> str:
        target = self.call("Target.createTarget", url=url)["targetId"]
        return self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def text(self, session: str, expression: str) -> str:
        result = self.call("Runtime.evaluate", session, expression=expression, returnByValue=True)
        return str(result["result"].get("value", ""))

    def screenshot(self, session: str) -> np.ndarray:
        data = self.call("Page.captureScreenshot", session, format="png")["data"]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, OSError):
            self.call("Browser.close")
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._out.close()
        self._in.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if os.environ.get("CLM_VIEWER_RUN"):
        return Path(os.environ["CLM_VIEWER_RUN"])
    root = tmp_path_factory.mktemp("browser")
    size = {"images": 8, "width": 64, "height": 48}
    scene = generate_scene(root / "scene", "tiny", **size, device="cpu", progress=False)
    out = root / "run"
    args = [str(scene), "--output", str(out), "--steps", "20", "--device", "cpu"]
    assert train_main([*args, "--no-progress", "--eval-every", "0", "--checkpoint-every", "0"]) == 0
    return out


def start_view(run: Path) -> tuple[subprocess.Popen, str]:
    """``clm-view RUN`` on a free port, and the URL it prints."""
    script = Path(sys.executable).with_name("clm-view")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "clm.cli.view"]
    process = subprocess.Popen(
        [*command, str(run), "--port", "0", "--device", "cpu"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in process.stderr], daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert process.poll() is None, "clm-view exited before serving"
            continue
        if line.startswith("viewer: "):
            return process, line.split()[1]
    process.kill()
    raise AssertionError("clm-view printed no URL within 60 s")


def drawn(shot: np.ndarray) -> bool:
    """Whether a frame fills the canvas left of the panel (without one the page is white)."""
    height, width = shot.shape[:2]
    canvas = shot[height // 3 :, : width // 2].astype(np.int32)
    return bool((np.abs(canvas - 255).sum(axis=2) > 30).mean() > 0.9 and canvas.std() > 5)


def test_clm_view_draws_a_frame_in_chromium(run, tmp_path):
    process, url = start_view(run)
    browser = Chromium(tmp_path / "profile", 960, 600)
    try:
        session = browser.open(url)
        deadline = time.monotonic() + 60
        page, shot = "", None
        while time.monotonic() < deadline:
            time.sleep(0.5)
            page = browser.text(session, "document.body.innerText")
            if "frame " not in page:  # the viewer's note of the last frame it sent
                continue
            # The notice that WebGL runs in software (no GPU here) covers part of the frame.
            browser.text(
                session,
                "document.querySelectorAll('.mantine-Notification-root').forEach(n => n.remove())",
            )
            shot = browser.screenshot(session)
            if drawn(shot):  # the page may show the note before it has painted the frame
                break
    finally:
        browser.close()
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(90)  # (a loaded 2-core machine may be mid-frame)
        except subprocess.TimeoutExpired:
            process.kill()  # never left running after the test
            process.wait()
            raise
    assert "frame " in page and "Gaussians" in page, page
    assert shot is not None
    Image.fromarray(shot).save(os.environ.get("CLM_VIEWER_SCREENSHOT") or tmp_path / "viewer.png")
    assert drawn(shot)
    assert code == 0  # Ctrl-C is how clm-view stops
