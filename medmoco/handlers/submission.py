"""The Kaggle submission file of an evaluator's predictions (the MONAI bundle's output)."""
from __future__ import annotations

import os

import numpy as np


class SubmissionWriter:
    """Collect each iteration's image ids and probabilities; write ``ID,Label`` at the end.

    The file is :func:`medmoco.inference.write_submission`'s (six rows ``ID_<image>_<subtype>``
    per image, nine significant digits), the format of `medmoco predict`. MONAI's
    ``ClassificationSaver`` writes one row per image named by its file, which is not it.

    Args:
        output_dir: folder of the file (created).
        filename: the file's name.
        id_key: the batch key holding the image ids.
        pred_key: the output key holding the (6,) probabilities of an image.

    Attach it to a MONAI evaluator (``decollate=True``, its default: ``engine.state.batch`` and
    ``engine.state.output`` are lists of one dict per image when ITERATION_COMPLETED fires).
    """

    def __init__(self, output_dir: str, filename: str = "predictions.csv", id_key: str = "image_id",
                 pred_key: str = "pred"):
        self.path = os.path.join(output_dir, filename)
        self.id_key, self.pred_key = id_key, pred_key
        self.ids: list[str] = []
        self.probs: list[np.ndarray] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self)

    def _reset(self, engine) -> None:
        self.ids, self.probs = [], []

    def _collect(self, engine) -> None:
        for item, output in zip(engine.state.batch, engine.state.output):
            self.ids.append(str(item[self.id_key]))
            self.probs.append(np.asarray(output[self.pred_key].detach().cpu(), dtype=np.float32).reshape(-1))

    def __call__(self, engine) -> None:
        from medmoco.inference import write_submission

        probs = np.stack(self.probs) if self.probs else np.zeros((0, 6), np.float32)
        write_submission(self.ids, probs, self.path)
        engine.logger.info(f"{len(self.ids)} images -> {self.path}")
