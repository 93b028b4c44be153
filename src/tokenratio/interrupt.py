"""Ctrl-C and SIGTERM during training: stop at the next step boundary with a checkpoint.

A cluster preempts a job with SIGTERM and kills it a grace period later; a user presses Ctrl-C.
Either way the work since the last checkpoint should not be lost, so the first signal only asks
the loop to stop: it finishes the optimizer step it is in, writes a checkpoint and ends with one
line saying where it is and how to resume. A second Ctrl-C exits at once (exit code 130).
"""

import signal
import sys
import threading

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as shells report it


class StopRequest:
    """While active (a `with` block in the main thread), SIGINT and SIGTERM set `signal_name`
    instead of ending the process; the previous handlers come back on exit."""

    def __init__(self, say=None):
        self.signal_name: str | None = None
        self._say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame) -> None:
        name = signal.Signals(number).name
        if self.signal_name is not None and name == "SIGINT":  # the second Ctrl-C
            self._say("interrupted again: exiting now, without a checkpoint")
            raise SystemExit(EXIT_CODES["SIGINT"])
        if self.signal_name is None:
            self.signal_name = name
            again = " (Ctrl-C again to quit now)" if name == "SIGINT" else ""
            self._say(f"{name}: stopping after this step with a checkpoint{again}")

    def requested(self, accelerator=None) -> bool:
        """Has any process been asked to stop? Every process of a group answers the same (one
        all-reduce per step, only where there are several processes)."""
        asked = self.signal_name is not None
        if accelerator is None or accelerator.num_processes == 1:
            return asked
        import torch

        flag = torch.tensor([float(asked)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


class SignalStopError(RuntimeError):
    """Training stopped on a signal, after writing a checkpoint; the message says how to resume."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.signal_name = signal_name
        self.exit_code = EXIT_CODES.get(signal_name, 130)
