"""Fault figures: what happens to hostile files, killed jobs and header bombs.

    python benchmarks/faults.py [--flips 200] [--kills 5] [--pretrain-kills 2]

1. Fuzz corpus (tests/hostile.py) through the real preprocessing job: files, cached,
   rejected with a reason, crashed (an "unexpected" reason or a job exception), hung (a per-file
   timeout), and the slowest file against the per-file bound.
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
    return {"files": len(corpus), "cached": len(cached), "rejected": len(reasons),
            "crashed": crashed_job + sum(r.startswith("unexpected") for r in reasons.values()),
            "hung": sum(r.startswith("timed out") for r in reasons.values()), "unaccounted":
            len(corpus) - len(cached) - len(reasons), "against_expectation": wrong, "slowest_s": slowest,
            "file_timeout_s": PreprocessConfig().file_timeout_s}


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


def pretrain_kill_trials(work: str, cache_dir: str, trials: int) -> dict:
    import torch
    import yaml
    from mlflow.tracking import MlflowClient

    def config(name: str) -> str:
        data = {"cache": cache_dir, "run_dir": os.path.join(work, name), "splits": ["unsupervised", "train", "test"],
                "image_size": 32, "epochs": 4, "batch_size": 8, "max_iters_per_epoch": 6, "deterministic": True,
                "moco": {"arch": "resnet18", "dim": 16, "K": 32, "m": 0.9, "bn_splits": 2}, "workers": 0,
                "knn_every": 0, "log_every": 1, "progress": False,
                "tracking": {"uri": f"sqlite:///{os.path.join(work, name + '.db')}", "experiment": "faults"}}
        path = os.path.join(work, name + ".yaml")
        with open(path, "w") as handle:
            yaml.safe_dump(data, handle)
        return path

    def losses(name: str) -> dict:
        """{iteration: loss} of the job's run (iterations replayed after a resume are logged twice,
        with the same value), and how many runs the job made (one)."""
        client = MlflowClient(tracking_uri=f"sqlite:///{os.path.join(work, name + '.db')}")
        run_id = open(os.path.join(work, name, "mlflow_run_id")).read().strip()
        return {m.step: m.value for m in client.get_metric_history(run_id, "loss")}

    def runs(name: str) -> int:
        client = MlflowClient(tracking_uri=f"sqlite:///{os.path.join(work, name + '.db')}")
        return len(client.search_runs([client.get_experiment_by_name("faults").experiment_id]))

    cmd = [sys.executable, "-m", "medmoco", "pretrain", "--config"]
    subprocess.run(cmd + [config("straight")], check=True, capture_output=True, cwd=REPO)
    reference = torch.load(os.path.join(work, "straight", "backbone.pt"), weights_only=True)["state_dict"]
    rng = random.Random(1)
    matched = 0
    for trial in range(trials):
        name = f"pkilled{trial}"
        proc = subprocess.Popen(cmd + [config(name)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = rng.randint(2, 20)  # an iteration (of 24), counted from the losses MLflow received
        while proc.poll() is None:
            try:
                if len(losses(name)) >= target:
                    break
            except Exception:
                pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        subprocess.run(cmd + [config(name), "--resume", "auto"], check=True, capture_output=True, cwd=REPO)
        weights = torch.load(os.path.join(work, name, "backbone.pt"), weights_only=True)["state_dict"]
        same = losses(name) == losses("straight") and runs(name) == 1 and all(
            torch.equal(weights[k], reference[k]) for k in reference)
        matched += int(same)
    return {"trials": trials, "matched": matched}


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
    print(f"| fuzz corpus files | {fuzz['files']} |")
    print(f"| cached / rejected with a reason | {fuzz['cached']} / {fuzz['rejected']} |")
    print(f"| crashed / hung / unaccounted | {fuzz['crashed']} / {fuzz['hung']} / {fuzz['unaccounted']} |")
    print(f"| outcome against the corpus's expectation | {fuzz['against_expectation']} wrong |")
    print(f"| slowest file (decode, one core) | {fuzz['slowest_s'] * 1000:.1f} ms (bound "
          f"{fuzz['file_timeout_s']:.0f} s) |")
    print(f"| header bombs: peak RSS growth vs largest claim | {bombs['growth_mb']:.1f} MB vs "
          f"{bombs['largest_claim_mb']:,.0f} MB ({bombs['files']} files) |")
    print(f"| preprocess kill -9 (x3 per trial) + rerun == uninterrupted | {kills['matched']}/{kills['trials']} "
          f"({kills['kills']} kills landed) |")
    print(f"| pretrain kill -9 + --resume auto == uninterrupted (losses, weights, one MLflow run) | "
          f"{pkills['matched']}/{pkills['trials']} |")
    print(json.dumps({"fuzz": fuzz, "bombs": bombs, "preprocess_kills": kills, "pretrain_kills": pkills}))


if __name__ == "__main__":
    main()
