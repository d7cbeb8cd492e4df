#!/usr/bin/env python
"""S3 loading benchmark: graft.load from s3:// against download-then-load and a file object.

One local S3-compatible server (moto's ThreadedMotoServer on 127.0.0.1, behind the tests'
byte-counting proxy, tests/s3_server.py) holds two sources, uploaded once: a safetensors file
and a torch.save .pth of the same --gb GiB of fp32 Linear layers (bench/convert.py's layout).
Every run is a fresh process forked from an idle server that has imported the libraries; it
builds the model (weights written, pages resident) and creates its client before the clock,
then times ONE load from the object:

  graft     graft.load(model, "s3://bucket/key"[, include=...]): metadata by small range reads,
            then only the planned tensors' byte ranges, merged, several GETs in flight, into
            the parameters' memory.
  download  boto3 download_file (s3transfer: ranged GETs, 10 threads) to a local file, then
            safetensors.torch.load_file / torch.load(weights_only=True) + load_state_dict:
            what scripts do. Download + load are timed together; the file is removed after.
  stream    a file object: boto3 get_object(...)["Body"] streamed into an io.BytesIO, then
            safetensors.torch.load(f.read()) / torch.load(f, weights_only=True) +
            load_state_dict. (The brief asked for s3fs here; s3fs 2026.9.0 needs
            aiobotocore 3.10, which pins botocore <1.43.118, and the project pins botocore
            1.44.18 beside boto3 1.44.18; under those pins pip only finds s3fs 0.4.2, a 2020
            release. So the file-object peer is boto3's streaming body in a BytesIO: for
            safetensors about what f.read() on an s3fs file fetches (the rest of the object
            in one GET); for torch.load generous to s3fs, whose file object would serve the
            zip reader's seeks with block-sized ranged GETs instead of memory.)

Scenarios, for each source:
  full      the model takes every tensor.
  filtered  include= two of the N layers; graft fetches their ranges only, the peers must
            fetch the whole object and keep two layers (load_state_dict(strict=False)).

Figures per run: wall (seconds of the load), bytes the server sent (the proxy's count: HTTP
headers, metadata reads and tensors, everything), GET requests, and the peak RssAnon /
RssFile above the level at the start (procstats.PeakRss: what the method holds on top of
the model). Tables show medians; "graft/x" is graft's median over the method's (below 1:
graft is faster / sends less); "sent/plan" is the server's bytes over graft's planned bytes
(report.plan.bytes_to_read). Every load is checked: the first values of every kept tensor,
and (filtered) that every other parameter is untouched.

On one machine the local server is the bottleneck: moto and the proxy are Python, in this
benchmark's parent process, on the same cores as the client. The figures compare client
strategies against the same server, not network or S3 speeds. One thing about moto is not
like S3 and is fixed here: moto answers every GET, ranged or not, by reading the whole
object into memory and slicing it (moto/s3/responses.py get_object, _handle_range_header),
so a ranged GET of a 1 GiB object costs a 1 GiB read (measured: 41 ms for 1 MiB of a 64 MiB
object, 154 ms for 1 MiB of a 256 MiB one). That penalises every client that reads by ranges
(graft, and boto3's download_file as well) by the object's size per request, and with
8 requests in flight holds 8 copies of the object in the server. The benchmark's server
process patches moto so a single-range GET reads only its range from the stored object
(the bytes sent are the same); --moto-as-is turns the patch off.

Run:  .venv/bin/python bench/s3.py            (~1 GiB, 3 runs each, median)
      .venv/bin/python bench/s3.py --quick    (0.125 GiB, 1 run each, for development)
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from linear_layers import layout, make_state, probe  # noqa: E402
from procstats import PeakRss, run_in_child  # noqa: E402

MB = 1 << 20
GIB = 1 << 30
FORMATS = {"safetensors": "model.safetensors", "torch": "model.pth"}
SCENARIOS = ("full", "filtered")
METHODS = ("graft", "download", "stream")
BUCKET = "graft-bench-s3"


# ---------------------------------------------------------------------------------------
# The model and the sources (shared by the parent and every child)
# ---------------------------------------------------------------------------------------
def picked_layers(layers: int) -> tuple[int, int]:
    """The two layers the filtered scenario keeps: apart, so graft reads two separate ranges."""
    return 1, layers // 2 + 1


def build_model(hidden: int, layers: int):
    """Built on meta, then real memory written once: the pages exist before the load, as after an init."""
    import torch

    with torch.device("meta"):
        model = torch.nn.Module()
        model.layers = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(layers))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for t in model.state_dict().values():
            t.fill_(-1.0)
    return model


# ---------------------------------------------------------------------------------------
# The methods (child)
# ---------------------------------------------------------------------------------------
def keep_included(sd: dict, include: list[int] | None) -> dict:
    """The hand-written filter: the picked layers' keys (all keys without a filter)."""
    if include is None:
        return sd
    prefixes = tuple(f"layers.{i}." for i in include)
    return {k: v for k, v in sd.items() if k.startswith(prefixes)}


