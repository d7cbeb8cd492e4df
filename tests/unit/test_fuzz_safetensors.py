"""Seeded, bounded fuzz of the safetensors reader against the reference `safetensors` package.

Files are written by the real `safetensors.torch.save_file`, then mutated: header bytes
flipped, the length field moved, keys duplicated, dims negated, offsets shuffled, types
swapped, numbers made huge or non-finite, JSON nested deep, the file cut or extended.
Every mutant must satisfy `fuzzing.check`: graft's values are the reference's, or graft
raises CheckpointError; and graft is never looser than the reference.
"""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from fuzzing import Outcomes, check
from safetensors.torch import load_file, save_file

SEED = 20261205
MUTANTS = 420

# Where graft may refuse what the reference reads: rules of the written spec (no duplicate
# keys; '{' first; space padding only) that serde_json does not enforce, the dtypes graft
# cannot hold, and nesting the reference ignores inside fields it skips.
SPEC_STRICTER = {"duplicate key", "leading whitespace", "trailing non-space padding",
                 "deep unknown field", "dtype"}


def base_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 4, generator=g),
        "b": torch.randn(5, generator=g).half(),
        "c": torch.randint(-9, 9, (2, 3), generator=g),
        "d": torch.rand(4, generator=g) > 0.5,
        "e": torch.randn(2, 2, generator=g).bfloat16(),
        "s": torch.tensor(2.5),
        "z": torch.zeros(0, 3),
    }


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def assemble(text: str | bytes, body: bytes, pad: bytes = b" ") -> bytes:
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    raw += pad * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def dumps(header: dict) -> str:
    return json.dumps(header, separators=(",", ":"))


