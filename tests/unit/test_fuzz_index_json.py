"""Seeded, bounded fuzz of Hugging Face sharded checkpoints (the index JSON and its shards).

Folders are written by the real `huggingface_hub.save_torch_state_dict`, then the index is
mutated (bytes flipped, nesting deep, numbers huge or non-finite, JSON types swapped, keys
duplicated, shard paths escaping the folder) or a shard is damaged. The reference is the
plain reading of the index: `json.loads`, then each key from `load_file` of the shard the
weight_map names. graft must return exactly that, or raise CheckpointError.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from fuzzing import Outcomes, check
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file, save_file

SEED = 8
MUTANTS = 330
INDEX = "model.safetensors.index.json"

# Where graft may refuse what the plain reading accepts, and why: duplicate keys (the last
# silently wins), numbers no index holds (NaN, Infinity, hundreds of digits), nesting past
# any real index, shard paths that leave the folder or go through `..`, and a "metadata"
# that is not an object (the plain reading never looks at it).
GRAFT_STRICTER = {"duplicate key", "non-finite", "huge number", "deep nesting", "escaping path", "metadata type"}


def base_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {f"w{i}": torch.randn(16, 16, generator=g) for i in range(5)} | {
        "h": torch.randn(8, generator=g).half(),
        "n": torch.randint(0, 100, (3,), generator=g),
    }


def reference(folder: Path, keys=None) -> dict[str, torch.Tensor]:
    """What a plain reader returns: json.loads, then each key from the shard it names."""
    weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    shards: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for key in weight_map.keys() if keys is None else keys:  # .keys(): a mapping, as transformers reads it
        shard = weight_map[key]
        if shard not in shards:
            shards[shard] = load_file(folder / shard)
        out[key] = shards[shard][key]
    return out


# -- mutators: (rng, index dict, shard names, outside file) -> (kind, index text or None, shard edits)

def flip_bytes(rng, index, shards, outside):
    raw = bytearray(json.dumps(index).encode())
    for _ in range(rng.randint(1, 3)):
        raw[rng.randrange(len(raw))] = rng.choice([rng.randrange(256), *b'{}[]",:./\\ 0'])
    return "byte flip", bytes(raw), {}


def deep_nesting(rng, index, shards, outside):
    depth = rng.choice([40, 1000, 100_000])
    deep = "[" * depth + "]" * depth
    text = json.dumps(index)
    where = rng.randrange(4)
    if where == 0:
        text = text.replace('"metadata": {', f'"metadata": {{"deep": {deep}, ', 1)
    elif where == 1:
        text = text.replace('"weight_map": {', f'"weight_map": {{"w9": {deep}, ', 1)
    elif where == 2:
        text = "[" * depth + text + "]" * depth
    else:
        text = '{"weight_map": ' + "{" * depth
    return "deep nesting", text, {}


def huge_numbers(rng, index, shards, outside):
    num = rng.choice(["9" * 5000, "1" + "0" * 100, "1" + "0" * 30, "1E400", "-0", "3.5"])
    index["metadata"]["total_size"] = 123456789
    return "huge number", json.dumps(index).replace("123456789", num), {}


def non_finite(rng, index, shards, outside):
    index["metadata"]["total_size"] = float(rng.choice(["nan", "inf", "-inf"]))
    return "non-finite", json.dumps(index, allow_nan=True), {}


def wrong_types(rng, index, shards, outside):
    key = rng.choice(list(index["weight_map"]))
    how = rng.randrange(5)
    if how == 0:
        return "wrong type", rng.choice(["[]", '"x"', "null", "7", "true", '[{"weight_map": {}}]']), {}
    if how == 1:
        index["weight_map"] = rng.choice([[], "x", None, 7, list(index["weight_map"].items())])
    elif how == 2:
        index["weight_map"][key] = rng.choice([7, None, [shards[0]], {"file": shards[0]}, True])
    elif how == 3:
        index["metadata"] = rng.choice([[], "x", 7, None])  # null metadata is harmless
        return "metadata type", json.dumps(index), {}
    else:
        del index[rng.choice(["weight_map", "metadata"])]
    return "wrong type", json.dumps(index), {}


def duplicate_key(rng, index, shards, outside):
    key = rng.choice(list(index["weight_map"]))
    text = json.dumps(index)
    dup = f'"{key}": "{rng.choice(shards)}", '
    return "duplicate key", text.replace('"weight_map": {', '"weight_map": {' + dup, 1), {}


def escaping_path(rng, index, shards, outside):
    key = rng.choice(list(index["weight_map"]))
    name = index["weight_map"][key]
    index["weight_map"][key] = rng.choice([
        "../outside.safetensors", str(outside), f"sub/../../{outside.name}", f"sub/../{name}",
        f"../{Path.cwd().name}/{name}", "..", "", "/", "\0" + name, name + "\0",
    ])
    return "escaping path", json.dumps(index), {}


def valid_paths(rng, index, shards, outside):
    key = rng.choice(list(index["weight_map"]))
    index["weight_map"][key] = rng.choice([f"./{index['weight_map'][key]}", f".//{index['weight_map'][key]}"])
    return "valid path", json.dumps(index), {}


def wrong_shard(rng, index, shards, outside):
    key = rng.choice(list(index["weight_map"]))
    index["weight_map"][key] = rng.choice([*shards, "missing.safetensors", INDEX, "model.bin"])
    return "wrong shard", json.dumps(index), {}


def damaged_shard(rng, index, shards, outside):
    shard = rng.choice(shards)
    how = rng.randrange(3)
    if how == 0:
        edit = ("truncate", rng.randint(1, 200))
    elif how == 1:
        edit = ("length", rng.choice([-1, 1]))
    else:
        edit = ("flip", rng.randrange(8, 200))
    return "damaged shard", json.dumps(index), {shard: edit}


def valid_variants(rng, index, shards, outside):
    how = rng.randrange(5)
    if how == 0:
        index["weight_map"] = dict(reversed(list(index["weight_map"].items())))
    elif how == 1:
        del index["weight_map"][rng.choice(list(index["weight_map"]))]
    elif how == 2:
        index["metadata"]["note"] = "ü \u2211 \n"
    elif how == 3:
        return "valid", " \n" + json.dumps(index, indent=rng.choice([None, 2])) + "\n\t ", {}
    else:
        index["extra"] = {"a": [1, 2.5, None, True]}
    return "valid", json.dumps(index), {}


def bad_text(rng, index, shards, outside):
    text = json.dumps(index)
    key = rng.choice(list(index["weight_map"]))
    how = rng.randrange(3)
    if how == 0:
        return "bad text", text.encode().replace(f'"{key}"'.encode(), f'"{key}\xff"'.encode("latin-1"), 1), {}
    if how == 1:
        return "bad text", text.replace(f'"{key}"', f'"{key}\\ud800"', 1), {}
    return "bad text", text[: rng.randrange(len(text))], {}


MUTATORS = [flip_bytes, deep_nesting, huge_numbers, non_finite, wrong_types, duplicate_key, escaping_path,
            valid_paths, wrong_shard, damaged_shard, valid_variants, bad_text]


def apply(edit, data: bytes) -> bytes:
    what, arg = edit
    if what == "truncate":
        return data[:-arg]
    if what == "length":
        n = int.from_bytes(data[:8], "little") + arg
        return n.to_bytes(8, "little") + data[8:]
    out = bytearray(data)
    out[arg] ^= 0x55
    return bytes(out)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    folder = tmp_path_factory.mktemp("orig")
    save_torch_state_dict(base_state(), folder, max_shard_size="1KB")
    index = json.loads((folder / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    return folder, index, shards


def test_fuzzed_index_folders_read_as_the_reference_or_refused(tmp_path, original):
    folder, index, shards = original
    # A file outside every mutant folder holding every key: an index that escapes would read it.
    outside = tmp_path / "outside.safetensors"
    save_file({k: v + 1 for k, v in base_state().items()}, outside)
    rng = random.Random(SEED)
    like = base_state()
    outcomes = Outcomes()
    for i in range(MUTANTS):
        mutate = MUTATORS[i % len(MUTATORS)]
        kind, text, edits = mutate(rng, json.loads(json.dumps(index)), shards, outside)
        mutant = tmp_path / f"m{i:04d}"
        mutant.mkdir()
        for shard in shards:
            if shard in edits:
                (mutant / shard).write_bytes(apply(edits[shard], (folder / shard).read_bytes()))
            else:
                os.link(folder / shard, mutant / shard)
        (mutant / INDEX).write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        check(mutant, f"#{i} {mutate.__name__}: {kind}", reference, like, outcomes)
    print(outcomes)
    assert outcomes.counts["read, equal to the reference"] >= 40
    assert outcomes.counts["CheckpointError"] >= 150
    assert set(outcomes.stricter) <= GRAFT_STRICTER, f"graft refused what the reference reads: {outcomes.stricter}"
