"""core.host: the int8 ISA read from /proc/cpuinfo texts of real CPU kinds, and how the ONNX Runtime recipe's
mode follows it."""
import pytest

from core.host import describe, host_info, parse_cpuinfo, same_isa
from graph.placement import ort_mode_for, resolve_ort_mode
from core.errors import WorkbenchError

EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme de pse tsc msr sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand avx2 bmi2
"""
XEON_VNNI = """model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bitalg
"""
SKYLAKE_AVX512 = """model name\t: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz
flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512cd avx512bw avx512vl
"""
ALDER_LAKE = """model name\t: 12th Gen Intel(R) Core(TM) i7-12700
flags\t\t: fpu sse2 avx avx2 avx_vnni
"""
SAPPHIRE = """model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: avx2 avx512f avx512bw avx512_vnni amx_bf16 amx_tile amx_int8
"""
GRAVITON = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize("text, machine, isa, vnni, mode", [
    (EPYC_AVX2, "x86_64", "avx2", False, "u8s8-rr"),
    (SKYLAKE_AVX512, "x86_64", "avx512", False, "u8s8-rr"),  # AVX-512 without VNNI saturates too
    (XEON_VNNI, "x86_64", "avx512-vnni", True, "u8s8"),
    (ALDER_LAKE, "x86_64", "avx-vnni", True, "u8s8"),
    (SAPPHIRE, "x86_64", "amx", True, "u8s8"),
    (GRAVITON, "aarch64", "arm-dotprod", True, "u8s8"),
    ("", "x86_64", "other", False, "u8s8-rr"),
])
def test_isa_from_cpuinfo(text, machine, isa, vnni, mode):
    cpu = parse_cpuinfo(text, machine)
    assert (cpu["isa"], cpu["vnni"], cpu["arch"]) == (isa, vnni, machine)
    assert ort_mode_for(cpu) == mode


def test_flags_and_model_are_read():
    cpu = parse_cpuinfo(EPYC_AVX2, "x86_64")
    assert cpu["model"] == "AMD EPYC"
    assert cpu["flags"] == {"avx2": True, "avx512f": False, "avx512bw": False, "avx512_vnni": False,
                            "avx_vnni": False, "amx_int8": False}
    assert parse_cpuinfo(GRAVITON, "aarch64")["flags"] == {"asimddp": True, "i8mm": False, "sve": False}


def test_host_record_and_comparison():
    host = host_info()
    assert {"cpu", "versions"} <= set(host) and "onnxruntime" in host["versions"]
    assert host["cpu"]["isa"] in describe(host)
    a = {"cpu": parse_cpuinfo(EPYC_AVX2, "x86_64")}
    b = {"cpu": parse_cpuinfo(XEON_VNNI, "x86_64")}
    assert same_isa(a, a) and not same_isa(a, b) and not same_isa(a, None)


def test_ort_mode_resolution():
    assert resolve_ort_mode("auto") == ort_mode_for(host_info()["cpu"])
    assert resolve_ort_mode("s8s8") == "s8s8"
    with pytest.raises(WorkbenchError, match="unknown ONNX Runtime int8 mode"):
        resolve_ort_mode("u4")
