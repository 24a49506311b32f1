"""An ignite handler that tracks a training engine in its MLflow run (MONAI's handler protocol).

MONAI's own ``MLFlowHandler`` is not used: it has no rank check, reuses any unfinished run of the
same name (MONAI#6415), knows nothing of a store that goes away, and would still need the run's
epoch figures put where it reads them. This handler writes through the job's tracker (rank 0's
:class:`~.tracker.MlflowTracker`, a no-op elsewhere), so it shares its spool and resume.
"""
from __future__ import annotations

from typing import Callable

from ignite.engine import Engine, Events


class TrackingHandler:
    """Logs iteration and epoch figures of an engine, and closes the run when the engine ends.

    Args:
        tracker: the job's tracker (:func:`~.tracker.create_tracker`).
        log_every: log ``iteration_metrics`` every this many iterations (0: never).
        iteration_metrics: engine -> ``{name: value}`` at an iteration (default: loss, and the
            lr of ``optimizer``).
        optimizer: whose lr is logged with each iteration.

    Epoch figures are read from ``engine.state.epoch_metrics`` (a dict that handlers attached
    earlier fill: statistics, evaluation, monitors) and logged at step = epoch. On ``COMPLETED``
    the run is marked FINISHED; on an exception KILLED, and the exception goes on (ignite
    swallows an exception that an ``EXCEPTION_RAISED`` handler does not re-raise). Attach it
    after the handlers whose results it logs or whose artifacts must reach the run.
    """

    def __init__(self, tracker, log_every: int = 10, iteration_metrics: Callable[[Engine], dict] | None = None,
                 optimizer=None):
        self.tracker = tracker
        self.log_every = log_every
        self.optimizer = optimizer
        self.iteration_metrics = iteration_metrics or self._loss_and_lr
        self.history: list[dict] = []

    def _loss_and_lr(self, engine: Engine) -> dict:
        out = {"loss": engine.state.output["loss"]}
        if self.optimizer is not None:
            out["lr"] = self.optimizer.param_groups[0]["lr"]
        return out

    def attach(self, engine: Engine) -> None:
        if self.log_every:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.log_every), self.log_iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.failed)

    def log_iteration(self, engine: Engine) -> None:
        self.tracker.log_metrics(self.iteration_metrics(engine), engine.state.iteration)

    def __call__(self, engine: Engine) -> None:
        metrics = dict(getattr(engine.state, "epoch_metrics", {}))
        self.tracker.log_metrics(metrics, engine.state.epoch)
        self.history.append({"epoch": engine.state.epoch, **metrics})

    def completed(self, engine: Engine) -> None:
        self.tracker.finish("FINISHED")

    def failed(self, engine: Engine, error: BaseException) -> None:
        self.tracker.finish("KILLED")
        raise error
