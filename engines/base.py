"""One engine interface over two backends: build an artifact from an ONNX model, load it as a runner, time it.

An engine artifact is a directory holding `engine.json` (backend, kind, source ONNX sha256, shape ranges,
build options, versions, the files it holds and their sha256) and the backend's files. It is written
atomically (`atomic_dir`), reused when the build key (source hash + backend + shapes + options) is unchanged
and rebuilt otherwise. Backends are looked up by name in `engines.registry` (`register_backend`, `backends`).
Runners are `engines.runner.EngineRunner`s, following `evaluation.runners.Runner` (`input_names`, `output_names`,
`run(feeds)`): feeds are checked once, in the base, and shapes outside the built ranges are rejected as a
TensorRT engine does.
"""
from __future__ import annotations

import hashlib
import json
import numbers
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from core.host import host_info, library_versions
from evaluation.interface import BEAM, FEATURE_DIM, MAX_HYP_PAD
from evaluation.runners import guess_kind
from core.errors import WorkbenchError
from core.fsutil import atomic_dir, read_json, sha256_file, write_json
from engines.registry import AUTO, backends, get_backend
from engines.runner import Shapes

FORMAT = "workbench-engine"
FORMAT_VERSION = 1
META_FILE = "engine.json"
WARMUP, ITERS = 10, 30  # the hackathon's timing: 10 warm-up and 30 timed runs per case

# Default shape ranges (min, opt, max): batch 1-16 for both; encoder input frames 16-1024, decoder T 16-256.
BATCH_RANGE = (1, 16, 16)
TIME_RANGE = {"encoder": (16, 256, 1024), "decoder": (16, 64, 256)}



# ---------------------------------------------------------------- model signature and shape ranges



def onnx_io(onnx_path: str | os.PathLike) -> dict:
    """{"inputs"|"outputs": {name: {"dtype": numpy name, "shape": [int or symbolic str]}}} of an ONNX file."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception as e:  # protobuf DecodeError and friends
        raise WorkbenchError(f"{onnx_path} is not a readable ONNX model: {e}") from e

    def desc(vi):
        t = vi.type.tensor_type
        return {"dtype": np.dtype(tensor_dtype_to_np_dtype(t.elem_type)).name,
                "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]}

    inits = {i.name for i in graph.initializer}
    return {"inputs": {v.name: desc(v) for v in graph.input if v.name not in inits},
            "outputs": {v.name: desc(v) for v in graph.output}}


def default_shapes(onnx_path: str | os.PathLike, kind: str | None = None,
                   batch: tuple[int, int, int] = BATCH_RANGE, time_range: tuple[int, int, int] | None = None) -> Shapes:
    """Per-input (min, opt, max) dims for WeNet's encoder or decoder: batch and time axes ranged, the rest
    taken from the model (d_model of `encoder_out`) or WeNet's fixed sizes (beam 10, hyps 64, 80 features)."""
    inputs = onnx_io(onnx_path)["inputs"]
    kind = kind or guess_kind(list(inputs))
    if kind not in TIME_RANGE:
        raise WorkbenchError(f"{onnx_path} is not a WeNet encoder or decoder (kind {kind!r}), so it has no default "
                             f"shape ranges: give them explicitly (`wb build --shapes FILE.json`)")
    t = tuple(time_range or TIME_RANGE[kind])
    ranges = {"B": tuple(batch), "T": t}
    if kind == "encoder":
        layout = {"speech": ["B", "T", FEATURE_DIM], "speech_lengths": ["B"]}
    else:
        d = inputs.get("encoder_out", {}).get("shape", [None, None, None])[-1]
        if not isinstance(d, int) or d <= 0:
            raise WorkbenchError(f"{onnx_path}: the decoder input encoder_out has no static last dimension (d_model)")
        layout = {"encoder_out": ["B", "T", d], "encoder_out_lens": ["B"], "hyps_pad_sos_eos": ["B", BEAM, MAX_HYP_PAD],
                  "hyps_lens_sos": ["B", BEAM], "r_hyps_pad_sos_eos": ["B", BEAM, MAX_HYP_PAD], "ctc_score": ["B", BEAM]}
    shapes: Shapes = {}
    for name in inputs:
        if name not in layout:
            raise WorkbenchError(f"{onnx_path}: input {name} is not part of WeNet's {kind} interface; give shapes "
                                 f"explicitly (`wb build --shapes FILE.json`)")
        shapes[name] = {key: [ranges[a][i] if isinstance(a, str) else a for a in layout[name]]
                        for i, key in enumerate(("min", "opt", "max"))}
    return shapes


