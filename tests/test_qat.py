"""QAT (quant/qat.py) on the tiny random-init model: quantizer insertion from a plan and a calibration table,
a few fine-tuning steps, Q/DQ export that validates for TensorRT and matches PyTorch in ONNX Runtime."""
import copy
import math

import numpy as np
import onnxruntime as ort
from types import SimpleNamespace

import pytest
import torch

from graph.analysis import analyze
from graph.calib import observe_amax
from graph.plan import create_plan
from graph.validate import validate
from models import ASRModel, get_config
from models.export import dummy_decoder_inputs, dummy_encoder_inputs, export_onnx
from quant.qat import (AMAX_FLOOR, FakeQuant, export_qat_onnx, fp32_teacher, insert_quantizers, node_module_path,
                       quantizers)
from quant.table import FORMAT, CalibrationTable
from core.errors import WorkbenchError


def _model():
    torch.manual_seed(0)
    return ASRModel(get_config("tiny")).eval()


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """FP32 export of the tiny model, its analyses, default plans and a max-calibration amax dict."""
    model = _model()
    enc, dec = export_onnx(model, tmp_path_factory.mktemp("qat_fp32"))
    a_enc, a_dec = analyze(enc), analyze(dec)
    sp, ln = dummy_encoder_inputs()
    enc_amax = observe_amax(enc, [{"speech": sp.numpy(), "speech_lengths": ln.numpy()}],
                            sorted({q.act_inputs[0] for q in a_enc.quantizable if q.kind != "act_matmul"}))
    dfeed = dummy_decoder_inputs(model)
    dec_names = [i.name for i in ort.InferenceSession(str(dec), providers=["CPUExecutionProvider"]).get_inputs()]
    from models.export import DECODER_INPUTS
    dec_feed = {n: v.numpy() for n, v in zip(DECODER_INPUTS, dfeed) if n in dec_names}
    dec_amax = observe_amax(dec, [dec_feed],
                            sorted({q.act_inputs[0] for q in a_dec.quantizable if q.kind != "act_matmul"}))
    return {"model": model, "enc": enc, "dec": dec, "a_enc": a_enc, "a_dec": a_dec,
            "plan_enc": create_plan(a_enc), "plan_dec": create_plan(a_dec),
            "enc_amax": enc_amax, "dec_amax": dec_amax, "dec_feed": dec_feed}


def _table(amax: dict) -> CalibrationTable:
    """A minimal wb-calibration-table/1 (what CalibrationTable.amax reads)."""
    return CalibrationTable({"format": FORMAT, "default_method": "max",
                             "tensors": {t: {"amax": {"max": a}, "method": "max"} for t, a in amax.items()}})


def _int8_ids(analysis, plan):
    return {nid for nid, p in plan["nodes"].items() if p == "int8" and analysis.node(nid).kind != "act_matmul"}


def test_node_module_path():
    assert node_module_path("/encoder/encoders.0/feed_forward/w_1/MatMul") == "encoder.encoders.0.feed_forward.w_1"
    assert node_module_path("/encoder/embed/conv/conv.0/Conv") == "encoder.embed.conv.0"


def test_fake_quant_basics():
    fq = FakeQuant(torch.tensor(0.0))  # a zero amax is floored: the scale stays positive
    assert float(fq.amax) == pytest.approx(AMAX_FLOOR) and float(fq.scale) > 0
    fq = FakeQuant(1.27)
    x = torch.tensor([0.004, 0.006, 1.0, 5.0, -5.0], requires_grad=True)
    y = fq(x)
    assert torch.allclose(y, torch.tensor([0.0, 0.01, 1.0, 1.27, -1.28]), atol=1e-6)  # step 0.01, clip -128..127
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]  # straight-through inside the range
    w = torch.randn(4, 3)
    fw = FakeQuant(w.abs().amax(1), axis=0)
    assert torch.allclose(fw(w), w, atol=float(w.abs().max()) / 254 + 1e-7)
    lazy = FakeQuant()  # no table: amax from the first batch
    lazy(torch.tensor([-2.0, 1.0]))
    assert float(lazy.amax) == 2.0 and bool(lazy.initialized)


