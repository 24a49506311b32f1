"""A DICOMweb server (a PACS, Orthanc) as a job's input, and STOW-RS to send files back.

Input: ``dicomweb+http://HOST:PORT/ROOT[?KEY=VALUE&...]`` (or ``dicomweb+https``). The query's
keys are QIDO-RS study filters (``StudyInstanceUID``, ``PatientID``, ``AccessionNumber``,
``StudyDate``, ...; none: every study on the server). :meth:`DicomWebSource.list` searches the
matching studies, then each study's instances (QIDO-RS, every page); each instance becomes a
:class:`Source` named ``<SOPInstanceUID>.dcm``, the name RSNA gives its files, so a folder of the
same files lists the same names in the same order and the two give the same cache.
:meth:`~DicomWebSource.read_many` retrieves the instances (WADO-RS, in the transfer syntax the
server stored, ``transfer-syntax=*``) and hands each one's bytes, unchanged, to the reader that
files go through; nothing is written to disk.

A server that stops answering (refused connections, timeouts, 5xx; after dicomweb-client's own
retries, ``RETRY_ATTEMPTS``) makes a :class:`SourceUnavailable` in place of the instance's bytes, naming its study;
the rest of the chunk is not requested. The job keeps what it has, lists what is missing in
errors.csv, and a rerun reads it (:mod:`dicom_preprocess.job`).

RSNA's UIDs (``ID_1f6d1e8aeb``) are not DICOM UIDs; dicomweb-client refuses them unless
``permissive_uid=True``, which this module sets (it then bans only ``/`` and ``@``, which would
change the URL). Credentials come from ``MEDMOCO_DICOMWEB_USER`` / ``MEDMOCO_DICOMWEB_PASSWORD``
(HTTP basic), never from the address: the job records its input in the cache's ``job.json``.
dicomweb-client is imported when a server is first contacted, so dicom_preprocess imports
without it.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from .base import Source, SourceUnavailable

PREFIX = "dicomweb+"
# Instances requested ahead of the one being decoded, per worker: hides the round trip (~5 ms to
# a local Orthanc, tens of ms across sites) behind the decode, holding at most this many
# instances (~0.5 MB each for a 512x512 slice) in memory.
PREFETCH = 4
# (connect, read) seconds: a server that accepts no connection is down; one that accepted and
# sends nothing for a minute is too (one 512x512 slice is 0.5 MB).
TIMEOUT_S = (10.0, 60.0)
# Orthanc gzips answers by default when asked to (requests always asks): 40 ms of its CPU for a
# 0.5 MB slice, against 4 ms for the same request uncompressed (measured, Orthanc 1.10 on loopback);
# CT pixels barely compress anyway.
HEADERS = {"Accept-Encoding": "identity"}
ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)  # the bytes as stored: no transcoding
# dicomweb-client retries a request that raised (refused connection, reset, timeout: any
# exception, the ``retrying`` default) or answered 429/408/503/504: RETRY_ATTEMPTS tries, waiting
# 2, 4, 8, ... x RETRY_WAIT_MS in between (its defaults, kept: 30 s in all), so a server that
# restarts or a network blip costs time, not instances; past that the instance is SourceUnavailable.
RETRY_ATTEMPTS = 5
RETRY_WAIT_MS = 1000
STOW_BATCH = 32  # files per STOW-RS request (SR files are small; a batch bounds one request's size)
TAGS = {"study": "0020000D", "series": "0020000E", "instance": "00080018"}


def parse_address(spec: str, what: str = "input") -> tuple[str, dict[str, str]]:
    """``dicomweb+http://h:p/root?StudyInstanceUID=1.2`` -> (``http://h:p/root``, QIDO filters);
    ``what`` names the address in errors (``input``, ``--stow``).

    Raises:
        ValueError: a malformed address, credentials in it, or a query key given twice.
    """
    url = spec[len(PREFIX):] if spec.lower().startswith(PREFIX) else spec
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} {spec}: expected dicomweb+http(s)://HOST[:PORT]/ROOT[?StudyInstanceUID=...]")
    if parts.username or parts.password:
        raise ValueError(f"{what} {_redact(parts)}: put credentials in MEDMOCO_DICOMWEB_USER and "
                         "MEDMOCO_DICOMWEB_PASSWORD, not in the address (the cache records its input)")
    pairs = parse_qsl(parts.query, keep_blank_values=False, strict_parsing=False)
    filters: dict[str, str] = {}
    for key, value in pairs:
        if key in filters:
            raise ValueError(f"{what} {spec}: {key} given twice (a list of UIDs is one value: {key}=A,B)")
        filters[key] = value
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", "")), filters


def connect(url: str):
    """A ``dicomweb_client.DICOMwebClient`` for the DICOMweb root ``url`` (settings above).

    Raises:
        ImportError: when dicomweb-client is not installed (says how to install it).
    """
    try:
        import requests
        from dicomweb_client import DICOMwebClient
    except ImportError:
        raise ImportError("DICOMweb needs the dicomweb-client package: pip install dicomweb-client") from None
    session = requests.Session()
    user = os.environ.get("MEDMOCO_DICOMWEB_USER")
    if user:
        session.auth = (user, os.environ.get("MEDMOCO_DICOMWEB_PASSWORD", ""))
    client = DICOMwebClient(url, session=session, headers=dict(HEADERS), permissive_uid=True, timeout=TIMEOUT_S)
    client.set_http_retry_params(retry=True, max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=RETRY_WAIT_MS)
    return client


class DicomWebSource:
    """The instances of the studies a DICOMweb query selects (an :class:`~.base.InputSource`).

    Args:
        spec: ``dicomweb+http(s)://HOST[:PORT]/ROOT[?QIDO study filters]``.

    Nothing is contacted until :meth:`list` or :meth:`read_many` (a worker process opens one per
    job input and reads the instances the job listed).

    Raises:
        ValueError: a malformed address (:func:`parse_address`).
        ImportError: dicomweb-client is not installed.
    """

    kind = "dicomweb"

    def __init__(self, spec: str):
        self.spec = spec
        self.url, self.filters = parse_address(spec)
        try:
            import dicomweb_client  # noqa: F401  (here, not at import: dicom_preprocess works without it)
        except ImportError:
            raise ImportError(f"input {spec}: reading DICOMweb needs the dicomweb-client package "
                              "(pip install dicomweb-client)") from None
        self.unlisted: dict[str, int] = {}
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = connect(self.url)
        return self._client

    # -- listing ---------------------------------------------------------------------------
    def list(self) -> list[Source]:
        """Every instance of every matching study, sorted by name (``<SOPInstanceUID>.dcm``).

        Raises:
            SourceUnavailable: the server cannot be reached or answers 5xx (nothing was read).
            ValueError: it refuses the query (4xx: a filter it does not support).
        """
        try:
            studies = self.client.search_for_studies(search_filters=dict(self.filters), get_remaining=True)
            sources, seen = [], {}
            for study in sorted(_value(s, "study") for s in studies):
                found = self.client.search_for_instances(study_instance_uid=study, fields=["SeriesInstanceUID"],
                                                         get_remaining=True)
                for item in found:
                    series, sop = _value(item, "series"), _value(item, "instance")
                    name = f"{sop}.dcm"
                    reason = ""
                    if name in seen:  # one SOP instance under two studies or series: the server is inconsistent
                        reason = f"SOPInstanceUID also listed in study {seen[name]}; the first one is used"
                    seen.setdefault(name, study)
                    sources.append(Source(name, "dicom", 0, reason, (study, series, sop)))
        except Exception as err:
            raise _failure(err, f"DICOMweb {self.url}: searching {self._query_text()}", "nothing was read") from None
        sources.sort(key=lambda s: (s.name, s.skip_reason != ""))
        return sources

    def fingerprint(self, sources: Iterable[Source]) -> str:
        """Hash of the server, the query and every listed instance (study, series, SOP UIDs)."""
        digest = hashlib.sha256(f"dicomweb\0{self.url}\0{sorted(self.filters.items())}\n".encode())
        for s in sources:
            digest.update(("/".join(s.location) + "\n").encode())
        return digest.hexdigest()[:16]

    def local_path(self, source: Source) -> str | None:
        return None

    # -- reading -----------------------------------------------------------------------------
    def read_many(self, sources: list[Source]) -> Iterator[tuple[Source, bytes | Exception]]:
        """Each instance's bytes in order, ``PREFETCH`` requests ahead. After the first
        :class:`SourceUnavailable` the rest are not requested: each gets one naming its study."""
        todo = iter(sources)
        self.client  # connect here, not in several threads at once
        pool = ThreadPoolExecutor(PREFETCH, thread_name_prefix="wado-rs")
        window = deque((s, pool.submit(self.retrieve, s)) for s in itertools.islice(todo, PREFETCH))
        down: tuple[Source, SourceUnavailable] | None = None
        try:
            while window:
                source, future = window.popleft()
                if down is None:
                    data = future.result()
                    if isinstance(data, SourceUnavailable):
                        down = (source, data)
                else:
                    future.cancel()
                    study = down[0].location[0]
                    data = SourceUnavailable(f"{self._where(source)}: not read, the server was unavailable "
                                             f"(from study {study} on)")
                yield source, data
                following = next(todo, None)
                if following is not None:
                    window.append((following, pool.submit(self.retrieve, following) if down is None else _done()))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def retrieve(self, source: Source) -> bytes | Exception:
        """One instance's bytes as the server stores them (WADO-RS), or why not."""
        study, series, sop = source.location
        try:
            dataset = self.client.retrieve_instance(study, series, sop, media_types=ANY_TRANSFER_SYNTAX)
        except Exception as err:
            return _failure(err, self._where(source))
        # dicomweb-client parses the part it received with pydicom.dcmread(BytesIO(part)); the
        # FileDataset keeps that buffer, so these are the bytes the server sent, not a re-encoding
        buffer = getattr(dataset, "buffer", None)
        if isinstance(buffer, io.BytesIO):
            return buffer.getvalue()
        out = io.BytesIO()  # another client version: write the dataset as it was read
        dataset.save_as(out, enforce_file_format=False)
        return out.getvalue()

    def _where(self, source: Source) -> str:
        study, series, sop = source.location
        return f"DICOMweb {self.url}: study {study}, series {series}, instance {sop}"

    def _query_text(self) -> str:
        return "studies " + "&".join(f"{k}={v}" for k, v in self.filters.items()) if self.filters else "all studies"


