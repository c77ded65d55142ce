"""`wenet_asr`: the bundled WeNet-style conformer (or a user's weights) on the synthetic speech corpus, as a Task.

Graphs: `encoder` -> CTC prefix beam -> `decoder` (attention rescoring). Metrics: CER of attention rescoring
(the criterion's default), of greedy CTC and of the CTC prefix beam, and WER of rescoring, all lower-is-better
fractions. Its extras over the Task interface: per-utterance counts for the paired bootstrap interval of the CER
change, the hackathon's output check against FP32 (criterion kind "hackathon"), a ranking subset (the
calibration utterances where FP32 and all-INT8 encoders disagree most) and QAT ranges with their fine-tuned
weights as calibrator "qat" (`[qat] dir`).

Evaluation sets (`[data] eval_sets`, e.g. "test-a: m4 f3 klatt3"): the first eval_utts utterances of eval_split
partitioned by the held-out voice variant of each (its manifest's "voice"), so the flat metrics stay the pooled
CER over all of them; the confirmation set "confirm" (`[data] confirm_utts`): the next confirm_utts utterances.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from calibration_data.corpus import ensure_corpus, load_split
from calibration_data.text import DEFAULT_VOCAB, load_units, normalize
from core.errors import WorkbenchError
from engines.base import default_shapes, onnx_io
from engines.cases import bench_cases
from evaluation.asr import decoder_calibration_feeds, evaluate
from evaluation.bootstrap import paired_delta_ci
from evaluation.hackathon import make_cases, run_check
from evaluation.metrics import cer, edit_distance, wer
from quant.collect import Padding, encoder_feed
from tasks.base import ALL, GraphSpec, Metric, Task
from tasks.fidelity import noise_to_signal

KINDS = ("encoder", "decoder")
# Engine shape ranges (min, opt, max) of the time axis: wide enough for every test utterance and for the
# hackathon decoder case sl=256, whose encoder input has 4*256+3 frames.
PIPELINE_TIME_RANGES = {"encoder": (7, 256, 2048), "decoder": (1, 64, 512)}
METRICS = ("cer_rescore", "cer_greedy", "cer_prefix", "wer_rescore")
CONFIRM = "confirm"  # the name of the confirmation set
POOL = 64  # calibration utterances with real features for latency cases, the hackathon check and the ranking


def parse_eval_sets(specs: list[str]) -> dict[str, tuple[str, ...]]:
    """{set name: voice variants} of `[data] eval_sets` entries "name: variant variant ..."."""
    out: dict[str, tuple[str, ...]] = {}
    for spec in specs:
        name, sep, rest = str(spec).partition(":")
        name, variants = name.strip(), tuple(rest.split())
        if not sep or not name or not variants or name in (ALL, CONFIRM) or name in out:
            raise WorkbenchError(f"config data.eval_sets entry {spec!r}: write \"name: variant variant ...\" with a "
                                 f"new name other than {ALL!r} and {CONFIRM!r}")
        taken = set(variants) & {v for vs in out.values() for v in vs}
        if taken or len(set(variants)) != len(variants):
            raise WorkbenchError(f"config data.eval_sets: voice variants {sorted(taken) or list(variants)} are named "
                                 f"twice (the sets must partition the utterances)")
        out[name] = variants
    return out


def voice_variant(voice: str) -> str:
    """The variant of a manifest voice: "espeak-ng:en-us+Annie" -> "Annie", "flite:slt" -> "slt"."""
    return voice.rsplit("+", 1)[1] if "+" in voice else voice.split(":", 1)[-1]


def partition_by_voice(voices: list[str], sets: dict[str, tuple[str, ...]]) -> dict[str, list[int]]:
    """{set: utterance indices} of the utterances whose voice's variant the set names; every utterance in one."""
    of = {v: name for name, vs in sets.items() for v in vs}
    variants = [voice_variant(v) for v in voices]
    left = sorted({v for v in variants if v not in of})
    if left:
        raise WorkbenchError(f"config data.eval_sets: utterances of voice variants {left} are in no set (the sets "
                             f"must partition the evaluation utterances)")
    out = {name: [i for i, v in enumerate(variants) if of[v] == name] for name in sets}
    empty = [n for n, idx in out.items() if not idx]
    if empty:
        raise WorkbenchError(f"config data.eval_sets: sets {empty} have no utterance among the first "
                             f"{len(voices)} (give more data.eval_utts or other voices)")
    return out


