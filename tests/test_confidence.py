"""Issue 18: evaluation sets, the point and bound criterion modes, the confirmation split (a planted case where
the search's choice fails confirmation and the next option is confirmed), the report's per-set rows and the
WeNet task's voice partition."""
import copy

import numpy as np
import pytest

from core.errors import WorkbenchError
from evaluation.bootstrap import paired_delta_ci
from pipeline.baselines import confirmation_criterion, criterion_of, passes_of, verdicts
from pipeline.config import load_config
from tasks.base import ALL, Metric


class SetTask:  # the part of a task that criterion_of reads
    name, check_name = "sets", ""

    def __init__(self, higher=False, sets=("a", "b")):
        self.metrics = [Metric("m", higher)]
        self.eval_sets = sets

    def metric(self, name):
        return self.metrics[0]


def cfg_of(**crit):
    cfg = {"criterion": {"metric": "m", "kind": "absolute", "delta": 0.01, "mode": "point", "sets": "each",
                         "weights": {}}}
    cfg["criterion"].update(crit)
    return cfg


def record(flat, a, b, ci=None):
    acc = {"m": flat, "sets": {"a": {"m": a}, "b": {"m": b}}}
    if ci:
        acc["intervals"] = {n: {"metric": "m", "delta": d, "low": lo, "high": hi} for n, (d, lo, hi) in ci.items()}
    return acc


FP32 = record(0.10, 0.08, 0.12)


def test_point_each_judges_every_set_against_its_own_threshold():
    crit = criterion_of(cfg_of(), SetTask(), FP32)
    assert crit["set_rules"]["a"]["threshold"] == pytest.approx(0.09)
    assert crit["set_rules"]["b"]["threshold"] == pytest.approx(0.13)
    ok = passes_of(crit)
    assert ok(record(0.105, 0.089, 0.121))
    # the pooled value passes, set a does not: "each" fails it
    assert not ok(record(0.105, 0.095, 0.115))
    assert verdicts(crit, record(0.105, 0.095, 0.115)) == {"a": False, "b": True}


def test_weighted_judges_the_weighted_mean():
    crit = criterion_of(cfg_of(sets="weighted", weights={"a": 3, "b": 1}), SetTask(), FP32)
    assert crit["weighted"]["reference"] == pytest.approx((3 * 0.08 + 0.12) / 4)
    ok = passes_of(crit)
    # a +0.012 (fails alone), b -0.01: weighted change (3*0.012 - 0.01)/4 = 0.0065 <= 0.01
    assert ok(record(0.1, 0.092, 0.11)) and verdicts(crit, record(0.1, 0.092, 0.11)) == {"weighted": True}
    assert not ok(record(0.1, 0.095, 0.12))  # (3*0.015)/4 = 0.01125 > 0.01
    with pytest.raises(WorkbenchError, match="weights"):
        criterion_of(cfg_of(sets="weighted", weights={"c": 1}), SetTask(), FP32)


def test_bound_mode_judges_the_bad_side_of_the_interval_lower_is_better():
    crit = criterion_of(cfg_of(mode="bound"), SetTask(), FP32)
    ok = passes_of(crit)
    # point changes +0.005 pass in point mode; the upper bounds decide in bound mode
    good = record(0.105, 0.085, 0.125, ci={"a": (0.005, -0.002, 0.009), "b": (0.005, 0.0, 0.01)})
    wide = record(0.105, 0.085, 0.125, ci={"a": (0.005, -0.002, 0.013), "b": (0.005, 0.0, 0.01)})
    assert ok(good) and not ok(wide)
    assert passes_of(criterion_of(cfg_of(), SetTask(), FP32))(wide)  # point mode: both pass
    with pytest.raises(WorkbenchError, match="bound"):
        ok(record(0.105, 0.085, 0.125))  # no intervals: one clear error, not a silent pass


def test_bound_mode_higher_is_better_uses_the_low_end():
    fp32 = record(0.95, 0.96, 0.94)
    crit = criterion_of(cfg_of(mode="bound", delta=0.02), SetTask(higher=True), fp32)
    assert crit["set_rules"]["a"]["threshold"] == pytest.approx(0.94)
    ok = passes_of(crit)
    assert ok(record(0.94, 0.955, 0.935, ci={"a": (-0.005, -0.015, 0.0), "b": (-0.005, -0.019, 0.0)}))
    assert not ok(record(0.94, 0.955, 0.935, ci={"a": (-0.005, -0.025, 0.0), "b": (-0.005, -0.01, 0.0)}))
    # point mode on the same record: -0.005 on both sets passes
    assert passes_of(criterion_of(cfg_of(delta=0.02), SetTask(higher=True), fp32))(
        record(0.94, 0.955, 0.935, ci={"a": (-0.005, -0.025, 0.0), "b": (-0.005, -0.01, 0.0)}))