def store(url: str, paths: list[str]) -> list[str]:
    """Send DICOM files to a DICOMweb server with STOW-RS; returns the SOPInstanceUIDs it stored.

    Args:
        url: the DICOMweb root, ``http(s)://HOST[:PORT]/ROOT`` (a ``dicomweb+`` prefix is allowed).
        paths: DICOM Part 10 files. Each needs its SOPClassUID in the dataset (Orthanc answers
            400 to a file without one, as RSNA's images are).

    Raises:
        SourceUnavailable: the server cannot be reached or answers 5xx (names the batch's first file).
        ValueError: a file that is not DICOM, or one the server refused (names it and the reason).
    """
    import pydicom

    base, _ = parse_address(url, "--stow")
    client = connect(base)
    stored: list[str] = []
    for start in range(0, len(paths), STOW_BATCH):
        batch = paths[start:start + STOW_BATCH]
        datasets = []
        for path in batch:
            try:
                datasets.append(pydicom.dcmread(path))
            except Exception as err:
                raise ValueError(f"{path}: not a DICOM file ({err}); nothing from it was sent") from None
        try:
            answer = client.store_instances(datasets)
        except Exception as err:
            more = f" and {len(batch) - 1} more" if len(batch) > 1 else ""
            raise _failure(err, f"STOW-RS {base}: storing {batch[0]}{more}",
                           f"{len(stored)} files were stored before it") from None
        failed = list(answer.get("FailedSOPSequence", []))
        if failed:
            by_uid = {str(ds.SOPInstanceUID): path for ds, path in zip(datasets, batch)}
            item = failed[0]
            uid = str(item.get("ReferencedSOPInstanceUID", ""))
            raise ValueError(f"STOW-RS {base}: {len(failed)} of {len(batch)} files refused, e.g. "
                             f"{by_uid.get(uid, uid)} (failure reason {item.get('FailureReason', '?')})")
        stored += [str(item.ReferencedSOPInstanceUID) for item in answer.get("ReferencedSOPSequence", [])]
    return stored


