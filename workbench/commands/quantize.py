"""`wb quantize`: FP32 ONNX + calibration table + precision plan -> quantized ONNX (graph.placement)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    s = subparsers.add_parser("quantize", help="place Q/DQ (and FP16 typing) from a calibration table and a "
                                               "precision plan")
    s.add_argument("--model", type=Path, required=True, help="FP32 ONNX model")
    s.add_argument("--table", type=Path, required=True, help="calibration table JSON (wb-calibration-table/1 "
                                                             "or {tensor: amax})")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--plan", type=Path, help="precision plan JSON (wb-precision-plan/1)")
    g.add_argument("--default-plan", choices=["int8", "fp16", "fp32"], default="int8",
                   help="without --plan: every quantizable node at this precision (default int8; attention "
                        "activation MatMuls stay fp32 in an int8 plan)")
    s.add_argument("--recipe", choices=["tensorrt", "onnxruntime"], default="tensorrt",
                   help="tensorrt: TensorRT explicit-quantization Q/DQ (checked by our validator and ONNX "
                        "Runtime, not by TensorRT); onnxruntime: placement fused by ORT's CPU EP")
    s.add_argument("--ort-mode", default="auto",
                   help="onnxruntime recipe's int8 arithmetic (u8s8, u8s8-rr, s8s8): auto = u8s8 on CPUs with "
                        "VNNI/AMX, u8s8-rr (7-bit weights) on AVX2-only ones, whose int16 accumulation saturates")
    s.add_argument("--ort-float-outputs", choices=["none", "residual", "matmul"], default="none",
                   help="onnxruntime recipe: int8 MatMuls whose output stays float (MatMulIntegerToFloat): none "
                        "(every output quantized, ORT's placement), residual (those feeding a residual Add: "
                        "attention-output/FFN-output projections), matmul (all)")
    s.add_argument("--ort-per-token-inputs", default="none", metavar="{none,residual,matmul,REGEX}",
                   help="onnxruntime recipe: which float-output int8 MatMuls quantize their input per token (each "
                        "row's scale computed at run time, not the table's): the --ort-float-outputs choices "
                        "(at most what that option keeps float), or a regex of node ids searched among them")
    s.add_argument("--out", type=Path, required=True, help="quantized ONNX to write")
    s.add_argument("--write-plan", type=Path, help="also write the resolved plan here")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from graph.analysis import analyze, prepare_model
    from graph.placement import quantize
    from graph.plan import counts, create_plan, load_plan, save_plan
    from graph.validate import check_or_raise

    from graph.calib import load_table

    from core.fsutil import check_model_file, check_writable_target

    check_model_file(args.model)
    for target in (args.out, args.write_plan):  # before the work, not after it
        if target is not None:
            check_writable_target(target)
    table = load_table(args.table)  # every value checked before the model is touched
    model = prepare_model(args.model)
    analysis = analyze(model)
    plan = load_plan(args.plan, analysis) if args.plan else create_plan(analysis, args.default_plan)
    # quantize -> validate -> write: nothing is written unless both succeed
    res = quantize(model, table, plan, recipe=args.recipe, ort_mode=args.ort_mode,
                   ort_float_outputs=args.ort_float_outputs, ort_per_token_inputs=args.ort_per_token_inputs)
    check_or_raise(res.model, res.plan, args.recipe, original=model)
    import onnx
    from core.fsutil import atomic_path
    with atomic_path(args.out) as tmp:
        onnx.save(res.model, str(tmp))
    if args.write_plan:
        save_plan(res.plan, args.write_plan)
    print(json.dumps({"out": str(args.out), "recipe": args.recipe, "plan": counts(res.plan)} | res.report,
                     indent=2))