def shapes_from_feeds(feeds: Sequence[Mapping[str, np.ndarray]]) -> Shapes:
    """Shape ranges that admit every feed given: per input and axis, min and max over the feeds, opt the
    largest (a task's calibration, evaluation and latency feeds together cover what the engine will see)."""
    if not feeds:
        raise WorkbenchError("no feeds to derive engine shape ranges from")
    shapes: Shapes = {}
    for name in feeds[0]:
        dims = [list(np.shape(f[name])) for f in feeds]
        if len({len(d) for d in dims}) != 1:
            raise WorkbenchError(f"input {name}: feeds of different ranks {sorted({len(d) for d in dims})}")
        lo = [min(d[i] for d in dims) for i in range(len(dims[0]))]
        hi = [max(d[i] for d in dims) for i in range(len(dims[0]))]
        shapes[name] = {"min": [max(1, x) for x in lo], "opt": [max(1, x) for x in hi], "max": [max(1, x) for x in hi]}
    return shapes


def check_shapes(shapes: Mapping, io: dict, where: str) -> Shapes:
    """Validate (and normalise to lists) a shape-range dict against the model's inputs."""
    inputs = io["inputs"]
    if set(shapes) != set(inputs):
        raise WorkbenchError(f"shape ranges for {where} must name exactly its inputs {sorted(inputs)}, got {sorted(shapes)}")
    out: Shapes = {}
    for name, rng in shapes.items():
        lists = [rng.get(k) for k in ("min", "opt", "max")] if isinstance(rng, Mapping) else [None]
        if not all(isinstance(v, (list, tuple)) and all(isinstance(x, numbers.Integral) and not isinstance(x, bool)
                                                         for x in v) for v in lists):
            raise WorkbenchError(f"shape range of {name}: expected {{'min','opt','max'}} integer lists, got "
                                 f"{json.dumps(rng, default=str)[:80]}")
        lo, opt, hi = ([int(x) for x in v] for v in lists)
        model_dims = inputs[name]["shape"]
        if not len(lo) == len(opt) == len(hi) == len(model_dims):
            raise WorkbenchError(f"shape range of {name} must have rank {len(model_dims)} (model shape {model_dims})")
        for i, (a, b, c, m) in enumerate(zip(lo, opt, hi, model_dims)):
            if not 1 <= a <= b <= c:
                raise WorkbenchError(f"shape range of {name} axis {i}: need 1 <= min <= opt <= max, got {a}, {b}, {c}")
            if isinstance(m, int) and m > 0 and not a == c == m:
                raise WorkbenchError(f"shape range of {name} axis {i}: the model fixes it to {m}, got {a}..{c}")
        out[name] = {"min": lo, "opt": opt, "max": hi}
    return out


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads not counted), at least 1."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        cores, phys = set(), None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "physical id":
                phys = val.strip()
            elif key.strip() == "core id":
                cores.add((phys, val.strip()))
        if cores:
            return max(1, min(len(cores), usable))
    except OSError:
        pass
    return max(1, usable)


# ---------------------------------------------------------------- artifacts


@dataclass(frozen=True)
class EngineArtifact:
    path: Path
    meta: dict
    reused: bool = False  # True when build() found an up-to-date artifact and did not rebuild

    @property
    def backend(self) -> str:
        return self.meta["backend"]

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def shapes(self) -> Shapes:
        return self.meta["shapes"]

    def file(self, role: str) -> Path:
        """The artifact's file for `role` ("engine", "optimized", "layers", ...), checked to exist."""
        entry = self.meta.get("files", {}).get(role)
        if entry is None:
            raise WorkbenchError(f"engine {self.path} has no {role} file recorded in {META_FILE}")
        path = self.path / entry["name"]
        if not path.is_file():
            raise WorkbenchError(f"engine {self.path} is incomplete: {entry['name']} is missing; rebuild it")
        return path

    def verified_file(self, role: str) -> Path:
        """`file(role)` after checking its sha256 against engine.json (a corrupt or swapped file is refused)."""
        path = self.file(role)
        if sha256_file(path) != self.meta["files"][role]["sha256"]:
            raise WorkbenchError(f"engine file {path} does not match the sha256 in {META_FILE}: it is corrupt or "
                                 "was replaced; rebuild the engine")
        return path

    @classmethod
    def open(cls, path: str | os.PathLike) -> "EngineArtifact":
        path = Path(path)
        if not (path / META_FILE).is_file():
            raise WorkbenchError(f"{path} is not an engine directory: it has no {META_FILE} (build one with `wb build`)")
        meta = read_json(path / META_FILE)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise WorkbenchError(f"{path / META_FILE} is not a workbench engine description")
        if meta.get("format_version") != FORMAT_VERSION:
            raise WorkbenchError(f"{path} has engine format version {meta.get('format_version')}, this workbench "
                                 f"reads {FORMAT_VERSION}: rebuild it")
        if meta.get("backend") not in backends():
            raise WorkbenchError(f"{path} was built for backend {meta.get('backend')!r}, which this workbench does not "
                                 f"know (registered backends: {', '.join(backends())})")
        for key in ("kind", "shapes", "files", "io", "options", "build_key"):
            if key not in meta:
                raise WorkbenchError(f"{path / META_FILE} lacks {key!r}: not a complete engine description")
        io = meta["io"]
        if not (isinstance(io, dict) and isinstance(io.get("inputs"), dict)
                and all(isinstance(v, dict) and isinstance(v.get("shape"), list) for v in io["inputs"].values())):
            raise WorkbenchError(f"{path / META_FILE}: 'io' is not a description of the model's inputs; rebuild it")
        if not isinstance(meta["shapes"], dict) or not isinstance(meta["files"], dict):
            raise WorkbenchError(f"{path / META_FILE}: 'shapes' and 'files' must be objects; rebuild the engine")
        try:  # the ranges every runner and `wb bench` compare feeds with: numbers, ordered, of the model's rank
            check_shapes(meta["shapes"], io, str(path))
        except WorkbenchError as exc:
            raise WorkbenchError(f"{path / META_FILE}: {exc}; rebuild the engine") from None
        return cls(path, meta)


