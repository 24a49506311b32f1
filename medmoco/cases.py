"""Cases a reviewer looks at: where two models disagree most, and the candidate's most confident
false positives and false negatives, one PNG montage per class and kind.

Each tile is the slice in the brain window with the candidate's Grad-CAM for the class as an
overlay (MONAI ``monai.visualize.GradCAM`` on the backbone's last convolutional block,
``backbone.layer4``; for a series model, the slice's own logit through the series head, on the
encoder's block, with its whole series as input: :func:`gradcam_in_series`), and the image id and both probabilities written on it. Tiles carry image ids
only: no patient id or DICOM tag value is drawn or stored (``cases.json`` lists the same ids and
probabilities).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from dicom_preprocess import SUBTYPES

KINDS = ("disagreement", "false_positives", "false_negatives")
TARGET_LAYER = "backbone.layer4"


def pick_cases(labels: np.ndarray, candidate: np.ndarray, reference: np.ndarray, n: int) -> dict:
    """``{class: {kind: positions}}``: the ``n`` largest ``|candidate - reference|``; the negatives
    with the highest candidate probability; the positives with the lowest."""
    out = {}
    for j, name in enumerate(SUBTYPES):
        y, c, r = labels[:, j] > 0.5, candidate[:, j], reference[:, j]
        disagree = np.argsort(-np.abs(c - r), kind="stable")[:n]
        negatives, positives = np.flatnonzero(~y), np.flatnonzero(y)
        out[name] = {"disagreement": disagree.tolist(),
                     "false_positives": negatives[np.argsort(-c[negatives], kind="stable")[:n]].tolist(),
                     "false_negatives": positives[np.argsort(c[positives], kind="stable")[:n]].tolist()}
    return out


def gradcam(model: torch.nn.Module, images: torch.Tensor, class_index: int) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] of ``class_index`` for float inputs (N, C, H, W)."""
    from monai.visualize import GradCAM

    model.eval()
    cam = GradCAM(nn_module=model, target_layers=TARGET_LAYER)
    maps = cam(x=images, class_idx=class_index)
    return maps.detach().cpu().numpy()[:, 0]


class _OneSliceOfSeries(torch.nn.Module):
    """A series model seen as one slice's logits: input the series (S, C, H, W), output (1, 6)."""

    def __init__(self, model: torch.nn.Module, position: int):
        super().__init__()
        self.model, self.position = model, int(position)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[self.position : self.position + 1]


def gradcam_in_series(model: torch.nn.Module, series: torch.Tensor, position: int, class_index: int) -> np.ndarray:
    """Grad-CAM (H, W) of one slice of a series model: the gradient of that slice's logit (which
    reads its neighbours through the GRU) on its own image's activations."""
    from monai.visualize import GradCAM

    model.eval()
    cam = GradCAM(nn_module=_OneSliceOfSeries(model, position), target_layers="model.encoder." + TARGET_LAYER)
    return cam(x=series, class_idx=class_index).detach().cpu().numpy()[position, 0]


def _montage(tiles: list[dict], path: str, title: str) -> None:
    from .reports import _pyplot

    plt = _pyplot()
    cols = min(4, max(1, len(tiles)))
    rows = int(np.ceil(len(tiles) / cols)) if tiles else 1
    # constrained layout: tight_layout let the second row's images hide the first line of its titles
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.7 * rows), squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, tile in zip(axes.ravel(), tiles):
        ax.imshow(tile["image"], cmap="gray", vmin=0, vmax=255)
        # Grad-CAM keeps only positive evidence (a ReLU of the weighted activations): an all-zero
        # map means the last block holds none for this class; say so instead of tinting the tile.
        has_cam = bool(np.nanmax(tile["cam"]) > 0)
        if has_cam:
            ax.imshow(tile["cam"], cmap="jet", alpha=0.35, vmin=0, vmax=1,
                      extent=(-0.5, tile["image"].shape[1] - 0.5, tile["image"].shape[0] - 0.5, -0.5))
        ax.set_title(f"{tile['image_id']}\ncand {tile['candidate']:.2f} / ref {tile['reference']:.2f} "
                     f"(label {tile['label']}){'' if has_cam else '; Grad-CAM 0'}", fontsize=8)
    if not tiles:
        axes[0][0].text(0.5, 0.5, "no such case in this split", ha="center", va="center")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_cases(out_dir: str, model: torch.nn.Module, info: dict, cache, rows: np.ndarray, labels: np.ndarray,
                candidate: np.ndarray, reference: np.ndarray, n: int = 8, device: str = "cpu") -> list[str]:
    """Montages ``<class>_<kind>.png`` and ``cases.json`` in ``out_dir``; returns the PNG paths.

    Args:
        model, info: the candidate classifier and its file's info (context, image size).
        rows: the cache rows the predictions are of; ``labels``/``candidate``/``reference`` align.
    """
    from .transforms.supervised import prepare_images

    os.makedirs(out_dir, exist_ok=True)
    if n <= 0:
        return []
    channels = [w["name"] for w in cache.metadata["windows"]]
    brain = channels.index("brain") if "brain" in channels else 0
    ids = cache.manifest["image_id"].to_numpy()
    chosen = pick_cases(labels, candidate, reference, n)
    model = model.to(device)
    paths, listing = [], {}
    for j, name in enumerate(SUBTYPES):
        for kind in KINDS:
            positions = chosen[name][kind]
            tiles = []
            if positions and getattr(model, "is_series", False):
                maps = [_series_cam(model, info, cache, int(rows[p]), j, device) for p in positions]
            elif positions:
                stacks = np.stack([np.asarray(cache.stack(int(rows[p]), info["context"])) for p in positions])
                x = prepare_images(torch.from_numpy(stacks), info["image_size"]).to(device)
                maps = gradcam(model, x, j)
            if positions:
                for p, cam in zip(positions, maps):
                    tiles.append({"image": np.asarray(cache[int(rows[p])])[brain], "cam": cam,
                                  "image_id": str(ids[rows[p]]), "candidate": float(candidate[p, j]),
                                  "reference": float(reference[p, j]), "label": int(labels[p, j])})
            path = os.path.join(out_dir, f"{name}_{kind}.png")
            _montage(tiles, path, f"{name}: {kind.replace('_', ' ')} (candidate's Grad-CAM, brain window)")
            paths.append(path)
            listing[f"{name}_{kind}"] = [{k: t[k] for k in ("image_id", "candidate", "reference", "label")}
                                         for t in tiles]
    with open(os.path.join(out_dir, "cases.json"), "w") as handle:
        json.dump(listing, handle, indent=1)
    return paths


def _series_cam(model, info: dict, cache, row: int, class_index: int, device) -> np.ndarray:
    from .data.series import series_members
    from .transforms.supervised import prepare_images

    frame = cache.manifest
    same = np.flatnonzero((frame["study_uid"].to_numpy() == frame["study_uid"].iloc[row])
                          & (frame["series_uid"].to_numpy() == frame["series_uid"].iloc[row]))
    members = series_members(cache, same)[0][0]
    stacks = np.stack([np.asarray(cache.stack(int(i), info["context"])) for i in members])
    x = prepare_images(torch.from_numpy(stacks), info["image_size"]).to(device)
    return gradcam_in_series(model, x, int(np.flatnonzero(members == row)[0]), class_index)
