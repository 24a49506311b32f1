"""A moved embedded store: detect it, and move its recorded file locations with it.

MLflow records every artifact location of a SQLite store as an absolute URI
(``experiments.artifact_location``, ``runs.artifact_uri``, ``logged_models.artifact_location``,
``model_versions.storage_location`` and ``source``): a copied or moved ``demo-run/`` keeps
pointing at the original folder, so a run resumed from the copy writes its files into the
original and a model loaded from the copy reads the original's bytes. MLflow has no API to change
an experiment's or a run's artifact location, so :func:`relocate` rewrites those columns in the
database itself (plain ``sqlite3``, one transaction), and only the prefix medmoco gave them:
``file://<folder of the database>/mlartifacts`` (:func:`medmoco.tracking.store.artifact_root`).
:func:`check_not_moved` refuses to use a moved store until then, naming the command.
"""
from __future__ import annotations

import os
import sqlite3
from urllib.parse import unquote

from dicom_preprocess.config import ConfigError

MARKER = "/mlartifacts/"
# (table, column) holding artifact URIs in MLflow 3's SQL schema
COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"),
           ("model_versions", "storage_location"), ("model_versions", "source"))


class MovedStore(ConfigError):
    """The store's files are recorded under another folder than the database's own."""


def _db_path(uri: str) -> str | None:
    if not uri.startswith("sqlite:///"):
        return None
    return os.path.abspath(uri[len("sqlite:///"):])


def recorded_roots(db_path: str) -> set[str]:
    """The folders that the store's experiments record as ``<folder>/mlartifacts/...``."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as con:
        try:
            rows = con.execute("SELECT artifact_location FROM experiments").fetchall()
        except sqlite3.Error:  # a fresh database without MLflow's tables yet
            return set()
    roots = set()
    for (location,) in rows:
        if location and location.startswith("file://") and MARKER in location:
            roots.add(unquote(location[len("file://"):].split(MARKER)[0]))
    return roots


def check_not_moved(uri: str) -> None:
    """Refuse a SQLite store whose recorded files live under another folder.

    Raises:
        MovedStore: naming the original folder and the command that moves the records.
    """
    db = _db_path(uri)
    if db is None or not os.path.exists(db):
        return
    here = os.path.dirname(db)
    others = sorted(r for r in recorded_roots(db) if os.path.realpath(r) != os.path.realpath(here))
    if others:
        raise MovedStore(f"MLflow store {db} records its files under {others[0]}/mlartifacts, not beside it: it "
                         f"was copied or moved, and writing to it would change the original's files. Run "
                         f"`medmoco tracking-relocate --store {db}` first (it points the records at "
                         f"{here}/mlartifacts)")


def relocate(db_path: str) -> dict:
    """Point every recorded ``file://<old>/mlartifacts/...`` of the store at the database's folder.

    Returns:
        ``{"from": [old folders], "to": folder, "rows": number of values changed}``.
    """
    db_path = os.path.abspath(db_path)
    if not os.path.isfile(db_path):
        raise FileNotFoundError(f"MLflow store {db_path}: no such file")
    here = os.path.dirname(db_path)
    old = sorted(r for r in recorded_roots(db_path) if os.path.realpath(r) != os.path.realpath(here))
    changed = 0
    with sqlite3.connect(db_path) as con:  # one transaction: all or nothing
        for root in old:
            for table, column in COLUMNS:
                try:
                    cur = con.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                        (f"file://{here}{MARKER}", len(f"file://{root}{MARKER}") + 1,
                         len(f"file://{root}{MARKER}"), f"file://{root}{MARKER}"))
                except sqlite3.OperationalError:  # a table this MLflow version does not have
                    continue
                changed += cur.rowcount
    return {"from": old, "to": here, "rows": changed}
