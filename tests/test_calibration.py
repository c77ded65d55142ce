"""PTQ calibration (quant/): histogram exactness, every method against plain reference code, invariance, errors."""
from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from scipy.stats import entropy as scipy_entropy

from quant.calibrate import calibrate
from quant.collect import Padding, collect_statistics, encoder_feeds, encoder_feed
from quant.histogram import TensorStats
from quant.methods import AMAX_FLOOR, amax_entropy, amax_mse, amax_percentile
from quant.table import CalibrationTable, read_trt_cache, write_trt_cache
from graph.analysis import analyze
from graph.placement import calibration_tensors
from quant.weights import per_channel_amax
from core.errors import WorkbenchError


# ============================================================================ references (plain, from the papers/code)
def ref_entropy(calib_hist, calib_bin_edges, num_bits=8, unsigned=False, stride=1, start_bin=128):
    """pytorch-quantization HistogramCalibrator._compute_amax_entropy, written out loop by loop."""
    bins = np.array(calib_hist, dtype=np.float64)
    bins[0] = bins[1]
    divergences, arguments = [], []
    nbins = 1 << (num_bits - 1 + int(unsigned))
    new_density_counts = np.zeros(nbins, dtype=np.float64)
    for i in range(start_bin, len(bins) + 1, stride):
        new_density_counts.fill(0)
        space = np.linspace(0, i, num=nbins + 1)
        digitized_space = np.digitize(range(i), space) - 1
        digitized_space[bins[:i] == 0] = -1
        for idx, digitized in enumerate(digitized_space):
            if digitized != -1:
                new_density_counts[digitized] += bins[idx]
        counter = Counter(digitized_space)
        for key, val in counter.items():
            if key != -1:
                new_density_counts[key] = new_density_counts[key] / val
        new_density = np.zeros(i, dtype=np.float64)
        for idx, digitized in enumerate(digitized_space):
            if digitized != -1:
                new_density[idx] = new_density_counts[digitized]
        reference_density = np.array(bins[:len(digitized_space)])
        reference_density[-1] += np.sum(bins[i:])
        divergences.append(scipy_entropy(reference_density, new_density))
        arguments.append(i)
    divergences = np.array(divergences)
    last_argmin = len(divergences) - 1 - np.argmin(divergences[::-1])
    return float(calib_bin_edges[last_argmin * stride + start_bin])


def ref_mse(calib_hist, calib_bin_edges, num_bits=8, unsigned=False, stride=1, start_bin=128):
    """pytorch-quantization _compute_amax_mse (fake_tensor_quant: narrow range, round half to even)."""
    counts = np.asarray(calib_hist, dtype=np.float64)
    edges = np.asarray(calib_bin_edges, dtype=np.float64)
    centers = (edges[1:] + edges[:-1]) / 2
    max_bound = (1 << (num_bits - 1 + int(unsigned))) - 1
    mses, arguments = [], []
    for i in range(start_bin, len(centers), stride):
        amax = centers[i]
        scale = max_bound / amax
        quant = np.clip(np.round(centers * scale), -max_bound, max_bound) / scale
        mses.append(((quant - centers) ** 2 * counts).mean())
        arguments.append(i)
    return float(centers[arguments[int(np.argmin(mses))]])


def ref_percentile(calib_hist, calib_bin_edges, percentile):
    total = calib_hist.sum()
    cdf = np.cumsum(calib_hist / total)
    idx = np.searchsorted(cdf, percentile / 100)
    return float(calib_bin_edges[idx])


def numpy_histogram_like(st: TensorStats, x: np.ndarray):
    """An independent numpy histogram of |x| on the bin layout our TensorStats ended with (cut at the max)."""
    n = int(np.floor(np.abs(x).max() / st.bin_width)) + 1
    return np.histogram(np.abs(x).astype(np.float64), bins=n, range=(0.0, n * st.bin_width))


