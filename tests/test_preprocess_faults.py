"""Fault injection for preprocessing: a fuzz corpus, header bombs, hostile archives, a bad labels
file, kill -9 at several points and a full disk. Every input ends in the cache or in errors.csv
with a reason; the job never crashes, never writes outside its output, and resumes to the cache
an uninterrupted run makes."""
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dicom_preprocess import open_cache
from dicom_preprocess.config import ConfigError, PreprocessConfig
from .hostile import fuzz_corpus, hostile_tar, hostile_zip, read_memory_growth
from dicom_preprocess.job import run_preprocess

from .conftest import caches_equal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def seed_files(archive):
    """Four valid 16-bit slices of the session archive (square, RSNA encodings)."""
    import pydicom

    files = []
    for path in sorted(glob.glob(os.path.join(archive.images_dir, "*.dcm"))):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.Rows == ds.Columns:
            files.append(path)
    return files[:4]


def _outcome(out):
    cache = open_cache(str(out))
    errors = cache.errors()
    return set(cache.manifest["source"]), dict(zip(errors["source"], errors["reason"]))


def test_fuzz_corpus_every_file_is_cached_or_rejected_with_a_reason(seed_files, tmp_path):
    corpus = fuzz_corpus(seed_files, str(tmp_path / "corpus"), seed=7, flips=60)
    out = tmp_path / "out"
    summary = run_preprocess(PreprocessConfig(input=str(tmp_path / "corpus"), out=str(out), size=64, workers=2,
                                              files_per_shard=40), progress=False)
    cached, rejected = _outcome(out)
    assert summary.cached + summary.skipped == len(corpus) == len(cached) + len(rejected)
    assert not cached & set(rejected)
    for item in corpus:
        state = "cached" if item.name in cached else "rejected"
        if item.expect != "either":
            assert state == item.expect, f"{item.name} ({item.what}): {state} {rejected.get(item.name, '')}"
        if state == "rejected":
            reason = rejected[item.name]
            assert reason and not reason.startswith("unexpected"), f"{item.name}: {reason}"
            assert reason.isprintable() and len(reason) <= 703
    pixel_flips = [i.name for i in corpus if i.what == "bytes flipped in the pixel data"]
    assert set(pixel_flips) <= cached


def test_reasons_never_echo_what_a_corrupt_header_swallowed(seed_files, tmp_path):
    """A Modality whose length field is corrupted swallows the PatientID that follows it."""
    from .hostile import _with_raw_value
    from dicom_preprocess.reader import SkipImage, read_dicom

    raw = open(seed_files[0], "rb").read()
    swallowed = _with_raw_value(raw, "Modality", b"CT\x10\x00 \x00LO\x0c\x00ID_PATIENT99\r")
    data = swallowed[: swallowed.rfind(b"\xe0\x7f\x10\x00")]  # and no pixels
    with pytest.raises(SkipImage) as err:
        read_dicom(data, "x.dcm")
    assert "PATIENT99" not in str(err.value) and "\r" not in str(err.value)


def test_header_bombs_stay_within_a_memory_bound(seed_files, tmp_path):
    """Peak RSS growth while reading every header bomb, measured in a fresh process."""
    corpus = fuzz_corpus(seed_files, str(tmp_path / "corpus"), seed=0, flips=1)
    bombs = [os.path.join(tmp_path, "corpus", i.name) for i in corpus if i.name.startswith("ID_bomb")]
    assert len(bombs) >= 5
    result = read_memory_growth(seed_files[0], bombs)
    assert "cached" not in result["outcomes"]
    assert result["growth_mb"] < 64, result  # the bound stated in the README: what a file claims allocates nothing


def test_hostile_zip_is_read_safely_and_writes_nothing_outside(seed_files, tmp_path):
    members = [open(path, "rb").read() for path in seed_files]
    work = tmp_path / "work"
    work.mkdir()
    expect = hostile_zip(str(work / "hostile.zip"), members)
    before = sorted(p for p in glob.glob(str(tmp_path / "**"), recursive=True))
    out = work / "out"
    run_preprocess(PreprocessConfig(input=str(work / "hostile.zip"), out=str(out), size=32, workers=1),
                   progress=False)
    cached, rejected = _outcome(out)
    for name, what in expect.items():
        label = name.lstrip("/")
        if what == "read":
            assert label in cached, (name, rejected.get(label))
        else:
            assert label in rejected and ("exceeds" in rejected[label]), (name, rejected.get(label))
    assert "duplicate member name" in " ".join(rejected.values())
    after = sorted(p for p in glob.glob(str(tmp_path / "**"), recursive=True) if not p.startswith(str(out)))
    assert after == before  # no ../escape, no /etc/..., nothing but the output directory
    assert not os.path.exists("/etc/ID_abs1.dcm")


