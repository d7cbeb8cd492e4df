"""The `graft` command: inspect a checkpoint, dry-run a load against a model, convert, train, resume."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections import Counter, defaultdict

from graft.errors import GraftError
from graft.loading.formats.base import dtype_name
from graft.loading.plan import ON_MISMATCH


def _open(args):
    import graft

    return graft.open(args.path, format=args.format, container=args.container,
                      allow_globals=args.allow_global or (), tag=args.tag, model_index=args.model_index)


def _add_open_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint file or folder")
    p.add_argument("--format", help="force a reader (torch, safetensors, hf-index, ...)")
    p.add_argument("--container", help="torch files: the key holding the state dict")
    p.add_argument("--allow-global", action="append", metavar="QUALNAME",
                   help="accept this pickle global as an inert stand-in (repeatable)")
    p.add_argument("--tag", help="DeepSpeed folders: the tag to read (default: the `latest` file)")
    p.add_argument("--model-index", type=int, default=0,
                   help="accelerate save_state folders: which model (0 for model.safetensors, 1 for model_1...)")
    p.add_argument("--json", action="store_true", help="print JSON for machines")


def inspect_summary(ckpt) -> dict:
    """Format, tensor count, bytes, dtypes and keys grouped by their leading segments."""
    metas = [ckpt.meta(k) for k in ckpt.keys()]
    dtypes = Counter()
    dtype_bytes = Counter()
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for m in metas:
        d = dtype_name(m.dtype)
        dtypes[d] += 1
        dtype_bytes[d] += m.nbytes
        head = m.key.split(".")[0]
        groups[head][0] += 1
        groups[head][1] += m.nbytes
    return {
        **{k: v for k, v in ckpt.info().items() if v is not None},
        "tensors": len(metas),
        "bytes": sum(m.nbytes for m in metas),
        "params": sum(m.numel for m in metas),
        "dtypes": {d: {"tensors": n, "bytes": dtype_bytes[d]} for d, n in dtypes.items()},
        "groups": {g: {"tensors": n, "bytes": b} for g, (n, b) in groups.items()},
        "keys": {m.key: {"shape": list(m.shape), "dtype": dtype_name(m.dtype)} for m in metas},
    }


def cmd_inspect(args) -> int:
    from graft.loading.report import human_bytes

    with _open(args) as ckpt:
        s = inspect_summary(ckpt)
    if args.json:
        print(json.dumps(s, indent=2, default=str))
        return 0
    print(f"{s['path']}")
    for k, v in s.items():
        if k not in ("path", "keys", "groups", "dtypes", "tensors", "bytes", "params") and not isinstance(v, dict):
            print(f"  {k:12s} {v}")
    if isinstance(s.get("layout"), dict):  # a graft run checkpoint: how the saving run cut its state up
        lay = s["layout"]
        if lay.get("kind") == "sharded":
            per = ", ".join(f"{human_bytes(b)}" for b in lay["bytes_per_shard"].values())
            groups = ", ".join(f"{g} {n}" for g, n in lay["logical_tensors"].items())
            print(f"  {'layout':12s} sharded: {lay['shard_files']} shard file(s) ({per}), {lay['pieces']} pieces; "
                  f"logical tensors: {groups}")
        else:
            print(f"  {'layout':12s} {lay.get('kind')}: {', '.join(lay.get('files', []))}")
    print(f"  {'tensors':12s} {s['tensors']} ({s['params']:,} values, {human_bytes(s['bytes'])})")
    print("  dtypes       " + ", ".join(f"{d}: {v['tensors']} ({human_bytes(v['bytes'])})" for d, v in s["dtypes"].items()))
    print("  keys by prefix:")
    for g, v in s["groups"].items():
        print(f"    {g:30s} {v['tensors']:6d} tensors  {human_bytes(v['bytes']):>10s}")
    return 0


def load_factory(spec: str, kwargs_json: str | None):
    """`module:factory` -> the model it builds, on the meta device (a dry run allocates nothing)."""
    import torch

    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise SystemExit(f"--model {spec!r}: expected module:factory, e.g. graft.models:vgg16_rnn3")
    factory = getattr(importlib.import_module(module_name), attr)
    kwargs = json.loads(kwargs_json) if kwargs_json else {}
    with torch.device("meta"):
        return factory(**kwargs)


def _rename(values: list[str] | None) -> list[tuple[str, str]]:
    rules = []
    for v in values or []:
        pattern, sep, repl = v.partition("=")
        if not sep:
            raise SystemExit(f"--rename {v!r}: expected REGEX=REPLACEMENT, e.g. '^backbone\\.=features.'")
        rules.append((pattern, repl))
    return rules


def cmd_diff(args) -> int:
    import graft

    model = load_factory(args.model, args.model_kwargs)
    with _open(args) as ckpt:
        plan = graft.plan(model, ckpt, rename=_rename(args.rename), include=args.include or (),
                          exclude=args.exclude or (), on_mismatch=args.on_mismatch)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2, default=str))
    else:
        print(plan)
    if args.min_coverage is not None and plan.coverage < args.min_coverage:
        print(f"coverage {plan.coverage:.1%} is below --min-coverage {args.min_coverage:.1%}", file=sys.stderr)
        return 1
    return 0


def cmd_convert(args) -> int:
    import graft

    report = graft.convert(
        args.path, args.dst, to=args.to, include=args.include or (), exclude=args.exclude or (),
        rename=_rename(args.rename), strip_prefix=args.strip_prefix, dtype=args.dtype,
        max_shard_size=args.max_shard_size, dcp_key=args.dcp_key, force=args.force, dry_run=args.dry_run,
        buffer_mb=args.buffer_mb,
        progress=not args.json, format=args.format, container=args.container,
        allow_globals=args.allow_global or (), tag=args.tag, model_index=args.model_index)
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="what a checkpoint holds, from metadata only")
    _add_open_options(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("diff", help="dry run: how a checkpoint would load into a model")
    _add_open_options(p)
    p.add_argument("--model", required=True, help="module:factory building the model, e.g. graft.models:vgg16_rnn3")
    p.add_argument("--model-kwargs", help="JSON keyword arguments for the factory")
    p.add_argument("--rename", action="append", metavar="REGEX=REPL", help="rename rule, applied in order")
    p.add_argument("--include", action="append", metavar="GLOB", help="load only keys matching (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="never load keys matching (repeatable)")
    p.add_argument("--on-mismatch", choices=ON_MISMATCH, default="skip")
    p.add_argument("--min-coverage", type=float, help="exit 1 when the loaded share of parameters is below this (0-1)")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("convert", help="rewrite a checkpoint as safetensors, HF shards, DCP or a .pth, streamed")
    _add_open_options(p)
    p.add_argument("dst", help="output file (safetensors, torch) or folder (hf, dcp)")
    p.add_argument("--to", required=True, choices=["safetensors", "hf", "dcp", "torch"], help="the target format")
    p.add_argument("--rename", action="append", metavar="REGEX=REPL", help="rename rule, applied in order")
    p.add_argument("--include", action="append", metavar="GLOB", help="write only keys matching (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="never write keys matching (repeatable)")
    # A flag, not an optional value: `--strip-prefix SRC DST` must not take SRC as a prefix.
    # Any other prefix goes with --rename '^prefix\.='.
    p.add_argument("--strip-prefix", action="store_true",
                   help="strip the wrapper prefixes every key has (module., _orig_mod., model.) and torch.compile's")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="cast floating-point tensors (others kept)")
    p.add_argument("--max-shard-size", default="5GB", help="hf: the most bytes per shard (default 5GB)")
    p.add_argument("--dcp-key", help="dcp: nest the keys under this name (e.g. model); default top level")
    p.add_argument("--force", action="store_true", help="replace an existing DST (only once the new one is complete)")
    p.add_argument("--dry-run", action="store_true", help="print what would be written; write nothing")
    p.add_argument("--buffer-mb", type=float, default=64, help="read buffer (grown to the largest tensor)")
    p.set_defaults(func=cmd_convert)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Commands of the trainer and launcher, registered when their modules are present."""
    found = []
    for name in ("graft.launch.train_cmd", "graft.launch.init_cmd"):
        try:
            found.append(importlib.import_module(name).register)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
    return found


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except GraftError as e:
        # A bad checkpoint, plan or config: the user's to fix, so one line and exit 2 (argparse's
        # code for bad input). Any other exception is a bug and keeps its traceback.
        print(f"graft: error: {one_line(e)}", file=sys.stderr)
        return 2


def one_line(e: BaseException) -> str:
    """The error's message on one line ('path: problem; way out: ...')."""
    return "; ".join(part.strip() for part in str(e).splitlines() if part.strip())


if __name__ == "__main__":
    sys.exit(main())
