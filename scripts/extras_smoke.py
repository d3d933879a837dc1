"""Smoke checks for scripts/check-extras.sh: what each extra, installed alone, must be able to do.

    python scripts/extras_smoke.py make-packages OUT     (with the full dev .venv: builds the test packages)
    VENV/bin/python scripts/extras_smoke.py check EXTRA PKGS   (with a fresh venv holding only that extra)

``check`` imports only the standard library at the top and drives the venv's own console scripts
(``edgeopt``, ``edgeopt-agent``, ``edgeopt-dashboard``) as subprocesses, so what it proves is what a user
of ``pip install 'edgeopt[EXTRA]'`` gets. Each step prints one line; the first failure exits 1 with it.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "tests" / "assets" / "digits"
BIN = Path(sys.executable).parent
RUNTIME_EXTRA = {"onnxruntime": "agent-onnxruntime", "openvino": "agent-openvino", "tflite": "agent-tflite"}
PASSWORD = "smoke-test-password"


class Failed(Exception):
    pass


def step(what: str, ok: bool, detail: str = "") -> None:
    if not ok:
        raise Failed(f"{what}: FAILED {detail}".strip())
    print(f"  ok  {what}", flush=True)


def run(*args: str, expect: int = 0, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    cmd = [str(BIN / args[0]) if (BIN / args[0]).exists() else args[0], *map(str, args[1:])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if proc.returncode != expect:
        tail = (proc.stderr.strip() or proc.stdout.strip())[-1500:]
        raise Failed(f"{' '.join(map(str, args[:3]))}: exit {proc.returncode}, expected {expect}: {tail}")
    return proc


# --------------------------------------------------------------------------- make-packages (dev venv)


def make_packages(out: Path) -> None:
    """Signed packages of a real model for each runtime, with golden samples computed by that runtime."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests"))
    from assets.pretrained import fetch

    from edgeopt.agent.loader import write_golden
    from edgeopt.agent.runtimes import get_runtime
    from edgeopt.sdk.package import (GoldenSpec, Manifest, SourceModel, generate_keypair, load_private_key,
                                     sha256_file, write_package)
    from edgeopt.sdk.profile import load_profile

    out.mkdir(parents=True, exist_ok=True)
    priv, pub = generate_keypair(out, "smoke", overwrite=True)
    onnx = DIGITS / "digits_cnn.onnx"
    images = np.load(DIGITS / "digits_heldout.npz")["images"][:2]
    work = Path(tempfile.mkdtemp(prefix="extras-smoke-"))
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx)), str(work / "model.xml"), compress_to_fp16=False)
    tflite = fetch("face_tflite")
    plans = {
        "onnxruntime": ("CPUExecutionProvider", {"model.onnx": onnx}, "model.onnx", onnx,
                        [{"images": images[i:i + 1]} for i in range(2)]),
        "openvino": ("CPU", {"model.xml": work / "model.xml", "model.bin": work / "model.bin"}, "model.xml", onnx,
                     [{"images": images[i:i + 1]} for i in range(2)]),
        "tflite": ("CPU", {"model.tflite": tflite}, "model.tflite", tflite, None),
    }
    for runtime, (device, artifacts, model_file, source, feeds) in plans.items():
        loaded = get_runtime(runtime).load(work / model_file if runtime == "openvino" else source, device=device)
        if feeds is None:  # the face detector: its own input name and shape, values in [-1, 1]
            spec = loaded.inputs[0]
            rng = np.random.default_rng(0)
            feeds = [{spec.name: rng.uniform(-1, 1, spec.shape).astype(spec.dtype)} for _ in range(2)]
        write_golden(work / f"golden-{runtime}.npz", feeds, [loaded.infer(f) for f in feeds])
        manifest = Manifest(
            name=f"smoke-{runtime}", version="1.0.0", profile=load_profile("cpu").to_dict(), runtime=runtime,
            runtime_version=get_runtime(runtime).version(), device=device, precision="fp32", model_file=model_file,
            inputs=loaded.inputs, outputs=loaded.outputs,
            source_model=SourceModel(filename=source.name, format=source.suffix[1:], sha256=sha256_file(source)),
            golden=GoldenSpec(count=len(feeds), atol=1e-4, rtol=1e-3, min_cosine=0.9999))
        loaded.close()
        write_package(out / f"{runtime}.eopkg", manifest, {**artifacts, "golden.npz": work / f"golden-{runtime}.npz"},
                      load_private_key(priv))
        (out / f"{runtime}.json").write_text(json.dumps({"name": manifest.name, "inputs": [
            {"name": t.name, "dtype": t.dtype, "shape": t.shape} for t in manifest.inputs]}))
        print(f"  built {out / (runtime + '.eopkg')}")
    print(f"  public key {pub}")