DISTS = {
    "gauss": lambda r: r.normal(0, 1, 60_000),
    "t3": lambda r: r.standard_t(3, 60_000) * 2,
    "relu": lambda r: np.maximum(r.normal(0.5, 1, 60_000), 0),
    "bimodal": lambda r: np.concatenate([r.normal(0, 0.1, 50_000), r.normal(5, 0.5, 300)]),
    "sparse": lambda r: r.choice([0.0, 1.0, 2.5, -7.0], 5_000),
}


# ============================================================================ histogram
def test_histogram_is_exact_and_order_invariant():
    rng = np.random.default_rng(0)
    x = (rng.standard_t(2, 200_000) * 3).astype(np.float32)
    whole = TensorStats("x")
    whole.update(x)
    chunked = TensorStats("x")
    for part in np.array_split(rng.permutation(x), 97):  # growing range: many doublings
        chunked.update(part)
    merged, other = TensorStats("x"), TensorStats("x")
    merged.update(x[:7])
    other.update(x[7:])
    merged.merge(other)
    for st in (chunked, merged):
        assert st.exponent == whole.exponent and np.array_equal(st.counts, whole.counts)
        assert st.count == x.size and st.min == x.min() and st.max == x.max()
    ref, _ = np.histogram(np.abs(x), bins=whole.nbins, range=(0, whole.top))
    assert np.array_equal(ref, whole.counts)
    counts, _ = whole.occupied()
    assert len(counts) > whole.nbins // 2  # the max sits in the upper half: >= 1025 bins over [0, max]


def test_histogram_rejects_nonfinite_without_changing_state():
    from quant.histogram import NonFiniteError

    st = TensorStats("x")
    st.update(np.ones(10, np.float32))
    before = st.counts.copy()
    with pytest.raises(NonFiniteError):
        st.update(np.array([1.0, np.nan], np.float32))
    with pytest.raises(NonFiniteError):
        st.update(np.array([np.inf], np.float32))
    assert st.count == 10 and np.array_equal(st.counts, before)


# ============================================================================ methods vs references
@pytest.mark.parametrize("dist", sorted(DISTS))
def test_methods_match_reference_within_one_bin(dist):
    x = DISTS[dist](np.random.default_rng(1)).astype(np.float32)
    st = TensorStats("x", nbins=256 if dist == "sparse" else 512)  # small histograms keep the plain loops fast
    for part in np.array_split(x, 5):
        st.update(part)
    hist, edges = numpy_histogram_like(st, x)
    w, amax = st.bin_width, float(np.abs(x).max())
    assert abs(min(ref_entropy(hist, edges), amax) - amax_entropy(st)) <= w
    assert abs(min(ref_mse(hist, edges), amax) - amax_mse(st)) <= w
    for p in (99.0, 99.9, 99.99):
        assert abs(min(ref_percentile(hist, edges, p), amax) - amax_percentile(st, p)) <= w
    # ranges never exceed max
    for v in (amax_entropy(st), amax_mse(st), amax_percentile(st, 99.999)):
        assert 0 < v <= amax


def test_constant_and_zero_tensors_give_positive_scale():
    for value in (0.0, 3.0, -2.0):
        st = TensorStats("c")
        st.update(np.full(1000, value, np.float32))
        for v in (amax_entropy(st), amax_mse(st), amax_percentile(st, 99.99)):
            assert v > 0 and np.isfinite(v)
            assert v <= max(abs(value), AMAX_FLOOR)
        if value:
            assert amax_entropy(st) == pytest.approx(abs(value))
    assert amax_entropy(TensorStats("empty")) == AMAX_FLOOR


# ============================================================================ models
def _features(n, seed=0, lo=60, hi=200, fixed=None):
    rng = np.random.default_rng(seed)
    return [(rng.normal(0, 2, ((fixed or int(rng.integers(lo, hi))), 80)) + 10).astype(np.float32) for _ in range(n)]


class FakeSplit:
    def __init__(self, feats):
        self.feats = feats

    def __len__(self):
        return len(self.feats)

    def features(self, i):
        return self.feats[i]


