"""A seeded, bounded fuzz of the torch-zip reader: never a wrong value, never another error.

Mutants of small archives written by the real `torch.save` (views with a storage_offset, a
shared storage, a non-contiguous view, six dtypes): byte flips in the pickle, the local
headers, the central directory and the end record; truncations; record lengths changed in
the central directory; bytes inserted or deleted; Python-zipfile repacks (other layouts),
with and without a flip. For every mutant graft either returns exactly torch.load's
values (weights_only=True), bit for bit, or raises CheckpointError; `graft.load` leaves
the model unchanged when it raises.

Memory is bounded by running every graft read first and comparing the process's peak RSS
(ru_maxrss) before and after: the mutants are ~3 KB, so a reader that trusted a size from
the file (a storage or chunk claiming gigabytes) would raise the peak far beyond the
allowance. torch.load, the oracle, runs afterwards, so its own allocations do not count.
A per-mutant alarm catches hangs.
"""

from __future__ import annotations

import random
import resource
import signal
import struct

import pytest
import torch
from torch_zip_helpers import Model, central_directory, record_spans, repack, sample_state, saved

import graft
from graft.errors import CheckpointError
from graft.loading.formats.base import OpenOptions
from graft.loading.formats.torch_file import TorchFile, find_state_dict

SEED = 20240611
MUTANTS = 420
PEAK_ALLOWANCE_MB = 64
PER_MUTANT_S = 5


def _mutants(rng: random.Random, clean: bytes) -> list[tuple[str, bytes]]:
    spans = record_spans(clean)
    pkl = next(v for k, v in spans.items() if k.endswith("/data.pkl"))
    data_records = [v for k, v in spans.items() if "/data/" in k]
    cd_offset, cd_size = central_directory(clean)
    eocd = clean.rfind(b"PK\x05\x06")
    repacked = repack(clean, reverse=True, extra=b"\xfe\xca\x04\x00abcd")

    def flip(data: bytes, lo: int, hi: int) -> bytes:
        out = bytearray(data)
        pos = rng.randrange(lo, hi)
        out[pos] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
        return bytes(out)

    def local_header(data: bytes) -> bytes:
        head, start, _ = rng.choice(list(spans.values()))
        return flip(data, head, start)

    def record_length(data: bytes) -> bytes:
        # A record's sizes in its central directory entry, shorter or longer.
        out = bytearray(data)
        entries = [p for p in range(cd_offset, cd_offset + cd_size) if out[p : p + 4] == b"PK\x01\x02"]
        p = rng.choice(entries)
        csize, usize = struct.unpack_from("<LL", out, p + 20)
        delta = rng.choice([-8, -4, -2, -1, 1, 2, 4, 8, 1 << 20, 1 << 40 & 0xFFFFFFFF or 1 << 31])
        which = rng.choice(["both", "compressed", "size"])
        if which in ("both", "compressed"):
            struct.pack_into("<L", out, p + 20, max(0, csize + delta) & 0xFFFFFFFF)
        if which in ("both", "size"):
            struct.pack_into("<L", out, p + 24, max(0, usize + delta) & 0xFFFFFFFF)
        return bytes(out)

    def splice(data: bytes) -> bytes:
        pos = rng.randrange(len(data))
        if rng.random() < 0.5:
            return data[:pos] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9))) + data[pos:]
        return data[:pos] + data[pos + rng.randrange(1, 9):]

    kinds = {
        "pickle": lambda: flip(clean, pkl[1], pkl[1] + pkl[2]),
        "pickle-twice": lambda: flip(flip(clean, pkl[1], pkl[1] + pkl[2]), pkl[1], pkl[1] + pkl[2]),
        "local-header": lambda: local_header(clean),
        "central-directory": lambda: flip(clean, cd_offset, cd_offset + cd_size),
        "end-record": lambda: flip(clean, eocd, len(clean)),
        "tensor-bytes": lambda: flip(clean, *(lambda r: (r[1], r[1] + max(1, r[2])))(rng.choice(data_records))),
        "anywhere": lambda: flip(clean, 0, len(clean)),
        "truncate": lambda: clean[: rng.randrange(len(clean))],
        "record-length": lambda: record_length(clean),
        "splice": lambda: splice(clean),
        "repack": lambda: repack(clean, reverse=rng.random() < 0.5, extra=b"\xfe\xca\x02\x00xy" * rng.randrange(3),
                                 comment=b"c" * rng.randrange(3)),
        "repack-flip": lambda: flip(repacked, 0, len(repacked)),
    }
    names = sorted(kinds)
    return [(name, kinds[name]()) for name in (names[i % len(names)] for i in range(MUTANTS))]