def test_relation_loss_on_constructed_embeddings():
    """quant.qat_distill's in-batch similarity loss: 0 for the teacher's own embeddings (also rescaled: it
    compares directions), sin(a)^2 / 2 when one of two orthogonal embeddings turns by a towards the other."""
    from quant.qat_distill import _relation_loss

    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(_relation_loss(3 * teacher, teacher)) == 0.0
    a = 0.3
    student = torch.tensor([[1.0, 0.0], [math.sin(a), math.cos(a)]])  # the pair's cosine 0 -> sin(a)
    assert float(_relation_loss(student, teacher)) == pytest.approx(math.sin(a) ** 2 / 2, rel=1e-6)


def test_fake_quant_learned_range_gets_a_gradient_and_is_written_back():
    fq = FakeQuant(1.27)
    fq.learn_range()
    x = torch.tensor([0.004, 0.5, 3.0])  # 3.0 is clipped: a larger range would lower the loss below
    assert torch.allclose(fq(x), torch.tensor([0.0, 0.5, 1.27]), atol=1e-6)  # same arithmetic as fixed
    loss = (fq(x) - x).pow(2).sum()
    loss.backward()
    assert fq.log_amax.grad is not None and float(fq.log_amax.grad) < 0  # LSQ: grow the range to clip less
    with torch.no_grad():
        fq.log_amax += 0.1
    fq.freeze_range()
    assert not hasattr(fq, "log_amax") and float(fq.amax) == pytest.approx(1.27 * math.exp(0.1), rel=1e-6)
    with pytest.raises(WorkbenchError, match="per-tensor"):
        FakeQuant(torch.ones(3), axis=0).learn_range()


def test_all_fp32_plan_inserts_nothing(fp32):
    model = copy.deepcopy(fp32["model"])
    plan = {"nodes": {nid: "fp32" for nid in fp32["plan_enc"]["nodes"]}}
    assert insert_quantizers(model, plan, fp32["enc_amax"], fp32["enc"]) == []
    assert not quantizers(model)
    sp, ln = dummy_encoder_inputs()
    with torch.no_grad():
        assert torch.equal(model.encoder(sp, ln)[0], fp32["model"].encoder(sp, ln)[0])
    with pytest.raises(WorkbenchError, match="no quantizers"):
        export_qat_onnx(model, "/nonexistent")


def test_unknown_mapping_and_missing_amax(fp32):
    model = copy.deepcopy(fp32["model"])
    node = "/encoder/encoders.0/self_attn/MatMul"  # attention QK^T: no Linear/Conv module behind it
    with pytest.raises(WorkbenchError, match="self_attn/MatMul"):
        insert_quantizers(model, {"nodes": {node: "int8"}}, fp32["enc_amax"], fp32["enc"])
    node = "/encoder/encoders.0/feed_forward/w_1/MatMul"
    with pytest.raises(WorkbenchError, match="feed_forward/w_1/MatMul"):
        insert_quantizers(model, {"nodes": {node: "int8"}}, _table({}), fp32["enc"])
    with pytest.raises(WorkbenchError, match="not a quantizable node"):
        insert_quantizers(model, {"nodes": {"/nope/MatMul": "int8"}}, None, fp32["enc"])
    assert not quantizers(model)  # nothing half-inserted


class _MemorySplit:
    """What models.train.train reads from a corpus split: manifest frames, texts, features(i)."""

    def __init__(self, n: int, frames: int, dim: int, seed: int):
        rng = np.random.default_rng(seed)
        self.feats = [rng.normal(0, 1, (frames, dim)).astype(np.float32) for _ in range(n)]
        words = ["abc", "de", "fgh", "ij"]
        self.texts = [" ".join(words[(k + s) % 4] for s in range(2)) for k in range(n)]
        self.manifest = [{"frames": frames} for _ in range(n)]

    def __len__(self):
        return len(self.feats)

    def features(self, i):
        return self.feats[i]


def _table_file(amax: dict, path) -> str:
    _table(amax).save(path)
    return str(path)


@pytest.fixture(scope="module")
def qat_run(fp32, tmp_path_factory):
    """A few QAT steps of the tiny model through run_qat (the `wb qat` library call) on CPU."""
    from quant.qat_run import QatOptions, run_qat

    d = tmp_path_factory.mktemp("qat_run")
    model = copy.deepcopy(fp32["model"])
    tables = {"encoder": _table_file(fp32["enc_amax"], d / "enc.json"),
              "decoder": _table_file(fp32["dec_amax"], d / "dec.json")}
    split = _MemorySplit(8, 64, model.cfg.input_dim, seed=0)
    opts = QatOptions(steps=16, lr=2e-3, warmup=1, kd_weight=0.5, eval_every=8, workers=0, max_frames=64 * 4)
    summary, qmodel = run_qat(model, tables, d / "out", split, split, opts, device="cpu", progress=False)
    return {"summary": summary, "model": qmodel, "dir": d / "out", "tables": tables}


