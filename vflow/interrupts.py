"""Stop requests deferred to a step boundary: SIGINT (Ctrl-C), SIGTERM (what cluster
schedulers, ``docker stop`` and torchrun send) and SIGUSR1 ("write a checkpoint now and go
on").

While the training loop runs (``StopRequests.deferring``) a signal only sets a flag; the
loop looks at the flags between iterations, where the step counter, data position, weights,
optimiser, EMA and RNG states are consistent, writes its checkpoint there and raises
:class:`TrainingInterrupted` (exit code ``128 + signal``: 130 for SIGINT, 143 for SIGTERM).
A second Ctrl-C raises KeyboardInterrupt at once, without a checkpoint. Outside the loop
(setting up, the final evaluation) a stop signal raises TrainingInterrupted at once (there is
no state to save there) and SIGUSR1 is ignored, with a note. Under DDP the ranks agree (one
``all_reduce``, MAX) at the boundaries the loop chooses, so that all of them stop after the
same iteration. Handlers can only be installed from the main thread; elsewhere the
signals keep their previous behaviour.
"""

from __future__ import annotations

import signal
import sys
import threading

import torch
import torch.distributed as dist

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_CHECKPOINT_SIGNAL = getattr(signal, "SIGUSR1", None)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by a signal after writing a checkpoint at a step boundary."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: str | None = None):
        self.signum, self.step, self.checkpoint = int(signum), step, checkpoint
        name = signal.Signals(self.signum).name
        if checkpoint is None:
            message = f"stopped by {name}"
        else:
            message = f"stopped by {name} after step {step}; checkpoint {checkpoint}"
        super().__init__(message)

    @property
    def exit_code(self) -> int:
        """The conventional exit status of a process ended by the signal: 128 + number."""
        return 128 + self.signum


class StopRequests:
    """A context manager that turns SIGINT / SIGTERM into a stop request and SIGUSR1 into a
    checkpoint request, restoring the previous handlers on exit."""

    def __init__(self):
        self.stop: int | None = None  # the first stop signal received
        self.checkpoint = False  # SIGUSR1 received since the last checkpoint
        self.deferring = False  # True while the training loop runs
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            wanted = (*_STOP_SIGNALS, _CHECKPOINT_SIGNAL)
            for signum in (s for s in wanted if s is not None):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if signum == _CHECKPOINT_SIGNAL:
            if self.deferring:
                self.checkpoint = True
            else:
                _say("SIGUSR1 ignored: no training iteration is running")
        elif not self.deferring:
            raise TrainingInterrupted(signum)
        elif self.stop is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        elif self.stop is None:
            self.stop = signum
            again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
            _say(f"{signal.Signals(signum).name}: stopping after this iteration{again}")

    def agree(self, world_size: int, device: torch.device) -> tuple[int | None, bool]:
        """``(stop signal or None, checkpoint requested)`` agreed by all ranks: the maximum
        over ranks (a collective: every rank must call it at the same iteration)."""
        if world_size <= 1:
            return self.stop, self.checkpoint
        flags = torch.tensor([self.stop or 0, int(self.checkpoint)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, checkpoint = flags.tolist()
        return (stop or None), bool(checkpoint)


def _say(message: str) -> None:
    """A line on stderr from a signal handler (it runs in the main thread)."""
    sys.stderr.write(f"\n{message}\n")
    sys.stderr.flush()
