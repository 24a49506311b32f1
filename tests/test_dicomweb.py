"""DICOMweb in and out against a real Orthanc (Debian's orthanc + orthanc-dicomweb, started here on
127.0.0.1 and stopped by PID): a PACS preprocessed and predicted from gives what the same files in
a folder give, a query selects one study, STOW-RS stores a file Orthanc then lists, and a server
killed mid-study loses nothing cached, names the study, and a rerun completes the cache."""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from dicom_preprocess import open_cache
from dicom_preprocess.config import PreprocessConfig
from dicom_preprocess.job import run_preprocess
from dicom_preprocess.sources import Source, SourceUnavailable, open_source
from dicom_preprocess.synthetic import synthesize

from .conftest import caches_equal
from .servers import OrthancServer, orthanc_missing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_SERIES = os.path.join(REPO, "..", "shared", "data", "rsna-train-12series")
# Two real series of different encodings: explicit VR 16-bit signed with a -2000 pad and slices
# sharing positions; implicit VR 12-bit unsigned
TWO_SERIES = ("ID_72952d87fa", "ID_44cfc8e964")
SIZE, FILES_PER_SHARD = 32, 8  # every cache here is chunked alike: manifests compare shard and row too


def cache_config(input_spec: str, out, **over) -> PreprocessConfig:
    settings = {"size": SIZE, "workers": 1, "files_per_shard": FILES_PER_SHARD, **over}
    return PreprocessConfig(input=input_spec, out=str(out), **settings)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One folder: a small synthetic archive (64 px) and, where the shared data is, two real series."""
    import pydicom
    import pydicom.config

    tmp = tmp_path_factory.mktemp("dicomweb-files")
    folder = tmp / "files"
    folder.mkdir()
    synth = synthesize(str(tmp / "synth"), patients=3, seed=5, rows=64, slices_per_series=(4, 6))
    for path in glob.glob(os.path.join(synth.images_dir, "*.dcm")):
        shutil.copy(path, folder)
    real = []
    if os.path.isdir(REAL_SERIES):
        # RSNA's ID_ UIDs: pydicom warns for each header read; not the matter here
        monkeypatch = pytest.MonkeyPatch()
        monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
        for path in sorted(glob.glob(os.path.join(REAL_SERIES, "*.dcm"))):
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            if header.SeriesInstanceUID in TWO_SERIES:
                shutil.copy(path, folder)
                real.append(os.path.basename(path))
        monkeypatch.undo()
    return SimpleNamespace(folder=str(folder), real=real, names=sorted(os.listdir(folder)))


@pytest.fixture(scope="module")
def orthanc(files, tmp_path_factory):
    """An Orthanc holding every file of ``files`` (uploaded with REST ``POST /instances``)."""
    missing = orthanc_missing()
    if missing:
        pytest.skip(f"Orthanc is not installed here ({', '.join(missing)} missing; `make services` installs "
                    "orthanc and orthanc-dicomweb with apt where it can)")
    pytest.importorskip("dicomweb_client", reason="dicomweb-client is not installed (pip install dicomweb-client)")
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"))
    try:
        server.start()
    except Exception as err:  # pragma: no cover - reported, not hidden
        server.stop(kill=True)
        pytest.skip(f"Orthanc did not start here: {err}")
    try:
        server.upload(os.path.join(files.folder, name) for name in files.names)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def files_cache(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("dicomweb-files-cache")
    run_preprocess(cache_config(files.folder, out), progress=False)
    return str(out)


def web(orthanc, query: str = "") -> str:
    return f"dicomweb+{orthanc.dicomweb}" + (f"?{query}" if query else "")


def test_preprocess_from_dicomweb_equals_files(orthanc, files, files_cache, tmp_path):
    """Two worker processes read the server (the instances go to them by name, as archive members
    do) and the cache is the folder's: manifest, pixels and errors."""
    out = tmp_path / "web"
    summary = run_preprocess(cache_config(web(orthanc), out, workers=2), progress=False)
    assert summary.finalized and summary.files == len(files.names)
    a, b = open_cache(files_cache), open_cache(str(out))
    caches_equal(a, b)
    assert len(a) == len(files.names)
    pd.testing.assert_frame_equal(a.errors(), b.errors())
    assert a.metadata["input_fingerprint"] != b.metadata["input_fingerprint"]  # it names the server and query