def set_results(texts: list[str], hyps: list[dict], sets: dict[str, list[int]]) -> dict[str, tuple[dict, dict]]:
    """{ALL and each set: (METRICS, per-utterance rescoring edits and reference lengths)} of recognised
    utterances: corpus rates over each set's utterances (ALL: all of them, the pooled rates)."""
    def of(idx):
        refs, hs = [texts[i] for i in idx], [hyps[i] for i in idx]
        metrics = {"cer_greedy": cer(refs, [h["ctc_greedy"] for h in hs])["cer"],
                   "cer_prefix": cer(refs, [h["ctc_prefix"] for h in hs])["cer"],
                   "cer_rescore": cer(refs, [h["rescored"] for h in hs])["cer"],
                   "wer_rescore": wer(refs, [h["rescored"] for h in hs])["wer"]}
        norm = [normalize(r) for r in refs]
        items = {"edits": [edit_distance(r, normalize(h["rescored"])) for r, h in zip(norm, hs)],
                 "ref_len": [len(r) for r in norm]}
        return metrics, items

    return {ALL: of(range(len(texts))), **{name: of(idx) for name, idx in sets.items()}}


class WenetAsrTask(Task):
    name = "wenet_asr"
    links = "encoder -> CTC prefix beam -> decoder (attention rescoring)"
    check_name = "hackathon"

    def __init__(self, cfg: dict, run_dir: str | Path, cache_dir: str | Path | None = None, progress: bool = True):
        self.cfg, self.dir, self.progress = cfg, Path(run_dir), progress
        self.metrics = [Metric(m, higher_is_better=False, unit="%") for m in METRICS]
        self.vocab = load_units(cfg["model"]["vocab"]) if cfg["model"]["vocab"] else DEFAULT_VOCAB  # before any work
        self.model = "wenet-small" if not cfg["model"]["weights"] else Path(cfg["model"]["weights"]).stem
        d = cfg["data"]
        # only what the run reads (calib_utts, and POOL for the latency, hackathon and ranking pool; eval_utts);
        # a larger split already on disk serves (its first utterances are these), so quick and full runs share one
        sizes: dict[str, int] = {}
        for split, n in ((d["calib_split"], max(POOL, d["calib_utts"])),
                         (d["eval_split"], d["eval_utts"] + d["confirm_utts"])):
            sizes[split] = max(n, sizes.get(split, 0))  # one split may serve both
        corpus = ensure_corpus(Path(cache_dir) if cache_dir else None, sizes, progress=progress, at_least=True)
        calib = load_split(corpus, d["calib_split"])
        self.calib_feats = [calib.features(i) for i in range(min(d["calib_utts"], len(calib)))]
        self.pool = [calib.features(i) for i in range(min(POOL, len(calib)))]
        ev = load_split(corpus, d["eval_split"])
        n = min(d["eval_utts"], len(ev))
        self.eval_feats = [ev.features(i) for i in range(n)]
        self.eval_texts = list(ev.texts[:n])
        self.set_voices = parse_eval_sets(d["eval_sets"])
        self.eval_sets = tuple(self.set_voices)
        self.set_index = partition_by_voice([ev.manifest[i]["voice"] for i in range(n)], self.set_voices) \
            if self.set_voices else {}
        m = min(n + d["confirm_utts"], len(ev))  # the confirmation split: the next confirm_utts utterances
        self.confirm_set = CONFIRM if m > n else ""
        self.confirm_feats = [ev.features(i) for i in range(n, m)]
        self.confirm_texts = list(ev.texts[n:m])
        if cfg["model"]["encoder"]:  # a WeNet export of the user's: its graphs as they are
            fp32 = {k: Path(cfg["model"][k]) for k in KINDS}
            self.model = Path(cfg["model"]["encoder"]).resolve().parent.name
        else:
            fp32 = self._export(self.dir / "models" / "fp32", cfg["model"]["weights"] or None)
        outputs = {k: onnx_io(fp32[k])["outputs"] for k in KINDS}
        self.graphs = [GraphSpec(k, fp32[k], shapes=default_shapes(fp32[k], k, time_range=PIPELINE_TIME_RANGES[k]),
                                 main_output=f"{k}_out" if f"{k}_out" in outputs[k] else None, engine_kind=k,
                                 padding=Padding.wenet_encoder() if k == "encoder" else None) for k in KINDS]
        # the hackathon check compares decoder_out, which WeNet's default export (best_index only) lacks
        self.check_name = "hackathon" if "decoder_out" in outputs["decoder"] else ""
        lat = cfg["latency"]
        self._cases = {k: bench_cases(onnx_io(fp32[k]), k, lat["batch_sizes"], lat["seq_lens"], feats_pool=self.pool)
                       for k in KINDS if k in lat["models"]}
        self._hack_cases = None  # made from the FP32 encoder's outputs on first use (reference_check)
        self._ranked: dict[int, list[np.ndarray]] = {}

    def __getstate__(self) -> dict:
        """What a Ray worker receives (pipeline.fanout ships the task in its contexts): everything but the
        calibration features (about 50 MB at 512 utterances), which only the driver's calibration reads."""
        state = dict(self.__dict__)
        state["calib_feats"] = None
        state["_ranked"] = {}
        return state

    def _export(self, out: Path, weights: str | Path | None) -> dict[str, Path]:
        from models.export import export_onnx
        from models.weights import default_model, load_weights

        if not all((out / f"{k}.onnx").is_file() for k in KINDS):
            export_onnx(load_weights(weights) if weights else default_model("small")[0], out,
                        opset=self.cfg["model"]["opset"])
        return {k: out / f"{k}.onnx" for k in KINDS}

    # --- the Task interface --------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        return {"vocab": list(self.vocab.tokens),
                "eval_texts": hashlib.sha256(json.dumps(self.eval_texts).encode()).hexdigest(),
                "eval_sets": self.set_index and {k: list(v) for k, v in self.set_voices.items()},
                "confirm_texts": hashlib.sha256(json.dumps(self.confirm_texts).encode()).hexdigest()}

    def calibration_feeds(self, graph: str, runners: Mapping[str, Any]) -> list[dict]:
        """Encoder batches of the calibration utterances; decoder inputs as the pipeline produces them (FP32
        encoder outputs + CTC prefix-beam hypotheses)."""
        bs = self.cfg["calibration"]["batch_size"]
        if self.calib_feats is None:
            raise WorkbenchError("the wenet_asr task's calibration features stay with the driver (not on workers)")
        if graph == "encoder":
            return [encoder_feed(self.calib_feats[s:s + bs]) for s in range(0, len(self.calib_feats), bs)]
        return decoder_calibration_feeds(runners["encoder"], list(onnx_io(self.graph("decoder").path)["inputs"]),
                                         self.calib_feats, bs)

    def evaluate(self, runners: Mapping[str, Any]) -> dict[str, float]:
        return self.evaluate_items(runners)[0]

    def evaluate_items(self, runners: Mapping[str, Any]) -> tuple[dict[str, float], dict]:
        """The METRICS and the per-utterance rescoring edits and reference lengths (what a paired bootstrap
        interval of the CER change resamples: evaluation.bootstrap)."""
        return self.evaluate_sets(runners, [ALL])[ALL]

    def evaluate_sets(self, runners: Mapping[str, Any], which) -> dict[str, tuple[dict, dict]]:
        """ALL (the first eval_utts utterances, pooled), the eval_sets (their partition by voice) and CONFIRM
        (the next confirm_utts): one recognition pass over each split asked for."""
        which = list(which)
        bad = [w for w in which if w not in (ALL, *self.eval_sets, *([self.confirm_set] if self.confirm_set else []))]
        if bad:
            raise WorkbenchError(f"task wenet_asr has no evaluation sets {bad}")
        out = {}
        if any(w != CONFIRM for w in which):
            hyps = evaluate(runners["encoder"], runners["decoder"], self.eval_feats, self.eval_texts, self.vocab,
                            progress=False)["utterances"]
            res = set_results(self.eval_texts, hyps, self.set_index)
            out.update({w: res[w] for w in which if w != CONFIRM})
        if CONFIRM in which:
            hyps = evaluate(runners["encoder"], runners["decoder"], self.confirm_feats, self.confirm_texts,
                            self.vocab, progress=False)["utterances"]
            out[CONFIRM] = set_results(self.confirm_texts, hyps, {})[ALL]
        return out

    def delta_interval(self, items: dict, reference: dict) -> dict | None:
        if len(items["edits"]) != len(reference["edits"]):
            return None
        return {"metric": "cer_rescore", **paired_delta_ci(items["edits"], reference["edits"], reference["ref_len"])}

    def reference_check(self, runners: Mapping[str, Any], reference: Mapping[str, Any]) -> dict:
        """The hackathon's output check against FP32 over the bs x sl grid: {"passed", "total", "rows"}."""
        if self._hack_cases is None:
            lat = self.cfg["latency"]
            self._hack_cases = make_cases(reference["encoder"], self.pool, batch_sizes=lat["batch_sizes"],
                                          seq_lens=lat["seq_lens"])
        rows = run_check(reference["encoder"], reference["decoder"], runners["encoder"], runners["decoder"],
                         self._hack_cases)
        return {"passed": sum(r["passed"] for r in rows), "total": len(rows), "rows": rows}

    def latency_cases(self, graph: str) -> dict:
        """{(bs, sl): feeds} of the latency grid, for the graphs `[latency] models` names."""
        return self._cases.get(graph, {})

    def ranking_pool_size(self) -> int:
        """How many items `ranking_scores` scores (the pool utterances)."""
        return len(self.pool)

    def ranking_scores(self, runners: Mapping[str, Any], int8: Mapping[str, Any], items=None) -> list[float]:
        """The disagreement of the all-INT8 encoder with FP32 (noise-to-signal of encoder_out) on each pool
        utterance of `items` (indices; default all), each utterance run alone: shares of the pool can be
        scored apart (pipeline.sensitivity fans them out) and give the same numbers."""
        err = []
        for i in range(len(self.pool)) if items is None else items:
            f = self.pool[i]
            feeds = {"speech": f[None], "speech_lengths": np.array([len(f)], np.int32)}
            a, b = runners["encoder"].run(feeds)["encoder_out"], int8["encoder"].run(feeds)["encoder_out"]
            err.append(noise_to_signal(b, a))
        return err

    def ranking_feeds(self, graph: str, runners: Mapping[str, Any], int8: Mapping[str, Any] | None = None,
                      scores: list[float] | None = None) -> list[dict]:
        """One batch of the `ranking_utts` pool utterances where the FP32 and all-INT8 encoders disagree most
        (`scores`: those disagreements, `ranking_scores` of the whole pool, when already computed)."""
        if scores is None:
            if int8 is None:
                raise WorkbenchError("the wenet_asr ranking needs the all-INT8 runners")
            key = id(int8["encoder"])
            if key not in self._ranked:
                self._ranked = {key: self.ranking_scores(runners, int8)}
            scores = self._ranked[key]
        rank = [self.pool[i] for i in np.argsort(scores)[::-1][: self.cfg["data"]["ranking_utts"]]]
        if graph == "encoder":
            return [encoder_feed(rank)]
        return decoder_calibration_feeds(runners["encoder"], list(onnx_io(self.graph("decoder").path)["inputs"]),
                                         rank, len(rank))[:1]

    def extra_methods(self) -> dict[str, dict[str, dict[str, Path]]]:
        """Calibrator "qat" when the config names it: the fine-tuned weights of qat.dir exported as FP32 (placement
        puts the QAT ranges on them) and its tables copied into the run's calibration/ directory."""
        if "qat" not in self.cfg["calibration"]["methods"]:
            return {}
        from quant.qat_run import WEIGHTS, check_qat_dir, table_path

        qdir = check_qat_dir(self.cfg["qat"]["dir"])
        sources = self._export(self.dir / "models" / "qat_fp32", qdir / WEIGHTS)
        tables = {}
        for kind in KINDS:
            p = self.dir / "calibration" / f"{kind}.qat.json"
            if not p.is_file():
                p.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(table_path(qdir, kind), p)
            tables[kind] = p
        return {"qat": {"sources": sources, "tables": tables}}
