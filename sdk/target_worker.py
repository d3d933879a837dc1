"""Run a model file on the samples of an .npz and write the outputs: the program the SDK starts on the
target (an emulated aarch64 CPU, see :mod:`edgeopt.sdk.emulation`) to validate a package there.

    python -m edgeopt.sdk.target_worker MODEL RUNTIME INPUTS.npz OUTPUTS.npz [--options JSON] [--threads N]

INPUTS.npz and OUTPUTS.npz use the golden layout (``input/<i>/<name>``, ``output/<i>/<name>``). It loads the
model through the agent's runtime registry, so the kernels that run are the ones the agent would run on
this CPU. The last line on stdout is a JSON summary (arch, runtime version, samples, seconds). Exit 0 on
success; 1 with a one-line error on stderr otherwise. Imports only what the agent itself needs.
"""
from __future__ import annotations

import io
import json
import platform
import sys
import time
from pathlib import Path

MAX_OPTIONS_CHARS = 64 * 1024


def run(model: Path, runtime: str, inputs_npz: Path, outputs_npz: Path, options: dict | None = None,
        threads: int | None = None) -> dict:
    """Infer every sample of ``inputs_npz`` and write ``outputs_npz`` atomically; returns the summary."""
    import numpy as np

    from ..agent.runtimes import get_runtime
    from .pipeline.golden import golden_key, read_golden

    samples = [feeds for feeds, _ in read_golden(Path(inputs_npz).read_bytes())]
    rt = get_runtime(runtime)
    started = time.monotonic()
    loaded = rt.load(Path(model), device="CPU" if runtime != "onnxruntime" else "CPUExecutionProvider",
                     threads=threads, options=options or None)
    try:
        loaded_s = time.monotonic() - started
        arrays = {}
        for i, feeds in enumerate(samples):
            for name, arr in loaded.infer(feeds).items():
                arrays[golden_key("output", i, name)] = np.asarray(arr)
    finally:
        loaded.close()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    tmp = Path(str(outputs_npz) + ".part")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(outputs_npz)
    return {"arch": platform.machine(), "runtime": runtime, "runtime_version": rt.version(),
            "samples": len(samples), "load_seconds": round(loaded_s, 3),
            "seconds": round(time.monotonic() - started, 3)}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m edgeopt.sdk.target_worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("runtime")
    parser.add_argument("inputs", type=Path)
    parser.add_argument("outputs", type=Path)
    parser.add_argument("--options", default="", help="runtime options (JSON object)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if len(args.options) > MAX_OPTIONS_CHARS:
            raise ValueError("--options is too long")
        options = json.loads(args.options) if args.options else None
        if options is not None and not isinstance(options, dict):
            raise ValueError("--options must be a JSON object")
        summary = run(args.model, args.runtime, args.inputs, args.outputs, options, args.threads)
    except Exception as exc:  # one line for the host, which reports it
        print(f"target_worker: error: {type(exc).__name__}: {' '.join(str(exc).split())[:500]}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