def test_real_series_are_served_as_stored(orthanc, files):
    """WADO-RS hands over the stored bytes (transfer-syntax=*): implicit VR stays implicit."""
    if not files.real:
        pytest.skip(f"real RSNA series not found at {os.path.abspath(REAL_SERIES)} "
                    "(../shared/data/rsna-train-12series): only the synthetic archive went through Orthanc")
    source = open_source(web(orthanc))
    listed = {s.name: s for s in source.list()}
    assert set(files.real) <= set(listed)
    chosen = [listed[name] for name in files.real[::8]]
    for item, data in source.read_many(chosen):
        with open(os.path.join(files.folder, item.name), "rb") as handle:
            assert data == handle.read(), item.name


def test_study_query_selects_one_study(orthanc, files_cache, tmp_path):
    reference = open_cache(files_cache)
    counts = reference.manifest.groupby("study_uid").size()
    study = counts.index[counts.argmax()]
    out = tmp_path / "one-study"
    run_preprocess(cache_config(web(orthanc, f"StudyInstanceUID={study}"), out), progress=False)
    cache = open_cache(str(out))
    assert set(cache.manifest["study_uid"]) == {study}
    assert len(cache) == counts[study] < len(reference)
    rows = {image: i for i, image in enumerate(reference.manifest["image_id"])}
    for i, image in enumerate(cache.manifest["image_id"]):
        np.testing.assert_array_equal(cache[i], reference[rows[image]])


@pytest.fixture(scope="module")
def classifier(files_cache, tmp_path_factory):
    """An untrained resnet18 saved as `medmoco finetune` saves one, for this cache's preprocessing."""
    import torch

    from medmoco.models import save_classifier
    from medmoco.models.classifier import Classifier

    torch.manual_seed(0)
    cache = open_cache(files_cache)
    path = str(tmp_path_factory.mktemp("dicomweb-model") / "model.pt")
    return save_classifier(Classifier("resnet18", 3), path, "resnet18", 3, 0, SIZE, "scratch",
                           {**cache.metadata, "modalities": ["CT"]})


def test_predict_from_dicomweb_equals_files(orthanc, files, classifier, tmp_path):
    from pipelines.evaluate import predict

    by_file = predict(classifier, files.folder, str(tmp_path / "files.csv"))
    by_web = predict(classifier, web(orthanc), str(tmp_path / "web.csv"))
    assert by_file["images"] == by_web["images"] == len(files.names)
    with open(tmp_path / "files.csv") as a, open(tmp_path / "web.csv") as b:
        assert a.read() == b.read()


