"""One resolver for a model reference, and what every user of a model does with it."""
from __future__ import annotations

import os

from dicom_preprocess.config import ConfigError


def resolve_model(spec: str, tracking_uri: str = "") -> str:
    """A local ``model.pt`` for a path, a folder holding one, ``runs:/ID`` or ``models:/...`` URI.

    A ``models:/`` version is fetched whole and its files are checked against the sha256 digests
    recorded at registration or release (:func:`medmoco.registry.integrity.fetch_version`) before
    anything in it is loaded.

    Raises:
        ConfigError: when nothing loadable is found.
        medmoco.registry.integrity.IntegrityError: a file of a registered version differs from its record.
    """
    if os.path.isfile(spec):
        return spec
    if os.path.isdir(spec):
        for dirpath, _, files in os.walk(spec):
            if "model.pt" in files:
                return os.path.join(dirpath, "model.pt")
    if spec.startswith("models:/"):
        from medmoco.registry.integrity import fetch_version

        return fetch_version(spec, tracking_uri).model_file
    if spec.startswith("runs:/"):
        from medmoco.tracking import fetch_artifact

        try:
            return fetch_artifact(spec, "model.pt", "model/model.pt", tracking_uri)
        except LookupError as err:
            raise ConfigError(f"model {spec}: {err}") from None
    raise ConfigError(f"model {spec}: no model.pt found (a `medmoco finetune` model.pt, runs:/ID or models:/NAME@ALIAS)")


def preprocess_like_model(info: dict, input_path: str, out_dir: str, workers: int = 1):
    """Run the preprocessing recorded in the model (windows, mode, size) on raw DICOMs -> a cache."""
    from dicom_preprocess.config import PreprocessConfig
    from dicom_preprocess.job import run_preprocess

    pre = info["preprocess"]
    windows = [{"name": w["name"], "center": w["center"], "width": w["width"]} for w in pre["windows"]]
    config = PreprocessConfig(input=input_path, out=out_dir, size=int(pre["size"]), windows=windows,
                              window_mode=pre.get("window_mode", "linear"), workers=workers,
                              split_fractions={"unsupervised": 1.0},
                              modalities=list(pre.get("modalities", ["CT"])))
    return run_preprocess(config, progress=False)


def write_submission(image_ids, probs, path: str) -> str:
    """Kaggle format: ``ID,Label``, six rows per image (``ID_<image>_<subtype>``), probabilities in [0, 1]
    with nine significant digits (enough to keep every float32 probability distinct; six decimals
    turned the 1e-6 probabilities of a fine-tuned model into ties)."""
    import numpy as np

    from dicom_preprocess.labels import write_long_format
    from medmoco.predictions import SUBMISSION_FORMAT

    return write_long_format(image_ids, np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0), path,
                             SUBMISSION_FORMAT)
