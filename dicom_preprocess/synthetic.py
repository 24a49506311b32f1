"""A synthetic RSNA-like archive: head-CT phantoms in HU, written as RSNA-style DICOM + CSV.

Each patient has one to three series; each series is a stack of axial slices of a parametric
head (skull, brain with grey/white texture, ventricles, sulci, noise) in which the five
hemorrhage subtypes are drawn where they occur, with blood at 55-80 HU:

* epidural: a biconvex lens against the inner table;
* subdural: a thin crescent along the inner table over a wide arc;
* intraparenchymal: a blob inside the brain;
* intraventricular: blood layering in the ventricles;
* subarachnoid: thin streaks along the sulci.

A lesion spans a run of consecutive slices and the slice labels say where it is, so the labels
are learnable from the pixels. The tag patterns follow the real archive
(../shared/REFERENCE.md section 1): Explicit VR Little Endian, BitsStored 12 and 16,
PixelRepresentation 0 and 1, intercepts -1024/-1000/0, the 12-bit wrap defect (codes = HU mod
4096 with intercept 0 or 1), multi-valued WindowCenter/Width, a few non-512 and non-square
images, ``ID_...`` UIDs and no InstanceNumber. Files are named ``ID_<SOPInstanceUID>.dcm`` and
written in random order. Deterministic for a seed.
"""
from __future__ import annotations

import os
import warnings
import zipfile
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .labels import SUBTYPES, write_rsna_labels

HEMORRHAGES = SUBTYPES[:5]
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# (name, BitsStored, PixelRepresentation, RescaleIntercept); "wrap" stores HU mod 4096.
ENCODINGS = (
    ("u12", 12, 0, -1024.0),
    ("s16", 16, 1, -1024.0),
    ("wrap", 12, 0, 0.0),
    ("u16", 16, 0, -1000.0),
    ("s16_zero", 16, 1, 0.0),
    ("wrap", 12, 0, 1.0),
)
# (Manufacturer, ManufacturerModelName, ConvolutionKernel, KVP), one per series in turn (no random
# draw, so the rest of an archive is what it was): the subgroup tables of an evaluation have
# several scanners and both slice thicknesses (the series spacing) to show
SCANNERS = (("GE MEDICAL SYSTEMS", "LightSpeed VCT", "STANDARD", "120"),
            ("SIEMENS", "SOMATOM Definition AS", "H30s", "120"),
            ("TOSHIBA", "Aquilion ONE", "FC21", "135"))
ODD_SHAPES = ((512, 436), (464, 512), (638, 638), (768, 768))
AIR = -1000.0  # the wrap fix recovers HU >= -1000, and real air is about -1000 HU


@dataclass
class SynthSlice:
    image_id: str
    patient_id: str
    study_uid: str
    series_uid: str
    z: float
    labels: dict
    encoding: str
    hu: np.ndarray | None = None  # int16 (rows, cols), kept when asked (tests)


@dataclass
class SynthArchive:
    root: str
    images_dir: str
    labels_csv: str
    zip_path: str | None
    slices: list = field(default_factory=list)


def _hex_id(rng: np.random.Generator, digits: int) -> str:
    return "ID_" + "".join(rng.choice(list("0123456789abcdef"), size=digits))


def random_anatomy(rng: np.random.Generator) -> dict:
    """One patient's head: size, aspect, position and tilt in the field of view, skull, texture."""
    return {
        "scale": float(rng.uniform(0.85, 1.1)), "aspect": float(rng.uniform(0.9, 1.1)),
        "shift": (float(rng.uniform(-0.06, 0.06)), float(rng.uniform(-0.06, 0.06))),
        "tilt": float(rng.uniform(-0.25, 0.25)), "skull": float(rng.uniform(0.05, 0.09)),
        "bone": float(rng.uniform(900.0, 1400.0)), "texture": (float(rng.uniform(15, 30)), float(rng.uniform(0, 6.3))),
        "sulci": int(rng.integers(18, 36)), "ventricles": float(rng.uniform(0.7, 1.4)),
    }


