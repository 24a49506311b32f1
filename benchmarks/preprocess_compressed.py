"""Compressed archives: per transfer syntax, the bare decoders against medmoco's decode and its job.

    python benchmarks/preprocess.py --compressed [--distinct-files 128] [--bare-files 32] [--bare-repeats 3]
                                                 [--job-seconds 1.5] [--attempts 3] [--job-out /dev/shm]

Input: real RSNA slices (512x512; ../shared/data/rsna-stage2-sample and rsna-train-12series: 12-bit
unsigned and 16-bit signed, Explicit and Implicit VR), each re-encoded losslessly by
``dicom_preprocess.compress`` as JPEG Lossless SV1, JPEG-LS, JPEG 2000 and RLE, checked equal to the
original; read by path from a warm page cache. Per syntax, in one run:

* the bare loops of each installed library, file path -> numpy array of the pixels: pydicom with each
  of its plugins for the syntax (``pixel_array(path, decoding_plugin=...)``), python-gdcm's
  ``ImageReader``, SimpleITK's ``ReadImage``, imagecodecs on the frame pydicom's ``dcmread`` finds;
* the decode alone: the fast decoder on the frame's bytes already in memory (no file, no header),
  the floor under any loop over files;
* medmoco's decode loop: read the file and ``read_dicom`` (header, frame, decode, code map), then the
  same plus the window/resize kernel (all of a file's work in a job but the store);
  these loops run in turn, pass after pass, and each reports its median pass;
* the job (``medmoco preprocess --workers 1``, a fresh process per run; with one worker, a JPEG 2000
  decode uses the machine's other CPUs as OpenJPEG threads, as a bare threaded loop does): marginal
  files/s per worker
  ((run with 2N files) - (run with N)), the median of --attempts pairs run in turn, and CPU ms per
  file; the same for the uncompressed originals, the job's own cost per file. N is sized per syntax
  so that N files take about --job-seconds (the process start-up, 1-2 s of CPU that varies by a
  tenth of a second, must not drown the difference): beyond the distinct slices, copies that differ
  in their SOPInstanceUID only (their pixel data is the encoded original's, byte for byte).

Ratios: the job's marginal rate over the fastest bare file loop (the target is >= 0.8), in wall
time and in CPU time (CPU ms move less with the other tenants of a shared machine than wall time).
"""
from __future__ import annotations

import functools
import glob
import os
import shutil
import tempfile
import time

import numpy as np

from preprocess import REPO, job_marginal

DATA = os.path.join(REPO, "..", "shared", "data")


def real_slices(count: int) -> list[str]:
    """``count`` distinct real RSNA slices (the stage-2 sample first, then the 12 series)."""
    folders = [os.path.abspath(os.path.join(DATA, name)) for name in ("rsna-stage2-sample", "rsna-train-12series")]
    missing = [f for f in folders if not os.path.isdir(f)]
    if missing:
        raise SystemExit(f"real RSNA slices not found at {', '.join(missing)} (../shared/data/, see its README)")
    paths = [p for folder in folders for p in sorted(glob.glob(os.path.join(folder, "*.dcm")))]
    if len(paths) < count:
        raise SystemExit(f"{count} files asked for, {len(paths)} real slices found: lower --compressed-files")
    return paths[:count]


def _loops(loops: dict, repeats: int) -> dict:
    """name -> (files/s, CPU ms per file) of each ``(fn, items)`` loop: the loops run in turn, one
    pass each, ``repeats`` times (a busy spell of the machine then falls on all of them), and each
    reports its median pass; one untimed item first."""
    for fn, items in loops.values():
        fn(items[0])
    passes = {name: [] for name in loops}
    for _ in range(repeats):
        for name, (fn, items) in loops.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for item in items:
                fn(item)
            passes[name].append(((time.perf_counter() - wall) / len(items), (time.process_time() - cpu) / len(items)))
    return {name: (1 / float(np.median([w for w, _ in p])), 1000 * float(np.median([c for _, c in p])))
            for name, p in passes.items()}


