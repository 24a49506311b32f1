"""The benchmarks run from a fresh clone, in their smallest form (smoke tests: no timing is
asserted; the figures in the README come from the full runs)."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, timeout=600):
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args], capture_output=True,
                            text=True, cwd=REPO, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_pretrain_end_to_end_table_on_cpu():
    out = _run("pretrain.py", "--e2e", "--device", "cpu", "--arch", "resnet18", "--size", "32", "--batch", "8",
               "--iters", "2", "--warmup", "1", "--cache-images", "96", "--cache-size", "64", "--workers", "0",
               "--amp", "none,bf16", "--channels-last", "off,on")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "views |" in line]
    assert len(rows) == 2 * 2 * 2  # view path x AMP x channels_last
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[3]) > 0 and 0 <= float(cells[4]) <= 1 and float(cells[9]) > 0, row


@pytest.mark.slow
def test_pretrain_feed_rate_and_step_ratio():
    out = _run("pretrain.py", "--feed", "--images", "128", "--cache-size", "64", "--size", "32", "--batches", "2",
               "--batch", "8")
    assert len(re.findall(r"pairs/s per worker -> \d+ workers", out)) == 2
    out = _run("pretrain.py", "--arch", "resnet18", "--size", "32", "--batch", "8", "--iters", "1", "--rounds", "2",
               "--views", "4")
    assert re.search(r"ratio \d\.\d{3} ", out) and out.count("2. views") == 3


@pytest.mark.slow
def test_preprocess_per_file_job_and_readback(tmp_path):
    out = _run("preprocess.py", "--files", "8", "--repeats", "1", "--job-files", "8", "--files-per-shard", "4",
               "--attempts", "1", "--readback", "300", "--job-out", str(tmp_path))
    assert "medmoco" in out and "window + resize" in out and "per worker" in out
    assert len(re.findall(r"2 worker\(s\): +\d+ files/s", out)) == 2 and "the disk takes" in out
    assert "page cache cold" in out and "page cache warm" in out


@pytest.mark.slow
def test_preprocess_compressed_table(tmp_path):
    if not os.path.isdir(os.path.join(REPO, "..", "shared", "data", "rsna-train-12series")):
        pytest.skip("real RSNA slices not found at ../shared/data/ (the compressed benchmark re-encodes them)")
    out = _run("preprocess.py", "--compressed", "--distinct-files", "4", "--compressed-files", "4", "--job-seconds",
               "0.001", "--bare-files", "2", "--bare-repeats", "1", "--attempts", "1", "--job-out", str(tmp_path))
    jobs = re.findall(r"^\| (.+?) \(\d+ KB/file\) \| \*\*the job, marginal over N = 4, 1 worker", out, re.M)
    assert jobs == ["JPEG Lossless SV1", "JPEG-LS lossless", "JPEG 2000 lossless", "RLE Lossless"]
    for loop in ("imagecodecs: dcmread(path) + jpeg8_decode(frame)", "imagecodecs alone: frame bytes",
                 "pylibjpeg-rle alone", "SimpleITK: ReadImage(path)", "gdcm: ImageReader(path)",
                 "pydicom + pyjpegls: pixel_array(path)", "medmoco: read + read_dicom"):
        assert loop in out, loop
    summary = [line for line in out.splitlines() if re.match(r"\| (JPEG|RLE)[^(|]+\| [^|]+\| [\d,]+ \| ", line)]
    assert len(summary) == 4 and "target: job/bare >= 0.8" in out, summary


def test_evaluation_bootstrap_benchmark_agrees_with_the_naive_loop():
    out = _run("evaluation.py", "--slices", "600", "--patients", "40", "--replicates", "20")
    assert "max |difference|" in out and "whole evaluate_split" in out
