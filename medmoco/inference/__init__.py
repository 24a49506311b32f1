"""Using a trained classifier: the one resolver of model references (:mod:`.resolve`: a path,
``runs:/``, ``models:/`` with its recorded file digests checked), the model's own recorded
preprocessing on raw DICOMs, and the Kaggle submission file. `medmoco evaluate/predict/select`,
`medmoco review` and the registered pyfunc model load through here, so they agree by construction.
"""
from .resolve import preprocess_like_model, resolve_model, write_submission

__all__ = ["resolve_model", "preprocess_like_model", "write_submission"]
