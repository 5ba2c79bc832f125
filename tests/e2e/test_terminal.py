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


def _on_a_terminal(*args):
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen(command(*args), cwd=REPO, stdin=follower, stdout=follower, stderr=follower)
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
    return proc.returncode, out.decode(errors="replace")


def test_progress_bar_on_a_terminal_and_plain_lines_otherwise(tmp_path):
    """The bar ends saying why (a stop's reason and step, or done) and a resumed run's bar says
    where it resumed."""
    code, text = _on_a_terminal(tmp_path / "tty", "trainer.max_steps=100000", "report.log_every=10",
                                "stopping.max_time=2", "stopping.save_guess=0.5", "stopping.margin=0.5")
    assert code == 124 and "train: stopped at step" in text and "(time limit)" in text, text
    stopped = int(text.split("train: stopped at step ")[-1].split()[0])
    end = stopped + 30
    code, text = _on_a_terminal(tmp_path / "tty", f"trainer.max_steps={end}", "report.log_every=10")
    assert code == 0 and f"{end}/{end}" in text and "it/s" in text and "\r" in text, text
    assert f"train (resumed at step {stopped})" in text and f"train: done at step {end}" in text, text
    plain = subprocess.run(command(tmp_path / "pipe", "trainer.max_steps=30", "report.log_every=10"), cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert "step 30/30 loss" in plain.stdout + plain.stderr and "it/s" not in plain.stdout + plain.stderr
