"""The registered MLflow model, as MLflow "models from code" (no pickle: loading it needs no
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION``; the weights are a state dict in ``model.pt``).

Input: a DataFrame with one row per image and one of the columns
  ``dicom``  DICOM bytes (over REST: base64 of the file),
  ``path``   a DICOM file path readable by the server,
  ``tensor`` an already-windowed uint8 (C, H, W) array as ``.npy`` bytes (REST: base64).
Output: a DataFrame with the six subtype probabilities per row (epidural .. any).
"""
from __future__ import annotations

import base64
import io

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


def _as_bytes(value) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return base64.b64decode(value)
    raise ValueError(f"expected bytes or a base64 string, got {type(value).__name__}")


class MedmocoClassifier(PythonModel):
    def load_context(self, context) -> None:
        from medmoco.serving import ClassifierPredictor

        self.predictor = ClassifierPredictor(context.artifacts["weights"])

    # The type hints tell MLflow the input is a frame (no signature is inferred from them: the
    # registered signature lists the three optional columns); without hints MLflow warns twice.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from dicom_preprocess import SUBTYPES

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        probs = np.zeros((len(frame), len(SUBTYPES)), dtype=np.float32)
        for i, row in enumerate(frame.to_dict("records")):
            if row.get("tensor") is not None and not _missing(row.get("tensor")):
                image = np.load(io.BytesIO(_as_bytes(row["tensor"])), allow_pickle=False)
                probs[i] = self.predictor.predict_tensors(image[None])[0]
            elif row.get("dicom") is not None and not _missing(row.get("dicom")):
                probs[i] = self.predictor.predict_dicoms([_as_bytes(row["dicom"])])[0]
            elif row.get("path") is not None and not _missing(row.get("path")):
                probs[i] = self.predictor.predict_dicoms([str(row["path"])])[0]
            else:
                raise ValueError(f"row {i}: give one of the columns dicom, path or tensor")
        return pd.DataFrame(probs, columns=list(SUBTYPES))


def _missing(value) -> bool:
    return isinstance(value, float) and np.isnan(value)


mlflow.models.set_model(MedmocoClassifier())
