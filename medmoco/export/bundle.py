"""A medmoco model as a MONAI bundle (MONAI's ``docs/source/mb_specification.rst``).

:func:`export_bundle` writes::

    DIR/configs/metadata.json         the spec's keys, the model's preprocessing and its registry record
    DIR/configs/metadata_schema.json  a JSON schema of the spec's required keys (verify_metadata offline)
    DIR/configs/inference.json        folder of DICOM slices -> predictions.csv (`python -m monai.bundle run`)
    DIR/models/model.pt               state dict of ``network_def`` (:class:`medmoco.export.network.BundleClassifier`)
    DIR/models/model.ts               the same network in TorchScript, metadata embedded
    DIR/docs/README.md                the model card
    DIR/LICENSE

The bundle's code is medmoco's (``network_def``, the DICOM reading, the output file): a site runs
it with medmoco installed, at the version ``required_packages_version`` names. Its inference
reads a folder of DICOM slices with the model's own recorded preprocessing
(:class:`medmoco.transforms.dicom.EncodeDicomd`), then MONAI's ``ScaleIntensityRanged`` and
``Resized`` (what :func:`medmoco.transforms.supervised.prepare_images` does), so that it writes the
probabilities `medmoco predict` writes for the same folder.

The model is resolved by :func:`medmoco.inference.resolve_model`; a ``models:/`` alias is pinned to
its version first and the version's files are checked against their recorded sha256 before
anything is loaded (:func:`medmoco.registry.history.version_provenance`). Nothing here imports
MLflow unless the model is a ``models:/`` or ``runs:/`` URI.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

from dicom_preprocess.config import ConfigError

log = logging.getLogger("medmoco.export.bundle")

SCHEMA_FILE = "metadata_schema.json"
# `verify_metadata` reads the schema from --filepath when that file exists, and downloads the
# `schema` URL only when it does not: this relative name says where the file is in the bundle.
SCHEMA_REF = f"configs/{SCHEMA_FILE}"
SLICE_BATCH = 64  # slices per forward pass of a slice model (a series model takes each series whole)
AUTHORS = "the medmoco maintainers"
INTENDED_USE = ("Research only. Not a medical device: not for diagnosis, triage or any clinical decision, "
                "and not validated on any site's data.")
# What the bundle's code needs beyond MONAI, torch and numpy (the specification's
# required_packages_version), and what only some inputs need (optional_packages_version: the
# decoders of compressed DICOM, dicom_preprocess.decoders; RSNA's files are uncompressed). MONAI
# 1.6's config parser still reads the second name as a deprecated spelling of the first
# (bundle/utils.py DEPRECATED_ID_MAPPING) and warns; the specification keeps both.
REQUIRED_PACKAGES = ("medmoco", "pydicom", "pytorch-ignite", "pandas", "numba")
OPTIONAL_PACKAGES = ("imagecodecs", "python-gdcm", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg",
                     "pylibjpeg-rle", "pyjpegls", "SimpleITK")
META_KEYS = ("epoch", "label_fraction", "label_unit", "selected_on", "val_auc_mean", "val_score", "finetune_run_id",
             "pretrain_run_id")


def export_bundle(model: str, out: str, tracking_uri: str = "") -> dict:
    """Write the MONAI bundle of a medmoco model into the new folder ``out``.

    Args:
        model: a ``model.pt``, ``runs:/ID``, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.
        out: the bundle folder; it must not exist or be empty.

    Returns:
        ``{"out", "model_uri", "registered", "series", "torchscript", "files": {path: sha256}}``.

    Raises:
        ConfigError: ``out`` holds files, or the model cannot be resolved or is not a medmoco model.
        medmoco.registry.integrity.IntegrityError: a registered file or promotion record differs
            from its recorded digest.
    """
    from medmoco.models import load_classifier
    from medmoco.registry.integrity import sha256_file

    from .network import bundle_network

    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"--out {out}: exists and is not an empty folder; choose a new folder")
    path, record = resolve_with_record(model, tracking_uri)
    try:
        medmoco_model, info = load_classifier(path)
    except ValueError as err:
        raise ConfigError(f"model {model}: {err}") from None
    network = bundle_network(medmoco_model, info)
    work = os.path.abspath(out).rstrip(os.sep) + f".partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    for sub in ("configs", "models", "docs"):
        os.makedirs(os.path.join(work, sub))
    try:
        import torch

        torch.save(network.state_dict(), os.path.join(work, "models", "model.pt"))
        metadata = bundle_metadata(info, record)
        torchscript = _save_torchscript(network, info, metadata, os.path.join(work, "models", "model.ts"))
        files = {f"models/{name}": sha256_file(os.path.join(work, "models", name))
                 for name in sorted(os.listdir(os.path.join(work, "models")))}
        metadata["bundle_files_sha256"] = files
        metadata["torchscript"] = torchscript
        _write_json(os.path.join(work, "configs", "metadata.json"), metadata)
        _write_json(os.path.join(work, "configs", SCHEMA_FILE), metadata_schema())
        _write_json(os.path.join(work, "configs", "inference.json"), inference_config(info))
        with open(os.path.join(work, "docs", "README.md"), "w") as handle:
            handle.write(model_card(info, metadata))
        with open(os.path.join(work, "LICENSE"), "w") as handle:
            handle.write(LICENSE)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {"out": out, "model_uri": record["model_uri"], "registered": record["registered"],
            "series": bool(info.get("series")), "torchscript": torchscript["written"], "files": files}


def resolve_with_record(model: str, tracking_uri: str = "") -> tuple[str, dict]:
    """(local model.pt, what is known of where it comes from).

    A ``models:/`` reference is described by the registry (:func:`~medmoco.registry.history.version_provenance`)
    and fetched pinned to that version; any other reference is unregistered: its record is the
    file's sha256 (and the run, for ``runs:/``).
    """
    from medmoco.inference import resolve_model
    from medmoco.registry.integrity import IntegrityError, sha256_file

    if model.startswith("models:/"):
        from medmoco.registry.history import version_provenance

        record = {"registered": True, **version_provenance(model, tracking_uri)}
        path = resolve_model(record["model_uri"], tracking_uri)  # downloads it whole and checks every digest
    else:
        path = resolve_model(model, tracking_uri)
        record = {"registered": False, "model_uri": model if "://" in model or ":/" in model else os.path.abspath(path),
                  "note": "unregistered: no registry record, no recorded digests; the file's own sha256 identifies it"}
        if model.startswith("runs:/"):
            record["run_id"] = model[len("runs:/"):].split("/")[0]
    record["model_file_sha256"] = sha256_file(path)
    recorded = record.get("files_sha256")
    if recorded and record["model_file_sha256"] not in recorded.values():
        raise IntegrityError(f"{record['model_uri']}: the fetched model.pt (sha256 {record['model_file_sha256'][:12]}...) "
                             "is not among the version's recorded files; refusing to export it")
    return path, record


# --- metadata ---------------------------------------------------------------------------------

def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _window_label(window: dict) -> str:
    return f"{window['name']} window {window['center']:g}/{window['width']:g} HU (center/width)"


def channel_names(info: dict) -> list[str]:
    """What each input channel holds: the windows of slice s, or of slices s-k .. s+k (2.5D)."""
    windows = [_window_label(w) for w in info["preprocess"]["windows"]]
    context = int(info["context"])
    if context == 0:
        return windows
    return [f"slice s{offset:+d}: {w}" if offset else f"slice s: {w}" for offset in range(-context, context + 1)
            for w in windows]


def network_data_format(info: dict) -> dict:
    """The spec's description of ``image`` (the network's input) and ``pred`` (its output)."""
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
    """``N.0.0`` for registered version N; ``0.0.0+<sha256 prefix>`` for an unregistered file."""
    if record["registered"]:
        return f"{record['version']}.0.0"
    return f"0.0.0+sha256.{record['model_file_sha256'][:12]}"


def bundle_metadata(info: dict, record: dict) -> dict:
    """``configs/metadata.json``: the spec's keys, then medmoco's (the model and its registry record)."""
    import monai
    import numpy
    import torch

    from medmoco.registry.candidates import source_commit

    from .network import network_args

    kind = "series model (GRU head over a series' slices)" if info.get("series") else "slice model"
    windows = ", ".join(_window_label(w) for w in info["preprocess"]["windows"])
    if record["registered"]:
        origin = f"{record['registered_model']} version {record['version']} of the medmoco registry"
        if record.get("promotion"):
            p = record["promotion"]
            origin += (f", released by {p.get('promoted_by')} on {p.get('promoted_at')} (decision: "
                       f"{p.get('decision')})")
    else:
        origin = f"an unregistered model file (sha256 {record['model_file_sha256'][:12]}...)"
    version = bundle_version(record)
    return {
        "schema": SCHEMA_REF,
        "version": version,
        "changelog": {version: f"exported from {origin}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {p: v for p in REQUIRED_PACKAGES if (v := _version(p))},
        "medmoco_source_commit": source_commit(),
        "optional_packages_version": {p: v for p in OPTIONAL_PACKAGES if (v := _version(p))},
        "name": f"medmoco RSNA intracranial hemorrhage {kind}",
        "task": "Intracranial hemorrhage subtypes on head CT slices (RSNA 2019): six multi-label probabilities",
        "description": (
            f"A medmoco {info['mode']} classifier ({info['arch']}, {kind}) that gives, for each axial head-CT slice, "
            "the probability of epidural, intraparenchymal, intraventricular, subarachnoid and subdural hemorrhage "
            f"and of any hemorrhage. Input: the slice's {windows}"
            + (f", with {info['context']} neighbouring slice(s) on each side as channels" if int(info["context"]) else "")
            + f", windowed to [0, 1] at {info['image_size']} px. From {origin}. The bundle's code is medmoco's: "
            "install medmoco (required_packages_version) to run it."),
        "authors": AUTHORS,
        "copyright": f"Copyright (c) {AUTHORS}",
        "intended_use": INTENDED_USE,
        "data_source": "RSNA Intracranial Hemorrhage Detection (Kaggle 2019) or data preprocessed the same way",
        "data_type": "dicom",
        "references": [
            "He K, Fan H, Wu Y, Xie S, Girshick R. Momentum Contrast for Unsupervised Visual Representation Learning. "
            "CVPR 2020. arXiv:1911.05722",
            "Flanders AE, et al. Construction of a Machine Learning Dataset through Collaboration: The RSNA 2019 Brain "
            "CT Hemorrhage Challenge. Radiology: Artificial Intelligence 2020;2(3):e190211",
        ],
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
    with the nine keys it requires of each input and output tensor; other keys are allowed, as
    the specification allows them."""
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
                     "required_packages_version", "optional_packages_version", "task", "description", "authors", "copyright",
                     "network_data_format"],
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


