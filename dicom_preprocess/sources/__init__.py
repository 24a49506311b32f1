"""Where a preprocessing job's inputs come from, behind one protocol (:class:`InputSource`).

* :mod:`.archive`: a folder, a ``.zip``, a ``.tar[.gz]`` or one file, read in place;
* :mod:`.dicomweb`: a DICOMweb server (a PACS, Orthanc), searched with QIDO-RS and read with
  WADO-RS, named ``dicomweb+http://HOST:PORT/ROOT[?QIDO filters]``; it needs the
  ``dicomweb-client`` package, imported only when such an input is opened.

:func:`open_source` picks one from the job's ``input`` string, in the job and in every worker.
"""
from __future__ import annotations

from .archive import ARCHIVE_SUFFIXES, DICOM_SUFFIXES, MAX_COMPRESSION_RATIO, MAX_MEMBER_BYTES, InputArchive, classify
from .base import InputSource, Source, SourceUnavailable

DICOMWEB_SCHEMES = ("dicomweb+http://", "dicomweb+https://")

__all__ = ["ARCHIVE_SUFFIXES", "DICOM_SUFFIXES", "DICOMWEB_SCHEMES", "MAX_COMPRESSION_RATIO", "MAX_MEMBER_BYTES",
           "InputArchive", "InputSource", "Source", "SourceUnavailable", "classify", "is_dicomweb", "open_source"]


def is_dicomweb(spec: str) -> bool:
    """Whether a job's ``input`` names a DICOMweb server rather than a path."""
    return spec.lower().startswith(DICOMWEB_SCHEMES)


def open_source(spec: str) -> InputSource:
    """The input named by ``spec``: a DICOMweb server for ``dicomweb+http(s)://...``, else a path.

    Raises:
        FileNotFoundError / ValueError: for a missing path or an input of unknown kind, or a
            DICOMweb address that cannot be parsed.
        ImportError: for a DICOMweb input where ``dicomweb-client`` is not installed.
    """
    if is_dicomweb(spec):
        from .dicomweb import DicomWebSource

        return DicomWebSource(spec)
    return InputArchive(spec)
