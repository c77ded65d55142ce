"""Calibration benchmark: our one-pass calibration (all methods) vs ONNX Runtime quantize_static (Entropy) vs
ModelOpt ONNX PTQ (entropy) vs plain FP32 inference, on the trained `small` WeNet encoder, 64/256/512 utterances.

ORT and ModelOpt get every batch padded to the longest utterance of the whole set (their histogram
collectors cannot take batches of different shapes); ours and FP32 pad each batch to its own longest.
Each run is its own subprocess; wall time is measured by the parent, peak RSS is the child's own ru_maxrss
(RUSAGE_SELF, reported at its end) and, as a cross-check and for killed runs, the parent's /proc sampling
(every 0.2 s) of the child's VmRSS. A run is killed past --mem-cap-gb or --time-cap-s (recorded as capped).

    .venv/bin/python experiments/bench_calibration.py            # everything (ModelOpt from .venv-bench)
    .venv/bin/python experiments/bench_calibration.py --sizes 64 --only ours,fp32
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "experiments" / "runs" / "bench_calibration"
RESULTS = ROOT / "experiments" / "results"
BENCH_PY = ROOT / ".venv-bench" / "bin" / "python"
BATCH = 16


# ----------------------------------------------------------------------------- children
class _Split:  # the corpus split read directly (the bench venv has no kaldi-native-fbank)
    def __init__(self, directory: Path):
        import numpy as np

        self.feats = np.load(directory / "feats.npy", mmap_mode="r")
        self.offsets = np.load(directory / "offsets.npy")

    def __len__(self):
        return len(self.offsets) - 1

    def features(self, i):
        import numpy as np

        return np.array(self.feats[self.offsets[i]:self.offsets[i + 1]], dtype=np.float32)


def _feeds(n: int, batch: int = BATCH, fixed_length: bool = False):
    """Batches of `batch` utterances zero-padded to the batch's longest; with fixed_length, to the longest of all n
    (ORT's histogram collectors np.asarray the list of every batch's activations, which fails on differing shapes,
    and ModelOpt goes through the same ORT calibrators)."""
    sys.path.insert(0, str(ROOT))
    from quant.collect import encoder_feeds

    cache = Path(os.environ["WB_CACHE"]) / "corpus" if os.environ.get("WB_CACHE") else ROOT / ".cache" / "corpus"
    feeds = encoder_feeds(_Split(cache / "calib"), batch, limit=n)
    if not fixed_length:
        return feeds
    import numpy as np

    out = list(feeds)
    T = max(f["speech"].shape[1] for f in out)
    for f in out:
        s = f["speech"]
        f["speech"] = np.pad(s, ((0, 0), (0, T - s.shape[1]), (0, 0)))
    return out


class _Reader:  # onnxruntime CalibrationDataReader protocol (duck-typed so both venvs can use it)
    def __init__(self, feeds):
        self.feeds = feeds
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.feeds)

    def __len__(self):
        return len(self.feeds)

    def get_first(self):  # ModelOpt's reader interface
        return self.feeds[0]

    def set_range(self, start_index: int, end_index: int):  # ORT's base class interface
        pass


def child(mode: str, n: int, model: str, out: str) -> dict:
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    info: dict = {}
    if mode in ("ours", "ours_repeat64"):
        sys.path.insert(0, str(ROOT))
        from quant.calibrate import calibrate

        feeds = _feeds(n)
        if mode == "ours_repeat64":  # the first 64 utterances repeated to n: same batch shapes, n samples
            feeds.indices = list(range(64)) * (n // 64)
        table = calibrate(model, feeds, threads=threads, progress=False)
        table.save(out)
        info = {k: table.data["data"][k] for k in ("collect_s", "methods_s", "n_samples")}
        info["tensors"] = len(table.tensors)
    elif mode == "fp32":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        for feed in _feeds(n):
            sess.run(None, feed)
    elif mode == "ort":
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

        class Reader(_Reader, CalibrationDataReader):
            pass

        quantize_static(model, out, Reader(_feeds(n, fixed_length=True)), quant_format=QuantFormat.QDQ,
                        calibrate_method=CalibrationMethod.Entropy, per_channel=True,
                        op_types_to_quantize=["MatMul", "Conv"],  # all ops would include -inf attention scores
                        extra_options={"CalibTensorRangeSymmetric": True})
    elif mode == "modelopt":
        from onnxruntime.quantization import CalibrationDataReader
        from modelopt.onnx.quantization import quantize

        class Reader(_Reader, CalibrationDataReader):
            pass

        quantize(model, quantize_mode="int8", calibration_data_reader=Reader(_feeds(n, fixed_length=True)),
                 calibration_method="entropy", calibration_eps=["cpu"], high_precision_dtype="fp32",
                 output_path=out, log_level="WARNING")
    else:
        raise SystemExit(f"unknown mode {mode}")
    info["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return info


# ----------------------------------------------------------------------------- parent
def _rss_mb(pid: int) -> float:
    total = 0.0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
    except OSError:
        pass
    return total


def run_child(py: Path, mode: str, n: int, model: Path, mem_cap_gb: float, time_cap_s: float) -> dict:
    out = WORK / f"{mode}_{n}.{'json' if mode.startswith('ours') else 'onnx'}"
    res_file = WORK / f"{mode}_{n}.result.json"
    res_file.unlink(missing_ok=True)
    cmd = [str(py), str(Path(__file__).resolve()), "--child", mode, "--n", str(n), "--model", str(model),
           "--out", str(out), "--result", str(res_file)]
    t0 = time.perf_counter()
    log = open(WORK / f"{mode}_{n}.log", "w")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    peak, capped = 0.0, None
    while p.poll() is None:
        peak = max(peak, _rss_mb(p.pid))
        if peak > mem_cap_gb * 1024:
            capped = f"killed: RSS passed {mem_cap_gb} GB"
        elif time.perf_counter() - t0 > time_cap_s:
            capped = f"killed: ran past {time_cap_s:.0f} s"
        if capped:
            p.kill()
            p.wait()
            break
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    log.close()
    row = {"mode": mode, "n": n, "wall_s": round(wall, 2), "sampled_peak_rss_mb": round(peak, 1),
           "returncode": p.returncode}
    if capped:
        row["capped"] = capped
    if res_file.exists():
        row.update(json.loads(res_file.read_text()))
        row["peak_rss_mb"] = round(row.pop("ru_maxrss_mb"), 1)
    elif not capped:
        row["error"] = (WORK / f"{mode}_{n}.log").read_text()[-3000:]
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--n", type=int)
    ap.add_argument("--model")
    ap.add_argument("--out")
    ap.add_argument("--result")
    ap.add_argument("--sizes", default="64,256,512")
    ap.add_argument("--only", default="fp32,ours,ort,modelopt")
    ap.add_argument("--mem-cap-gb", type=float, default=20.0)
    ap.add_argument("--time-cap-s", type=float, default=900.0)
    args = ap.parse_args()
    if args.child:
        info = child(args.child, args.n, args.model, args.out)
        Path(args.result).write_text(json.dumps(info))
        return

    sys.path.insert(0, str(ROOT))
    WORK.mkdir(parents=True, exist_ok=True)
    model = WORK / "fp32" / "encoder.onnx"
    if not model.exists():
        from models.export import export_onnx
        from models.weights import default_model

        m, trained = default_model("small")
        assert trained, "the bundled small weights are missing"
        export_onnx(m, WORK / "fp32")
    from calibration_data.corpus import default_cache_dir, ensure_corpus

    ensure_corpus(default_cache_dir(), {"calib": 512}, seed=0)
    modes = args.only.split(",")
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        for mode in modes:
            py = BENCH_PY if mode == "modelopt" else Path(sys.executable)
            if mode == "modelopt" and not py.exists():
                rows.append({"mode": mode, "n": n, "error": f"{py} missing: pip install 'nvidia-modelopt[onnx]' there"})
                continue
            rows.append(run_child(py, mode, n, model, args.mem_cap_gb, args.time_cap_s))
    import onnxruntime

    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "onnxruntime": onnxruntime.__version__, "threads": int(os.environ.get("BENCH_THREADS", "2")),
               "batch_size": BATCH, "model": "small WeNet encoder (trained), opset 13"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "calibration_benchmark.json"
    old = json.loads(out.read_text()) if out.exists() else {"rows": []}
    keep = [r for r in old.get("rows", []) if (r["mode"], r["n"]) not in {(x["mode"], x["n"]) for x in rows}]
    from core.fsutil import write_json

    write_json(out, {"machine": machine, "command": " ".join(["python"] + sys.argv), "rows": keep + rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