def test_stow_stores_the_srs_of_a_prediction_from_dicomweb(orthanc, files_cache, classifier, tmp_path, capsys):
    """`predict --input dicomweb+... --sr DIR --stow URL`: one SR per series of the study is written
    and stored beside its study on the server, which lists it and serves it back (highdicom reads
    it, and it references that series' images); a file without SOPClassUID (as RSNA's) is refused
    by name (Orthanc's STOW-RS answers 400)."""
    import highdicom as hd
    import pydicom
    from pydicom.data import get_testdata_file

    from dicom_preprocess.sources.dicomweb import connect, store
    from pipelines.cli import main

    sr_dir = tmp_path / "sr"
    manifest = open_cache(files_cache).manifest
    study = manifest["study_uid"].iloc[0]
    series = set(manifest.loc[manifest["study_uid"] == study, "series_uid"])
    client = connect(orthanc.dicomweb)
    try:
        code = main(["predict", "--model", classifier, "--input", web(orthanc, f"StudyInstanceUID={study}"),
                     "--out", str(tmp_path / "sub.csv"), "--sr", str(sr_dir), "--stow", orthanc.dicomweb])
        assert code == 0
        out = capsys.readouterr().out
        assert f"{len(series)} DICOM SRs -> {sr_dir}" in out
        assert f"{len(series)} DICOM files of {sr_dir} stored at {orthanc.dicomweb}" in out
        found = client.search_for_instances(study_instance_uid=study, search_filters={"Modality": "SR"})
        assert len(found) == len(series)
        for item in found:
            served = client.retrieve_instance(study, item["0020000E"]["Value"][0], item["00080018"]["Value"][0])
            report = hd.sr.ComprehensiveSR.from_dataset(served)
            evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
            assert {str(e.SeriesInstanceUID) for e in evidence} <= series
        unclassed = tmp_path / "no-class.dcm"
        other = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
        del other.SOPClassUID
        other.SOPInstanceUID = pydicom.uid.generate_uid()
        other.save_as(unclassed)
        with pytest.raises(ValueError, match="no-class.dcm.*HTTP 400"):
            store(orthanc.dicomweb, [str(unclassed)])
    finally:  # the server holds the archive alone again, for the other tests
        for item in client.search_for_instances(study_instance_uid=study, search_filters={"Modality": "SR"}):
            for hit in orthanc.rest("/tools/lookup", "POST", item["00080018"]["Value"][0]):
                orthanc.rest(hit["Path"], "DELETE")


def test_server_killed_mid_study(orthanc, files, files_cache, tmp_path, monkeypatch):
    """Orthanc SIGKILLed while the job streams: the chunks stored before stay as they are, the job
    names the study it was reading and lists every instance not read in errors.csv, and the same
    command after a restart reads only the chunks that lack instances, into the folder's cache."""
    from dicom_preprocess.sources import dicomweb

    kill_at = 3 * FILES_PER_SHARD - 2  # a few chunks in (2 stored, the third in flight)
    calls, lock, original = {"n": 0}, threading.Lock(), dicomweb.DicomWebSource.retrieve

    def retrieve(self, source):
        with lock:
            calls["n"] += 1
            if calls["n"] == kill_at:
                orthanc.stop(kill=True)
        return original(self, source)

    monkeypatch.setattr(dicomweb.DicomWebSource, "retrieve", retrieve)
    monkeypatch.setattr(dicomweb, "RETRY_WAIT_MS", 20)  # its retries (30 s by default) would find it down too
    config = cache_config(web(orthanc), tmp_path / "web")
    parts = tmp_path / "web" / "parts"
    try:
        with pytest.raises(SourceUnavailable) as caught:
            run_preprocess(config, progress=False)
    finally:
        monkeypatch.undo()
        orthanc.start()
    message = str(caught.value)
    assert "rerun the same command" in message
    assert not (tmp_path / "web" / "metadata.json").exists()  # no cache that silently lacks instances
    retry = {int(p.name[6:12]) for p in parts.glob("retry_*.txt")}
    kept = {int(p.name[6:12]): p for p in parts.glob("chunk_*.json") if int(p.name[6:12]) not in retry}
    assert kept and retry and min(retry) > max(kept)  # nothing after the kill is taken for done
    before = {p: os.stat(p).st_mtime_ns for c in kept for p in (kept[c], kept[c].with_suffix(".npy"))}
    cached = {r["source"] for p in parts.glob("chunk_*.json") for r in json.loads(p.read_text())["records"]}
    errors = pd.read_csv(tmp_path / "web" / "errors.csv")
    assert set(errors["source"]) == set(files.names) - cached  # every instance not read, named
    assert errors["reason"].str.contains("study ").all()
    # the message names the study of a request the dead server failed (the killing one, or one in
    # flight beside it), and every study with instances not read
    refused = errors[errors["reason"].str.startswith("DICOMweb") & errors["reason"].str.contains("unreachable")]
    named = re.search(r": study (\S+), series", message).group(1)
    assert refused["reason"].str.contains(f"study {named},").any()
    studies = {s.location[0] for s in open_source(web(orthanc)).list() if s.name in set(errors["source"])}
    assert all(study in message for study in studies)

    summary = run_preprocess(config, progress=False)
    assert summary.finalized and summary.reused_files == len(kept) * FILES_PER_SHARD
    assert summary.files == len(files.names) - summary.reused_files
    assert {p: os.stat(p).st_mtime_ns for p in before} == before  # the kept chunks were not written again
    assert not list(parts.glob("retry_*.txt")) and not (parts / "unavailable.txt").exists()
    caches_equal(open_cache(files_cache), open_cache(str(tmp_path / "web")))


