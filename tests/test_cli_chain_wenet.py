"""The CLI chain on graph pairs with the structural traits of WeNet's own export (tests/wenet_like.py): LayerNorm
in the conv module, a causal Pad, Identity nodes on activation and weight paths, 57 units, a default-export
decoder with only `best_index` and 5 inputs (reverse_weight 0), and a `--decoder_fastertransformer` one."""
import json

import numpy as np
import onnx
import pytest

from graph.analysis import analyze
from graph.placement import calibration_tensors
from cli_helpers import wb
from wenet_like import make_wenet_like_pair, write_npz_feeds


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("wenet")
    corpus = d / "corpus"
    wb("data", "--cache", corpus, "--splits", "calib", "--sizes", "calib=6", "--workers", "1")
    default = make_wenet_like_pair(d / "default", reverse_weight=0.0, fastertransformer=False)
    ft = make_wenet_like_pair(d / "ft", reverse_weight=0.3, fastertransformer=True, seed=1)
    return d, corpus, {"default": default, "ft": ft}


def test_traits_are_there(pairs):
    _, _, p = pairs
    dec = onnx.load(str(p["default"].decoder))
    assert [i.name for i in dec.graph.input] == ["encoder_out", "encoder_out_lens", "hyps_pad_sos_eos",
                                                 "hyps_lens_sos", "ctc_score"]
    assert [o.name for o in dec.graph.output] == ["best_index"]
    enc = onnx.load(str(p["default"].encoder))
    ops = {n.op_type for n in enc.graph.node}
    assert {"Pad", "Identity"} <= ops and "BatchNormalization" not in ops


@pytest.mark.parametrize("which", ["default", "ft"])
def test_chain_on_a_wenet_like_export(pairs, which, capsys):
    d, corpus, p = pairs
    pair, w = p[which], d / f"run-{which}"
    w.mkdir()
    if which == "default":  # the encoder from the user's own .npz feeds
        write_npz_feeds(pair.encoder, w / "feeds", n=3)
        wb("calibrate", "--model", pair.encoder, "--data", w / "feeds", "--out", w / "enc.json")
    else:  # the encoder from the corpus
        wb("calibrate", "--model", pair.encoder, "--cache", corpus, "--limit", "6", "--out", w / "enc.json")
    wb("calibrate", "--model", pair.decoder, "--encoder", pair.encoder, "--cache", corpus, "--limit", "6",
       "--batch-size", "3", "--out", w / "dec.json")
    for kind, model, table in (("encoder", pair.encoder, "enc.json"), ("decoder", pair.decoder, "dec.json")):
        assert set(calibration_tensors(analyze(model))) <= set(json.loads((w / table).read_text())["tensors"])
        for recipe in ("tensorrt", "onnxruntime"):
            q = w / f"{kind}.{recipe}.onnx"
            wb("quantize", "--model", model, "--table", w / table, "--recipe", recipe, "--out", q)
            eng = w / f"{kind}.{recipe}_engine"
            wb("build", "--model", q, "--kind", kind, "--backend", "onnxruntime", "--threads", "1", "--out", eng,
               "--time", "16:32:64")
            assert json.loads((eng / "kernels.json").read_text())["integer_kernel_total"] > 0
            wb("bench", "--engine", eng, "--batch-sizes", "1", "--seq-lens", "16", "--warmup", "0", "--iters", "1",
               *(["--random-features"] if kind == "encoder" else []))
    capsys.readouterr()
    check = ["check", "--encoder", w / "encoder.onnxruntime.onnx", "--decoder", w / "decoder.onnxruntime.onnx",
             "--ref-encoder", pair.encoder, "--ref-decoder", pair.decoder, "--cache", corpus,
             "--vocab", pair.units, "--json", w / "check.json"]
    if which == "default":  # WeNet's default export has no decoder_out: the check says how to get one
        wb(*check, ok=False)
        assert "--decoder_fastertransformer" in capsys.readouterr().err
        assert not (w / "check.json").exists()
    else:
        wb(*check)
        rows = json.loads((w / "check.json").read_text())
        assert len(rows) == 18 and all(np.isfinite(r["max_abs"]) for r in rows)


