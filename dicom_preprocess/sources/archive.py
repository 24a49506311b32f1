"""Inputs read in place: a folder (recursive), a ``.zip``, a ``.tar``/``.tar.gz``, or one file
(a ``.dcm``, a NIfTI or ITK volume).

Every input becomes a :class:`Source` named by its path *relative to the input* (the folder or
the archive root), so that a folder and an archive of it list the same names in the same order
and give identical caches. Member names are only ever used as labels: nothing is written under
them, so ``../`` or absolute names cannot reach outside the output directory. Only regular
files are read from tars (symlinks, hard links and devices are skipped with a reason), and zip
members are checked against size and expansion-ratio bounds before they are decompressed.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import zipfile
from typing import Iterable, Iterator

from ..reader import ITK_SUFFIXES, NIFTI_SUFFIXES
from .base import Source

DICOM_SUFFIXES = (".dcm", ".dicom")
MAX_MEMBER_BYTES = 256 * 2**20  # one slice is ~0.5 MB; a member above this is refused
MAX_COMPRESSION_RATIO = 200  # zip-bomb guard: DICOM compresses ~3x, deflated zeros ~1000x
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def classify(name: str) -> str | None:
    """``dicom``, ``volume`` or None (not an image input: CSV, text, ...)."""
    lower = name.lower()
    if lower.endswith(NIFTI_SUFFIXES + ITK_SUFFIXES):
        return "volume"
    base = os.path.basename(lower)
    if lower.endswith(DICOM_SUFFIXES) or ("." not in base and base not in ("dicomdir",)):
        return "dicom"
    return None


class InputArchive:
    """Lists and reads the image inputs of a folder or archive (an :class:`~.base.InputSource`).

    Args:
        path: folder, ``.zip``, ``.tar[.gz|.bz2|.xz]``, or a single DICOM/NIfTI/ITK file.

    Raises:
        FileNotFoundError / ValueError: when the input is missing or of an unknown kind.

    ``unlisted`` counts, by suffix, the files of the input that are not images (read nowhere).
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"input {path}: does not exist")
        lower = self.path.lower()
        if os.path.isdir(self.path):
            self.kind = "folder"
        elif lower.endswith(".zip"):
            self.kind = "zip"
        elif lower.endswith(ARCHIVE_SUFFIXES[1:]):  # .tar and the compressed tars
            self.kind = "tar"
        elif classify(os.path.basename(self.path)) is not None:
            self.kind = "file"
        else:
            raise ValueError(f"input {path}: expected a folder, a .zip or .tar/.tar.gz archive, or a DICOM, NIfTI "
                             "or ITK file")
        self._handle = None
        self.unlisted: dict[str, int] = {}

    # -- listing ---------------------------------------------------------------------------
    def list(self) -> list[Source]:
        """Image inputs sorted by name; duplicates in an archive keep the first and flag the rest."""
        seen: set[str] = set()
        sources = []
        self.unlisted = {}
        for name, size, reason in self._walk():
            kind = classify(name)
            if kind is None:
                suffix = os.path.splitext(name)[1].lower() or "(none)"
                self.unlisted[suffix] = self.unlisted.get(suffix, 0) + 1
                continue
            if name in seen:
                reason = reason or "duplicate member name in archive; the first one is used"
            seen.add(name)
            sources.append(Source(name, kind, size, reason))
        sources.sort(key=lambda s: (s.name, s.skip_reason != ""))
        return sources

    def _walk(self) -> Iterator[tuple[str, int, str]]:
        if self.kind == "file":
            yield os.path.basename(self.path), os.path.getsize(self.path), ""
        elif self.kind == "folder":
            for root, dirs, files in os.walk(self.path):
                dirs.sort()
                for file in sorted(files):
                    full = os.path.join(root, file)
                    rel = os.path.relpath(full, self.path).replace(os.sep, "/")
                    if os.path.islink(full) and not os.path.realpath(full).startswith(self.path + os.sep):
                        yield rel, 0, "symlink pointing outside the input folder"
                    elif os.path.isfile(full):
                        yield rel, os.path.getsize(full), ""
        elif self.kind == "zip":
            with zipfile.ZipFile(self.path) as archive:
                for info in archive.infolist():
                    if info.is_dir():
                        continue
                    yield _clean(info.filename), info.file_size, _zip_member_problem(info)
        else:
            with tarfile.open(self.path, "r:*") as archive:
                for member in archive:
                    if member.isdir():
                        continue
                    reason = "" if member.isfile() else "not a regular file (link or device) in tar"
                    if member.isfile() and member.size > MAX_MEMBER_BYTES:
                        reason = f"member of {member.size} bytes exceeds {MAX_MEMBER_BYTES} bytes"
                    yield _clean(member.name), member.size, reason

    def fingerprint(self, sources: Iterable[Source]) -> str:
        """Hash of (name, size) of every listed input: identifies the archive content cheaply."""
        digest = hashlib.sha256()
        for s in sources:
            digest.update(f"{s.name}\0{s.size}\n".encode())
        return digest.hexdigest()[:16]

    # -- reading -----------------------------------------------------------------------------
    def local_path(self, source: Source) -> str | None:
        """Filesystem path of a folder or file input (volumes need one for nibabel/SimpleITK)."""
        if self.kind == "file":
            return self.path
        return os.path.join(self.path, source.name) if self.kind == "folder" else None

    def read_many(self, sources: list[Source]) -> Iterator[tuple[Source, bytes | Exception]]:
        """Bytes of each source in order (an exception in place of bytes when unreadable)."""
        if self.kind in ("folder", "file"):
            for source in sources:
                try:
                    with open(self.local_path(source), "rb") as handle:
                        # Ask for the file's own size (+1 to see one that grew past the bound),
                        # never for the bound itself: read(256 MB) makes CPython allocate 256 MB
                        # for every file, a fresh mmap whose page faults cost 0.4 ms per 0.5 MB
                        # slice, six times the read (measured: 0.48 vs 0.07 ms per RSNA file).
                        size = os.fstat(handle.fileno()).st_size
                        yield source, handle.read(min(size, MAX_MEMBER_BYTES) + 1)
                except OSError as err:
                    yield source, err
        elif self.kind == "zip":
            with zipfile.ZipFile(self.path) as archive:
                by_name = {}
                for info in archive.infolist():
                    by_name.setdefault(_clean(info.filename), info)
                for source in sources:
                    try:
                        info = by_name[source.name]
                        with archive.open(info) as member:
                            data = member.read(min(info.file_size, MAX_MEMBER_BYTES) + 1)
                        yield source, data
                    except Exception as err:  # CRC errors, bad compression, ...
                        yield source, err
        else:
            # Tar members are read in one pass in archive order; a .tar.gz cannot seek, so each
            # chunk decompresses up to its last member (use .zip or plain .tar for huge inputs).
            wanted = {s.name: s for s in sources}
            found: dict[str, bytes | Exception] = {}
            with tarfile.open(self.path, "r:*") as archive:
                for member in archive:
                    name = _clean(member.name)
                    if name in wanted and name not in found and member.isfile():
                        try:
                            bound = min(member.size, MAX_MEMBER_BYTES) + 1  # not the bound: see above
                            found[name] = archive.extractfile(member).read(bound)
                        except Exception as err:
                            found[name] = err
                        if len(found) == len(wanted):
                            break
            for source in sources:
                yield source, found.get(source.name, FileNotFoundError(f"{source.name}: not found in tar"))


def _clean(name: str) -> str:
    """A member name as a label: forward slashes, no leading ``/`` or ``./``."""
    name = name.replace("\\", "/")
    while name.startswith(("/", "./")):
        name = name[1:] if name.startswith("/") else name[2:]
    return name


def _zip_member_problem(info: zipfile.ZipInfo) -> str:
    if info.file_size > MAX_MEMBER_BYTES:
        return f"member of {info.file_size} bytes exceeds {MAX_MEMBER_BYTES} bytes"
    if info.compress_size and info.file_size / info.compress_size > MAX_COMPRESSION_RATIO:
        return f"expansion ratio {info.file_size / info.compress_size:.0f} exceeds {MAX_COMPRESSION_RATIO} (zip bomb?)"
    return ""
