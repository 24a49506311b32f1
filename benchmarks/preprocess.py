"""Preprocessing speed, medmoco vs two baselines, side by side in one process (one core).

    python benchmarks/preprocess.py [--files 200] [--real ../shared/data/rsna-stage2-sample]

Input: RSNA-size slices (512x512, 16-bit, Explicit VR LE) from the synthetic archive, read from
memory so that the disk is not measured. Output: the default 3-window 256x256 uint8 cache tensor.
  medmoco   : dicom_preprocess.reader.read_dicom + SliceEncoder (LUT + numba box kernel)
  baseline a: pydicom dcmread + pixel_array + float numpy windows + block-mean resize
  baseline b: MONAI LoadImage(PydicomReader) + ScaleIntensityRange per window + Resize(area)
Also: reading the finished cache back (random samples/s, one process).
"""
from __future__ import annotations

import argparse
import glob
import io
import os
import sys
import tempfile
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _rate(fn, items, repeat=1):
    fn(items[0])
    start = time.perf_counter()
    for _ in range(repeat):
        for item in items:
            fn(item)
    return repeat * len(items) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=120)
    parser.add_argument("--job-files", type=int, default=5760, help="files for the whole-job figures")
    parser.add_argument("--real", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                       "rsna-stage2-sample"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from dicom_preprocess import open_cache
    from dicom_preprocess.config import PreprocessConfig
    from dicom_preprocess.encoding import SliceEncoder
    from dicom_preprocess.job import run_preprocess
    from dicom_preprocess.reader import read_dicom
    from dicom_preprocess.synthetic import synthesize
    from dicom_preprocess.windowing import parse_windows

    windows = parse_windows("brain,subdural,bone")
    work = tempfile.mkdtemp(prefix="medmoco-bench-")
    synth = synthesize(work, patients=max(1, args.files // 35), seed=0, slices_per_series=(12, 12))
    paths = [p for p in sorted(glob.glob(os.path.join(synth.images_dir, "*.dcm")))]
    blobs = [open(p, "rb").read() for p in paths]
    blobs = [b for b in blobs if len(b) > 500_000][: args.files]  # RSNA size: 512x512 16-bit
    real = sorted(glob.glob(os.path.join(args.real, "*.dcm")))
    if real:
        blobs += [open(p, "rb").read() for p in real]
    encoder = SliceEncoder(windows, "linear", 256)

    def ours(blob):
        return encoder.encode(read_dicom(blob))

    def plain(blob):
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(blob))
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        chans = [np.clip((hu - (w.center - w.width / 2)) / w.width, 0, 1) for w in windows]
        win = np.stack(chans).reshape(3, 256, 2, 256, 2).mean(axis=(2, 4))
        return np.rint(win * 255).astype(np.uint8)

    from monai.data import PydicomReader
    from monai.transforms import LoadImage, Resize, ScaleIntensityRange

    loader = LoadImage(reader=PydicomReader(), image_only=True, ensure_channel_first=True)
    scalers = [ScaleIntensityRange(w.center - w.width / 2, w.center + w.width / 2, 0.0, 1.0, clip=True)
               for w in windows]
    resize = Resize((256, 256), mode="area")
    tmpfile = os.path.join(work, "one.dcm")

    def monai(blob):
        with open(tmpfile, "wb") as handle:  # LoadImage reads paths
            handle.write(blob)
        hu = loader(tmpfile)
        win = torch.cat([s(hu) for s in scalers])
        return (resize(win) * 255).round().to(torch.uint8)

    r_ours = _rate(ours, blobs, repeat=3)
    r_plain = _rate(plain, blobs)
    r_monai = _rate(monai, blobs)
    print(f"files: {len(blobs)} RSNA-size slices ({len(real)} real), one core, 512x512 -> 3x256x256 uint8")
    print(f"medmoco                         {r_ours:8.0f} files/s")
    print(f"(a) pydicom + float numpy       {r_plain:8.0f} files/s   ratio {r_ours / r_plain:5.1f}x")
    print(f"(b) MONAI LoadImage + Scale...  {r_monai:8.0f} files/s   ratio {r_ours / r_monai:5.1f}x")

    # Whole job with 1 and 2 worker processes (includes process start-up, disk and chunk writes)
    # on --job-files RSNA-size files: the synthetic and real slices repeated under new names (hard
    # links). Each worker process starts in ~1 s (imports, numba cache), so a job of a few seconds
    # measures start-up; 5,760 files take ~10-16 s here.
    job_input = os.path.join(work, "job-input")
    os.makedirs(job_input)
    originals = []
    for i, blob in enumerate(blobs):
        originals.append(os.path.join(work, f"blob{i:04d}.dcm"))
        with open(originals[-1], "wb") as handle:
            handle.write(blob)
    for i in range(args.job_files):
        os.link(originals[i % len(originals)], os.path.join(job_input, f"ID_job{i:06d}.dcm"))
    rates = {}
    for workers in (1, 2):
        out = os.path.join(work, f"cache{workers}")
        cfg = PreprocessConfig(input=job_input, out=out, workers=workers, files_per_shard=64)
        summary = run_preprocess(cfg, progress=False)
        rates[workers] = summary.files_per_second
        print(f"job, {workers} worker(s): {summary.files_per_second:8.0f} files/s "
              f"({summary.files} files, {summary.seconds:.1f} s incl. start-up)")
    print(f"job scaling, 2 workers vs 1: {rates[2] / rates[1]:.2f}x (on {os.cpu_count()} cores)")
    cache = open_cache(os.path.join(work, "cache1"))
    order = np.random.default_rng(0).integers(0, len(cache), 20000)
    cache[0]
    start = time.perf_counter()
    for i in order:
        np.array(cache[i])
    rate = len(order) / (time.perf_counter() - start)
    print(f"cache read-back: {rate:8.0f} random samples/s (one process, copied out of the memory map)")


if __name__ == "__main__":
    main()