def m_graft(model, ctx) -> dict:
    import graft

    kw = {"include": [f"layers.{i}.*" for i in ctx["include"]]} if ctx["include"] is not None else {}
    report = graft.load(model, ctx["url"], verbose=False, progress=False, **kw)
    return {"planned": report.plan.bytes_to_read}


def read_local(fmt: str, source) -> dict:
    """The state dict from a local path or a file object, by the format's own reader."""
    import torch

    if fmt == "safetensors":
        import safetensors.torch

        if isinstance(source, str):
            return safetensors.torch.load_file(source)
        return safetensors.torch.load(source.read())
    return torch.load(source, map_location="cpu", weights_only=True)


def m_download(model, ctx) -> dict:
    local = ctx["download_to"]  # removed by measure(), after the clock
    ctx["client"].download_file(BUCKET, ctx["key"], local)
    sd = read_local(ctx["format"], local)
    model.load_state_dict(keep_included(sd, ctx["include"]), strict=ctx["include"] is None)
    del sd
    return {}


def m_stream(model, ctx) -> dict:
    import io

    body = ctx["client"].get_object(Bucket=BUCKET, Key=ctx["key"])["Body"]
    f = io.BytesIO()
    for chunk in body.iter_chunks(8 * MB):
        f.write(chunk)
    f.seek(0)
    sd = read_local(ctx["format"], f)
    model.load_state_dict(keep_included(sd, ctx["include"]), strict=ctx["include"] is None)
    del sd, f
    return {}


RUN = {"graft": m_graft, "download": m_download, "stream": m_stream}


def measure(spec: dict) -> dict:
    model = build_model(spec["hidden"], spec["layers"])
    include = spec["include"]
    ctx = {"format": spec["format"], "key": spec["key"], "url": f"s3://{BUCKET}/{spec['key']}",
           "include": include, "download_to": spec["download_to"]}
    # Imports and client construction are paid before the clock: the benchmark times loading.
    # (graft builds its obstore store inside graft.load: no request, well under a millisecond.)
    import safetensors.torch  # noqa: F401

    if spec["method"] == "graft":
        import graft  # noqa: F401
        import graft.storage.paths  # noqa: F401
        import obstore.store  # noqa: F401
    else:
        import boto3

        ctx["client"] = boto3.client("s3")
    gc.collect()
    with PeakRss() as peak:
        t0 = time.perf_counter()
        out = RUN[spec["method"]](model, ctx)
        wall = time.perf_counter() - t0
    Path(spec["download_to"]).unlink(missing_ok=True)
    # Correctness: every kept tensor holds the checkpoint's values; every other one is untouched.
    own = model.state_dict()
    kept = {k for k in own} if include is None else set(keep_included(own, include))
    bad = [k for k, v in spec["expect"].items() if k in kept and probe(own[k]) != v]
    bad += [k for k in own if k not in kept and probe(own[k]) != [-1.0] * 4]
    return {"wall": wall, "anon": peak.extra_anon, "file": peak.extra_file, "bad": bad[:5], **out}


