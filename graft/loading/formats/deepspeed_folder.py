"""DeepSpeed checkpoint folders (ZeRO stage 0-3), read without DeepSpeed and without unsafe pickles.

What `engine.save_checkpoint(save_dir)` writes:

    save_dir/latest                       the newest tag, e.g. "global_step100"
    save_dir/global_step100/
        mp_rank_00_model_states.pt        stage <= 2: rank 0's module state dict (every
                                          parameter and buffer), param_shapes, step...
        zero_pp_rank_{r}_mp_rank_00_model_states.pt
                                          stage 3, one per rank: buffers in full, parameters
                                          as empty placeholders, this rank's slice of each
                                          frozen parameter (frozen_param_fragments)
        zero_pp_rank_{r}_mp_rank_00_optim_states.pt
                                          one per data-parallel rank: its partition of the
                                          fp32 master weights, plus the Adam moments

The trainable parameters are taken from the fp32 master partitions of every rank (the copy
the optimizer updates; at stage 3 the only real copy), the rest (frozen parameters,
buffers) from the module's own copy. DeepSpeed's `zero_to_fp32` does the same but drops
frozen parameters at stage 1, needs DeepSpeed importable (it unpickles DeepSpeed objects)
and concatenates every rank's partition in memory (about twice the model).

Here every file is unpickled with `map_location="meta"` and `weights_only=True`: only the
pickles (kilobytes) are read, and the three DeepSpeed classes they name are rebuilt as inert
stand-ins. That gives each tensor's byte offset in its file, so a parameter is described as
a list of byte ranges (one per rank that holds a piece of it; the layout is the one
`deepspeed/utils/zero_to_fp32.py` reconstructs), and those ranges are pread straight into
the destination tensor. Reading therefore holds the planned tensors and nothing else: no
rank's shard is ever loaded whole.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from graft._logging import get_logger
from graft.errors import CheckpointError
from graft.loading.formats.base import Checkpoint, OpenOptions, TensorMeta
from graft.loading.formats.reading import Piece, Span
from graft.loading.formats.torch_zip import Archive, check_tensors, read_tensor, span_of, stand_in

log = get_logger(__name__)
MASTER = "fp32 master copy (optimizer partitions)"
LATEST = "latest"
_MODEL_STATES = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
_OPTIM_STATES = re.compile(r"^(?:bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


class _ZeroStageEnum(int):
    """Stand-in for deepspeed.runtime.zero.config.ZeroStageEnum, an `int` Enum pickled as a
    call with the stage number; an int subclass takes that call and stays a plain int."""


_ZeroStageEnum.__module__ = "deepspeed.runtime.zero.config"
_ZeroStageEnum.__name__ = _ZeroStageEnum.__qualname__ = "ZeroStageEnum"

# Exactly the DeepSpeed globals found in the files DeepSpeed 0.19 writes; anything else
# still stops the load (graft never unpickles unknown globals).
_DS_GLOBALS = [
    (_ZeroStageEnum, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (stand_in("deepspeed.runtime.fp16.loss_scaler.LossScaler"), "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    # ZeRO 1/2 param_slice_mappings (a dataclass of numel and start; not used here).
    (stand_in("deepspeed.utils.tensor_fragment.fragment_address"), "deepspeed.utils.tensor_fragment.fragment_address"),
]


@dataclass
class _Entry:
    shape: tuple[int, ...]
    dtype: torch.dtype
    origin: str
    """Where the value comes from, for people: MASTER or a module copy in a named file."""
    pieces: list[Piece] | None
    """None: the tensor has no plain byte range (non-contiguous); read through a mapping."""
    module_file: str | None = None
    """For module tensors: the model-states file whose 'module' holds them."""


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


class DeepSpeedFolder(Checkpoint):
    format = "deepspeed"
    describes = ("a DeepSpeed checkpoint folder (save_dir with `latest` and global_stepN/, or a tag"
                 " folder with *mp_rank_00_model_states.pt)")
    uses = frozenset({"tag", "allow_globals"})

    # -- discovery -----------------------------------------------------------------
    @classmethod
    def can_open(cls, path: Path) -> bool:
        if not path.is_dir():
            return False
        if (path / LATEST).is_file() or _has_model_states(path):
            return True
        # A save_dir written with save_latest=False: tag folders one level down.
        return any(_has_model_states(p) for p in path.iterdir() if p.is_dir())

    def __init__(self, path, options: OpenOptions):
        super().__init__(path, options)
        # Ours are rebuilt by _DS_GLOBALS; the same name twice would be ambiguous to torch.
        self._user_globals = [g for g in options.allow_globals if g not in {name for _, name in _DS_GLOBALS}]
        self.tag_dir = self._find_tag_dir()
        self.tag = self.tag_dir.name
        files = {p.name: p for p in self.tag_dir.iterdir() if p.is_file()}
        self._check_layout(files)
        self._modules: dict[str, dict] = {}

        model_file = self._model_states_file(files)
        model_states = self._load_meta(model_file)
        if not isinstance(model_states, Mapping) or not isinstance(model_states.get("module"), Mapping):
            raise CheckpointError(model_file, "holds no 'module' state dict",
                                  "point graft at a folder written by DeepSpeed's save_checkpoint")
        self.step = model_states.get("global_steps")
        self.ds_version = model_states.get("ds_version")
        self.world_size = model_states.get("dp_world_size")
        optim_files = self._optim_files(files)
        self.stage = 0
        self._rank0_osd: Mapping = {}
        if optim_files:
            rank0 = self._load_meta(optim_files[0])
            osd = rank0.get("optimizer_state_dict") if isinstance(rank0, Mapping) else None
            if not isinstance(osd, Mapping):
                raise CheckpointError(optim_files[0], "holds no 'optimizer_state_dict'",
                                      "the ZeRO shard is damaged; write the checkpoint again")
            self._rank0_osd = osd
            # The bf16 optimizer (ZeRO off) partitions fp32 weights like stage 1 but records no stage.
            self.stage = int(osd.get("zero_stage", 1 if "single_partition_of_fp32_groups" in osd else 0))
            # Expert parameters may have their own (smaller) partition count: the largest is
            # the data-parallel world, as in zero_to_fp32.
            counts = osd.get("partition_count")
            counts = max(counts) if isinstance(counts, (list, tuple)) else counts
            self.world_size = int(counts) if counts is not None else self.world_size
        elif model_file.name.startswith("zero_pp_rank_"):
            # Stage 3's module holds placeholders only: without the shards there are no weights.
            raise CheckpointError(self.tag_dir, "is a ZeRO stage 3 checkpoint without its"
                                  " zero_pp_rank_*_mp_rank_00_optim_states.pt files (the only copy of"
                                  " the trainable weights)",
                                  "copy the optimizer shards of every rank into the tag folder")
        elif _config_stage(model_states):
            # Shards deleted to save space: the module copy is complete at stages 1/2, but it
            # is the training dtype's copy, not the fp32 master.
            log.warning("%s: ZeRO stage %d checkpoint without optimizer shards; reading the module's"
                        " own copy of the weights", self.tag_dir, _config_stage(model_states))
        self.world_size = int(self.world_size or max(1, len(optim_files)))
        self._require_ranks(files, optim_files)

        self._entries: dict[str, _Entry] = {}
        module = model_states["module"]
        buffers = set(model_states.get("buffer_names") or ())
        param_shapes = model_states.get("param_shapes") or []
        if self.stage in (1, 2):
            self._plan_zero12(param_shapes)
        elif self.stage == 3:
            self._plan_zero3(param_shapes, model_states)
        # The module's own copy: everything the master partitions do not hold (frozen
        # parameters, buffers). At stage 3 the module's parameters are empty placeholders,
        # so only buffers are taken from it there (frozen ones came from the fragments).
        for key, t in module.items():
            if key in self._entries or not isinstance(t, torch.Tensor):
                continue
            if self.stage == 3 and key not in buffers:
                continue
            self._entries[key] = self._module_entry(model_file, key, t)
        for alias, target in (model_states.get("shared_params") or {}).items():
            # Tied weights: the partitions hold one of the names; the other reads the same values.
            if target in self._entries and (alias not in self._entries or self._entries[target].origin == MASTER):
                self._entries[alias] = self._entries[target]
        self._order = [k for k in module if k in self._entries]
        self._order += [k for k in self._entries if k not in set(self._order)]
        self._origins = defaultdict(list)
        for key in self._order:
            self._origins[self._entries[key].origin].append(key)
        # Most-used origin first: normally the master copy, then the module's own copy.
        self.source = "; ".join(f"{origin}: {len(keys)} tensors" for origin, keys in
                                sorted(self._origins.items(), key=lambda item: -len(item[1])))

    # -- folder layout ---------------------------------------------------------------
    def _find_tag_dir(self) -> Path:
        path, tag = self.path, self.options.tag
        if _has_model_states(path):
            if tag is not None and tag != path.name:
                raise CheckpointError(path, f"is the tag folder {path.name!r}, but tag={tag!r} was asked for",
                                      "pass the save_dir (the folder holding the tag folders) with tag=, or drop tag=")
            return path
        tags = sorted(p.name for p in path.iterdir() if p.is_dir() and _has_model_states(p))
        if tag is None and (path / LATEST).is_file():
            tag = (path / LATEST).read_text().strip()
            if not (path / tag).is_dir():
                raise CheckpointError(
                    path / LATEST, f"names the tag {tag!r}, but {path / tag} does not exist"
                    f" (tag folders present: {tags})",
                    "restore that tag folder, or pass tag= one of the folders present",
                )
        elif tag is None:
            if len(tags) != 1:
                raise CheckpointError(path, f"has no `latest` file and {len(tags)} tag folders: {tags}",
                                      "pass tag= the one to read")
            tag = tags[0]
        if not (path / tag).is_dir():
            raise CheckpointError(path, f"has no tag folder {tag!r} (present: {tags})", "pass tag= one of those")
        if not _has_model_states(path / tag):
            raise CheckpointError(path / tag, "holds no *mp_rank_00_model_states.pt",
                                  "the tag folder is incomplete; use another tag or copy it again")
        return path / tag

    def _check_layout(self, files: dict[str, Path]) -> None:
        mp = {int(m.group(2)) for name in files if (m := _MODEL_STATES.match(name))}
        layers = [name for name in files if name.startswith("layer_")]
        if mp - {0} or layers:
            raise CheckpointError(
                self.tag_dir, "was written with tensor or pipeline parallelism"
                f" (model-parallel ranks {sorted(mp)}, {len(layers)} layer files); graft reads"
                " data-parallel ZeRO checkpoints only",
                "convert it with DeepSpeed's ds_to_universal.py, or save a consolidated model",
            )

    def _model_states_file(self, files: dict[str, Path]) -> Path:
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
            if name in files:
                return files[name]
        raise CheckpointError(self.tag_dir, "holds neither mp_rank_00_model_states.pt nor"
                              " zero_pp_rank_0_mp_rank_00_model_states.pt",
                              "the tag folder is incomplete; use another tag or copy it again")

    def _optim_files(self, files: dict[str, Path]) -> list[Path]:
        by_rank = {int(m.group(1)): p for name, p in files.items() if (m := _OPTIM_STATES.match(name))}
        if not by_rank:
            return []
        if 0 not in by_rank:
            raise CheckpointError(self.tag_dir, "is missing rank 0's optimizer shard"
                                  f" (zero_pp_rank_0_mp_rank_00_optim_states.pt; found ranks {sorted(by_rank)})",
                                  "copy the missing file, or use a complete tag")
        return [by_rank[r] for r in sorted(by_rank)]

    def _require_ranks(self, files: dict[str, Path], optim_files: list[Path]) -> None:
        """Every rank's shard must be there before anything is planned or copied."""
        if self.stage == 0:
            return
        ranks = {int(_OPTIM_STATES.match(p.name).group(1)): p for p in optim_files}
        prefix = optim_files[0].name.split("zero_pp_rank_")[0]
        missing = [f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
                   for r in range(self.world_size) if r not in ranks]
        if self.stage == 3:
            missing += [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(self.world_size)
                        if f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" not in files]
        if missing:
            raise CheckpointError(
                self.tag_dir, f"ZeRO stage {self.stage} checkpoint of {self.world_size} ranks is missing"
                f" {', '.join(missing)}",
                "copy the missing shard(s) from the node that wrote them; every rank's shard is needed",
            )
        extra = sorted(r for r in ranks if r >= self.world_size)
        if extra:
            raise CheckpointError(
                self.tag_dir, f"holds optimizer shards of ranks {extra}, beyond the world size"
                f" {self.world_size} the checkpoint records (an older save overwritten in part?)",
                "remove the stray files or write the checkpoint into an empty folder",
            )
        self._optim_by_rank = [ranks[r] for r in range(self.world_size)]

    def _load_meta(self, file: Path):
        """Unpickle `file` with every tensor on the meta device: no tensor byte is read, each
        storage is located in its own zip record and every view checked against it."""
        with torch.serialization.safe_globals(_DS_GLOBALS):
            obj = Archive(file).load(allow_globals=self._user_globals)
        check_tensors(obj, file)
        return obj

    # -- where each tensor's bytes are ---------------------------------------------------
    def _module_entry(self, file: Path, key: str, t: torch.Tensor) -> _Entry:
        span = span_of(t, file, key)
        nbytes = t.numel() * t.element_size()
        pieces = None if span is None else [Piece(str(file), span.offset, nbytes, 0)] if nbytes else []
        return _Entry(tuple(t.shape), t.dtype, f"module copy ({file.name})", pieces, file.name)

    def _optim_groups(self, key: str) -> list[tuple[str, list[torch.Tensor]]]:
        """Each rank's (file, flat fp32 group tensors), rank by rank: one small pickle at a time."""
        out = []
        for r, file in enumerate(self._optim_by_rank):
            states = {"optimizer_state_dict": self._rank0_osd} if r == 0 else self._load_meta(file)
            osd = states.get("optimizer_state_dict") if isinstance(states, Mapping) else None
            groups = osd.get(key) if isinstance(osd, Mapping) else None
            if not isinstance(groups, (list, tuple)) or not all(isinstance(g, torch.Tensor) for g in groups):
                raise CheckpointError(file, f"has no {key!r} list of tensors (ZeRO stage {self.stage})",
                                      "the shard is damaged or from an unsupported DeepSpeed version")
            for i, g in enumerate(groups):
                if span_of(g, file, f"{key}[{i}]") is None:
                    raise CheckpointError(file, f"stores {key!r} in a layout without byte offsets",
                                          "re-save the checkpoint with a current torch and DeepSpeed")
            out.append((str(file), list(groups)))
        return out

    def _plan_zero12(self, param_shapes: list[Mapping]) -> None:
        """Stages 1/2: per group, the ranks' partitions concatenated in rank order are the
        group's flat vector: the parameters one after another in param_shapes order, each
        followed by its alignment padding (param_alignment_paddings, newer DeepSpeed)."""
        key = "single_partition_of_fp32_groups"
        ranks = self._optim_groups(key)
        paddings = self._rank0_osd.get("param_alignment_paddings")
        if len(ranks[0][1]) != len(param_shapes):
            raise CheckpointError(self.tag_dir, f"has {len(param_shapes)} parameter groups in the model"
                                  f" states but {len(ranks[0][1])} in the optimizer shards",
                                  "the model and optimizer files come from different saves")
        for g, shapes in enumerate(param_shapes):
            # Where each rank's partition starts in the group's flat vector.
            parts = [(file, groups[g]) for file, groups in ranks]
            starts, total = [], 0
            for _, t in parts:
                starts.append(total)
                total += t.numel()
            pos = 0
            for i, (name, shape) in enumerate(shapes.items()):
                n = _numel(shape)
                pieces = []
                for (file, t), start in zip(parts, starts):
                    lo, hi = max(pos, start), min(pos + n, start + t.numel())
                    if lo < hi:
                        size = t.element_size()
                        pieces.append(Piece(file, span_of(t, file, key).offset + (lo - start) * size,
                                             (hi - lo) * size,
                                             (lo - pos) * size))
                self._add_master(name, shape, parts[0][1].dtype, pieces, n)
                pos += n
                if paddings is not None:
                    pos += int(paddings[g][i])
            # DeepSpeed pads each group to a multiple of 2 x world size and strips the
            # padding when saving, so both sides agree only after rounding up.
            align = 2 * self.world_size
            if math.ceil(pos / align) * align != math.ceil(total / align) * align:
                raise CheckpointError(self.tag_dir, f"parameter group {g}: the shapes need {pos} values but"
                                      f" the ranks' fp32 partitions hold {total}",
                                      "the model and optimizer files come from different saves")

    def _plan_zero3(self, param_shapes: list[Mapping], model_states: Mapping) -> None:
        """Stage 3: every parameter is split evenly over the ranks (the last slice padded),
        and each rank's flat groups, concatenated, hold its slices in param_shapes order.
        Frozen parameters are split the same way, in each rank's frozen_param_fragments."""
        key = "fp32_flat_groups"
        ranks = self._optim_groups(key)
        world = self.world_size
        # Each rank's concatenated groups: where each group starts.
        layout = []
        for file, groups in ranks:
            bounds, total = [], 0
            for t in groups:
                bounds.append((total, t))
                total += t.numel()
            layout.append((file, bounds, total))
        merged = {k: v for shapes in param_shapes for k, v in shapes.items()}
        pos = 0
        for name, shape in merged.items():
            n = _numel(shape)
            per_rank = math.ceil(n / world)
            pieces = []
            dtype = ranks[0][1][0].dtype if ranks[0][1] else torch.float32
            for r, (file, bounds, _) in enumerate(layout):
                want = min(per_rank, n - r * per_rank)
                lo, hi = pos, pos + max(0, want)
                for start, t in bounds:
                    a, b = max(lo, start), min(hi, start + t.numel())
                    if a < b:
                        size = t.element_size()
                        dest = r * per_rank + (a - lo)
                        pieces.append(Piece(file, span_of(t, file, key).offset + (a - start) * size,
                                             (b - a) * size,
                                             dest * size))
            self._add_master(name, shape, dtype, pieces, n)
            pos += per_rank
        have = layout[0][2] if layout else 0
        if pos != have:
            raise CheckpointError(self.tag_dir, f"the parameter shapes need {pos} values per rank but"
                                  f" the fp32 flat groups hold {have}",
                                  "the model and optimizer files come from different saves")
        frozen = model_states.get("frozen_param_shapes") or {}
        if not frozen:
            return
        fragments = []
        for r in range(world):
            file = self.tag_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"
            states = model_states if r == 0 else self._load_meta(file)
            frags = states.get("frozen_param_fragments") if isinstance(states, Mapping) else None
            fragments.append((file, frags if isinstance(frags, Mapping) else {}))
        for name, shape in frozen.items():
            n = _numel(shape)
            per_rank = math.ceil(n / world)
            pieces, dtype = [], None
            for r, (file, frags) in enumerate(fragments):
                t = frags.get(name)
                want = max(0, min(per_rank, n - r * per_rank))
                if t is None or t.numel() < want or (want and span_of(t, file, name) is None):
                    raise CheckpointError(file, f"lacks rank {r}'s slice of the frozen parameter {name!r}",
                                          "the shard is damaged; copy it again")
                dtype = t.dtype
                if want:
                    size = t.element_size()
                    pieces.append(Piece(str(file), span_of(t, file, name).offset, want * size,
                                         r * per_rank * size))
            self._entries[name] = _Entry(tuple(int(s) for s in shape), dtype or torch.float32,
                                         f"module copy (frozen_param_fragments of {world} zero_pp_rank_*_model_states.pt)",
                                         pieces)

    def _add_master(self, name: str, shape, dtype: torch.dtype, pieces: list[Piece], n: int) -> None:
        got = sum(p.nbytes for p in pieces)
        if got != n * dtype.itemsize:
            raise CheckpointError(self.tag_dir, f"{name!r}: the fp32 partitions hold {got} of its"
                                  f" {n * dtype.itemsize} bytes",
                                  "the model and optimizer files come from different saves")
        self._entries[name] = _Entry(tuple(int(s) for s in shape), dtype, MASTER, pieces)

    # -- metadata --------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._order)

    def meta(self, key: str) -> TensorMeta:
        e = self._entries[key]
        files = {p.file for p in e.pieces or ()}
        file = files.pop() if len(files) == 1 else str(self.tag_dir)
        return TensorMeta(key, e.shape, e.dtype, file)

    def info(self) -> dict:
        return {
            **super().info(),
            "tag": self.tag,
            "step": self.step,
            "world_size": self.world_size,
            "zero_stage": self.stage,
            "ds_version": self.ds_version,
            "weights_from": {origin: list(keys) for origin, keys in self._origins.items()},
        }

    # -- data ----------------------------------------------------------------------
    def span(self, key: str) -> Span | None:
        pieces = self._entries[key].pieces
        if pieces is not None and len(pieces) == 1:
            p = pieces[0]
            return Span(p.file, p.offset, p.nbytes)
        return None

    def pieces(self, key: str) -> list[Piece] | None:
        return self._entries[key].pieces

    def _materialize(self, key: str) -> torch.Tensor:
        """A module tensor without a plain byte range: read the bytes its view spans."""
        file_name = self._entries[key].module_file
        if file_name not in self._modules:
            obj = self._load_meta(self.tag_dir / file_name)
            self._modules[file_name] = obj["module"]
        return read_tensor(self._modules[file_name][key], self.tag_dir / file_name, key)

    def close(self) -> None:
        self._modules.clear()


def _config_stage(model_states: Mapping) -> int:
    """The ZeRO stage the run's config asked for (0 when unknown)."""
    config = model_states.get("ds_config")
    zero = config.get("zero_optimization") if isinstance(config, Mapping) else None
    stage = zero.get("stage") if isinstance(zero, Mapping) else None
    return stage if isinstance(stage, int) else 0


def _has_model_states(folder: Path) -> bool:
    return any(_MODEL_STATES.match(p.name) for p in folder.glob("*mp_rank_*_model_states.pt"))
