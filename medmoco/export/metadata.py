"""A bundle's ``configs/metadata.json`` and the JSON schema it is verified against.

The keys are those of MONAI's bundle specification (``docs/source/mb_specification.rst``): version,
the MONAI, PyTorch and NumPy versions, the packages the bundle needs, task, description, authors,
copyright, intended use and ``network_data_format`` (``image`` in, ``pred`` out, the names
``verify_net_in_out`` reads). Then medmoco's own: the model file's settings and preprocessing
(``medmoco_model``) and where it comes from (``registry``: the registry's record, checked, or the
sha256 of an unregistered file).

:func:`metadata_schema` is written here from the specification's required keys, so that
``python -m monai.bundle verify_metadata --filepath configs/metadata_schema.json`` needs no
network: MONAI downloads the ``schema`` URL only when that file does not exist.
"""
from __future__ import annotations

SCHEMA_FILE = "metadata_schema.json"
SCHEMA_REF = f"configs/{SCHEMA_FILE}"  # the bundle's own file: no URL to fetch
AUTHORS = "the medmoco maintainers"
INTENDED_USE = ("Research only. Not a medical device: not for diagnosis, triage or any clinical decision, "
                "and not validated on any site's data.")
# What the bundle's code needs beyond MONAI, torch and numpy (the specification's
# required_packages_version), and what only some inputs need (optional_packages_version: the
# decoders of compressed DICOM, dicom_preprocess.decoders; RSNA's files are uncompressed). MONAI
# 1.6's config parser still reads the second name as a deprecated spelling of the first
# (bundle/utils.py DEPRECATED_ID_MAPPING) and warns; the specification and MONAI's own schema
# (monai/bundle/meta_schema.json) keep both.
REQUIRED_PACKAGES = ("medmoco", "pydicom", "pytorch-ignite", "pandas", "numba")
OPTIONAL_PACKAGES = ("imagecodecs", "python-gdcm", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg",
                     "pylibjpeg-rle", "pyjpegls", "SimpleITK")
META_KEYS = ("epoch", "label_fraction", "label_unit", "selected_on", "val_auc_mean", "val_score", "finetune_run_id",
             "pretrain_run_id")
REFERENCES = (
    "He K, Fan H, Wu Y, Xie S, Girshick R. Momentum Contrast for Unsupervised Visual Representation Learning. "
    "CVPR 2020. arXiv:1911.05722",
    "Flanders AE, et al. Construction of a Machine Learning Dataset through Collaboration: The RSNA 2019 Brain "
    "CT Hemorrhage Challenge. Radiology: Artificial Intelligence 2020;2(3):e190211",
)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def window_label(window: dict) -> str:
    return f"{window['name']} window {window['center']:g}/{window['width']:g} HU (center/width)"


def channel_names(info: dict) -> list[str]:
    """What each input channel holds: the windows of slice s, or of slices s-k .. s+k (2.5D)."""
    windows = [window_label(w) for w in info["preprocess"]["windows"]]
    context = int(info["context"])
    if context == 0:
        return windows
    return [f"slice s{offset:+d}: {w}" if offset else f"slice s: {w}" for offset in range(-context, context + 1)
            for w in windows]


def network_data_format(info: dict) -> dict:
    """The specification's description of ``image`` (the network's input) and ``pred`` (its output).

    Raises:
        ValueError: when the model's channels are not its windows x (2 context + 1) slices.
    """
    from dicom_preprocess import SUBTYPES

    size = int(info["image_size"])
    names = channel_names(info)
    if len(names) != int(info["in_channels"]):
        raise ValueError(f"model file: {info['in_channels']} input channels, but its windows and context give "
                         f"{len(names)}")
    batch = ("the slices of ONE series in slice order (the series head reads the sequence)" if info.get("series")
             else "independent slices")
    return {
        "inputs": {"image": {
            "type": "image", "format": "hounsfield", "modality": "CT", "num_channels": len(names),
            "spatial_shape": [size, size], "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
            "channel_def": {str(i): name for i, name in enumerate(names)},
            "batch_dimension": batch,
        }},
        "outputs": {"pred": {
            "type": "probabilities", "format": "classes", "modality": "n/a", "num_channels": len(SUBTYPES),
            "spatial_shape": [len(SUBTYPES)], "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
            "channel_def": {str(i): name for i, name in enumerate(SUBTYPES)},
        }},
    }


def bundle_version(record: dict) -> str:
    """``N.0.0`` for registered version N; ``0.0.0+sha256.<prefix>`` for an unregistered file."""
    if record["registered"]:
        return f"{record['version']}.0.0"
    return f"0.0.0+sha256.{record['model_file_sha256'][:12]}"


def origin(record: dict) -> str:
    """Where the model comes from, in a phrase."""
    if not record["registered"]:
        return f"an unregistered model file (sha256 {record['model_file_sha256'][:12]}...)"
    text = f"{record['registered_model']} version {record['version']} of the medmoco registry"
    promotion = record.get("promotion")
    if promotion:
        text += (f", released by {promotion.get('promoted_by')} on {promotion.get('promoted_at')} (decision: "
                 f"{promotion.get('decision')})")
    return text