DEFAULT_ANATOMY = {"scale": 1.0, "aspect": 1.0, "shift": (0.0, 0.0), "tilt": 0.0, "skull": 0.07, "bone": 1100.0,
                   "texture": (23.0, 0.0), "sulci": 28, "ventricles": 1.0}


def head_phantom(rows: int, cols: int, position: float, lesions: dict, rng: np.random.Generator,
                 anatomy: dict | None = None) -> np.ndarray:
    """HU image (rows, cols) of an axial slice at ``position`` in [0, 1] (skull base -> vertex).

    Args:
        lesions: subtype -> parameters (``angle``, ``size``, ``center``) for the lesions present.
        anatomy: the patient's head (:func:`random_anatomy`); patients differ in it, as real
            heads and their placement in the scanner do.
    """
    anat = anatomy or DEFAULT_ANATOMY
    side = min(rows, cols)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    y = (y - rows / 2.0) / side - anat["shift"][1]
    x = (x - cols / 2.0) / side - anat["shift"][0]
    cos_t, sin_t = np.cos(anat["tilt"]), np.sin(anat["tilt"])
    x, y = cos_t * x + sin_t * y, -sin_t * x + cos_t * y
    scale = (0.55 + 0.45 * np.sqrt(max(0.0, 1.0 - ((position - 0.45) / 0.75) ** 2))) * anat["scale"]
    a, b = 0.36 * scale * anat["aspect"], 0.44 * scale / anat["aspect"]
    radius = np.sqrt((x / a) ** 2 + (y / b) ** 2)  # 1 at the outer table
    angle = np.arctan2(y / b, x / a)
    inner = 1.0 - anat["skull"] / scale
    hu = np.full((rows, cols), AIR, dtype=np.float32)
    skull = (radius <= 1.0) & (radius > inner)
    brain = radius <= inner
    hu[skull] = anat["bone"] + 500.0 * np.cos(8 * angle[skull]) ** 2
    freq, phase = anat["texture"]
    texture = 6.0 * np.sin(freq * x + 5 * np.sin(17 * y + phase)) * np.cos(19 * y + phase)
    hu[brain] = 32.0 + texture[brain]
    # Sulci: thin CSF lines perpendicular to the cortex.
    sulci = brain & (radius > inner - 0.18) & (np.abs(np.sin(anat["sulci"] * angle)) < 0.08)
    hu[sulci] = 8.0
    ventricles = np.zeros_like(brain)
    if 0.3 < position < 0.75:
        v = anat["ventricles"]
        for side_x in (-0.06, 0.06):
            ventricles |= ((x - side_x) / (0.04 * v)) ** 2 + ((y + 0.02) / (0.11 * v)) ** 2 <= 1.0
        hu[ventricles] = 5.0
    depth = inner - radius  # 0 at the inner table, positive inside
    for subtype, p in lesions.items():
        blood = 65.0 + 10.0 * p["density"]
        offset = np.angle(np.exp(1j * (angle - p["angle"])))
        if subtype == "epidural":
            half = 0.45
            thickness = p["size"] * 0.22 * np.clip(np.cos(np.pi / 2 * offset / half), 0, None)
            mask = brain & (np.abs(offset) < half) & (depth < thickness)
        elif subtype == "subdural":
            half = 1.1
            thickness = p["size"] * 0.06 * np.clip(np.cos(np.pi / 2 * offset / half), 0.3, None)
            mask = brain & (np.abs(offset) < half) & (depth < thickness)
        elif subtype == "intraparenchymal":
            cx, cy = p["center"]
            mask = brain & (((x - cx * a * 0.5) ** 2 + (y - cy * b * 0.5) ** 2) < (0.03 + 0.05 * p["size"]) ** 2)
        elif subtype == "intraventricular":
            mask = ventricles & (y > -0.02 - 0.08 * p["size"])
            if not mask.any():  # no ventricles in this slice: blood in the third ventricle region
                mask = brain & (x**2 / 0.02**2 + y**2 / 0.05**2 <= 1.0)
        else:  # subarachnoid
            mask = brain & (radius > inner - 0.2) & (np.abs(np.sin(anat["sulci"] * angle)) < 0.1) & (np.abs(offset) < 1.4)
        hu[mask] = blood
    hu += rng.normal(0.0, 4.0, size=hu.shape).astype(np.float32)
    return np.clip(np.rint(hu), AIR, 3000).astype(np.int16)


