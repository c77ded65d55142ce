"""Stage: confirmation. After the selection on the search sets, the selected mix and the baselines are measured
on the task's confirmation set (task.confirm_set), which nothing else reads: accuracy only (no re-timing), with
the paired bootstrap interval of the change against FP32 and the run's criterion with FP32's value on that set.

A selected mix that fails confirmation is recorded as such, and the next passing option by the selection's own
order (pipeline.selection.select with the rejected ones excluded) is confirmed instead, up to
`[budget] max_confirmations` attempts. Without a confirmation set the stage is the selection alone.
"""
from __future__ import annotations

from typing import Callable

from pipeline.baselines import baseline_key, confirmation_criterion, verdicts
from tasks.base import ALL


def confirm_stage(exp, crit: dict, baselines: list[dict], models_of_label: dict,
                  select: Callable[[set], tuple]) -> tuple[dict | None, dict | None, dict | None]:
    """(selected record, side-by-side timing, run.json's "confirmation" record or None without a confirmation
    set). `select(excluded labels)` -> (selected record, timing, models) or (None, None, None)."""
    task, ws = exp.task, exp.ws
    name = task.confirm_set
    if not name:
        selected, timing, _ = select(set())
        return selected, timing, None

    def measure(models: dict) -> dict:  # cached by the models' content, like a baseline record
        key = baseline_key(exp.cfg, models, ws.fp32, task.fingerprint()) + f":confirm:{name}"

        def compute():
            metrics, items = ws.measure(models, [name])[name]
            return {"accuracy": metrics, "items": items}

        return exp.cache.get_or_compute(key, compute)

    fp32 = measure(ws.fp32)
    reference = {ALL: fp32["items"]} if fp32.get("items") is not None else None
    ccrit = confirmation_criterion(crit, fp32["accuracy"][crit["metric"]])

    def judge(part: dict, is_fp32: bool = False) -> dict:
        acc = dict(part["accuracy"])
        rec = {"set": name, "accuracy": acc}
        ivs = {} if is_fp32 or part.get("items") is None else ws.intervals({ALL: part["items"]}, reference)
        if ivs:
            rec["ci"] = ivs[ALL]
        if crit["kind"] == "hackathon":
            rec["passed"] = None  # an output check against FP32: nothing on the confirmation data to judge
        else:
            judged = {**ccrit, "mode": "point"} if is_fp32 else ccrit
            rec["passed"] = all(verdicts(judged, {**acc, "intervals": ivs}).values())
        return rec

    for b in baselines:
        if "accuracy" in b and b["label"] in models_of_label:
            models = models_of_label[b["label"]][0]
            b["confirmation"] = judge(fp32 if models == ws.fp32 else measure(models), is_fp32=models == ws.fp32)
    budget = int(exp.cfg["budget"]["max_confirmations"])
    attempts: list[dict] = []
    rejected: set[str] = set()
    selected = timing = None
    while len(attempts) < budget:
        sel, tim, models = select(rejected)
        if sel is None:
            break
        conf = judge(measure(models))
        sel["confirmation"] = conf
        attempts.append({"label": sel["source"], "plan_hash": sel["plan_hash"], "accuracy": sel["accuracy"],
                         "confirmation": conf})
        selected, timing = sel, tim
        if conf["passed"] is not False:
            break
        rejected.add(sel["source"])
    confirmed = selected["source"] if selected and selected["confirmation"]["passed"] is not False else None
    record = {"set": name, "criterion": ccrit, "max_confirmations": budget, "attempts": attempts,
              "confirmed": confirmed,
              "note": "accuracy on a set the search and the selection never read; the run's criterion with FP32's "
                      "value on it; a mix that fails is rejected and the next passing option by the selection's "
                      "order is confirmed instead, within max_confirmations"}
    return selected, timing, record
