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


def test_a_bar_that_is_not_left_on_screen_still_logs_its_end(monkeypatch):
    """Guards a `leave=False` bar (the training run's validation videos, through diffusers' pipeline) whose log
    stopped at its first line, `0/2`, as if validation had stalled (a walk-through's find): tqdm clears such a bar
    with blanks instead of ending it with a line break, so its final state was never written. It now is, once."""
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    log = io.StringIO()
    for _ in progress_bar(range(2), desc="validation at step 4, video 1/1", unit="step", leave=False, file=log):
        pass
    lines = log.getvalue().splitlines(keepends=True)
    assert "\r" not in log.getvalue() and all(line.endswith("\n") for line in lines)
    assert [line.split("|")[0] for line in lines] == ["validation at step 4, video 1/1:   0%", "validation at step 4, video 1/1: 100%"]
    assert "2/2" in lines[-1]


def test_quick_bars_in_one_log_share_its_interval(monkeypatch):
    """Guards a log filled with short bars' first lines: each bar wrote its 0% state at once, so a run validating
    every few steps logged two lines per validation video (787 of a smoke run's 801 lines, a walk-through's find).
    The interval is the log's: a bar opened within it writes only its final state. And guards the training bar
    going missing from such a log (the review's find on the first version, where each validation's final line
    started the interval again): a bar's final line starts no interval, so training still writes a line every
    interval. The log's clock is a fake one: 2 s a step, a validation every 10 steps, 30 s the interval."""
    from trainer import progress

    class Clock:
        now = 1000.0

        @classmethod
        def monotonic(cls) -> float:
            return cls.now

    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(progress, "time", Clock)
    log = io.StringIO()
    with progress_bar(total=30, desc="train", unit="step", file=log) as train:
        for step in range(1, 31):
            Clock.now += 2
            train.update(1)
            train.set_postfix(step=step)  # training's loss and lr, redrawn every step
            if step % 10 == 0:
                for _ in progress_bar(range(2), desc=f"validation at step {step}, video 1/1", unit="step", leave=False,
                                      file=log):
                    pass
    lines = [line.split("|")[0] for line in log.getvalue().splitlines()]
    assert lines == ["train:   0%", "validation at step 10, video 1/1: 100%", "train:  50%",
                     "validation at step 20, video 1/1: 100%", "train: 100%", "validation at step 30, video 1/1: 100%",
                     "train: 100%"], log.getvalue()


def test_tqdm_disable_reaches_bars_given_an_explicit_disable(monkeypatch):
    """Guards TQDM_DISABLE=1 (tqdm's own switch) being ignored by every bar that passes `disable=` itself, which is
    every slapgen bar with a --quiet-like option: tqdm lets an explicit argument win over its variable."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    log = io.StringIO()
    with progress_bar(total=3, desc="curate", disable=False, file=log) as bar:
        bar.update(3)
    assert log.getvalue() == ""


def test_a_bar_under_another_in_a_log_file_is_plain_lines_too(monkeypatch):
    """Guards a bar opened while another is open (eval's bars under an in-process sweep's, validation's under
    training's) in a log file: tqdm put it at position 1 and moved the cursor with escape codes, which a file
    keeps as `^[[A` lines in place of the bar's progress."""
    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    log = io.StringIO()
    with progress_bar(total=2, desc="sweep", file=log) as outer:
        with progress_bar(total=3, desc="generate", file=log) as inner:
            inner.update(3)
        outer.update(2)
    text = log.getvalue()
    assert "\x1b" not in text and "\r" not in text
    lines = text.splitlines()
    assert any(line.startswith("generate: 100%") for line in lines) and lines[-1].startswith("sweep: 100%")
    assert len(lines) == len(set(lines)), "a state written twice"


def test_a_training_run_with_stderr_in_a_file_writes_readable_lines(tiny_cache_dir, demo_dataset, tmp_path):
    """The same through a real command: `slapgen train` with a validation video, stderr redirected to a file,
    leaves no carriage return and no cursor move in it (the validation bar is diffusers' own tqdm, configured
    through `progress_options`), and the training bar's and the validation bar's last states are lines of their
    own."""
    log = tmp_path / "train.log"
    env = offline_env(tmp_path)
    env.pop("TQDM_DISABLE", None)
    command = [sys.executable, "-m", "trainer", "train", "--config", "tiny-smoke", "--data", str(demo_dataset),
               "--out", str(tmp_path / "run"), "--set", f"model_cache_dir={tiny_cache_dir}",
               "--set", "train.max_train_steps=2", "--set", "optim.lr_warmup_steps=0", "--set", "validation.every_steps=2",
               "--set", "validation.prompts=['a slap']", "--set", "validation.num_inference_steps=2",
               "--set", "logging.tensorboard=false"]
    with log.open("w") as stderr:
        result = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, timeout=600, cwd=os.getcwd())
    text = log.read_bytes().decode()  # read_text() would turn each "\r" into "\n"
    assert result.returncode == 0, text[-2000:]
    assert "\r" not in text and "\x1b" not in text, text[-2000:]
    assert re.search(r"^train: 100%.* 2/2 \[", text, flags=re.M), text
    # The validation bar (leave=False) ends with its final state too, not at 0% as if it had stalled.
    assert re.search(r"^validation at step 2, video 1/1: 100%.* 2/2 \[", text, flags=re.M), text
