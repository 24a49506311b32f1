"""Fault figures: what happens to hostile files, killed jobs and header bombs.

    python benchmarks/faults.py [--flips 200] [--kills 5] [--pretrain-kills 2]

1. Fuzz corpus (tests/hostile.py) through the real preprocessing job: every file's outcome by
   cause (decoded into the cache; rejected by a check; its worker died; it timed out; how many of
   those were quarantined; an "unexpected" reader error; unaccounted), and the slowest file
   against the per-file bound.
2. Kill-and-resume: `medmoco preprocess` SIGKILLed (with its workers) at random points and
   rerun until done, compared with an uninterrupted run; `medmoco pretrain` SIGKILLed at a
   random iteration and resumed with --resume auto, losses and weights compared.
3. Header bombs: peak RSS growth of a fresh process reading every header-bomb file, side by
   side with the memory their headers claim (what a reader that trusted them would allocate).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

from dicom_preprocess.markers import CRASH_REASON  # noqa: E402


def _square_seeds(images_dir: str, n: int = 4) -> list[str]:
    import pydicom

    files = []
    for path in sorted(glob.glob(os.path.join(images_dir, "*.dcm"))):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.Rows == ds.Columns == 512:
            files.append(path)
    return files[:n]


def fuzz_figures(work: str, seeds: list[str], flips: int) -> dict:
    from dicom_preprocess import open_cache
    from dicom_preprocess.config import PreprocessConfig
    from tests.hostile import fuzz_corpus
    from dicom_preprocess.job import run_preprocess
    from dicom_preprocess.markers import read_quarantine
    from dicom_preprocess.reader import SkipImage, read_dicom

    corpus_dir = os.path.join(work, "corpus")
    corpus = fuzz_corpus(seeds, corpus_dir, seed=0, flips=flips)
    crashed_job = 0
    try:
        run_preprocess(PreprocessConfig(input=corpus_dir, out=os.path.join(work, "fuzz-out"), size=256, workers=2,
                                        files_per_shard=64), progress=False)
    except Exception:
        crashed_job = 1
    cache = open_cache(os.path.join(work, "fuzz-out"))
    errors = cache.errors()
    reasons = dict(zip(errors["source"], errors["reason"]))
    quarantined = read_quarantine(os.path.join(work, "fuzz-out", "parts"))
    cached = set(cache.manifest["source"])
    wrong = sum(1 for item in corpus if item.expect != "either"
                and ("cached" if item.name in cached else "rejected") != item.expect)
    slowest = 0.0
    for item in corpus:  # per-file decode time, in this process
        start = time.perf_counter()
        try:
            read_dicom(os.path.join(corpus_dir, item.name))
        except SkipImage:
            pass
        slowest = max(slowest, time.perf_counter() - start)
    causes = {cause: 0 for cause in ("decoded", "rejected by a check", "worker died", "timed out", "unexpected")}
    causes["decoded"] = len(cached)
    for reason in reasons.values():
        causes[outcome_cause(reason)] += 1
    return {"files": len(corpus), "causes": causes, "quarantined": len(quarantined), "crashed_job": crashed_job,
            "unaccounted": len(corpus) - len(cached) - len(reasons), "against_expectation": wrong,
            "slowest_s": slowest, "file_timeout_s": PreprocessConfig().file_timeout_s}


def outcome_cause(reason: str) -> str:
    """The cause behind an errors.csv reason, by the job's own wording (dicom_preprocess.markers)."""
    if reason == CRASH_REASON or "worker process died" in reason:
        return "worker died"
    if reason.startswith("timed out") or "did not finish within" in reason:
        return "timed out"
    if reason.startswith("unexpected"):
        return "unexpected"
    return "rejected by a check"


