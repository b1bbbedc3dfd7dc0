"""Ctrl-C during training: the step under way ends, a checkpoint of it is saved, and the run stops.

A KeyboardInterrupt raised in the middle of a step (in backward, in the optimizer) leaves nothing consistent to
save, so the run lost every step since its last periodic checkpoint (a walk-through's Ctrl-C at step 388 resumed
from 300). While `StopOnInterrupt` is installed, the first SIGINT only asks the loop to stop at the end of the
step; a second one raises KeyboardInterrupt at once, as before. Every process of a launch asks the others
(`requested_anywhere`), so all that were asked stop after the same step and save the checkpoint together. Under
`accelerate launch` its launcher has the last word: launching one process, it terminates it on Ctrl-C at once (the
run resumes from its last periodic checkpoint); launching several (torchrun), it passes the Ctrl-C on and kills them
30 s later, which a long step and its checkpoint may not fit in.
"""

from __future__ import annotations

import signal
import threading

import torch


class StopOnInterrupt:
    def __init__(self, notice: str):
        self.notice = notice  # said once, on the first Ctrl-C
        self.requested = False
        self._previous = None

    def __enter__(self) -> "StopOnInterrupt":
        # Signal handlers belong to the main thread; elsewhere (a thread of a test) Ctrl-C stays as it was. An
        # ignored SIGINT stays ignored: a shell starts a background job so (`cmd &`), and a Ctrl-C meant for the
        # foreground stopped the job's training, though not its encoding (a walk-through's find).
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _on_interrupt(self, signum, frame) -> None:
        if self.requested:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        from tqdm.auto import tqdm

        tqdm.write(self.notice)

    def requested_anywhere(self, accelerator) -> bool:
        """Whether any process was asked to stop (one all-gather of a flag when there are several)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.gather(flag).max().item() > 0)
