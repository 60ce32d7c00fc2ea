"""`kedit tui` in a real terminal: tmux runs it, send-keys types, capture-pane reads the screen."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
KEDIT = Path(sys.executable).with_name("kedit")


class Tmux:
    def __init__(self, socket: str) -> None:
        self.base = ["tmux", "-L", socket]

    def __call__(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], capture_output=True, text=True, check=True).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "kedit")

    def wait_for(self, text: str, seconds: float = 90.0) -> str:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never appeared on the screen:\n{self.screen()}")


def test_kedit_tui_in_tmux(fact_world_dir: Path, tmp_path: Path) -> None:
    assert shutil.which("tmux"), "tmux is needed for this test (.ci/run installs it)"
    tmux = Tmux(f"kedit-test-{os.getpid()}")
    keep = ("PATH", "HOME", "KEDIT_CACHE_DIR", "KEDIT_DATA_DIR", "KEDIT_CONFIG_DIR", "HF_HUB_OFFLINE", "HF_HOME")
    env = " ".join(f"{k}={os.environ[k]!s}" for k in keep if k in os.environ)
    command = f"cd {Path(__file__).resolve().parent.parent} && env TERM=xterm-256color {env} {KEDIT} tui"
    tmux("new-session", "-d", "-s", "kedit", "-x", "100", "-y", "30", command)
    try:
        tmux.wait_for("Type to chat")
        screen = tmux.screen()
        for text in ("kedit", "fact-world", "Edits", "Steering", "Probes", "Roll back"):
            assert text in screen, screen
        tmux("send-keys", "-t", "kedit", "-l", "Where did Watts Humphrey study?")
        time.sleep(0.3)
        tmux("send-keys", "-t", "kedit", "C-j")
        tmux.wait_for("Illinois")
        tmux("send-keys", "-t", "kedit", "F3")
        tmux.wait_for("Sweep")
        tmux("send-keys", "-t", "kedit", "-l", "/steer add vectors/fact-world-mood.safetensors")
        time.sleep(0.3)
        tmux("send-keys", "-t", "kedit", "C-j")
        tmux.wait_for("+0.50")  # the vector's row, with its slider at the file's strength
        tmux("send-keys", "-t", "kedit", "C-q")
        end = time.monotonic() + 20
        while time.monotonic() < end and "kedit" in tmux("list-sessions", "-F", "#S"):
            time.sleep(0.2)
    except subprocess.CalledProcessError:
        pass  # the session ended: list-sessions fails once the server is gone
    finally:
        subprocess.run([*tmux.base, "kill-server"], capture_output=True)