# ---------------------------------------------------------------------------------------
# The server (parent)
# ---------------------------------------------------------------------------------------
def patch_moto_ranges() -> None:
    """Make moto serve a single-range GET by reading only that range of the stored object.

    moto's get_object returns key.value (the whole object, read from its spooled temp file)
    and _handle_range_header slices it. While get_object runs for a request with one byte
    range, key.value is a window over the stored bytes instead, and the slice reads just
    those bytes (pread on the temp file: no shared file position). Headers, status codes and
    bytes on the wire are unchanged.
    """
    from moto.s3.models import FakeKey
    from moto.s3.responses import S3Response

    lazy = threading.local()
    whole = FakeKey.value

    class Window:
        def __init__(self, key):
            self.key = key

        def __len__(self) -> int:
            return self.key.size

        def __getitem__(self, s: slice) -> bytes:
            assert isinstance(s, slice) and s.step is None, s
            start, stop, _ = s.indices(self.key.size)
            n = max(0, stop - start)
            buf = self.key._value_buffer
            with self.key.lock:
                if not getattr(buf, "_rolled", False):  # still in memory (a small object)
                    buf.seek(start)
                    return buf.read(n)
                buf.flush()
            fd, parts, done = buf.fileno(), [], 0
            while done < n:
                piece = os.pread(fd, min(n - done, 1 << 30), start + done)
                if not piece:
                    break
                parts.append(piece)
                done += len(piece)
            return parts[0] if len(parts) == 1 else b"".join(parts)

    def value(self):
        return Window(self) if getattr(lazy, "on", False) else whole.fget(self)

    FakeKey.value = property(value, whole.fset)

    get_object = S3Response.get_object

    def ranged_get_object(self):
        rng = self.headers.get("range") or ""
        lazy.on = rng.startswith("bytes=") and "," not in rng and not self._get_int_param("partNumber")
        try:
            return get_object(self)
        finally:
            lazy.on = False

    handle_range = S3Response._handle_range_header

    def handle_range_whole(self, request, headers, content):
        status, headers, body = handle_range(self, request, headers, content)
        if isinstance(body, Window):  # a range moto treats as no range: the whole object after all
            body = body[:]
        return status, headers, body

    S3Response.get_object = ranged_get_object
    S3Response._handle_range_header = handle_range_whole


def start_server(patch: bool, workdir: Path):
    """moto + the counting proxy (tests/s3_server.py), and the AWS_* environment every child inherits."""
    sys.path.insert(1, str(ROOT / "tests"))
    from s3_server import S3Server

    if patch:
        patch_moto_ranges()
    server = S3Server()
    # No profile of the user running the benchmark may leak into the clients.
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    os.environ["AWS_CONFIG_FILE"] = str(workdir / "no-aws-config")
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(workdir / "no-aws-credentials")
    os.environ.update(server.env())
    return server


def upload_sources(server, workdir: Path, hidden: int, layers: int) -> tuple[dict, dict]:
    """Write both sources with the real tools, upload them straight to moto (not counted); return
    ({key: probe values} (the same values in both), {format: object size})."""
    import torch
    from boto3.s3.transfer import TransferConfig
    from safetensors.torch import save_file

    sd = make_state(hidden, layers)
    expect = {k: probe(v) for k, v in sd.items()}
    client = server.client()
    client.create_bucket(Bucket=BUCKET)
    sizes = {}
    for fmt, key in FORMATS.items():
        local = workdir / key
        if fmt == "safetensors":
            save_file(sd, local, metadata={"format": "pt"})
        else:
            torch.save(sd, local)
        sizes[fmt] = local.stat().st_size
        client.upload_file(str(local), BUCKET, key, Config=TransferConfig(multipart_chunksize=64 * MB))
        local.unlink()
        # The first HEAD computes moto's ETag of the object once, here, not during a timed run.
        assert client.head_object(Bucket=BUCKET, Key=key)["ContentLength"] == sizes[fmt]
    del sd
    gc.collect()
    return expect, sizes


