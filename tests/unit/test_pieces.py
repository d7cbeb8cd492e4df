"""Tensors stored in several pieces (ZeRO partitions, DCP chunks), read by the base reader."""

import pytest
import torch

import graft
from graft.loading.formats import OpenOptions
from graft.loading.formats.base import Checkpoint, TensorMeta
from graft.loading.formats.reading import Piece


def test_base_reader_reads_a_tensor_stored_in_pieces(tmp_path):
    """Pieces from two files, out of order, land in their regions; a short file is caught."""
    values = torch.arange(10, dtype=torch.float32)
    raw = values.numpy().tobytes()
    (tmp_path / "a").write_bytes(b"xx" + raw[16:])  # elements 4..9, after 2 bytes of header
    (tmp_path / "b").write_bytes(raw[:16])  # elements 0..3

    class Pieced(Checkpoint):
        format, describes = "pieced", "a test"

        @classmethod
        def can_open(cls, path):
            return False

        def keys(self):
            return ["t"]

        def meta(self, key):
            return TensorMeta(key, (2, 5), torch.float32, str(self.path))

        def pieces(self, key):
            return [Piece(str(tmp_path / "a"), 2, 24, 16), Piece(str(tmp_path / "b"), 0, 16, 0)]

    ckpt = Pieced(tmp_path, OpenOptions())
    assert ckpt.span("t") is None
    ckpt.validate(["t"])
    assert torch.equal(ckpt.tensor("t"), values.reshape(2, 5)) and ckpt.bytes_read == 40
    (tmp_path / "a").write_bytes(b"xx" + raw[16:-4])
    with pytest.raises(graft.CheckpointError, match="truncated: 't' needs bytes"):
        ckpt.validate(["t"])



def test_dcp_row_chunks_are_pieces_and_column_chunks_are_copied(tmp_path):
    """Row blocks (FSDP's shards) are pread into place; column blocks go chunk by chunk."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata, init_from_local_shards

    cols = torch.arange(24.0).reshape(4, 6)
    rows = torch.arange(30.0).reshape(6, 5) + 100

    def sharded(t, boxes):
        shards = [Shard(t[tuple(slice(o, o + n) for o, n in zip(at, size))].contiguous(),
                        ShardMetadata(list(at), list(size), "rank:0/cpu")) for at, size in boxes]
        return init_from_local_shards(shards, list(t.shape))

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:  # two chunks of each tensor, written by one rank
        dcp.save({"model": {"cols": sharded(cols, [((0, 0), (4, 3)), ((0, 3), (4, 3))]),
                            "rows": sharded(rows, [((0, 0), (2, 5)), ((2, 0), (4, 5))])}},
                 checkpoint_id=tmp_path)
    finally:
        dist.destroy_process_group()
    with graft.open(tmp_path) as ckpt:
        assert ckpt.pieces("cols") is None and ckpt.span("rows") is None
        assert [p.dest for p in ckpt.pieces("rows")] == [0, 2 * 5 * 4]
        outs = {"cols": torch.empty(4, 6), "rows": torch.empty(6, 5)}
        reported = []
        ckpt.read_into(list(outs.items()), reported.append)
        assert torch.equal(outs["cols"], cols) and torch.equal(outs["rows"], rows)
        assert sum(reported) == ckpt.bytes_read == (24 + 30) * 4
