"""Run edgeopt on an emulated 64-bit ARM CPU: QEMU user-mode emulation of an aarch64 CPython.

``scripts/arm-sysroot.sh`` builds the pieces into one folder (default ``.cache/arm-sysroot``, or
``$EDGEOPT_ARM_SYSROOT``): ``sysroot/`` (Debian's aarch64 CPython 3.11 and its C libraries) and ``site/``
(aarch64 wheels of the agent's dependencies and of the ``arm`` profile's runtimes). :class:`ArmEmulator`
runs this edgeopt's own source under that interpreter::

    emu = find_emulator()                        # EmulationError naming the script when it is missing
    with emu.session() as run:
        proc = run.popen(["-m", "edgeopt.agent.entry", "--config", "agent.toml"])
        done = run.run(["-m", "edgeopt.sdk.cli", "agent", "install", "m.eopkg", ...], timeout=600)

What emulation proves and what it does not is in docs/arm-emulation.md: instruction-set correctness and
the ARM kernels' numerics, never speed (an emulated CPU runs 10-50x slower than the real one).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import UnsupportedError

QEMU = "qemu-aarch64-static"
DEFAULT_CACHE = Path(".cache") / "arm-sysroot"
BUILD_HINT = "build it with scripts/arm-sysroot.sh (needs root or sudo once, for apt-get)"
# edgeopt's packages the emulated interpreter imports; the dashboard stays on the host.
_PARTS = ("sdk", "agent", "hardware_profiles")


class EmulationError(UnsupportedError):
    """The emulated aarch64 environment is missing or broken."""


@dataclass(frozen=True)
class ArmEmulator:
    """An aarch64 sysroot and site-packages run through ``qemu-aarch64-static``.

    ``cpu`` picks the CPU QEMU presents (``qemu-aarch64-static -cpu help``): None is QEMU's ``max`` (Armv8/9
    with SVE, i8mm and dot product); ``cortex-a72`` is a Raspberry Pi 4 (no dot product: other int8
    kernels), ``cortex-a53`` a Pi 3, ``cortex-a76`` a Pi 5, ``neoverse-n1`` an Ampere / Graviton 2 core.
    """

    root: Path
    qemu: str
    cpu: str | None = None

    @property
    def sysroot(self) -> Path:
        return self.root / "sysroot"

    @property
    def site(self) -> Path:
        return self.root / "site"

    @property
    def python(self) -> Path:
        return self.sysroot / "usr" / "bin" / "python3.11"

    def describe(self) -> dict[str, str]:
        """What the ``ready`` file of the build says: QEMU and the aarch64 wheels' versions."""
        info = {"emulator": "", "arch": "aarch64", "cpu": self.cpu or "max"}
        try:
            lines = (self.root / "ready").read_text(encoding="utf-8", errors="replace").splitlines()[:200]
        except OSError:
            return info
        for line in lines:
            key, _, value = line.partition(" ")
            if key == "qemu":
                info["emulator"] = value.strip()
            elif key == "wheel" and "==" in value:
                name, _, version = value.strip().partition("==")
                if name in ("onnxruntime", "ai-edge-litert", "numpy"):
                    info[name] = version
        return info

    @contextmanager
    def session(self) -> Iterator["EmulatedPython"]:
        """A temporary folder that maps this edgeopt's source onto the ``edgeopt`` import name."""
        with tempfile.TemporaryDirectory(prefix="edgeopt-arm-") as tmp:
            link_root = Path(tmp) / "src"
            pkg = link_root / "edgeopt"
            pkg.mkdir(parents=True)
            import edgeopt.agent
            import edgeopt.hardware_profiles
            import edgeopt.sdk

            sources = {"sdk": edgeopt.sdk, "agent": edgeopt.agent, "hardware_profiles": edgeopt.hardware_profiles}
            for part in _PARTS:
                # Symlinks, not copies: the emulated agent runs exactly the code under test.
                (pkg / part).symlink_to(Path(sources[part].__file__).resolve().parent, target_is_directory=True)
            yield EmulatedPython(self, link_root)


@dataclass(frozen=True)
class EmulatedPython:
    """Commands and environment for the emulated interpreter of one :meth:`ArmEmulator.session`."""

    emulator: ArmEmulator
    source: Path

    def command(self, args: list[str]) -> list[str]:
        emu = self.emulator
        # -s: no user site; the sysroot's own dist-packages folders are empty on purpose (arm-sysroot.sh)
        cpu = ["-cpu", emu.cpu] if emu.cpu else []
        return [emu.qemu, *cpu, "-L", str(emu.sysroot), str(emu.python), "-s", *args]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The host's environment minus its Python settings, with this edgeopt and the aarch64 wheels."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "LD_"))}
        env["PYTHONPATH"] = os.pathsep.join([str(self.source), str(self.emulator.site)])
        env["PYTHONNOUSERSITE"] = "1"
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # the aarch64 run must not leave .pyc files in the source tree
        env.update(extra or {})
        return env

    def run(self, args: list[str], *, timeout: float, env: dict[str, str] | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        """Run to completion with captured text output; the child is killed after ``timeout`` seconds."""
        try:
            return subprocess.run(self.command(args), env=self.env(env), cwd=cwd, capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise EmulationError(f"the emulated aarch64 run did not finish within {timeout:.0f} s "
                                 f"({' '.join(args[:4])})", hint="emulation is 10-50x slower than a real CPU; "
                                 "pass a larger timeout") from None

    def popen(self, args: list[str], *, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(args), env=self.env(env), stdin=subprocess.DEVNULL, **kwargs)


_CPU_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


def find_emulator(root: str | Path | None = None, cpu: str | None = None) -> ArmEmulator:
    """The emulated aarch64 environment at ``root`` (default ``$EDGEOPT_ARM_SYSROOT``, else .cache/arm-sysroot
    in the current folder or in the source checkout edgeopt runs from).

    ``cpu`` (default ``$EDGEOPT_ARM_CPU``, else QEMU's ``max``) names the emulated CPU model.
    Raises :class:`EmulationError` naming what is missing and the script that builds it.
    """
    cpu = cpu or os.environ.get("EDGEOPT_ARM_CPU") or None
    if cpu is not None and not _CPU_NAME.match(cpu):
        raise EmulationError(f"{cpu!r} is not a QEMU CPU model name",
                             hint="list them with: qemu-aarch64-static -cpu help")
    given = root or os.environ.get("EDGEOPT_ARM_SYSROOT")
    if given:
        where = Path(given).resolve()
    else:
        # the current folder's cache, else the source checkout's (an editable install run from elsewhere)
        tried = [DEFAULT_CACHE.resolve(), (Path(__file__).resolve().parent.parent / DEFAULT_CACHE)]
        where = next((p for p in tried if (p / "ready").is_file()), tried[0])
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise EmulationError(f"{QEMU} is not installed, so nothing can run as aarch64 here", hint=BUILD_HINT)
    emu = ArmEmulator(root=where, qemu=qemu, cpu=cpu)
    if not (where / "ready").is_file() or not emu.python.is_file() or not emu.site.is_dir():
        raise EmulationError(f"no aarch64 sysroot in {where} (ready, sysroot/usr/bin/python3.11 and site/ are "
                             f"expected there)", hint=BUILD_HINT)
    return emu
