"""A medmoco model as a MONAI bundle (MONAI's ``docs/source/mb_specification.rst``).

:func:`export_bundle` writes::

    DIR/configs/metadata.json         the spec's keys, the model's preprocessing, its registry record (.metadata)
    DIR/configs/metadata_schema.json  a schema of the spec's required keys: verify_metadata offline (.metadata)
    DIR/configs/inference.json        a folder of DICOM slices -> predictions.csv (`python -m monai.bundle run`)
    DIR/models/model.pt               state dict of ``network_def`` (:class:`.network.BundleClassifier`)
    DIR/models/model.ts               the same network in TorchScript, metadata embedded
    DIR/docs/README.md                the model card (.model_card)
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

SLICE_BATCH = 64  # slices per forward pass of a slice model (a series model takes each series whole)


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

    from .metadata import SCHEMA_FILE, bundle_metadata, metadata_schema
    from .model_card import LICENSE, model_card
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
        uri = model if model.startswith("runs:/") else os.path.abspath(path)
        record = {"registered": False, "model_uri": uri,
                  "note": "unregistered: no registry record, no recorded digests; the file's own sha256 identifies it"}
        if model.startswith("runs:/"):
            record["run_id"] = model[len("runs:/"):].split("/")[0]
    record["model_file_sha256"] = sha256_file(path)
    recorded = record.get("files_sha256")
    if recorded and record["model_file_sha256"] not in recorded.values():
        raise IntegrityError(f"{record['model_uri']}: the fetched model.pt (sha256 {record['model_file_sha256'][:12]}"
                             "...) is not among the version's recorded files; refusing to export it")
    return path, record


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



def _write_json(path: str, value) -> None:
    with open(path, "w") as handle:
        json.dump(value, handle, indent=2)
        handle.write("\n")
