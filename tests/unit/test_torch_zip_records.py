"""Crafted faults of torch archives and DCP metadata: each either loads exactly or is a
CheckpointError naming the file, the problem (and key) and the way out. An unreadable file (the
reader in a child process as nobody) is in tests/e2e/test_os_faults.py."""

from __future__ import annotations

import io
import pickle
import warnings

import pytest
import torch
from torch_zip_helpers import (
    central_directory, members, patch_pickle_int, record_spans, repack, sample_state, saved,
)

import graft
from graft.errors import CheckpointError


def _write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _assert_reads_like_torch(path) -> None:
    ref = torch.load(path, weights_only=True)
    with graft.open(path) as ckpt:
        assert sorted(ckpt.keys()) == sorted(ref)
        for key, value in ref.items():
            got = ckpt.tensor(key)
            assert got.dtype == value.dtype and torch.equal(got, value), key


def _refused(path, *words: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        with graft.open(path) as ckpt:
            for key in ckpt.keys():
                ckpt.tensor(key)
    err = info.value
    assert str(path) in str(err) and err.way_out, err
    for word in words:
        assert word in str(err), (word, str(err))
    return err


# -- zip layout -----------------------------------------------------------------------
def test_python_zipfile_repack_loads_the_right_values(tmp_path):
    clean = saved(sample_state())
    data = repack(clean, reverse=True, extra=b"\xfe\xca\x06\x00abcdef", comment=b"repacked")
    path = _write(tmp_path, "repacked.pth", data)
    # The defect this guards against: torch's meta loading computes offsets for its own
    # writer's layout, which this archive does not have.
    meta = torch.load(path, weights_only=True, map_location="meta")
    true = {name.rsplit("/", 1)[1]: start for name, (_, start, _) in record_spans(data).items() if "/data/" in name}
    computed = {t.untyped_storage()._checkpoint_offset for t in meta.values()}
    assert computed - set(true.values()), "the repack should defeat computed offsets"
    _assert_reads_like_torch(path)
    model_keys = sample_state()
    with graft.open(path) as ckpt:  # contiguous tensors are read as plain byte ranges
        span = ckpt.span("a.v")
        assert span is not None and span.offset == true["0"] + 6 * 4 and span.nbytes == 6 * 4
        assert ckpt.span("t") is None and torch.equal(ckpt.tensor("t"), model_keys["t"])


def test_compressed_record_is_refused(tmp_path):
    path = _write(tmp_path, "deflated.pth", repack(saved(sample_state()), compress="/data/0"))
    _refused(path, "compressed", "ZIP_STORED")


@pytest.mark.parametrize("delta", [-4, 4])
def test_record_shorter_or_longer_than_the_pickle_says(tmp_path, delta):
    state = {"w": torch.arange(10, dtype=torch.float32)}
    clean = saved(state)
    body = dict((info.filename, b) for info, b in members(clean))
    name = next(n for n in body if n.endswith("/data/0"))
    changed = body[name][:delta] if delta < 0 else body[name] + b"\0" * delta
    path = _write(tmp_path, "resized.pth", repack(clean, replace={"/data/0": changed}))
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)  # torch refuses too
    _refused(path, "storage '0'", "40 bytes", f"holds {40 + delta}")


def test_storage_offset_past_the_end(tmp_path):
    base = torch.arange(37, dtype=torch.float32)
    clean = saved({"v": base[29:34]})  # storage_offset 29 of 37 elements
    pkl_name, pkl = next((i.filename, b) for i, b in members(clean) if i.filename.endswith("data.pkl"))
    path = _write(tmp_path, "offset.pth", repack(clean, replace={"/data.pkl": patch_pickle_int(pkl, 29, 35)}))
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    _refused(path, "'v'", "past the end of its storage")


