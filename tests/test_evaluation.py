"""Tests of the evaluation package: metrics, CTC search, recognition, hackathon check, ORT runner."""
from __future__ import annotations

import itertools
import math
from collections import defaultdict

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from calibration_data.text import DEFAULT_VOCAB as VOCAB
from evaluation.asr import decoder_feeds, evaluate, recognize
from evaluation.ctc import ctc_greedy, ctc_prefix_beam_search
from evaluation.hackathon import check, format_table, make_cases, run_check
from evaluation.interface import ENCODER_OUTPUTS, MISSING_HYP_SCORE, encoder_out_length
from evaluation.metrics import cer, edit_distance, wer
from engines import open_onnx
from core.errors import WorkbenchError

V = len(VOCAB)
SOS = VOCAB.sos_eos


def _log_softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


# ---------------------------------------------------------------- fake runners
class FakeEncoder:
    """Output frame t is input frame 4t; its first V features are the CTC logits."""

    input_names = ["speech", "speech_lengths"]
    output_names = [s.name for s in ENCODER_OUTPUTS]

    def __init__(self, shift: float = 0.0):
        self.shift = shift  # added to encoder_out, to make a "quantised" candidate
        self.calls = []

    def run(self, feeds):
        speech, lengths = feeds["speech"], feeds["speech_lengths"]
        t_out = encoder_out_length(speech.shape[1])
        frames = speech[:, : 4 * t_out : 4]
        logp = _log_softmax(frames[:, :, :V].astype(np.float64)).astype(np.float32)
        idx = np.argsort(-logp, axis=-1, kind="stable")[..., :10].astype(np.int64)
        out = {
            "encoder_out": frames[:, :, :8] + np.float32(self.shift),
            "encoder_out_lens": encoder_out_length(lengths).astype(np.int32),
            "ctc_log_probs": logp,
            "beam_log_probs": np.take_along_axis(logp, idx, axis=-1),
            "beam_log_probs_idx": idx,
        }
        self.calls.append(out)
        return out


class FakeDecoder:
    """Picks hypothesis `choose` for every utterance; decoder_out is a function of its inputs."""

    def __init__(self, choose: int = 1, reverse: bool = True):
        self.choose = choose
        self.input_names = ["encoder_out", "encoder_out_lens", "hyps_pad_sos_eos", "hyps_lens_sos", "ctc_score"]
        if reverse:
            self.input_names.insert(4, "r_hyps_pad_sos_eos")
        self.output_names = ["best_index", "decoder_out"]
        self.calls = []

    def run(self, feeds):
        assert sorted(feeds) == sorted(self.input_names)
        self.calls.append(feeds)
        hyps = feeds["hyps_pad_sos_eos"]
        one_hot = (hyps[:, :, 1:, None] == np.arange(V)).astype(np.float32)
        bias = feeds["encoder_out"].mean(axis=(1, 2))[:, None, None, None]
        return {
            "best_index": np.full(len(hyps), self.choose, dtype=np.int64),
            "decoder_out": _log_softmax(3 * one_hot + bias).astype(np.float32),
        }


def spell(text: str, frames: int) -> np.ndarray:
    """Features whose fake-encoder CTC output reads `text`, one token every other frame."""
    ids = VOCAB.encode(text)
    t_out = encoder_out_length(frames)
    assert t_out >= 2 * len(ids)
    targets = [VOCAB.blank] * t_out
    targets[0 : 2 * len(ids) : 2] = ids
    feats = np.zeros((frames, 80), dtype=np.float32)
    for t, tok in enumerate(targets):
        feats[4 * t, tok] = 5.0
    return feats


# ---------------------------------------------------------------- metrics
def test_metrics():
    assert edit_distance("kitten", "sitting") == 3
    assert cer(["hello world"], ["Hello,  world!"]) == {"errors": 0, "ref_len": 11, "cer": 0.0}
    assert cer(["abc"], ["abd"])["cer"] == pytest.approx(1 / 3)
    assert cer(["abc"], ["xabc"])["errors"] == 1  # insertion
    assert cer(["abc"], ["ac"])["errors"] == 1  # deletion
    assert cer(["ab cd", "e"], ["abcd", "e"]) == {"errors": 1, "ref_len": 6, "cer": 1 / 6}  # space counts
    assert wer(["the cat sat"], ["the cat sat"])["wer"] == 0.0
    assert wer(["the cat sat"], ["the bat sat"])["wer"] == pytest.approx(1 / 3)
    assert wer(["the cat sat"], ["the cat sat down"])["errors"] == 1
    assert wer(["the cat sat"], ["cat sat"])["errors"] == 1
    assert cer([""], [""])["cer"] == 0.0
    assert cer([""], ["a"])["cer"] == math.inf


