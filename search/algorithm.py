"""Precision search: the fastest per-layer precision mix that passes the accuracy criterion.

The caller supplies the expensive full-split metric, the criterion, a latency measurement and a cheap per-node
sensitivity signal; this module decides which plans to evaluate, with few full evaluations:

1. all-INT8 (the start); if it passes, only latency work remains;
2. otherwise bisection over k, the number of most-sensitive nodes reverted to the fallback precision: the
   smallest passing k is found in about log2(N) full evaluations (k = N, everything reverted, must pass, or the
   search reports failure; the criterion is never relaxed);
3. refinement: re-quantize the least sensitive of the reverted nodes in halving chunks while the plan still
   passes (a step back whenever a chunk fails);
4. latency: every passing plan is timed; latency-only probes revert groups of INT8 nodes whose quantization may
   only add Q/DQ overhead, and a probe that is faster (with `paired`: side by side with the plan it reverts
   from, beyond the noise) is validated with a full evaluation before it may win.

Every evaluation is cached by plan hash (EvalCache), so an interrupted search resumes without redoing work.

With several workers (`accuracy_many`, `parallel` > 1) the steps stay sequential, but when the next step's plan
is not cached yet the plans of the following steps, both outcomes of each, are evaluated with it (speculation,
breadth first, at most `parallel`); the sequential search then finds them in the cache. Its trace, budget and
result are the serial search's: a speculative result is counted only when a step uses it. Latency probes and
passing plans are placed and built in parallel (`prepare_many`) and then timed here one at a time.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from tqdm import tqdm

from .evalcache import EvalCache
from .selection import ratio_stats

Plan = dict[str, str]  # node key -> "int8" | "fp16" | "fp32"


def flat_plan_hash(plan: Plan) -> str:
    """Short hash of a flat multi-graph plan ({graph:node: precision}), the key of the search's caches (a
    placed graph's identity is graph.plan.plan_hash, which also covers its model and options)."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def node_key(graph: str, node: str) -> str:
    """The key of a graph's node in a flat plan over several graphs: "graph:node"."""
    return f"{graph}:{node}"


def split_plan(flat: Plan, graph: str) -> dict[str, str]:
    """The nodes of `graph` in a flat plan, keyed by node id."""
    prefix = f"{graph}:"
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def plan_counts(plan: dict[str, str]) -> dict[str, int]:
    """{"n_int8", "n_fallback"} of a flat plan, as trace records and run.json carry them."""
    n8 = sum(v == "int8" for v in plan.values())
    return {"n_int8": n8, "n_fallback": len(plan) - n8}


@dataclass
class SearchProblem:
    nodes: list[str]
    fallback: str  # precision of reverted nodes: "fp32", or "fp16" where the backend has it
    accuracy: Callable[[Plan], dict]  # the full-split metric (expensive)
    passes: Callable[[dict], bool]
    latency: Callable[[Plan], dict]  # must contain "objective_ms" (lower is better)
    sensitivity: dict[str, float]  # cheap signal per node, higher = more harmful in INT8
    groups: dict[str, list[str]] = field(default_factory=dict)  # latency-probe groups (e.g. by op kind)
    max_full_evals: int = 12
    # several accuracy evaluations at once (an executor's fan-out): (plans, on_result(index, accuracy)) -> None
    accuracy_many: Callable[[list[Plan], Callable[[int, dict], None]], None] | None = None
    prepare_many: Callable[[list[Plan]], None] | None = None  # place and build plans about to be timed
    parallel: int = 1  # workers; 1: no speculation (the serial search)
    # paired timing: {label: plan} -> {label: per-run objective (ms)}, the plans timed interleaved run by run.
    # Given, a latency probe counts as faster only when its paired ratio to the plan it reverts from (median
    # + 1 SE) is below 1; without it, its sequential timing decides (noisy on a shared machine: issue 15).
    paired: Callable[[dict[str, Plan]], dict[str, list[float]]] | None = None


@dataclass
class SearchResult:
    status: str  # "passed" or "no_passing_plan"
    best: dict | None
    trace: list[dict]
    plans: dict[str, Plan]
    n_full_evals: int  # accuracy evaluations the search used (its budget), cached ones included
    n_cache_hits: int
    n_computed: int = 0  # of those, computed in this process (the rest came from the evaluation cache)
    n_speculative: int = 0  # evaluated ahead by idle workers and not used by the search (kept in the cache)


