"""The built-in `sentence_embedding` task: all-MiniLM-L6-v2 (models/minilm.py) on fortunes sentences, judged
against its own FP32 graph.

    [task]
    kind = "sentence_embedding"
    options = { layers = 6, calib = 512, eval = 1000, corpus = 2000, max_seq_len = 128, ... }   # OPTIONS

Data: written fortunes sentences (calibration_data.fortunes.load_texts), ordered by a hash of each sentence and cut
into disjoint splits: calibration, evaluation (the queries) and a retrieval corpus. Every split is tokenised with
the package's tokenizer.json, sorted by length and batched (little padding; padding is masked anyway).

Evaluation sets: `fortunes` (the evaluation split) and `licenses`, held-out sentences from a second text source,
the license texts every Debian system installs (/usr/share/common-licenses: legal prose, another domain than
fortunes); `heldout = 0` leaves one set. The flat metrics pool the queries of both sets.

Metrics against FP32 on each set's queries (higher is better):
  * cosine / cosine_p01: mean and 1st percentile over sentences of cos(candidate embedding, FP32 embedding);
  * recall_at_10 (recall_at_K): nearest-neighbour agreement. For each evaluation sentence (a query), its K nearest
    corpus sentences by cosine are found twice: with FP32 embeddings of query and corpus, and with the candidate
    model's embeddings of both. recall@K is |candidate's K ∩ FP32's K| / K, averaged over the queries.
  * criteria_margin: min over the `criteria` table of (metric - threshold); >= 0 means every one passes. The
    pipeline's criterion is one metric, so the default [criterion] is `criteria_margin >= 0` (kind "fixed").
Latency: every (bs, seq) of the grid, inputs of exactly seq tokens (consecutive corpus sentences joined and cut).
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping

import numpy as np

from core.errors import WorkbenchError

from .base import ALL, Feeds, GraphSpec, Metric, Task

OPTIONS = {
    "layers": 6,                        # the first N encoder layers (fewer: a cheap model for tests)
    "calib": 512,                       # calibration sentences
    "eval": 1000,                       # evaluation sentences (the queries)
    "corpus": 2000,                     # retrieval-corpus sentences
    "max_seq_len": 128,                 # tokens per sentence, [CLS] and [SEP] included (the model takes 256)
    "batch_size": 32,                   # sentences per calibration/evaluation feed
    "k": 10,                            # recall@k
    "criteria": {"cosine": 0.99, "recall_at_10": 0.95},   # what criteria_margin checks: metric >= value
    "latency_batch_sizes": [1, 8, 32],
    "latency_seq_lens": [16, 64, 128],
    "ranking_batches": 4,               # calibration feeds (spread over lengths) for single-layer sensitivity
    "fortunes_dir": "",                 # default: calibration_data.fortunes.fortunes_dir()
    "heldout": 300,                     # queries of the held-out set `licenses` (0: no second set)
    "heldout_dir": "/usr/share/common-licenses",  # its text source: plain-text files, read sentence by sentence
    "qat_train": 20000,                 # fortunes sentences QAT trains on (`wb qat`), after the three splits
}
HELDOUT_SET, EVAL_SET = "licenses", "fortunes"
GRAPH = "minilm"
OUTPUT = "sentence_embedding"


def parse_options(options: Mapping | None) -> dict:
    """OPTIONS with the user's values, each checked (one line per mistake)."""
    opts = dict(OPTIONS) | {"criteria": dict(OPTIONS["criteria"])}
    for key, value in (options or {}).items():
        if key not in OPTIONS:
            raise WorkbenchError(f"config task.options: unknown key {key!r} for the sentence_embedding task "
                                 f"(known: {sorted(OPTIONS)})")
        like = OPTIONS[key]
        if isinstance(like, int) and (not isinstance(value, int) or isinstance(value, bool) or
                                      value < (0 if key == "heldout" else 1)):
            raise WorkbenchError(f"config task.options.{key} must be a positive integer, got {value!r}")
        if isinstance(like, list) and (not isinstance(value, list) or not value or
                                       any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in value)):
            raise WorkbenchError(f"config task.options.{key} must be a non-empty list of positive integers, "
                                 f"got {value!r}")
        if isinstance(like, dict) and (not isinstance(value, dict) or not value or any(
                not isinstance(v, (int, float)) or isinstance(v, bool) for v in value.values())):
            raise WorkbenchError(f"config task.options.{key} must be a table of metric = threshold, got {value!r}")
        if isinstance(like, str) and not isinstance(value, str):
            raise WorkbenchError(f"config task.options.{key} must be a string, got {value!r}")
        opts[key] = dict(value) if isinstance(value, dict) else value
    if opts["max_seq_len"] < 3:
        raise WorkbenchError("config task.options.max_seq_len must be >= 3 ([CLS] a token [SEP])")
    return opts