def test_qat_run_loss_scales_and_outputs(fp32, qat_run):
    s, model, out = qat_run["summary"], qat_run["model"], qat_run["dir"]
    assert np.isfinite(s["val_cer_ctc_greedy_before"]) and s["val_cer_ctc_greedy_before"] >= 0  # CER may exceed 1
    assert s["steps"] == 16 and s["quantized_nodes"]["encoder"] == len(_int8_ids(fp32["a_enc"], fp32["plan_enc"]))
    assert s["loss_last"] < s["loss_first"], (s["loss_first"], s["loss_last"])
    for name, q in quantizers(model).items():
        assert torch.all(q.amax > 0) and torch.all(q.scale > 0) and torch.isfinite(q.amax).all(), name
    # activation ranges stay the calibrated ones; weight ranges follow the fine-tuned weights
    w1 = model.encoder.encoders[0].feed_forward.w_1
    t = fp32["a_enc"].node("/encoder/encoders.0/feed_forward/w_1/MatMul").act_inputs[0]
    assert float(w1.input_quantizer.amax) == pytest.approx(fp32["enc_amax"][t], rel=1e-6)
    assert torch.allclose(w1.weight_quantizer.amax, w1.weight.detach().abs().amax(1))
    assert not torch.equal(w1.weight, fp32["model"].encoder.encoders[0].feed_forward.w_1.weight)  # it trained
    assert not model.training
    for f in ("weights.safetensors", "encoder.table.json", "decoder.table.json", "encoder.plan.json",
              "decoder.plan.json", "qdq/encoder.onnx", "qdq/decoder.onnx", "train_log.jsonl", "qat.json"):
        assert (out / f).is_file(), f
    assert not out.with_name(out.name + ".partial").exists()
    table = CalibrationTable.load(out / "encoder.table.json")
    assert table.default_method == "qat" and table.amax(t) == pytest.approx(fp32["enc_amax"][t], rel=1e-6)


def test_qat_export_validates_and_matches_pytorch(fp32, qat_run):
    model, out = qat_run["model"], qat_run["dir"]
    enc, dec = out / "qdq" / "encoder.onnx", out / "qdq" / "decoder.onnx"
    assert validate(enc, fp32["plan_enc"], "tensorrt", original=fp32["enc"]) == []
    assert validate(dec, fp32["plan_dec"], "tensorrt", original=fp32["dec"]) == []
    # ONNX Runtime (CPU, no graph optimisation: Q/DQ executed as written) vs the fake-quantized PyTorch model
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(enc), so, providers=["CPUExecutionProvider"])
    sp, ln = dummy_encoder_inputs(batch=2, frames=80, seed=3)
    got = sess.run(None, {"speech": sp.numpy(), "speech_lengths": ln.numpy()})
    with torch.no_grad():
        ref, mask = model.encoder(sp, ln)
        ref32 = fp32_teacher(model).encoder(sp, ln)[0].numpy()  # the fine-tuned weights, no quantizers
    valid = mask.squeeze(1).numpy()
    err = np.abs(got[0] - ref.numpy())[valid]
    scale = float(np.abs(ref.numpy()[valid]).max())
    # Stated tolerance: same arithmetic, but ORT and PyTorch sum in different orders, so ~1e-6 differences
    # before a quantizer occasionally cross a rounding boundary and flip one INT8 step, which propagates
    # (measured on this model: max ~2e-3, mean ~6e-4 of the output range).  Bound that, and check it is well
    # below the quantization effect itself (fake-quant vs FP32), so the comparison does discriminate.
    assert err.max() / scale < 1e-2, err.max() / scale
    assert err.mean() / scale < 2e-3, err.mean() / scale
    quant_effect = np.abs(ref32 - ref.numpy())[valid]
    print(f"ORT vs fake-quant PyTorch: max {err.max() / scale:.2e}, mean {err.mean() / scale:.2e}; "
          f"fake-quant vs FP32: max {quant_effect.max() / scale:.2e}, mean {quant_effect.mean() / scale:.2e}")
    assert err.mean() < 0.5 * quant_effect.mean(), (err.mean(), quant_effect.mean())
    np.testing.assert_array_equal(got[1], valid.sum(1))
    dsess = ort.InferenceSession(str(dec), so, providers=["CPUExecutionProvider"])
    assert np.all(np.isfinite(dsess.run(None, fp32["dec_feed"])[0]))


