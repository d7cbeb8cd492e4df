"""Run configs: one dataclass per section, YAML in, resolved YAML out.

    cfg = load_config("configs/digits_base.yaml", ["train.epochs=10", "optimizer.lr=3e-3"])
    cfg.to_yaml()   # the resolved config; the trainer writes it into the run folder

Every field has a one-line docstring (the string under it); unknown keys are errors that
name the key and the allowed ones; cross-field checks live in `__post_init__`. Every problem
raises `graft.errors.ConfigError` (a `GraftError` and a `ValueError`) naming the field.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from graft.errors import ConfigError
from graft.loading.plan import ON_MISMATCH
from graft.storage import S3Path, is_remote


@dataclass(kw_only=True)
class ModelConfig:
    """The model to train, built from a factory function."""

    factory: str = "graft.models:tiny_vgg_rnn3"
    """`module:function` that returns the nn.Module."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments passed to the factory (e.g. num_classes: 10)."""

    def __post_init__(self):
        if ":" not in self.factory:
            raise ConfigError(f"model.factory={self.factory!r}: write it as 'module:function', "
                             f"e.g. 'graft.models:tiny_vgg'")


@dataclass(kw_only=True)
class InitConfig:
    """Where the starting weights come from: graft.load's options, applied before wrapping."""

    checkpoint: str | None = None
    """Checkpoint to graft from (any format graft.open reads, a run folder too); null: random init."""
    rename: list = field(default_factory=list)
    """Rename rules, each [regex, replacement], applied to the checkpoint's keys."""
    include: list = field(default_factory=list)
    """Glob patterns: only these model keys are loaded (empty: all)."""
    exclude: list = field(default_factory=list)
    """Glob patterns of model keys never loaded (e.g. a new head)."""
    on_mismatch: str = "skip"
    """What a shape mismatch does: skip | error | copy-overlap."""
    freeze: Any = None
    """null (train everything), 'loaded' (freeze exactly what was loaded), or a list of names/globs."""

    def __post_init__(self):
        if self.on_mismatch not in ON_MISMATCH:
            raise ConfigError(f"init.on_mismatch={self.on_mismatch!r}; use {', '.join(ON_MISMATCH[:-1])} or {ON_MISMATCH[-1]}")
        if not (self.freeze in (None, "loaded") or (isinstance(self.freeze, list)
                                                     and all(isinstance(x, str) for x in self.freeze))):
            raise ConfigError(f"init.freeze={self.freeze!r}; use null, 'loaded' or a list of names/globs")
        rules = []
        for r in self.rename:
            if not (isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, str) for x in r)):
                raise ConfigError(f"init.rename entry {r!r}: each rule is [regex, replacement]")
            rules.append(list(r))
        self.rename = rules
        if self.freeze == "loaded" and self.checkpoint is None:
            raise ConfigError("init.freeze='loaded' needs init.checkpoint (nothing is loaded without one)")


@dataclass(kw_only=True)
class DataConfig:
    """The data: the packaged digits set, or your own images in class folders."""

    name: str = "digits"
    """digits (scikit-learn's 8x8 digits, shipped in the package) | imagefolder."""
    root: str | None = None
    """imagefolder: folder with one subfolder per class (torchvision ImageFolder layout)."""
    image_size: int = 32
    """Side of the square images fed to the model (tiny_vgg's 5 max-pools need >= 32)."""
    batch_size: int = 32
    """Samples per step per process."""
    val_fraction: float = 0.2
    """Share of the samples held out for validation (a fixed split from the seed)."""
    limit: int | None = None
    """Use only the first N samples of the shuffled set (tests, quick demos); null: all."""
    num_workers: int = 0
    """DataLoader worker processes (the data order does not depend on it)."""

    def __post_init__(self):
        if self.name not in ("digits", "imagefolder"):
            raise ConfigError(f"data.name={self.name!r}; use digits or imagefolder")
        if self.name == "imagefolder" and not self.root:
            raise ConfigError("data.name=imagefolder needs data.root (a folder with one subfolder per class)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction}; use a value in (0, 1)")
        if self.batch_size < 1 or self.image_size < 1:
            raise ConfigError("data.batch_size and data.image_size must be positive")
        if self.limit is not None and self.limit < 2:
            raise ConfigError(f"data.limit={self.limit}; use null or at least 2")


