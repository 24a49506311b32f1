"""ignite handlers with ``attach(engine)`` that are not about tracking (:mod:`medmoco.tracking.handler`)."""
from .signals import JobSignalled, StopOnSignal
from .submission import SubmissionWriter

__all__ = ["StopOnSignal", "JobSignalled", "SubmissionWriter"]
