"""The web viewer: a viser server whose browsers each see frames clm renders at their camera.

Engines are not thread-safe, so viser's callbacks (its own threads) only record each browser's
latest camera. Frames are rendered by whoever owns the engine, the training thread between
steps or ``clm-view``'s loop, through :meth:`Viewer.draw_due`, which paces them: at most
``fps`` frames a second, and with ``share`` below 1 a frame that took t seconds is followed by
at least ``t * (1 - share) / share`` seconds without one, so frames never take more than that
share of the thread's time.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from clm.errors import ClmError
from clm.viewer.camera import StartPose, ViewerCamera

# render(camera, max_side) -> uint8 [H, W, 3]
FrameRenderer = Callable[[ViewerCamera, int], np.ndarray]


def import_viser(who: str) -> ModuleType:
    """viser, or one error line saying how to get it (it is an optional extra)."""
    try:
        import viser
    except ImportError:
        raise ClmError(f"{who} needs the viser package: pip install clm[viewer]") from None
    return viser


@dataclass
class _Browser:
    client: Any  # viser's ClientHandle
    camera: ViewerCamera | None = None
    camera_version: int = 0
    drawn: tuple[int, int] | None = None  # (camera, model) versions of the last frame sent
    drawn_at: float = 0.0


class Viewer:
    """The server and its page (status text, the last frame's size and time, a resolution
    slider starting at ``max_side``). ``who`` names the command in the error line when viser is
    missing; ``port`` is the first one tried (0: any free one); ``fps`` and ``share`` pace the
    frames (see the module docstring)."""

    def __init__(self, who: str, port: int, fps: float, share: float, max_side: int) -> None:
        viser = import_viser(who)
        self.server = viser.ViserServer(host="0.0.0.0", port=port, verbose=False)
        self.server.gui.configure_theme(show_share_button=False)  # no tunnel to a public host
        self._status = self.server.gui.add_markdown("loading the model...")
        self._frame_note = self.server.gui.add_markdown("")
        self._resolution = self.server.gui.add_slider(
            "Max resolution",
            min=64,
            max=4096,
            step=32,
            initial_value=max_side,
            hint="longer side of the rendered frames, in pixels",
        )
        self._resolution.on_update(lambda _: self._redraw_all())
        self._min_interval = 1.0 / fps
        self._share = share
        self._lock = threading.Lock()
        self._browsers: dict[int, _Browser] = {}
        self._woken = threading.Event()
        self._next_frame = 0.0
        self.server.on_client_connect(self._connect)
        self.server.on_client_disconnect(self._disconnect)

    @property
    def url(self) -> str:
        return f"http://localhost:{self.server.get_port()}"

    # ---- viser's threads ---------------------------------------------------------------------

    def _connect(self, client: Any) -> None:
        with self._lock:
            self._browsers[client.client_id] = _Browser(client)
        client.camera.on_update(self._record)
        self._record(client.camera)  # its first camera came before this callback was attached

    def _disconnect(self, client: Any) -> None:
        with self._lock:
            self._browsers.pop(client.client_id, None)

    def _record(self, handle: Any) -> None:
        camera = ViewerCamera(
            tuple(float(v) for v in handle.wxyz),
            tuple(float(v) for v in handle.position),
            float(handle.fov),
            int(handle.image_width),
            int(handle.image_height),
        )
        if camera.width < 1 or camera.height < 1 or not 0 < camera.fov < np.pi:
            return  # a page not laid out yet
        with self._lock:
            browser = self._browsers.get(handle.client.client_id)
            if browser is None:
                return
            browser.camera = camera
            browser.camera_version += 1
        self._woken.set()

    def _redraw_all(self) -> None:
        with self._lock:
            for browser in self._browsers.values():
                browser.drawn = None
        self._woken.set()

    # ---- the thread that owns the engine -----------------------------------------------------

    def set_start(self, pose: StartPose) -> None:
        """Where browsers start (and "Reset View" returns to); browsers already open go there."""
        self.server.scene.set_up_direction(pose.up)
        start = self.server.initial_camera
        start.position = pose.position
        start.look_at = pose.look_at
        start.up = pose.up
        start.fov = pose.fov
        with self._lock:
            clients = [b.client for b in self._browsers.values()]
        for client in clients:
            with client.atomic():
                client.camera.position = pose.position
                client.camera.look_at = pose.look_at
                client.camera.up_direction = pose.up
                client.camera.fov = pose.fov

    def set_status(self, markdown: str) -> None:
        if self._status.content != markdown:
            self._status.content = markdown

    def draw_due(self, render: FrameRenderer, model_version: int) -> bool:
        """Render and send one frame if one is due: a browser whose camera or model (a new
        ``model_version``) changed since its last frame, the longest waiting first, once the
        pacing allows. True when a frame was sent."""
        if time.perf_counter() < self._next_frame:
            return False
        with self._lock:
            due = [
                b
                for b in self._browsers.values()
                if b.camera is not None and b.drawn != (b.camera_version, model_version)
            ]
            if not due:
                return False
            browser = min(due, key=lambda b: b.drawn_at)
            camera, versions = browser.camera, (browser.camera_version, model_version)
        assert camera is not None
        start = time.perf_counter()
        image = render(camera, int(self._resolution.value))
        with warnings.catch_warnings():  # the browser may have closed meanwhile: nothing to do
            warnings.filterwarnings("ignore", message="Queued a BackgroundImageMessage")
            browser.client.scene.set_background_image(image, format="jpeg", jpeg_quality=90)
        end = time.perf_counter()
        took = end - start
        with self._lock:
            browser.drawn, browser.drawn_at = versions, end
        self._next_frame = max(
            start + self._min_interval, end + took * (1.0 - self._share) / self._share
        )
        self._frame_note.content = f"frame {image.shape[1]}x{image.shape[0]} in {took * 1e3:.0f} ms"
        return True

    def serve(self, render: FrameRenderer, model_version: int) -> None:
        """Draw frames as browsers move, until Ctrl-C (or SIGTERM). The signals only ask the
        loop to stop, so it ends after the frame in flight, never inside a render."""
        stop = threading.Event()

        def ask_stop(signum: int, frame: Any) -> None:
            stop.set()
            self._woken.set()

        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, ask_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with contextlib.suppress(KeyboardInterrupt):
                while not stop.is_set():
                    if self.draw_due(render, model_version):
                        continue
                    wait = self._next_frame - time.perf_counter()
                    self._woken.wait(wait if wait > 0 else 0.5)
                    self._woken.clear()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def close(self) -> None:
        self.server.stop()
