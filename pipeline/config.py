"""Experiment configuration: TOML files layered over pipeline/configs/default.toml, validated. The defaults ship
as package data, so a non-editable install finds them."""
from __future__ import annotations

import copy
import math
import os
import tomllib
from pathlib import Path

from graph.placement import ORT_FLOAT_OUTPUTS, ORT_MODES, check_per_token, resolve_ort_mode
from core.errors import WorkbenchError

from quant.methods import METHODS

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.toml"


def default_runs_root() -> Path:
    """Where runs go: $WB_RUNS_ROOT, else experiments/runs in the repository."""
    env = os.environ.get("WB_RUNS_ROOT")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "experiments" / "runs"

_CHOICES = {
    ("quantize", "recipe"): {"auto", "onnxruntime", "tensorrt"},
    ("quantize", "fallback"): {"fp32", "fp16"},
    ("quantize", "ort_mode"): {"auto", *ORT_MODES},
    ("quantize", "ort_float_outputs"): set(ORT_FLOAT_OUTPUTS),
    ("calibration", "smoothquant"): {"none", "layernorm", "all"},
    ("backend", "name"): {"auto", "onnxruntime", "tensorrt"},
    ("criterion", "kind"): {"absolute", "relative", "hackathon", "fixed"},
    ("criterion", "mode"): {"point", "bound"},
    ("criterion", "sets"): {"each", "weighted"},
    ("task", "kind"): {"wenet_asr", "onnx", "sentence_embedding"},
    ("distributed", "engine"): {"serial", "ray"},
}
# The bundled pipeline's metrics; a task's own metrics are checked against the task (tasks.base.Task.metric).
WENET_METRICS = {"cer_rescore", "cer_greedy", "cer_prefix", "wer_rescore"}
_METHODS = {*METHODS, "qat"}  # "qat": the ranges and weights of a `wb qat` directory


