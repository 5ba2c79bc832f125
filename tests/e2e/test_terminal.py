"""On a terminal rank 0 draws a progress bar; elsewhere it writes plain log lines."""

import fcntl
import os
import pty
import struct
import subprocess
import termios

import pytest

from recipe_helpers import REPO, command

pytestmark = pytest.mark.slow


def test_progress_bar_on_a_terminal_and_plain_lines_otherwise(tmp_path):
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen(command(tmp_path / "tty", "trainer.max_steps=30", "trainer.log_every=10"), cwd=REPO,
                            stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    text = out.decode(errors="replace")
    assert proc.returncode == 0 and "30/30" in text and "it/s" in text and "\r" in text, text
    plain = subprocess.run(command(tmp_path / "pipe", "trainer.max_steps=30", "trainer.log_every=10"), cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert "step 30/30 loss" in plain.stdout + plain.stderr and "it/s" not in plain.stdout + plain.stderr