# ---------------------------------------------------------------- CTC
def test_ctc_greedy():
    assert ctc_greedy(np.array([0, 5, 5, 0, 5, 6, 6, 0, 0]), 9) == [5, 5, 6]
    assert ctc_greedy(np.array([0, 5, 5, 0, 5, 6, 6, 0, 0]), 3) == [5]
    logp = np.log(np.array([[0.1, 0.9], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]]))
    assert ctc_greedy(logp, 4) == [1, 1]


@pytest.mark.parametrize("seed", range(5))
def test_prefix_beam_search_matches_brute_force(seed):
    t_len, vocab = 4, 3
    logp = _log_softmax(np.random.default_rng(seed).normal(scale=2.0, size=(t_len, vocab)))
    totals = defaultdict(float)
    for path in itertools.product(range(vocab), repeat=t_len):
        label = tuple(k for k, _ in itertools.groupby(path) if k != 0)
        totals[label] += math.exp(sum(logp[t, s] for t, s in enumerate(path)))
    idx = np.argsort(-logp, axis=1)
    topk = np.take_along_axis(logp, idx, axis=1)
    # A beam wider than the number of prefixes makes the search exact for every hypothesis.
    hyps = ctc_prefix_beam_search(topk, idx, t_len, beam=64)
    assert hyps[0][0] == max(totals, key=totals.get)
    assert len(hyps) == len(totals)
    for prefix, score in hyps:
        assert abs(score - math.log(totals[prefix])) < 1e-6
    assert [s for _, s in hyps] == sorted((s for _, s in hyps), reverse=True)


def test_prefix_beam_search_empty_and_repeats():
    empty = np.zeros((0, 3))
    assert ctc_prefix_beam_search(empty, empty.astype(np.int64), 0) == [((), 0.0)]
    # a, blank, a  ->  "aa" ; a, a -> "a"
    logp = np.log(np.array([[0.999], [0.999], [0.999]]))
    assert ctc_prefix_beam_search(logp, np.array([[1], [0], [1]]), 3)[0][0] == (1, 1)
    assert ctc_prefix_beam_search(logp[:2], np.array([[1], [1]]), 2)[0][0] == (1,)


# ---------------------------------------------------------------- recognition
def test_decoder_feeds_padding_truncation_and_missing_rows():
    nbest = [(tuple([5] * 70), -1.5), ((4, 7), -2.0)]
    f = decoder_feeds(np.zeros((1, 3, 8), np.float32), np.array([3], np.int32), [nbest], SOS)
    hyps, r_hyps = f["hyps_pad_sos_eos"], f["r_hyps_pad_sos_eos"]
    assert hyps.shape == (1, 10, 64) and hyps.dtype == np.int64
    assert hyps[0, 0].tolist() == [SOS] + [5] * 62 + [SOS]  # cut to 62 tokens
    assert hyps[0, 1, :4].tolist() == [SOS, 4, 7, SOS] and r_hyps[0, 1, :4].tolist() == [SOS, 7, 4, SOS]
    assert f["hyps_lens_sos"][0].tolist() == [63, 3] + [1] * 8
    assert f["hyps_lens_sos"].dtype == np.int32 and f["ctc_score"].dtype == np.float32
    assert f["ctc_score"][0, :2].tolist() == [-1.5, -2.0]
    assert (f["ctc_score"][0, 2:] == MISSING_HYP_SCORE).all() and (hyps[0, 2:] == SOS).all()


