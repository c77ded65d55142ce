"""The whole experiment: FP32 export -> calibration -> baselines -> sensitivity -> precision search -> final
engines -> run.json (+ report). One function per stage; each stage's expensive results are cached in the run
directory, so a killed run resumes where it stopped when started again on the same directory."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import resource
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import engines
from calibration_data.corpus import ensure_corpus, load_split
from core.host import describe, host_info
from calibration_data.text import DEFAULT_VOCAB, load_units, normalize
from engines.cases import bench_cases
from evaluation.asr import decoder_calibration_feeds, evaluate
from evaluation.bootstrap import paired_delta_ci
from evaluation.metrics import edit_distance
from evaluation.hackathon import make_cases, run_check
from graph.analysis import analyze, prepare_model
from graph.calib import load_table
from graph.placement import quantize
from graph.plan import create_plan, edit_plan, save_plan
from tasks.fidelity import noise_to_signal
from core.errors import WorkbenchError
from core.fsutil import RunDirLock, sha256_file, write_json

from quant.calibrate import calibrate
from quant.collect import encoder_feed
from search.evalcache import EvalCache
from quant.methods import method_key
from pipeline.config import check_resume, criterion_threshold, resolve_backend_and_recipe
from pipeline.runners import RunnerCache
from pipeline.search_stage import probe_groups, search_from
from pipeline.selection import select
from search.algorithm import node_key, plan_counts, flat_plan_hash, split_plan
from quant.table import CalibrationTable

KINDS = ("encoder", "decoder")
# Engine shape ranges (min, opt, max) of the time axis: wide enough for every test utterance and for the
# hackathon decoder case sl=256, whose encoder input has 4*256+3 frames.
PIPELINE_TIME_RANGES = {"encoder": (7, 256, 2048), "decoder": (1, 64, 512)}
METRICS = ("cer_rescore", "cer_greedy", "cer_prefix", "wer_rescore")




class Workspace:
    """Quantized models and engines of the run, cached on disk by (kind, table, sub-plan hash)."""

    def __init__(self, run_dir: Path, cfg: dict, fp32: dict[str, Path]):
        self.dir, self.cfg, self.fp32 = run_dir, cfg, fp32
        self.analysis = {k: analyze(str(p)) for k, p in fp32.items()}
        self.tables: dict[str, dict[str, Path]] = {}  # method -> kind -> table path
        self.sources: dict[str, dict[str, Path]] = {}  # method -> kind -> FP32 model it places (default fp32)
        self._runners = RunnerCache()
        self._plans: dict[tuple[str, str], dict] = {}
        self._loaded: dict[Path, tuple] = {}  # FP32 path -> (ModelProto, Analysis): read once, placed many times
        self._tables: dict[Path, object] = {}  # table path -> graph.calib.CalibTable

    def add_source(self, method: str, models: dict[str, Path]) -> None:
        """Models of `method` are placed on these FP32 models (QAT: the fine-tuned weights), which must have
        the structure of the run's FP32 models so that one plan fits both."""
        for kind, path in models.items():
            if analyze(str(path)).fingerprint != self.analysis[kind].fingerprint:
                raise WorkbenchError(f"{path}: not the architecture of the run's FP32 {kind} (plans would not fit)")
        self.sources[method] = models

    def source(self, method: str) -> dict[str, Path]:
        return self.sources.get(method, self.fp32)

    def base_plan(self, kind: str, default: str) -> dict:
        """Every node at `default` (callers derive new plans with edit_plan; this one is never mutated)."""
        if (kind, default) not in self._plans:
            self._plans[kind, default] = create_plan(self.analysis[kind], default=default)
        return self._plans[kind, default]

    def int8_nodes(self, kind: str) -> list[str]:
        return [n for n, p in self.base_plan(kind, "int8")["nodes"].items() if p == "int8"]

    def model(self, kind: str, nodes: dict[str, str], method: str, default: str = "fp32",
              source: str | None = None) -> Path:
        """The ONNX model of `kind` with `nodes` ({id: precision}) over a `default` plan, placed with the
        ranges of `method` on the FP32 models of method `source` (default: `method`'s own, see add_source;
        "fp32": the run's FP32 models)."""
        base = self.source(source or method)[kind]
        if all(p == "fp32" for p in nodes.values()) and default == "fp32":
            return base
        plan = edit_plan(self.base_plan(kind, default), set_nodes=nodes)
        recipe = self.cfg["quantize"]["recipe"]
        if any(p == "fp16" for p in plan["nodes"].values()):
            recipe = "tensorrt"  # the ONNX Runtime recipe has no FP16; the TensorRT one writes FP16-typed graphs
        ort_mode = self.cfg["quantize"]["ort_mode"] if recipe == "onnxruntime" else None  # part of the graph
        tag = hashlib.sha256(json.dumps([plan["hash"], method, recipe, base.parent.name] + ([ort_mode] if ort_mode else []))
                             .encode()).hexdigest()[:16]
        out = self.dir / "models" / kind / f"{tag}.onnx"
        if not out.is_file():
            if base not in self._loaded:
                m = prepare_model(base)
                self._loaded[base] = (m, analyze(m))
            table = self.tables[method][kind]
            if table not in self._tables:
                self._tables[table] = load_table(table)
            m, analysis = self._loaded[base]
            quantize(m, self._tables[table], plan=plan, recipe=recipe, out=out, analysis=analysis,
                     ort_mode=ort_mode or "auto")
            save_plan(plan, out.with_suffix(".plan.json"))
        return out

    def runner(self, model: Path):
        """The engine runner of `model`, kept while it is among the most recently used (pipeline.runners)."""
        def make():
            kind = "decoder" if model.parent.name == "decoder" or model.stem == "decoder" else "encoder"
            shapes = engines.default_shapes(model, kind, time_range=PIPELINE_TIME_RANGES[kind])
            art = engines.build(model, shapes, self.dir / "engines" / model.parent.name / model.stem,
                                backend=self.cfg["backend"]["name"], threads=self.cfg["backend"]["threads"])
            return engines.load(art)

        pinned = {p for models in (self.fp32, *self.sources.values()) for p in models.values()}
        return self._runners.get(model, make, pinned)


