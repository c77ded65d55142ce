"""The synthetic speech corpus: fortunes sentences spoken by TTS voices, stored as fbank features.

Every utterance is a pure function of (seed, split, index), so the corpus is identical whatever the
worker count, and a split is regenerated only when its recipe (meta.json) changes.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from core.errors import WorkbenchError
from core.fsutil import atomic_dir, read_json, write_json

from .features import NUM_BINS, SAMPLE_RATE, fbank
from .fortunes import load_sentences
from .synth import executable, synthesize
from .voices import PITCH, RATE_WPM, SPLITS, voice_id, voices_for_split

# Bump whenever a change alters the generated data: existing splits are then regenerated.
GENERATOR_VERSION = 1
DEFAULT_SIZES = {"train": 20000, "calib": 512, "test": 750}  # test: 500 evaluated + 250 confirmation ([data])
SILENCE_S = (0.05, 0.3)  # leading and trailing silence, each drawn separately
# TTS output contains digital silence, whose log-mel floor (energy_floor 0) would differ between
# dithered train and undithered test features; a noise floor in the audio itself removes that mismatch.
NOISE_DB = (45.0, 70.0)  # below the speech RMS
DITHER = {"train": 1.0, "calib": 0.0, "test": 0.0}
FEATURE_DTYPE = {"train": np.float16, "calib": np.float32, "test": np.float32}
# A split is reused only if all of these match the request.
_RECIPE_KEYS = ("generator_version", "seed", "size", "text_hash", "voices")


def default_cache_dir() -> Path:
    """`$WB_CACHE/corpus`, or `.cache/corpus` in the repository (git-ignored)."""
    if os.environ.get("WB_CACHE"):
        return Path(os.environ["WB_CACHE"]) / "corpus"
    return Path(__file__).resolve().parent.parent / ".cache" / "corpus"


def sentence_pools(sentences: list[str]) -> dict[str, list[str]]:
    """Disjoint sentence lists per split, assigned by a hash of each sentence (about 5% test, 5% calib).

    Hashing, rather than position, keeps a sentence in the same split when the corpus grows or shrinks.
    """
    pools: dict[str, list[str]] = {s: [] for s in SPLITS}
    for sentence in sentences:
        bucket = int.from_bytes(hashlib.sha256(sentence.encode()).digest()[:8], "little") % 20
        pools["test" if bucket == 0 else "calib" if bucket == 1 else "train"].append(sentence)
    return pools


def _recipe(split: str, size: int, seed: int, sentences: list[str], voices: list[dict]) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "split": split,
        "seed": seed,
        "size": size,
        "text_hash": hashlib.sha256("\n".join(sentences).encode()).hexdigest(),
        "voices": [voice_id(v) for v in voices],
        "sample_rate": SAMPLE_RATE,
        "num_bins": NUM_BINS,
        "dither": DITHER[split],
        "dtype": np.dtype(FEATURE_DTYPE[split]).name,
    }


# Per-process generation state, set once per worker by _init_worker (sentence lists are large to pickle per task).
_STATE: dict = {}


def _init_worker(split: str, seed: int, sentences: list[str], voices: list[dict], workdir: Path) -> None:
    _STATE.update(split=split, split_index=SPLITS.index(split), seed=seed, sentences=sentences, voices=voices,
                  workdir=workdir)


def _init_pool_worker(*args) -> None:
    """A pool worker leaves Ctrl-C to the parent (which stops the pool), instead of each printing a traceback."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(*args)


def _make_utterance(index: int) -> tuple[np.ndarray, dict]:
    """Features and manifest row of one utterance; every random choice comes from its own RNG."""
    s = _STATE
    rng = np.random.default_rng([s["seed"], s["split_index"], index])
    text = s["sentences"][rng.integers(len(s["sentences"]))]
    voice = s["voices"][rng.integers(len(s["voices"]))]
    rate = int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1))
    pitch = int(rng.integers(PITCH[0], PITCH[1] + 1))
    lead, trail = (int(round(t * SAMPLE_RATE)) for t in rng.uniform(*SILENCE_S, size=2))
    noise_db = round(float(rng.uniform(*NOISE_DB)), 2)

    speech = synthesize(text, voice, rate, pitch, workdir=s["workdir"]).astype(np.float64)
    rms = float(np.sqrt(np.mean(speech**2))) if len(speech) else 0.0
    if rms == 0.0:
        raise WorkbenchError(f"{voice_id(voice)} produced silence for {text!r}")
    audio = np.concatenate([np.zeros(lead), speech, np.zeros(trail)])
    audio += rng.standard_normal(len(audio)) * rms * 10.0 ** (-noise_db / 20.0)
    audio = np.clip(audio, -1.0, 1.0)

    feats = fbank(audio, dither=DITHER[s["split"]], rng=rng).astype(FEATURE_DTYPE[s["split"]])
    row = {
        "index": index,
        "text": text,
        "voice": voice_id(voice),
        "rate": rate,
        "pitch": pitch if voice["synth"] == "espeak-ng" else None,  # flite has no pitch control
        "duration": round(len(audio) / SAMPLE_RATE, 5),  # exact to the sample
        "frames": len(feats),
        "noise_db": noise_db,
    }
    return feats, row


