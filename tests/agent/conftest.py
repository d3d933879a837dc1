"""Agent test fixtures: real signed packages of the digits CNN, keys, configs and hostile archives.

``make_package(version=..., runtime=..., key=..., tamper=..., broken_golden=...)`` builds a REAL package
with ``sdk.package.write_package``: the committed digits ONNX model (converted to OpenVINO IR for the
openvino runtime), its inputs/outputs read from the loaded model, golden samples computed with the real
runtime, and the shipped ``cpu`` profile's content. Packages are cached per parameter set for the session.
"""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import tarfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from edgeopt.sdk.package import (
    BenchmarkReport, GoldenSpec, LatencyStats, Manifest, SourceModel, generate_keypair, load_private_key,
    sha256_file, write_package,
)

DEVICE = {"onnxruntime": "CPUExecutionProvider", "openvino": "CPU"}


@dataclass(frozen=True)
class Keys:
    trusted_private: Path
    trusted_public: Path
    other_private: Path
    other_public: Path


@pytest.fixture(scope="session")
def agent_keys(tmp_path_factory) -> Keys:
    """A trusted signing key pair and another pair the agent does not trust."""
    d = tmp_path_factory.mktemp("agent-keys")
    tp, tpub = generate_keypair(d, "trusted")
    op, opub = generate_keypair(d, "other")
    return Keys(tp, tpub, op, opub)


