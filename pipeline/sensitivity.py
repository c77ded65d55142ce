"""Stage: single-layer sensitivity. Noise-to-signal ratio of each graph's main output with only one node in
INT8, against the FP32 model of the same weights, on the task's ranking feeds: a cheap ranking that orders the
search's fallback (the task's metric decides). Engine runners only; on Ray one probe per node on the workers,
each score cached as it arrives, so a resume probes only the rest, and the per-item part of the task's ranking
pass (WeNet: the FP32/all-INT8 disagreement of each pool utterance) is fanned out too."""
from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

import engines
from tasks.fidelity import noise_to_signal


def mean_noise_to_signal(runner, output: str, feeds: list[dict], refs: list[np.ndarray]) -> float:
    """The probe's score: noise-to-signal of `output` averaged over the ranking feeds."""
    return float(np.mean([noise_to_signal(runner.run(f)[output], a) for f, a in zip(feeds, refs)]))


def probe_runner(ws, graph: str, model):
    """The runner a probe scores. ONNX Runtime: the placed model opened as its engine would be (the artifact's
    engine file is a byte copy of the model, loaded by OrtEngineRunner with these same options and shape ranges),
    so the outputs are the engine's bit for bit, without writing an artifact (optimised-graph dump, kernel report)
    that nothing reads again: that build and the second session it costs were over a third of a WeNet probe's
    time (96 -> 61 s for the 74 probes on one worker, experiments/results/ray_scaling.md). Other backends build
    and load their engine (Workspace.runner)."""
    if ws.cfg["backend"]["name"] != "onnxruntime":
        return ws.runner(graph, model)
    return engines.OnnxFileRunner(model, threads=ws.cfg["backend"]["threads"] or engines.physical_cores(),
                                  kind=ws.task.graph(graph).engine_kind, shapes=ws.shapes(graph),
                                  shapes_where=f"the probe of {model}")


def probe(ws, graph: str, node: str, method: str, recipe: str | None, output: str, feeds: list[dict],
          refs: list[np.ndarray]) -> float:
    """One node's score (the driver's serial loop and pipeline.fanout.task_probe). The probe's placed model is
    deleted once scored (only the score is kept, and a run probes every quantizable node), unless it is the
    graph's all-INT8 model (a graph with a single quantizable node), which the baselines and the selection use.
    Whatever else needs that plan later places it again."""
    model = ws.model(graph, {node: "int8"}, method, recipe=recipe)
    try:
        return mean_noise_to_signal(probe_runner(ws, graph, model), output, feeds, refs)
    finally:
        if len(ws.int8_nodes(graph)) > 1:  # with one quantizable node, this plan is the all-INT8 one
            ws.discard(graph, model)


class LazyRunners(Mapping):
    """{graph: runner} of `models` ({graph: path}), each opened (Workspace.runner) when first read: a task's
    ranking may read some graphs only (WeNet: the encoders), and each runner is an engine session to open."""

    def __init__(self, ws, models: Mapping):
        self.ws, self.models = ws, dict(models)

    def __getitem__(self, graph: str):
        return self.ws.runner(graph, self.models[graph])

    def __iter__(self):
        return iter(self.models)

    def __len__(self) -> int:
        return len(self.models)


class RunOnce:
    """A runner that runs each distinct feed once and returns the first run's outputs on a repeat (a runner
    gives the same outputs for the same inputs): the task's ranking feeds and the references often run the FP32
    model on the same batch (WeNet: the decoder's feeds come from the FP32 encoder on the ranked batch, which is
    also the encoder's reference). `seconds`: the time of the runs that were made, per feed (probe cost order)."""

    def __init__(self, runner):
        self.runner, self._seen, self.seconds = runner, {}, {}

    def __getattr__(self, name):
        return getattr(self.runner, name)

    @staticmethod
    def key(feeds) -> str:
        h = hashlib.sha256()
        for name in sorted(feeds):
            a = np.ascontiguousarray(feeds[name])
            h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def run(self, feeds, outputs=None):
        k = self.key(feeds)
        if k not in self._seen:
            t = time.perf_counter()
            self._seen[k] = self.runner.run(feeds)
            self.seconds[k] = time.perf_counter() - t
        out = self._seen[k]
        return {n: out[n] for n in (outputs if outputs is not None else out)}


