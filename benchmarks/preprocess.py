"""Preprocessing speed: medmoco against two baselines, per file and as the whole job; cache reads.

    python benchmarks/preprocess.py [--files 600] [--job-files 2048] [--readback 20000] [--job-out /dev/shm]
    python benchmarks/preprocess.py --compressed [...]   (compressed archives: preprocess_compressed.py)

Every side gets the same input: distinct RSNA-size slices (512x512, 16-bit, Explicit VR Little
Endian, the four RSNA encodings, each file its own noise) written to disk, read by path from a warm
page cache; the same output, the default 3-window 256x256 uint8 tensor; the same repeats.

1. One core, per file:
     medmoco      read the file, `read_dicom` (fast header + checks + zero-copy pixel view) and
                  `SliceEncoder` (LUT windowing and 2x2 area resize fused in one numba kernel)
     (a) plain    pydicom dcmread + pixel_array, float numpy windows, torch area resize
     (b) MONAI    LoadImage(PydicomReader) + ScaleIntensityRange per window + Resize(area)
   and medmoco's breakdown per file: read (as the job reads), header, checks and pixel view,
   window+resize, their sum, and the store (written and synced by the chunk's writer thread).
2. The whole job from files on disk (`medmoco preprocess`, a fresh process each run), as its
   marginal rate: (time for 2N files - time for N files) / N, so that process start-up and the
   cache's assembly cancel (the median of --attempts pairs run in turn), and its CPU ms per file;
   with 1 and 2 worker processes; N a multiple of 2 chunks of 1024 so that both workers stay busy
   in both runs; the cache on the work folder's disk and, with --job-out, elsewhere (tmpfs).
   Targets: >= 1,000 files/s per worker, >= 5x the plain loop (a).
3. Random reads of a cache of --readback distinct images (default 20,000, 3.9 GB), with its chunk
   files dropped from the page cache first (cold: posix_fadvise DONTNEED) and then warm.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)


def _rate(fn, items, repeats: int) -> float:
    """Items per second over ``repeats`` passes (after one untimed warm-up item)."""
    fn(items[0])
    start = time.perf_counter()
    for _ in range(repeats):
        for item in items:
            fn(item)
    return repeats * len(items) / (time.perf_counter() - start)


def per_file(paths: list[str], repeats: int) -> dict:

    import pydicom
    import torch
    import torch.nn.functional as F
    from monai.data import PydicomReader
    from monai.transforms import LoadImage, Resize, ScaleIntensityRange

    from dicom_preprocess.encoding import SliceEncoder
    from dicom_preprocess.fastheader import fast_dataset
    from dicom_preprocess.reader import read_dicom
    from dicom_preprocess.windowing import parse_windows

    torch.set_num_threads(1)
    windows = parse_windows("brain,subdural,bone")
    encoder = SliceEncoder(windows, "linear", 256)
    row = np.empty((3, 256, 256), np.uint8)

    def ours(path):
        with open(path, "rb") as handle:
            return encoder.encode(read_dicom(handle.read(), path), out=row)

    def plain(path):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        win = np.stack([np.clip((hu - (w.center - w.width / 2)) / w.width, 0, 1) for w in windows])
        small = F.interpolate(torch.from_numpy(win)[None], size=(256, 256), mode="area")[0]
        return (small * 255).round().to(torch.uint8)

    loader = LoadImage(reader=PydicomReader(), image_only=True, ensure_channel_first=True)
    scalers = [ScaleIntensityRange(w.center - w.width / 2, w.center + w.width / 2, 0.0, 1.0, clip=True)
               for w in windows]
    resize = Resize((256, 256), mode="area")

    def monai(path):
        hu = loader(path)
        return (resize(torch.cat([s(hu) for s in scalers])) * 255).round().to(torch.uint8)

    rates = {"medmoco": _rate(ours, paths, repeats), "(a) pydicom + numpy + torch": _rate(plain, paths, repeats),
             "(b) MONAI LoadImage + transforms": _rate(monai, paths, repeats)}
    # medmoco's breakdown: each step timed over all files in turn (the same files, in memory
    # after the read step; ms per file)
    blobs = [open(p, "rb").read() for p in paths]
    images = [read_dicom(b, p) for b, p in zip(blobs, paths)]
    steps = {}

    def timed(name, fn, items):
        start = time.perf_counter()
        for _ in range(repeats):
            for item in items:
                fn(item)
        steps[name] = (time.perf_counter() - start) / (repeats * len(items)) * 1000

    from dicom_preprocess.sources import InputArchive

    archive = InputArchive(os.path.dirname(paths[0]))
    sources = {s.name: s for s in archive.list()}
    listed = [sources[os.path.basename(p)] for p in paths]
    start = time.perf_counter()
    for _ in range(repeats):
        for _ in archive.read_many(listed):
            pass
    steps["read (the job's InputArchive.read_many, page cache warm)"] = \
        (time.perf_counter() - start) / (repeats * len(listed)) * 1000
    timed("header (fast parse)", fast_dataset, blobs)
    header = steps["header (fast parse)"]
    timed("header + checks + pixel view", lambda b: read_dicom(b), blobs)
    steps["checks + pixel view"] = steps.pop("header + checks + pixel view") - header
    timed("window + resize (fused kernel)", lambda im: encoder.encode(im, out=row), images)
    decoding_ms = sum(steps.values())
    steps["sum of the decoding thread's steps"] = decoding_ms
    from dicom_preprocess.cache import ChunkWriter

    # The job's store: ChunkWriter writes and fdatasyncs the rows of a 1024-file chunk from its own
    # thread while the chunk decodes. Timed here alone (filling the rows is a copy), so this is
    # the writer thread's work per file, not time the decoding thread waits for.
    work = tempfile.mkdtemp(prefix="medmoco-bench-write-")
    rows = None
    start = time.perf_counter()
    for k in range(3):
        writer = ChunkWriter(work, k, row.shape, 1024, rows=rows)
        for _ in range(1024):
            writer.next_row()[:] = row
            writer.commit()
        writer.finish([{} for _ in range(1024)], [])
        rows = writer.rows
    store_ms = (time.perf_counter() - start) / 3072 * 1000
    steps["store (writer thread: write + fdatasync, 1024-row chunks)"] = store_ms
    shutil.rmtree(work)
    return {"rates": rates, "steps_ms": steps, "decoding_ms": decoding_ms, "store_ms": store_ms}


def job_marginal(paths: list[str], work: str, workers: int, n: int, attempts: int = 3, out_dir: str = "",
                 files_per_shard: int = 1024) -> dict:
    """The job's marginal cost of N files: (run with 2N files) - (run with N files), each a fresh
    `medmoco preprocess` process; the caches are written under ``out_dir`` (default ``work``).

    The two sizes run in turn (N, 2N, N, 2N, ...) and the median of the ``attempts`` paired
    differences counts, so that a slow spell of a shared machine lands on both sides of a pair.
    Besides wall time, the CPU time of the job and its workers (user + sys, from
    ``RUSAGE_CHILDREN``): CPU ms per file hardly moves with other tenants and says what one core
    can do, where wall time says what this machine did.
    """
    import resource

    folders = {}
    for count in (n, 2 * n):
        folders[count] = os.path.join(work, f"in{count}")
        if not os.path.isdir(folders[count]):
            os.makedirs(folders[count])
            for path in paths[:count]:
                os.link(path, os.path.join(folders[count], os.path.basename(path)))
    wall, cpu = {n: [], 2 * n: []}, {n: [], 2 * n: []}
    for attempt in range(attempts):
        for count in (n, 2 * n):
            out = os.path.join(out_dir or work, f"out{count}-{workers}-{attempt}")
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "medmoco", "preprocess", "--input", folders[count], "--out", out,
                            "--workers", str(workers), "--size", "256", "--files-per-shard", str(files_per_shard),
                            "--quiet"], check=True, cwd=REPO, capture_output=True)
            wall[count].append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[count].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            shutil.rmtree(out)
    diffs = np.array(wall[2 * n]) - np.array(wall[n])
    cpu_diffs = np.array(cpu[2 * n]) - np.array(cpu[n])
    return {"files_per_s": n / max(float(np.median(diffs)), 1e-9), "diff_range": (diffs.min(), diffs.max()),
            "seconds": {k: float(np.median(v)) for k, v in wall.items()},
            "cpu_ms_per_file": float(np.median(cpu_diffs)) / n * 1000}


def drop_from_page_cache(paths: list[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def readback(images: int, work: str) -> dict:
    from dicom_preprocess import open_cache
    from dicom_preprocess.synthetic import write_synthetic_cache

    out = os.path.join(work, "readback-cache")
    start = time.perf_counter()
    write_synthetic_cache(out, images, size=256)
    built = time.perf_counter() - start
    cache = open_cache(out)
    chunk_files = sorted(glob.glob(os.path.join(out, "parts", "chunk_*.npy")))
    order = np.random.default_rng(0).integers(0, len(cache), 20000)
    rates = {}
    for state in ("cold", "warm"):
        if state == "cold":
            drop_from_page_cache(chunk_files)
        cache = open_cache(out)
        start = time.perf_counter()
        for i in order:
            np.array(cache[i])
        rates[state] = len(order) / (time.perf_counter() - start)
    shutil.rmtree(out)
    return {"images": len(cache), "reads": len(order), "rates": rates, "build_s": built}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=600, help="files for the per-file comparison")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--job-files", dest="job_files", type=int, default=2048,
                        help="N of the marginal job rate (rounded up to a multiple of 2 chunks: whole chunks for "
                             "each of 2 workers, or the marginal rate measures an idle worker)")
    parser.add_argument("--files-per-shard", dest="files_per_shard", type=int, default=1024,
                        help="the job's chunk size (its default)")
    parser.add_argument("--readback", type=int, default=20000, help="distinct images of the read-back cache")
    parser.add_argument("--attempts", type=int, default=None,
                        help="pairs of job runs (N, 2N); the median counts (default 5, with --compressed 3)")
    parser.add_argument("--job-out", dest="job_out", default="",
                        help="also run the job with its cache on this filesystem (e.g. /dev/shm), to tell the "
                             "workers' rate from the storage's")
    parser.add_argument("--skip", default="", help="comma list of 1,2,3 to skip")
    parser.add_argument("--compressed", action="store_true",
                        help="instead: real RSNA slices re-encoded as JPEG Lossless, JPEG-LS, JPEG 2000 and RLE, per "
                             "syntax the bare decoders, medmoco's decode and the job (preprocess_compressed.py)")
    parser.add_argument("--distinct-files", dest="distinct_files", type=int, default=128,
                        help="--compressed: distinct real RSNA slices encoded in each syntax")
    parser.add_argument("--compressed-files", dest="compressed_files", type=int, default=128,
                        help="--compressed: the least N of the job's marginal rate")
    parser.add_argument("--job-seconds", dest="job_seconds", type=float, default=1.5,
                        help="--compressed: N per syntax so that N files take about this much CPU")
    parser.add_argument("--bare-files", dest="bare_files", type=int, default=32,
                        help="--compressed: files of the bare and medmoco loops")
    parser.add_argument("--bare-repeats", dest="bare_repeats", type=int, default=3,
                        help="--compressed: passes of the bare and medmoco loops (in turn; the median counts)")
    args = parser.parse_args()
    if args.compressed:
        from preprocess_compressed import run

        args.attempts = args.attempts or 3
        return run(args)
    args.attempts = args.attempts or 5
    from dicom_preprocess.synthetic import write_distinct_slices

    skip = set(args.skip.split(","))
    pair = 2 * args.files_per_shard  # a chunk for each of two workers
    args.job_files = -(-args.job_files // pair) * pair
    work = tempfile.mkdtemp(prefix="medmoco-bench-")
    try:
        paths = write_distinct_slices(os.path.join(work, "files"), max(args.files, 2 * args.job_files))
        print(f"input: {len(paths)} distinct RSNA-size files (512x512, 16-bit), page cache warm; "
              f"output 3x256x256 uint8; {os.cpu_count()} cores")
        if "1" not in skip:
            result = per_file(paths[: args.files], args.repeats)
            base = result["rates"]["medmoco"]
            print(f"\n1. one core, {args.files} files x {args.repeats} repeats, every side reading the same paths")
            for name, rate in result["rates"].items():
                ratio = "" if name == "medmoco" else f"   medmoco is {base / rate:5.1f}x faster"
                print(f"   {name:34s} {rate:8.0f} files/s{ratio}")
            print("   medmoco per file (ms):")
            for name, ms in result["steps_ms"].items():
                print(f"     {name:46s} {ms:7.3f}")
        if "2" not in skip:
            plain = per_file(paths[: min(200, args.files)], 1)["rates"]["(a) pydicom + numpy + torch"] \
                if "1" in skip else result["rates"]["(a) pydicom + numpy + torch"]
            print(f"\n2. the whole job (`medmoco preprocess`, files on disk), marginal rate over N = {args.job_files}")
            rates = {}
            targets = [("", "the work folder's disk")] + ([(args.job_out, args.job_out)] if args.job_out else [])
            for out_dir, where in targets:
                print(f"   cache written to {where}:")
                for workers in (1, 2):
                    job = job_marginal(paths, work, workers, args.job_files, args.attempts, out_dir,
                                       args.files_per_shard)
                    rates.setdefault(workers, job["files_per_s"])
                    low, high = job["diff_range"]
                    print(f"   {workers} worker(s): {job['files_per_s']:7.0f} files/s ({job['files_per_s'] / workers:6.0f} "
                          f"per worker; {args.job_files} more files took {args.job_files / job['files_per_s']:.2f} s, "
                          f"{low:.2f}-{high:.2f} over {args.attempts} pairs; {job['cpu_ms_per_file']:.3f} CPU ms "
                          f"per file); {job['files_per_s'] / plain:5.1f}x the plain loop")
            if "1" not in skip:
                store_ms = result["store_ms"]
                mb_s = 3 * 256 * 256 / store_ms / 1000
                print(f"   the disk takes {mb_s:.0f} MB/s written and synced (part 1's store): at most "
                      f"{1000 / store_ms:.0f} files/s for all workers together")
            if "1" not in skip:
                steps_ms = result["decoding_ms"]
                print(f"   per file in the job with 1 worker: {1000 / rates[1]:.3f} ms, against {steps_ms:.3f} ms "
                      "of decoding steps in part 1 (the rest: the job's bookkeeping and the store's share)")
            print(f"   scaling, 2 workers vs 1: {rates[2] / rates[1]:.2f}x (targets: >= 1,000 files/s per worker, "
                  ">= 5x the plain loop)")
        if "3" not in skip:
            back = readback(args.readback, work)
            print(f"\n3. cache read-back: {back['reads']} random reads of a {back['images']}-image cache "
                  f"(3x256x256, built in {back['build_s']:.0f} s), one process, copied out of the memory map")
            for state, rate in back["rates"].items():
                print(f"   page cache {state:4s}: {rate:9.0f} reads/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