def test_truncated_file(tmp_path):
    data = saved(sample_state())
    for cut in (10, len(data) // 2, len(data) - 5):
        _refused(_write(tmp_path, f"cut{cut}.pth", data[:cut]), "corrupt or truncated")


def test_flipped_pickle_byte(tmp_path):
    data = bytearray(saved(sample_state()))
    _, start, size = next(v for k, v in record_spans(bytes(data)).items() if k.endswith("data.pkl"))
    for pos in (start + 2, start + size // 2, start + size - 1):
        mutant = bytearray(data)
        mutant[pos] ^= 0x5A
        _refused(_write(tmp_path, f"flip{pos}.pth", bytes(mutant)))


def test_damaged_central_directory(tmp_path):
    data = saved(sample_state())
    offset, size = central_directory(data)
    mutant = bytearray(data)
    mutant[offset : offset + 4] = b"XXXX"
    _refused(_write(tmp_path, "cd.pth", bytes(mutant)), "central directory")
    _refused(_write(tmp_path, "no_cd.pth", data[:offset] + data[offset + size :]))


# -- DCP metadata ---------------------------------------------------------------------
@pytest.fixture
def dcp_folder(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "dcp"
    state = {"w": torch.randn(8, 4), "b": torch.arange(5, dtype=torch.int32)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving in a single process"
        dcp.save(state, checkpoint_id=str(folder))
    return folder, state


def _rewrite_chunks(folder, fqn: str, chunks: list[tuple[list[int], list[int]]], size=None, length=None):
    """Replace the chunks of `fqn` in .metadata (each pointing at the tensor's one record)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    path = folder / ".metadata"
    md = pickle.loads(path.read_bytes())  # our own file, written just now
    tmd = md.state_dict_metadata[fqn]
    info = md.storage_data.pop(MetadataIndex(fqn, tmd.chunks[0].offsets))
    if length is not None:
        info.length = length
    if size is not None:
        tmd.size = torch.Size(size)
    tmd.chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks]
    for o, _ in chunks:
        md.storage_data[MetadataIndex(fqn, o)] = info
    buf = io.BytesIO()
    pickle.dump(md, buf)
    path.write_bytes(buf.getvalue())


def test_dcp_folder_reads_exactly(dcp_folder):
    folder, state = dcp_folder
    with graft.open(folder) as ckpt:
        for key, value in state.items():
            assert torch.equal(ckpt.tensor(key), value), key


@pytest.mark.parametrize("case, chunks, size, words", [
    ("1 TB chunk", [([0, 0], [1 << 38, 4])], [1 << 38, 4], ["needs", "bytes, but its record is"]),
    ("half coverage", [([0, 0], [4, 4])], None, ["cover 16 of the tensor's 32 elements"]),
    ("outside the tensor", [([6, 0], [8, 4])], None, ["lies outside the tensor's shape [8, 4]"]),
    ("overlap", [([0, 0], [5, 4]), ([3, 0], [3, 4])], None, ["overlap"]),
    ("wrong rank", [([0], [8])], None, ["malformed offsets/sizes"]),
])
def test_dcp_metadata_that_lies_about_chunks(dcp_folder, case, chunks, size, words):
    folder, _ = dcp_folder
    _rewrite_chunks(folder, "w", chunks, size=size)
    with pytest.raises(CheckpointError) as info:
        graft.open(folder)  # refused on open: nothing allocated, nothing read
    err = info.value
    assert ".metadata" in err.path and "'w'" in str(err) and err.way_out, case
    for word in words:
        assert word in str(err), (case, word, str(err))


def test_dcp_record_shorter_than_its_chunk(dcp_folder):
    folder, _ = dcp_folder
    _rewrite_chunks(folder, "w", [([0, 0], [8, 4])], length=64)  # 8 x 4 float32 = 128 bytes
    with pytest.raises(CheckpointError, match="'w'.*needs 128 bytes, but its record is 64 bytes"):
        graft.open(folder)


def test_dcp_record_that_disagrees_with_the_metadata(dcp_folder):
    """A chunk tiling a smaller tensor whose record holds more: the record's shape is checked."""
    folder, _ = dcp_folder
    _rewrite_chunks(folder, "w", [([0, 0], [4, 4])], size=[4, 4])
    with graft.open(folder) as ckpt:
        with pytest.raises(CheckpointError, match=r"holds \[8, 4\] x torch.float32, the metadata says \[4, 4\]"):
            ckpt.tensor("w")


def test_dcp_damaged_metadata_pickle(dcp_folder):
    folder, _ = dcp_folder
    data = bytearray((folder / ".metadata").read_bytes())
    (folder / ".metadata").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        graft.open(folder)