def dicom_files(folder: str) -> list[str]:
    """The DICOM Part 10 files under ``folder`` (``DICM`` after the 128-byte preamble), sorted.

    Raises:
        FileNotFoundError: when ``folder`` is not a folder.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: not a folder of DICOM files")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                if handle.read(132)[128:] == b"DICM":
                    found.append(path)
    return found


def _value(item: dict, tag: str) -> str:
    """A UID from a DICOM JSON result (QIDO-RS)."""
    try:
        return str(item[TAGS[tag]]["Value"][0])
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"a QIDO-RS result without its {tag} UID ({TAGS[tag]}): {str(item)[:200]}") from None


def _failure(err: Exception, where: str, then: str = "") -> Exception:
    """The exception to report for ``err``, raised by dicomweb-client or requests at ``where``:
    :class:`SourceUnavailable` (``then`` adds what it means, where the caller cannot) when a later
    try may succeed, else what the server said."""
    then = f"; {then}" if then else ""
    import requests

    status = None
    if isinstance(err, requests.HTTPError) and err.response is not None:
        status = err.response.status_code
    elif type(err).__name__ == "RetryError":  # retrying's: dicomweb-client retried 429/408/503/504 and gave up
        response = getattr(getattr(err, "last_attempt", None), "value", None)
        status = getattr(response, "status_code", None) or 503
    if isinstance(err, (requests.ConnectionError, requests.Timeout)):
        return SourceUnavailable(f"{where}: the server is unreachable ({type(err).__name__}){then}")
    if status is not None and (status >= 500 or status in (408, 429)):
        return SourceUnavailable(f"{where}: the server answered HTTP {status}{then}")
    if status == 404:
        return FileNotFoundError(f"{where}: not found on the server (HTTP 404: deleted since it was listed?)")
    if status is not None:
        return ValueError(f"{where}: the server refused the request (HTTP {status}: {err.response.text[:200]})")
    return ValueError(f"{where}: {type(err).__name__}: {str(err)[:300]}")


def _done():
    """A future that never ran (a request not made)."""
    from concurrent.futures import Future

    return Future()


def _redact(parts) -> str:
    """An address without its credentials (for the message that refuses it)."""
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, host, parts.path, parts.query, ""))
