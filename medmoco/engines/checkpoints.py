"""What a run directory's checkpoints were made of, so that ``--resume`` continues only the same job.

A run directory records, when its run starts, the stage, the cache fingerprint and the settings that
shape the checkpoint (``run_identity.json``). ``--resume auto`` (or a path) from a directory whose
record differs is refused in one line that names both and how to start fresh: resuming a
checkpoint of another cache would train on new data under the old run's name, and one of another
network or queue size ends in a ``size mismatch`` traceback deep in ``load_state_dict``.
"""
from __future__ import annotations

import json
import os

from dicom_preprocess.config import ConfigError

IDENTITY_FILE = "run_identity.json"
# Settings a resumed run may change: how long, how it is watched and where it reports, and the
# resources (a requeued job may land on other nodes). Everything else shapes the checkpoint or the run.
MAY_CHANGE = ("epochs", "workers", "progress", "log_every", "keep_checkpoints", "dist_timeout_s", "run_dir",
              "cache", "tracking.", "knn_every", "knn_samples", "eval_batch_size", "device", "backend")


def run_identity(stage: str, cache_fingerprint: str, flat_config: dict) -> dict:
    shaping = {k: v for k, v in sorted(flat_config.items())
               if not any(k == m or (m.endswith(".") and k.startswith(m)) for m in MAY_CHANGE)}
    return {"stage": stage, "cache_fingerprint": cache_fingerprint, "settings": shaping}


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    if old.get("stage") != new.get("stage"):
        out.append(f"stage {old.get('stage')} vs {new.get('stage')}")
    if old.get("cache_fingerprint") != new.get("cache_fingerprint"):
        out.append(f"cache {str(old.get('cache_fingerprint'))[:12]} vs {str(new.get('cache_fingerprint'))[:12]}")
    a, b = old.get("settings", {}), new.get("settings", {})
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"{key} {a.get(key)!r} vs {b.get(key)!r}")
    return out


def check_resume(run_dir: str, identity: dict, resuming: bool) -> None:
    """Refuse to resume from ``run_dir`` when its checkpoints were made by another job; record
    ``identity`` for a run that starts fresh.

    Raises:
        ConfigError: naming the run directory, what differs (its run vs this job) and how to start fresh.
    """
    import ignite.distributed as idist

    path = os.path.join(run_dir, IDENTITY_FILE)
    if resuming and os.path.isfile(path):
        with open(path) as handle:
            old = json.load(handle)
        differences = _differences(old, identity)
        if differences:
            raise ConfigError(f"--resume: {run_dir} holds the checkpoints of another job ({'; '.join(differences[:4])}"
                              f"{'; ...' if len(differences) > 4 else ''}: that run vs this one); start fresh with "
                              "another --run-dir, or without --resume")
        return
    if idist.get_rank() == 0:
        os.makedirs(run_dir, exist_ok=True)
        from dicom_preprocess.files import atomic_file

        with atomic_file(path, "w") as handle:
            json.dump(identity, handle, indent=1, sort_keys=True)
