"""`vkr demo` on a fresh directory: a funnel with accepted examples; the second run pays nothing."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

from test_run import vkr_here

VKR = str(Path(sys.executable).parent / "vkr")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_demo_twice(tmp_path):
    port = str(free_port())
    first = subprocess.run(
        [VKR, "demo", "--out", str(tmp_path), "--port", port],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    accepted = int(re.search(r"^\s+accepted\s+(\d+)$", first, re.MULTILINE).group(1))
    assert accepted >= 1
    assert re.search(r"model calls made this run: [1-9]\d*", first)
    assert "SCRIPTED local endpoint" in first and "vkr generate" in first
    # The second in this process: what it pays is the point, not a new process's imports.
    again = vkr_here("demo", "--out", tmp_path, "--port", port)
    assert again.returncode == 0, again.stdout + again.stderr
    second = again.stdout
    assert "model calls made this run: 0 (server /stats)" in second
    assert re.search(r"^\s+accepted\s+(\d+)$", second, re.MULTILINE).group(1) == str(accepted)