def tensor_keys(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


# -- mutators: (rng, original file bytes) -> (kind, mutated bytes) ---------------------------

def flip_header_bytes(rng, data):
    (n,) = struct.unpack("<Q", data[:8])
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        out[8 + rng.randrange(n)] = rng.choice([rng.randrange(256), *b'{}[]",:-0123456789 \\'])
    return "header byte flip", bytes(out)


def length_field(rng, data):
    (n,) = struct.unpack("<Q", data[:8])
    new = rng.choice([n - 1, n + 1, n - 2, n + 2, n - 8, n + 8, rng.randrange(len(data) + 16),
                      rng.randrange(1 << 64), 100_000_001, (1 << 64) - 1])
    return "length field", struct.pack("<Q", max(new, 0)) + data[8:]


def duplicate_key(rng, data):
    header, body = split(data)
    text = dumps(header)
    key = rng.choice(tensor_keys(header))
    other = header[rng.choice(tensor_keys(header))]
    dup = f'"{key}":{dumps(other)},'
    return "duplicate key", assemble(text.replace("{", "{" + dup, 1), body)


def negative_dims(rng, data):
    header, body = split(data)
    key = rng.choice([k for k in tensor_keys(header) if header[k]["shape"]])
    shape = header[key]["shape"]
    if len(shape) >= 2 and rng.random() < 0.5:
        header[key]["shape"] = [-shape[0], -shape[1], *shape[2:]]  # same product, both negative
    else:
        header[key]["shape"] = [-1, *[abs(x) for x in shape]] if rng.random() < 0.5 else [-x for x in shape]
    return "negative dims", assemble(dumps(header), body)


def shuffle_offsets(rng, data):
    header, body = split(data)
    keys = tensor_keys(header)
    how = rng.randrange(4)
    if how == 0:
        offsets = [header[k]["data_offsets"] for k in keys]
        rng.shuffle(offsets)
        for k, o in zip(keys, offsets):
            header[k]["data_offsets"] = o
    elif how == 1:
        k = rng.choice(keys)
        d = rng.choice([-2, -1, 1, 2])
        header[k]["data_offsets"] = [max(0, x + d) for x in header[k]["data_offsets"]]
    elif how == 2:
        k = rng.choice(keys)
        header[k]["data_offsets"] = header[k]["data_offsets"][::-1]
    else:
        k, j = rng.sample(keys, 2)
        header[k]["data_offsets"] = list(header[j]["data_offsets"])
    return "offsets", assemble(dumps(header), body)


def dtype(rng, data):
    header, body = split(data)
    k = rng.choice(tensor_keys(header))
    header[k]["dtype"] = rng.choice(["F32", "I32", "F16", "BF16", "I16", "U8", "I8", "BOOL", "F64", "I64",
                                     "U16", "U32", "U64", "F8_E4M3", "F8_E5M2", "C64", "F4", "F8_E8M0",
                                     "f32", "", 5, None, ["F32"]])
    kind = "dtype" if isinstance(header[k]["dtype"], str) and header[k]["dtype"] in ("F4", "F8_E8M0") else "dtype change"
    return kind, assemble(dumps(header), body)


def shape(rng, data):
    header, body = split(data)
    k = rng.choice(["a", "c", "z", "s"])
    header[k]["shape"] = rng.choice([
        [4, 3], [12], [2, 6], [12, 1], [1, 12, 1], [6, 3], [0], [0, 3, 0], [],  # some hold the right numel
        [3.0, 4.0], [True, 12], ["3", "4"], [[3], [4]], None, "3,4", {"0": 3},
        [1 << 64, 0], [1 << 63, 0], [1 << 40, 1 << 40, 0], [0, 1 << 40, 1 << 40], [(1 << 64) - 1, 0],
    ])
    return "shape", assemble(dumps(header), body)


def wrong_types(rng, data):
    header, body = split(data)
    k = rng.choice(tensor_keys(header))
    choice = rng.randrange(9)
    if choice == 0:
        return "wrong type", assemble(rng.choice(["[]", '"x"', "null", "1", "true", "[{}]"]), body)
    if choice == 1:
        header[k] = rng.choice([[], "x", None, 7, ["F32", [3, 4], [0, 48]]])
    elif choice == 2:
        header[k]["data_offsets"] = rng.choice([[0], [0, 48, 48], ["0", "48"], None, 48, [0.0, 48.0], []])
    elif choice == 3:
        header["__metadata__"] = rng.choice([{"k": 1}, [], "x", {"k": {"n": "v"}}, {"k": None}, 5])
    elif choice == 4:
        header["__metadata__"] = rng.choice([None, {}, {"format": "pt", "note": "ü ∑ \n"}])  # valid
    elif choice == 5:
        del header[k][rng.choice(["dtype", "shape", "data_offsets"])]
    elif choice == 6:
        header[k]["extra"] = rng.choice([1, "x", [1, 2], {"a": None}])  # the reference ignores it
    elif choice == 7:
        header = dict(reversed(list(header.items())))  # order of keys is free
    else:
        header[k + "\u00e9\u4e2d"] = header.pop(k)  # non-ASCII key: valid
    return "wrong type", assemble(dumps(header), body)


def huge_numbers(rng, data):
    header, body = split(data)
    k = rng.choice([k for k in tensor_keys(header) if header[k]["shape"]])
    num = rng.choice(["1" + "0" * 30, "9" * 5000, "18446744073709551616", "18446744073709551615",
                      "-0", "1e2", "48.0", "1E400", "-1", "0x30", "00", "4" + "0" * 400, "12"])
    marker = 987654321987
    header[k][rng.choice(["data_offsets", "shape"])][-1] = marker
    return "huge number", assemble(dumps(header).replace(str(marker), num), body)


def non_finite(rng, data):
    header, body = split(data)
    k = rng.choice(tensor_keys(header))
    const = rng.choice(["Infinity", "-Infinity", "NaN"])
    where = rng.randrange(3)
    if where == 0:
        header[k]["shape"] = [float(const)]
    elif where == 1:
        header[k]["data_offsets"] = [0, float(const)]
    else:
        header["__metadata__"] = {"x": float(const)}
    return "non-finite", assemble(json.dumps(header, separators=(",", ":"), allow_nan=True), body)


def deep_nesting(rng, data):
    header, body = split(data)
    depth = rng.choice([40, 129, 1000, 100_000])
    deep = "[" * depth + "]" * depth
    text = dumps(header)
    where = rng.randrange(4)
    if where == 0:
        return "deep unknown field" if depth < 128 else "deep nesting", assemble(
            text.replace('"dtype"', f'"deep":{deep},"dtype"', 1), body)
    if where == 1:
        return "deep nesting", assemble(text.replace('"__metadata__":', f'"__metadata__":{{"x":{deep}}},"y":', 1), body)
    if where == 2:
        return "deep nesting", assemble("{" + f'"a":{deep}' + "}", body)
    return "deep nesting", assemble("[" * depth, body)  # unbalanced


def whitespace(rng, data):
    header, body = split(data)
    text = dumps(header)
    how = rng.randrange(4)
    if how == 0:
        return "leading whitespace", assemble(" " + text, body)
    if how == 1:
        return "trailing non-space padding", assemble(text + rng.choice(["\n", "\t", "\r", " \n"]), body)
    if how == 2:
        return "trailing non-space padding", assemble(text, body, pad=rng.choice([b"\0", b"x"])) \
            if len(text) % 8 else ("trailing garbage", assemble(text + "x", body))
    return "space padding", assemble(text + " " * rng.randrange(1, 30), body)  # valid


def bad_text(rng, data):
    header, body = split(data)
    text = dumps(header)
    k = rng.choice(tensor_keys(header))
    how = rng.randrange(4)
    if how == 0:
        raw = text.encode().replace(f'"{k}"'.encode(), f'"{k}\xff"'.encode("latin-1"), 1)
        return "bad text", assemble(raw, body)
    if how == 1:
        return "bad text", assemble(text.replace(f'"{k}"', f'"{k}\\ud800"', 1), body)
    if how == 2:
        return "bad text", assemble(text.replace(f'"{k}"', f'"{k}\x01"', 1), body)  # raw control char
    return "bad text", assemble(text.replace(f'"{k}"', f'"{k}\\u00e9"', 1), body)  # valid escape


def truncate(rng, data):
    how = rng.randrange(3)
    if how == 0:
        return "truncated", data[: rng.randrange(len(data))]
    if how == 1:
        return "extended", data + bytes(rng.randrange(1, 64))
    return "truncated", data[: len(data) - rng.randint(1, 16)]


def data_bytes(rng, data):
    (n,) = struct.unpack("<Q", data[:8])
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[8 + n + rng.randrange(len(data) - 8 - n)] = rng.randrange(256)
    return "data byte flip", bytes(out)  # valid: both readers must return the flipped bytes


MUTATORS = [flip_header_bytes, length_field, duplicate_key, negative_dims, shuffle_offsets, dtype, shape,
            wrong_types, huge_numbers, non_finite, deep_nesting, whitespace, bad_text, truncate, data_bytes]


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("orig") / "m.safetensors"
    save_file(base_state(), path, metadata={"format": "pt"})
    return path.read_bytes()


def test_fuzzed_safetensors_read_as_the_reference_or_refused(tmp_path, original):
    rng = random.Random(SEED)
    like = base_state()
    outcomes = Outcomes()
    for i in range(MUTANTS):
        mutate = MUTATORS[i % len(MUTATORS)]
        kind, data = mutate(rng, original)
        path = tmp_path / f"{i:04d}.safetensors"
        path.write_bytes(data)
        check(path, f"#{i} {mutate.__name__}: {kind}", lambda p, keys=None: load_file(p), like, outcomes)
        path.unlink()
    print(outcomes)
    assert outcomes.counts["read, equal to the reference"] >= 40
    assert outcomes.counts["CheckpointError"] >= 200
    assert set(outcomes.stricter) <= SPEC_STRICTER, f"graft refused what the reference reads: {outcomes.stricter}"