def _frame_model(path, nan_op=False):
    """speech [B,T,80] -> MatMul -> Relu -> MatMul -> encoder_out [B,T,8]; encoder_out_lens = speech_lengths.
    Frame-wise, so valid outputs never depend on padding. nan_op first takes Sqrt(speech - 5) (NaN below 5)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.1, (80, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (16, 8)).astype(np.float32), "w2")
    nodes = [helper.make_node("Sub", ["speech", "five"], ["rs"], name="sub"),
             helper.make_node("Sqrt", ["rs"], ["r2"], name="sqrt")] if nan_op else []
    nodes += [helper.make_node("MatMul", ["r2" if nan_op else "speech", "w1"], ["h"], name="fc1"),
              helper.make_node("Relu", ["h"], ["r"], name="relu"),
              helper.make_node("MatMul", ["r", "w2"], ["encoder_out"], name="fc2"),
              helper.make_node("Identity", ["speech_lengths"], ["encoder_out_lens"], name="lens")]
    inits = [w1, w2] + ([numpy_helper.from_array(np.array(5.0, np.float32), "five")] if nan_op else [])
    g = helper.make_graph(nodes, "frame", [
        helper.make_tensor_value_info("speech", TensorProto.FLOAT, ["B", "T", 80]),
        helper.make_tensor_value_info("speech_lengths", TensorProto.INT32, ["B"])], [
        helper.make_tensor_value_info("encoder_out", TensorProto.FLOAT, ["B", "T", 8]),
        helper.make_tensor_value_info("encoder_out_lens", TensorProto.INT32, ["B"])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(m, path)
    return str(path)


KEYS = ["max", "percentile_99.9", "percentile_99.99", "percentile_99.999", "entropy", "mse"]


def _amax_all(table):
    return {t: table.data["tensors"][t]["amax"] for t in table.tensors}


def _bin(table, t):
    return table.data["tensors"][t]["histogram"]["bin_width"]


def test_quantizable_inputs_and_weight_axes(tiny_onnx):
    enc, _ = tiny_onnx
    qins = analyze(enc, include_act_matmul=False).quantizable
    ops = Counter(q.op for q in qins)
    assert ops["Conv"] == 8 and ops["MatMul"] >= 10
    assert all(q.weight for q in qins)
    with_act = analyze(enc).quantizable
    assert len(with_act) == len(qins) + 6  # 3 activation x activation MatMuls per block, 2 blocks
    assert all(len(q.act_inputs) == 2 for q in with_act if q.kind == "act_matmul")
    conv = next(q for q in qins if q.op == "Conv")
    mm = next(q for q in qins if q.op == "MatMul")
    assert conv.weight_axis == 0 and mm.weight_axis == 1
    w = np.arange(24, dtype=np.float32).reshape(4, 6) - 12
    assert per_channel_amax(w, 1).tolist() == np.abs(w).max(axis=0).tolist()
    assert per_channel_amax(np.zeros((3, 2)), 0).min() == AMAX_FLOOR


def test_max_matches_onnxruntime_minmax(tiny_onnx, tmp_path):
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    enc, _ = tiny_onnx
    feats = _features(6, seed=3)
    batches = [encoder_feed([f]) for f in feats]  # batch 1: ORT's MinMax counts padding, so use none

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    cal = create_calibrator(enc, ["MatMul", "Conv"], augmented_model_path=str(tmp_path / "aug.onnx"),
                            calibrate_method=CalibrationMethod.MinMax)
    cal.collect_data(Reader())
    ranges = cal.compute_data()
    names = sorted({t for q in analyze(enc, include_act_matmul=False).quantizable for t in q.act_inputs})
    res = collect_statistics(enc, names, batches, padding=Padding(), progress=False)
    checked = 0
    for n in names:
        if n in ranges.data:
            lo, hi = (float(np.asarray(v).reshape(-1)[0]) for v in ranges.data[n].range_value)
            st = res.stats[n]
            assert st.min == pytest.approx(lo, rel=1e-6, abs=1e-6) and st.max == pytest.approx(hi, rel=1e-6, abs=1e-6)
            assert abs(st.amax - max(abs(lo), abs(hi))) <= st.bin_width
            checked += 1
    assert checked >= len(names) - 2


def test_batch_size_and_order_invariance_tiny_wenet(tiny_onnx):
    """Equal-length utterances (WeNet's conv module leaks padding into valid frames, see quant.collect), so the
    FP32 activations are the same whatever the batching; every method must then agree within one bin."""
    enc, _ = tiny_onnx
    split = FakeSplit(_features(64, seed=5, fixed=96))
    order = list(np.random.default_rng(0).permutation(64))
    tables = [calibrate(enc, encoder_feeds(split, bs, indices=idx), progress=False, weight_method=None)
              for bs, idx in ((1, None), (8, None), (64, None), (8, order))]
    ref = _amax_all(tables[0])
    for t in tables[1:]:
        got = _amax_all(t)
        for name in ref:
            for k in KEYS:
                assert abs(got[name][k] - ref[name][k]) <= _bin(tables[0], name), (name, k)


def test_padding_ignored_gives_batch_one_statistics(tmp_path):
    model = _frame_model(tmp_path / "frame.onnx")
    split = FakeSplit(_features(24, seed=7))
    names = ["speech", "r", "encoder_out"]
    one = collect_statistics(model, names, encoder_feeds(split, 1), padding=Padding(), progress=False).stats
    eight = collect_statistics(model, names, encoder_feeds(split, 8), padding=Padding(), progress=False).stats
    counted = collect_statistics(model, names, encoder_feeds(split, 8), padding=None, progress=False).stats
    for n in names:
        assert one[n].count == eight[n].count == sum(f.shape[0] for f in split.feats) * (80 if n == "speech" else
                                                                                          16 if n == "r" else 8)
        assert np.array_equal(one[n].counts, eight[n].counts) and one[n].exponent == eight[n].exponent
        assert counted[n].count > one[n].count


# ============================================================================ table, cache
def test_table_roundtrip_and_trt_cache(tiny_onnx, tmp_path):
    enc, _ = tiny_onnx
    table = calibrate(enc, encoder_feeds(FakeSplit(_features(8, seed=2)), 4), progress=False)
    path = tmp_path / "table.json"
    table.save(path)
    loaded = CalibrationTable.load(path)
    assert json.loads(path.read_text())["format"] == "wb-calibration-table/1"
    assert loaded.default_method == "entropy" and set(KEYS) <= set(loaded.methods)
    t = loaded.tensors[0]
    assert loaded.scale(t) == pytest.approx(loaded.amax(t, "entropy") / 127)
    mx = loaded.with_method("max")
    assert mx.scale(t) == pytest.approx(loaded.amax(t, "max") / 127) and mx.default_method == "max"
    for name in loaded.tensors:
        e = loaded.data["tensors"][name]["amax"]
        assert e["entropy"] <= e["max"] and e["percentile_99.999"] <= e["max"] and e["mse"] <= e["max"]
    with pytest.raises(WorkbenchError, match="no_such_tensor"):
        loaded.scale("no_such_tensor")
    assert loaded.data["weights"] and all(len(w["amax"]) > 1 for w in loaded.data["weights"].values())
    cache = tmp_path / "calib.cache"
    loaded.write_trt_cache(cache)
    header, amaxes = read_trt_cache(cache)
    assert header.startswith("TRT-") and set(amaxes) == set(loaded.tensors)
    for name, a in amaxes.items():
        assert a == pytest.approx(loaded.amax(name), rel=1e-6)
    lines = cache.read_text().splitlines()
    assert lines[0] == "TRT-8601-EntropyCalibration2" and len(lines[1].rsplit(": ", 1)[1]) == 8


def test_trt_cache_known_bits(tmp_path):
    write_trt_cache(tmp_path / "c", {"a:b": 1.0, "x": 0.5})
    assert (tmp_path / "c").read_text().splitlines()[1:] == ["a:b: 3f800000", "x: 3f000000"]
    assert read_trt_cache(tmp_path / "c")[1] == {"a:b": 127.0, "x": 63.5}
    (tmp_path / "bad").write_text("hello\n")
    with pytest.raises(WorkbenchError, match="not a TensorRT calibration cache"):
        read_trt_cache(tmp_path / "bad")


# ============================================================================ bad input
def test_bad_inputs_raise_clear_errors(tiny_onnx, tmp_path):
    enc, _ = tiny_onnx
    good = _features(3, seed=4)
    with pytest.raises(WorkbenchError, match="empty"):
        calibrate(enc, [], progress=False)
    with pytest.raises(WorkbenchError, match="'nope'.*does not exist"):
        calibrate(enc, [encoder_feed(good)], tensors=["nope"], progress=False)
    bad = encoder_feed(good)
    bad["speech"][1, 5, 3] = np.nan
    with pytest.raises(WorkbenchError, match=r"input 'speech'.*sample 4 .*batch 1"):
        calibrate(enc, [encoder_feed(good), bad], progress=False)
    f = encoder_feed(good)
    with pytest.raises(WorkbenchError, match="input 'speech' has dtype float64"):
        calibrate(enc, [{"speech": f["speech"].astype(np.float64), "speech_lengths": f["speech_lengths"]}],
                  progress=False)
    with pytest.raises(WorkbenchError, match="input 'speech' has shape .*80 on axis 2"):
        calibrate(enc, [{"speech": f["speech"][:, :, :40].copy(), "speech_lengths": f["speech_lengths"]}],
                  progress=False)
    with pytest.raises(WorkbenchError, match="'speech_lengths' is missing"):
        calibrate(enc, [{"speech": f["speech"]}], progress=False)
    with pytest.raises(WorkbenchError, match="input 'feats' does not exist"):
        calibrate(enc, [dict(f, feats=f["speech"])], progress=False)
    nan_model = _frame_model(tmp_path / "nan.onnx", nan_op=True)
    low = np.full((30, 80), 10, np.float32)
    low[3, 7] = 1.0  # sqrt(1 - 5): NaN for sample 1 only
    feeds = [encoder_feed([np.full((30, 80), 10, np.float32), low])]
    with pytest.raises(WorkbenchError, match=r"tensor 'r2' has NaN for calibration sample 1 "):
        calibrate(nan_model, feeds, tensors=["r2"], progress=False)


def _write_split(root, feats):
    d = root / "calib"
    d.mkdir(parents=True)
    np.save(d / "feats.npy", np.concatenate(feats))
    np.save(d / "offsets.npy", np.cumsum([0] + [f.shape[0] for f in feats]))
    (d / "meta.json").write_text(json.dumps({"split": "calib"}))
    (d / "manifest.jsonl").write_text("".join(json.dumps({"text": "x"}) + "\n" for _ in feats))


def test_cli_writes_table_and_cache_or_nothing(tiny_onnx, tmp_path):
    from workbench.commands import calibrate as cmd

    enc, _ = tiny_onnx
    _write_split(tmp_path / "corpus", _features(6, seed=9))
    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers())
    out, cache = tmp_path / "t.json", tmp_path / "t.cache"
    args = parser.parse_args(["calibrate", "--model", str(enc), "--cache", str(tmp_path / "corpus"), "--limit", "5",
                              "--batch-size", "2", "--methods", "max,entropy", "--out", str(out),
                              "--trt-cache", str(cache)])
    args.func(args)
    table = CalibrationTable.load(out)
    assert table.data["data"]["n_samples"] == 5 and table.methods == ["max", "entropy"]
    assert set(read_trt_cache(cache)[1]) == set(table.tensors)
    bad = tmp_path / "bad.json"
    args = parser.parse_args(["calibrate", "--model", str(enc), "--cache", str(tmp_path / "corpus"),
                              "--methods", "max,kl", "--out", str(bad)])
    with pytest.raises(WorkbenchError, match="unknown calibration method 'kl'"):
        args.func(args)
    assert not bad.exists() and not list(tmp_path.glob(".bad.json*"))