# --- metrics (pure numpy, tested on constructed cases) --------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def top_k(queries: np.ndarray, corpus: np.ndarray, k: int) -> np.ndarray:
    """Indices of each query's k nearest corpus rows by cosine (as a set: order within the k is not used)."""
    sims = _unit(queries) @ _unit(corpus).T
    k = min(k, sims.shape[1])
    return np.argpartition(-sims, k - 1, axis=1)[:, :k]


def embedding_metrics(ref_q: np.ndarray, ref_c: np.ndarray, got_q: np.ndarray, got_c: np.ndarray,
                      k: int = 10) -> dict[str, float]:
    """cosine, cosine_p01 (of got_q against ref_q) and recall_at_k (neighbours of got_q in got_c against those
    of ref_q in ref_c)."""
    if ref_q.shape != got_q.shape or ref_c.shape != got_c.shape:
        raise WorkbenchError(f"embedding shapes differ: {got_q.shape}/{got_c.shape} against "
                             f"{ref_q.shape}/{ref_c.shape}")
    cos = np.sum(_unit(ref_q) * _unit(got_q), axis=1)
    a, b = top_k(ref_q, ref_c, k), top_k(got_q, got_c, k)
    hits = [len(set(x) & set(y)) for x, y in zip(a.tolist(), b.tolist())]
    return {"cosine": float(cos.mean()), "cosine_p01": float(np.percentile(cos, 1)),
            f"recall_at_{k}": float(np.mean(hits) / a.shape[1])}


def criteria_margin(values: Mapping[str, float], criteria: Mapping[str, float]) -> float:
    """min over the criteria of (value - threshold): >= 0 exactly when every metric reaches its threshold."""
    return float(min(values[m] - float(t) for m, t in criteria.items()))


# --- data ----------------------------------------------------------------------------------------------------
def split_texts(texts: list[str], sizes: Mapping[str, int]) -> dict[str, list[str]]:
    """Disjoint splits in `sizes` order, taken from the sentences ordered by a hash of each (deterministic, and a
    sentence keeps its place when the corpus grows)."""
    need = sum(sizes.values())
    if len(texts) < need:
        raise WorkbenchError(f"the fortunes corpus has {len(texts)} usable sentences; the splits need {need} "
                             f"({', '.join(f'{k} {v}' for k, v in sizes.items())})")
    order = sorted(set(texts), key=lambda t: hashlib.sha256(t.encode()).hexdigest())
    out, i = {}, 0
    for name, n in sizes.items():
        out[name], i = order[i:i + n], i + n
    return out


def heldout_sentences(directory: str, n: int) -> list[str]:
    """`n` sentences of 40-200 characters from the plain-text files of `directory` (one-line clean-up of
    whitespace), deduplicated and ordered by a hash of each: a text source other than fortunes."""
    import re
    from pathlib import Path

    root = Path(directory)
    files = sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else []
    found = set()
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # not a text file
        for sentence in re.split(r"(?<=[.;:!?])\s+", re.sub(r"\s+", " ", text)):
            if 40 <= len(sentence) <= 200 and sum(c.isalpha() for c in sentence) > 0.7 * len(sentence):
                found.add(sentence)
    if len(found) < n:
        raise WorkbenchError(f"task.options.heldout_dir {directory}: {len(found)} usable sentences, {n} wanted "
                             f"(set task.options.heldout = 0 for no held-out set)")
    return sorted(found, key=lambda t: hashlib.sha256(t.encode()).hexdigest())[:n]