def _read(path: Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise WorkbenchError(f"experiment config not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise WorkbenchError(f"{path} is not valid TOML: {exc}") from None


def _merge(base: dict, over: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key not in base:
            raise WorkbenchError(f"unknown config key {where}{key!r} (known: {sorted(base)})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise WorkbenchError(f"config {where}{key} must be a table, got {_kind(value)} {value!r}")
            # an empty table in the defaults is free-form (task.options): taken as given
            out[key] = copy.deepcopy(value) if not base[key] else _merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


# Ranges, checked after the types (which come from default.toml's values, see _check_types): (low, low
# inclusive, high, high inclusive); None = unbounded. Lists of numbers: every element.
_RANGES = {
    ("model", "opset"): (13, True, None, None),
    ("data", "calib_utts"): (1, True, None, None),
    ("data", "eval_utts"): (1, True, None, None),
    ("data", "ranking_utts"): (1, True, None, None),
    ("data", "confirm_utts"): (0, True, None, None),
    ("budget", "max_confirmations"): (1, True, None, None),
    ("calibration", "percentile"): (0, False, 100, False),
    ("calibration", "smoothquant_alpha"): (0, True, 1, True),
    ("calibration", "batch_size"): (1, True, None, None),
    ("backend", "threads"): (1, True, None, None),
    ("latency", "batch_sizes"): (1, True, None, None),
    ("latency", "seq_lens"): (1, True, None, None),
    ("latency", "warmup"): (0, True, None, None),
    ("latency", "iters"): (1, True, None, None),
    ("latency", "search_warmup"): (0, True, None, None),
    ("latency", "search_iters"): (1, True, None, None),
    ("latency", "tie_tolerance"): (0, True, None, None),
    ("distributed", "max_parallel"): (0, True, None, None),
}
_NONEMPTY_LISTS = {("calibration", "methods"), ("latency", "batch_sizes"), ("latency", "seq_lens"),
                   ("latency", "models")}
_LIST_ELEMENT = {("task", "graphs"): dict}  # an empty default list says nothing about its elements


def _kind(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a table",
            list: "a list"}.get(type(value), type(value).__name__)


def _type_ok(value, like) -> bool:
    """`value` has the type of the default `like`: bool is bool, int is int (not bool or float), float takes
    int too (not bool, and finite), str is str."""
    if isinstance(like, bool):
        return isinstance(value, bool)
    if isinstance(like, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(like, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, type(like))


def _check_types(cfg: dict, default: dict, where: str = "") -> None:
    for key, like in default.items():
        name, value = f"{where}{key}", cfg[key]
        if isinstance(like, dict):
            if not isinstance(value, dict):
                raise WorkbenchError(f"config {name} must be a table, got {value!r}")
            if like:  # an empty default table (task.options) is free-form
                _check_types(value, like, f"{name}.")
        elif isinstance(like, list):
            if not isinstance(value, list):
                hint = f" (e.g. [{value!r}])" if isinstance(value, str) else ""
                raise WorkbenchError(f"config {name} must be a list, got {_kind(value)} {value!r}{hint}")
            elem = _LIST_ELEMENT.get(tuple(name.split(".")), like[0] if like else None)
            for i, v in enumerate(value):
                ok = isinstance(v, elem) if isinstance(elem, type) else elem is None or _type_ok(v, elem)
                if not ok:
                    want = _kind(elem() if isinstance(elem, type) else elem)
                    raise WorkbenchError(f"config {name}[{i}] must be {want}, got {_kind(v)} {v!r}")
        elif not _type_ok(value, like):
            extra = " (finite)" if isinstance(like, float) and isinstance(value, float) else ""
            raise WorkbenchError(f"config {name} must be {_kind(like)}{extra}, got {_kind(value)} {value!r}")


def _check_ranges(cfg: dict) -> None:
    for (section, key) in sorted(_NONEMPTY_LISTS):
        if not cfg[section][key]:
            raise WorkbenchError(f"config {section}.{key} must not be empty")
    for (section, key), (lo, lo_inc, hi, hi_inc) in _RANGES.items():
        value = cfg[section][key]
        for v in value if isinstance(value, list) else [value]:
            bad = (lo is not None and (v < lo if lo_inc else v <= lo)) or \
                  (hi is not None and (v > hi if hi_inc else v >= hi))
            if bad:
                rule = " and ".join(r for r in (
                    lo is not None and f"{'>=' if lo_inc else '>'} {lo}", hi is not None and f"{'<=' if hi_inc else '<'} {hi}") if r)
                raise WorkbenchError(f"config {section}.{key} must be {rule}, got {value!r}")


def load_config(*paths: str | Path) -> dict:
    """default.toml, then each of `paths` on top (later wins). Unknown keys and values of the wrong type or
    out of range are errors, raised before any work."""
    default = _read(DEFAULT_CONFIG)
    cfg = default
    for p in paths:
        cfg = _merge(cfg, _read(Path(p)), "")
    _check_types(cfg, default)
    _check_ranges(cfg)
    for (section, key), allowed in _CHOICES.items():
        if cfg[section][key] not in allowed:
            raise WorkbenchError(f"config {section}.{key} = {cfg[section][key]!r}; choose one of {sorted(allowed)}")
    if is_wenet(cfg):
        if cfg["criterion"]["metric"] not in WENET_METRICS:
            raise WorkbenchError(f"config criterion.metric = {cfg['criterion']['metric']!r}; choose one of "
                                 f"{sorted(WENET_METRICS)}")
        if cfg["criterion"]["kind"] == "fixed":
            raise WorkbenchError("config criterion.kind = \"fixed\" is for tasks; the bundled pipeline takes absolute, "
                                 "relative or hackathon")
    elif cfg["criterion"]["kind"] == "hackathon":
        raise WorkbenchError("config criterion.kind = \"hackathon\" is the bundled WeNet pipeline's; a task takes "
                             "absolute, relative or fixed")
    if cfg["criterion"]["kind"] in ("absolute", "relative") and cfg["criterion"]["delta"] < 0:
        raise WorkbenchError(f"config criterion.delta must be >= 0 for criterion.kind = "
                             f"{cfg['criterion']['kind']!r}, got {cfg['criterion']['delta']!r}")
    bad = set(cfg["calibration"]["methods"]) - _METHODS
    if bad or not cfg["calibration"]["methods"]:
        raise WorkbenchError(f"config calibration.methods: unknown {sorted(bad)}; choose from {sorted(_METHODS)}")
    if cfg["qat"]["dir"] and "qat" not in cfg["calibration"]["methods"]:
        cfg["calibration"]["methods"] = [*cfg["calibration"]["methods"], "qat"]  # a QAT directory joins the run
    if "qat" in cfg["calibration"]["methods"]:
        if not cfg["qat"]["dir"]:
            raise WorkbenchError("config calibration.methods has \"qat\" but qat.dir is empty (a directory "
                                 "written by `wb qat`)")
        from quant.qat_run import check_qat_dir

        if is_wenet(cfg):
            check_qat_dir(cfg["qat"]["dir"])
        # a task's QAT directory (`wb qat --config`) is checked against the task's model by tasks.load_task
    m = cfg["model"]
    if bool(m["encoder"]) != bool(m["decoder"]):
        raise WorkbenchError("config model.encoder and model.decoder name a WeNet export's two graphs: give both")
    if m["encoder"]:
        if m["weights"] or "qat" in cfg["calibration"]["methods"]:
            raise WorkbenchError("config model.encoder/decoder (an ONNX export) cannot go with model.weights or QAT "
                                 "(both need the workbench's own PyTorch model)")
        for key in ("encoder", "decoder"):
            if not Path(m[key]).is_file():
                raise WorkbenchError(f"config model.{key} = {m[key]!r}: no such ONNX file")
    check_per_token(cfg["quantize"]["ort_per_token_inputs"], cfg["quantize"]["ort_float_outputs"])
    bad = set(cfg["quantize"]["extra_recipes"]) - {"onnxruntime", "tensorrt"}
    if bad:
        raise WorkbenchError(f"config quantize.extra_recipes: unknown {sorted(bad)}; choose from onnxruntime, tensorrt")
    _check_distributed(cfg["distributed"])
    if cfg["criterion"]["mode"] == "bound" and cfg["criterion"]["kind"] == "hackathon":
        raise WorkbenchError("config criterion.mode = \"bound\" judges a metric's interval; criterion.kind = "
                             "\"hackathon\" has none (use mode = \"point\")")
    if is_wenet(cfg):
        from tasks.wenet_asr import parse_eval_sets

        parse_eval_sets(cfg["data"]["eval_sets"])  # one line per mistake, before any work
    if cfg["budget"]["max_full_evals"] < 2:
        raise WorkbenchError("config budget.max_full_evals must be at least 2 (all-INT8 and the fallback plan)")
    return cfg


def _check_distributed(d: dict) -> None:
    """[distributed]: the address's form, and Ray installed when asked for (before any work)."""
    a = d["address"]
    if a not in ("local", "auto") and not (a.startswith("ray://") and ":" in a[len("ray://"):]):
        raise WorkbenchError(f"config distributed.address = {a!r}; use \"local\", \"auto\" or \"ray://host:port\"")
    if d["engine"] == "ray":
        from search.executor import import_ray

        import_ray()


# The sections whose values the run directory's cached results (models, tables, engines, evaluations) depend
# on. A resume must keep them; criterion and budget may change (they only judge and bound the search).
RESUME_SECTIONS = ("task", "model", "data", "calibration", "qat", "quantize", "backend", "latency")
RESUME_FILE = "inputs.json"
# keys added after runs were recorded, with the value an older run (whose inputs.json lacks them) had in effect
RESUME_ADDED = {"quantize.ort_float_outputs": "none", "quantize.ort_per_token_inputs": "none",
                "calibration.smoothquant": "none", "calibration.smoothquant_alpha": 0.5}


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def check_resume(run_dir: str | Path, cfg: dict) -> None:
    """Record the result-affecting config (RESUME_SECTIONS, resolved) in a new run directory; refuse, in one line,
    to resume one that was started with other values, whose cached results would be stale."""
    import json

    from core.fsutil import write_json

    path = Path(run_dir) / RESUME_FILE
    now = json.loads(json.dumps({s: cfg[s] for s in RESUME_SECTIONS if s in cfg}))
    before = None
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except (ValueError, OSError):
            before = None  # unreadable (it is written atomically, so only by hand): recorded again below
    if isinstance(before, dict):
        a, b = _flat(before), _flat(now)
        a = RESUME_ADDED | a  # a run recorded before these keys existed had their old values in effect
        diff = [k for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]
        if diff:
            shown = "; ".join(f"{k} = {json.dumps(a.get(k, '<unset>'))} there, {json.dumps(b.get(k, '<unset>'))} now"
                              for k in diff[:3]) + (f" (and {len(diff) - 3} more)" if len(diff) > 3 else "")
            raise WorkbenchError(f"run directory {run_dir} was started with another config ({shown}): its cached "
                                 f"results would be stale; resume with that config or give a new --run-dir")
        return
    write_json(path, now)


def is_wenet(cfg: dict) -> bool:
    """Whether the config runs the bundled model's task (tasks.wenet_asr), which is made inside the run."""
    return cfg["task"]["kind"] == "wenet_asr" and not cfg["task"]["entry"]


def resolve_backend_and_recipe(cfg: dict) -> dict:
    """Settle "auto": TensorRT when usable (with TensorRT's placement), else ONNX Runtime (with its own), and
    the ONNX Runtime recipe's int8 mode for this CPU."""
    import engines

    cfg = copy.deepcopy(cfg)
    cfg["backend"]["name"] = engines.resolve_backend(cfg["backend"]["name"])
    if cfg["quantize"]["recipe"] == "auto":
        cfg["quantize"]["recipe"] = "tensorrt" if cfg["backend"]["name"] == "tensorrt" else "onnxruntime"
    cfg["quantize"]["ort_mode"] = resolve_ort_mode(cfg["quantize"]["ort_mode"])  # this CPU's, recorded in run.json
    q = cfg["quantize"]
    q["extra_recipes"] = [r for i, r in enumerate(q["extra_recipes"]) if r != q["recipe"] and r not in q["extra_recipes"][:i]]
    return cfg
