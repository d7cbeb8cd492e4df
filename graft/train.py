"""Train or continue a run: the entry point that `accelerate launch` (or torchrun) starts.

It ships in the package, so an installed graft needs no script of its own:

    accelerate launch -m graft.train --config run.yaml
    accelerate launch -m graft.train --config run.yaml --resume auto train.epochs=20
    torchrun --nproc_per_node 2 -m graft.train --config run.yaml train.strategy=fsdp2
    python -m graft.train --config run.yaml              # one process, no launcher

`graft train` / `graft resume` build these command lines (and `train.py` at the repository
root is an alias of this module). Overrides are `section.field=value` (the value is read as
YAML). Exit codes: 0 when the run finished or was preempted (SIGTERM / SIGUSR1) after saving
a checkpoint (the summary says which; continue with --resume auto), 2 for a user or
environment problem (config, checkpoint, run folder unusable or locked, disk full), printed
as one `error:` line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run config YAML (e.g. the run.yaml `graft init` writes); defaults when omitted")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="'auto': the newest complete checkpoint of train.out_dir; or a checkpoint / run folder")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even if fields other than the safe ones (epochs, save_every, keep_last...) changed")
    p.add_argument("--summary", metavar="FILE", help="also write the run summary (JSON) to FILE (rank 0)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from graft.config import load_config
    from graft.errors import GraftError
    from graft.trainer import run

    try:
        config = load_config(args.config, args.overrides)
        summary = run(config, resume=args.resume, allow_config_change=args.allow_config_change)
    except GraftError as e:
        # A user or environment problem (config, checkpoint, run folder): one line that says the
        # way out. Anything else is a bug or a library failure and keeps its traceback.
        _report(e)
        return 2
    finally:
        _destroy_process_group()
    from graft._logging import global_rank

    if global_rank() == 0:
        text = json.dumps(summary, indent=1, default=str)
        if args.summary:
            with open(args.summary, "w") as f:
                f.write(text)
        if summary["preempted"] or not summary["finished"]:
            state = "preempted" if summary["preempted"] else "stopped (train.session_epochs)"
            print(f"{state}: checkpoint {summary['checkpoint']} saved at epoch {summary['epochs_done']}, "
                  f"step {summary['step']}; continue with --resume auto")
        else:
            print(f"done: epoch {summary['epochs_done']}, step {summary['step']}, "
                  f"val accuracy {summary['val_accuracy']:.4f}, run folder {summary['run_dir']}")
    return 0


def _report(e: Exception) -> None:
    """`error: ...` on one line; also into $GRAFT_ERROR_FILE (first writer wins), where `graft train`
    finds it behind launchers that turn exit code 2 into 1 and a traceback of their own."""
    import os

    from graft.launch.commands import ENV_ERROR_FILE

    message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    # One write: ranks share stderr, and print() writes the newline separately.
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    path = os.environ.get(ENV_ERROR_FILE)
    if path:
        try:
            with open(path, "x") as f:
                f.write(message)
        except OSError:
            pass  # another rank wrote it first, or the folder is gone: the line above stands


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