def bundle_metadata(info: dict, record: dict) -> dict:
    """``configs/metadata.json`` of the model ``info`` (``load_classifier``'s) and its ``record``."""
    import monai
    import numpy
    import torch

    from medmoco.registry.candidates import source_commit

    from .network import network_args

    kind = "series model (GRU head over a series' slices)" if info.get("series") else "slice model"
    windows = ", ".join(window_label(w) for w in info["preprocess"]["windows"])
    context = (f", with {info['context']} neighbouring slice(s) on each side as channels" if int(info["context"])
               else "")
    version = bundle_version(record)
    return {
        "schema": SCHEMA_REF,
        "version": version,
        "changelog": {version: f"exported from {origin(record)}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {p: v for p in REQUIRED_PACKAGES if (v := _version(p))},
        "optional_packages_version": {p: v for p in OPTIONAL_PACKAGES if (v := _version(p))},
        "medmoco_source_commit": source_commit(),
        "name": f"medmoco RSNA intracranial hemorrhage {kind}",
        "task": "Intracranial hemorrhage subtypes on head CT slices (RSNA 2019): six multi-label probabilities",
        "description": (
            f"A medmoco {info['mode']} classifier ({info['arch']}, {kind}) that gives, for each axial head-CT slice, "
            "the probability of epidural, intraparenchymal, intraventricular, subarachnoid and subdural hemorrhage "
            f"and of any hemorrhage. Input: the slice's {windows}{context}, windowed to [0, 1] at "
            f"{info['image_size']} px. From {origin(record)}. The bundle's code is medmoco's: install medmoco "
            "(required_packages_version) to run it."),
        "authors": AUTHORS,
        "copyright": f"Copyright (c) {AUTHORS}",
        "intended_use": INTENDED_USE,
        "data_source": "RSNA Intracranial Hemorrhage Detection (Kaggle 2019) or data preprocessed the same way",
        "data_type": "dicom",
        "references": list(REFERENCES),
        "network_data_format": network_data_format(info),
        "medmoco_model": {
            "format": info["format"], "arch": info["arch"], "mode": info["mode"], "context": int(info["context"]),
            "image_size": int(info["image_size"]), "classes": list(info["classes"]), "preprocess": info["preprocess"],
            "series": info.get("series"), "operating_points": info.get("operating_points"),
            "meta": {k: info["meta"][k] for k in META_KEYS if k in (info.get("meta") or {})},
            "network_def": {"_target_": "medmoco.export.network.BundleClassifier", **network_args(info)},
        },
        "registry": record,
    }


def metadata_schema() -> dict:
    """A JSON schema (draft 7) of the keys MONAI's bundle specification requires of metadata.json,
    and of the nine it requires of each input and output tensor; other keys are allowed, as the
    specification allows them."""
    tensor = {
        "type": "object",
        "required": ["type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range",
                     "is_patch_data", "channel_def"],
        "properties": {
            "type": {"type": "string", "minLength": 1},
            "format": {"type": "string", "minLength": 1},
            "modality": {"type": "string", "minLength": 1},
            "num_channels": {"type": "integer", "minimum": 1},
            "spatial_shape": {"type": "array", "items": {"anyOf": [{"type": "integer", "minimum": 1},
                                                                   {"type": "string", "minLength": 1}]}},
            "dtype": {"type": "string", "pattern": "^(float|int|uint|bool|complex)[0-9]*$"},
            "value_range": {"type": "array", "items": {"type": "number"}, "maxItems": 2},
            "is_patch_data": {"type": "boolean"},
            "channel_def": {"type": "object", "minProperties": 1, "propertyNames": {"pattern": "^[0-9]+$"},
                            "additionalProperties": {"type": "string"}},
        },
    }
    versions = {"type": "object", "additionalProperties": {"type": "string"}}
    text = {"type": "string", "minLength": 1}
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "MONAI bundle metadata.json (the required keys of MONAI's bundle specification)",
        "type": "object",
        "required": ["schema", "version", "monai_version", "pytorch_version", "numpy_version",
                     "required_packages_version", "optional_packages_version", "task", "description", "authors",
                     "copyright", "network_data_format"],
        "properties": {
            "schema": text, "version": text, "monai_version": text, "pytorch_version": text, "numpy_version": text,
            "optional_packages_version": versions, "required_packages_version": versions,
            "task": text, "description": text, "authors": text, "copyright": text,
            "changelog": {"type": "object", "additionalProperties": {"type": "string"}},
            "intended_use": text, "data_source": text, "data_type": text,
            "references": {"type": "array", "items": {"type": "string"}},
            "network_data_format": {
                "type": "object", "required": ["inputs", "outputs"],
                "properties": {"inputs": {"type": "object", "minProperties": 1, "additionalProperties": tensor},
                               "outputs": {"type": "object", "minProperties": 1, "additionalProperties": tensor}},
            },
        },
    }
