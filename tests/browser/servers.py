"""What the browser tests share: where things are, how Chromium is launched, starting a server on a free port and
waiting until it answers (JupyterLab in test_chapter1_browser.py, Voila in test_voila_browser.py and
test_voila_reconnect.py), stopping it again, and watching a page for errors and outside requests."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
OUT = ROOT / "build" / "browser"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def repo_env(**extra: str) -> dict[str, str]:
    """The environment with the repository first on PYTHONPATH (the kernels import this checkout's package)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **extra}


def wait_until_answers(proc: subprocess.Popen, url: str, name: str, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200; fail at once if the server ``proc`` exits, or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.HTTPError):
            time.sleep(0.3)
    raise TimeoutError(f"{name} did not answer at {url.split('?')[0]} within {timeout_s} s")


def stop_server(proc: subprocess.Popen, *folders: str | Path) -> None:
    """Stop the server ``proc`` (terminate, kill after 15 s) and remove the temporary ``folders`` it used."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def watch(page, errors: list[str], outside: list[str]) -> None:
    """Collect ``page``'s console errors and uncaught exceptions into ``errors``, and every request that leaves the
    machine (anything but 127.0.0.1, ``file:``, ``data:`` and ``blob:``) into ``outside``."""
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: outside.append(r.url)
            if not re.match(r"(https?|wss?)://127\.0\.0\.1[:/]|file:|data:|blob:", r.url) else None)