# ---------------------------------------------------------------------------------------
# The parent: runs, tables, ratios
# ---------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=None, help="model size, GiB (default 1)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per measurement; the median is shown (default 3)")
    ap.add_argument("--quick", action="store_true", help="development: --gb 0.125 --repeats 1")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma list of {tuple(FORMATS)}")
    ap.add_argument("--moto-as-is", action="store_true",
                    help="do not patch moto's ranged GETs (each then reads the whole object in the server)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "s3",
                    help="where the sources are written before upload and the download peer writes")
    ap.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    args = ap.parse_args()
    gb = args.gb if args.gb is not None else (0.125 if args.quick else 1.0)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    formats = [f for f in args.formats.split(",") if f]
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"--formats: unknown format {f!r}; choose from {tuple(FORMATS)}")
    hidden, layers = layout(gb, min_layers=4)
    picked = picked_layers(layers)
    layer_bytes = 4 * hidden * (hidden + 1)
    planned = {"full": layers * layer_bytes, "filtered": len(picked) * layer_bytes}
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    started = time.time()
    server = start_server(patch=not args.moto_as_is, workdir=workdir)
    rows, all_runs = {}, []
    ok = True
    try:
        t0 = time.time()
        expect, sizes = upload_sources(server, workdir, hidden, layers)
        moto = ("moto as is (ranged GETs read the whole object)" if args.moto_as_is
                else "ranged GETs patched to read only the range")
        print(f"# bench/s3.py: {layers} x Linear({hidden}, {hidden}) fp32 = {planned['full'] / GIB:.3f} GiB; "
              f"{repeats} run(s) each, median; fresh forked process per run; {os.cpu_count()} CPUs; "
              f"server: moto {server_version()} on 127.0.0.1 behind the counting proxy, "
              f"{moto}; "
              f"sources uploaded in {time.time() - t0:.0f} s", flush=True)
        print(f"# filtered: include layers {picked[0]} and {picked[1]} of {layers} "
              f"= {planned['filtered'] / MB:,.0f} MiB planned", flush=True)
        mpctx = mp.get_context("forkserver")
        mpctx.set_forkserver_preload(["torch", "safetensors.torch", "boto3", "botocore.client", "obstore",
                                      "graft", "graft.storage.paths"])
        for fmt in formats:
            key = FORMATS[fmt]
            for scenario in SCENARIOS:
                include = list(picked) if scenario == "filtered" else None
                spec = {"format": fmt, "key": key, "hidden": hidden, "layers": layers, "include": include,
                        "expect": expect, "download_to": str(workdir / f"download-{key}")}
                runs = {m: [] for m in METHODS}
                for r in range(repeats):
                    order = METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]  # no method always first
                    for method in order:
                        server.proxy.reset()
                        res = run_in_child(measure, {**spec, "method": method}, mpctx)
                        res["sent"] = server.proxy.bytes_down
                        res["gets"] = sum(1 for line in server.proxy.requests if line.startswith("GET "))
                        if "error" in res:
                            print(f"!! {fmt}/{scenario}/{method}: {res['error']}", flush=True)
                            ok = False
                            continue
                        if res["bad"]:
                            print(f"!! {fmt}/{scenario}/{method}: WRONG VALUES in {res['bad']}", flush=True)
                            ok = False
                        if "planned" in res and res["planned"] != planned[scenario]:
                            print(f"!! {fmt}/{scenario}: graft planned {res['planned']:,} bytes, "
                                  f"expected {planned[scenario]:,}", flush=True)
                        runs[method].append(res)
                        all_runs.append({"format": fmt, "scenario": scenario, "method": method, "run": r, **res})
                med = {}
                for m, rs in runs.items():
                    if rs:
                        med[m] = {f: statistics.median(x[f] for x in rs)
                                  for f in ("wall", "sent", "gets", "anon", "file")}
                        med[m]["min"], med[m]["max"] = min(x["wall"] for x in rs), max(x["wall"] for x in rs)
                rows[(fmt, scenario)] = med
                print_table(fmt, scenario, med, sizes[fmt], planned[scenario])
    finally:
        server.close()
        for p in workdir.glob("download-*"):
            p.unlink()
        try:
            workdir.rmdir()
        except OSError:
            pass
    print(f"\n# total {time.time() - started:.0f} s")
    ok &= print_ratios(rows, planned)
    if args.json:
        args.json.write_text(json.dumps({"gb": gb, "hidden": hidden, "layers": layers, "repeats": repeats,
                                         "moto_patched": not args.moto_as_is, "planned": planned, "sizes": sizes,
                                         "runs": all_runs}, indent=1))
    return 0 if ok and len(rows) == len(formats) * len(SCENARIOS) else 1


