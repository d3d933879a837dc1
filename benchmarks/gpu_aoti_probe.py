"""Which processes can load an AOTInductor CUDA package, and why the others crash (issue 13, H200 diagnosis).

    python benchmarks/gpu_aoti_probe.py [--pt2 model.pt2]        # on the GPU machine: scripts/gpu-aoti.sh probe

Seen 2026-12-03 on the lent H200 (PyTorch 2.11.0+cu130, Python 3.12): the `gpu` profile's torch-aoti package loaded
in the process that built it (`edgeopt package`) and in `edgeopt agent install` (self-test passed), but every later
fresh process that loaded it died of SIGSEGV: the agent daemon at start, the benchmark's worker, and a plain
``torch._inductor.aoti_load_package`` of a small model. cuda-gdb's native stack: the model's own wrapper .so,
``AOTInductorModelContainer`` -> ``AOTInductorModel`` -> ``parse_device_str`` -> ``std::regex`` compile ->
``regex_traits<char>::transform_primary`` -> a call into ``std::codecvt<char16_t,...>::do_unshift``: the facet
``use_facet<collate<char>>`` returned was not a collate, which is what two C++ runtimes (or two facet-id
tables) in one process look like. The processes that survived had imported ONNX Runtime before the load.

This script builds one small CUDA .pt2 (no autotuning, about a minute) unless --pt2 names one, then loads it in a
fresh process per variant, each printing the C++ runtimes mapped in it before and after the load and whether a
CUDA graph of the loaded runner captures (``run_single_threaded=True``, as the agent loads runners it captures):

  plain                python3 -c: import torch, load
  onnxruntime-first    import onnxruntime before torch (what `edgeopt agent install` did)
  onnxruntime-after    import torch, then onnxruntime, then load
  preload-libstdc++    LD_PRELOAD of the system libstdc++.so.6
  libstdc++-global     the system libstdc++ loaded with RTLD_GLOBAL (ctypes) before torch
  no-LD_LIBRARY_PATH   plain, with LD_LIBRARY_PATH emptied

Before the variants it prints what the package's wrapper .so links against (NEEDED), whether it defines its own
copy of the C++ runtime's locale facet ids (``std::collate<char>::id``: a copy of its own would be looked up in
the process's one locale at the wrong index, which is the crash's signature), and the compiler that built it.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r'''
import sys, time
pre = sys.argv[2]
if pre == "onnxruntime-first":
    import onnxruntime  # noqa: F401
import torch
if pre == "onnxruntime-after":
    import onnxruntime  # noqa: F401,F811
def cxx():
    return sorted({l.split()[-1] for l in open("/proc/self/maps") if "libstdc++" in l or "libc++" in l})
print("  C++ runtimes before load:", cxx(), flush=True)
x = torch.randn(1, 3, 224, 224, device="cuda", dtype=torch.half)
t0 = time.time()
r = torch._inductor.aoti_load_package(sys.argv[1], run_single_threaded=True)
print(f"  loaded in {time.time() - t0:.1f} s; C++ runtimes after:", cxx(), flush=True)
s = torch.cuda.Stream()
with torch.inference_mode():
    with torch.cuda.stream(s):
        for _ in range(3):
            y = r(x)
    s.synchronize()
    ref = (y[0] if isinstance(y, (list, tuple)) else y).float().clone()
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g, stream=s):
            y = r(x)
        g.replay()
        torch.cuda.synchronize()
        out = (y[0] if isinstance(y, (list, tuple)) else y).float()
        print(f"  CUDA graph captured; replay max |diff| {float((out - ref).abs().max()):.3g}", flush=True)
    except RuntimeError as exc:
        print(f"  CUDA graph capture FAILED: {' '.join(str(exc).split())[:200]}", flush=True)
'''

LIBSTDCXX_GLOBAL = r'''
import ctypes, ctypes.util
# the system libstdc++ loaded globally first, as a library that links it would
ctypes.CDLL(ctypes.util.find_library("stdc++"), mode=ctypes.RTLD_GLOBAL)
'''


def elf_report(pt2: Path) -> None:
    """What the .pt2's shared objects link against, and whether they carry C++ runtime symbols of their own."""
    import shutil
    import tempfile
    import zipfile

    tool = shutil.which("readelf")
    print(f"compiler: {subprocess.run(['c++', '--version'], capture_output=True, text=True).stdout.splitlines()[:1]}")
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(pt2) as zf:
        for name in (n for n in zf.namelist() if n.endswith(".so")):
            path = Path(zf.extract(name, tmp))
            print(f"{name}: {path.stat().st_size / 1e6:.1f} MB")
            if tool is None:
                print("  (no readelf here)")
                continue
            dyn = subprocess.run([tool, "-dW", str(path)], capture_output=True, text=True).stdout
            print("  NEEDED:", [ln.split("[")[-1].rstrip("]") for ln in dyn.splitlines() if "(NEEDED)" in ln])
            syms = subprocess.run([tool, "--dyn-syms", "-W", str(path)], capture_output=True, text=True).stdout
            rows = [ln.split() for ln in syms.splitlines() if "_ZNSt7collateIcE2idE" in ln or "_ZNSt6locale" in ln]
            defined = sorted({r[-1] for r in rows if len(r) > 6 and r[6] != "UND"})
            undefined = sorted({r[-1] for r in rows if len(r) > 6 and r[6] == "UND"})
            print(f"  locale symbols defined here: {len(defined)} {defined[:6]}; imported: {len(undefined)}")
            comment = subprocess.run([tool, "-p", ".comment", str(path)], capture_output=True, text=True).stdout
            print("  .comment:", sorted({ln.split("]", 1)[-1].strip() for ln in comment.splitlines() if "]" in ln})[:3])


