"""The chunk store: rows streamed to disk while a chunk decodes, a chunk absent or whole."""
import errno
import json
import os
import time

import numpy as np
import pytest

from dicom_preprocess import cache as cache_io
from dicom_preprocess.cache import ChunkWriter, chunk_done, chunk_stem, remove_partial_chunks

ROW = (3, 8, 8)  # 192 bytes a row


def _row(value: int) -> np.ndarray:
    return np.full(ROW, value % 256, dtype=np.uint8)


@pytest.fixture
def small_batches(monkeypatch):
    """Batches of 4 rows, so that a few inputs already make the writer thread store some."""
    monkeypatch.setattr(ChunkWriter, "BATCH_BYTES", 4 * int(np.prod(ROW)))


def _wait_for_size(path: str, size: int, timeout: float = 10.0) -> int:
    deadline = time.time() + timeout
    while os.path.getsize(path) < size and time.time() < deadline:
        time.sleep(0.01)
    return os.path.getsize(path)


def test_rows_are_written_while_the_chunk_decodes_and_the_file_holds_exactly_the_committed_rows(tmp_path,
                                                                                                  small_batches):
    writer = ChunkWriter(str(tmp_path), 3, ROW, capacity=4)
    expected = []
    for value in range(10):  # ten one-slice inputs, past the capacity of 4 (the buffer grows)
        writer.next_row()[:] = _row(value)
        writer.commit()
        expected.append(value)
    # the writer thread has stored at least two batches before the chunk ends
    assert _wait_for_size(writer.tmp, writer.data_offset + 8 * 192) >= writer.data_offset + 8 * 192
    assert not os.path.exists(f"{chunk_stem(str(tmp_path), 3)}.npy")  # not under its final name yet
    # a volume that fails after three slices: its rows are dropped
    for value in (100, 101, 102):
        writer.next_row()[:] = _row(value)
    writer.truncate(10)
    writer.next_row()[:] = _row(11)
    writer.commit()
    expected.append(11)
    writer.finish([{"image_id": f"ID_{v}"} for v in expected], [{"source": "bad.nii", "reason": "truncated"}])

    stored = np.load(f"{chunk_stem(str(tmp_path), 3)}.npy", mmap_mode="r")
    assert stored.shape == (len(expected),) + ROW
    assert [int(r[0, 0, 0]) for r in stored] == expected
    assert chunk_done(str(tmp_path), 3)
    info = cache_io.read_chunk_json(str(tmp_path), 3)
    assert len(info["records"]) == len(expected) and info["errors"][0]["source"] == "bad.nii"
    assert [p for p in os.listdir(tmp_path) if ".tmp" in p] == []


def test_a_reused_buffer_carries_nothing_of_the_previous_chunk(tmp_path):
    first = ChunkWriter(str(tmp_path), 0, ROW, capacity=6)
    for value in range(6):
        first.next_row()[:] = _row(value)
        first.commit()
    first.finish([{}] * 6, [])
    second = ChunkWriter(str(tmp_path), 1, ROW, capacity=6, rows=first.rows)
    assert second.rows is first.rows  # the buffer is reused, not allocated again
    for value in (50, 51):
        second.next_row()[:] = _row(value)
        second.commit()
    second.finish([{}] * 2, [])
    stored = np.load(f"{chunk_stem(str(tmp_path), 1)}.npy")
    assert [int(r[0, 0, 0]) for r in stored] == [50, 51]


def test_an_aborted_chunk_leaves_no_file(tmp_path, small_batches):
    writer = ChunkWriter(str(tmp_path), 0, ROW, capacity=8)
    for value in range(8):
        writer.next_row()[:] = _row(value)
        writer.commit()
    writer.abort()
    assert os.listdir(tmp_path) == []
    assert not chunk_done(str(tmp_path), 0)


def test_a_full_disk_met_by_the_writer_thread_reaches_the_decoder_as_enospc(tmp_path, small_batches):
    """/dev/full answers every write with ENOSPC: the temporary file is made a link to it."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    os.symlink("/dev/full", f"{chunk_stem(str(tmp_path), 0)}.npy.tmp{os.getpid()}")
    writer = ChunkWriter(str(tmp_path), 0, ROW, capacity=16)
    with pytest.raises(OSError) as raised:  # from a commit, while the chunk is still decoding
        for value in range(500):
            writer.next_row()[:] = _row(value)
            writer.commit()
            time.sleep(0.01)  # give the writer thread its turn
    assert raised.value.errno == errno.ENOSPC
    writer.abort()
    assert not chunk_done(str(tmp_path), 0)


def test_write_chunk_stores_a_whole_array_in_the_same_format(tmp_path):
    pixels = np.arange(5 * 192, dtype=np.uint8).reshape((5,) + ROW)
    cache_io.write_chunk(str(tmp_path), 2, pixels, [{"image_id": str(i)} for i in range(5)], [])
    np.testing.assert_array_equal(np.load(f"{chunk_stem(str(tmp_path), 2)}.npy"), pixels)
    with open(f"{chunk_stem(str(tmp_path), 2)}.json") as handle:
        assert json.load(handle)["chunk"] == 2


def test_write_chunk_refuses_pixels_that_are_not_uint8(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        cache_io.write_chunk(str(tmp_path), 0, np.zeros((2,) + ROW, np.int16), [{}, {}], [])
    assert os.listdir(tmp_path) == []


def test_remove_partial_chunks_deletes_what_a_killed_run_left_and_nothing_else(tmp_path):
    stem = chunk_stem(str(tmp_path), 7)
    for name in (f"{stem}.npy.tmp123", f"{stem}.json.tmp123", f"{chunk_stem(str(tmp_path), 6)}.npy.tmp5",
                 f"{chunk_stem(str(tmp_path), 8)}.npy.tmp9"):
        open(name, "wb").close()
    cache_io.write_chunk(str(tmp_path), 7, np.zeros((1,) + ROW, np.uint8), [{}], [])
    remove_partial_chunks(str(tmp_path), [6, 7])
    assert sorted(os.listdir(tmp_path)) == ["chunk_000007.json", "chunk_000007.npy", "chunk_000008.npy.tmp9"]


def test_the_cache_records_and_gives_its_grouping_unit(tiny_cache):
    from dicom_preprocess import open_cache

    cache = open_cache(tiny_cache)
    assert cache.metadata["group_unit"] == cache.group_unit == "patient, else study"
    groups = cache.groups()
    with_id = (cache.manifest["patient_id"] != "").to_numpy()
    assert (groups[with_id] == cache.manifest["patient_id"].to_numpy()[with_id]).all()
    assert (groups[~with_id] == cache.manifest["study_uid"].to_numpy()[~with_id]).all()
    rows = cache.indices("test")
    assert list(cache.groups(rows)) == list(groups[rows])
