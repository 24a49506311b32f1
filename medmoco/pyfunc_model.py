"""The registered MLflow model, as MLflow "models from code" (no pickle: loading it needs no
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION``; the weights are a state dict in ``model.pt``).

Input, one row per image, either
  * a DataFrame with one of the columns
      ``dicom``  DICOM bytes (over REST: base64 of the file),
      ``path``   a DICOM file path readable by the server,
      ``tensor`` an already-windowed uint8 (C, H, W) array as ``.npy`` bytes (REST: base64);
  * or a list / Series of DICOM paths (``model.predict(["a.dcm", "b.dcm"])``) or of DICOM bytes.
A frame with none of the three columns is refused with an error that names them.
Output: a DataFrame with the six subtype probabilities per row (epidural .. any).

A series model (a series head over the slices' embeddings) reads each slice in its series: the
rows of one call are grouped by study and SeriesInstanceUID (``dicom``/``path`` rows; ``tensor``
rows are taken as one series in the given order), each series is ordered along its slices and
predicted whole, and the probabilities come back in input order.

The registered signature declares the outputs only. With an input schema of three optional
columns, MLflow turns a list of paths into a frame with a column ``0``, drops it as unknown with a
warning, and the model received no rows: an empty prediction instead of an error. The inputs are
therefore checked here, where the error can say what is accepted; the model card documents them.
"""
from __future__ import annotations

import base64
import io
import os

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

COLUMNS = {"dicom": "DICOM bytes (base64 over REST)", "path": "a DICOM file path",
           "tensor": "a uint8 C x H x W .npy array as bytes (base64 over REST)"}


def _as_bytes(value) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return base64.b64decode(value)
    raise ValueError(f"expected bytes or a base64 string, got {type(value).__name__}")


def as_frame(model_input) -> pd.DataFrame:
    """The input as a frame with one of :data:`COLUMNS`.

    Raises:
        ValueError: naming the accepted columns, for a frame without any of them or an input of
            another kind.
    """
    accepted = "; ".join(f"{name}: {what}" for name, what in COLUMNS.items())
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if isinstance(model_input, pd.DataFrame):
        if not set(COLUMNS) & set(map(str, model_input.columns)):
            raise ValueError(f"input columns {list(model_input.columns)}: none of the accepted columns ({accepted}); "
                             "or give a list of DICOM paths")
        return model_input
    if isinstance(model_input, (list, tuple, pd.Series, np.ndarray)):
        items = list(model_input)
        if all(isinstance(item, (bytes, bytearray)) for item in items):
            return pd.DataFrame({"dicom": items})
        if all(isinstance(item, str) for item in items):
            return pd.DataFrame({"path": items})
    raise ValueError(f"input of type {type(model_input).__name__}: give a list of DICOM paths, or a DataFrame with "
                     f"one of the columns ({accepted})")


class MedmocoClassifier(PythonModel):
    def load_context(self, context) -> None:
        from medmoco.serving import ClassifierPredictor

        weights = context.artifacts["weights"]
        expected = (context.model_config or {}).get("weights_sha256")
        if expected:  # recorded at registration (medmoco.registry.candidates); older models have none
            from medmoco.registry.integrity import IntegrityError, sha256_file

            found = sha256_file(weights)
            if found != expected:
                raise IntegrityError(f"{os.path.basename(weights)}: sha256 {found[:12]}... differs from the "
                                     f"{expected[:12]}... recorded in MLmodel; refusing to load the weights")
        self.predictor = ClassifierPredictor(weights)

    # Type hints: without them MLflow warns twice per registration; a DataFrame hint infers no
    # signature (the registered one declares the outputs).
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from dicom_preprocess import SUBTYPES

        frame = as_frame(model_input)
        if self.predictor.is_series:
            return pd.DataFrame(self._predict_series(frame), columns=list(SUBTYPES))
        probs = np.zeros((len(frame), len(SUBTYPES)), dtype=np.float32)
        for i, row in enumerate(frame.to_dict("records")):
            if not _missing(row.get("tensor")):
                image = np.load(io.BytesIO(_as_bytes(row["tensor"])), allow_pickle=False)
                probs[i] = self.predictor.predict_tensors(image[None])[0]
            elif not _missing(row.get("dicom")):
                probs[i] = self.predictor.predict_dicoms([_as_bytes(row["dicom"])])[0]
            elif not _missing(row.get("path")):
                probs[i] = self.predictor.predict_dicoms([str(row["path"])])[0]
            else:
                raise ValueError(f"row {i}: give one of the columns {', '.join(COLUMNS)}")
        return pd.DataFrame(probs, columns=list(SUBTYPES))

    def _predict_series(self, frame: pd.DataFrame) -> np.ndarray:
        rows = frame.to_dict("records")
        if all(not _missing(row.get("tensor")) for row in rows):
            images = np.stack([np.load(io.BytesIO(_as_bytes(row["tensor"])), allow_pickle=False) for row in rows])
            return self.predictor.predict_series_tensors(images)[0]
        items = []
        for i, row in enumerate(rows):
            if not _missing(row.get("dicom")):
                items.append(_as_bytes(row["dicom"]))
            elif not _missing(row.get("path")):
                items.append(str(row["path"]))
            else:
                raise ValueError(f"row {i}: a series model takes DICOM rows (dicom or path) of whole series, "
                                 "or tensor rows of one series in order; not a mix")
        return self.predictor.predict_series_dicoms(items)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


mlflow.models.set_model(MedmocoClassifier())
