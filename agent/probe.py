"""Hardware probe: what this device is and which runtimes and devices it really has.

The result goes into the retained status message and decides whether a package can be installed:
:func:`can_run` refuses a package whose profile this device cannot run, with a reason naming what is
missing, before anything is extracted.
"""
from __future__ import annotations

import logging
import os
import platform
import struct
from pathlib import Path
from typing import Any

from ..sdk.package import Manifest

log = logging.getLogger(__name__)

# Linux's names for the aarch64 HWCAP / HWCAP2 bits (arch/arm64/include/uapi/asm/hwcap.h), the names
# /proc/cpuinfo prints as "Features" on a real ARM board.
_AARCH64_HWCAP = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma "
                  "lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca "
                  "pacg").split()
_AARCH64_HWCAP2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm "
                   "svef64mm svebf16 i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme sme_i16i64 sme_f64f64 "
                   "sme_i8i32 sme_f16f32 sme_b16f32 sme_f32f32 sme_fa64 wfxt ebf16 sve_ebf16 cssc rprfm sve2p1 "
                   "sme2 sme2p1 sme_i16i32 sme_bi32i32 sme_b16b16 sme_f16f16 mops hbc").split()
_AT_HWCAP, _AT_HWCAP2 = 16, 26
_MAX_AUXV_BYTES = 64 * 1024


def _auxv_features(auxv: bytes) -> list[str]:
    """aarch64 CPU features from the auxiliary vector (what the kernel, or QEMU, tells the process)."""
    words = dict(struct.iter_unpack("<QQ", auxv[: len(auxv) // 16 * 16]))
    names = [n for i, n in enumerate(_AARCH64_HWCAP) if words.get(_AT_HWCAP, 0) >> i & 1]
    names += [n for i, n in enumerate(_AARCH64_HWCAP2) if words.get(_AT_HWCAP2, 0) >> i & 1]
    return sorted(names)


def _parse_cpuinfo(text: str) -> tuple[str | None, list[str], str | None]:
    """(model, flags, which key held the flags: "flags" on x86, "features" on ARM)."""
    model, flags, key_seen = None, [], None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if model is None and key in ("model name", "hardware", "cpu model"):
            model = value.strip()
        elif not flags and key in ("flags", "features"):  # x86 "flags", ARM "Features"
            flags, key_seen = sorted(set(value.split())), key
    return model, flags, key_seen


def _cpuinfo(machine: str | None = None) -> tuple[str | None, list[str], str]:
    """(CPU model, CPU flags, where the flags came from)."""
    machine = machine or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    model, flags, key = _parse_cpuinfo(text)
    if machine == "aarch64":
        # The runtimes pick their ARM kernels (dot product, i8mm, SVE) from the auxiliary vector, so the
        # probe reads the same. Under QEMU user emulation /proc/cpuinfo is the x86 host's file: its "flags"
        # and model name describe another CPU and are dropped.
        try:
            with open("/proc/self/auxv", "rb") as fh:
                aux = _auxv_features(fh.read(_MAX_AUXV_BYTES))
        except OSError:
            aux = []
        if key == "flags":
            return None, aux, "auxv (/proc/cpuinfo describes another CPU: emulated)"
        if aux:
            return model or platform.processor() or None, aux, "auxv"
    return model or platform.processor() or None, flags, "cpuinfo" if flags else "none"


def _memory_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except ImportError:
        return None


def probe() -> dict[str, Any]:
    """OS, arch, CPU model and flags, cores, memory, and each runtime's devices (JSON-ready)."""
    from .runtimes import available_runtimes

    cpu_model, flags, flags_source = _cpuinfo()
    runtimes = available_runtimes()
    ov = runtimes.get("openvino", {})
    ort = runtimes.get("onnxruntime", {})
    tfl = runtimes.get("tflite", {})
    caps = {
        "os": platform.system(),
        "os_release": platform.release(),
        "arch": platform.machine(),
        "cpu_model": cpu_model,
        "cpu_flags": flags,
        "cpu_flags_source": flags_source,
        "cores_logical": os.cpu_count(),
        "cores_physical": _physical_cores(),
        "memory_bytes": _memory_bytes(),
        "python": platform.python_version(),
        "openvino_devices": ov.get("devices", []) if ov.get("available") else [],
        "ort_providers": ort.get("devices", []) if ort.get("available") else [],
        "tflite": bool(tfl.get("available")),
        "runtimes": runtimes,
    }
    log.debug("probe: %s", caps)
    return caps


def _has_device(wanted: str, devices: list[str]) -> bool:
    # OpenVINO lists several GPUs as GPU.0, GPU.1; a package for "GPU" runs on the first.
    return any(d == wanted or d.split(".", 1)[0] == wanted for d in devices)


def can_run(manifest: Manifest, capabilities: dict[str, Any]) -> tuple[bool, str]:
    """Whether this device can run the package; the reason names what is missing (or what matched)."""
    profile = manifest.profile or {}
    target = profile.get("target") or {}
    kind = str(target.get("device", "cpu"))
    label = f"{manifest.name} {manifest.version} (profile {manifest.profile_name}, {manifest.runtime} on " \
            f"{manifest.device})"

    arches = list(target.get("arch") or [])
    arch = capabilities.get("arch")
    if arches and arch not in arches:
        return False, f"{label} is built for {'/'.join(arches)}; this device is {arch}"

    flags = set(capabilities.get("cpu_flags") or [])
    missing_flags = [f for f in target.get("cpu_flags") or [] if f not in flags]
    if missing_flags:
        return False, f"{label} needs CPU flags {', '.join(missing_flags)}, which this CPU lacks"

    rt = (capabilities.get("runtimes") or {}).get(manifest.runtime)
    if not rt or not rt.get("available"):
        why = (rt or {}).get("reason") or "not registered"
        return False, f"{label} needs runtime {manifest.runtime}, which is not available here ({why})"

    devices = list(rt.get("devices") or [])
    bench = manifest.benchmark
    if not _has_device(manifest.device, devices):
        proxy = ""
        if bench is not None and bench.host_proxy:
            # Be explicit: the package's figures came from the build host's CPU standing in for the target,
            # so "it benchmarked fine" says nothing about this device having the accelerator.
            proxy = (f"; its benchmark was measured on the build host's CPU as a stand-in for "
                     f"{bench.target_device} (host_proxy), not on that device")
        return False, (f"{label} targets {kind} device {manifest.device}, which {manifest.runtime} does not "
                       f"have here (available: {', '.join(devices) or 'none'}){proxy}")

    # A package for an accelerator profile that was compiled for the CPU (device CPU) runs here: the check
    # is on the device the artifact was built for, not on the profile's name.
    return True, f"{label} can run here ({manifest.runtime} device {manifest.device} present)"