def test_qat_export_builds_engines(qat_run, tmp_path):
    """The engines layer builds and runs the QAT export as it does PTQ models (ONNX Runtime backend here)."""
    import engines

    enc = qat_run["dir"] / "qdq" / "encoder.onnx"
    runner = engines.load(engines.build(enc, None, tmp_path / "enc_engine", backend="onnxruntime", kind="encoder"))
    sp, ln = dummy_encoder_inputs(batch=2, frames=80, seed=5)
    out = runner.run({"speech": sp.numpy(), "speech_lengths": ln.numpy()})
    assert np.all(np.isfinite(out["encoder_out"])) and out["encoder_out"].shape[0] == 2


def test_qat_directory_feeds_ptq_placement(fp32, qat_run, tmp_path):
    """The search starts from QAT scales by placing the fine-tuned FP32 weights with the QAT table: that
    model computes what the QAT export computes (residual-Add Q/DQ off, which QAT does not model)."""
    from graph.placement import quantize
    from models.weights import load_weights

    out = qat_run["dir"]
    enc32, _ = export_onnx(load_weights(out / "weights.safetensors"), tmp_path / "fp32")
    plan = copy.deepcopy(fp32["plan_enc"])
    plan["options"]["residual_add"] = False
    placed = quantize(str(enc32), str(out / "encoder.table.json"), plan=plan, recipe="tensorrt",
                      out=tmp_path / "placed.onnx")
    assert placed.report["activation_qdq"] > 0
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sp, ln = dummy_encoder_inputs(batch=2, frames=80, seed=4)
    feeds = {"speech": sp.numpy(), "speech_lengths": ln.numpy()}
    a = ort.InferenceSession(str(tmp_path / "placed.onnx"), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    b = ort.InferenceSession(str(out / "qdq" / "encoder.onnx"), so,
                             providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.abs(a - b).max() / np.abs(b).max() < 1e-2, np.abs(a - b).max()


def test_wb_qat_bad_tables(tmp_path, capsys):
    from workbench.cli import main

    assert main(["qat", "--tables", str(tmp_path), "--out", str(tmp_path / "q")]) == 2
    assert "no encoder.json and decoder.json" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_state_dict_roundtrip_and_remove(fp32):
    from quant.qat import remove_quantizers

    model = copy.deepcopy(fp32["model"])
    insert_quantizers(model, fp32["plan_enc"], None, fp32["enc"])  # no table: amax from the first batch
    sp, ln = dummy_encoder_inputs()
    with torch.no_grad():
        ref = model.encoder(sp, ln)[0]
    assert not bool(model.ctc.ctc_lo.input_quantizer.initialized)  # not reached by the encoder alone
    with torch.no_grad():
        model.ctc.log_softmax(ref)
    assert all(bool(q.initialized) and torch.all(q.amax > 0) for q in quantizers(model).values())
    other = copy.deepcopy(fp32["model"])
    insert_quantizers(other, fp32["plan_enc"], None, fp32["enc"])
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(other.encoder(sp, ln)[0], ref)
    remove_quantizers(other)
    assert not quantizers(other) and type(other.encoder.encoders[0].feed_forward.w_1) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(other.encoder(sp, ln)[0], fp32["model"].encoder(sp, ln)[0])


def test_workspace_qat_source_must_fit_the_plans(fp32, tmp_path):
    from pipeline.workspace import Workspace
    from tasks.base import GraphSpec

    graphs = SimpleNamespace(graphs=[GraphSpec("encoder", fp32["enc"]), GraphSpec("decoder", fp32["dec"])])
    ws = Workspace(tmp_path, {}, graphs)
    with pytest.raises(WorkbenchError, match="not the architecture"):
        ws.add_source("qat", {"encoder": fp32["dec"], "decoder": fp32["dec"]})
    assert ws.source("qat") == ws.fp32
    ws.add_source("qat", {"encoder": fp32["enc"], "decoder": fp32["dec"]})
    assert ws.source("qat")["encoder"] == fp32["enc"] and ws.source("max") == ws.fp32
