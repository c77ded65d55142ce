"""The synthetic corpus: determinism, the voice and sentence split rules, reuse, and error paths."""
import json
import os
import stat

import numpy as np
import pytest

from calibration_data.corpus import cmvn_stats, ensure_corpus, generate_split, load_split, sentence_pools
from calibration_data.fortunes import MAX_CHARS, load_sentences
from calibration_data.text import DEFAULT_VOCAB, normalize
from calibration_data.voices import SPLITS, voice_id, voices_for_split
from core.errors import WorkbenchError

SIZES = {"train": 6, "calib": 4, "test": 6}
ALLOWED = set("abcdefghijklmnopqrstuvwxyz' ")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return ensure_corpus(tmp_path_factory.mktemp("cache") / "corpus", SIZES, seed=3, workers=2, progress=False)


def _files(split_dir):
    return {name: (split_dir / name).read_bytes() for name in ("feats.npy", "offsets.npy", "manifest.jsonl")}


def test_generation_is_deterministic_whatever_the_workers(corpus, tmp_path):
    for split in ("train", "test"):  # train also exercises the seeded dither
        again = generate_split(tmp_path / "one", split, SIZES[split], seed=3, workers=1, progress=False)
        assert _files(again) == _files(corpus / split)
    other_seed = generate_split(tmp_path / "other", "test", SIZES["test"], seed=4, workers=1, progress=False)
    assert _files(other_seed)["feats.npy"] != _files(corpus / "test")["feats.npy"]


def test_test_voices_never_in_train():
    ids = {split: {voice_id(v) for v in voices_for_split(split)} for split in SPLITS}
    assert ids["test"] and not ids["test"] & (ids["train"] | ids["calib"])
    assert all(v.startswith("espeak-ng:") for v in ids["test"])
    assert any(v.startswith("flite:") for v in ids["train"])


def test_manifest_voices_follow_the_split_rule(corpus):
    used = {split: {row["voice"] for row in load_split(corpus, split).manifest} for split in SPLITS}
    train_ids = {voice_id(v) for v in voices_for_split("train")}
    assert used["test"] <= {voice_id(v) for v in voices_for_split("test")}
    assert not used["test"] & train_ids and used["train"] <= train_ids


def test_sentence_pools_are_disjoint(corpus):
    pools = {split: set(p) for split, p in sentence_pools(load_sentences()).items()}
    assert all(pools.values())
    assert not pools["test"] & pools["train"] and not pools["calib"] & pools["train"]
    assert not pools["test"] & pools["calib"]
    for split in SPLITS:
        assert set(load_split(corpus, split).texts) <= pools[split]


def test_texts_obey_vocabulary_and_length(corpus):
    texts = [t for split in SPLITS for t in load_split(corpus, split).texts]
    for text in texts + load_sentences()[:2000]:
        assert set(text) <= ALLOWED and 8 <= len(text) <= MAX_CHARS == 60
        assert normalize(text) == text and len(text.split()) >= 2
        assert DEFAULT_VOCAB.unk not in DEFAULT_VOCAB.encode(text)


def test_manifest_and_features_are_consistent(corpus):
    for split, dtype in (("train", np.float16), ("test", np.float32)):
        data = load_split(corpus, split)
        assert len(data) == SIZES[split] and data.feats.dtype == dtype
        assert data.offsets.dtype == np.int64 and data.offsets[-1] == len(data.feats)
        lines = (corpus / split / "manifest.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == data.manifest
        for i, row in enumerate(data.manifest):
            assert set(row) == {"index", "text", "voice", "rate", "pitch", "duration", "frames", "noise_db"}
            assert row["index"] == i and 130 <= row["rate"] <= 200 and 45 <= row["noise_db"] <= 70
            samples = round(row["duration"] * 16000)  # duration is exact to the sample
            assert row["frames"] == 1 + (samples - 400) // 160
            feats = data.features(i)
            assert feats.dtype == np.float32 and feats.shape == (row["frames"], 80) and np.isfinite(feats).all()


def test_cmvn_stats(corpus):
    data = load_split(corpus, "calib")
    stats = cmvn_stats(data)
    all_frames = np.concatenate([data.features(i) for i in range(len(data))]).astype(np.float64)
    assert stats["frame_num"] == len(all_frames)
    np.testing.assert_allclose(stats["mean_stat"], all_frames.sum(axis=0), rtol=1e-9)
    np.testing.assert_allclose(stats["var_stat"], (all_frames**2).sum(axis=0), rtol=1e-9)
    json.dumps(stats)  # WeNet reads it as JSON


def test_ensure_corpus_reuses_unchanged_splits(corpus):
    mtimes = {s: (corpus / s / "meta.json").stat().st_mtime_ns for s in SPLITS}
    ensure_corpus(corpus, SIZES, seed=3, workers=2, progress=False)
    assert {s: (corpus / s / "meta.json").stat().st_mtime_ns for s in SPLITS} == mtimes
    ensure_corpus(corpus, {**SIZES, "calib": 3}, seed=3, workers=1, progress=False)
    assert (corpus / "calib" / "meta.json").stat().st_mtime_ns != mtimes["calib"]
    assert (corpus / "test" / "meta.json").stat().st_mtime_ns == mtimes["test"]
    assert len(load_split(corpus, "calib")) == 3
    ensure_corpus(corpus, SIZES, seed=3, workers=1, progress=False)  # back to the module's sizes


def test_missing_synthesizer(tmp_path, monkeypatch):
    monkeypatch.setenv("WB_ESPEAK", str(tmp_path / "no-such-espeak"))
    with pytest.raises(WorkbenchError, match="espeak-ng"):
        generate_split(tmp_path / "cache", "test", 2, progress=False)
    assert not (tmp_path / "cache").exists() or os.listdir(tmp_path / "cache") == []


def test_failing_synthesizer_reports_its_stderr(tmp_path, monkeypatch):
    fake = tmp_path / "espeak-ng"
    fake.write_text("#!/bin/sh\necho 'voice data is broken' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("WB_ESPEAK", str(fake))
    with pytest.raises(WorkbenchError, match="voice data is broken"):
        generate_split(tmp_path / "cache", "test", 4, workers=2, progress=False)
    assert os.listdir(tmp_path / "cache") == []  # no split and no temporary directory left


def test_unwritable_cache(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(WorkbenchError):
        generate_split(blocker / "corpus", "test", 2, progress=False)


def test_missing_split_and_corpus(tmp_path, monkeypatch):
    with pytest.raises(WorkbenchError, match="wb data --cache .* --splits"):
        load_split(tmp_path, "test")
    monkeypatch.setenv("WB_FORTUNES_DIR", str(tmp_path))
    with pytest.raises(WorkbenchError, match="apt-get install fortunes fortunes-min"):
        load_sentences()
