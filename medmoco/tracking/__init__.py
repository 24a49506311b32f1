"""MLflow tracking in one package, imported lazily so the library works without MLflow.

* :mod:`.store`: where MLflow lives (URI resolution and scope) and ``runs:/`` / ``models:/`` files;
* :mod:`.tracker`: one run per job on rank 0 that survives a store going away;
* :mod:`.spool`: the calls kept while it is away, and their replay;
* :mod:`.handler`: an ignite handler that tracks an engine with ``attach(engine)``.
"""
from .spool import Spool, replay_spool
from .store import (DEFAULT_URI, client, fetch_artifact, is_unreachable, resolve_tracking_uri,
                    tracking_uri_scope)
from .tracker import RUN_ID_FILE, MlflowTracker, NullTracker, create_tracker, recorded_run_id


def __getattr__(name: str):
    # The engine handler imports ignite (and torch); a command that only reads the registry or
    # replays a spool need not pay for it.
    if name == "TrackingHandler":
        from .handler import TrackingHandler

        return TrackingHandler
    raise AttributeError(name)


__all__ = ["TrackingHandler", "Spool", "replay_spool", "DEFAULT_URI", "client", "fetch_artifact", "is_unreachable",
           "resolve_tracking_uri", "tracking_uri_scope", "RUN_ID_FILE", "MlflowTracker", "NullTracker",
           "create_tracker", "recorded_run_id"]
