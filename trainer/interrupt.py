"""Ctrl-C or SIGTERM during training: the step under way ends, a checkpoint of it is saved, and the run stops.

A KeyboardInterrupt raised in the middle of a step (in backward, in the optimizer) leaves nothing consistent to
save, so the run lost every step since its last periodic checkpoint (a walk-through's Ctrl-C at step 388 resumed
from 300). While `StopOnInterrupt` is installed, the first SIGINT only asks the loop to stop at the end of the
step; a second one raises KeyboardInterrupt at once, as before. SIGTERM asks the same: it is how a scheduler
stops a job before it kills it (Slurm's preemption and time limit, Kubernetes' eviction, a spot machine taken
back, `accelerate launch` passing on a Ctrl-C), and it killed the run at once, losing the steps since the last
checkpoint. A SIGTERM after a stop was asked changes nothing: whoever sent it kills the process when its grace
ends. Every process of a launch asks the others (`requested_anywhere`), so all that were asked stop after the
same step and save the checkpoint together; the command then exits 128 + the signal, as the signal would have.
A stop asked for during validation (main process only) ends it after the denoising step under way
(`Validator.run`'s `stop_asked`); the others learn of it after the next step, which is the checkpoint.
Under `accelerate launch` with one process the launcher sends SIGTERM on Ctrl-C and SIGKILL 5 s later; with
several (torchrun) it passes the Ctrl-C on and kills them 30 s later: a long step and its checkpoint may not fit.
torchrun also sends SIGTERM to the other processes when one fails: they then wait in the step's next collective
operation for the one that is gone until torchrun kills them (30 s), so the failure is reported that much later.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

NOTICES = {
    signal.SIGINT: "Ctrl-C: the step under way ends and a checkpoint of it is saved (Ctrl-C again to stop at once, "
                   "losing the steps since the last checkpoint)",
    signal.SIGTERM: "SIGTERM: the step under way ends and a checkpoint of it is saved, then the run stops",
}


class StopRequested(KeyboardInterrupt):
    """Raised by the training loop once the checkpoint of a stop asked for is saved, and by SIGTERM within a
    `SigtermStops` block; `signum` is the signal that asked (SIGTERM over SIGINT where processes of a launch got
    different ones)."""

    def __init__(self, signum: int):
        super().__init__()
        self.signum = signum


def stop_signal(stop: KeyboardInterrupt) -> int:
    """The signal that stopped a command: a `StopRequested`'s, else SIGINT (a plain Ctrl-C). The command exits
    128 + it, as a process that signal ended would."""
    return getattr(stop, "signum", signal.SIGINT)


def stopped_by(signum: int) -> str:
    """How a stop is said: "interrupted" for a Ctrl-C, "stopped by SIGTERM" for a scheduler's."""
    return "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted"


def sigterm_is_ours() -> bool:
    """Whether this process may take SIGTERM over: in the main thread (signal handlers belong to it), and at its
    default, where it would end the process; a host's own handler (a Ray worker's: it ends the worker, and Ray
    runs the sweep cell again) stays."""
    return threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


class SigtermStops:
    """For a block of a command that starts or waits for others (the sweep's pool of processes, a Ray driver),
    SIGTERM raises `StopRequested(SIGTERM)` as Ctrl-C raises KeyboardInterrupt, so the block's own stop runs (each
    run checkpoints its step) instead of the process ending at once. Taken in the main thread only, and only over
    the handler in place when `replaces(it)` (by default where SIGTERM would end the process, `sigterm_is_ours`);
    put back when the block ends.

    `came`: a SIGTERM came. Ray's waits turn what a handler raises into a plain KeyboardInterrupt, so a block that
    waits in Ray asks `stop_of(that interrupt)`. `ignore_more()`, while the block's stop is carried out: a second
    SIGTERM is ignored, as training ignores it (its sender kills the process when its grace ends)."""

    def __init__(self, replaces: Callable[[object], bool] | None = None):
        self.came = False
        self._replaces = replaces
        self._previous = None

    def _takes_over(self) -> bool:
        if self._replaces is None:
            return sigterm_is_ours()
        return threading.current_thread() is threading.main_thread() and self._replaces(signal.getsignal(signal.SIGTERM))

    def __enter__(self) -> "SigtermStops":
        if self._takes_over():
            previous = signal.signal(signal.SIGTERM, self._stop)
            self._previous = signal.SIG_DFL if previous is None else previous  # None: a handler set outside Python
        return self

    def _stop(self, signum, frame) -> None:
        self.came = True
        raise StopRequested(signum)

    def ignore_more(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def stop_of(self, interrupt: KeyboardInterrupt) -> KeyboardInterrupt:
        """What ends the block for `interrupt`: `StopRequested(SIGTERM)` once a SIGTERM came (so the command exits
        143 and says "stopped by SIGTERM"), else `interrupt` itself."""
        return StopRequested(signal.SIGTERM) if self.came and not isinstance(interrupt, StopRequested) else interrupt

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class StopOnInterrupt:
    def __init__(self):
        self.signal: int | None = None  # the first signal that asked this process to stop
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> "StopOnInterrupt":
        # Signal handlers belong to the main thread; elsewhere (a thread of a test) the signals stay as they were.
        # An ignored SIGINT stays ignored: a shell starts a background job so (`cmd &`), and a Ctrl-C meant for the
        # foreground stopped the job's training, though not its encoding (a walk-through's find).
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_signal)
        if sigterm_is_ours():
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if self.signal is not None:
            if signum == signal.SIGINT:  # Ctrl-C again: stop now
                raise KeyboardInterrupt
            return  # SIGTERM after a stop was asked: its sender kills this process when its grace ends
        self.signal = signum
        from tqdm.auto import tqdm

        tqdm.write(NOTICES[signum])

    def requested_anywhere(self, accelerator) -> int:
        """The signal that asked any process to stop (the largest where several did), or 0 (one all-gather when
        there are several processes)."""
        if accelerator.num_processes == 1:
            return self.signal or 0
        import torch  # here: a sweep's pool, which imports no torch, raises `StopRequested` too

        flag = torch.tensor([float(self.signal or 0)], device=accelerator.device)
        return int(accelerator.gather(flag).max().item())