def test_one_set_task_and_confirmation_criterion():
    crit = criterion_of(cfg_of(), SetTask(sets=()), 0.1)
    assert crit["set_rules"] == {} and passes_of(crit)({"m": 0.11}) and not passes_of(crit)({"m": 0.111})
    bound = criterion_of(cfg_of(mode="bound"), SetTask(sets=()), 0.1)
    assert passes_of(bound)({"m": 0.105, "intervals": {ALL: {"metric": "m", "delta": 0.005, "low": 0, "high": 0.009}}})
    conf = confirmation_criterion(criterion_of(cfg_of(), SetTask(), FP32), 0.2)
    assert conf["threshold"] == pytest.approx(0.21) and conf["set_rules"] == {}
    assert verdicts(conf, {"m": 0.2}) == {ALL: True}


def test_config_keys_for_sets_confirmation_and_mode(tmp_path):
    cfg = load_config()
    assert cfg["criterion"]["mode"] == "point" and cfg["criterion"]["sets"] == "each"
    assert cfg["data"]["confirm_utts"] == 250 and cfg["budget"]["max_confirmations"] == 3
    assert len(cfg["data"]["eval_sets"]) == 2
    from pipeline.config import CONFIG_DIR
    assert load_config(CONFIG_DIR / "quick.toml")["data"]["confirm_utts"] == 50
    bad = tmp_path / "bad.toml"
    bad.write_text('[criterion]\nmode = "interval"\n')
    with pytest.raises(WorkbenchError, match="criterion.mode"):
        load_config(bad)
    bad.write_text('[data]\neval_sets = ["a: m4 f3", "b: f3"]\n')
    with pytest.raises(WorkbenchError, match="named twice"):
        load_config(bad)
    bad.write_text('[criterion]\nkind = "hackathon"\nmode = "bound"\n')
    with pytest.raises(WorkbenchError, match="bound"):
        load_config(bad)


# --- the planted confirmation case -----------------------------------------------------------------------------
class PlantedTask:
    """Confirmation set "conf": per-item errors planted per model file name; A (the fastest) fails it."""
    name, check_name, confirm_set, eval_sets = "planted", "", "conf", ("a", "b")
    metrics = [Metric("m", False)]
    ERR = {"fp32": 0.0, "A": 0.5, "B": 0.004, "C": 0.0}

    def metric(self, name):
        return self.metrics[0]

    def fingerprint(self):
        return {}

    def delta_interval(self, items, reference):
        return {"metric": "m", **paired_delta_ci(items, reference)}


class PlantedWorkspace:
    from pipeline.workspace import Workspace

    intervals = Workspace.intervals

    def __init__(self, fp32, task):
        self.fp32, self.task, self.reference_items, self.calls = fp32, task, None, []

    def measure(self, models, which):
        name = models["g"].stem
        self.calls.append(name)
        rng = np.random.default_rng(0)
        base = rng.uniform(0, 0.01, 40)
        items = list(base + PlantedTask.ERR[name])
        return {"conf": ({"m": float(np.mean(items))}, items)}


class DictCache:
    def __init__(self):
        self.entries = {}

    def get_or_compute(self, key, fn):
        if key not in self.entries:
            self.entries[key] = fn()
        return self.entries[key]


