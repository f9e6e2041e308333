"""Preemption: SIGTERM / SIGINT stop the train loop after the current step (PreemptionGuard); outside the
loop either stops the run at once (stop_outside_the_loop), exit status 0 both ways; and the helpers that make every process of a
multi-host run take the same decision at the same step."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- signals
class PreemptionGuard:
    """SIGTERM / SIGINT ask the loop to stop: it finishes the step, saves, waits for the save, exits 0.
    A second signal exits at once (128 + signal number). Handlers are restored on leaving the block.

        with PreemptionGuard() as guard:
            for step in ...:
                state = train_step(...)
                if guard.should_stop(step):
                    checkpointer.save(step, ..., force=True); checkpointer.wait(); break
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested = False        # a signal arrived in this process
        self.signal_name: str | None = None
        self.stopped_at: int | None = None  # the step should_stop() first said True (the same on all processes)
        self._previous: dict = {}
        self._agree = AnyProcess()

    def __enter__(self) -> PreemptionGuard:
        if _lost_signals:  # a signal before the loop whose Preempted a cleanup callback swallowed: stop here
            self.requested, self.signal_name = True, _lost_signals[-1]
            log.warning("%s arrived before the train loop: stopping at its first step", self.signal_name)
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        else:  # Python delivers signals to the main thread only
            log.warning("PreemptionGuard outside the main thread: SIGTERM/SIGINT are not caught")
        return self

    def __exit__(self, *exc) -> bool:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            os.write(2, f"\n{name} again: exiting now without saving\n".encode())
            os._exit(128 + signum)
        self.requested, self.signal_name = True, name
        # os.write, not print/logging: a signal handler may interrupt a write in progress
        os.write(2, f"\n{name} received: finishing this step, saving a checkpoint, then exiting "
                    f"(send it again to exit at once)\n".encode())

    @property
    def stopped(self) -> bool:
        """should_stop() said True: use this, not `requested`, to decide what to do next on every process."""
        return self.stopped_at is not None

    def should_stop(self, step: int) -> bool:
        """True on every process at the same step once any process got a signal (call it every step;
        with several processes the answer comes one step late, so nobody waits on the devices for it)."""
        stop = self._agree(self.requested)
        if stop and self.stopped_at is None:
            self.stopped_at = int(step)
            log.warning("stopping at step %d (%s)", step, self.signal_name or "a signal on another process")
        return stop


class Preempted(BaseException):
    """SIGTERM or SIGINT arrived outside the train loop. A BaseException, as KeyboardInterrupt is, so that no
    `except Exception` on the way (a data source, a restore) mistakes it for a failure of its own."""


@contextlib.contextmanager
def stop_outside_the_loop(signals=(signal.SIGTERM, signal.SIGINT)):
    """Before the train loop (tokenizer training, data preparation, building the model, restoring) and after
    it (final evaluation, export), SIGTERM and SIGINT (ctrl-C) alike raise Preempted where the program is: nothing these phases leave is used
    half-done (the tokenized cache is published atomically, checkpoints are complete or ignored, the export
    is written again), so the same command goes on. Inside the loop PreemptionGuard takes the signal over
    and hands it back on leaving."""
    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        _lost_signals.append(name)  # cleared when Preempted reaches the block's end
        if _in_a_callback_that_drops_exceptions(frame):  # Python would print the exception and go on
            threading.Timer(0.05, _deliver_again, (signum, on_signal)).start()
            return
        raise Preempted(name)

    _lost_signals.clear()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, on_signal) for signum in signals}
    try:
        yield
    except Preempted:
        _lost_signals.clear()
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _in_a_callback_that_drops_exceptions(frame) -> bool:
    """Whether `frame` runs inside a garbage-collection callback (JAX has one) or a __del__."""
    import gc

    callbacks = {getattr(callback, "__code__", None) for callback in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _deliver_again(signum, handler) -> None:
    """The signal once more, unless the train loop's guard has taken it over (it reads _lost_signals)."""
    if signal.getsignal(signum) is handler:
        os.kill(os.getpid(), signum)


# Signals stop_outside_the_loop raised Preempted for that did not (yet) end the block: an exception raised in a
# garbage-collection callback or a __del__ is printed and dropped by Python, so the train loop checks here too.
_lost_signals: list[str] = []


# ----------------------------------------------------------------------------- several processes
class AnyProcess:
    """`agree(flag)`: True on every process when any process's flag is True. One process: the flag. Several:
    a tiny all-reduce dispatched now and read at the next call, so it never stalls the step pipeline;
    all processes must call it at the same steps."""

    def __init__(self):
        self._pending = None
        self._reduce = None

    def __call__(self, flag: bool) -> bool:
        if jax.process_count() == 1:
            return bool(flag)
        agreed = self._pending is not None and bool(np.asarray(self._pending.addressable_data(0)))
        if self._reduce is None:
            mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("processes",))
            self._sharding = NamedSharding(mesh, P("processes"))
            self._reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
        local = np.full((jax.local_device_count(),), bool(flag), np.int32)
        self._pending = self._reduce(jax.make_array_from_process_local_data(self._sharding, local))
        return agreed

    def reset(self) -> None:
        self._pending = None
