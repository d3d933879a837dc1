"""Every third-party import of each part is declared in that part's extras (issue 9).

Seen before: sdk/package.py (read by every part) imports ``packaging``, which no extra declared, so a
fresh ``pip install 'edgeopt[dashboard]'`` failed in ``create_app()``. This test reads the imports of
every module with ``ast`` (lazy imports inside functions included) and maps them to distributions with
``importlib.metadata``; ``scripts/check-extras.sh`` then proves it for real, installing each extra
alone in a fresh virtual environment and starting its entry points (CI runs it).
"""
from __future__ import annotations

import ast
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# The extras that may serve each part's imports (besides the core dependencies).
PART_EXTRAS = {
    "sdk": ["sdk", "tflite", "torch", "prune", "llm"],
    "agent": ["agent", "agent-openvino", "agent-onnxruntime", "agent-tflite", "agent-torch", "agent-llm"],
    "dashboard": ["dashboard"],
}
# Imports that are optional on purpose, each guarded by an ImportError that names what to install.
OPTIONAL = {
    "uvloop": "agent/server.py: [api] event_loop = \"uvloop\" asks for it by name",
    "tflite_runtime": "agent/runtimes/tflite.py: the older LiteRT package, tried after ai_edge_litert",
    "onnx": "agent/runtimes/onnxruntime.py: source node names in a layer profile where ONNX tooling is there; "
            "without it the profile shows ONNX Runtime's own names",
}
RUNTIMES = {"openvino", "onnxruntime", "ai-edge-litert"}


def _name(req: str) -> str:
    return Requirement(req).name.lower().replace("_", "-")


def _extra_dists(extra: str, seen: set[str] | None = None) -> set[str]:
    """Distributions an extra installs, following ``edgeopt[...]`` self-references."""
    seen = seen if seen is not None else set()
    if extra in seen:
        return set()
    seen.add(extra)
    out: set[str] = set()
    for req in PYPROJECT["optional-dependencies"][extra]:
        r = Requirement(req)
        if r.name == "edgeopt":
            for sub in r.extras:
                out |= _extra_dists(sub, seen)
        else:
            out.add(_name(req))
    return out


def _not_for_this_python() -> set[str]:
    """Requirements whose environment marker excludes this interpreter (their module is not installed)."""
    reqs = [*PYPROJECT["dependencies"], *(r for rs in PYPROJECT["optional-dependencies"].values() for r in rs)]
    return {Requirement(r).name for r in reqs if Requirement(r).marker and not Requirement(r).marker.evaluate()}


def _imports(folder: Path, files: list[Path] | None = None) -> dict[str, list[str]]:
    """Top-level third-party module -> files importing it (at module level or inside functions)."""
    found: dict[str, list[str]] = {}
    for path in files or sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("edgeopt", "__future__"):
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("part", sorted(PART_EXTRAS))
def test_every_import_is_declared_in_the_parts_extras(part):
    core = {_name(r) for r in PYPROJECT["dependencies"]}
    allowed = core.union(*(_extra_dists(e) for e in PART_EXTRAS[part]))
    dists = packages_distributions()
    missing = []
    for module, files in sorted(_imports(ROOT / part).items()):
        if module in OPTIONAL:
            continue
        names = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        if not names and module in _not_for_this_python():
            continue  # e.g. tomli, declared for Python < 3.11 only
        assert names, f"{module} (imported by {files[0]}) is not installed in the test environment"
        if not names & allowed:
            missing.append(f"{module} ({'/'.join(sorted(names))}, imported by {files[0]})")
    assert not missing, f"{part}: imports not declared in {PART_EXTRAS[part]} or the core dependencies: {missing}"


def test_the_contracts_import_only_core_dependencies():
    """The contracts are read by all three parts, so what they import must come with any install."""
    core = {_name(r) for r in PYPROJECT["dependencies"]}
    dists = packages_distributions()
    contracts = [ROOT / "sdk" / f"{m}.py" for m in ("package", "profile", "telemetry", "topics", "errors", "plugins")]
    for module, files in sorted(_imports(ROOT / "sdk", contracts).items()):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        if not names and module in _not_for_this_python():
            continue
        assert names & core, f"{module} (imported by {files[0]}) is not a core dependency of edgeopt"


def test_the_agent_extra_has_no_runtime_and_each_agent_runtime_extra_exactly_one():
    assert not _extra_dists("agent") & RUNTIMES
    for extra, runtime in (("agent-openvino", "openvino"), ("agent-onnxruntime", "onnxruntime"),
                           ("agent-tflite", "ai-edge-litert")):
        assert _extra_dists(extra) & RUNTIMES == {runtime}, extra
        assert _extra_dists("agent") <= _extra_dists(extra), extra
    # the design: the agent installs without the SDK's tooling and without the dashboard's server stack
    heavy = {"nncf", "onnx", "onnxslim", "flask", "sqlalchemy", "matplotlib"}
    for extra in PART_EXTRAS["agent"]:
        assert not _extra_dists(extra) & heavy, extra


def test_all_installs_every_extra():
    every = set().union(*(_extra_dists(e) for e in PYPROJECT["optional-dependencies"] if e not in ("all", "test",
                                                                                                   "torch", "prune",
                                                                                                   "agent-torch",
                                                                                                   "llm")))
    assert every <= _extra_dists("all"), sorted(every - _extra_dists("all"))


def test_the_agent_runtime_registry_names_the_agent_extras():
    from edgeopt.agent.runtimes import REGISTRY

    for runtime, (_, extra) in REGISTRY.items():
        assert extra in PYPROJECT["optional-dependencies"], extra
        assert extra.startswith("agent-") and extra in PART_EXTRAS["agent"], (runtime, extra)
