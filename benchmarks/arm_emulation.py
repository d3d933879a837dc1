"""The `arm` profile on an emulated aarch64 CPU (QEMU user mode): numerics vs x86, self-test, emulated time.

For each real model of the test set packaged for `arm`, this script:
1. packages it on the host with ``--validate-on aarch64`` (the held-out samples run on the emulated CPU;
   the manifest records each output's max abs error and cosine against the host's outputs),
2. runs the same held-out samples through the same model file natively on the host and under emulation
   (``python -m edgeopt.sdk.target_worker``), back to back, and reports the wall-time ratio: the cost of
   emulation, NEVER a speed figure for an ARM board,
3. installs the package with the agent under emulation and reports its golden self-test.

    .venv/bin/python benchmarks/arm_emulation.py [--models digits-ort,digits-litert,face-litert,orientation-ort]
        [--cpu cortex-a72]

Needs scripts/arm-sysroot.sh to have run. Prints a table (and --json writes the rows).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sdk_assets  # noqa: E402

from edgeopt.sdk.emulation import find_emulator  # noqa: E402
from edgeopt.sdk.package import PackageReader, generate_keypair  # noqa: E402
from edgeopt.sdk.pipeline.golden import golden_key  # noqa: E402

EDGEOPT = [sys.executable, "-m", "edgeopt.sdk.cli"]


def _models(work: Path) -> dict[str, dict]:
    d = sdk_assets.digits()
    conv = sdk_assets._module("digits_tflite")
    tfl = conv.int8_tflite(conv.float_tflite(d["model"], work / "digits_f32.tflite"), d["calib"],
                           work / "digits_int8.tflite")
    pre = sdk_assets._module("pretrained")
    text = sdk_assets._module("text_images")

    def face_heldout():
        rng = np.random.default_rng(2)
        crops = [np.asarray(text.photo_crop(rng, "heldout", 128, 128), np.float32) for _ in range(16)]
        return {"input": np.stack(crops) / 127.5 - 1.0}

    def orientation():
        o = sdk_assets.orientation()
        return [str(o["model"]), "--calib", str(o["calib"]), "--heldout", str(o["heldout"]),
                "--input-shape", "x:1,3,224,224"]

    return {
        "digits-ort": lambda: [str(d["model"]), "--calib", str(d["calib"]), "--heldout", str(d["heldout"]),
                               "--input-shape", "images:1,1,8,8"],
        "digits-litert": lambda: [str(tfl), "--heldout", str(d["heldout"])],
        "face-litert": lambda: [str(pre.fetch("face_tflite")), "--heldout",
                                str(sdk_assets._npz("face_tflite_v1_heldout", face_heldout))],
        "orientation-ort": orientation,
    }


def _worker(cmd_prefix, model: Path, runtime: str, inputs: Path, out: Path, options: dict, run=None) -> float:
    args = ["-m", "edgeopt.sdk.target_worker", str(model), runtime, str(inputs), str(out), "--options",
            json.dumps(options)]
    started = time.monotonic()
    done = run(args, timeout=1800) if run else subprocess.run(cmd_prefix + args, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"target_worker failed: {done.stderr.strip()[-500:]}")
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits-ort,digits-litert,face-litert,orientation-ort")
    parser.add_argument("--cpu", help="QEMU CPU model (default max; cortex-a72 is a Raspberry Pi 4)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    emu = find_emulator(cpu=args.cpu)
    rows = []
    with tempfile.TemporaryDirectory(prefix="arm-bench-") as tmp:
        work = Path(tmp)
        key, pub = generate_keypair(work, "bench")
        models = _models(work)
        with emu.session() as py:
            for name in args.models.split(","):
                pkg = work / f"{name}.eopkg"
                spec = models[name]()
                done = subprocess.run(EDGEOPT + ["package", *spec[:1], "-p", "arm", "--sign-key", str(key), "-o",
                                                 str(pkg), "--iterations", "5", "--name", name, "--validate-on",
                                                 "aarch64", *(["--arm-cpu", args.cpu] if args.cpu else []),
                                                 *spec[1:]], capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{name}: edgeopt package failed: {done.stderr.strip()[-800:]}")
                with PackageReader(pkg) as reader:
                    m = reader.manifest
                    (work / name).mkdir()
                    reader.extract_to(work / name / "pkg")
                v, t = m.validation, m.validation.target
                # The same held-out inputs natively and emulated, back to back (the emulation cost ratio).
                held = np.load(spec[spec.index("--heldout") + 1])
                key_in = next(k for k in held.files if k != "labels")
                feeds = held[key_in]
                inputs = work / name / "in.npz"
                np.savez(inputs, **{golden_key("input", i, m.inputs[0].name): feeds[i:i + 1]
                                    for i in range(min(len(feeds), v.samples))})
                model_file = work / name / "pkg" / m.model_file
                host_s = _worker([sys.executable], model_file, m.runtime, inputs, work / name / "x86.npz",
                                 m.runtime_options)
                emu_s = _worker(None, model_file, m.runtime, inputs, work / name / "arm.npz", m.runtime_options,
                                run=py.run)
                # The agent under emulation installs it: the golden self-test on aarch64.
                cfg = work / name / "agent.toml"
                subprocess.run(EDGEOPT + ["agent", "init", "--device-id", "bench", "--fleet", "bench",
                                          "--state-dir", str(work / name / "state"), "--trust-key", str(pub)],
                               check=True, stdout=cfg.open("w"))
                inst = py.run(["-m", "edgeopt.sdk.cli", "agent", "install", str(pkg), "--config", str(cfg),
                               "--json"], timeout=1800)
                selftest = "FAIL: " + inst.stderr.strip()[-200:]
                if inst.returncode == 0:
                    ev = next(e for e in json.loads(inst.stdout)["events"] if e["event"] == "self_test")
                    selftest = (f"pass ({ev['details']['samples']} samples, max abs err "
                                f"{ev['details']['max_abs_error']:.3g})")
                rows.append({
                    "model": name, "runtime": f"{m.runtime} ({t.runtime_version} on aarch64)",
                    "precision": m.precision, "samples": t.samples,
                    "max_abs_vs_x86": max(o.max_abs_error for o in t.vs_host),
                    "min_cosine_vs_x86": min(o.min_cosine for o in t.vs_host),
                    "gate_on_aarch64": "pass" if v.passed else "FAIL", "selftest_aarch64": selftest,
                    "host_s": round(host_s, 2), "emulated_s": round(emu_s, 2),
                    "emulation_cost_x": round(emu_s / host_s, 1) if host_s > 0 else None,
                    "validate_wall_s": t.wall_seconds,
                })
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{emu.describe().get('emulator')}, CPU {emu.describe()['cpu']}; wall times include interpreter start "
          "and model load; the ratio is the cost of emulation on this host, not an ARM speed figure")
    print("| model | runtime | precision | samples | max abs err vs x86 | min cosine vs x86 | gate on aarch64 | "
          "self-test on aarch64 (agent install) | host s | emulated s | emulated/host |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['runtime']} | {r['precision']} | {r['samples']} | {r['max_abs_vs_x86']:.3g} | "
              f"{r['min_cosine_vs_x86']:.12f} | {r['gate_on_aarch64']} | {r['selftest_aarch64']} | {r['host_s']} | "
              f"{r['emulated_s']} | {r['emulation_cost_x']}x |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