# --- inference config -------------------------------------------------------------------------

def inference_config(info: dict) -> dict:
    """``configs/inference.json``: ``dataset_dir`` (a folder of DICOM slices) -> ``output_dir/predictions.csv``."""
    from .network import network_args

    pre = info["preprocess"]
    native, size = int(pre["size"]), int(info["image_size"])
    windows = [{"name": w["name"], "center": w["center"], "width": w["width"]} for w in pre["windows"]]
    modalities = list(pre.get("modalities", ["CT"]))
    transforms = [
        # medmoco's reader and encoder (12-bit wrap fix, air padding, the cache's uint8 levels):
        # MONAI's loader and intensity transforms do not give these bytes (medmoco/transforms/dicom.py)
        {"_target_": "medmoco.transforms.dicom.EncodeDicomd", "keys": "image", "windows": windows,
         "window_mode": pre.get("window_mode", "linear"), "size": native, "modalities": modalities},
        # from here MONAI's own: x / 255 and the resize, as prepare_images does them
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0.0, "a_max": 255.0, "b_min": 0.0,
         "b_max": 1.0, "dtype": "$torch.float32"},
    ]
    if size != native:
        shrink = native > size
        transforms.append({"_target_": "Resized", "keys": "image", "spatial_size": [size, size],
                           "mode": "area" if shrink else "bilinear", **({} if shrink else {"align_corners": False})})
    transforms.append({"_target_": "EnsureTyped", "keys": "image", "data_type": "tensor", "track_meta": False})
    series = bool(info.get("series"))
    loader = {"_target_": "DataLoader", "dataset": "@dataset", "num_workers": 0}
    if series:
        loader["batch_sampler"] = "$series_batches(@datalist)"
    else:
        loader.update(batch_size=SLICE_BATCH, shuffle=False)
    return {
        # MONAI's config binds `from M import f` as `f` (an `import a.b` binds no name there)
        "imports": ["$from medmoco.data.dicom_folder import series_datalist",
                    "$from medmoco.data.dicom_folder import series_batches"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "medmoco.export.network.BundleClassifier", **network_args(info)},
        "network": "$@network_def.to(@device)",
        "datalist": f"$series_datalist(@dataset_dir, context={int(info['context'])}, "
                    f"modalities={modalities!r})",
        "preprocessing": {"_target_": "Compose", "transforms": transforms},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": loader,
        "inferer": {"_target_": "SimpleInferer"},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
             "load_dict": {"model": "@network"}, "map_location": "@device"},
            {"_target_": "medmoco.handlers.submission.SubmissionWriter", "output_dir": "@output_dir",
             "filename": "predictions.csv"},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "val_handlers": "@handlers", "amp": False},
        "initialize": [],
        "run": ["$@evaluator.run()"],
    }


