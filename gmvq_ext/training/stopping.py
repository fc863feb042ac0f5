"""Stopping a run cleanly: SIGTERM and SIGUSR1 are requests to stop.

Schedulers (SLURM, Kubernetes, spot instances) send SIGTERM (SLURM can be
asked for SIGUSR1) and kill the process 30 to 120 s later. The handler only
records the request; the training loop looks at it at its stopping points
(every ``--log-every`` steps and at the end of an epoch), where every rank
agrees on it through one collective, so all ranks stop after the same step.
Rank 0 then writes a checkpoint at that step and the process exits with
EXIT_PREEMPTED.

Exit statuses of gmvq-train:
  0   EXIT_DONE        the run finished (or stopped at --stop-after-epoch)
  1                    an error, with a one-line message (bad input, a lost peer,
                       a non-finite loss, a checkpoint that could not be written)
  75  EXIT_PREEMPTED   stopped on SIGTERM or SIGUSR1 after writing a checkpoint;
                       --resume or --auto-resume continues it exactly
                       (75 is sysexits' EX_TEMPFAIL: try again later)
"""

from __future__ import annotations

import signal
import threading

import torch

EXIT_DONE = 0
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    """Records SIGTERM and SIGUSR1 while installed (a context manager); the
    previous handlers come back on exit. Outside the main thread (where Python
    cannot install handlers) nothing is installed and no request is seen."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _record(self, number, frame) -> None:
        self.signal_name = signal.Signals(number).name

    def agreed(self, ctx) -> bool:
        """Whether any rank was asked to stop: a collective on every rank, so
        call it at the same step on all of them."""
        asked = self.signal_name is not None
        if not ctx.distributed:
            return asked
        from .process_group import all_reduce_sum

        flag = torch.tensor([1.0 if asked else 0.0], device=ctx.device)
        return bool(all_reduce_sum(flag, ctx).item() > 0)