def resolve_backend(backend: str) -> str:
    """"auto" -> "tensorrt" when TensorRT and a GPU are usable, else "onnxruntime"; any other name must be
    registered (`engines.registry`), else one WorkbenchError listing the registered backends."""
    if backend == AUTO:
        return "tensorrt" if "tensorrt" in backends() and get_backend("tensorrt").available()[0] else "onnxruntime"
    get_backend(backend)
    return backend


def _versions(backend: str) -> dict:
    return library_versions() | get_backend(backend).versions()


def build(onnx_path: str | os.PathLike, shapes: Mapping | None, out_dir: str | os.PathLike, backend: str = "auto",
          kind: str | None = None, **options) -> EngineArtifact:
    """Build (or reuse) the engine artifact `out_dir` for `onnx_path`.

    `shapes`: {input: {"min","opt","max"}} or None for `default_shapes`. `options` are backend build options
    (onnxruntime: threads, providers; tensorrt: opt_level, workspace_mb, timing_cache; tensorrt-rtx: opt_level,
    workspace_mb, compute_capabilities). The artifact is reused
    when its engine.json has the same build key, i.e. same source sha256, backend, backend version, kind,
    shapes and options; otherwise it is rebuilt into a temporary directory that replaces `out_dir` at the end.
    """
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise WorkbenchError(f"ONNX model {onnx_path} does not exist")
    backend = resolve_backend(backend)
    mod = get_backend(backend)
    mod.check_usable()
    io = onnx_io(onnx_path)
    kind = kind or guess_kind(list(io["inputs"]))
    shapes = check_shapes(default_shapes(onnx_path, kind) if shapes is None else shapes, io, str(onnx_path))
    options = mod.normalize_options(options)
    versions = _versions(backend)
    key_fields = {"format_version": FORMAT_VERSION, "backend": backend, "kind": kind,
                  "source_sha256": sha256_file(onnx_path), "shapes": shapes,
                  "options": {k: v for k, v in options.items() if k not in mod.UNKEYED_OPTIONS},
                  "backend_version": versions[backend]}
    build_key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()
    try:
        old = EngineArtifact.open(out_dir)
        if old.meta["build_key"] == build_key and all(old.file(r) for r in old.meta["files"]):
            return EngineArtifact(out_dir, old.meta, reused=True)
    except WorkbenchError:
        pass  # absent, foreign or incomplete: build afresh
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / META_FILE).is_file())):
        raise WorkbenchError(f"{out_dir} exists and is not an engine directory; refusing to replace it")
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        files, extra = mod.build_files(onnx_path, tmp, kind, shapes, options)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "backend": backend, "kind": kind,
                "source": {"path": str(onnx_path.resolve()), "sha256": key_fields["source_sha256"]},
                "io": io, "shapes": shapes, "options": options, "versions": versions, "build_key": build_key,
                "files": {role: {"name": name, "sha256": sha256_file(tmp / name)} for role, name in files.items()},
                "build_s": round(time.perf_counter() - t0, 3),
                "host": host_info(),  # where it was built (and, for ONNX Runtime, where it runs): CPU and int8 ISA
                **extra}
        write_json(tmp / META_FILE, meta)
    return EngineArtifact(out_dir, meta)