def test_planted_confirmation_failure_confirms_the_next_option(tmp_path):
    from pipeline.confirmation import confirm_stage
    from pipeline.selection import select

    models = {}
    for name in ("fp32", "A", "B", "C"):
        (tmp_path / f"{name}.onnx").write_bytes(name.encode())
        models[name] = {"g": tmp_path / f"{name}.onnx"}
    task = PlantedTask()
    cfg = load_config()
    ws = PlantedWorkspace(models["fp32"], task)

    class Exp:
        pass

    exp = Exp()
    exp.task, exp.ws, exp.cfg, exp.cache = task, ws, cfg, DictCache()
    fp32_acc = record(0.1, 0.09, 0.11)
    crit = criterion_of(cfg_of(), SetTask(), fp32_acc)
    # every option passes the search sets; A is the fastest, then B, then C
    ms = {"A": 5.0, "B": 7.0, "C": 9.0, "FP32": 10.0}
    options = [(label, models[label], {f"g:n{i}": "int8" if j > i else "fp32" for j in range(3)},
                {"accuracy": record(0.1, 0.09, 0.11), "latency": {"objective_ms": ms[label]}}, "max")
               for i, label in enumerate("ABC")]

    def side_by_side(timed):
        return {label: {"objective_ms": ms[label], "cases": [{"model": "g", "bs": 1, "sl": 1, "median_ms": ms[label],
                                                               "latencies_ms": [ms[label]] * 5}]} for label in timed}

    def choose(exclude):
        picked = select(options, lambda r: r["accuracy"]["m"], exp.cache, side_by_side, models["fp32"], 0.05, 6,
                        exclude=exclude)
        if picked is None:
            return None, None, None
        (label, mdl, flat, rec, _), _, timing = picked
        return {"label": "selected mix", "source": label, "plan_hash": label, "accuracy": rec["accuracy"]}, timing, mdl

    baselines = [{"label": "FP32", "accuracy": fp32_acc}]
    selected, timing, conf = confirm_stage(exp, crit, baselines, {"FP32": (models["fp32"], {})}, choose)
    assert [a["label"] for a in conf["attempts"]] == ["A", "B"]
    assert conf["attempts"][0]["confirmation"]["passed"] is False
    assert conf["attempts"][1]["confirmation"]["passed"] is True
    assert conf["confirmed"] == "B" and selected["source"] == "B"
    ci = selected["confirmation"]["ci"]
    assert ci["delta"] == pytest.approx(0.004) and ci["low"] <= 0.004 <= ci["high"]
    assert baselines[0]["confirmation"]["passed"] is True and "ci" not in baselines[0]["confirmation"]
    assert conf["criterion"]["threshold"] == pytest.approx(np.mean(np.random.default_rng(0).uniform(0, 0.01, 40)) + 0.01)

    # a budget of one: the failing choice is reported as such and nothing is confirmed
    exp.cfg = copy.deepcopy(cfg)
    exp.cfg["budget"]["max_confirmations"] = 1
    selected, _, conf = confirm_stage(exp, crit, [{"label": "FP32", "accuracy": fp32_acc}],
                                      {"FP32": (models["fp32"], {})}, choose)
    assert conf["confirmed"] is None and selected["source"] == "A"
    assert selected["confirmation"]["passed"] is False
    # bound mode: B's interval [~+0.003, ~+0.005] is within delta 0.01 as well
    crit_b = criterion_of(cfg_of(mode="bound"), SetTask(), fp32_acc)
    exp.cfg = cfg
    selected, _, conf = confirm_stage(exp, crit_b, [], {}, choose)
    assert conf["confirmed"] == "B"


# --- WeNet: the voice partition ---------------------------------------------------------------------------------
def test_wenet_sets_partition_by_voice_and_pool_to_the_flat_cer():
    from evaluation.metrics import cer
    from tasks.wenet_asr import parse_eval_sets, partition_by_voice, set_results

    sets = parse_eval_sets(["test-a: m4 f3 klatt3", "test-b: Annie travis quincy"])
    voices = ["espeak-ng:en-us+Annie", "espeak-ng:en-gb+m4", "espeak-ng:en-029+klatt3", "espeak-ng:en-us+quincy",
              "espeak-ng:en-gb-x-rp+f3", "espeak-ng:en-us+travis"]
    idx = partition_by_voice(voices, sets)
    assert idx == {"test-a": [1, 2, 4], "test-b": [0, 3, 5]}
    texts = ["the cat sat", "on the mat", "a dog barked", "hello world", "quantise me", "fine numbers"]
    hyps = [{"ctc_greedy": t[:-1], "ctc_prefix": t, "rescored": t.replace("a", "o")} for t in texts]
    res = set_results(texts, hyps, idx)
    assert res["all"][0]["cer_rescore"] == pytest.approx(cer(texts, [h["rescored"] for h in hyps])["cer"])
    edits = sum(sum(res[n][1]["edits"]) for n in idx)
    chars = sum(sum(res[n][1]["ref_len"]) for n in idx)
    assert edits / chars == pytest.approx(res["all"][0]["cer_rescore"])  # the sets pool to the flat CER
    assert sorted(i for v in idx.values() for i in v) == list(range(len(voices)))
    with pytest.raises(WorkbenchError, match="in no set"):
        partition_by_voice(voices + ["espeak-ng:en-us+m1"], sets)
    with pytest.raises(WorkbenchError, match="name"):
        parse_eval_sets(["all: m4"])