class _Answers:
    """A stand-in DICOMweb client answering retrieve_instance from a table: bytes, or an HTTP status."""

    def __init__(self, answers: dict):
        self.answers, self.asked = answers, []

    def retrieve_instance(self, study, series, sop, media_types=None):
        import io

        import requests

        self.asked.append(sop)
        answer = self.answers[sop]
        if isinstance(answer, int):
            response = requests.Response()
            response.status_code = answer
            raise requests.HTTPError(f"{answer}", response=response)
        return SimpleNamespace(buffer=io.BytesIO(answer))


def test_5xx_stops_the_chunk_and_404_skips_one(monkeypatch):
    """A 502 mid-study: that instance and the rest of the chunk come back SourceUnavailable naming
    their study, and nothing more is requested; a 404 is one instance gone, the next is read."""
    pytest.importorskip("dicomweb_client")
    from dicom_preprocess.sources.dicomweb import DicomWebSource

    source = DicomWebSource("dicomweb+http://127.0.0.1:9/dicom-web")
    items = [Source(f"{sop}.dcm", "dicom", 0, "", (study, "S", sop))
             for study, sop in (("A", "1"), ("A", "2"), ("A", "3"), ("B", "4"), ("B", "5"), ("B", "6"), ("C", "7"))]
    fake = _Answers({"1": b"one", "2": 404, "3": b"three", "4": 502, "5": b"five", "6": b"six", "7": b"seven"})
    monkeypatch.setattr(source, "_client", fake)
    monkeypatch.setattr("dicom_preprocess.sources.dicomweb.PREFETCH", 1)  # requests in order, one at a time
    got = list(source.read_many(items))
    assert [data for _, data in got[:3:2]] == [b"one", b"three"]
    assert isinstance(got[1][1], FileNotFoundError) and "404" in str(got[1][1])
    assert all(isinstance(data, SourceUnavailable) for _, data in got[3:])
    assert "study B" in str(got[3][1]) and "HTTP 502" in str(got[3][1])
    assert "study C" in str(got[6][1]) and "from study B on" in str(got[6][1])
    assert fake.asked == ["1", "2", "3", "4"]


def test_addresses():
    from dicom_preprocess.sources.dicomweb import parse_address

    assert parse_address("dicomweb+http://h:8042/dicom-web/?StudyInstanceUID=ID_1,ID_2&PatientID=P") == \
        ("http://h:8042/dicom-web", {"StudyInstanceUID": "ID_1,ID_2", "PatientID": "P"})
    with pytest.raises(ValueError, match="MEDMOCO_DICOMWEB_USER") as caught:
        parse_address("dicomweb+https://alice:secret@pacs/dicom-web")
    assert "secret" not in str(caught.value)
    with pytest.raises(ValueError, match="given twice"):
        parse_address("dicomweb+http://h/dw?PatientID=a&PatientID=b")


def test_imports_without_dicomweb_client():
    """dicom_preprocess and the CLI import without dicomweb-client; a DICOMweb input then says
    what to install, and folders still work."""
    code = ("import sys; sys.modules['dicomweb_client'] = None\n"
            "import dicom_preprocess.job, dicom_preprocess.worker, pipelines.cli\n"
            "from dicom_preprocess.sources import open_source\n"
            f"assert open_source({REPO!r}).kind == 'folder'\n"
            "try:\n    open_source('dicomweb+http://127.0.0.1:9/dicom-web')\n"
            "except ImportError as err:\n    print(err)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pip install dicomweb-client" in result.stdout