def load(artifact: EngineArtifact | str | os.PathLike, **options):
    """A runner (`input_names`, `output_names`, `run(feeds) -> dict`) for an engine artifact or its directory.
    `options` override load-time options (onnxruntime: threads, providers)."""
    if not isinstance(artifact, EngineArtifact):
        artifact = EngineArtifact.open(artifact)
    return get_backend(artifact.backend).load(artifact, **options)


# ---------------------------------------------------------------- timing


def summarize(latencies_s: Sequence[float], bs: int, sl: int, warmup: int, timer: str = "perf_counter") -> dict:
    """One JSON row: latency statistics in ms and throughput = bs*sl / median latency (the hackathon's word/s).
    `latencies_ms` keeps the run order: in an interleaved benchmark run i of every runner was taken together,
    which is what paired ratios (search.selection) compare."""
    runs = [1e3 * x for x in latencies_s]
    ms = sorted(runs)
    if not ms:
        raise WorkbenchError("no timed iterations: iters must be >= 1")
    median = statistics.median(ms)
    return {"bs": bs, "sl": sl, "warmup": warmup, "iters": len(ms), "timer": timer,
            "median_ms": median, "p90_ms": float(np.percentile(ms, 90)), "mean_ms": statistics.fmean(ms),
            "min_ms": ms[0], "max_ms": ms[-1], "throughput": bs * sl / (median / 1e3),
            "latencies_ms": [round(x, 4) for x in runs]}


def time_runs(runner, feeds: Mapping[str, np.ndarray], warmup: int, iters: int) -> tuple[list[float], str]:
    """Seconds per run: the runner's own device timer (`time_runs`) if it has one, else wall clock."""
    if hasattr(runner, "time_runs"):
        return runner.time_runs(feeds, warmup, iters)
    for _ in range(warmup):
        runner.run(feeds)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        runner.run(feeds)
        out.append(time.perf_counter() - t0)
    return out, "perf_counter"


def bench(runner, cases: Mapping[tuple[int, int], Mapping[str, np.ndarray]], warmup: int = WARMUP,
          iters: int = ITERS) -> list[dict]:
    """Latency statistics per (bs, sl) case, as a list of JSON rows (see `summarize`)."""
    if warmup < 0 or iters < 1:
        raise WorkbenchError(f"need warmup >= 0 and iters >= 1, got {warmup} and {iters}")
    rows = []
    for (bs, sl), feeds in cases.items():
        lat, timer = time_runs(runner, feeds, warmup, iters)
        rows.append(summarize(lat, bs, sl, warmup, timer))
    return rows


def bench_interleaved(runners: Mapping[str, Any], cases: Mapping[tuple[int, int], Mapping[str, np.ndarray]],
                      warmup: int = WARMUP, iters: int = ITERS) -> dict[str, list[dict]]:
    """`bench` of several runners of one interface on the same cases, run by run interleaved (warm-up A B C
    A B C ..., then timed A B C ...) so that machine drift and noise hit all of them alike: the way to
    measure their ratios on a noisy machine.  Returns {label: rows as `bench`}."""
    if warmup < 0 or iters < 1:
        raise WorkbenchError(f"need warmup >= 0 and iters >= 1, got {warmup} and {iters}")
    out: dict[str, list[dict]] = {label: [] for label in runners}
    for (bs, sl), feeds in cases.items():
        for _ in range(warmup):
            for r in runners.values():
                r.run(feeds)
        times: dict[str, list[float]] = {label: [] for label in runners}
        timers: dict[str, str] = {}  # per runner: TensorRT runners time with CUDA events, others wall clock
        for _ in range(iters):
            for label, r in runners.items():
                t, timers[label] = time_runs(r, feeds, 0, 1)
                times[label].extend(t)
        for label, t in times.items():
            out[label].append(summarize(t, bs, sl, warmup, timers[label]))
    return out


def format_bench_table(rows: Sequence[dict], title: str = "") -> str:
    rule = "----+-----+------------+------------+------------+----------------"
    lines = ([title] if title else []) + [rule, "  bs|   sl| median (ms)|    p90 (ms)|   mean (ms)| throughput (/s)", rule]
    for r in rows:
        lines.append(f"{r['bs']:>4}|{r['sl']:>5}|{r['median_ms']:>12.3f}|{r['p90_ms']:>12.3f}|{r['mean_ms']:>12.3f}|"
                     f"{r['throughput']:>16.1f}")
    lines.append(rule)
    return "\n".join(lines)
