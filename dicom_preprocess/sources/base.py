"""The protocol every input of a preprocessing job follows, whatever holds the files.

The job lists an input once (:meth:`InputSource.list`, sorted by name), records its
:meth:`~InputSource.fingerprint` (a rerun over another input is refused) and cuts the list into
chunks; each worker process opens the same input from the job's ``input`` string and reads its
chunk's members by :class:`Source` (:meth:`~InputSource.read_many`). Nothing else about the input
reaches the decoding: a folder, a tar and a DICOMweb server give the same bytes to the same reader.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol


@dataclass(frozen=True)
class Source:
    """One input file: ``name`` is its path relative to the input (a DICOMweb instance:
    ``<SOPInstanceUID>.dcm``, RSNA's file name); ``kind`` is dicom or volume."""

    name: str
    kind: str  # "dicom" | "volume"
    size: int  # bytes; 0 where the listing does not say (DICOMweb)
    skip_reason: str = ""  # set when listing already knows the member cannot be read
    # where a server holds it, when the name alone does not say: DICOMweb's
    # (StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID); empty for files
    location: tuple = ()


class SourceUnavailable(RuntimeError):
    """The input could not be read now, but may be later: its server is down, times out or
    answers 5xx. In place of a member's bytes (:meth:`InputSource.read_many`) it marks the member
    for the next run (the job records it in errors.csv and reads it again when rerun); raised
    by :meth:`InputSource.list`, nothing was read."""


class InputSource(Protocol):
    """What the job and its workers need of an input (folder, archive or DICOMweb server).

    ``kind`` names it (``folder``, ``zip``, ``tar``, ``file``, ``dicomweb``); ``unlisted``
    counts, by suffix, the files of the input that are not images, after :meth:`list`.
    """

    kind: str
    unlisted: dict

    def list(self) -> list[Source]:
        """The image inputs, sorted by name (the job's chunks are slices of this list)."""

    def fingerprint(self, sources: Iterable[Source]) -> str:
        """A short hash identifying this input's content: a rerun with another refuses to resume."""

    def local_path(self, source: Source) -> str | None:
        """A filesystem path of ``source`` when it has one (volumes are read by path)."""

    def read_many(self, sources: list[Source]) -> Iterator[tuple[Source, bytes | Exception]]:
        """Bytes of each source in order, or the exception that stopped its read
        (:class:`SourceUnavailable` when a rerun may succeed)."""
