"""The machine a number was measured on: CPU model, the int8-relevant instruction sets, library versions.

INT8 accuracy and speed on a CPU depend on the instruction set. ONNX Runtime's x86 U8S8/S8S8 kernels without
VNNI multiply-add pairs of u8 x s8 products into int16 with saturation (VPMADDUBSW), so the same graph loses
accuracy on an AVX2-only CPU that it keeps on an AVX-512 VNNI / AVX-VNNI / AMX one (measured on the tiny encoder:
relative error 0.16-0.20 on AVX2 against 0.02 with fake-quant arithmetic). Every run therefore records these
facts, and a comparison of runs measured on different ISAs is flagged.
"""
from __future__ import annotations

import functools
import platform
from pathlib import Path

# /proc/cpuinfo flag names (x86 "flags", Arm "Features") that matter for int8 kernels.
X86_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
ARM_FLAGS = ("asimddp", "i8mm", "sve")


def parse_cpuinfo(text: str, machine: str | None = None) -> dict:
    """{"model", "arch", "flags": {flag: bool}, "isa", "vnni"} from the text of /proc/cpuinfo.

    isa: the best int8 dot-product path, one of "amx", "avx512-vnni", "avx-vnni", "avx512", "avx2",
    "arm-i8mm", "arm-dotprod", "other". vnni: True when int8 products accumulate without int16 saturation
    (VNNI or AMX on x86; the Arm dot-product instructions accumulate in int32 too)."""
    model, present = "", set()
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = val.strip()
        elif key in ("flags", "features"):
            present.update(val.split())
    arch = machine or platform.machine()
    arm = arch in ("aarch64", "arm64") or bool(present & {"asimd", "asimddp"})
    names = ARM_FLAGS if arm else X86_FLAGS
    flags = {f: f in present for f in names}
    if arm:
        isa = "arm-i8mm" if flags["i8mm"] else "arm-dotprod" if flags["asimddp"] else "other"
        vnni = isa != "other"
    else:
        isa = ("amx" if flags["amx_int8"] else "avx512-vnni" if flags["avx512_vnni"] else
               "avx-vnni" if flags["avx_vnni"] else "avx512" if flags["avx512f"] else
               "avx2" if flags["avx2"] else "other")
        vnni = isa in ("amx", "avx512-vnni", "avx-vnni")
    return {"model": model or platform.processor() or "unknown", "arch": arch, "flags": flags, "isa": isa,
            "vnni": vnni}


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """`parse_cpuinfo` of this machine (an empty description where /proc/cpuinfo is unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return parse_cpuinfo(text)


def library_versions() -> dict:
    """Versions of the libraries whose kernels produce the numbers (absent ones left out)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("onnxruntime", "onnx", "torch", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def host_info() -> dict:
    """What every measurement record carries: {"cpu": cpu_info(), "versions": library_versions()}."""
    return {"cpu": cpu_info(), "versions": library_versions()}


def describe(host: dict) -> str:
    """One line for reports: 'AMD EPYC (x86_64), int8 ISA avx2 (no VNNI)'."""
    cpu = host.get("cpu") or {}
    vnni = "VNNI" if cpu.get("vnni") else "no VNNI"
    return f"{cpu.get('model', 'unknown CPU')} ({cpu.get('arch', '?')}), int8 ISA {cpu.get('isa', '?')} ({vnni})"


def same_isa(a: dict | None, b: dict | None) -> bool:
    """Whether two host records measured on the same int8 ISA (unknown counts as different)."""
    ia, ib = ((h or {}).get("cpu", {}).get("isa") for h in (a, b))
    return ia is not None and ia == ib
