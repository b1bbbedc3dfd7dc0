"""Progress bars in a log file: one plain line per redraw, not tqdm's carriage-return residue."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

from tests.conftest import offline_env
from trainer.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_whole_lines_a_terminal_the_live_bar(monkeypatch):
    """Guards redirected logs (`slapgen train ... > train.log 2>&1`, nohup, a Ray worker's log) holding one endless
    line of `\\r`-joined redraws: in a file each redraw is a line of its own, and 200 quick updates and forced
    redraws (`set_postfix`) write the first and the last state only (one line per TQDM_MININTERVAL, 30 s by
    default; the last when the bar closes), while a terminal keeps tqdm's live bar."""
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    log, terminal = io.StringIO(), Terminal()
    for stream in (log, terminal):
        with progress_bar(total=200, desc="train", unit="step", file=stream) as bar:
            for step in range(200):
                bar.set_postfix(step=step)  # redraws at once, as eval's bar does on every denoising step
                bar.update(1)
    lines = log.getvalue().splitlines(keepends=True)
    assert "\r" not in log.getvalue() and all(line.endswith("\n") for line in lines)
    assert len(lines) == 2 and lines[0].startswith("train:   0%") and lines[-1].startswith("train: 100%")
    assert re.search(r"200/200 \[\d\d:\d\d<00:00.*step=199", lines[-1])
    assert "\r" in terminal.getvalue()


def test_tqdm_disable_reaches_bars_given_an_explicit_disable(monkeypatch):
    """Guards TQDM_DISABLE=1 (tqdm's own switch) being ignored by every bar that passes `disable=` itself, which is
    every slapgen bar with a --quiet-like option: tqdm lets an explicit argument win over its variable."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    log = io.StringIO()
    with progress_bar(total=3, desc="curate", disable=False, file=log) as bar:
        bar.update(3)
    assert log.getvalue() == ""


def test_a_command_with_stderr_in_a_file_writes_readable_lines(tmp_path):
    """The same through a real command: `slapgen demo-data` with stderr redirected to a file leaves no carriage
    return in it, and its bar's last state is a line of its own."""
    log = tmp_path / "demo.log"
    env = offline_env(tmp_path)
    env.pop("TQDM_DISABLE", None)
    with log.open("w") as stderr:
        result = subprocess.run([sys.executable, "-m", "trainer", "demo-data", str(tmp_path / "clips"), "--clips", "2"],
                                env=env, stdout=subprocess.DEVNULL, stderr=stderr, timeout=300, cwd=os.getcwd())
    text = log.read_bytes().decode()  # read_text() would turn each "\r" into "\n"
    assert result.returncode == 0, text[-2000:]
    assert "\r" not in text
    assert re.search(r"^demo clips: 100%.* 2/2 \[", text, flags=re.M), text
