"""Experiment configuration: TOML files layered over pipeline/configs/default.toml, validated. The defaults ship
as package data, so a non-editable install finds them."""
from __future__ import annotations

import copy
import os
import tomllib
from pathlib import Path

from graph.placement import ORT_MODES, resolve_ort_mode
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
    ("backend", "name"): {"auto", "onnxruntime", "tensorrt"},
    ("criterion", "kind"): {"absolute", "relative", "hackathon", "fixed"},
    ("task", "kind"): {"wenet_asr", "onnx"},
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
                raise WorkbenchError(f"config key {where}{key!r} must be a table")
            # an empty table in the defaults is free-form (task.options): taken as given
            out[key] = copy.deepcopy(value) if not base[key] else _merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


def load_config(*paths: str | Path) -> dict:
    """default.toml, then each of `paths` on top (later wins). Unknown keys and bad values are errors."""
    cfg = _read(DEFAULT_CONFIG)
    for p in paths:
        cfg = _merge(cfg, _read(Path(p)), "")
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
    if not isinstance(cfg["criterion"]["delta"], (int, float)) or isinstance(cfg["criterion"]["delta"], bool):
        raise WorkbenchError(f"config criterion.delta must be a number, got {cfg['criterion']['delta']!r}")
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

        check_qat_dir(cfg["qat"]["dir"])
    for key in ("calib_utts", "eval_utts", "ranking_utts"):
        if int(cfg["data"][key]) < 1:
            raise WorkbenchError(f"config data.{key} must be at least 1")
    if cfg["budget"]["max_full_evals"] < 2:
        raise WorkbenchError("config budget.max_full_evals must be at least 2 (all-INT8 and the fallback plan)")
    return cfg


def is_wenet(cfg: dict) -> bool:
    """Whether the config runs the bundled WeNet pipeline (pipeline.wenet) rather than a task (pipeline/)."""
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
    return cfg


def criterion_threshold(cfg: dict, reference: float) -> dict:
    """The pass rule as data: metric <= threshold (absolute or relative to the FP32 reference)."""
    c = cfg["criterion"]
    if c["kind"] == "absolute":
        thr, text = reference + c["delta"], f"{c['metric']} <= FP32 {c['metric']} + {c['delta']:g} (absolute)"
    elif c["kind"] == "relative":
        thr, text = reference * (1 + c["delta"]), f"{c['metric']} <= FP32 {c['metric']} x (1 + {c['delta']:g})"
    else:
        thr, text = None, "every case of the hackathon output check passes"
    return {"metric": c["metric"], "kind": c["kind"], "delta": c["delta"], "reference": reference,
            "threshold": thr, "text": text}
