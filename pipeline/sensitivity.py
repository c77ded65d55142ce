"""Stage: single-layer sensitivity. Noise-to-signal ratio of each graph's main output with only one node in
INT8, against the FP32 model of the same weights, on the task's ranking feeds: a cheap ranking that orders the
search's fallback (the task's metric decides). Engine runners only; on Ray one probe per node on the workers,
each score cached as it arrives, so a resume probes only the rest."""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from tasks.fidelity import noise_to_signal


def mean_noise_to_signal(runner, output: str, feeds: list[dict], refs: list[np.ndarray]) -> float:
    """The probe's score: noise-to-signal of `output` averaged over the ranking feeds."""
    return float(np.mean([noise_to_signal(runner.run(f)[output], a) for f, a in zip(feeds, refs)]))


def ranking_inputs(exp, method: str, recipe: str | None = None) -> tuple[dict, dict]:
    """The driver's part of the stage: the task's ranking feeds per graph (given the FP32 and all-INT8 runners)
    and the FP32 references of each graph's main output on them: ({graph: feeds}, {graph: (output, refs)})."""
    ws, task = exp.ws, exp.task
    src = ws.source(method)  # single-node INT8 against the FP32 model of the same weights
    fp32 = ws.runners(src)
    int8 = ws.runners({g: ws.model(g, {n: "int8" for n in ws.int8_nodes(g)}, method, recipe=recipe) for g in ws.names})
    feeds = {g: task.ranking_feeds(g, fp32, int8) for g in ws.names}
    refs = {}
    for g in ws.names:
        out = task.graph(g).main_output or fp32[g].output_names[0]
        refs[g] = (out, [fp32[g].run(f)[out] for f in feeds[g]])
    return feeds, refs


def sensitivity_stage(exp, method: str, recipe: str | None = None) -> dict[str, float]:
    """{node key: score} for every quantizable node of every graph, in graph order (`recipe`: another
    placement recipe than the run's)."""
    key = f"sensitivity:{method}" + (f":{recipe}" if recipe else "")
    cached = exp.cache.entries.get(key)
    if cached is not None:
        return cached
    ws = exp.ws
    feeds, refs = ranking_inputs(exp, method, recipe)
    todo = [(g, n) for g in ws.names for n in ws.int8_nodes(g)]
    scores = {}
    if exp.fanout.distributed:
        from pipeline.fanout import task_probe

        ctx = exp.context(key, feeds=feeds, refs=refs, recipe=recipe)
        scores = exp.fanout.probes(task_probe, ctx, todo, method, exp.cache, f"{key}:", exp.key)
    for g, node in tqdm(todo if not scores else [], desc="sensitivity", disable=not exp.progress):
        out, ref = refs[g]
        scores[exp.key(g, node)] = mean_noise_to_signal(ws.runner(g, ws.model(g, {node: "int8"}, method, recipe=recipe)),
                                                        out, feeds[g], ref)
    return exp.cache.get_or_compute(key, lambda: scores)