def build(path: Path) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from resnet18_torch import build as resnet18

    model = resnet18().cuda().eval().half()
    x = torch.randn(1, 3, 224, 224, device="cuda", dtype=torch.half)
    t0 = time.perf_counter()
    program = torch.export.export(model, (x,))
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    print(f"built {path} in {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pt2", help="an AOTInductor CUDA package to load (default: build a small one)")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per variant")
    args = ap.parse_args()
    if args.pt2:
        pt2 = Path(args.pt2)
    else:
        pt2 = Path("/tmp/aoti-probe/model-b1.pt2")
        pt2.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"import gpu_aoti_probe as p; from pathlib import Path; p.build(Path({str(pt2)!r}))"],
                       check=True)
    libstdcxx = next((p for p in ("/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "/lib/x86_64-linux-gnu/libstdc++.so.6")
                      if os.path.exists(p)), "")
    try:
        elf_report(pt2)
    except Exception as exc:  # noqa: BLE001 - the diagnosis goes on without it
        print(f"ELF report failed: {exc}")
    variants = {"plain": ({}, "plain", ""), "onnxruntime-first": ({}, "onnxruntime-first", ""),
                "onnxruntime-after": ({}, "onnxruntime-after", ""),
                "preload-libstdc++": ({"LD_PRELOAD": libstdcxx}, "plain", ""),
                "libstdc++-global": ({}, "plain", LIBSTDCXX_GLOBAL),
                # scripts/gpu-aoti.sh puts the nvidia wheels' lib folders on LD_LIBRARY_PATH (for onnxruntime-gpu):
                # a C++ runtime in one of them would be found before the system's
                "no-LD_LIBRARY_PATH": ({"LD_LIBRARY_PATH": ""}, "plain", "")}
    rows = []
    for name, (env, pre, prefix) in variants.items():
        t0 = time.perf_counter()
        try:
            run = subprocess.run([sys.executable, "-X", "faulthandler", "-c", prefix + CHILD, str(pt2), pre],
                                 capture_output=True, text=True, timeout=args.timeout, env={**os.environ, **env})
            rc, text = run.returncode, run.stdout + run.stderr
        except subprocess.TimeoutExpired:
            rc, text = "timeout", ""
        lines = [ln for ln in text.splitlines() if ln.startswith("  ") or "Error" in ln or "Fatal" in ln]
        print(f"[{name}] exit {rc} in {time.perf_counter() - t0:.0f} s\n" + "\n".join(lines[:12]), flush=True)
        rows.append((name, rc, any("CUDA graph captured" in ln for ln in lines)))
    print(f"\n{'variant':<20} {'exit':>8} {'graph captured':>15}")
    for name, rc, captured in rows:
        print(f"{name:<20} {str(rc):>8} {str(captured):>15}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