# --- TorchScript --------------------------------------------------------------------------------

TORCHSCRIPT_TOLERANCE = 1e-5


def _save_torchscript(network, info: dict, metadata: dict, path: str) -> dict:
    """Script the network, check it against the eager one on a probe series, save it with MONAI's
    ``save_net_with_metadata`` (metadata.json embedded). A network that does not script is
    exported without ``model.ts`` (optional in the specification), saying why."""
    import torch
    from monai.data import save_net_with_metadata

    try:
        scripted = torch.jit.script(network)
    except Exception as err:  # TorchScript refuses some Python: the bundle is complete without it
        log.warning("model.ts not written: the network does not script (%s)", str(err)[:300])
        return {"written": False, "reason": f"torch.jit.script failed: {str(err)[:300]}"}
    generator = torch.Generator().manual_seed(0)
    probe = torch.rand(5, int(info["in_channels"]), int(info["image_size"]), int(info["image_size"]),
                       generator=generator)
    with torch.no_grad():
        difference = float((scripted(probe) - network(probe)).abs().max())
    if difference > TORCHSCRIPT_TOLERANCE:
        log.warning("model.ts not written: the scripted network differs from the eager one by %.3g", difference)
        return {"written": False, "reason": f"scripted output differs from eager by {difference:.3g}"}
    save_net_with_metadata(scripted, path, include_config_vals=False, meta_values=metadata)
    return {"written": True, "method": "torch.jit.script", "checked_max_abs_difference": difference,
            "input": "(slices, channels, H, W) float32 in [0, 1]" + (", one series in order" if info.get("series")
                                                                   else "")}


