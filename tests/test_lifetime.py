"""`slapgen.lifetime.on_stop_signal`: what a replica does when a stop signal starts its graceful stop."""

from __future__ import annotations

import os
import signal
import threading

from slapgen.lifetime import STOP_SIGNALS, on_stop_signal


def test_a_stop_signal_runs_the_callback_once_and_still_reaches_the_handler_before():
    """Guards the job board's stop hook swallowing the signal (a replica that never stops: uvicorn's handler is
    the one that starts the graceful stop) or running the callback in the signal handler itself (it would take the
    board's lock, which the interrupted main thread may hold) or more than once (a second Ctrl-C). The callback
    runs once, in a thread of its own, and the handler installed before gets every signal."""
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    reached, ran_in = [], []
    called = threading.Event()

    def uvicorns(signum, frame):
        reached.append(signum)

    def callback():
        ran_in.append(threading.current_thread().name)
        called.set()

    started = []  # every thread the hook starts, whatever it runs
    start = threading.Thread.start

    def counted_start(thread):
        started.append(thread.name)
        start(thread)

    try:
        for signum in STOP_SIGNALS:
            signal.signal(signum, uvicorns)
        assert on_stop_signal(callback)
        threading.Thread.start = counted_start
        os.kill(os.getpid(), signal.SIGTERM)
        assert called.wait(10)
        os.kill(os.getpid(), signal.SIGINT)
        assert reached == [signal.SIGTERM, signal.SIGINT]
        assert started == ["slapgen-stop-signal"] and ran_in == ["slapgen-stop-signal"]
    finally:
        threading.Thread.start = start
        for signum, handler in before.items():
            signal.signal(signum, handler)