def preprocess_kill_trials(work: str, archive, trials: int, kills_per_trial: int = 3) -> dict:
    """Each trial: SIGKILL the job (and its workers) at ``kills_per_trial`` random moments of an
    uninterrupted run's duration, then let one rerun finish; compare with the uninterrupted cache."""
    from dicom_preprocess import open_cache

    def cmd(out: str) -> list:
        return [sys.executable, "-m", "medmoco", "preprocess", "--input", archive.root, "--labels",
                archive.labels_csv, "--out", out, "--size", "64", "--workers", "2", "--files-per-shard", "4", "--quiet"]

    reference = os.path.join(work, "reference")
    start = time.perf_counter()
    subprocess.run(cmd(reference), check=True, cwd=REPO, capture_output=True)
    duration = time.perf_counter() - start
    ref = open_cache(reference)
    rng = random.Random(0)
    matched, kills = 0, 0
    for trial in range(trials):
        out = os.path.join(work, f"killed{trial}")
        for _ in range(kills_per_trial):
            proc = subprocess.Popen(cmd(out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            time.sleep(rng.uniform(0.2, 0.95) * duration)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait()
        subprocess.run(cmd(out), check=True, cwd=REPO, capture_output=True)
        got = open_cache(out)
        same = len(got) == len(ref) and got.manifest.equals(ref.manifest) and all(
            np.array_equal(got[i], ref[i]) for i in range(len(ref)))
        matched += int(same)
    return {"trials": trials, "kills": kills, "matched": matched, "uninterrupted_s": duration}


def pretrain_kill_trials(work: str, cache_dir: str, trials: int, kills_per_trial: int = 2) -> dict:
    """Each trial SIGKILLs `medmoco pretrain` from outside at ``kills_per_trial`` random iterations
    (counted from the losses MLflow received), resuming with --resume auto after each, then lets it
    finish. A trial matches when every kill landed before the run ended, the whole loss history,
    replayed entries included, is the uninterrupted run's (each segment starts right after an epoch
    checkpoint and carries the uninterrupted values), the weights are equal and there is one run."""
    import torch
    import yaml
    from mlflow.tracking import MlflowClient

    epochs, iters = 4, 6

    def config(name: str) -> str:
        data = {"cache": cache_dir, "run_dir": os.path.join(work, name), "splits": ["unsupervised", "train", "test"],
                "image_size": 32, "epochs": epochs, "batch_size": 8, "max_iters_per_epoch": iters,
                "deterministic": True, "keep_checkpoints": epochs,
                "moco": {"arch": "resnet18", "dim": 16, "K": 32, "m": 0.9, "bn_splits": 2}, "workers": 0,
                "knn_every": 0, "log_every": 1, "progress": False,
                "tracking": {"uri": f"sqlite:///{os.path.join(work, name + '.db')}", "experiment": "faults"}}
        path = os.path.join(work, name + ".yaml")
        with open(path, "w") as handle:
            yaml.safe_dump(data, handle)
        return path

    def history(name: str) -> list:
        """[(iteration, loss), ...] in the order logged, replayed iterations included."""
        client = MlflowClient(tracking_uri=f"sqlite:///{os.path.join(work, name + '.db')}")
        run_id = open(os.path.join(work, name, "mlflow_run_id")).read().strip()
        return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "loss"),
                                                  key=lambda m: (m.timestamp, m.step))]

    def runs(name: str) -> int:
        client = MlflowClient(tracking_uri=f"sqlite:///{os.path.join(work, name + '.db')}")
        return len(client.search_runs([client.get_experiment_by_name("faults").experiment_id]))

    def segments_resume_at_checkpoints(steps: list) -> bool:
        starts = [i for i in range(1, len(steps)) if steps[i] != steps[i - 1] + 1]
        return steps[0] == 1 and all((steps[i] - 1) % iters == 0 for i in starts) and steps[-1] == epochs * iters

    cmd = [sys.executable, "-m", "medmoco", "pretrain", "--config"]
    subprocess.run(cmd + [config("straight")], check=True, capture_output=True, cwd=REPO)
    straight = dict(history("straight"))
    reference = torch.load(os.path.join(work, "straight", "backbone.pt"), weights_only=True)["state_dict"]
    rng = random.Random(1)
    matched, landed = 0, 0
    for trial in range(trials):
        name = f"pkilled{trial}"
        ok = True
        for k in range(kills_per_trial):
            resume = ["--resume", "auto"] if k else []
            proc = subprocess.Popen(cmd + [config(name)] + resume, cwd=REPO, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            target = rng.randint(2 + k * 10, 10 + k * 10)  # an iteration (of 24), counted from the logged losses
            while proc.poll() is None:
                try:
                    if len(history(name)) >= target:
                        break
                except Exception:
                    pass
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            finished = os.path.exists(os.path.join(work, name, "backbone.pt"))
            landed += int(proc.returncode == -signal.SIGKILL and not finished)
            ok &= proc.returncode == -signal.SIGKILL and not finished
        subprocess.run(cmd + [config(name), "--resume", "auto"], check=True, capture_output=True, cwd=REPO)
        got = history(name)
        weights = torch.load(os.path.join(work, name, "backbone.pt"), weights_only=True)["state_dict"]
        ok &= all(value == straight.get(step) for step, value in got) and \
            segments_resume_at_checkpoints([step for step, _ in got])
        ok &= runs(name) == 1 and all(torch.equal(weights[k], reference[k]) for k in reference)
        matched += int(ok)
    return {"trials": trials, "matched": matched, "kills": trials * kills_per_trial, "landed": landed}


def bomb_memory(work: str, seeds: list[str]) -> dict:
    import pydicom

    from tests.hostile import read_memory_growth

    corpus = [os.path.join(work, "corpus", name) for name in sorted(os.listdir(os.path.join(work, "corpus")))
              if name.startswith("ID_bomb")]
    claimed = 0
    for path in corpus:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        claimed = max(claimed, int(ds.Rows) * int(ds.Columns) * 2 * frames)
    growth = read_memory_growth(seeds[0], corpus)["growth_mb"]
    return {"files": len(corpus), "growth_mb": growth,
            "largest_claim_mb": claimed / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flips", type=int, default=200, help="header and pixel flip variants each")
    parser.add_argument("--kills", type=int, default=5, help="preprocessing kill-and-resume trials")
    parser.add_argument("--pretrain-kills", type=int, default=4)
    args = parser.parse_args()
    from dicom_preprocess.config import PreprocessConfig
    from dicom_preprocess.job import run_preprocess
    from dicom_preprocess.synthetic import synthesize

    with tempfile.TemporaryDirectory(prefix="medmoco-faults-") as work:
        archive = synthesize(os.path.join(work, "synth"), patients=6, seed=1, slices_per_series=(5, 8))
        seeds = _square_seeds(archive.images_dir)
        fuzz = fuzz_figures(work, seeds, args.flips)
        bombs = bomb_memory(work, seeds)
        kills = preprocess_kill_trials(work, archive, args.kills)
        tiny = os.path.join(work, "tiny")
        run_preprocess(PreprocessConfig(input=archive.images_dir, labels=archive.labels_csv, out=tiny, size=32,
                                        workers=1, split_fractions={"unsupervised": 0.4, "train": 0.4, "test": 0.2}),
                       progress=False)
        pkills = pretrain_kill_trials(work, tiny, args.pretrain_kills)
    print("| figure | value |")
    print("| --- | --- |")
    c = fuzz["causes"]
    print(f"| fuzz corpus files | {fuzz['files']} |")
    print(f"| decoded into the cache | {c['decoded']} |")
    print(f"| rejected by a check (reason in errors.csv) | {c['rejected by a check']} |")
    print(f"| worker died / timed out (of which quarantined) | {c['worker died']} / {c['timed out']} "
          f"({fuzz['quarantined']}) |")
    print(f"| unexpected reader error / job crashed / unaccounted | {c['unexpected']} / {fuzz['crashed_job']} / "
          f"{fuzz['unaccounted']} |")
    print(f"| outcome against the corpus's expectation | {fuzz['against_expectation']} wrong |")
    print(f"| slowest file (decode, one core) | {fuzz['slowest_s'] * 1000:.1f} ms (bound "
          f"{fuzz['file_timeout_s']:.0f} s) |")
    print(f"| header bombs: peak RSS growth vs largest claim | {bombs['growth_mb']:.1f} MB vs "
          f"{bombs['largest_claim_mb']:,.0f} MB ({bombs['files']} files) |")
    print(f"| preprocess kill -9 (x3 per trial) + rerun == uninterrupted | {kills['matched']}/{kills['trials']} "
          f"({kills['kills']} kills landed) |")
    print(f"| pretrain kill -9 (x2 per trial) + --resume auto == uninterrupted (whole loss history with replays, "
          f"weights, one MLflow run) | {pkills['matched']}/{pkills['trials']} ({pkills['landed']} of "
          f"{pkills['kills']} kills landed before the run ended) |")
    print(json.dumps({"fuzz": fuzz, "bombs": bombs, "preprocess_kills": kills, "pretrain_kills": pkills}))


if __name__ == "__main__":
    main()