# --- documents ----------------------------------------------------------------------------------

def _write_json(path: str, value) -> None:
    with open(path, "w") as handle:
        json.dump(value, handle, indent=2)
        handle.write("\n")


def _registry_lines(record: dict) -> list[str]:
    if not record["registered"]:
        lines = [f"- **Unregistered model file**: no registry record and no recorded digests.",
                 f"- Source: `{record['model_uri']}`", f"- model.pt sha256: `{record['model_file_sha256']}`"]
        if record.get("run_id"):
            lines.append(f"- MLflow run: `{record['run_id']}`")
        return lines
    lines = [f"- Registered model `{record['registered_model']}`, version {record['version']} "
             f"(`{record['model_uri']}`, requested as `{record['requested_uri']}`)",
             f"- Aliases: {', '.join(record['aliases']) or 'none'}",
             f"- model.pt sha256: `{record['model_file_sha256']}`"]
    digests = record.get("files_sha256")
    if digests:
        lines.append(f"- Every registered file was checked against its recorded sha256 before export "
                     f"({len(digests)} files; `configs/metadata.json` lists them under `registry.files_sha256`).")
    else:
        lines.append("- **The version has no recorded digests** (made outside medmoco): its files were not verified.")
    promotion = record.get("promotion")
    if promotion:
        ci = promotion.get("delta_ci")
        delta = (f"mean AUC difference {promotion['delta_auc_mean']:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}] against the "
                 f"previous holder on split `{promotion.get('split')}`" if promotion.get("delta_auc_mean") is not None
                 and ci else "no previous holder: nothing compared")
        lines += [f"- Released as `{promotion.get('alias')}` by {promotion.get('promoted_by')} on "
                  f"{promotion.get('promoted_at')}: {promotion.get('decision')}"
                  + (" (**forced**: " + "; ".join(promotion.get("forced_because") or []) + f" {promotion.get('reason')})"
                     if promotion.get("forced") else ""),
                  f"- From candidate `{promotion['candidate']['registered_model']}` version "
                  f"{promotion['candidate']['version']}; {delta}; margin {promotion.get('margin')}",
                  f"- Promotion record {promotion.get('sequence')} of the release history, sha256 "
                  f"`{record['promotion_sha256']}` (checked against the version's tag; `registry.promotion` in the metadata)"]
    else:
        lines.append("- Not released through a medmoco promotion (a candidate or a version without a promotion "
                     "record): no comparison backs it.")
    return lines