def batches(rows: list[list[int]], size: int) -> list[Feeds]:
    """Length-sorted batches of token rows (the order is kept with the rows, so outputs line up across models)."""
    from models.minilm import Tokenizer

    ordered = sorted(rows, key=len)
    return [Tokenizer.pad(ordered[i:i + size]) for i in range(0, len(ordered), size)]


class SentenceEmbeddingTask(Task):
    name = "sentence_embedding"
    links = "one graph: tokens -> MiniLM encoder -> mean pooling -> L2 normalisation"

    def __init__(self, options: Mapping | None = None):
        from models.minilm import Tokenizer, export_onnx

        self.opts = o = parse_options(options)
        self.k = o["k"]
        self.recall = f"recall_at_{self.k}"
        if "criteria" not in (options or {}):  # the default criteria follow k
            o["criteria"] = {"cosine": OPTIONS["criteria"]["cosine"], self.recall: OPTIONS["criteria"]["recall_at_10"]}
        self.metrics = [Metric("cosine", True), Metric("cosine_p01", True), Metric(self.recall, True),
                        Metric("criteria_margin", True)]
        bad = set(o["criteria"]) - {m.name for m in self.metrics[:3]}
        if bad:
            raise WorkbenchError(f"config task.options.criteria names {sorted(bad)}; it takes cosine, cosine_p01 "
                                 f"and {self.recall}")
        path = export_onnx(o["layers"])
        max_bs = max(o["batch_size"], *o["latency_batch_sizes"])
        max_sl = max(o["max_seq_len"], *o["latency_seq_lens"])
        rng = {"min": [1, 1], "opt": [o["batch_size"], min(64, max_sl)], "max": [max_bs, max_sl]}
        self.graphs = [GraphSpec(GRAPH, path, shapes={"input_ids": rng, "attention_mask": rng},
                                 main_output=OUTPUT, info={"layers": o["layers"]})]
        self.tokenizer = Tokenizer(o["max_seq_len"])
        self._feeds: dict[str, list[Feeds]] | None = None
        self.eval_sets = (EVAL_SET, HELDOUT_SET) if o["heldout"] else ()
        self._reference: dict[str, np.ndarray] | None = None

    # --- data --------------------------------------------------------------------------------------------
    def feeds(self) -> dict[str, list[Feeds]]:
        if self._feeds is None:
            from calibration_data.fortunes import load_texts

            o = self.opts
            texts = load_texts(o["fortunes_dir"] or None)
            self.splits = split_texts(texts, {"calib": o["calib"], "eval": o["eval"], "corpus": o["corpus"]})
            if o["heldout"]:
                self.splits["heldout"] = heldout_sentences(o["heldout_dir"], o["heldout"])
            self._feeds = {name: batches(self.tokenizer.ids(s), o["batch_size"]) for name, s in self.splits.items()}
        return self._feeds

    def check(self) -> None:
        super().check()
        self.feeds()  # reads and tokenises the corpus now, before any expensive work

    # --- Task --------------------------------------------------------------------------------------------
    def calibration_feeds(self, graph: str, runners: Mapping[str, Any] | None = None) -> list[Feeds]:
        return self.feeds()["calib"]

    def ranking_feeds(self, graph: str, runners: Mapping[str, Any] | None = None,
                      int8: Mapping[str, Any] | None = None) -> list[Feeds]:
        calib = self.feeds()["calib"]
        n = min(self.opts["ranking_batches"], len(calib))
        return [calib[i] for i in np.linspace(0, len(calib) - 1, n).round().astype(int)]  # short to long

    def latency_cases(self, graph: str) -> dict[str, Feeds]:
        from models.minilm import Tokenizer

        o = self.opts
        long = Tokenizer(max(o["latency_seq_lens"]) + 2)
        pool = self.splits_of("corpus")
        cases, j = {}, 0
        for bs in o["latency_batch_sizes"]:
            for sl in o["latency_seq_lens"]:
                rows = []
                for _ in range(bs):  # consecutive sentences joined until seq tokens: real text, exact length
                    text, ids = "", []
                    while len(ids) < sl:
                        text, j = (text + " " + pool[j % len(pool)]).strip(), j + 1
                        ids = long.ids([text])[0]
                    rows.append(ids[:sl - 1] + [ids[-1]])  # cut, keeping [SEP]
                cases[f"bs{bs}_seq{sl}"] = Tokenizer.pad(rows)
        return cases

    def qat_model(self) -> dict:
        """MiniLM as a torch module for QAT by distillation, trained on `qat_train` fortunes sentences that none
        of the calibration, evaluation and corpus splits holds (split_texts: the same hash order, cut after them)."""
        from calibration_data.fortunes import load_texts
        from models.minilm import WEIGHTS_SHA256, Tokenizer, build_module, model_dir, write_onnx

        o = self.opts
        sizes = {"calib": o["calib"], "eval": o["eval"], "corpus": o["corpus"], "train": o["qat_train"]}
        rows: list[list[int]] = []  # tokenised at the first batch: reading the spec stays cheap

        def train(rng: np.random.Generator, n: int) -> Feeds:
            if not rows:
                rows.extend(self.tokenizer.ids(split_texts(load_texts(o["fortunes_dir"] or None), sizes)["train"]))
            return Tokenizer.pad([rows[i] for i in rng.choice(len(rows), min(n, len(rows)), replace=False)])

        return {"graph": GRAPH, "build": lambda: build_module(model_dir(), o["layers"]), "write_onnx": write_onnx,
                "train": train, "info": {"layers": o["layers"], "weights_sha256": WEIGHTS_SHA256},
                "data": {"train_sentences": o["qat_train"], "max_seq_len": o["max_seq_len"]}}

    def splits_of(self, name: str) -> list[str]:
        self.feeds()
        return self.splits[name]

    def shape_feeds(self, graph: str) -> list[Feeds]:
        return [*self.feeds()["calib"], *self.latency_cases(graph).values()]

    def embed(self, runner, split: str) -> np.ndarray:
        return np.concatenate([runner.run(f)[OUTPUT] for f in self.feeds()[split]]).astype(np.float32)

    def reference(self) -> dict[str, np.ndarray]:
        """FP32 embeddings of the evaluation, held-out and corpus splits, computed once with ONNX Runtime."""
        if self._reference is None:
            from engines import open_onnx

            runner = open_onnx(self.graphs[0].path, kind="generic")
            self._reference = {s: self.embed(runner, s) for s in self.feeds() if s != "calib"}
        return self._reference

    def evaluate(self, runners: Mapping[str, Any]) -> dict[str, float]:
        return self.evaluate_sets(runners, [ALL])[ALL][0]

    def evaluate_sets(self, runners: Mapping[str, Any], which) -> dict[str, tuple[dict[str, float], None]]:
        """The metrics of each set's queries against the one retrieval corpus (ALL: both sets' queries)."""
        ref, runner = self.reference(), runners[GRAPH]
        splits = ["eval", "corpus"] + (["heldout"] if self.eval_sets else [])
        got = {s: self.embed(runner, s) for s in splits}
        queries = {EVAL_SET: "eval", HELDOUT_SET: "heldout"}
        out = {}
        for name in which:
            if name == ALL:
                q = [queries[n] for n in self.eval_sets] or ["eval"]
                ref_q, got_q = np.concatenate([ref[s] for s in q]), np.concatenate([got[s] for s in q])
            elif name in self.eval_sets:
                ref_q, got_q = ref[queries[name]], got[queries[name]]
            else:
                raise WorkbenchError(f"task {self.name!r} has no evaluation set {name!r}")
            values = embedding_metrics(ref_q, ref["corpus"], got_q, got["corpus"], self.k)
            out[name] = (values | {"criteria_margin": criteria_margin(values, self.opts["criteria"])}, None)
        return out


def make_task(options: Mapping | None = None) -> SentenceEmbeddingTask:
    return SentenceEmbeddingTask(options)