def test_hostile_tar_never_follows_links(seed_files, archive, tmp_path):
    outside = tmp_path / "outside.dcm"  # a valid slice the links point at: it must never be read
    shutil.copyfile(seed_files[3], outside)
    members = [open(path, "rb").read() for path in seed_files[:3]]
    expect = hostile_tar(str(tmp_path / "hostile.tar"), members, str(outside))
    out = tmp_path / "out"
    run_preprocess(PreprocessConfig(input=str(tmp_path / "hostile.tar"), out=str(out), size=32, workers=1),
                   progress=False)
    cached, rejected = _outcome(out)
    for name, what in expect.items():
        label = name.lstrip("/")
        assert (label in cached) if what == "read" else ("not a regular file" in rejected[label]), name
    import pydicom

    outside_id = pydicom.dcmread(str(outside), stop_before_pixels=True).SOPInstanceUID
    assert outside_id not in set(open_cache(str(out)).manifest["image_id"])


def test_a_bad_labels_file_fails_before_work_and_a_messy_one_is_reported(archive, tmp_path):
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("image,label\nID_x_any,1\n")
    with pytest.raises(ConfigError, match="wrong.csv: expected columns ID,Label"):
        run_preprocess(PreprocessConfig(input=archive.images_dir, labels=str(wrong), out=str(tmp_path / "o1")),
                       progress=False)
    assert not os.path.exists(tmp_path / "o1" / "parts" / "chunk_000000.json")
    lines = open(archive.labels_csv).read().splitlines()
    messy = tmp_path / "messy.csv"
    extra = ["ID_00nothere_any,1", "ID_abc_alien,1", "garbage", "ID_q_any,1,extra,fields", "ID_r_epidural,maybe"]
    messy.write_text("\n".join(lines[:1] + extra + lines[1:]) + "\n")
    out = tmp_path / "o2"
    run_preprocess(PreprocessConfig(input=archive.images_dir, labels=str(messy), out=str(out), size=32, workers=1,
                                    files_per_shard=64), progress=False)
    report = open_cache(str(out)).metadata["labels"]
    assert "malformed rows skipped" in report and "unknown subtypes {'alien': 1}" in report
    assert "labeled ids not in the cache" in report
    cache = open_cache(str(out))
    assert cache.manifest["labeled"].sum() == len(archive.slices)


def _chunk_files(parts):
    return sorted(glob.glob(os.path.join(parts, "chunk_*.json")))


def _complete_chunks_are_whole(parts, size):
    """Every chunk marked done holds all the pixels its records name."""
    for path in _chunk_files(parts):
        info = json.load(open(path))
        pixels = np.load(path[: -len(".json")] + ".npy")
        assert pixels.shape == (len(info["records"]), 3, size, size), path