def model_card(info: dict, metadata: dict) -> str:
    """``docs/README.md``: task, input and preprocessing, the network, the registry record, use."""
    from dicom_preprocess import SUBTYPES

    pre = info["preprocess"]
    series = info.get("series")
    fmt = metadata["network_data_format"]
    size, native = int(info["image_size"]), int(pre["size"])
    windows = "; ".join(_window_label(w) for w in pre["windows"])
    head = (f"a bidirectional GRU series head (hidden {series.get('hidden')}, {series.get('layers', 1)} layer(s)"
            f"{', left-right flip averaged embeddings' if series.get('flip_tta') else ''}) over the backbone's slice "
            "embeddings of a whole series, answering each slice in the context of its series" if series
            else "one linear layer to six logits")
    points = (info.get("operating_points") or {}).get("thresholds")
    threshold_text = (", ".join(f"{c} {points[c]:.4g}" for c in SUBTYPES if c in points) if points else "none recorded")
    ts = metadata["torchscript"]
    return f"""# {metadata['name']}

**Intended use: {INTENDED_USE}**

## Task
For each axial head-CT slice, six probabilities: {', '.join(SUBTYPES)} (multi-label, sigmoid; `any` = any
hemorrhage). Kaggle RSNA Intracranial Hemorrhage Detection (2019) task and output format.

## Input and preprocessing
`python -m monai.bundle run` reads `dataset_dir`, a folder of DICOM slices (searched recursively), and does
what the model's training data went through (`configs/inference.json`):

1. every file is read with medmoco's reader: HU = stored value x RescaleSlope + RescaleIntercept, with the
   RSNA 12-bit wrap fix (BitsStored 12, unsigned, intercept > -100: codes are HU modulo 4096); Modality
   {', '.join(pre.get('modalities', ['CT']))} only; files that are not usable slices are skipped with a warning;
2. slices are grouped by StudyInstanceUID and SeriesInstanceUID and ordered along the series
   (ImagePositionPatient[2], ties by SOPInstanceUID){f'; each slice takes {info["context"]} neighbour(s) on each side as channels (clamped at the series ends)' if int(info['context']) else ''};
3. windows ({pre.get('window_mode', 'linear')}): {windows}; a non-square slice is padded to square with air
   (-1024 HU); the square is resized to {native} px (area averaging) and stored as round(255 x value), as in
   medmoco's cache (`medmoco.transforms.dicom.EncodeDicomd`);
4. / 255 (MONAI `ScaleIntensityRanged`){f', resized to {size} px (MONAI `Resized`, {"area" if native > size else "bilinear"})' if size != native else ''}:
   `image` is float32 (N, {fmt['inputs']['image']['num_channels']}, {size}, {size}) in [0, 1].

## Network
`medmoco.export.network.BundleClassifier` ({info['arch']} backbone from MONAI's networks, {info['mode']};
{head}), ending in the sigmoid: `pred` is (N, 6) probabilities.
{'A series model: the batch is ONE series in slice order; the inference config batches series by series.' if series else 'A slice model: slices are independent.'}
`models/model.pt` is its state dict; `models/model.ts` {'is the same network in TorchScript (checked equal on a probe at export), with metadata.json embedded' if ts['written'] else 'was not written: ' + ts['reason']}.
Operating points chosen on validation (per-class thresholds): {threshold_text}.

## Where it comes from
{chr(10).join(_registry_lines(metadata['registry']))}

## Use
```bash
# the bundle's code (network, DICOM reading, output) is medmoco's: install medmoco {metadata['required_packages_version'].get('medmoco', '')}
# (commit {metadata['medmoco_source_commit'][:12]}), e.g. `pip install -e .` in a medmoco checkout, and the packages of required_packages_version
python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath configs/{SCHEMA_FILE}
python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json --config_file configs/inference.json
python -m monai.bundle run --config_file configs/inference.json --bundle_root . --dataset_dir SERIES_DIR --output_dir OUT
```
`OUT/predictions.csv` is `ID,Label` with six rows `ID_<image>_<subtype>` per slice, the probabilities
`medmoco predict --model ... --input SERIES_DIR` gives (within float rounding).

## Limitations
- Trained and checked on RSNA 2019 data only; nothing here says how it does on another site's scanners,
  protocols or population.
- Slice-level output only{'; the series head also has an exam-level output, which `medmoco predict --series-out` gives and this bundle does not' if series else ''}.
- Compressed DICOM needs the optional decoders (`optional_packages_version`).

## License
See `LICENSE`.
"""


LICENSE = """The code this bundle runs (medmoco) is licensed under the Apache License, Version 2.0:
https://www.apache.org/licenses/LICENSE-2.0

The weights were trained on the RSNA Intracranial Hemorrhage Detection data (Kaggle 2019). The
terms under which RSNA published those data govern what models trained on them may be used for:
read them before any use beyond non-commercial research.

Research only: not a medical device, not for clinical use. THE BUNDLE IS PROVIDED "AS IS", WITHOUT
WARRANTY OF ANY KIND.
"""