def encode_codes(hu: np.ndarray, encoding: str) -> np.ndarray:
    """Stored codes for HU under one of :data:`ENCODINGS` (uint16 or int16 array)."""
    hu = hu.astype(np.int32)
    if encoding == "u12":
        return np.clip(hu + 1024, 0, 4095).astype(np.uint16)
    if encoding == "wrap":
        return np.mod(hu, 4096).astype(np.uint16)
    if encoding == "u16":
        return (hu + 1000).astype(np.uint16)
    if encoding == "s16":
        return (hu + 1024).astype(np.int16)
    if encoding == "s16_zero":
        return hu.astype(np.int16)
    raise ValueError(f"encoding {encoding!r}: unknown")


def write_dicom(path: str, codes: np.ndarray, tags: dict) -> None:
    """Write an RSNA-style CT slice (Explicit VR Little Endian, 16-bit) with pydicom."""
    from pydicom.config import disable_value_validation
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    # RSNA's ID_... UIDs are not valid UIs; pydicom 3 would log "Invalid value for VR UI" for each
    # value it writes (several per file), so validation is off while writing these files.
    with warnings.catch_warnings(), disable_value_validation():
        warnings.simplefilter("ignore")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = tags["SOPInstanceUID"]
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CT_IMAGE_STORAGE
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = tags.get("PhotometricInterpretation", "MONOCHROME2")
        ds.Rows, ds.Columns = codes.shape
        ds.BitsAllocated = 16
        ds.HighBit = ds.BitsStored - 1
        ds.PixelData = codes.tobytes()
        ds.save_as(path, enforce_file_format=True)