@pytest.mark.parametrize("reverse", [True, False])
def test_recognize_uses_best_index_and_builds_decoder_inputs(reverse):
    words = ["cab", "see", "hi there", "zoo"]
    frames = [40, 80, 90, 30]
    feats = [spell(w, n) for w, n in zip(words, frames)]
    enc, dec = FakeEncoder(), FakeDecoder(choose=1, reverse=reverse)
    out = recognize(enc, dec, feats, VOCAB, batch_size=2)

    assert [o["ctc_greedy"] for o in out] == words
    assert [o["ctc_prefix"] for o in out] == words
    # Batches are sorted longest first (90, 80 | 40, 30); results come back in input order.
    batches = [[2, 1], [0, 3]]
    for enc_out, ids in zip(enc.calls, batches):
        assert enc_out["encoder_out_lens"].tolist() == [encoder_out_length(frames[i]) for i in ids]
    for enc_out, feeds, ids in zip(enc.calls, dec.calls, batches):
        hyps, lens = feeds["hyps_pad_sos_eos"], feeds["hyps_lens_sos"]
        assert hyps.shape == (2, 10, 64) and lens.shape == (2, 10)
        assert ("r_hyps_pad_sos_eos" in feeds) == reverse
        for b, i in enumerate(ids):
            t_out = int(enc_out["encoder_out_lens"][b])
            nbest = ctc_prefix_beam_search(enc_out["beam_log_probs"][b], enc_out["beam_log_probs_idx"][b], t_out)
            assert len(nbest) == 10 and list(nbest[0][0]) == VOCAB.encode(words[i])
            np.testing.assert_allclose(feeds["ctc_score"][b], [s for _, s in nbest], rtol=1e-6)
            for k, (hyp, _) in enumerate(nbest):
                n = len(hyp)
                assert lens[b, k] == n + 1
                assert hyps[b, k].tolist() == [SOS, *hyp] + [SOS] * (63 - n)
                if reverse:
                    assert feeds["r_hyps_pad_sos_eos"][b, k].tolist() == [SOS, *hyp[::-1]] + [SOS] * (63 - n)
            assert out[i]["rescored"] == VOCAB.decode(nbest[1][0]) != words[i]


def test_evaluate_scores_and_input_errors():
    words = ["cab", "see"]
    feats = [spell(w, 40) for w in words]
    res = evaluate(FakeEncoder(), FakeDecoder(choose=0), feats, words, VOCAB, progress=False)
    assert res["n_utts"] == 2 and res["cer_greedy"] == res["cer_prefix"] == res["cer_rescore"] == 0.0
    assert res["wer_rescore"] == 0.0 and res["utterances"][1]["ref"] == "see"
    res = evaluate(FakeEncoder(), FakeDecoder(choose=0), feats, ["cab", "sea"], VOCAB, progress=False)
    assert res["cer_greedy"] == pytest.approx(1 / 6) and res["wer_rescore"] == pytest.approx(1 / 2)

    bad = {
        "shape": np.zeros(40, np.float32),
        "dim": np.zeros((40, 81), np.float32),
        "nan": np.full((40, 80), np.nan, np.float32),
    }
    for f in bad.values():
        with pytest.raises(WorkbenchError, match="utterance 1"):
            evaluate(FakeEncoder(), FakeDecoder(), [feats[0], f], words, VOCAB, progress=False)
    with pytest.raises(WorkbenchError, match="2 feature matrices but 1 transcripts"):
        evaluate(FakeEncoder(), FakeDecoder(), feats, words[:1], VOCAB, progress=False)
    with pytest.raises(WorkbenchError, match="empty"):
        evaluate(FakeEncoder(), FakeDecoder(), [], [], VOCAB, progress=False)


# ---------------------------------------------------------------- hackathon check
def test_check_known_arrays():
    max_abs, median_rel = check(np.array([1.1, 2.0, 3.5]), np.array([1.0, 2.0, 3.0]), 1e-5)
    assert max_abs == pytest.approx(0.5)
    assert median_rel == pytest.approx(0.1 / (1 + 1e-5))


def _pool():
    rng = np.random.default_rng(7)
    return [rng.normal(size=(n, 80)).astype(np.float32) for n in (20, 150, 300)]


def test_make_cases_is_deterministic_and_shaped():
    grid = dict(batch_sizes=(1, 4), seq_lens=(16, 32))
    cases = make_cases(FakeEncoder(), _pool(), **grid)
    again = make_cases(FakeEncoder(), _pool(), **grid)
    for (bs, sl), feeds in cases["encoder"].items():
        assert feeds["speech"].shape == (bs, sl, 80) and feeds["speech"].dtype == np.float32
        lens = feeds["speech_lengths"]
        assert lens.dtype == np.int32 and lens.min() >= 7 and lens.max() == sl
        assert (lens < sl).sum() == bs // 4
        np.testing.assert_array_equal(feeds["speech"], again["encoder"][(bs, sl)]["speech"])
    for (bs, sl), feeds in cases["decoder"].items():
        assert feeds["encoder_out"].shape[:2] == (bs, sl)
        assert feeds["hyps_pad_sos_eos"].shape == (bs, 10, 64) and feeds["ctc_score"].shape == (bs, 10)
        np.testing.assert_array_equal(feeds["hyps_pad_sos_eos"], again["decoder"][(bs, sl)]["hyps_pad_sos_eos"])