class _Search:
    def __init__(self, problem: SearchProblem, cache: EvalCache, progress: bool):
        self.p = problem
        self.cache = cache
        self.trace: list[dict] = []
        self.plans: dict[str, Plan] = {}
        self.full_evals = 0
        self.computed = 0
        self.speculated: set[str] = set()  # plan hashes evaluated ahead in this process, not used yet
        self.bar = tqdm(total=problem.max_full_evals, desc="search (full evaluations)", disable=not progress)
        # Most sensitive first; ties broken by name so the order is reproducible.
        self.order = sorted(problem.nodes, key=lambda n: (-problem.sensitivity.get(n, 0.0), n))

    def plan_with(self, reverted: set[str]) -> Plan:
        return {n: (self.p.fallback if n in reverted else "int8") for n in self.p.nodes}

    def budget_left(self) -> int:
        return self.p.max_full_evals - self.full_evals

    def evaluate(self, plan: Plan, stage: str, label: str) -> dict:
        h = flat_plan_hash(plan)
        self.plans[h] = plan
        for rec in self.trace:
            if rec["plan_hash"] == h and rec["accuracy"] is not None:
                return rec
        if h in self.speculated:  # computed here, ahead of time: counted as the serial search counts it
            self.speculated.discard(h)
            cached, acc = False, self.cache.entries[f"acc:{h}"]
        else:
            cached = f"acc:{h}" in self.cache
            acc = self.cache.get_or_compute(f"acc:{h}", lambda: self.p.accuracy(plan))
        self.full_evals += 1
        self.computed += 0 if cached else 1
        self.bar.update(1)
        rec = {"label": label, "stage": stage, "plan_hash": h,
               **plan_counts(plan),
               "accuracy": acc, "passed": bool(self.p.passes(acc)), "latency": None, "cached": cached}
        self.trace.append(rec)
        return rec

    def time_plan(self, plan: Plan) -> dict:
        h = flat_plan_hash(plan)
        self.plans[h] = plan
        return self.cache.get_or_compute(f"lat:{h}", lambda: self.p.latency(plan))

    def time_record(self, rec: dict) -> dict:
        rec["latency"] = self.time_plan(self.plans[rec["plan_hash"]])
        return rec["latency"]

    # --- speculation: evaluate the plans of the next steps together when workers would otherwise idle ------
    def prefetch(self, plans: list[Plan]) -> None:
        todo = {flat_plan_hash(p): p for p in plans if f"acc:{flat_plan_hash(p)}" not in self.cache}
        if self.p.accuracy_many is None or self.p.parallel < 2 or not todo:
            return
        hashes = list(todo)

        def got(i: int, acc: dict) -> None:  # written as it arrives: a killed driver keeps it
            self.cache.get_or_compute(f"acc:{hashes[i]}", lambda: acc)
            self.speculated.add(hashes[i])

        self.p.accuracy_many(list(todo.values()), got)

    def frontier(self, state, step: Callable, done: Callable, depth: int) -> list[Plan]:
        """Uncached plans of the steps from `state`, breadth first over both outcomes of each step: at most
        `parallel`, at most `depth` steps ahead. `step(s)` -> (plan, state if it passes, state if it fails)."""
        out: dict[str, Plan] = {}
        level = [state]
        for _ in range(depth):
            nxt = []
            for s in level:
                if done(s):
                    continue
                plan, on_pass, on_fail = step(s)
                h = flat_plan_hash(plan)
                if f"acc:{h}" not in self.cache and h not in out:
                    out[h] = plan
                    if len(out) >= self.p.parallel:
                        return list(out.values())
                nxt += [on_pass, on_fail]
            level = nxt
        return list(out.values())

    def speculate(self, state, step: Callable, done: Callable, depth: int, extra: tuple = ()) -> None:
        if self.p.parallel < 2 or self.p.accuracy_many is None:
            return
        first = [*extra, step(state)[0]]
        if all(f"acc:{flat_plan_hash(p)}" in self.cache for p in first):
            return  # the next step can go on at once
        self.prefetch((first + self.frontier(state, step, done, depth))[:self.p.parallel])

    def run(self) -> SearchResult:
        nodes = self.order
        start = self.evaluate(self.plan_with(set()), "start", "all-int8")
        reverted: set[str] = set()
        if not start["passed"]:
            def bisect_step(s):
                lo, hi = s
                mid = (lo + hi) // 2
                return self.plan_with(set(nodes[:mid])), (lo, mid), (mid, hi)

            bisect_done = lambda s: s[1] - s[0] <= 1  # noqa: E731
            top_plan = self.plan_with(set(nodes))
            self.speculate((0, len(nodes)), bisect_step, bisect_done, self.budget_left() - 1, extra=(top_plan,))
            top = self.evaluate(top_plan, "bisect", f"all-{self.p.fallback}")
            if not top["passed"]:
                return self.finish("no_passing_plan")
            lo, hi = 0, len(nodes)  # plan(lo) fails, plan(hi) passes
            while hi - lo > 1 and self.budget_left() > 0:
                self.speculate((lo, hi), bisect_step, bisect_done, self.budget_left())
                mid = (lo + hi) // 2
                rec = self.evaluate(self.plan_with(set(nodes[:mid])), "bisect", f"revert top {mid}")
                lo, hi = (lo, mid) if rec["passed"] else (mid, hi)
            reverted = set(nodes[:hi])
            self.refine(reverted)
        best = self.pick_fastest()
        self.probe_overheads(best)
        return self.finish("passed")

    def refine(self, reverted: set[str]) -> None:
        """Re-quantize reverted nodes that turn out harmless, least sensitive first, in halving chunks."""
        pool = [n for n in reversed(self.order) if n in reverted]  # least sensitive first
        chunk = max(1, len(pool) // 2)

        def step(s):  # the loop below as a function of its state, for speculation
            rev, left, c = s
            trial = rev - set(left[:c])
            on_fail = (rev, left[1:] if c == 1 else left, max(1, c // 2) if c > 1 else 1)
            return self.plan_with(set(trial)), (trial, left[c:], c), on_fail

        while pool and chunk >= 1 and self.budget_left() > 1:  # keep one evaluation for the latency probe
            self.speculate((frozenset(reverted), tuple(pool), chunk), step, lambda s: not s[1],
                           self.budget_left() - 1)
            trial = reverted - set(pool[:chunk])
            rec = self.evaluate(self.plan_with(trial), "refine", f"re-quantize {chunk} of {len(reverted)}")
            if rec["passed"]:
                reverted.clear()
                reverted.update(trial)
                pool = pool[chunk:]
            else:
                if chunk == 1:
                    pool = pool[1:]  # this node must stay reverted: step back and move on
                chunk = max(1, chunk // 2) if chunk > 1 else 1

    def pick_fastest(self) -> dict | None:
        passing = [r for r in self.trace if r["passed"]]
        self.prepare([self.plans[r["plan_hash"]] for r in passing])
        for rec in passing:
            self.time_record(rec)
        return min(passing, key=lambda r: r["latency"]["objective_ms"], default=None)

    def probe_overheads(self, best: dict | None) -> None:
        """Revert one group of INT8 nodes at a time on the best plan: a group whose INT8 only adds Q/DQ
        overhead makes the plan faster when reverted. Faster probes are validated before they may win."""
        if best is None:
            return
        base_plan = self.plans[best["plan_hash"]]
        base_ms = best["latency"]["objective_ms"]
        faster, probes = [], []
        self.prepare([{**base_plan, **{n: self.p.fallback for n in members if base_plan.get(n) == "int8"}}
                      for members in self.p.groups.values() if any(base_plan.get(n) == "int8" for n in members)])
        for name, members in sorted(self.p.groups.items()):
            int8_members = [n for n in members if base_plan.get(n) == "int8"]
            if not int8_members:
                continue
            probe = {**base_plan, **{n: self.p.fallback for n in int8_members}}
            self.plans[flat_plan_hash(probe)] = probe
            # with paired timing the probes are timed once, together (paired_faster fills their latency)
            lat = self.time_plan(probe) if self.p.paired is None else None
            self.trace.append({"label": f"probe: {name} -> {self.p.fallback}", "stage": "latency-probe",
                               "plan_hash": flat_plan_hash(probe), **plan_counts(probe), "accuracy": None,
                               "passed": None, "latency": lat, "cached": False})
            if lat is not None and lat["objective_ms"] < base_ms:
                faster.append((lat["objective_ms"], name, int8_members))
            probes.append((name, int8_members, probe, self.trace[-1]))
        if self.p.paired is not None and probes:
            faster = self.paired_faster(best["plan_hash"], probes)
        if faster:  # merge every group that helped, validate once
            merged = dict(base_plan)
            for _, _, members in faster:
                merged.update({n: self.p.fallback for n in members})
            if self.budget_left() > 0:
                rec = self.evaluate(merged, "latency-validate", "revert " + ", ".join(n for _, n, _ in faster))
                if rec["passed"]:
                    self.time_record(rec)

    def paired_faster(self, base: str, probes: list) -> list:
        """The probes faster than the base plan beyond the noise, on one interleaved timing of all of them
        (cached, so that a resumed search decides on the same measurement)."""
        hashes = [base] + [flat_plan_hash(p) for _, _, p, _ in probes]
        key = "pair:" + hashlib.sha256(json.dumps(hashes).encode()).hexdigest()[:16]
        runs = self.cache.get_or_compute(key, lambda: self.p.paired({h: self.plans[h] for h in hashes}))
        ref = np.asarray(runs[base], float)
        faster = []
        for (name, members, probe, rec), h in zip(probes, hashes[1:]):
            st = ratio_stats(np.asarray(runs[h], float) / ref)
            rec["paired_vs_base"] = st
            rec["latency"] = {"objective_ms": float(np.median(runs[h])), "interleaved": True}
            if st["median"] + st["se"] < 1.0:
                faster.append((st["median"], name, members))
        return faster

    def prepare(self, plans: list[Plan]) -> None:
        """Place and build the untimed ones of `plans` on the workers; the driver times them afterwards, alone."""
        todo = {flat_plan_hash(p): p for p in plans if f"lat:{flat_plan_hash(p)}" not in self.cache}
        if self.p.prepare_many is not None and self.p.parallel > 1 and len(todo) > 1:
            self.p.prepare_many(list(todo.values()))

    def finish(self, status: str) -> SearchResult:
        self.bar.close()
        best = self.pick_fastest() if status == "passed" else None
        return SearchResult(status, best, self.trace, self.plans, self.full_evals, self.cache.hits, self.computed,
                            len(self.speculated))


def search(problem: SearchProblem, cache: EvalCache, progress: bool = True) -> SearchResult:
    return _Search(problem, cache, progress).run()