@dataclass(kw_only=True)
class OptimizerConfig:
    """The optimizer, built over graft.param_groups (trainable parameters only)."""

    name: str = "adamw"
    """adamw | sgd."""
    lr: float = 1e-3
    """Peak learning rate (the schedule scales it)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (not applied to biases and norms)."""
    momentum: float = 0.9
    """sgd only: momentum."""
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    """adamw only: (beta1, beta2)."""

    def __post_init__(self):
        if self.name not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer.name={self.name!r}; use adamw or sgd")
        if self.lr <= 0:
            raise ConfigError(f"optimizer.lr={self.lr}; must be positive")
        self.lr = float(self.lr)
        self.weight_decay = float(self.weight_decay)


SCHEDULES = ("constant", "cosine", "linear", "step")
EXTEND_POLICIES = ("continue", "restart", "stretch")


@dataclass(kw_only=True)
class ScheduleConfig:
    """The learning-rate schedule, a pure function of the global step, and what extension does to it."""

    name: str = "cosine"
    """constant | cosine | linear (decay to min_lr_ratio over the run) | step (x gamma every step_epochs)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimizer steps."""
    min_lr_ratio: float = 0.0
    """cosine / linear: final LR as a fraction of the peak."""
    step_epochs: int = 1
    """step: epochs between decays."""
    gamma: float = 0.5
    """step: decay factor."""
    on_extend: str = "continue"
    """When train.epochs is raised on resume: continue (the old curve, held at its end value) |
    restart (the schedule again, warm-up included, over the added epochs) | stretch (the curve
    recomputed for the new horizon, as if it had been configured from the start)."""

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ConfigError(f"schedule.name={self.name!r}; use one of {list(SCHEDULES)}")
        if self.on_extend not in EXTEND_POLICIES:
            raise ConfigError(f"schedule.on_extend={self.on_extend!r}; use one of {list(EXTEND_POLICIES)}")
        if self.warmup_steps < 0 or self.step_epochs < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("schedule: warmup_steps >= 0, step_epochs >= 1, 0 <= min_lr_ratio <= 1")


@dataclass(kw_only=True)
class TrainConfig:
    """The run: length, checkpoints, where it goes, how it is distributed."""

    epochs: int = 10
    """Total epochs of the run (raise it on resume to extend a finished run)."""
    save_every: int = 1
    """Save a run checkpoint every N epochs (the last epoch is always saved)."""
    keep_last: int | None = 3
    """Keep only the newest N complete checkpoints (null: keep all)."""
    async_save: bool = False
    """Save in the background: training waits only for a snapshot (at most each rank's shard, in host memory)."""
    out_dir: str = "runs/run"
    """The run folder: config.yaml, metrics.jsonl, checkpoints/. A local path, or an S3 prefix
    `s3://bucket/prefix` (the `[s3]` extra; endpoint and credentials from the AWS_* variables)."""
    seed: int = 0
    """Seeds the model init, the data split and every epoch's data order."""
    max_steps_per_epoch: int | None = None
    """Cut each epoch after this many steps (quick runs, tests); null: the whole loader."""
    session_epochs: int | None = None
    """Stop this launch after this many epochs (a checkpoint is saved) and continue later with
    --resume auto: for job time limits. null: run to train.epochs."""
    strategy: str = "auto"
    """auto (whatever accelerate launch set up: one process, DDP, DeepSpeed) | fsdp2 (fully_shard)."""
    log_every: int = 10
    """Write a 'step' line to metrics.jsonl every N steps."""
    progress: bool = True
    """tqdm bars on rank 0."""

    def __post_init__(self):
        if self.epochs < 1 or self.save_every < 1:
            raise ConfigError(f"train.epochs={self.epochs}, train.save_every={self.save_every}: both must be >= 1")
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError(f"train.keep_last={self.keep_last}; use null (keep all) or >= 1")
        if self.strategy not in ("auto", "fsdp2"):
            raise ConfigError(f"train.strategy={self.strategy!r}; use auto or fsdp2")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ConfigError(f"train.max_steps_per_epoch={self.max_steps_per_epoch}; use null or >= 1")
        if self.session_epochs is not None and self.session_epochs < 1:
            raise ConfigError(f"train.session_epochs={self.session_epochs}; use null or >= 1")
        if self.log_every < 1:
            raise ConfigError("train.log_every must be >= 1")
        if is_remote(self.out_dir):
            try:
                S3Path(self.out_dir)
            except ValueError as e:
                raise ConfigError(f"train.out_dir={self.out_dir!r} is not an S3 prefix ({e}); write it "
                                  "s3://bucket/prefix") from e


