"""Backbone weights for downstream use.

Format (``torch.save`` of plain containers, loadable with ``torch.load(weights_only=True)``)::

    {"format": "medmoco-backbone/1", "arch": "resnet50", "in_channels": 3, "feature_size": 2048,
     "state_dict": {<backbone keys, no prefixes>: tensor}, "meta": {...: str/int/float}}

:func:`load_backbone_state` also accepts MoCo checkpoints and DDP state dicts: it strips the
wrapper prefixes (``module.``, ``encoder_q.``, ``backbone.``, ``_orig_mod.``), drops the key
encoder and the projection head, and reports which keys are missing or unexpected.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from dicom_preprocess.files import atomic_file

FORMAT = "medmoco-backbone/1"
PREFIXES = ("module.", "_orig_mod.", "model.", "encoder_q.", "backbone.")


def export_backbone(moco: nn.Module, path: str, arch: str, in_channels: int, feature_size: int,
                    meta: dict | None = None) -> str:
    """Save the query encoder's backbone (unwrapping DDP) in the documented format."""
    model = getattr(moco, "module", moco)
    state = {k: v.detach().cpu().clone() for k, v in model.encoder_q.backbone.state_dict().items()}
    payload = {"format": FORMAT, "arch": arch, "in_channels": int(in_channels), "feature_size": int(feature_size),
               "state_dict": state, "meta": dict(meta or {})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_file(path) as handle:
        torch.save(payload, handle)
    return path


def strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    """Backbone keys of a state dict from any of our wrappers (query encoder only)."""
    out = {}
    for key, value in state.items():
        if "encoder_k." in key or key in ("queue", "queue_ptr") or key.endswith((".queue", ".queue_ptr")):
            continue
        name = key
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix):], True
        if name.startswith("head.") and "encoder_q." in key:
            continue  # the projection head is not part of the backbone
        out[name] = value
    return out


def read_weights(path: str) -> dict:
    """Load a weight file safely (``weights_only=True``: no code in a pickle can run)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a loadable weight file with weights_only=True ({str(err)[:200]})") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: expected a dict of weights, got {type(payload).__name__}")
    return payload


def backbone_arch(path: str) -> str:
    """The architecture recorded in a backbone export (``"arch"``) or a MoCo checkpoint (its config),
    so that a from-scratch baseline can train the same network as the pretrained one."""
    payload = read_weights(path)
    arch = payload.get("arch") or (payload.get("config") or {}).get("moco", {}).get("arch")
    if not arch:
        raise ValueError(f"{path}: no architecture recorded (expected a `medmoco pretrain` backbone.pt)")
    return str(arch)


def load_backbone_state(backbone: nn.Module, source: str | dict, allowed_missing: tuple[str, ...] = ("fc.",)
                        ) -> tuple[list[str], list[str]]:
    """Load exported or checkpointed weights into ``backbone``.

    Returns:
        (missing, unexpected) key lists after prefix stripping.

    Raises:
        ValueError: when a key outside ``allowed_missing`` is missing, or nothing matched.
    """
    payload = read_weights(source) if isinstance(source, str) else source
    if "state_dict" in payload:
        state = payload["state_dict"]
    elif "model" in payload and isinstance(payload["model"], dict):
        state = payload["model"]
    else:
        state = payload
    state = strip_prefixes(state)
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(allowed_missing)]
    if missing:
        raise ValueError(f"pretrained weights lack {len(missing)} backbone keys, e.g. {missing[:5]}")
    if not set(state) & set(expected):
        raise ValueError("no key of the pretrained weights matches the backbone")
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches: another arch or in_channels
        raise ValueError(f"pretrained weights do not fit the backbone: {str(err)[:300]}") from None
    return list(result.missing_keys), list(result.unexpected_keys)
