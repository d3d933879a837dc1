"""Demo traffic: send the digits held-out images to an agent's KServe v2 API, one request at a time.

python scripts/demo_traffic.py --url http://127.0.0.1:8470 --model digits --data tests/assets/digits/digits_heldout.npz
Runs until stopped (or --seconds); prints accuracy against the labels every 200 requests.
"""
import argparse
import json
import time
import urllib.error
import urllib.request

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8470")
    ap.add_argument("--model", default="digits")
    ap.add_argument("--data", required=True)
    ap.add_argument("--rate", type=float, default=20.0, help="requests per second")
    ap.add_argument("--seconds", type=float, default=0, help="stop after this long (0: run until killed)")
    args = ap.parse_args()
    data = np.load(args.data)
    x, y = data["images"], data["labels"]
    meta = None
    start, n, right = time.time(), 0, 0
    while not args.seconds or time.time() - start < args.seconds:
        i = n % len(x)
        body = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, *x.shape[1:]],
                            "data": x[i].ravel().tolist()}]}
        req = urllib.request.Request(f"{args.url}/v2/models/{args.model}/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                out = json.load(r)["outputs"][0]["data"]
            right += int(np.argmax(out) == y[i])
            n += 1
            if n % 200 == 0:
                print(f"{n} requests, accuracy {right / n:.3f}", flush=True)
        except (urllib.error.URLError, OSError) as exc:
            if meta is None:
                print(f"agent not ready: {exc}", flush=True)
            time.sleep(1)
            continue
        meta = True
        time.sleep(1.0 / args.rate)


if __name__ == "__main__":
    main()