def graph_inputs(exp, method: str, recipe: str | None = None) -> Iterator[tuple[str, list, tuple, float]]:
    """The driver's part of the stage, one graph at a time in graph order: (graph, the task's ranking feeds,
    (main output, the FP32 references on them), the seconds of those FP32 runs: the graph's probe cost). A
    distributed stage sends a graph's probes as soon as it is yielded, while the next one is computed.

    A task with `ranking_scores` (per-item scores the ranking picks from, WeNet's pool disagreement) has them
    computed on the workers of a distributed run, one share of the items each, while the driver opens its FP32
    runners; the driver then never opens the all-INT8 ones. The scores are the driver's bit for bit (same
    models, same threads), so the feeds are too."""
    ws, task = exp.ws, exp.task
    src = ws.source(method)  # single-node INT8 against the FP32 model of the same weights
    int8_models = {g: ws.model(g, {n: "int8" for n in ws.int8_nodes(g)}, method, recipe=recipe) for g in ws.names}
    scores = None
    if exp.fanout.distributed and hasattr(task, "ranking_scores"):
        from pipeline.fanout import task_ranking_scores

        n, k = task.ranking_pool_size(), exp.fanout.parallel
        shares = [list(range(i, n, k)) for i in range(min(k, n))]  # interleaved: long and short items mixed
        ctx = exp.context(f"ranking:{method}:{recipe}", int8={g: str(p) for g, p in int8_models.items()},
                          method=method)
        with ThreadPoolExecutor(1) as pool:  # the driver's FP32 sessions open while the workers score
            opening = pool.submit(ws.runners, src)
            parts = exp.fanout.map(task_ranking_scores, ctx, shares, desc="ranking pool")
            fp32 = opening.result()
        scores = [0.0] * n
        for share, part in zip(shares, parts):
            for i, s in zip(share, part):
                scores[i] = s
        int8 = None
    else:
        fp32 = ws.runners(src)
        int8 = LazyRunners(ws, int8_models)
    fp32 = {g: RunOnce(r) for g, r in fp32.items()}
    extra = {} if scores is None else {"scores": scores}
    for g in ws.names:
        feeds = task.ranking_feeds(g, fp32, int8, **extra)
        out = task.graph(g).main_output or fp32[g].output_names[0]
        refs = [fp32[g].run(f)[out] for f in feeds]
        yield g, feeds, (out, refs), sum(fp32[g].seconds.get(RunOnce.key(f), 0.0) for f in feeds)


def ranking_inputs(exp, method: str, recipe: str | None = None) -> tuple[dict, dict, dict]:
    """graph_inputs of every graph: ({graph: feeds}, {graph: (output, refs)}, {graph: seconds})."""
    feeds, refs, cost = {}, {}, {}
    for g, f, r, c in graph_inputs(exp, method, recipe):
        feeds[g], refs[g], cost[g] = f, r, c
    return feeds, refs, cost


def sensitivity_stage(exp, method: str, recipe: str | None = None) -> dict[str, float]:
    """{node key: score} for every quantizable node of every graph, in graph order (`recipe`: another
    placement recipe than the run's)."""
    key = f"sensitivity:{method}" + (f":{recipe}" if recipe else "")
    cached = exp.cache.entries.get(key)
    if cached is not None:
        return cached
    ws = exp.ws
    todo = [(g, n) for g in ws.names for n in ws.int8_nodes(g)]
    if exp.fanout.distributed:
        from pipeline.fanout import task_probe

        # one context per graph (its feeds and references), sent as soon as the driver has made them: the
        # driver computes the next graph's feeds (WeNet's decoder: the FP32 encoder, the CTC beam search) while
        # the workers probe this one's nodes; waiting probes go costliest graph first (its FP32 run on the
        # ranking feeds as their cost), so the last round is one of the cheap ones and fewer workers idle
        parts = ((exp.context(f"{key}:{g}", feeds={g: feeds}, refs={g: ref}, recipe=recipe), g, ws.int8_nodes(g),
                  cost) for g, feeds, ref, cost in graph_inputs(exp, method, recipe))
        exp.fanout.probes(task_probe, parts, method, exp.cache, f"{key}:", exp.key)
        scores = {exp.key(g, n): exp.cache.entries[f"{key}:{exp.key(g, n)}"] for g, n in todo}
    else:
        feeds, refs, _ = ranking_inputs(exp, method, recipe)
        scores = {}
        for g, node in tqdm(todo, desc="sensitivity", disable=not exp.progress):
            out, ref = refs[g]
            scores[exp.key(g, node)] = probe(ws, g, node, method, recipe, out, feeds[g], ref)
    return exp.cache.get_or_compute(key, lambda: scores)
