"""One DICOM Structured Report per series: the model's exam-level hemorrhage findings, as a
PACS stores and a viewer shows them next to the images.

Each report is a TID 1500 Measurement Report in a Comprehensive SR (highdicom), in the source
study, with a new series and SOP instance of its own. Per subtype one measurement group
(TID 1501) holds:

* the finding type (the subtype's concept, see :data:`FINDINGS`);
* the probability as a measurement (DCM 122157 "Probability", UCUM ``1`` "no units") and the
  threshold it was read at (DCM 122411 "Threshold Value");
* a qualitative evaluation: the subtype's concept, Present (probability >= threshold) or Absent
  (SCT 52101004 / 272519000, DICOM CID 241 "Present-Absent Only");
* the algorithm identification (TID 4019): the model's name and version, and its file's sha256
  with how the series probability and threshold were made as algorithm parameters.

The images the findings are about are the report's evidence (Current Requested Procedure
Evidence Sequence: study, series, every SOP instance the prediction read). A finding is about
the whole series, so the groups list no source images of their own.

Source headers as the RSNA challenge published them lack the patient and study attributes an SR
copies (PatientName, PatientBirthDate, PatientSex, AccessionNumber, StudyDate, StudyTime,
ReferringPhysicianName) and SOPClassUID; :func:`evidence_header` fills them on a copy: empty
(DICOM type 2: present, zero length, "unknown") and SOPClassUID from the file meta, else CT Image
Storage. Their UIDs (``ID_1f6d1e8aeb``) are not valid DICOM UIDs: they are written as they are,
since a reference must match what the archive holds, and a validator flags each one (dciodvfy:
"Value invalid for this VR" and "Illegal root for UID"); the report's own series and SOP
instance UIDs are new, valid ones.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
LOCAL_SCHEME = "99MEDMOCO"  # "99" + name: a private coding scheme (PS3.16 section 8.2), declared in the SR

# The subtype concepts. SNOMED CT where the code is confirmed by two sources: 1386000 is in
# DICOM's own code tables (pydicom's ``codes.SCT.IntracranialHemorrhage``) and in FHIR value sets;
# 21454007 and 274100004 are in FHIR value sets (274100004 "Cerebral hemorrhage" is the
# intracerebral, i.e. intraparenchymal, hemorrhage). For epidural, subdural and intraventricular
# hemorrhage no code was confirmed (the subdural and intraventricular candidates 35486000 and
# 274110009 rest on one second-hand source each, and a published SR example codes subdural
# hemorrhage as 95455008, which is "Thrombosis of cerebral veins"): a wrong SNOMED code would
# be read as a different disorder, so those three use the private scheme until verified.
FINDINGS: dict[str, Code] = {
    "epidural": Code("epidural", LOCAL_SCHEME, "Epidural hemorrhage"),
    "intraparenchymal": Code("274100004", "SCT", "Cerebral hemorrhage"),
    "intraventricular": Code("intraventricular", LOCAL_SCHEME, "Intraventricular hemorrhage"),
    "subarachnoid": Code("21454007", "SCT", "Subarachnoid intracranial hemorrhage"),
    "subdural": Code("subdural", LOCAL_SCHEME, "Subdural hemorrhage"),
    "any": Code("1386000", "SCT", "Intracranial hemorrhage"),
}
PRESENT, ABSENT = codes.SCT.Present, codes.SCT.Absent
PROBABILITY, THRESHOLD, NO_UNITS = codes.DCM.Probability, codes.DCM.ThresholdValue, codes.UCUM.NoUnits

# Patient and study attributes highdicom copies from the first evidence header (type 2 in the
# SR: they must be present, and may be empty when unknown).
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                "StudyDate", "StudyTime", "ReferringPhysicianName")
SR_SERIES_NUMBER = 9001  # high, so that a viewer lists the report after the acquired series
SERIES_DESCRIPTION = "medmoco hemorrhage classification"
INVALID_UID_WARNING = "Invalid value for VR UI"  # pydicom, on every RSNA ``ID_...`` UID: expected


def series_operating_point(info: dict) -> tuple[dict, list[str]]:
    """The thresholds a model's series probabilities are read at, and the algorithm parameters that
    say how both were made.

    A series model has exam thresholds (chosen on validation series); a slice model's series
    probability is its highest slice probability, read at the slice thresholds (a series is
    positive when any slice is). No thresholds when the model file records none (probabilities
    only, no findings).
    """
    points = info.get("operating_points") or {}
    chosen = (f"chosen on {points.get('split', 'val')} for sensitivity {points['target_sensitivity']}"
              if "target_sensitivity" in points else "as recorded in the model file")
    if info.get("series"):
        how = ["series probability: the series head's exam output"]
    else:
        how = ["series probability: the highest slice probability of the series"]
    if points.get("exam_thresholds"):
        return dict(points["exam_thresholds"]), how + [f"thresholds: exam thresholds {chosen}"]
    if points.get("thresholds"):
        return dict(points["thresholds"]), how + [f"thresholds: slice thresholds {chosen}"]
    return {}, how + ["thresholds: none recorded in the model file (no findings, probabilities only)"]


def evidence_header(ds: Dataset, what: str = "") -> Dataset:
    """A copy of a source image header that an SR can take as evidence (pixel data left out).

    Type 2 patient and study attributes the header lacks are added empty, and SOPClassUID from
    the file meta (MediaStorageSOPClassUID), else CT Image Storage.

    Raises:
        ValueError: the header lacks a UID no report can do without (names ``what``).
    """
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if not ds.get(k)]
    if missing:
        raise ValueError(f"{what or 'DICOM header'}: no {', '.join(missing)}; an SR cannot reference it")
    header = Dataset()
    for element in ds:
        if element.tag != 0x7FE00010:
            header.add(copy.deepcopy(element))
    header.file_meta = copy.deepcopy(getattr(ds, "file_meta", Dataset()))
    if not header.get("SOPClassUID"):
        header.SOPClassUID = header.file_meta.get("MediaStorageSOPClassUID") or CT_IMAGE_STORAGE
    for keyword in TYPE2_COPIED:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def series_report(probabilities: Mapping[str, float], headers: Sequence[Dataset], identity, thresholds: Mapping,
                  parameters: Sequence[str] = ()):
    """A Comprehensive SR of one series (highdicom ``ComprehensiveSR``, not yet written).

    Args:
        probabilities: ``{subtype: probability}`` of the series (the six of :data:`FINDINGS`).
        headers: the headers of the series' images, as read (:func:`evidence_header` is applied here).
        identity: a :class:`medmoco.inference.identity.ModelIdentity` (name, version, sha256).
        thresholds: ``{subtype: threshold}``; a subtype without one gets its probability and no finding.
        parameters: further algorithm parameters (how the probability and thresholds were made).
    """
    import highdicom as hd

    with invalid_uids_expected():
        evidence = [evidence_header(ds) for ds in headers]
    algorithm = hd.sr.AlgorithmIdentification(
        name=identity.name, version=identity.version, manufacturer="medmoco",
        parameters=[f"sha256:{identity.sha256}", *parameters])
    groups = []
    for subtype, concept in FINDINGS.items():
        p = float(probabilities[subtype])
        measurements = [hd.sr.Measurement(name=PROBABILITY, value=p, unit=NO_UNITS)]
        evaluations = []
        t = thresholds.get(subtype)
        if t is not None:
            measurements.append(hd.sr.Measurement(name=THRESHOLD, value=float(t), unit=NO_UNITS))
            evaluations.append(hd.sr.QualitativeEvaluation(concept, PRESENT if p >= float(t) else ABSENT))
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=subtype),
            finding_type=concept, algorithm_id=algorithm, measurements=measurements,
            qualitative_evaluations=evaluations or None))
    observer = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_device_uid(identity.sha256), name=identity.name, manufacturer_name="medmoco",
            model_name=f"{identity.name} {identity.version}"[:64])))
    report = hd.sr.MeasurementReport(observation_context=observer, procedure_reported=codes.SCT.ComputedTomography,
                                     imaging_measurements=groups)
    with invalid_uids_expected():
        return hd.sr.ComprehensiveSR(
            evidence=evidence, content=report[0], series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medmoco", is_complete=True,
            is_final=False, series_description=SERIES_DESCRIPTION, software_versions=_medmoco_version(),
            coding_schemes=[hd.coding_schemes.CodingSchemeIdentificationItem(
                designator=LOCAL_SCHEME, name="medmoco local codes",
                responsible_organization="medmoco (codes not yet mapped to SNOMED CT)")])


def write_series_srs(predictions, headers_by_series: Mapping[str, Sequence[Dataset]], identity,
                     thresholds: Mapping, out_dir: str, parameters: Sequence[str] = ()) -> list[str]:
    """Write one SR per series of ``predictions``; returns their paths in its row order.

    Args:
        predictions: one row per series (``series_uid`` and the six subtype probabilities, as
            `medmoco predict --series-out` writes them).
        headers_by_series: ``{series_uid: the headers of its images}`` (:func:`read_series_headers`).
        identity, thresholds, parameters: as :func:`series_report`.

    Raises:
        KeyError: a series of ``predictions`` has no headers.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths, used = [], set()
    for row in predictions.to_dict("records"):
        series_uid = str(row["series_uid"])
        if series_uid not in headers_by_series:
            raise KeyError(f"series {series_uid}: no DICOM headers to reference; cannot write its SR")
        sr = series_report(row, headers_by_series[series_uid], identity, thresholds, parameters)
        path = os.path.join(out_dir, _file_name(series_uid, str(sr.SOPInstanceUID), used))
        with invalid_uids_expected():
            sr.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def read_series_headers(input_path: str, sources_by_series: Mapping[str, Sequence[str]]) -> dict[str, list[Dataset]]:
    """``{series_uid: headers}`` of the named members of a folder, zip, tar or DICOMweb server
    (:func:`dicom_preprocess.sources.open_source`; pixels not parsed).

    Args:
        sources_by_series: ``{series_uid: member names}``, as the cache manifest's ``source`` column.

    Raises:
        ConfigError: a member is missing, is not a DICOM file (a NIfTI or ITK volume has no
            instance to reference) or cannot be read.
    """
    import pydicom

    from dicom_preprocess.config import ConfigError
    from dicom_preprocess.sources import open_source

    archive = open_source(input_path)
    listed = {s.name: s for s in archive.list()}
    wanted = [listed[name] for names in sources_by_series.values() for name in names if name in listed]
    absent = [name for names in sources_by_series.values() for name in names if name not in listed]
    if absent:
        raise ConfigError(f"input {input_path}: {absent[0]} (and {len(absent) - 1} more) not found")
    volumes = [s.name for s in wanted if s.kind != "dicom"]
    if volumes:
        raise ConfigError(f"input {input_path}: {volumes[0]} is a volume, not DICOM: an SR references DICOM "
                          "instances; use --sr with DICOM inputs only")
    headers = {}
    with invalid_uids_expected():
        for source, data in archive.read_many(wanted):
            if isinstance(data, Exception):
                raise ConfigError(f"{source.name}: cannot read its header ({data})")
            headers[source.name] = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    return {series: [headers[name] for name in names] for series, names in sources_by_series.items()}