def _to_openvino_ir(onnx_path: Path, out_dir: Path) -> Path:
    import openvino as ov

    xml = out_dir / "model.xml"
    if not xml.exists():
        ov.save_model(ov.convert_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    return xml


def _rewrite_archive(src: Path, dst: Path, mutate: Callable[[str, bytes], bytes | None]) -> Path:
    """Copy a package, letting ``mutate(name, data)`` change a member's bytes (None keeps them)."""
    with tarfile.open(src, "r:*") as tin, tarfile.open(dst, "w:gz", format=tarfile.PAX_FORMAT) as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            new = mutate(m.name, data)
            data = data if new is None else new
            info = tarfile.TarInfo(m.name)
            info.size, info.mode = len(data), 0o644
            tout.addfile(info, io.BytesIO(data))
    return dst


def _craft_archive(dst: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """Write a tar.gz from hand-made members (for hostile-archive tests)."""
    with tarfile.open(dst, "w:gz", format=tarfile.GNU_FORMAT) as tout:
        for info, data in members:
            tout.addfile(info, io.BytesIO(data) if data is not None else None)
    return dst


@pytest.fixture(scope="session")
def craft_archive():
    """``craft_archive(dst, [(TarInfo, bytes | None), ...]) -> dst``: a hand-made tar.gz."""
    return _craft_archive


@pytest.fixture(scope="session")
def rewrite_archive():
    """``rewrite_archive(src, dst, mutate)``: copy a package, ``mutate(name, data)`` may change members."""
    return _rewrite_archive


@pytest.fixture(scope="session")
def make_package(tmp_path_factory, agent_keys: Keys, digits_model: Path, digits_heldout: Path):
    """Factory: ``make_package(version="1.0.0", **options) -> Path`` of a real ``.eopkg``.

    Options: ``name`` ("digits"), ``runtime`` ("onnxruntime" | "openvino"), ``key`` ("trusted" | "other" |
    None for unsigned), ``tamper`` (None | "artifact": a model byte changed after signing | "manifest": the
    manifest edited after signing), ``broken_golden`` (expected outputs shifted so the self-test fails),
    ``golden_count`` (4), ``profile`` (shipped profile name, "cpu"), ``device`` (override the runtime
    device, e.g. "NPU"), ``host_proxy`` (add a benchmark measured on the host as a stand-in),
    ``runtime_options`` (OpenVINO default ``{"INFERENCE_PRECISION_HINT": "f32"}``; ``{}`` lets the CPU plugin
    pick bf16), ``placement`` (the profile's placement policy, "warn" | "strict").
    """
    from edgeopt.agent.loader import write_golden
    from edgeopt.agent.runtimes import get_runtime
    from edgeopt.sdk.profile import load_profile

    root = tmp_path_factory.mktemp("packages")
    cache: dict[tuple, Path] = {}
    images = np.load(digits_heldout)["images"]

    def make(version: str = "1.0.0", *, name: str = "digits", runtime: str = "onnxruntime",
             key: str | None = "trusted", tamper: str | None = None, broken_golden: bool = False,
             golden_count: int = 4, profile: str = "cpu", device: str | None = None,
             host_proxy: bool = False, runtime_options: dict | None = None, placement: str | None = None) -> Path:
        params = (version, name, runtime, key, tamper, broken_golden, golden_count, profile, device, host_proxy,
                  json.dumps(runtime_options, sort_keys=True), placement)
        if params in cache:
            return cache[params]
        work = root / f"build-{len(cache)}"
        work.mkdir()
        rt = get_runtime(runtime)
        if runtime == "openvino":
            model_file = _to_openvino_ir(digits_model, work)
            artifacts: dict[str, Any] = {"model.xml": model_file, "model.bin": work / "model.bin"}
            # As the SDK packages fp32 for OpenVINO: pinned to f32, or the CPU plugin runs bf16 where it can
            # (runtime_options={} builds exactly that package, for the placement check's tests).
            if runtime_options is None:
                runtime_options = {"INFERENCE_PRECISION_HINT": "f32"}
            loaded = rt.load(model_file, device="CPU", options=runtime_options or None)
        else:
            model_file = digits_model
            artifacts = {"model.onnx": model_file}
            loaded = rt.load(model_file, device="CPUExecutionProvider")
        samples_in = [{"images": images[i:i + 1]} for i in range(golden_count)]
        samples_out = [loaded.infer(s) for s in samples_in]
        if broken_golden:
            samples_out = [{k: v + 1.0 for k, v in s.items()} for s in samples_out]
        write_golden(work / "golden.npz", samples_in, samples_out)
        artifacts["golden.npz"] = work / "golden.npz"
        prof = load_profile(profile).to_dict()
        if placement is not None:
            prof["placement"] = placement
        bench = None
        if host_proxy:
            stats = LatencyStats(p50_ms=0.1, p90_ms=0.1, p99_ms=0.2, mean_ms=0.1, throughput_ips=1e4, iterations=10)
            bench = BenchmarkReport(batch_size=1, fp32=stats, optimized=stats, speedup=1.0, host_proxy=True,
                                    target_device=device or DEVICE[runtime], note="measured on the host CPU")
        manifest = Manifest(
            name=name, version=version, profile=prof, runtime=runtime, runtime_version=rt.version(),
            device=device or DEVICE[runtime], precision="fp32",
            model_file="model.xml" if runtime == "openvino" else "model.onnx",
            inputs=loaded.inputs, outputs=loaded.outputs,
            source_model=SourceModel(filename=digits_model.name, format="onnx", sha256=sha256_file(digits_model)),
            golden=GoldenSpec(count=golden_count, atol=1e-4, rtol=1e-3, min_cosine=0.9999),
            benchmark=bench, toolchain={"test": "tests/agent/conftest.py"},
            runtime_options=runtime_options or {},
        )
        loaded.close()
        priv = {"trusted": agent_keys.trusted_private, "other": agent_keys.other_private, None: None}[key]
        out = root / f"{name}-{version}-{len(cache)}.eopkg"
        write_package(out, manifest, artifacts, load_private_key(priv) if priv else None)
        if tamper == "artifact":
            target = "model.xml" if runtime == "openvino" else "model.onnx"
            out = _rewrite_archive(out, out.with_name(out.stem + "-tampered.eopkg"),
                                  lambda n, d: (d[:-1] + bytes([d[-1] ^ 1])) if n == target else None)
        elif tamper == "manifest":
            def edit(n: str, d: bytes) -> bytes | None:
                if n != "manifest.json":
                    return None
                doc = json.loads(d)
                doc["precision"] = "int8"
                return json.dumps(doc).encode()
            out = _rewrite_archive(out, out.with_name(out.stem + "-edited.eopkg"), edit)
        elif tamper is not None:
            raise ValueError(f"unknown tamper option {tamper!r}")
        cache[params] = out
        return out

    return make


@dataclass(frozen=True)
class CommandKeys:
    """The dashboard's command-signing key pair, and a pair nobody trusts (a forger's)."""

    private: Path
    public: Path
    other_private: Path
    other_public: Path


@pytest.fixture(scope="session")
def command_keys(tmp_path_factory) -> CommandKeys:
    d = tmp_path_factory.mktemp("command-keys")
    priv, pub = generate_keypair(d, "dashboard-command")
    other, other_pub = generate_keypair(d, "forger")
    return CommandKeys(priv, pub, other, other_pub)


def signed_command(private_key_path: Path, command: str, *, fleet: str, device_id: str, args: dict | None = None,
                   command_id: str | None = None, deployment_id: str | None = None, ttl_s: float = 600,
                   **overrides) -> bytes:
    """A command signed as the dashboard signs it; ``overrides`` change body fields before signing."""
    from edgeopt.sdk.command_signing import new_command, sign_command

    cmd = new_command(command, fleet=fleet, device_id=device_id, args=args, command_id=command_id,
                      deployment_id=deployment_id, ttl_s=ttl_s)
    if overrides:
        cmd = cmd.model_copy(update=overrides)
    return sign_command(cmd, load_private_key(private_key_path)).to_json()


@pytest.fixture(scope="session")
def sign_command():
    """:func:`signed_command` as a fixture."""
    return signed_command


@pytest.fixture
def agent_config(tmp_path: Path, agent_keys: Keys):
    """Factory: ``agent_config(**overrides) -> AgentConfig`` with a fresh state dir trusting the trusted key."""
    from edgeopt.agent.config import AgentConfig

    def make(**overrides) -> AgentConfig:
        doc: dict[str, Any] = {"device_id": "dev-1", "fleet": "test", "broker": {"url": "mqtt://127.0.0.1:1883"},
                               "state_dir": str(tmp_path / "state"), "trusted_keys": [str(agent_keys.trusted_public)]}
        doc.update(overrides)
        return AgentConfig.model_validate(doc)

    return make


@pytest.fixture
def agent_config_file(tmp_path: Path, agent_keys: Keys) -> Path:
    """An agent.toml written by `render_config` (what `edgeopt agent init` prints), state dir in tmp_path."""
    from edgeopt.agent.config import render_config

    path = tmp_path / "agent.toml"
    path.write_text(render_config(device_id="dev-1", fleet="test", broker="mqtt://127.0.0.1:1883",
                                  state_dir=tmp_path / "state", trusted_keys=[agent_keys.trusted_public],
                                  api_port=0))
    return path


class EventLog(list):
    """Collects installer events; ``.kinds()`` lists (event, ok) pairs."""

    def __call__(self, event: dict) -> None:
        self.append(event)

    def kinds(self) -> list[tuple[str, bool]]:
        return [(e["event"], e["ok"]) for e in self]

    def last(self, kind: str) -> dict:
        return [e for e in self if e["event"] == kind][-1]


@pytest.fixture
def events() -> EventLog:
    return EventLog()


@pytest.fixture
def installer(agent_config, events):
    """An Installer over a fresh store, collecting events; ``installer.switched`` lists on_switch calls."""
    from edgeopt.agent.installer import Installer
    from edgeopt.agent.store import Store

    config = agent_config()
    store = Store(config.state_dir)
    switched: list = []
    inst = Installer(store, config, on_event=events, on_switch=lambda m, loaded: switched.append((m, loaded)))
    inst.switched = switched  # type: ignore[attr-defined]
    return inst


@pytest.fixture
def lock_held_elsewhere():
    """``with lock_held_elsewhere(store):`` another process holds ``store``'s install lock for the block."""
    @contextlib.contextmanager
    def hold(store):
        holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, sys
            fd = open({str(store.root / 'lock')!r}, 'a+')
            fcntl.flock(fd, fcntl.LOCK_EX)
            print('held', flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            yield holder
        finally:
            holder.stdin.close()
            holder.wait(timeout=10)
            holder.stdout.close()
    return hold