@pytest.fixture(scope="module")
def reference_cache(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    run_preprocess(PreprocessConfig(input=archive.root, labels=archive.labels_csv, out=str(out), size=64, workers=1,
                                    files_per_shard=4), progress=False)
    return str(out)


def _preprocess_cmd(archive, out, workers=1):
    return [sys.executable, "-m", "medmoco", "preprocess", "--input", archive.root, "--labels", archive.labels_csv,
            "--out", str(out), "--size", "64", "--workers", str(workers), "--files-per-shard", "4", "--quiet"]


@pytest.mark.slow
def test_kill_9_at_several_random_points_then_rerun_gives_the_uninterrupted_cache(archive, reference_cache,
                                                                                   tmp_path):
    out = tmp_path / "killed"
    rng = random.Random(11)
    total = len(archive.slices) // 4
    kills = 0
    for attempt in range(3):
        target = rng.randint(1, max(1, total - 2))
        proc = subprocess.Popen(_preprocess_cmd(archive, out, workers=1 + attempt % 2), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while len(_chunk_files(out / "parts")) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.2))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the job and its worker processes, as SLURM does
            kills += 1
        proc.wait()
        _complete_chunks_are_whole(out / "parts", 64)
        leftovers = [p for p in os.listdir(out / "parts") if ".tmp" in p]
        assert all(not p.endswith(".json") for p in leftovers)  # a .json (done mark) is never left partial
    assert kills >= 2
    subprocess.run(_preprocess_cmd(archive, out), check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    caches_equal(open_cache(reference_cache), open_cache(str(out)))


@pytest.fixture
def small_disk(tmp_path):
    """A 300 KB tmpfs: room for a few chunks of the session archive, not for all of them."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip()[:120]}); needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_keeps_finished_chunks_and_the_rerun_completes_the_cache(archive, reference_cache,
                                                                             small_disk):
    out = small_disk / "cache"
    first = subprocess.run(_preprocess_cmd(archive, out), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1, first.stderr[-2000:]
    assert "No space left on device" in first.stderr and "rerun the same command" in first.stderr
    assert "Traceback" not in first.stderr
    done = len(_chunk_files(out / "parts"))
    assert 0 < done < len(archive.slices) // 4
    _complete_chunks_are_whole(out / "parts", 64)
    assert not (out / "metadata.json").exists()
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    subprocess.run(_preprocess_cmd(archive, out), check=True, cwd=REPO, capture_output=True, timeout=300)
    caches_equal(open_cache(reference_cache), open_cache(str(out)))


def _worker_pids() -> list[int]:
    """Worker processes of a job run in this (test) process."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and b"spawn_main" in cmdline \
                and b"resource_tracker" not in cmdline:
            pids.append(int(entry))
    return pids


def _images_equal_by_id(reference: str, got: str, missing: set) -> None:
    ref, new = open_cache(reference), open_cache(got)
    index = {image_id: i for i, image_id in enumerate(new.manifest["image_id"])}
    assert set(ref.manifest["image_id"]) - set(index) == missing
    for i, image_id in enumerate(ref.manifest["image_id"]):
        if image_id not in missing:
            np.testing.assert_array_equal(ref[i], new[index[image_id]])


@pytest.mark.slow
def test_an_input_that_kills_its_worker_is_quarantined_and_the_job_completes(archive, reference_cache, tmp_path,
                                                                            monkeypatch):
    import pydicom

    victim = sorted(os.listdir(archive.images_dir))[5]
    monkeypatch.setenv("MEDMOCO_FAILPOINT_KILL_ON", f"stage_2_train/{victim}")  # the worker SIGKILLs itself
    out = tmp_path / "out"
    summary = run_preprocess(PreprocessConfig(input=archive.root, labels=archive.labels_csv, out=str(out), size=64,
                                              workers=2, files_per_shard=4), progress=False)
    assert summary.finalized
    _, rejected = _outcome(out)
    assert "killed by the OS" in rejected[f"stage_2_train/{victim}"]
    victim_id = pydicom.dcmread(os.path.join(archive.images_dir, victim), stop_before_pixels=True).SOPInstanceUID
    _images_equal_by_id(reference_cache, str(out), {victim_id})


@pytest.mark.slow
def test_a_worker_killed_once_from_outside_costs_a_retry_and_nothing_else(archive, reference_cache, tmp_path,
                                                                         caplog):
    import threading

    out = tmp_path / "out"
    killed = []

    def oom_killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            pids = _worker_pids()
            if pids and len(_chunk_files(out / "parts")) >= 2:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.01)

    thread = threading.Thread(target=oom_killer)
    thread.start()
    run_preprocess(PreprocessConfig(input=archive.root, labels=archive.labels_csv, out=str(out), size=64, workers=2,
                                    files_per_shard=4), progress=False)
    thread.join()
    assert killed, "the job ended before a worker could be killed"
    assert "a worker process died" in caplog.text
    assert not os.path.exists(out / "parts" / "quarantine.json")
    caches_equal(open_cache(reference_cache), open_cache(str(out)))


@pytest.mark.slow
@pytest.mark.parametrize("failpoint, bound", [("MEDMOCO_FAILPOINT_SLOW_ON", 1), ("MEDMOCO_FAILPOINT_HANG_ON", 4)])
def test_a_file_that_never_finishes_is_quarantined_and_the_job_completes(archive, reference_cache, tmp_path,
                                                                         monkeypatch, failpoint, bound):
    """SLOW sleeps in Python: SIGALRM (file_timeout_s=1) fires and the worker ends itself, since an
    interrupted interpreter is not trusted with more files. HANG blocks SIGALRM first, as a decoder
    stuck inside C code would: the parent's watchdog kills the worker after 2 x 1 + 2 s. Either
    way the chunk runs again alone, never finishes again, and its input is quarantined."""
    import pydicom

    victim = sorted(os.listdir(archive.images_dir))[9]
    monkeypatch.setenv(failpoint, f"stage_2_train/{victim}")
    out = tmp_path / "out"
    started = time.time()
    summary = run_preprocess(PreprocessConfig(input=archive.root, labels=archive.labels_csv, out=str(out), size=64,
                                              workers=2, files_per_shard=4, file_timeout_s=1,
                                              watchdog_grace_s=2), progress=False)
    assert summary.finalized and time.time() - started < 180
    _, rejected = _outcome(out)
    assert f"did not finish within {bound} s, twice (a decoder hung)" in rejected[f"stage_2_train/{victim}"]
    victim_id = pydicom.dcmread(os.path.join(archive.images_dir, victim), stop_before_pixels=True).SOPInstanceUID
    _images_equal_by_id(reference_cache, str(out), {victim_id})