PRECISIONS = ("no", "bf16", "fp16")


@dataclass(kw_only=True)
class RunConfig:
    """A whole run: what `train.py --config` reads and what the run folder keeps."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model factory."""
    init: InitConfig = field(default_factory=InitConfig)
    """Initial weights and freezing (graft.load)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset and loader."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule and extension policy."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Run length, checkpoints, strategy."""
    precision: str = "no"
    """Mixed precision for accelerate: no | bf16 | fp16."""

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}; use one of {list(PRECISIONS)}")
        if self.precision == "fp16" and self.train.strategy == "fsdp2":
            raise ConfigError("precision=fp16 with train.strategy=fsdp2 is not supported; use bf16 or no")
        if self.init.checkpoint and _same_place(self.init.checkpoint, self.train.out_dir):
            raise ConfigError(f"init.checkpoint={self.init.checkpoint!r} is the run's own train.out_dir: "
                             f"to continue that run use --resume, to graft from it use another out_dir")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        return _build(cls, data, "")


# Fields a resumed run may change without --allow-config-change: they change neither the
# math nor the data order of the steps already taken.
SAFE_ON_RESUME = frozenset({
    "train.epochs", "train.save_every", "train.keep_last", "train.async_save", "train.out_dir", "train.log_every",
    "train.progress", "train.session_epochs", "data.num_workers", "data.root", "schedule.on_extend", "init.checkpoint",
    # Run checkpoints are world-size- and strategy-free: a run may continue under another one.
    "train.strategy",
})


def _section_types(cls) -> dict[str, type]:
    hints = {f.name: f for f in fields(cls)}
    out = {}
    for name, f in hints.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[name] = type(default) if dataclasses.is_dataclass(default) else None
    return out


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {type(data).__name__}: {data!r}")
    allowed = [f.name for f in fields(cls)]
    unknown = [k for k in data if k not in allowed]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key {key!r}; allowed {('in ' + where) if where else 'sections'}: "
                         f"{allowed}")
    kwargs = {}
    sections = _section_types(cls)
    for k, v in data.items():
        sub = sections.get(k)
        kwargs[k] = _build(sub, v if v is not None else {}, f"{where}.{k}" if where else k) if sub else v
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from e


def _set(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
        node = node[p]
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'section.field=value' -> (dotted key, value parsed as YAML: 3, 1e-3, null, [a, b], true)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: write it as section.field=value, e.g. train.epochs=10")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key.startswith("--"):
        key = key[2:]
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({' '.join(str(e).split())})") from e
    # YAML 1.1 reads '1e-3' as a string; people mean the number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in "e.") else value
        except ValueError:
            pass
    return key, value


def _same_place(a: str, b: str) -> bool:
    """Whether two paths name the same folder (s3:// URLs compared as S3 paths, not as local files)."""
    if is_remote(a) or is_remote(b):
        try:
            return is_remote(a) and is_remote(b) and S3Path(a) == S3Path(b)
        except ValueError:
            return False
    return os.path.abspath(a) == os.path.abspath(b)


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config (or the defaults when path is None) and apply `section.field=value` overrides.
    `path` may be an s3:// object (the config.yaml of a run folder on S3: `graft resume s3://...`)."""
    tree: dict = {}
    if path is not None and is_remote(path):
        try:
            text = S3Path(path).read_text()
        except ValueError as e:
            raise ConfigError(f"config file {path!s}: {e}") from e
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: cannot read the run config: {' '.join(str(e).split())}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: a run config is a YAML mapping of sections, got {type(tree).__name__}")
    elif path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!s} not found")
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read the run config: {' '.join(str(e).split())}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: a run config is a YAML mapping of sections, got {type(tree).__name__}")
    for text in overrides:
        key, value = parse_override(text)
        _set(tree, key, value)
    where = f" (in {path})" if path else ""
    try:
        return RunConfig.from_dict(tree)
    except ValueError as e:
        raise ConfigError(f"{e}{where}") from e


def diff(old: dict, new: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Flat {dotted.key: (old, new)} of every leaf that differs between two config dicts."""
    out = {}
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        key = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict) and k != "kwargs":
            out.update(diff(a, b, key + "."))
        elif a != b:
            out[key] = (a, b)
    return out


def field_docs(cls=RunConfig) -> dict[str, str]:
    """{field: one-line doc} read from the docstrings under each field (for `graft config --help`)."""
    src = inspect.getsource(cls)
    tree = ast.parse(src).body[0]
    docs = {}
    body = tree.body
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs
