"""Shared test setup: GPU tests are skipped where CUDA is absent, browser tests where no headless
Chromium is on PATH."""

import shutil

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs CUDA")
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        skips["browser"] = pytest.mark.skip(reason="needs chromium or chromium-browser on PATH")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)