def bare_loops(paths: list[str], syntax: str) -> dict:
    """name -> ``(fn, items)``: each library's file -> array loop, and the fast decoder alone on the
    frames in memory."""
    import gdcm
    import pydicom
    import SimpleITK as sitk
    from pydicom.pixels import pixel_array
    from pydicom.pixels.decoders.base import get_decoder

    from dicom_preprocess import decoders
    from dicom_preprocess.config import usable_cpus

    loops = {}
    for plugin in sorted(get_decoder(syntax).available_plugins):
        loops[f"pydicom + {plugin}: pixel_array(path)"] = \
            (lambda p, plugin=plugin: pixel_array(p, decoding_plugin=plugin), paths)

    def gdcm_file(path):
        reader = gdcm.ImageReader()
        reader.SetFileName(path)
        if not reader.Read():
            raise RuntimeError(f"GDCM cannot read {path}")
        return np.frombuffer(reader.GetImage().GetBuffer().encode("utf-8", "surrogateescape"), "<u2")

    loops["gdcm: ImageReader(path)"] = (gdcm_file, paths)
    codec = decoders._IMAGECODECS.get(syntax)
    if codec and decoders.installed("imagecodecs"):  # no DICOM reader of its own: pydicom finds the frame
        import imagecodecs

        def imagecodecs_file(path, decode=getattr(imagecodecs, codec), **options):
            ds = pydicom.dcmread(path)
            return decode(pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1), **options)

        loops[f"imagecodecs: dcmread(path) + {codec}(frame)"] = (imagecodecs_file, paths)
        if codec == "jpeg2k_decode" and usable_cpus() > 1:
            # OpenJPEG decodes a frame's code-blocks on several threads: the bare loop that uses all
            # of this machine's CPUs (gdcm's ImageReader does as well, on its own)
            threads = usable_cpus()
            loops[f"imagecodecs, {threads} threads: dcmread(path) + {codec}(frame)"] = \
                (functools.partial(imagecodecs_file, numthreads=threads), paths)
    loops["SimpleITK: ReadImage(path)"] = (lambda p: sitk.GetArrayFromImage(sitk.ReadImage(p)), paths)
    frames = []
    for path in paths:
        ds = pydicom.dcmread(path)
        info = decoders.FrameInfo(syntax, ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored,
                                  ds.PixelRepresentation == 1, ds.PhotometricInterpretation)
        frames.append((pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1), info))
    fast = decoders.DECODERS[syntax][0]
    loops[f"{fast} alone: frame bytes in memory (no file, no header)"] = \
        (lambda item: decoders.decode_frame(*item), frames)
    return loops


def medmoco_loops(paths: list[str]) -> dict:
    from dicom_preprocess.encoding import SliceEncoder
    from dicom_preprocess.reader import read_dicom
    from dicom_preprocess.windowing import parse_windows

    encoder = SliceEncoder(parse_windows("brain,subdural,bone"), "linear", 256)
    row = np.empty((3, 256, 256), np.uint8)

    def decode(path):
        with open(path, "rb") as handle:
            return read_dicom(handle.read(), path)

    return {"medmoco: read + read_dicom (header, frame, decode)": (decode, paths),
            "medmoco: + window/resize kernel (a job's work per file but the store)":
                (lambda p: encoder.encode(decode(p), out=row), paths)}


