"""`wb decoder-surgery`: the TensorRT Hackathon 2022 decoder surgery (graph.surgery.fix_hyps_length)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "decoder-surgery",
        help="fix the rescoring decoder's hyps_pad_sos_eos / r_hyps_pad_sos_eos to [B, 10, L] (the TensorRT "
             "Hackathon 2022 surgery: one static hypothesis length for the engine)")
    s.add_argument("--model", type=Path, required=True, help="WeNet attention-rescoring decoder ONNX")
    s.add_argument("--hyps-len", type=int, default=64, help="hypothesis length L (default 64, the hackathon's)")
    s.add_argument("--out", type=Path, required=True, help="decoder ONNX to write")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from graph.surgery import HYPS_INPUTS, fix_hyps_length
    from core.fsutil import check_writable_target

    from core.errors import WorkbenchError

    if args.hyps_len < 2:
        raise WorkbenchError(f"--hyps-len must be at least 2 (<sos> and <eos>), got {args.hyps_len}")
    check_writable_target(args.out)
    m = fix_hyps_length(args.model, args.hyps_len, out=args.out)
    fixed = [i.name for i in m.graph.input if i.name in HYPS_INPUTS]
    print(f"wrote {args.out}: {', '.join(fixed)} fixed to [B, 10, {args.hyps_len}]")