def test_vocabulary_option(pairs, tmp_path, capsys):
    d, corpus, p = pairs
    pair = p["ft"]
    wb("data", "--cache", corpus, "--splits", "test", "--sizes", "test=3", "--workers", "1")
    capsys.readouterr()
    # the bundled 31 characters against a 57-unit model: refused, naming both sizes
    wb("evaluate", "--encoder", pair.encoder, "--decoder", pair.decoder, "--cache", corpus, ok=False)
    err = capsys.readouterr().err
    assert "57 output units" in err and "31" in err
    # its own units.txt (CJK characters) against English references: refused, naming the characters
    wb("evaluate", "--encoder", pair.encoder, "--decoder", pair.decoder, "--cache", corpus, "--vocab", pair.units,
       ok=False)
    assert "no unit of the 57-unit vocabulary" in capsys.readouterr().err
    # a units.txt with a gap in its ids
    bad = tmp_path / "units.txt"
    bad.write_text("<blank> 0\n<unk> 1\na 3\n<sos/eos> 4\n")
    wb("evaluate", "--encoder", pair.encoder, "--decoder", pair.decoder, "--cache", corpus, "--vocab", bad, ok=False)
    assert "without gaps" in capsys.readouterr().err


def test_decoder_surgery_command(pairs, tmp_path, capsys):
    _, _, p = pairs
    out = tmp_path / "d64.onnx"
    wb("decoder-surgery", "--model", p["default"].decoder, "--hyps-len", "64", "--out", out)
    dims = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in onnx.load(str(out)).graph.input}
    assert dims["hyps_pad_sos_eos"][1:] == [10, 64]
    wb("decoder-surgery", "--model", p["default"].encoder, "--out", tmp_path / "e.onnx", ok=False)
    assert "hyps_pad_sos_eos" in capsys.readouterr().err and not (tmp_path / "e.onnx").exists()


def test_search_on_a_wenet_export_with_its_own_vocabulary(tmp_path, capsys):
    """`wb search` on a WeNet export of the user's ([model] encoder/decoder/vocab): the wenet_asr task on its
    graphs as they are (no export of ours), with a units.txt of English characters in WeNet's layout, and the
    default export's best_index-only decoder (no decoder_out: no hackathon check)."""
    from calibration_data.text import DEFAULT_VOCAB

    vocab = DEFAULT_VOCAB.tokens
    pair = make_wenet_like_pair(tmp_path / "export", reverse_weight=0.0, vocab_size=len(vocab))
    pair.units.write_text("".join(f"{u} {i}\n" for i, u in enumerate(vocab)), encoding="utf-8")
    cfg = tmp_path / "wenet.toml"
    cfg.write_text(f'''
[model]
encoder = "{pair.encoder}"
decoder = "{pair.decoder}"
vocab = "{pair.units}"

[data]
calib_utts = 8
eval_utts = 6
ranking_utts = 2

[calibration]
methods = ["max"]

[backend]
name = "onnxruntime"
threads = 1

[criterion]
metric = "cer_rescore"
kind = "absolute"
delta = 1.0

[latency]
batch_sizes = [1]
seq_lens = [16]
warmup = 0
iters = 2
search_warmup = 0
search_iters = 2
''')
    runs = tmp_path / "runs"
    wb("search", "--config", cfg, "--runs-root", runs, "--run-dir", runs / "r")
    run = json.loads((runs / "r" / "run.json").read_text())
    assert run["status"] == "passed" and run["model"] == "export" and run["task"]["graphs"] == ["encoder", "decoder"]
    assert not (runs / "r" / "models" / "fp32").exists()  # the user's graphs, not an export of ours
    models = json.loads((runs / "r" / "models.json").read_text())
    assert models["FP32"] == {"encoder": str(pair.encoder.resolve()), "decoder": str(pair.decoder.resolve())}
    fp32 = run["baselines"][0]
    assert 0 <= fp32["accuracy"]["cer_rescore"] and "hackathon" not in fp32
    assert {k.split(":")[0] for k in run["sensitivity"]} == {"encoder", "decoder"}
    assert (runs / "r" / "final" / "encoder.onnx").is_file() and (runs / "r" / "report.md").is_file()
    capsys.readouterr()