# --------------------------------------------------------------------------- checks (fresh venv)


def check_core(pkgs: Path) -> None:
    run("edgeopt", "--help")
    step("edgeopt --help", True)
    run("edgeopt", "verify", pkgs / "onnxruntime.eopkg", "--public-key", pkgs / "smoke.pub")
    step("edgeopt verify (the contracts, pure Python)", True)
    p = run("edgeopt", "package", DIGITS / "digits_cnn.onnx", "--no-sign", "-o", "/dev/null", expect=5)
    step("edgeopt package names the extra to install", "pip install 'edgeopt[sdk]'" in p.stderr, p.stderr)
    p = run("edgeopt-agent", "--help", expect=5)
    step("edgeopt-agent names the agent extras", "pip install 'edgeopt[agent-openvino]'" in p.stderr, p.stderr)


def check_sdk(pkgs: Path) -> None:
    run("edgeopt", "--help")
    step("edgeopt --help", True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "digits.eopkg"
        run("edgeopt", "package", DIGITS / "digits_cnn.onnx", "-p", "cpu", "--calib", DIGITS / "digits_calib.npz",
            "--heldout", DIGITS / "digits_heldout.npz", "--calib-samples", "32", "--heldout-samples", "32",
            "--no-sign", "-o", out)
        step("edgeopt package (cpu profile, int8)", out.is_file())
        run("edgeopt", "inspect", out)
        step("edgeopt inspect", True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: dict | None = None) -> tuple[int, dict | str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read().decode()
            return resp.status, (json.loads(raw) if raw.startswith("{") else raw)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _wait_http(url: str, proc: subprocess.Popen, deadline_s: float = 120) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Failed(f"edgeopt-agent exited with {proc.returncode}: {proc.stderr.read()[-1500:]}")
        try:
            if _http("GET", url)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.2)
    raise Failed(f"{url} did not answer 200 within {deadline_s:.0f} s")


def check_agent(pkgs: Path, present: list[str]) -> None:
    """The daemon starts with exactly the runtimes in ``present``; a missing one names its extra."""
    run("edgeopt-agent", "--help")
    step("edgeopt-agent --help", True)
    caps = json.loads(run("edgeopt", "agent", "probe", "--json").stdout)["runtimes"]
    for name, extra in RUNTIME_EXTRA.items():
        if name in present:
            step(f"probe: {name} available", caps[name].get("available") is True, json.dumps(caps[name]))
        else:
            step(f"probe: {name} missing, names [{extra}]",
                 not caps[name].get("available") and f"pip install 'edgeopt[{extra}]'" in caps[name]["reason"],
                 json.dumps(caps[name]))
    table = run("edgeopt", "agent", "probe", env={**os.environ, "COLUMNS": "300"}).stdout
    for name, extra in RUNTIME_EXTRA.items():
        if name not in present:
            step(f"probe table names [{extra}]", f"pip install 'edgeopt[{extra}]'" in table, table[-800:])
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        cfg = Path(tmp) / "agent.toml"
        # Port 1: nobody listens. An unreachable broker is not fatal: the agent serves and buffers telemetry.
        cfg.write_text(run("edgeopt", "agent", "init", "--device-id", "smoke-1", "--fleet", "ci",
                           "--broker", "mqtt://127.0.0.1:1", "--state-dir", Path(tmp) / "state",
                           "--api-port", port, "--trust-key", pkgs / "smoke.pub").stdout)
        for name, extra in RUNTIME_EXTRA.items():
            if name in present:
                run("edgeopt", "agent", "install", pkgs / f"{name}.eopkg", "--config", cfg, timeout=300)
                step(f"edgeopt agent install ({name} package)", True)
            else:
                # exit 4 (unsupported here): the package needs a runtime this device lacks
                p = run("edgeopt", "agent", "install", pkgs / f"{name}.eopkg", "--config", cfg, expect=4)
                step(f"edgeopt agent install ({name} package) refused, names [{extra}]",
                     f"pip install 'edgeopt[{extra}]'" in p.stderr, p.stderr[-500:])
        proc = subprocess.Popen([str(BIN / "edgeopt-agent"), "--config", str(cfg)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_http(base + "/v2/health/live", proc)
            step("edgeopt-agent started (API live)", True)
            for name in present:
                meta = json.loads((pkgs / f"{name}.json").read_text())
                _wait_http(f"{base}/v2/models/{meta['name']}/ready", proc)
                shapes = {t["name"]: [d if isinstance(d, int) and d > 0 else 1 for d in t["shape"]]
                          for t in meta["inputs"]}  # a dynamic dim (batch) gets 1
                inputs = [{"name": n, "shape": shp, "datatype": "FP32", "data": [0.0] * _count(shp)}
                          for n, shp in shapes.items()]
                status, body = _http("POST", f"{base}/v2/models/{meta['name']}/infer", {"inputs": inputs})
                step(f"inference on the {name} model", status == 200 and bool(body.get("outputs")), str(body)[:300])
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise Failed("edgeopt-agent did not stop within 60 s of SIGTERM") from None
        step("edgeopt-agent stopped cleanly on SIGTERM", rc == 0, f"exit {rc}")


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


DASHBOARD = r"""
import io, re, sys
from edgeopt.dashboard import create_app
db, inst, pkg, pub, password = sys.argv[1:6]
app = create_app({"DATABASE_URL": db, "INSTANCE_PATH": inst, "TRUSTED_KEYS": [pub]})
c = app.test_client()
assert c.get("/healthz").status_code == 200, "healthz"
token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', c.get("/login").get_data(as_text=True)).group(1)
r = c.post("/login", data={"username": "admin", "password": password, "csrf_token": token})
assert r.status_code == 302, ("login", r.status_code)
page = c.get("/packages").get_data(as_text=True)
token = re.search(r'<meta name="csrf-token" content="([^"]+)"', page).group(1)
r = c.post("/api/v1/packages", data={"file": (io.BytesIO(open(pkg, "rb").read()), "smoke.eopkg")},
           headers={"X-CSRFToken": token}, content_type="multipart/form-data")
assert r.status_code == 201, ("upload", r.status_code, r.get_data(as_text=True)[:300])
print("ok")
"""


def check_dashboard(pkgs: Path) -> None:
    run("edgeopt-dashboard", "--help")
    step("edgeopt-dashboard --help", True)
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{tmp}/dash.db"
        run("edgeopt-dashboard", "init-db", "--database-url", db)
        run("edgeopt-dashboard", "create-user", "admin", "--role", "admin", "--password", PASSWORD,
            "--database-url", db)
        step("edgeopt-dashboard init-db, create-user", True)
        p = run(sys.executable, "-c", DASHBOARD, db, f"{tmp}/instance", pkgs / "onnxruntime.eopkg",
                pkgs / "smoke.pub", PASSWORD, cwd=tmp)
        step("create_app: healthz, login, package upload verified", p.stdout.strip() == "ok", p.stdout)


CHECKS = {
    "core": lambda p: check_core(p),
    "sdk": lambda p: check_sdk(p),
    "agent": lambda p: check_agent(p, []),
    "agent-onnxruntime": lambda p: check_agent(p, ["onnxruntime"]),
    "agent-openvino": lambda p: check_agent(p, ["openvino"]),
    "agent-tflite": lambda p: check_agent(p, ["tflite"]),
    "dashboard": lambda p: check_dashboard(p),
    "all": lambda p: (check_sdk(p), check_dashboard(p), check_agent(p, list(RUNTIME_EXTRA))),
}


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "make-packages":
        make_packages(Path(argv[1]))
        return 0
    if len(argv) == 3 and argv[0] == "check" and argv[1] in CHECKS:
        pkgs = Path(argv[2]).resolve()
        # Never the checkout's modules: only what the venv installed may be imported.
        os.chdir(tempfile.gettempdir())
        try:
            CHECKS[argv[1]](pkgs)
        except (Failed, subprocess.TimeoutExpired) as exc:
            print(f"  FAIL [{argv[1]}] {exc}", flush=True)
            return 1
        except Exception as exc:  # noqa: BLE001 - a bug of this script still fails the extra, with its type
            print(f"  FAIL [{argv[1]}] {exc.__class__.__name__}: {exc}", flush=True)
            return 1
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