# What a baseline record (accuracy, latency, hackathon check) depends on besides the models' content: these
# config sections (resolved: backend "auto" is already the backend used) and, of [latency], the keys that time
# baselines (search_* and tie_tolerance only rank search candidates). [calibration] only for INT8 records.
BASELINE_SECTIONS = ("data", "backend", "quantize")
BASELINE_LATENCY_KEYS = ("batch_sizes", "seq_lens", "warmup", "iters", "models")
_SHA_MEMO: dict[tuple, str] = {}


def _content_sha(path: Path) -> str:
    """sha256 of a model file, memoised by (path, size, mtime) within the process."""
    st = Path(path).stat()
    memo = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _SHA_MEMO:
        _SHA_MEMO[memo] = sha256_file(path)
    return _SHA_MEMO[memo]


def baseline_key(cfg: dict, models: dict[str, Path], reference: dict[str, Path], data: dict,
                 calibrator: str | None = None) -> str:
    """The cache key of a baseline: the content (not the path) of the models and of the FP32 reference the
    hackathon check compares with, the config that changes the result, and `data` (e.g. the vocabulary and the
    evaluation texts). A copied run directory finds its records; a resume with another config does not."""
    blob = {"models": {k: _content_sha(p) for k, p in sorted(models.items())},
            "reference": {k: _content_sha(p) for k, p in sorted(reference.items())},
            "config": {s: cfg[s] for s in BASELINE_SECTIONS}
            | {"latency": {k: cfg["latency"][k] for k in BASELINE_LATENCY_KEYS}}
            | ({"calibration": cfg["calibration"]} if calibrator else {}),
            "data": data}
    return "baseline:" + hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


