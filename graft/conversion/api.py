"""`graft.convert`: any checkpoint graft reads, rewritten in the format the next tool needs.

open (lazy reader) -> select (names, dtypes, from metadata) -> writer.layout (files) ->
validate (every source byte is there) -> stream through one bounded buffer into the writer,
at a temporary path -> publish. Nothing outside the writers knows a target format.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import torch

from graft._logging import get_logger, progress as progress_bar
from graft.conversion.report import ConvertReport
from graft.conversion.select import select
from graft.conversion.staging import refuse_existing, staged
from graft.conversion.stream import DEFAULT_BUFFER_BYTES, TensorStream
from graft.conversion.writers import WRITERS, WriteOptions, writer_for
from graft.conversion.writers.hf import parse_size
from graft.errors import PlanError
from graft.loading import api as loading

log = get_logger("graft")
TARGETS = tuple(WRITERS)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    rename: Sequence[tuple[str, str]] = (),
    strip_prefix: bool | str | Sequence[str] = False,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    dcp_key: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    buffer_mb: float = DEFAULT_BUFFER_BYTES / 2**20,
    progress: bool = True,
    verbose: bool = False,
    **open_options,
) -> ConvertReport:
    """Write the checkpoint at `src` as `to` ("safetensors", "hf", "dcp", "torch") at `dst`.

    Keys are chosen and named with the loading core's rules (rename, strip_prefix,
    include/exclude); `dtype` ("bf16", "fp16", "fp32") casts floating-point tensors only.
    Memory stays bounded: one read buffer of the largest tensor + buffer_mb plus a
    16 MiB cast buffer, whatever the model's size. The output appears at `dst` only when
    complete (temporary name, fsync, rename); an existing `dst` is refused unless `force`.
    `dry_run` writes nothing and returns the report of what would be written.
    open_options go to `graft.open` (tag, container, format, model_index, allow_globals).
    """
    if to not in TARGETS:
        raise PlanError(f"to={to!r}; choose one of {TARGETS}")
    dst = Path(dst)
    options = WriteOptions(max_shard_size=parse_size(max_shard_size), dcp_key=dcp_key or None)
    with loading.open(src, **open_options) as ckpt:
        selection = select(ckpt, rename=rename, include=include, exclude=exclude, strip_prefix=strip_prefix,
                           dtype=dtype)
        writer = writer_for(to)(selection.tensors, options)
        stream = TensorStream(ckpt, selection.tensors, buffer_bytes=int(buffer_mb * 2**20))
        report = ConvertReport(str(src), str(dst), to, ckpt.format, ckpt.source, selection, writer.layout(),
                               dry_run, stream.peak_bytes, info=ckpt.info())
        if dry_run:
            return report
        refuse_existing(dst, force)
        # Every byte the selection needs is checked before the first output byte is written.
        ckpt.validate([t.source_key for t in selection.tensors])
        start = time.perf_counter()
        total = sum(t.source_nbytes for t in selection.tensors)
        with progress_bar(total, f"convert -> {to}", enabled=progress) as bar:
            stream.on_bytes = bar.update
            with staged(dst, folder=writer.folder, force=force) as tmp:
                writer.write(tmp, stream)
        report.seconds = time.perf_counter() - start
        report.bytes_read = ckpt.bytes_read
    if verbose:
        log.info("\n%s", report)
    return report
