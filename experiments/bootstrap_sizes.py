"""How many test utterances an accuracy decision needs: paired bootstrap intervals of each INT8 model's CER
change against FP32, and the split size at which the 95 % interval resolves a 0.3-point criterion.

Takes a finished run directory (its models.json names the FP32 model and every baseline's models), decodes
the test split with each (attention rescoring, as the criterion), and per model reports the CER change with
its paired bootstrap interval (evaluation.bootstrap, 2000 resamples, seed 0) and the utterances needed for
the interval's half-width to fit between the change and the 0.3-point threshold (and for fixed half-widths).

    .venv/bin/python experiments/bootstrap_sizes.py --run experiments/runs/RUN [--utts 500] [--threads 2]

Writes experiments/results/bootstrap_sizes.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibration_data.corpus import load_split  # noqa: E402
from calibration_data.text import DEFAULT_VOCAB, normalize  # noqa: E402
from core.fsutil import atomic_path, read_json, write_json  # noqa: E402
from core.host import describe, host_info  # noqa: E402
from evaluation.asr import evaluate  # noqa: E402
from evaluation.bootstrap import items_needed, paired_delta_ci  # noqa: E402
from evaluation.metrics import edit_distance  # noqa: E402
from engines import open_onnx  # noqa: E402

CRITERION = 0.003  # 0.3 CER points, the shipped default delta
HALF_WIDTHS = (0.001, 0.0015, 0.002)


def per_utterance(models: dict[str, Path], feats, texts, threads: int) -> tuple[list[int], list[int]]:
    enc, dec = (open_onnx(models[k], threads=threads, kind=k) for k in ("encoder", "decoder"))
    hyps = evaluate(enc, dec, feats, texts, DEFAULT_VOCAB, progress=True)["utterances"]
    refs = [normalize(t) for t in texts]
    return [edit_distance(r, normalize(h["rescored"])) for r, h in zip(refs, hyps)], [len(r) for r in refs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished run directory (with models.json)")
    ap.add_argument("--utts", type=int, default=500, help="test utterances to decode (default 500)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--corpus", type=Path, default=ROOT / ".cache" / "corpus")
    args = ap.parse_args()
    t0 = time.time()
    listing = read_json(args.run / "models.json")
    split = load_split(args.corpus, "test")
    n = min(args.utts, len(split))
    feats, texts = [split.features(i) for i in range(n)], split.texts[:n]
    models = {label: {k: args.run / p for k, p in m.items()} for label, m in listing.items()
              if label == "FP32" or label.startswith("INT8 all")}
    edits = {label: per_utterance(m, feats, texts, args.threads) for label, m in models.items()}
    ref_edits, lengths = edits["FP32"]
    rows = []
    for label, (e, _) in edits.items():
        if label == "FP32":
            continue
        ci = paired_delta_ci(e, ref_edits, lengths, seed=0)
        margin = CRITERION - ci["delta"]
        rows.append({"label": label, "cer": sum(e) / sum(lengths), **ci,
                     "needed_to_resolve_criterion": items_needed(e, ref_edits, lengths, abs(margin)) if margin else None,
                     "needed_for_half_width": {f"{h:g}": items_needed(e, ref_edits, lengths, h) for h in HALF_WIDTHS}})
    host = host_info()
    result = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(), "run": str(args.run),
              "host": host, "cpu": describe(host), "n_utts": n, "fp32_cer": sum(ref_edits) / sum(lengths),
              "criterion_delta": CRITERION, "rows": rows, "wall_s": round(time.time() - t0, 1),
              "command": "experiments/bootstrap_sizes.py " + " ".join(sys.argv[1:])}
    out = ROOT / "experiments" / "results" / "bootstrap_sizes"
    write_json(out.with_suffix(".json"), result)
    lines = ["# Paired bootstrap intervals and the split size a 0.3-point CER criterion needs", "",
             f"`{result['command']}` ({result['created'][:16]} UTC, {result['wall_s']} s). CPU: {result['cpu']}.",
             f"Test split (held-out voices), {n} utterances, FP32 CER {100 * result['fp32_cer']:.2f} %; models of "
             f"run `{args.run.name}`. Interval: paired percentile bootstrap over utterances, 95 %, 2000 resamples, "
             f"seed 0. Sizes: the delta-method spread measured here, scaled as 1/sqrt(n).", "",
             "| model | CER | change vs FP32 [95 % interval] | utterances to resolve 0.3 pt | half-width 0.1 / 0.15 / 0.2 pt |",
             "| --- | ---: | --- | ---: | ---: |"]
    for r in rows:
        hw = " / ".join(str(v) for v in r["needed_for_half_width"].values())
        lines.append(f"| {r['label']} | {100 * r['cer']:.2f} % | {100 * r['delta']:+.2f} [{100 * r['low']:+.2f}, "
                     f"{100 * r['high']:+.2f}] pt | {r['needed_to_resolve_criterion']} | {hw} |")
    lines += ["", "\"To resolve\": the interval's half-width fits between the model's change and the 0.3-point "
              "threshold, so the 95 % interval lies wholly on one side of it."]
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