class Experiment:
    def __init__(self, cfg: dict, run_dir: Path, cache_dir: Path | None, progress: bool = True):
        self.cfg, self.dir, self.progress = cfg, Path(run_dir), progress
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = RunDirLock(self.dir).acquire()  # one run per directory (re-entrant: wb search holds it too)
        check_resume(self.dir, cfg)  # a resume keeps the config its cached results were computed with
        self.cache = EvalCache(self.dir / "cache.jsonl")
        self.vocab = load_units(cfg["model"]["vocab"]) if cfg["model"]["vocab"] else DEFAULT_VOCAB  # before any work
        d = cfg["data"]
        # only what the run reads (calib_utts, and 64 for the latency, hackathon and ranking pool; eval_utts);
        # a larger split already on disk serves (its first utterances are these), so quick and full runs share one
        sizes: dict[str, int] = {}
        for split, n in ((d["calib_split"], max(64, d["calib_utts"])), (d["eval_split"], d["eval_utts"])):
            sizes[split] = max(n, sizes.get(split, 0))  # one split may serve both
        corpus = ensure_corpus(cache_dir, sizes, progress=progress, at_least=True)
        self.calib = load_split(corpus, d["calib_split"])
        ev = load_split(corpus, d["eval_split"])
        n = min(d["eval_utts"], len(ev))
        self.eval_feats = [ev.features(i) for i in range(n)]
        self.eval_texts = ev.texts[:n]

    # --- stage 1: model -------------------------------------------------------------------------------------
    def export_fp32(self) -> dict[str, Path]:
        from models.export import export_onnx
        from models.weights import default_model, load_weights

        out = self.dir / "models" / "fp32"
        if not (out / "encoder.onnx").is_file() or not (out / "decoder.onnx").is_file():
            w = self.cfg["model"]["weights"]
            model = load_weights(w) if w else default_model("small")[0]
            export_onnx(model, out, opset=self.cfg["model"]["opset"])
        return {"encoder": out / "encoder.onnx", "decoder": out / "decoder.onnx"}

    def export_qat(self, ws: Workspace) -> None:
        """Method "qat": the fine-tuned weights of qat.dir exported as FP32 (placement puts the QAT ranges on
        them) and its tables copied into the run's calibration/ directory."""
        import shutil

        from models.export import export_onnx
        from models.weights import load_weights

        from quant.qat_run import WEIGHTS, check_qat_dir, table_path

        qdir = check_qat_dir(self.cfg["qat"]["dir"])
        out = self.dir / "models" / "qat_fp32"
        if not (out / "encoder.onnx").is_file() or not (out / "decoder.onnx").is_file():
            export_onnx(load_weights(qdir / WEIGHTS), out, opset=self.cfg["model"]["opset"])
        ws.add_source("qat", {k: out / f"{k}.onnx" for k in KINDS})
        for kind in KINDS:
            p = self.dir / "calibration" / f"{kind}.qat.json"
            if not p.is_file():
                p.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(table_path(qdir, kind), p)
            ws.tables.setdefault("qat", {})[kind] = p

    # --- stage 2: calibration -------------------------------------------------------------------------------
    def decoder_calib_feeds(self, enc_runner, dec_runner, feats: list[np.ndarray], batch: int) -> list[dict]:
        """Decoder inputs as the pipeline produces them: FP32 encoder outputs + CTC prefix-beam hypotheses."""
        return decoder_calibration_feeds(enc_runner, dec_runner.input_names, feats, batch)

    def calibrate_all(self, ws: Workspace) -> None:
        c, d = self.cfg["calibration"], self.cfg["data"]
        feats = [self.calib.features(i) for i in range(min(d["calib_utts"], len(self.calib)))]
        bs = c["batch_size"]
        enc_feeds = [encoder_feed(feats[s:s + bs]) for s in range(0, len(feats), bs)]
        key_of = lambda m: method_key(m, c["percentile"])  # noqa: E731
        self.methods = [key_of(m) for m in c["methods"]]
        methods = [m for m in c["methods"] if m != "qat"]  # "qat" ranges come with qat.dir (export_qat)
        keys = [key_of(m) for m in methods]
        if not methods:
            return
        for kind in KINDS:
            path = self.dir / "calibration" / f"{kind}.json"
            if not path.is_file():
                if kind == "decoder":
                    dec_feeds = self.decoder_calib_feeds(ws.runner(ws.fp32["encoder"]), ws.runner(ws.fp32["decoder"]),
                                                         feats, bs)
                # the default tensor set (graph.placement.calibration_tensors) serves both recipes and any plan
                table = calibrate(ws.fp32[kind], enc_feeds if kind == "encoder" else dec_feeds,
                                  methods=",".join(methods), percentiles=(c["percentile"],),
                                  default_method=keys[0], progress=self.progress,
                                  data_info={"split": d["calib_split"], "n_utts": len(feats)})
                table.save(path)
            table = CalibrationTable.load(path)
            for key in keys:
                p = self.dir / "calibration" / f"{kind}.{key}.json"
                if not p.is_file():
                    table.with_method(key).save(p)
                ws.tables.setdefault(key, {})[kind] = p

    # --- stage 3: evaluation primitives -----------------------------------------------------------------------
    def accuracy(self, ws: Workspace, models: dict[str, Path], items: bool = False) -> dict:
        """The METRICS; `items`: also the per-utterance rescoring edits and reference lengths under "items"
        (what a paired bootstrap interval of the CER change resamples: evaluation.bootstrap)."""
        res = evaluate(ws.runner(models["encoder"]), ws.runner(models["decoder"]), self.eval_feats,
                       self.eval_texts, self.vocab, progress=False)
        out = {k: res[k] for k in METRICS}
        if items:
            refs = [normalize(t) for t in self.eval_texts]
            out["items"] = {"edits": [edit_distance(r, normalize(u["rescored"])) for r, u in zip(refs, res["utterances"])],
                            "ref_len": [len(r) for r in refs]}
        return out

    def latency(self, ws: Workspace, models: dict[str, Path], search: bool = False) -> dict:
        """Median latency per grid case and their sum (the objective); `search` uses the search's fewer runs."""
        lat = self.cfg["latency"]
        warmup, iters = (lat["search_warmup"], lat["search_iters"]) if search else (lat["warmup"], lat["iters"])
        rows, total = [], 0.0
        for kind in lat["models"]:
            runner = ws.runner(models[kind])
            for r in engines.bench(runner, self.cases[kind], warmup=warmup, iters=iters):
                rows.append({"model": kind, **{k: r[k] for k in ("bs", "sl", "median_ms", "p90_ms", "throughput")}})
                total += r["median_ms"]
        return {"objective_ms": total, "cases": rows, "warmup": warmup, "iters": iters}

    def hackathon(self, ws: Workspace, models: dict[str, Path]) -> dict:
        ref = {k: ws.runner(ws.fp32[k]) for k in KINDS}
        rows = run_check(ref["encoder"], ref["decoder"], ws.runner(models["encoder"]), ws.runner(models["decoder"]),
                         self.hack_cases)
        return {"passed": sum(r["passed"] for r in rows), "total": len(rows), "rows": rows}

    def _baseline_key(self, ws: Workspace, models: dict[str, Path], calibrator: str | None) -> str:
        data = {"vocab": list(self.vocab.tokens), "eval_texts": hashlib.sha256(
            json.dumps(list(self.eval_texts)).encode()).hexdigest()}
        return baseline_key(self.cfg, models, ws.fp32, data, calibrator)

    def full_record(self, ws: Workspace, label: str, models: dict[str, Path], **extra) -> dict:
        key = self._baseline_key(ws, models, extra.get("calibrator"))
        part = self.cache.entries.get(key + ":accuracy")  # the workers' part of it (_prefetch_baselines)
        def compute():
            if part:
                acc, hk = dict(part["accuracy"]), part["hackathon"]
                items = part.get("items")
            else:
                acc = self.accuracy(ws, models, items=True)
                items, hk = acc.pop("items"), {k: v for k, v in self.hackathon(ws, models).items() if k != "rows"}
            return {"accuracy": acc, "latency": self.latency(ws, models), "hackathon": hk, "items": items}

        return {"label": label, **extra, **self.cache.get_or_compute(key, compute)}

    # --- fan-out (pipeline.fanout): the same work on an executor's workers ------------------------------------
    @property
    def fanout(self):
        if getattr(self, "_fanout", None) is None:
            from pipeline.fanout import Fanout

            self._fanout = Fanout(self.cfg, self.dir, self.progress)
        return self._fanout

    def _context(self, ws: Workspace, what: str, **data) -> dict:
        """Plain data a worker rebuilds this run's Workspace from, plus `data`; keyed for the object store."""
        from pipeline.fanout import context_key

        s = lambda d: {m: {k: str(p) for k, p in t.items()} for m, t in d.items()}  # noqa: E731
        base = {"run_dir": str(self.dir), "cfg": self.cfg, "fp32": {k: str(p) for k, p in ws.fp32.items()},
                "tables": s(ws.tables), "sources": s(ws.sources)}
        base["ws_key"] = context_key(base)
        return {**base, **data, "key": context_key(what, base["ws_key"])}

    def _accuracy_context(self, ws: Workspace) -> dict:
        return self._context(ws, "accuracy", eval_feats=self.eval_feats, eval_texts=list(self.eval_texts),
                             vocab=self.vocab, hack_cases=self.hack_cases)

    def _prefetch_baselines(self, ws: Workspace, specs: list[tuple[dict[str, Path], str | None]]) -> None:
        """The baselines' accuracy and hackathon check on the workers, cached as each arrives; full_record then
        times each model in the driver, one at a time, after all of them are done (timing stays alone)."""
        from pipeline.fanout import wenet_accuracy

        keys = [self._baseline_key(ws, models, cal) for models, cal in specs]
        todo = [(k, m) for k, (m, _) in zip(keys, specs) if k not in self.cache and f"{k}:accuracy" not in self.cache]

        def got(i, part):
            if "error" not in part:
                self.cache.get_or_compute(f"{todo[i][0]}:accuracy", lambda: part)

        self.fanout.map(wenet_accuracy, self._accuracy_context(ws), [
            {"models": {k: str(p) for k, p in m.items()}, "hackathon": "summary", "tolerate": True} for _, m in todo],
            got, desc="baselines (accuracy)")

    # --- stage 4: sensitivity ---------------------------------------------------------------------------------
    def sensitivity(self, ws: Workspace, method: str) -> dict[str, float]:
        """Noise-to-signal ratio of each model's main output with only that node in INT8, on the calibration
        utterances where FP32 and all-INT8 disagree most (a cheap ranking; the full metric decides)."""
        cached = self.cache.entries.get(f"sensitivity:{method}")
        if cached is not None:
            return cached
        import onnxruntime as ort

        def session(path):
            so = ort.SessionOptions()
            so.intra_op_num_threads = self.cfg["backend"]["threads"]
            return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

        d, pool = self.cfg["data"], self.pool
        src = ws.source(method)  # single-node INT8 against the FP32 model of the same weights
        fp32_enc, int8_enc = session(src["encoder"]), session(
            ws.model("encoder", {n: "int8" for n in ws.int8_nodes("encoder")}, method))
        err = []
        for f in pool:
            feeds = {"speech": f[None], "speech_lengths": np.array([len(f)], np.int32)}
            a, b = fp32_enc.run(["encoder_out"], feeds)[0], int8_enc.run(["encoder_out"], feeds)[0]
            err.append(noise_to_signal(b, a))
        rank = [pool[i] for i in np.argsort(err)[::-1][: d["ranking_utts"]]]
        enc_feeds = encoder_feed(rank)
        dec_feeds = self.decoder_calib_feeds(ws.runner(src["encoder"]), ws.runner(src["decoder"]), rank, len(rank))[0]
        feeds, out = {"encoder": enc_feeds, "decoder": dec_feeds}, {"encoder": "encoder_out", "decoder": "decoder_out"}
        fp32 = {"encoder": fp32_enc, "decoder": session(src["decoder"])}
        refs = {k: fp32[k].run([out[k]], feeds[k])[0] for k in KINDS}
        scores = {}
        todo = [(k, n) for k in KINDS for n in ws.int8_nodes(k)]
        if self.fanout.distributed:  # one probe per node on the workers, each cached as it arrives
            from pipeline.fanout import wenet_probe

            ctx = self._context(ws, f"sensitivity:{method}", outputs=out, feeds=feeds, refs=refs)
            scores = self.fanout.probes(wenet_probe, ctx, todo, method, self.cache, f"sensitivity:{method}:", node_key)
        for kind, node in tqdm(todo if not scores else [], desc="sensitivity", disable=not self.progress):
            got = session(ws.model(kind, {node: "int8"}, method)).run([out[kind]], feeds[kind])[0]
            scores[node_key(kind, node)] = noise_to_signal(got, refs[kind])
        return self.cache.get_or_compute(f"sensitivity:{method}", lambda: scores)

    # --- the whole run ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.time()
        cfg = self.cfg
        fp32 = self.export_fp32()
        ws = Workspace(self.dir, cfg, fp32)
        self.calibrate_all(ws)
        if "qat" in self.methods:
            self.export_qat(ws)
        lat = cfg["latency"]
        # 64 calibration utterances: real features for the latency cases, hackathon cases and sensitivity ranking
        self.pool = pool = [self.calib.features(i) for i in range(min(64, len(self.calib)))]
        self.cases = {k: bench_cases(engines.base.onnx_io(fp32[k]), k, lat["batch_sizes"], lat["seq_lens"],
                                     feats_pool=pool) for k in KINDS}
        self.hack_cases = make_cases(ws.runner(fp32["encoder"]), pool, batch_sizes=lat["batch_sizes"],
                                     seq_lens=lat["seq_lens"])

        all_of = lambda kind, prec: {n: prec for n in ws.int8_nodes(kind)}  # noqa: E731
        if self.fanout.distributed:  # accuracies on the workers first; the loop below times them here, alone
            specs = [(fp32, None)]
            try:
                specs.append(({k: ws.model(k, all_of(k, "fp16"), self.methods[0], default="fp16", source="fp32")
                               for k in KINDS}, None))
            except Exception:  # noqa: BLE001 - the loop below records it as the serial run does
                pass
            specs += [({k: ws.model(k, all_of(k, "int8"), m) for k in KINDS}, m) for m in self.methods]
            self._prefetch_baselines(ws, specs)
        steps = tqdm(total=2 + len(self.methods), desc="baselines", disable=not self.progress)
        baselines = [self.full_record(ws, "FP32", fp32, precision="fp32", calibrator=None)]
        baseline_models = {"FP32": (fp32, {n: "fp32" for k in KINDS for n in self._keys(ws, k)})}
        steps.update(1)
        ref = baselines[0]["accuracy"][cfg["criterion"]["metric"]]
        crit = criterion_threshold(cfg, ref)
        passes = self._passes(crit)
        try:
            fp16 = {k: ws.model(k, all_of(k, "fp16"), self.methods[0], default="fp16", source="fp32") for k in KINDS}
            baselines.append(self.full_record(ws, "FP16", fp16, precision="fp16", calibrator=None))
            baseline_models["FP16"] = (fp16, {n: "fp16" for k in KINDS for n in self._keys(ws, k)})
        except Exception as exc:  # noqa: BLE001 - an FP16 graph the backend cannot run is a result, not a crash
            baselines.append({"label": "FP16", "precision": "fp16", "calibrator": None, "error": str(exc)[:300]})
        steps.update(1)
        for m in self.methods:
            models = {k: ws.model(k, all_of(k, "int8"), m) for k in KINDS}
            baselines.append(self.full_record(ws, f"INT8 all ({m})", models, precision="int8", calibrator=m))
            baseline_models[f"INT8 all ({m})"] = (models, {n: "int8" for k in KINDS for n in self._keys(ws, k)})
            steps.update(1)
        steps.close()
        for b in baselines:
            if "accuracy" in b:
                b["passed"] = passes(b["accuracy"]) if crit["kind"] != "hackathon" else \
                    b["hackathon"]["passed"] == b["hackathon"]["total"]
        self._intervals(baselines)
        int8 = [b for b in baselines if b.get("precision") == "int8"]
        best_of = lambda bs: min(bs, key=lambda b: (b["accuracy"][crit["metric"]], b["latency"]["objective_ms"]))  # noqa: E731
        # One search from the most accurate PTQ calibrator, and one from QAT scales when the run has them.
        ptq = [b for b in int8 if b["calibrator"] != "qat"]
        starts = ([best_of(ptq)] if ptq else []) + [b for b in int8 if b["calibrator"] == "qat"]
        searches = [self.search_from(ws, b, passes, crit) for b in starts]
        selected, timing = self._select(ws, searches, baselines, baseline_models)
        first = searches[0]
        host = host_info()
        run = {"format": "wb-run/1", "id": self.dir.name, "created": dt.datetime.now(dt.timezone.utc).isoformat(),
               "model": "wenet-small" if not cfg["model"]["weights"] else Path(cfg["model"]["weights"]).stem,
               "backend": cfg["backend"]["name"], "recipe": cfg["quantize"]["recipe"],
               "host": host, "device": self._device(host),
               "status": "passed" if selected else first["status"], "criterion": crit, "config": cfg,
               "baselines": baselines, "selected": selected, "side_by_side": timing,
               "searches": [{k: v for k, v in x.items() if k not in ("models", "flat", "trace", "sensitivity",
                                                                     "candidates")}
                            for x in searches],
               "sensitivity": first["sensitivity"], "trace": first["trace"],
               "n_full_evals": sum(x["n_full_evals"] for x in searches),
               "n_computed_evals": sum(x["n_computed_evals"] for x in searches),
               "n_cache_hits": sum(x["n_cache_hits"] for x in searches), "wall_s": round(time.time() - t0, 1),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        if len(searches) > 1:
            run["traces"] = {x["calibrator"]: x["trace"] for x in searches}
        write_json(self.dir / "run.json", run)
        # The ONNX models behind each baseline and the selection (run-relative), for tools that rebuild them
        # with another builder (`wb rtx-check`).
        deliverables = {label: models for label, (models, _) in baseline_models.items()}
        if selected:
            deliverables["selected"] = {k: self.dir / "final" / f"{k}.onnx" for k in KINDS}
        write_json(self.dir / "models.json", {label: {k: Path(p).resolve().relative_to(self.dir.resolve()).as_posix()
                                                      for k, p in models.items()} for label, models in deliverables.items()})
        return run

    @staticmethod
    def _intervals(baselines: list[dict]) -> None:
        """Each baseline's rescoring-CER change against FP32 with its paired bootstrap 95 % interval over the
        test utterances ("ci"; evaluation.bootstrap, seeded), for the report. The criterion still compares point
        estimates. The per-utterance counts stay in the cache, out of run.json."""
        ref = (baselines[0].pop("items", None) or {}) if baselines else {}
        for b in baselines[1:]:
            items = b.pop("items", None)
            if items and ref and len(items["edits"]) == len(ref["edits"]):
                b["ci"] = {"metric": "cer_rescore", **paired_delta_ci(items["edits"], ref["edits"], ref["ref_len"])}

    def _device(self, host: dict) -> str:
        """One line naming what measured the run's numbers (the int8 ISA decides ONNX Runtime's int8 accuracy)."""
        cfg = self.cfg
        if cfg["backend"]["name"] != "onnxruntime":
            return f"TensorRT ({cfg['backend']['name']}) on the GPU; host CPU {describe(host)}"
        mode = f", int8 mode {cfg['quantize']['ort_mode']}" if cfg["quantize"]["recipe"] == "onnxruntime" else ""
        return f"CPU: {describe(host)}, {cfg['backend']['threads']} threads (ONNX Runtime{mode}); TensorRT not measured"

    def search_from(self, ws: Workspace, start: dict, passes, crit: dict) -> dict:
        """The precision search starting from the all-INT8 baseline `start` (its calibrator's ranges and
        FP32 weights)."""
        method = start["calibrator"]

        def models_of(flat):
            return {k: ws.model(k, split_plan(flat, k), method) for k in KINDS}

        def accuracy_of(flat):
            models = models_of(flat)
            acc = self.accuracy(ws, models)
            if crit["kind"] == "hackathon":
                h = self.hackathon(ws, models)
                acc["hackathon_passed"], acc["hackathon_total"] = h["passed"], h["total"]
            return acc

        return search_from(start, nodes=[n for k in KINDS for n in self._keys(ws, k)],
                           sensitivity=self.sensitivity(ws, method),
                           groups=probe_groups({k: ws.analysis[k] for k in KINDS}, node_key), models_of=models_of,
                           accuracy=accuracy_of, latency=lambda flat: self.latency(ws, models_of(flat), search=True),
                           passes=passes, cfg=self.cfg, cache_path=self.dir / f"search_cache.{method}.jsonl",
                           progress=self.progress, fanout=self._search_fanout(ws, method, crit),
                           side_by_side=lambda options: self.side_by_side(ws, options, search=True))

    def _search_fanout(self, ws: Workspace, method: str, crit: dict) -> dict:
        from pipeline.fanout import wenet_accuracy, wenet_prepare

        if not self.fanout.distributed:
            return {}
        return self.fanout.search(wenet_accuracy, wenet_prepare, self._accuracy_context(ws), method,
                                  {"hackathon": crit["kind"] == "hackathon"})

    @staticmethod
    def _keys(ws: Workspace, kind: str) -> list[str]:
        return [node_key(kind, n) for n in ws.int8_nodes(kind)]

    def side_by_side(self, ws: Workspace, options: dict[str, dict[str, Path]], search: bool = False) -> dict[str, dict]:
        """Latency of each option ({label: models}) with all options interleaved run by run on each case
        (engines.bench_interleaved): their ratios measured side by side, not minutes apart. `search`: the
        search's shorter protocol (latency probes)."""
        lat = self.cfg["latency"]
        warmup, iters = (lat["search_warmup"], lat["search_iters"]) if search else (lat["warmup"], lat["iters"])
        out = {label: {"objective_ms": 0.0, "cases": [], "warmup": warmup, "iters": iters,
                       "interleaved": True} for label in options}
        todo = [(kind, case) for kind in lat["models"] for case in self.cases[kind]]
        for kind, case in tqdm(todo, desc="side-by-side timing", disable=not self.progress):
            runners = {label: ws.runner(models[kind]) for label, models in options.items()}
            one = {case: self.cases[kind][case]}
            for label, rows in engines.bench_interleaved(runners, one, warmup, iters).items():
                r = rows[0]
                out[label]["cases"].append({"model": kind, **{k: r[k] for k in ("bs", "sl", "median_ms", "p90_ms",
                                                                                "latencies_ms",
                                                                                "throughput")}})
                out[label]["objective_ms"] += r["median_ms"]
        return out

    def _select(self, ws, searches, baselines, baseline_models) -> tuple[dict | None, dict | None]:
        """The fastest passing option (pipeline.selection): the passing baselines and every passing plan the
        searches evaluated, decided on paired side-by-side timings with FP32. Returns (selected record, timing)."""
        metric = self.cfg["criterion"]["metric"]
        # Baselines first: a search that ends on a baseline's plan with its accuracy is reported as that baseline.
        options = [(b["label"], *baseline_models[b["label"]], b, b["calibrator"]) for b in baselines
                   if b.get("passed") and b["label"] in baseline_models]
        for x in searches:
            options += x.get("candidates", [])
        lat_cfg = self.cfg["latency"]
        picked = select(options, lambda rec: rec["accuracy"][metric], self.cache, lambda t: self.side_by_side(ws, t),
                        ws.fp32, lat_cfg["tie_tolerance"], lat_cfg["side_by_side_max"])
        if picked is None:
            return None, None
        (label, models, flat, rec, calibrator), lat, timing = picked
        self._finalize(ws, models, flat)
        selected = {"label": "selected mix", "source": label, "plan_hash": flat_plan_hash(flat), "calibrator": calibrator,
                    "same_plan": timing["same_plan_as_selected"], **plan_counts(flat),
                    "fallback_nodes": sorted(k for k, v in flat.items() if v != "int8"),
                    "accuracy": rec["accuracy"], "passed": True, "latency": lat[label], "reference_latency": lat["FP32"],
                    "hackathon": {k: v for k, v in self.hackathon(ws, models).items() if k != "rows"}}
        if "ci" in rec:  # a baseline's interval (a search candidate has none: its counts are not kept)
            selected["ci"] = rec["ci"]
        return selected, timing

    def _passes(self, crit: dict):
        if crit["kind"] == "hackathon":
            return lambda acc: acc.get("hackathon_passed") == acc.get("hackathon_total")
        return lambda acc: acc[crit["metric"]] <= crit["threshold"] + 1e-12

    def _finalize(self, ws: Workspace, models: dict[str, Path], flat: dict[str, str]) -> None:
        """The selected mix's models, plans and engines under run_dir/final/ (encoder.plan and decoder.plan
        inside the engine directories when the backend is TensorRT)."""
        import shutil

        final = self.dir / "final"
        final.mkdir(exist_ok=True)
        for kind in KINDS:
            shutil.copyfile(models[kind], final / f"{kind}.onnx")
            plan = edit_plan(ws.base_plan(kind, "fp32"), set_nodes=split_plan(flat, kind))
            save_plan(plan, final / f"{kind}.plan.json")
            engines.build(final / f"{kind}.onnx", engines.default_shapes(final / f"{kind}.onnx", kind,
                                                                         time_range=PIPELINE_TIME_RANGES[kind]),
                          final / f"{kind}_engine", backend=self.cfg["backend"]["name"],
                          threads=self.cfg["backend"]["threads"])


def run_experiment(cfg: dict, run_dir: str | Path, cache_dir: str | Path | None = None,
                   progress: bool = True) -> dict:
    cfg = resolve_backend_and_recipe(cfg)  # raises a clear error when tensorrt is asked for and missing
    exp = Experiment(cfg, Path(run_dir), Path(cache_dir) if cache_dir else None, progress)
    try:
        return exp.run()
    finally:
        if getattr(exp, "_fanout", None) is not None:
            exp._fanout.close()  # Ray's logs into run_dir/ray/
