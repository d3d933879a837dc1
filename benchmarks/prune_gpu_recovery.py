"""Recovery on a GPU (issue 11): the distillation of the pruned digits ResNet on CUDA vs the host CPU.

    .venv/bin/python benchmarks/prune_gpu_recovery.py --steps 300 --timing-steps 50

Prunes the digits ResNet (tests/assets/digits_resnet, cached weights) 50% and recovers it by distillation
from the unpruned model on the unlabelled training split: ``--timing-steps`` steps on the CPU and on CUDA in
the same run (seconds per step, their ratio), then ``--steps`` steps on CUDA and the held-out accuracy of the
recovered model against the unpruned fp32 model. Exits 4 with one line when torch sees no GPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "assets" / "digits_resnet"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--timing-steps", type=int, default=50)
    args = parser.parse_args()
    import torch

    import digits_resnet as dr
    from edgeopt.sdk.prune import prune_model

    if not torch.cuda.is_available():
        print("error: torch sees no CUDA device; this benchmark needs one", file=sys.stderr)
        return 4
    folder = ROOT / ".cache" / "assets" / "digits_resnet_v1"
    model = dr.build()
    model.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
    model.eval()
    calib = np.load(folder / "calib.npz")["images"]
    held = np.load(folder / "heldout.npz")
    x, y = torch.from_numpy(held["images"]), held["labels"]
    data = [(calib[i:i + 1],) for i in range(len(calib))]
    example = (x[:1],)

    def acc(m) -> float:
        with torch.no_grad():
            return float((m(x).argmax(1).numpy() == y).mean())

    per_step = {}
    for device in ("cpu", "cuda"):
        t0 = time.perf_counter()
        prune_model(model, example, ratio=0.5, round_to=8, steps=args.timing_steps, data=data, device=device)
        per_step[device] = (time.perf_counter() - t0) / args.timing_steps
    t0 = time.perf_counter()
    res = prune_model(model, example, ratio=0.5, round_to=8, steps=args.steps, data=data, device="cuda")
    wall = time.perf_counter() - t0
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads")
    print(f"seconds per distillation step (batch 32, {args.timing_steps} steps incl. pruning): "
          f"cpu {per_step['cpu']:.4f}, cuda {per_step['cuda']:.4f}, cuda {per_step['cpu'] / per_step['cuda']:.2f}x")
    print(f"{args.steps} steps on cuda: {wall:.1f} s; recovery device recorded: {res.info.recovery_device}; "
          f"loss {res.info.recovery_loss_first:.4f} -> {res.info.recovery_loss_last:.4f}")
    print(f"held-out accuracy: unpruned fp32 {acc(model):.4f}, pruned 50% + recovered {acc(res.model):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
