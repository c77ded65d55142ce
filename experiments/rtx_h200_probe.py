"""Item 4 of issue 20, run on the lent H200 (SM90): does a TensorRT-RTX plan built here on CPU for SM89 or SM80
deserialize there far enough for the engine inspector? Standalone (the device gets only the RTX wheels, these
plans and this script). For each plan: Runtime.get_engine_validity, deserialize_cuda_engine, and the
inspector's JSON when an engine comes back; then a build for ComputeCapability.CURRENT (the H200 itself).
Writes result.json (and <plan>.layers.json where the inspector ran) under the output directory.

  python experiments/rtx_h200_probe.py PLAN_DIR OUT_DIR     (PLAN_DIR: *.plan and block_int8.onnx)
"""
import ctypes
import json
import sys
from pathlib import Path

import tensorrt_rtx_bindings as trt


class Log(trt.ILogger):
    def __init__(self):
        super().__init__()
        self.lines = []

    def log(self, severity, msg):
        self.lines.append(f"{severity.name}: {msg}")


def gpu():
    cuda = ctypes.CDLL("libcuda.so.1")
    cuda.cuInit(0)
    dev, ma, mi, ver = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    cuda.cuDeviceGet(ctypes.byref(dev), 0)
    cuda.cuDeviceGetAttribute(ctypes.byref(ma), 75, dev)
    cuda.cuDeviceGetAttribute(ctypes.byref(mi), 76, dev)
    cuda.cuDriverGetVersion(ctypes.byref(ver))
    name = ctypes.create_string_buffer(100)
    cuda.cuDeviceGetName(name, 100, dev)
    return {"name": name.value.decode(), "compute_capability": f"{ma.value}.{mi.value}", "cuda_driver": ver.value}


def main(plan_dir: Path, out: Path) -> None:
    res = {"tensorrt_rtx": trt.__version__, "gpu": gpu(), "plans": {}}
    for plan in sorted(plan_dir.glob("*.plan")):
        log = Log()
        rt = trt.Runtime(log)
        blob = plan.read_bytes()
        row = {"bytes": len(blob)}
        try:
            validity, diag = rt.get_engine_validity(blob)
            row["validity"], row["diagnostics"] = validity.name, int(diag)
            row["diagnostics_named"] = [name for name, d in trt.EngineInvalidityDiagnostics.__members__.items()
                                        if int(diag) & int(d)]  # the members are bit flags (1, 2, 4, ...)
        except Exception as e:  # noqa: BLE001 - a result either way
            row["validity_error"] = repr(e)
        try:
            engine = rt.deserialize_cuda_engine(blob)
        except Exception as e:  # noqa: BLE001
            engine, row["deserialize_exception"] = None, repr(e)
        row["deserialized"] = engine is not None
        if engine is not None:
            row["num_layers"] = engine.num_layers
            info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
            (out / f"{plan.stem}.layers.json").write_text(info)
            row["inspector_chars"] = len(info)
            try:
                ctx = engine.create_execution_context()
                row["execution_context"] = ctx is not None
            except Exception as e:  # noqa: BLE001
                row["execution_context_exception"] = repr(e)
        row["log"] = log.lines[-12:]
        res["plans"][plan.name] = row
    log = Log()
    builder = trt.Builder(log)
    net = builder.create_network(0)
    parser = trt.OnnxParser(net, log)
    ok = parser.parse_from_file(str(plan_dir / "block_int8.onnx"))
    cfg = builder.create_builder_config()
    cfg.num_compute_capabilities = 1
    cfg.set_compute_capability(trt.ComputeCapability.CURRENT, 0)
    try:
        built = builder.build_serialized_network(net, cfg) if ok else None
        res["build_current"] = {"parsed": ok, "built": built is not None, "bytes": built.nbytes if built else 0}
    except Exception as e:  # noqa: BLE001
        res["build_current"] = {"parsed": ok, "exception": repr(e)}
    res["build_current"]["log"] = log.lines[-12:]
    (out / "result.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1)[:6000])


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
