"""Clean ends when the scheduler or the user stops a job.

SLURM's ``scancel``, a time limit and ``scontrol requeue`` send SIGTERM to every task, then
SIGKILL after ``KillWait`` (30 s by default); ``--signal=B:USR1@120`` sends SIGUSR1 to the batch
shell two minutes before the time limit (the templates in ``slurm/`` forward it to the tasks as
SIGTERM); Ctrl-C is SIGINT. Left to Python's defaults, SIGTERM ends the process at once and the
MLflow run stays RUNNING for ever.

:class:`StopOnSignal` notes the signal and ends the run after the current iteration (the step is
finished, not torn), raising :class:`JobSignalled` through the engine: the tracking handler marks
the MLflow run KILLED, the checkpoints written at each finished epoch stay (the epoch in progress is
repeated by ``--resume auto``), and the command exits with 128 + the signal number (143 for SIGTERM),
the shell's convention. Under DDP the ranks agree, with one all-reduce per iteration, on the
iteration at which they stop, so that no rank waits in a collective for one that has left. A
second signal stops at once.
"""
from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class JobSignalled(Exception):
    """The job was asked to stop by a signal (exit code 128 + ``signum``)."""

    def __init__(self, signum: int, iteration: int = 0):
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after iteration {iteration}: the MLflow run is marked KILLED; finished "
                         "epochs are in the checkpoints, continue with --resume auto")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal:
    """End an engine's run at the next iteration boundary after SIGTERM, SIGINT or SIGUSR1.

    Args:
        signals: the signals to handle (installed only in the main thread).

    Attach it first, so that it runs before the iteration's other handlers log or save.
    """

    def __init__(self, signals=SIGNALS):
        self.signals = tuple(signals)
        self.received = 0
        self._previous: dict = {}

    def _note(self, signum, frame) -> None:
        if self.received:  # a second signal: stop now
            raise JobSignalled(signum)
        self.received = signum

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if threading.current_thread() is threading.main_thread():
            for number in self.signals:
                self._previous[number] = signal.signal(number, self._note)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        # (no EXCEPTION_RAISED handler: ignite stops at the first one that raises, and the
        # tracking handler's must run to mark the MLflow run KILLED)
        engine.add_event_handler(Events.COMPLETED, self.restore)

    def __call__(self, engine) -> None:
        import ignite.distributed as idist

        received = self.received
        if idist.get_world_size() > 1:
            import torch

            flag = torch.tensor([received], dtype=torch.int64, device=idist.device())
            received = int(idist.all_reduce(flag, op="MAX").item())
        if received:
            self.restore()
            raise JobSignalled(received, engine.state.iteration)

    def restore(self, engine=None) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