def with_copies(paths: list[str], count: int, folder: str) -> list[str]:
    """``count`` files: ``paths``, then copies of them that differ in their SOPInstanceUID only
    (the job keeps one image per id), written to ``folder``."""
    import pydicom

    out = list(paths[:count])
    os.makedirs(folder, exist_ok=True)
    k = 0
    while len(out) < count:
        source = paths[k % len(paths)]
        ds = pydicom.dcmread(source)
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{k // len(paths) + 1}"
        path = os.path.join(folder, f"copy{k:05d}_{os.path.basename(source)}")
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
        k += 1
    return out


def _job_size(cpu_ms: float, args) -> int:
    """N so that N files take about --job-seconds of CPU, within [--compressed-files, 4096] (one
    worker: no chunk alignment to keep)."""
    return min(4096, max(args.compressed_files, int(args.job_seconds * 1000 / max(cpu_ms, 0.05))))


def run(args) -> None:
    import warnings

    import pydicom

    from dicom_preprocess.compress import LOSSLESS, compress
    from dicom_preprocess.config import usable_cpus
    from dicom_preprocess.decoders import JPEG_2000_LOSSLESS  # decoded on the CPUs the workers leave
    from dicom_preprocess.reader import read_dicom

    warnings.filterwarnings("ignore")  # RSNA's ID_... UIDs, in every dcmread
    originals = real_slices(args.distinct_files)
    work = tempfile.mkdtemp(prefix="medmoco-bench-compressed-")
    started = time.perf_counter()
    try:
        folders = {"uncompressed": os.path.join(work, "uncompressed")}
        os.makedirs(folders["uncompressed"])
        for path in originals:  # RSNA ids are unique, so one flat folder
            shutil.copyfile(path, os.path.join(folders["uncompressed"], os.path.basename(path)))
        plain = sorted(glob.glob(os.path.join(folders["uncompressed"], "*.dcm")))
        sizes = {"uncompressed": sum(os.path.getsize(p) for p in plain) / len(plain)}
        for name, syntax in LOSSLESS.items():
            folders[syntax] = os.path.join(work, syntax)
            os.makedirs(folders[syntax])
            for path in plain:
                with open(os.path.join(folders[syntax], os.path.basename(path)), "wb") as handle:
                    handle.write(compress(open(path, "rb").read(), syntax))
            files = sorted(glob.glob(os.path.join(folders[syntax], "*.dcm")))
            sizes[syntax] = sum(os.path.getsize(p) for p in files) / len(files)
            for path in files:  # lossless, every one
                image = read_dicom(path)
                original = read_dicom(os.path.join(folders["uncompressed"], os.path.basename(path)))
                assert np.array_equal(image.to_hu(), original.to_hu()), path
        print(f"input: {len(plain)} distinct real RSNA slices (512x512; 12-bit unsigned and 16-bit signed), "
              f"re-encoded losslessly per syntax, each checked equal to its original (in "
              f"{time.perf_counter() - started:.0f} s); pydicom {pydicom.__version__}; {os.cpu_count()} cores; "
              "page cache warm")
        print(f"loops: {args.bare_files} files, {args.bare_repeats} passes in turn, median pass, one core; job: "
              f"marginal rate (run with 2N files - run with N), median of {args.attempts} pairs, --workers 1, "
              f"cache on {args.job_out or 'the work folder disk'}\n")
        job_work = os.path.join(work, "job")
        n = _job_size(1.0, args)
        base = _job(with_copies(plain, 2 * n, folders["uncompressed"] + "-copies"), job_work + "-uncompressed", n,
                    args)
        print(f"uncompressed originals (N = {n}), the job's own cost: {base['files_per_s']:.0f} files/s per worker, "
              f"{base['cpu_ms_per_file']:.3f} CPU ms per file\n")
        print("| syntax | loop | files/s | CPU ms/file | job / this (wall) | job / this (CPU) |")
        print("| --- | --- | --- | --- | --- | --- |")
        summary = []
        for name, syntax in LOSSLESS.items():
            files = sorted(glob.glob(os.path.join(folders[syntax], "*.dcm")))
            loops = bare_loops(files[: args.bare_files], syntax)
            loops.update(medmoco_loops(files[: args.bare_files]))
            loops = _loops(loops, args.bare_repeats)
            ours = loops["medmoco: + window/resize kernel (a job's work per file but the store)"][1]
            n = _job_size(ours, args)
            job = _job(with_copies(files, 2 * n, folders[syntax] + "-copies"), f"{job_work}-{syntax}", n, args)
            file_loops = {k: v for k, v in loops.items() if "(path)" in k}  # file -> array
            fastest = max(file_loops, key=lambda k: file_loops[k][0])
            label = f"{name} ({sizes[syntax] / 1024:.0f} KB/file)"
            for loop, (rate, cpu) in sorted(loops.items(), key=lambda kv: -kv[1][0]):
                mark = " **fastest bare file loop**" if loop == fastest else ""
                print(f"| {label} | {loop}{mark} | {rate:,.0f} | {cpu:.2f} | {job['files_per_s'] / rate:.2f} | "
                      f"{cpu / job['cpu_ms_per_file']:.2f} |")
            low, high = job["diff_range"]
            threads = f", {usable_cpus()} decode threads" if syntax == JPEG_2000_LOSSLESS and usable_cpus() > 1 else ""
            print(f"| {label} | **the job, marginal over N = {n}, 1 worker{threads}** (pairs: {n / high:,.0f}-"
                  f"{n / max(low, 1e-9):,.0f} files/s) | {job['files_per_s']:,.0f} | "
                  f"{job['cpu_ms_per_file']:.2f} | | |")
            decode_only = next(v for k, v in loops.items() if " alone: " in k)
            summary.append((name, fastest.split(":")[0], file_loops[fastest], job, decode_only))
        print("\n| syntax | fastest bare file loop | its files/s | job files/s per worker | job/bare (wall) | "
              "job/bare (CPU) | one core's ceiling: decode alone, one thread + the job's uncompressed cost, CPU ms -> "
              "files/s |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, fastest, (rate, cpu), job, (_, decode_cpu) in summary:
            bound = decode_cpu + base["cpu_ms_per_file"]
            print(f"| {name} | {fastest} | {rate:,.0f} | {job['files_per_s']:,.0f} | {job['files_per_s'] / rate:.2f} | "
                  f"{cpu / job['cpu_ms_per_file']:.2f} | {decode_cpu:.2f} + {base['cpu_ms_per_file']:.2f} -> "
                  f"{1000 / bound:,.0f} |")
        print(f"\n(target: job/bare >= 0.8 for each syntax; whole run {time.perf_counter() - started:.0f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _job(paths: list[str], work: str, n: int, args) -> dict:
    os.makedirs(work, exist_ok=True)
    return job_marginal(paths, work, 1, n, args.attempts, args.job_out, files_per_shard=args.files_per_shard)