def synthesize(
    out: str,
    patients: int = 20,
    seed: int = 0,
    zip_archive: bool = False,
    slices_per_series: tuple[int, int] = (10, 16),
    hemorrhage_rate: float = 0.5,
    lesion_scale: float = 1.0,
    subtypes: tuple = HEMORRHAGES,
    keep_hu: bool = False,
    rows: int = 512,
) -> SynthArchive:
    """Write ``out/stage_2_train/ID_*.dcm`` (or a zip of them) and ``out/stage_2_train.csv``.

    Args:
        patients: number of patients (1-3 series each).
        zip_archive: write ``out/rsna-intracranial-hemorrhage-detection.zip`` (members
            ``stage_2_train/ID_*.dcm`` and ``stage_2_train.csv``) instead of the folder.
        hemorrhage_rate: probability that a series carries hemorrhage.
        lesion_scale: multiplies every lesion's size (> 1 makes an easy task, for tests that must
            see a model learn in a few epochs at a few dozen pixels).
        subtypes: the hemorrhage subtypes that may occur (default all five).
        keep_hu: keep each slice's HU in the returned :class:`SynthArchive` (for tests).
        rows: side of the regular (square) images; odd shapes keep their RSNA sizes.
    """
    rng = np.random.default_rng(seed)
    images_dir = os.path.join(out, "stage_2_train")
    os.makedirs(out, exist_ok=True)
    if not zip_archive:
        os.makedirs(images_dir, exist_ok=True)
    archive = SynthArchive(out, images_dir, os.path.join(out, "stage_2_train.csv"), None)
    files: list[tuple[str, np.ndarray, dict]] = []
    series_count = 0
    for _ in range(patients):
        patient_id = _hex_id(rng, 8)
        study_uid = _hex_id(rng, 10)
        anatomy = random_anatomy(rng)
        for _ in range(int(rng.integers(1, 4))):
            series_uid = _hex_id(rng, 10)
            name, bits, signed, intercept = ENCODINGS[series_count % len(ENCODINGS)]
            shape = (rows, rows)
            if series_count % 5 == 4:
                shape = ODD_SHAPES[(series_count // 5) % len(ODD_SHAPES)]
            multi_window = series_count % 2 == 0
            scanner = SCANNERS[series_count % len(SCANNERS)]
            series_count += 1
            n = int(rng.integers(slices_per_series[0], slices_per_series[1] + 1))
            lesions = {}
            if rng.random() < hemorrhage_rate:
                kinds = [str(k) for k in subtypes]
                for subtype in rng.choice(kinds, size=min(len(kinds), int(rng.integers(1, 3))), replace=False):
                    start = int(rng.integers(0, max(1, n // 2)))
                    lesions[str(subtype)] = {
                        "range": (start, min(n, start + int(rng.integers(max(2, n // 3), n // 2 + 2)))),
                        "angle": float(rng.uniform(-np.pi, np.pi)), "size": lesion_scale * float(rng.uniform(0.6, 1.0)),
                        "center": (float(rng.uniform(-0.6, 0.6)), float(rng.uniform(-0.5, 0.5))),
                        "density": float(rng.random()),
                    }
            z0 = float(rng.uniform(-120.0, -60.0))
            spacing = float(rng.choice([4.0, 5.0]))
            for k in range(n):
                present = {s: p for s, p in lesions.items() if p["range"][0] <= k < p["range"][1]}
                hu = head_phantom(shape[0], shape[1], k / max(1, n - 1), present, rng, anatomy)
                labels = {s: int(s in present) for s in HEMORRHAGES}
                labels["any"] = int(bool(present))
                image_id = _hex_id(rng, 9)
                z = round(z0 + k * spacing, 6)
                tags = {
                    "SOPInstanceUID": image_id, "Modality": "CT", "PatientID": patient_id,
                    "StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid, "StudyID": "",
                    "ImagePositionPatient": [-125.0, -125.0, z],
                    "ImageOrientationPatient": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
                    "PixelSpacing": [0.488281, 0.488281],
                    "BitsStored": bits, "PixelRepresentation": signed,
                    "WindowCenter": [36, 36] if multi_window else 40,
                    "WindowWidth": [80, 80] if multi_window else 80,
                    "RescaleIntercept": intercept, "RescaleSlope": 1.0,
                    "Manufacturer": scanner[0], "ManufacturerModelName": scanner[1], "ConvolutionKernel": scanner[2],
                    "KVP": scanner[3], "SliceThickness": f"{spacing:.1f}",
                }
                files.append((image_id, encode_codes(hu, name), tags))
                archive.slices.append(SynthSlice(image_id, patient_id, study_uid, series_uid, z, labels, name,
                                                 hu if keep_hu else None))
    order = rng.permutation(len(files))  # files are written (and labeled) in random order
    label_rows = pd.DataFrame([archive.slices[i].labels for i in order],
                              index=[archive.slices[i].image_id for i in order])
    write_rsna_labels(label_rows, archive.labels_csv)
    _add_duplicate_rows(archive.labels_csv, rng)
    if zip_archive:
        archive.zip_path = os.path.join(out, "rsna-intracranial-hemorrhage-detection.zip")
        tmp_dir = os.path.join(out, ".synth-tmp")
        os.makedirs(tmp_dir, exist_ok=True)
        with zipfile.ZipFile(archive.zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
            for i in order:
                image_id, codes, tags = files[i]
                tmp = os.path.join(tmp_dir, f"{image_id}.dcm")
                write_dicom(tmp, codes, tags)
                zf.write(tmp, f"stage_2_train/{image_id}.dcm")
                os.unlink(tmp)
            zf.write(archive.labels_csv, "stage_2_train.csv")
        os.rmdir(tmp_dir)
    else:
        for i in order:
            image_id, codes, tags = files[i]
            write_dicom(os.path.join(images_dir, f"{image_id}.dcm"), codes, tags)
    return archive


def _add_duplicate_rows(path: str, rng: np.random.Generator) -> None:
    """Repeat one image's six rows, as the stage-1 CSV does (``ID_a64d5deed`` and others)."""
    rows = pd.read_csv(path, dtype=str)
    if len(rows) >= 12:
        start = 6 * int(rng.integers(0, len(rows) // 6))
        rows = pd.concat([rows, rows.iloc[start : start + 6]], ignore_index=True)
        rows.to_csv(path, index=False)


def write_distinct_slices(out_dir: str, n: int, seed: int = 0, rows: int = 512, base: int = 16) -> list[str]:
    """``n`` RSNA-size slices (``ID_<hex>.dcm``), each file distinct: ``base`` phantoms, then a noise
    field of its own per file, RSNA's encodings in turn (12/16 bit, signed/unsigned, the 12-bit
    wrap). For benchmarks that read thousands of files from disk (page-cache and CPU-cache
    behaviour of distinct content, not of hard links to a few files). Returns the paths."""
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    phantoms = [head_phantom(rows, rows, rng.random(), {}, rng, random_anatomy(rng)).astype(np.int32)
                for _ in range(base)]
    paths = []
    for i in range(n):
        name, bits, signed, intercept = ENCODINGS[i % 4]
        hu = np.clip(phantoms[i % base] + rng.integers(-6, 7, size=(rows, rows)), AIR, 3000)
        image_id = f"ID_{seed:02x}{i:08x}"
        tags = {"SOPInstanceUID": image_id, "Modality": "CT", "PatientID": f"ID_p{i // 40:06d}",
                "StudyInstanceUID": f"ID_st{i // 40:06d}", "SeriesInstanceUID": f"ID_se{i // 40:06d}",
                "ImagePositionPatient": [-125.0, -125.0, float(i % 40) * 5.0], "BitsStored": bits,
                "PixelRepresentation": signed, "WindowCenter": 40, "WindowWidth": 80,
                "RescaleIntercept": intercept, "RescaleSlope": 1.0}
        paths.append(os.path.join(out_dir, f"{image_id}.dcm"))
        write_dicom(paths[-1], encode_codes(hu, name), tags)
    return paths


def write_synthetic_cache(out: str, images: int, size: int = 256, seed: int = 0, base: int = 64,
                          per_chunk: int = 1024, slices_per_patient: int = 40) -> str:
    """A finished cache of ``images`` distinct 3-window slices, written without DICOM: ``base``
    windowed phantoms, each image with noise of its own, in the job's chunk format and finalised
    by the job's own assembly (manifest, splits, metadata). For benchmarks that need tens of
    thousands of distinct cached slices (the loader's feed rate, random read-back); 20,000 slices
    at 256 px are 3.9 GB."""
    from . import cache as cache_io
    from .assembly import check_or_write_job, finalize_cache, job_record
    from .config import PreprocessConfig
    from .windowing import apply_windows, parse_windows, to_uint8

    rng = np.random.default_rng(seed)
    windows = parse_windows("brain,subdural,bone")
    bases = [to_uint8(apply_windows(head_phantom(size, size, rng.random(), {}, rng, random_anatomy(rng)), windows))
             for _ in range(base)]
    config = PreprocessConfig(input=out, out=out, size=size, files_per_shard=per_chunk, workers=1,
                              split_fractions={"unsupervised": 1.0})
    parts = os.path.join(out, cache_io.PARTS)
    os.makedirs(parts, exist_ok=True)
    check_or_write_job(parts, job_record(config, images, f"synthetic-{images}-{size}-{seed}"))
    for chunk, start in enumerate(range(0, images, per_chunk)):
        count = min(per_chunk, images - start)
        pixels = np.stack([bases[(start + k) % base] for k in range(count)]).astype(np.int16)
        pixels += rng.integers(-3, 4, size=pixels.shape, dtype=np.int16)
        records = [{"image_id": f"ID_c{seed:02x}{start + k:08x}", "patient_id": f"ID_p{(start + k) // slices_per_patient}",
                    "study_uid": f"ID_st{(start + k) // slices_per_patient}",
                    "series_uid": f"ID_se{(start + k) // slices_per_patient}",
                    "z": float((start + k) % slices_per_patient), "source": f"synthetic/{start + k}"}
                   for k in range(count)]
        cache_io.write_chunk(parts, chunk, np.clip(pixels, 0, 255).astype(np.uint8), records, [])
    finalize_cache(out)
    return out
