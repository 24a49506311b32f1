"""The series head: per-slice embeddings of a whole series, in slice order, -> six logits per slice
and six exam-level logits.

Every top solution of the RSNA 2019 challenge read a slice in its neighbours with a second stage
over the series (a bidirectional GRU/LSTM over per-slice CNN embeddings; the 2nd place's LSTM moved
their stage-1 log loss from 0.066-0.070 to 0.057). This is that stage, from torch parts:

    embeddings (B, S, F) + mask (B, S)
      -> LayerNorm, Linear F->H, ReLU                     (B, S, H)    per slice
      -> bidirectional GRU over the valid slices          (B, S, 2H)   packed: padding never enters
      -> slice logits: Linear [GRU out, per-slice] -> 6   (B, S, 6)
      -> exam logits: Linear [masked max, masked mean of GRU out] -> 6   (B, 6)

Nothing mixes series of one batch (LayerNorm is per slice, the GRU runs on packed sequences, the
pooling is masked), so a slice's prediction depends on its own series only. A series of one slice
is a sequence of length 1. Two slices at one position are two steps of the sequence (their order
is the cache's, by position then image id). The head scripts with ``torch.jit.script`` (the
MONAI bundle's ``model.ts``, :mod:`medmoco.export.network`), so its Python stays TorchScript's.

:class:`SeriesClassifier` puts the slice encoder (a :class:`~medmoco.models.classifier.Classifier`,
whose backbone gives the embeddings) in front of the head: called on the images of one series in
order (S, C, H, W) it returns slice logits (S, 6), so every path that predicts cache rows treats a
series model as a slice model that must see whole series (``medmoco.engines.embed``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class SeriesHead(nn.Module):
    """(B, S, F) embeddings and a (B, S) bool mask of valid slices -> (slice (B, S, C), exam (B, C)) logits.

    Args:
        features: embedding size F.
        hidden: H, the per-slice projection and each GRU direction.
        layers: GRU layers.
        dropout: on the projected embeddings (training only).
    """

    def __init__(self, features: int, hidden: int = 64, layers: int = 1, num_classes: int = 6,
                 dropout: float = 0.1):
        super().__init__()
        self.features, self.hidden, self.layers = int(features), int(hidden), int(layers)
        self.norm = nn.LayerNorm(features)
        self.proj = nn.Linear(features, hidden)
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(hidden, hidden, num_layers=layers, batch_first=True, bidirectional=True)
        self.slice_out = nn.Linear(3 * hidden, num_classes)
        self.exam_out = nn.Linear(4 * hidden, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 3:
            raise ValueError(f"series head: embeddings must be (series, slices, features), got {x.dim()} dimensions")
        batch, steps = x.shape[0], x.shape[1]  # TorchScript cannot unpack a shape
        if mask is None:
            mask = torch.ones(batch, steps, dtype=torch.bool, device=x.device)
        lengths = mask.sum(dim=1)
        if bool((lengths == 0).any()):
            raise ValueError("series head: a series without slices")
        h = self.drop(torch.relu(self.proj(self.norm(x.float()))))  # (B, S, H)
        packed = pack_padded_sequence(h, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=steps)  # (B, S, 2H), zeros past the end
        slice_logits = self.slice_out(torch.cat([out, h], dim=-1))  # (B, S, C)
        valid = mask[..., None]
        pooled_max = out.masked_fill(~valid, float("-inf")).amax(dim=1)  # (B, 2H)
        pooled_mean = (out * valid).sum(dim=1) / lengths[:, None].to(out.dtype)  # (B, 2H)
        exam_logits = self.exam_out(torch.cat([pooled_max, pooled_mean], dim=-1))  # (B, C)
        return slice_logits, exam_logits


class SeriesClassifier(nn.Module):
    """``encoder`` (a slice classifier: its backbone embeds each slice) + ``head`` (:class:`SeriesHead`).

    ``forward(images)`` takes the slices of ONE series in order, (S, C, H, W) float [0, 1], and
    returns slice logits (S, 6); :meth:`forward_series` returns the exam logits too.
    ``flip_tta`` averages each slice's embedding with that of its left-right mirror image.
    """

    is_series = True

    def __init__(self, encoder: nn.Module, head: SeriesHead, flip_tta: bool = False, context: int = 0,
                 image_size: int = 0):
        super().__init__()
        self.encoder, self.head, self.flip_tta = encoder, head, bool(flip_tta)
        self.context, self.image_size = int(context), int(image_size)  # the encoder's input (2.5D, px)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, F) slice embeddings (with the flip average when ``flip_tta``)."""
        features = self.encoder.backbone(images)
        if self.flip_tta:
            features = 0.5 * (features + self.encoder.backbone(torch.flip(images, dims=(-1,))))
        return features

    def forward_series(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, C, H, W) of one series in order -> (slice logits (S, 6), exam logits (6,))."""
        slices, exam = self.head(self.embed(images)[None])
        return slices[0], exam[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_series(images)[0]


def build_series_head(features: int, settings: dict) -> SeriesHead:
    """A head from the ``series`` settings a model file records (``hidden``, ``layers``, ``dropout``)."""
    return SeriesHead(features, hidden=int(settings.get("hidden", 64)), layers=int(settings.get("layers", 1)),
                      dropout=float(settings.get("dropout", 0.1)))