def server_version() -> str:
    from importlib.metadata import version

    return version("moto")


LABEL = {"graft": "graft.load(s3://)",
         "download": {"safetensors": "download_file + load_file", "torch": "download_file + torch.load"},
         "stream": {"safetensors": "get_object->BytesIO + st.load", "torch": "get_object->BytesIO + torch.load"}}


def label(method: str, fmt: str) -> str:
    name = LABEL[method]
    return name if isinstance(name, str) else name[fmt]


def print_table(fmt: str, scenario: str, med: dict, size: int, planned: int) -> None:
    print(f"\n## {fmt}, {scenario}  (object {size / MB:,.0f} MiB; graft plans {planned / MB:,.0f} MiB)")
    print("| method | wall s (min-max) | graft/x wall | MiB sent | sent/plan | graft/x sent | GETs | +anon MiB "
          "| +file MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    g = med.get("graft")
    for m, v in med.items():
        gw = f"{g['wall'] / v['wall']:.2f}" if g else "-"
        gs = f"{g['sent'] / v['sent']:.3f}" if g else "-"
        print(f"| {label(m, fmt)} | {v['wall']:.2f} ({v['min']:.2f}-{v['max']:.2f}) | {gw} | {v['sent'] / MB:,.1f} | "
              f"{v['sent'] / planned:.3f} | {gs} | {v['gets']:.0f} | {v['anon'] / MB:,.0f} | {v['file'] / MB:,.0f} |",
              flush=True)


def print_ratios(rows: dict, planned: dict) -> bool:
    """graft over each peer, per format and scenario; fetched/planned of graft's filtered loads."""
    print("# ratios (graft / peer: below 1, graft takes less)")
    for (fmt, scenario), med in rows.items():
        g = med.get("graft")
        if not g:
            continue
        parts = [f"{label(m, fmt)}: wall {g['wall'] / v['wall']:.2f}, bytes {g['sent'] / v['sent']:.3f}"
                 for m, v in med.items() if m != "graft"]
        print(f"  {fmt} {scenario}: " + "; ".join(parts))
    ok = True
    print("# graft fetched / planned (the server's bytes, headers and metadata included; the tests' bound is 1.05)")
    for (fmt, scenario), med in rows.items():
        if "graft" in med:
            ratio = med["graft"]["sent"] / planned[scenario]
            passed = scenario != "filtered" or ratio <= 1.05
            ok &= passed
            print(f"{'PASS' if passed else 'MISS'}  {fmt} {scenario}: {med['graft']['sent']:,.0f} / "
                  f"{planned[scenario]:,} = {ratio:.4f}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