@contextlib.contextmanager
def invalid_uids_expected() -> Iterator[None]:
    """Silence pydicom's "Invalid value for VR UI" (a warning and a log record for every value it
    reads or sets) where source UIDs are handled as they are: RSNA's ``ID_...`` give thousands per
    run. Every other validation message still shows."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(INVALID_UID_WARNING)

    logger = logging.getLogger("pydicom")
    logger.addFilter(keep)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=INVALID_UID_WARNING)
            yield
    finally:
        logger.removeFilter(keep)


def _device_uid(sha256: str) -> str:
    """A valid UID for the model as an observer device, the same for the same weights file."""
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=None, entropy_srcs=[sha256]))  # 2.25.<uuid derived from the digest>


def _medmoco_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medmoco")
    except PackageNotFoundError:
        return "unknown"


def _file_name(series_uid: str, sop_uid: str, used: set) -> str:
    """``<series uid>.dcm`` where the UID is a safe file name (RSNA's ``ID_...`` and real UIDs are),
    else, or when two series would share a name, ``<the SR's SOP instance UID>.dcm``. UIDs come from
    the input: they never become paths as they are."""
    name = f"{series_uid}.dcm" if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}", series_uid) else f"{sop_uid}.dcm"
    if name in used:
        name = f"{sop_uid}.dcm"
    used.add(name)
    return name
