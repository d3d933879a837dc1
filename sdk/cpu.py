"""What the CPU running this process can do for int8 arithmetic, read with CPUID (not assumed).

On x86-64 without VNNI, ONNX Runtime's (MLAS) uint8 x int8 kernels multiply with ``vpmaddubsw``, which adds
two products into a signed 16-bit lane and saturates: 255 x 127 + 255 x 127 = 64770 does not fit in 32767.
A model whose activations and weights both reach their extremes then computes wrong sums (measured on an AVX2
CPU: the digits CNN's int8 package lost 1.56 points of accuracy, min output cosine 0.92, that the same package
does not lose on a VNNI CPU). VNNI's ``vpdpbusd`` accumulates in 32 bits and never saturates; ARM's NEON and
dot-product kernels widen first. ONNX Runtime's documented remedy is ``reduce_range``: weights in 7 bits
(-64..63), so 255 x 64 x 2 = 32640 fits. See https://onnxruntime.ai/docs/performance/model-optimizations/
quantization.html ("When and why do I need to try U8U8?").

CPUID is read through numpy's runtime dispatch table (numpy executes CPUID itself, so an emulated CPU reports
what it emulates, unlike /proc/cpuinfo, which shows the host's). AVX-VNNI (the 256-bit form) is not in that
table, so it is taken from /proc/cpuinfo.
"""
from __future__ import annotations

import functools
import platform

# Target flags (profile [target] cpu_flags, /proc/cpuinfo names) that guarantee non-saturating u8s8 kernels.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def _proc_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def host_int8_flags() -> frozenset[str]:
    """The int8-relevant features of this CPU, by CPUID where numpy reads it: a subset of
    {"x86_64", "avx2", "avx512f", "avx512_vnni", "avx_vnni"}."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return frozenset()
    out = {"x86_64"}
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as feats
        except ImportError:
            feats = None
    if feats is not None:
        for name, flag in (("AVX2", "avx2"), ("AVX512F", "avx512f"), ("AVX512VNNI", "avx512_vnni")):
            if feats.get(name):
                out.add(flag)
        # AVX-VNNI implies AVX2; only trust /proc/cpuinfo for it where CPUID agrees on AVX2.
        if "avx2" in out and "avx_vnni" in _proc_flags():
            out.add("avx_vnni")
    else:
        out |= _proc_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni"}
    return frozenset(out)


def host_int8_saturates() -> bool:
    """True where ONNX Runtime's u8s8 kernels saturate on this CPU (x86-64 without VNNI)."""
    flags = host_int8_flags()
    return "x86_64" in flags and not flags & set(VNNI_FLAGS)


def target_int8_may_saturate(arch: tuple[str, ...], cpu_flags: tuple[str, ...]) -> bool:
    """True where a device the profile admits may be x86-64 without VNNI."""
    return "x86_64" in arch and not set(cpu_flags) & set(VNNI_FLAGS)


def reduce_range_for(setting: bool | str, arch: tuple[str, ...], cpu_flags: tuple[str, ...]) -> tuple[bool, str]:
    """(reduce_range, why) for ONNX Runtime int8 weights under the profile's ``reduce_range`` setting."""
    if setting is True:
        return True, "the profile sets reduce_range = true"
    if setting is False:
        if host_int8_saturates():
            return False, ("the profile sets reduce_range = false, but this host's CPU (x86-64 without VNNI) "
                           "saturates u8s8 sums: the accuracy measured here is worse than on a VNNI/ARM device")
        return False, "the profile sets reduce_range = false"
    if target_int8_may_saturate(arch, cpu_flags):
        return True, ("the profile admits x86-64 devices without VNNI, whose u8s8 kernels saturate 16-bit sums "
                      "of full-range weights")
    if host_int8_saturates():
        return True, ("this host's CPU (x86-64 without VNNI) saturates full-range u8s8 sums, so the accuracy "
                      "gate measures the 7-bit weights that behave alike here and on the device")
    return False, "every device the profile admits has non-saturating int8 kernels (VNNI or ARM)"