def _bits(t: torch.Tensor) -> tuple:
    """dtype, shape and the raw bytes: NaNs and -0.0 compare as bits, not as numbers."""
    flat = t.detach().reshape(-1).contiguous()
    return t.dtype, tuple(t.shape), bytes(flat.view(torch.uint8).numpy()) if flat.numel() else b""


def _graft_reads(path) -> dict[str, tuple] | CheckpointError:
    # The reader itself, not graft.open: the open path's own translation of low-level errors
    # must not hide a reader that lets one escape.
    try:
        with TorchFile(path, OpenOptions()) as ckpt:
            return {k: _bits(ckpt.tensor(k)) for k in ckpt.keys()}
    except CheckpointError as e:
        return e


def _graft_loads(path) -> tuple[dict[str, tuple], dict[str, tuple], list[str]] | CheckpointError:
    """Into the model: (values before, after, keys loaded), or the error (model then unchanged)."""
    model = Model()
    with torch.no_grad():
        for i, t in enumerate(model.state_dict().values()):
            t.copy_(torch.full_like(t, i + 1))
    before = {k: _bits(v) for k, v in model.state_dict().items()}
    try:
        report = graft.load(model, path, verbose=False, distributed=False)
    except CheckpointError as e:
        after = {k: _bits(v) for k, v in model.state_dict().items()}
        assert after == before, f"{path}: the model changed although graft.load raised {e}"
        return e
    return before, {k: _bits(v) for k, v in model.state_dict().items()}, list(report.loaded)


def _alarm(signum, frame):
    raise TimeoutError(f"a mutant took longer than {PER_MUTANT_S} s")


def test_every_mutant_loads_exactly_or_raises_checkpoint_error(tmp_path):
    rng = random.Random(SEED)
    clean = saved(sample_state())
    mutants = _mutants(rng, clean)
    paths = []
    for i, (kind, data) in enumerate(mutants):
        path = tmp_path / f"{i:03d}_{kind}.pth"
        path.write_bytes(data)
        paths.append(path)

    # Warm up (imports, allocator) on the clean file, then every graft read, then the peak.
    (tmp_path / "clean.pth").write_bytes(clean)
    assert not isinstance(_graft_reads(tmp_path / "clean.pth"), CheckpointError)
    _graft_loads(tmp_path / "clean.pth")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    old = signal.signal(signal.SIGALRM, _alarm)
    got = {}
    try:
        for path in paths:
            signal.alarm(PER_MUTANT_S)
            try:
                got[path] = (_graft_reads(path), _graft_loads(path))
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - the point: no other exception type may escape
                pytest.fail(f"{path.name}: graft raised {type(e).__name__}: {e}")
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, old)
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert growth_mb < PEAK_ALLOWANCE_MB, f"graft's peak RSS grew by {growth_mb:.0f} MB on ~3 KB files"

    outcomes = {"equal": 0, "refused": 0, "both refuse": 0}
    for path in paths:
        reads, loads = got[path]
        try:
            ref = torch.load(path, weights_only=True)
            expected, _ = find_state_dict(ref, path, None)
            expected = {k: _bits(v) for k, v in expected.items()}
        except Exception:  # noqa: BLE001 - torch refuses: graft must refuse too
            expected = None
        if expected is None:
            assert isinstance(reads, CheckpointError), f"{path.name}: torch.load refuses it, graft read {reads}"
            assert isinstance(loads, CheckpointError), f"{path.name}: torch.load refuses it, graft loaded it"
            outcomes["both refuse"] += 1
            continue
        if isinstance(reads, CheckpointError):
            outcomes["refused"] += 1
        else:
            assert reads == expected, f"{path.name}: graft's values differ from torch.load's"
            outcomes["equal"] += 1
        if not isinstance(loads, CheckpointError):
            before, after, loaded = loads
            for key, value in after.items():
                if key in loaded:
                    want = expected.get(key)
                    assert want is None or value[0] != want[0] or value == want, f"{path.name}: {key}"
                else:
                    assert value == before[key], f"{path.name}: {key} changed but is not reported loaded"
    # The fuzz exercised all three outcomes (a mutant set that only ever fails proves little).
    assert all(outcomes.values()), outcomes
    assert sum(outcomes.values()) == MUTANTS
