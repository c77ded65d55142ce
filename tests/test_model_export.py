"""The WeNet-style model and its ONNX export: interface, numerics against PyTorch, weights round trip."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models import ASRModel, get_config
from models.export import (DECODER_INPUTS, DECODER_OUTPUTS, ENCODER_INPUTS, ENCODER_OUTPUTS, DecoderForExport,
                           EncoderForExport, dummy_decoder_inputs, dummy_encoder_inputs, export_onnx)
from models.weights import load_model, save_weights
from workbench.errors import WorkbenchError

ONNX_INT64, ONNX_INT32, ONNX_FLOAT = onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.FLOAT


def _io(path):
    g = onnx.load(str(path)).graph
    def desc(vi):
        t = vi.type.tensor_type
        return t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim]
    return {v.name: desc(v) for v in g.input}, {v.name: desc(v) for v in g.output}


def test_encoder_interface(tiny_onnx):
    ins, outs = _io(tiny_onnx[0])
    assert list(ins) == ENCODER_INPUTS and list(outs) == ENCODER_OUTPUTS
    assert ins["speech"] == (ONNX_FLOAT, ["B", "T", 80])
    assert ins["speech_lengths"] == (ONNX_INT32, ["B"])
    assert outs["encoder_out"] == (ONNX_FLOAT, ["B", "T_OUT", 64])
    assert outs["encoder_out_lens"] == (ONNX_INT32, ["B"])
    assert outs["ctc_log_probs"][0] == ONNX_FLOAT and outs["ctc_log_probs"][1][:2] == ["B", "T_OUT"]
    assert outs["beam_log_probs"] == (ONNX_FLOAT, ["B", "T_OUT", 10])
    assert outs["beam_log_probs_idx"] == (ONNX_INT64, ["B", "T_OUT", 10])


def test_decoder_interface(tiny_onnx):
    ins, outs = _io(tiny_onnx[1])
    assert list(ins) == DECODER_INPUTS and set(outs) == set(DECODER_OUTPUTS)
    assert ins["encoder_out"] == (ONNX_FLOAT, ["B", "T", 64])
    assert ins["encoder_out_lens"] == (ONNX_INT32, ["B"])
    assert ins["hyps_pad_sos_eos"] == (ONNX_INT64, ["B", 10, "T2"])
    assert ins["r_hyps_pad_sos_eos"] == (ONNX_INT64, ["B", 10, "T2"])
    assert ins["hyps_lens_sos"] == (ONNX_INT32, ["B", 10])
    assert ins["ctc_score"] == (ONNX_FLOAT, ["B", 10])
    assert outs["best_index"] == (ONNX_INT64, ["B"])
    assert outs["decoder_out"][0] == ONNX_FLOAT


def test_opset13_decomposes_layernorm_and_cmvn_first(tiny_onnx):
    g = onnx.load(str(tiny_onnx[0])).graph
    ops = [n.op_type for n in g.node]
    assert "LayerNormalization" not in ops and ops.count("ReduceMean") >= 2
    # GlobalCMVN (x-mean)*istd consumes the raw `speech` input directly.
    assert any(n.op_type == "Sub" and "speech" in n.input for n in g.node)


@pytest.mark.parametrize("batch,frames", [(1, 16), (3, 77), (4, 256)])
def test_encoder_matches_pytorch(tiny_model, tiny_onnx, batch, frames):
    sess = ort.InferenceSession(str(tiny_onnx[0]), providers=["CPUExecutionProvider"])
    x, lens = dummy_encoder_inputs(batch, frames, seed=batch)
    lens = torch.clamp(lens, min=7)
    got = sess.run(None, {"speech": x.numpy(), "speech_lengths": lens.numpy()})
    with torch.no_grad():
        want = EncoderForExport(tiny_model).eval()(x, lens)
    assert got[0].shape == (batch, ((frames - 1) // 2 - 1) // 2, 64)
    np.testing.assert_allclose(got[0], want[0].numpy(), atol=2e-4, rtol=1e-3)
    np.testing.assert_array_equal(got[1], want[1].numpy())
    np.testing.assert_allclose(got[2], want[2].numpy(), atol=2e-4, rtol=1e-3)
    np.testing.assert_allclose(got[3], want[3].numpy(), atol=2e-4, rtol=1e-3)


def test_decoder_matches_pytorch(tiny_model, tiny_onnx):
    sess = ort.InferenceSession(str(tiny_onnx[1]), providers=["CPUExecutionProvider"])
    ins = dummy_decoder_inputs(tiny_model, batch=3, t_out=40, seed=7)
    got = dict(zip([o.name for o in sess.get_outputs()],
                   sess.run(None, dict(zip(DECODER_INPUTS, [t.numpy() for t in ins])))))
    with torch.no_grad():
        dec_out, best = DecoderForExport(tiny_model, 0.5, tiny_model.cfg.reverse_weight)(*ins)
    assert got["decoder_out"].shape == (3, 10, 63, tiny_model.cfg.vocab_size)
    np.testing.assert_allclose(got["decoder_out"], dec_out.numpy(), atol=2e-4, rtol=1e-3)
    np.testing.assert_array_equal(got["best_index"], best.numpy())


def test_opset17_native_layernorm_and_pruned_reverse_input(tiny_model, tmp_path):
    enc, dec = export_onnx(tiny_model, tmp_path, opset=17, reverse_weight=0.0)
    assert "LayerNormalization" in {n.op_type for n in onnx.load(str(enc)).graph.node}
    ins, _ = _io(dec)
    assert "r_hyps_pad_sos_eos" not in ins


def test_weights_round_trip(tiny_model, tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(tiny_model, path, dtype=torch.float32)
    again = load_model(path)
    assert again.cfg == tiny_model.cfg
    x, lens = dummy_encoder_inputs(2, 50)
    with torch.no_grad():
        a = EncoderForExport(tiny_model).eval()(x, lens)[0]
        b = EncoderForExport(again).eval()(x, lens)[0]
    torch.testing.assert_close(a, b)


def test_corrupt_weights_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(WorkbenchError, match="not a readable weights file"):
        load_model(bad)
    with pytest.raises(WorkbenchError, match="not found"):
        load_model(tmp_path / "missing.safetensors")


def test_loss_decreases_on_cpu():
    """A few optimizer steps on one fixed batch: the joint CTC/attention loss must go down."""
    torch.manual_seed(0)
    model = ASRModel(get_config("tiny")).train()
    x = torch.randn(4, 120, 80)
    lens = torch.tensor([120, 100, 90, 60])
    y = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, -1, -1], [4, 5, -1, -1, -1], [13, -1, -1, -1, -1]])
    yl = torch.tensor([5, 3, 2, 1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        out = model(x, lens, y, yl)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0]