def test_run_check_passes_identical_and_fails_perturbed():
    ref_enc, ref_dec = FakeEncoder(), FakeDecoder()
    cases = make_cases(ref_enc, _pool(), batch_sizes=(1, 4), seq_lens=(16,))
    rows = run_check(ref_enc, ref_dec, FakeEncoder(), FakeDecoder(), cases)
    assert len(rows) == 4 and all(r["passed"] for r in rows)
    assert all(r["max_abs"] == 0 and r["median_rel"] == 0 for r in rows)

    rows = run_check(ref_enc, ref_dec, FakeEncoder(shift=0.05), FakeDecoder(choose=2), cases)
    for r in rows:
        assert not r["passed"]
        feeds = cases[r["model"]][(r["bs"], r["sl"])]
        if r["model"] == "encoder":
            b = FakeEncoder().run(feeds)["encoder_out"].astype(np.float64)
            a = b + np.float32(0.05)
            assert r["max_abs"] == pytest.approx(0.05, rel=1e-4)
            assert r["median_rel"] == pytest.approx(np.median(np.abs(a - b) / (np.abs(b) + 5e-5)), rel=1e-4)
            assert r["lens_or_index_median_rel"] == 0
        else:
            assert r["lens_or_index_median_rel"] == pytest.approx(1 / (1 + 1e-5))  # index 2 vs 1
    table = format_table(rows)
    assert "Bad" in table and "0/4 cases passed" in table


# ---------------------------------------------------------------- ONNX Runtime runner
def _tiny_encoder(path, speech_name="speech"):
    speech = helper.make_tensor_value_info(speech_name, TensorProto.FLOAT, ["B", "T", 80])
    lengths = helper.make_tensor_value_info("speech_lengths", TensorProto.INT32, ["B"])
    outs = [
        helper.make_tensor_value_info("encoder_out", TensorProto.FLOAT, ["B", "T", 80]),
        helper.make_tensor_value_info("encoder_out_lens", TensorProto.INT32, ["B"]),
        helper.make_tensor_value_info("ctc_log_probs", TensorProto.FLOAT, ["B", "T", 80]),
        helper.make_tensor_value_info("beam_log_probs", TensorProto.FLOAT, ["B", "T", 10]),
        helper.make_tensor_value_info("beam_log_probs_idx", TensorProto.INT64, ["B", "T", 10]),
    ]
    nodes = [
        helper.make_node("Identity", [speech_name], ["encoder_out"]),
        helper.make_node("Identity", ["speech_lengths"], ["encoder_out_lens"]),
        helper.make_node("LogSoftmax", [speech_name], ["ctc_log_probs"], axis=-1),
        helper.make_node("TopK", ["ctc_log_probs", "k"], ["beam_log_probs", "beam_log_probs_idx"]),
    ]
    k = helper.make_tensor("k", TensorProto.INT64, [1], [10])
    graph = helper.make_graph(nodes, "tiny_encoder", [speech, lengths], outs, initializer=[k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_ort_runner(tmp_path):
    runner = open_onnx(_tiny_encoder(tmp_path / "enc.onnx"), threads=1)
    assert runner.kind == "encoder" and runner.input_names == ["speech", "speech_lengths"]
    speech = np.random.default_rng(0).normal(size=(2, 9, 80)).astype(np.float32)
    out = runner.run({"speech": speech, "speech_lengths": np.array([9, 7], np.int32)})
    assert out["beam_log_probs_idx"].shape == (2, 9, 10)
    np.testing.assert_array_equal(out["beam_log_probs_idx"][..., 0], speech.argmax(-1))

    with pytest.raises(WorkbenchError, match="speech_lengths"):
        runner.run({"speech": speech, "speech_lengths": np.array([9, 7], np.int64)})
    with pytest.raises(WorkbenchError, match="input speech .*last dimension 80"):
        runner.run({"speech": speech[..., :40], "speech_lengths": np.array([9, 7], np.int32)})
    with pytest.raises(WorkbenchError, match="missing inputs \\['speech_lengths'\\]"):
        runner.run({"speech": speech})

    with pytest.raises(WorkbenchError, match="missing encoder inputs speech; unexpected encoder inputs feats"):
        open_onnx(_tiny_encoder(tmp_path / "other.onnx", speech_name="feats"), kind="encoder")
    with pytest.raises(WorkbenchError, match="missing decoder inputs"):
        open_onnx(tmp_path / "enc.onnx", kind="decoder")

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"this is not a protobuf")
    with pytest.raises(WorkbenchError, match="corrupt.onnx"):
        open_onnx(corrupt)
    with pytest.raises(WorkbenchError, match="does not exist"):
        open_onnx(tmp_path / "absent.onnx")
