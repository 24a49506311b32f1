"""A bundle's ``docs/README.md`` (the model card) and ``LICENSE``."""
from __future__ import annotations

from .metadata import INTENDED_USE, SCHEMA_FILE, window_label

LICENSE = """The code this bundle runs (medmoco) is licensed under the Apache License, Version 2.0:
https://www.apache.org/licenses/LICENSE-2.0

The weights were trained on the RSNA Intracranial Hemorrhage Detection data (Kaggle 2019). The
terms under which RSNA published those data govern what models trained on them may be used for:
read them before any use beyond non-commercial research.

Research only: not a medical device, not for clinical use. THE BUNDLE IS PROVIDED "AS IS", WITHOUT
WARRANTY OF ANY KIND.
"""


def registry_lines(record: dict) -> list[str]:
    """The card's "Where it comes from": the registry's record, or an unregistered file's digest."""
    if not record["registered"]:
        lines = ["- **Unregistered model file**: no registry record and no recorded digests.",
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
        lines.append(f"- Every registered file was checked against its recorded sha256 before export ({len(digests)} "
                     "files; `registry.files_sha256` in `configs/metadata.json`).")
    else:
        lines.append("- **The version has no recorded digests** (made outside medmoco): its files were not verified.")
    promotion = record.get("promotion")
    if not promotion:
        lines.append("- Not released through a medmoco promotion (a candidate, or a version without a promotion "
                     "record): no comparison backs it.")
        return lines
    ci = promotion.get("delta_ci")
    if promotion.get("delta_auc_mean") is not None and ci:
        compared = (f"mean AUC difference {promotion['delta_auc_mean']:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}] against "
                    f"the previous holder on split `{promotion.get('split')}`")
    else:
        compared = "no previous holder: nothing compared"
    forced = ""
    if promotion.get("forced"):
        forced = f" (**forced**: {'; '.join(promotion.get('forced_because') or [])} {promotion.get('reason')})"
    candidate = promotion["candidate"]
    return lines + [
        f"- Released as `{promotion.get('alias')}` by {promotion.get('promoted_by')} on "
        f"{promotion.get('promoted_at')}: {promotion.get('decision')}{forced}",
        f"- From candidate `{candidate['registered_model']}` version {candidate['version']}; {compared}; margin "
        f"{promotion.get('margin')}",
        f"- Promotion record {promotion.get('sequence')} of the release history, sha256 "
        f"`{record['promotion_sha256']}`, checked against the version's tag (`registry.promotion` in the metadata)",
    ]


def model_card(info: dict, metadata: dict) -> str:
    """``docs/README.md``: task, input and preprocessing, the network, the registry record, use."""
    from dicom_preprocess import SUBTYPES

    pre = info["preprocess"]
    series = info.get("series")
    size, native, context = int(info["image_size"]), int(pre["size"]), int(info["context"])
    channels = metadata["network_data_format"]["inputs"]["image"]["num_channels"]
    windows = "; ".join(window_label(w) for w in pre["windows"])
    neighbours = (f"; each slice takes {context} neighbour(s) on each side as channels (clamped at the series ends)"
                  if context else "")
    resize = (f", resized to {size} px (MONAI `Resized`, {'area' if native > size else 'bilinear'})"
              if size != native else "")
    if series:
        head = (f"a bidirectional GRU series head (hidden {series.get('hidden')}, {series.get('layers', 1)} layer(s)"
                f"{', left-right flip averaged embeddings' if series.get('flip_tta') else ''}) over the backbone's "
                "slice embeddings of a whole series, answering each slice in the context of its series")
        batch = "A series model: the batch is ONE series in slice order; the inference config batches series by series."
        exam = ("; the series head also has an exam-level output, which `medmoco predict --series-out` gives and "
                "this bundle does not")
    else:
        head, batch, exam = "one linear layer to six logits", "A slice model: slices are independent.", ""
    ts = metadata["torchscript"]
    torchscript = ("is the same network in TorchScript (checked equal on a probe at export), with metadata.json "
                   "embedded" if ts["written"] else f"was not written: {ts['reason']}")
    points = (info.get("operating_points") or {}).get("thresholds")
    thresholds = ", ".join(f"{c} {points[c]:.4g}" for c in SUBTYPES if c in points) if points else "none recorded"
    medmoco = f"medmoco {metadata['required_packages_version'].get('medmoco', '')}".strip()
    registry = "\n".join(registry_lines(metadata["registry"]))
    return f"""# {metadata['name']}

**Intended use: {INTENDED_USE}**

## Task
For each axial head-CT slice, six probabilities: {', '.join(SUBTYPES)} (multi-label, sigmoid;
`any` = any hemorrhage). The Kaggle RSNA Intracranial Hemorrhage Detection (2019) task and output format.

## Input and preprocessing
`python -m monai.bundle run` reads `dataset_dir`, a folder of DICOM slices (searched recursively), and
prepares it as the model's training data were (`configs/inference.json`):

1. every file is read with medmoco's reader: HU = stored value x RescaleSlope + RescaleIntercept, with
   the RSNA 12-bit wrap fix (BitsStored 12, unsigned, intercept > -100: codes are HU modulo 4096);
   Modality {', '.join(pre.get('modalities', ['CT']))} only; a file that is not a usable slice is skipped
   with a warning;
2. slices are grouped by StudyInstanceUID and SeriesInstanceUID and ordered along the series
   (ImagePositionPatient[2], ties by SOPInstanceUID){neighbours};
3. windows ({pre.get('window_mode', 'linear')}): {windows};
   a non-square slice is padded to square with air (-1024 HU), the square resized to {native} px (area
   averaging) and stored as round(255 x value), as in medmoco's cache (`medmoco.transforms.dicom.EncodeDicomd`);
4. / 255 (MONAI `ScaleIntensityRanged`){resize}:
   `image` is float32 (N, {channels}, {size}, {size}) in [0, 1].

## Network
`medmoco.export.network.BundleClassifier` ({info['arch']} backbone from MONAI's networks, {info['mode']};
{head}), ending in the sigmoid: `pred` is (N, 6) probabilities. {batch}
`models/model.pt` is its state dict; `models/model.ts` {torchscript}.
Operating points chosen on validation (per-class thresholds): {thresholds}.

## Where it comes from
{registry}

## Use
The bundle's code (network, DICOM reading, output file) is medmoco's: install {medmoco} (commit
`{metadata['medmoco_source_commit'][:12]}`, e.g. `pip install -e .` in a checkout) and the packages of
`required_packages_version`.
```bash
python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath configs/{SCHEMA_FILE}
python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json \\
    --config_file configs/inference.json
python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
    --dataset_dir SERIES_DIR --output_dir OUT
```
`OUT/predictions.csv` is `ID,Label` with six rows `ID_<image>_<subtype>` per slice: the probabilities
`medmoco predict --model ... --input SERIES_DIR` gives (within float rounding).

## Limitations
- Trained and checked on RSNA 2019 data only; nothing here says how it does on another site's
  scanners, protocols or population.
- Slice-level output only{exam}.
- Compressed DICOM needs the optional decoders (`optional_packages_version`).

## License
See `LICENSE`.
"""