def _write_npy_from_raw(raw: Path, npy: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """Turn a headerless stream of C-order values into a .npy file (the shape is known only at the end)."""
    with open(npy, "wb") as out, open(raw, "rb") as src:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(out, header)
        shutil.copyfileobj(src, out, 1 << 24)
    raw.unlink()


def _generate(cache_dir: Path, recipe: dict, sentences: list[str], voices: list[dict],
              workers: int | None, progress: bool) -> Path:
    split, size = recipe["split"], recipe["size"]
    for synth in sorted({v["synth"] for v in voices}):
        executable(synth)  # fail before any work if a synthesizer is missing
    workers = max(1, min(workers or os.cpu_count() or 1, size))
    target = cache_dir / split
    with atomic_dir(target) as tmp:
        # Temporary WAVs live inside the split's temp dir: a worker killed after an error elsewhere
        # cannot clean up after itself, but atomic_dir removes the whole directory.
        workdir = tmp / "tts"
        workdir.mkdir()
        init_args = (split, recipe["seed"], sentences, voices, workdir)
        offsets = [0]
        with open(tmp / "feats.raw", "wb") as feats_out, open(tmp / "manifest.jsonl", "w") as manifest_out, \
                tqdm(total=size, desc=f"corpus {split}", unit="utt", disable=not progress) as bar:
            if workers == 1:
                _init_worker(*init_args)
                results = map(_make_utterance, range(size))
                pool = None
            else:
                pool = multiprocessing.Pool(workers, initializer=_init_pool_worker, initargs=init_args)
                results = pool.imap(_make_utterance, range(size), chunksize=max(1, min(16, size // (4 * workers))))
            try:
                for feats, row in results:
                    feats_out.write(np.ascontiguousarray(feats).tobytes())
                    manifest_out.write(json.dumps(row) + "\n")
                    offsets.append(offsets[-1] + len(feats))
                    bar.update()
            finally:
                if pool is not None:
                    pool.terminate()
                    pool.join()
        workdir.rmdir()
        _write_npy_from_raw(tmp / "feats.raw", tmp / "feats.npy", FEATURE_DTYPE[split], (offsets[-1], NUM_BINS))
        np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        write_json(tmp / "meta.json", {**recipe, "frames": offsets[-1]})
    return target


def _recipe_matches(split_dir: Path, recipe: dict, at_least: bool = False) -> bool:
    """Whether the split on disk is the one `recipe` makes; `at_least`: or a larger one of the same recipe, whose
    first `size` utterances are exactly those (every utterance comes from its own RNG, seeded by its index)."""
    try:
        meta = json.loads((split_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict):
        return False
    if at_least:
        size = meta.get("size")
        return (isinstance(size, int) and size >= recipe["size"]
                and all(meta.get(k) == recipe[k] for k in _RECIPE_KEYS if k != "size"))
    return all(meta.get(k) == recipe[k] for k in _RECIPE_KEYS)


def _check_size(split: str, size: int) -> None:
    if size < 1:
        raise WorkbenchError(f"corpus split {split!r} needs at least one utterance, got size {size}")


def generate_split(cache_dir: str | os.PathLike, split: str, size: int, seed: int = 0,
                   workers: int | None = None, progress: bool = True) -> Path:
    """(Re)generate one split under `cache_dir/split`; returns that directory."""
    voices = voices_for_split(split)
    _check_size(split, size)
    sentences = sentence_pools(load_sentences())[split]
    recipe = _recipe(split, size, seed, sentences, voices)
    return _generate(Path(cache_dir), recipe, sentences, voices, workers, progress)


def ensure_corpus(cache_dir: str | os.PathLike | None = None, sizes: dict[str, int] | None = None, seed: int = 0,
                  workers: int | None = None, progress: bool = True, at_least: bool = False) -> Path:
    """Make the splits named in `sizes` (default DEFAULT_SIZES) exist, reusing any whose recipe is unchanged.
    `at_least`: a split of the same recipe with more utterances is reused too (callers read its first `size`)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sizes = DEFAULT_SIZES if sizes is None else sizes
    pools = sentence_pools(load_sentences())
    for split, size in sizes.items():
        voices = voices_for_split(split)
        _check_size(split, size)
        recipe = _recipe(split, size, seed, pools[split], voices)
        if not _recipe_matches(cache_dir / split, recipe, at_least):
            _generate(cache_dir, recipe, pools[split], voices, workers, progress)
    return cache_dir


class Split:
    """A generated split, memory-mapped: features are read from disk only when asked for."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.meta = read_json(directory / "meta.json")
        self.name = self.meta["split"]
        self.feats = np.load(directory / "feats.npy", mmap_mode="r")  # all frames, concatenated
        self.offsets = np.load(directory / "offsets.npy")
        with open(directory / "manifest.jsonl") as f:
            self.manifest = [json.loads(line) for line in f]

    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def texts(self) -> list[str]:
        return [row["text"] for row in self.manifest]

    def features(self, i: int) -> np.ndarray:
        """Utterance i's features, float32 [T, 80]."""
        if not 0 <= i < len(self):
            raise IndexError(f"utterance {i} out of range for split {self.name!r} of {len(self)}")
        return np.array(self.feats[self.offsets[i]:self.offsets[i + 1]], dtype=np.float32)


def load_split(cache_dir: str | os.PathLike, split: str) -> Split:
    directory = Path(cache_dir) / split
    if not (directory / "meta.json").is_file():
        raise WorkbenchError(
            f"corpus split {split!r} not found in {Path(cache_dir)}: generate it first with "
            f"`wb data --cache {Path(cache_dir)} --splits {split}`"
        )
    return Split(directory)


def cmvn_stats(split: Split, chunk_frames: int = 100_000) -> dict:
    """Global CMVN statistics in WeNet's JSON format: per-bin sums of x and x^2 over all frames."""
    feats = split.feats
    total = np.zeros(NUM_BINS)
    total_sq = np.zeros(NUM_BINS)
    for start in range(0, len(feats), chunk_frames):
        chunk = np.asarray(feats[start:start + chunk_frames], dtype=np.float64)
        total += chunk.sum(axis=0)
        total_sq += (chunk**2).sum(axis=0)
    return {"mean_stat": total.tolist(), "var_stat": total_sq.tolist(), "frame_num": int(len(feats))}
