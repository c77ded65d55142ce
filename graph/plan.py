"""Precision plans: a readable JSON file mapping each quantizable node to int8, fp16 or fp32.

    {"format": "wb-precision-plan/1",
     "model": {"sha256": <structure fingerprint, see graph.analysis.structure_fingerprint>, "quantizable": n},
     "default": "int8",
     "nodes": {node_id: "int8" | "fp16" | "fp32", ...},     # every quantizable node, resolved
     "options": {"residual_add": true, ...},
     "hash": sha256 of the canonical JSON of {model sha256, resolved node precisions, placement options}}

The model hash is a *structure* fingerprint (node ids, ops, kinds, weight shapes, opset), not a file hash:
a plan stays valid across re-export and re-training of one architecture, and a plan for another model
(encoder vs decoder, tiny vs small) is refused.  Nodes absent from "nodes" take "default".
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Iterable

from core.errors import WorkbenchError
from core.fsutil import read_json, write_json

from .analysis import Analysis

PLAN_FORMAT = "wb-precision-plan/1"
PRECISIONS = ("int8", "fp16", "fp32")
DEFAULT_OPTIONS = {
    # quantize the residual input of skip-connection Adds fed by an int8 GEMM/Conv (TensorRT fuses them)
    "residual_add": True,
    # keep FP32 any tensor whose calibrated |max| exceeds this in an FP16 graph (FP16 max is 65504)
    "fp16_overflow_threshold": 32768.0,
}


def _check_precision(p: str, where: str) -> str:
    if not isinstance(p, str) or p not in PRECISIONS:
        raise WorkbenchError(f"{where}: precision {p!r} is not one of {', '.join(PRECISIONS)}")
    return p


def resolved_nodes(plan: dict) -> dict[str, str]:
    return dict(plan["nodes"])


def plan_hash(plan: dict) -> str:
    """sha256 of everything in the plan that changes the placed graph: the model, each node's precision and the
    placement options (DEFAULT_OPTIONS' keys; the other stored options only record how the nodes were chosen)."""
    options = dict(DEFAULT_OPTIONS) | {k: v for k, v in (plan.get("options") or {}).items() if k in DEFAULT_OPTIONS}
    blob = json.dumps({"model": plan["model"]["sha256"], "nodes": resolved_nodes(plan), "options": options},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _finish(plan: dict) -> dict:
    plan["hash"] = plan_hash(plan)
    return plan


def create_plan(analysis: Analysis, default: str = "int8", *, exclude_first_conv: bool = False,
                act_matmul: str | None = "fp32", exclude: Iterable[str] = (), **options) -> dict:
    """Default plan: every quantizable node at `default`.

    exclude_first_conv: the first Conv in graph order (the subsampling input conv, whose input is raw
      features) gets fp32 (or `default` if that is fp16).
    act_matmul: precision of activation-activation MatMuls (attention QKᵀ, AV) when `default` is int8;
      "fp32" by default because per-tensor INT8 on softmax probabilities is coarse.  None: same as default.
    exclude: regexes of node ids to keep out of int8 (they get fp32, or fp16 for an fp16 default).
    options: stored in the plan ("residual_add", "fp16_overflow_threshold")."""
    _check_precision(default, "default plan")
    if act_matmul is not None:
        _check_precision(act_matmul, "act_matmul")
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise WorkbenchError(f"unknown plan option(s): {', '.join(sorted(unknown))}")
    fallback = "fp16" if default == "fp16" else "fp32"
    nodes = {}
    for q in analysis.quantizable:
        p = default
        if q.kind == "act_matmul" and default == "int8" and act_matmul is not None:
            p = act_matmul
        nodes[q.id] = p
    if exclude_first_conv:
        first = next((q for q in analysis.quantizable if q.kind in ("conv", "depthwise_conv")), None)
        if first is not None:
            nodes[first.id] = fallback
    pats = [re.compile(x) for x in exclude]
    for nid in nodes:
        if any(r.search(nid) for r in pats):
            nodes[nid] = fallback
    opts = dict(DEFAULT_OPTIONS) | options | {"exclude_first_conv": exclude_first_conv,
                                              "act_matmul": act_matmul, "exclude": list(exclude)}
    return _finish({"format": PLAN_FORMAT,
                    "model": {"sha256": analysis.fingerprint, "quantizable": len(analysis.quantizable)},
                    "default": default, "nodes": nodes, "options": opts})


def edit_plan(plan: dict, set_nodes: dict[str, str] | None = None, *, pattern: str | None = None,
              precision: str | None = None) -> dict:
    """A new plan with `set_nodes` ({id: precision}) applied and/or every node whose id matches the regex
    `pattern` set to `precision`.  An unknown id or a regex matching nothing is an error."""
    plan = copy.deepcopy(plan)
    for nid, p in (set_nodes or {}).items():
        if nid not in plan["nodes"]:
            raise WorkbenchError(f"plan has no node {nid!r}")
        plan["nodes"][nid] = _check_precision(p, f"node {nid!r}")
    if pattern is not None:
        if precision is None:
            raise WorkbenchError("edit_plan: a pattern needs a precision")
        _check_precision(precision, f"pattern {pattern!r}")
        rx = re.compile(pattern)
        hit = [n for n in plan["nodes"] if rx.search(n)]
        if not hit:
            raise WorkbenchError(f"pattern {pattern!r} matches no node of the plan")
        for n in hit:
            plan["nodes"][n] = precision
    return _finish(plan)


def diff_plans(a: dict, b: dict) -> dict:
    """{"changed": {id: [a, b]}, "only_a": [...], "only_b": [...], "same_model": bool}."""
    na, nb = resolved_nodes(a), resolved_nodes(b)
    return {"same_model": a["model"]["sha256"] == b["model"]["sha256"],
            "changed": {k: [na[k], nb[k]] for k in sorted(set(na) & set(nb)) if na[k] != nb[k]},
            "only_a": sorted(set(na) - set(nb)), "only_b": sorted(set(nb) - set(na))}


def counts(plan: dict) -> dict[str, int]:
    out = {p: 0 for p in PRECISIONS}
    for p in plan["nodes"].values():
        out[p] += 1
    return out


def validate_plan(plan: dict, analysis: Analysis | None = None, source: str = "plan",
                  node_ops: dict[str, str] | None = None) -> dict:
    """Check the plan's format and, with an analysis, that it belongs to that model.  Fills nodes absent
    from "nodes" with "default" and returns the (normalised) plan."""
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise WorkbenchError(f"{source} is not a {PLAN_FORMAT} file")
    for key in ("model", "default", "nodes"):
        if key not in plan:
            raise WorkbenchError(f"{source} lacks {key!r}")
    for key, what in (("model", "an object"), ("nodes", "an object {node id: precision}")):
        if not isinstance(plan[key], dict):
            raise WorkbenchError(f"{source}: {key!r} must be {what}, got {json.dumps(plan[key])[:60]}")
    if not isinstance(plan.get("options") or {}, dict):
        raise WorkbenchError(f"{source}: 'options' must be an object, got {json.dumps(plan['options'])[:60]}")
    plan = copy.deepcopy(plan)
    _check_precision(plan["default"], f"{source} default")
    for nid, p in plan["nodes"].items():
        _check_precision(p, f"{source} node {nid!r}")
    plan["options"] = dict(DEFAULT_OPTIONS) | (plan.get("options") or {})
    if analysis is not None:
        if plan["model"].get("sha256") != analysis.fingerprint:
            raise WorkbenchError(f"{source} was made for another model (model sha256 "
                                 f"{str(plan['model'].get('sha256'))[:12]}…, this model's is "
                                 f"{analysis.fingerprint[:12]}…)")
        ids = set(analysis.ids)
        unknown = [n for n in plan["nodes"] if n not in ids]
        if unknown and node_ops and unknown[0] in node_ops:
            raise WorkbenchError(f"{source} names node {unknown[0]!r}, a {node_ops[unknown[0]]}: not a supported "
                                 f"quantizable op (Conv, ConvTranspose, MatMul, Gemm with a constant weight, "
                                 f"or MatMul of two activations)")
        if unknown:
            raise WorkbenchError(f"{source} names node {unknown[0]!r} which is not a quantizable node of the "
                                 f"model" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
        plan["nodes"] = {q: plan["nodes"].get(q, plan["default"]) for q in analysis.ids}
    return _finish(plan)


def save_plan(plan: dict, path: str | Path) -> None:
    write_json(path, _finish(copy.deepcopy(plan)))


def load_plan(path: str | Path, analysis: Analysis | None = None) -> dict:
    return validate_plan(read_json(path), analysis, source=f"plan {path}")
