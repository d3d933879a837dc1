"""The packaging pipeline: model -> optimized, validated, benchmarked, signed ``.eopkg``.

Public API (used by ``edgeopt package``, ``edgeopt compare`` and scripts)::

    from edgeopt.sdk.pipeline import PackageRequest, build_package, prepare, candidates_for, evaluate

    # one package, the way `edgeopt package` does it
    result = build_package(PackageRequest(model="m.onnx", profile="npu", calib="calib.npz",
                                          input_shapes={"images": [1, 3, 224, 224]},
                                          sign_key="keys/edgeopt.key", output="m-npu.eopkg"))
    result.manifest, result.output, result.chosen.speedup, result.validation.min_cosine

    # several configurations without writing a package (what `edgeopt compare` does)
    with prepare(PackageRequest(model="m.onnx", profile="cpu", calib="calib.npz")) as prep:
        for cand in candidates_for(prep, all_precisions=True):   # [Candidate(runtime, precision, graph_level)]
            res = evaluate(prep, cand)                          # CandidateResult: never raises for a
            print(res.row())                                    # candidate that fails; see res.error

Stages, one module each: ``load`` (load + check) -> ``optimize`` (onnxslim + runtime optimizer, node
counts) -> ``shapes`` (--input-shape, static-shape policy) -> ``data`` (calibration and held-out inputs)
-> backend ``build`` in ``edgeopt.sdk.backends`` (fp32 / fp16 / int8 / weight-only; NNCF for OpenVINO,
ONNX Runtime's QDQ quantizer for ONNX Runtime) -> ``accuracy`` (fp32 vs optimized on held-out samples,
per-layer sensitivity, float-layer search) -> ``benchmark`` (fp32 ONNX Runtime baseline and the optimized
model, interleaved in the same run) -> ``golden`` -> ``pack`` (manifest, sign, atomic write).

``prepare`` does the shared work once (load, optimize, shapes, calibration/held-out data, fp32 reference
outputs, fp32 baseline session). ``evaluate(prep, candidate)`` builds one configuration in a temporary
directory, validates it against the profile's accuracy budget and benchmarks it against the fp32 baseline;
``CandidateResult.row()`` is a flat dict for tables. ``pick(results)`` returns the fastest result within
the budget. ``build_package`` = prepare + evaluate the profile's candidates + pick + golden samples + pack.

Devices this host does not have (NPU, Intel GPU, NVIDIA GPU) are compiled for and measured on the host
CPU instead: ``CandidateResult.host_proxy`` / ``BenchmarkReport.host_proxy`` say so, and the
``device`` field names the device that would run the package.

Progress: pass any object with the :class:`~edgeopt.sdk.pipeline.progress.Progress` methods (``stage``,
``note``, ``warn``); :class:`RichProgress` draws on stderr, the default :class:`NullProgress` is silent
(messages still go to logging).

Errors are :mod:`edgeopt.sdk.errors` subclasses with one-line messages; ``build_package`` never leaves
a file at ``request.output`` when it fails.
"""
from __future__ import annotations

from .progress import NullProgress, Progress, RichProgress
from .types import (PRECISIONS, Artifact, BuildResult, Candidate, CandidateResult, ImagePreprocessing,
                    PackageRequest)


def prepare(request: PackageRequest, progress: Progress | None = None):
    """Load, check, optimize and shape the model; read calibration and held-out data; run the fp32 reference.

    Returns a :class:`~edgeopt.sdk.pipeline.prepared.Prepared` (a context manager that removes its work dir).
    """
    from .prepared import prepare as _prepare

    return _prepare(request, progress or NullProgress())


def candidates_for(prepared, *, all_precisions: bool = False) -> list[Candidate]:
    """The configurations to try for the prepared model's profile (overrides in the request narrow them).

    Default: each of the profile's runtimes that can take this model, at the profile's precision.
    ``all_precisions=True`` (compare): also fp32, fp16 and, for int8 profiles, the accuracy-aware variant.
    """
    from .prepared import candidates_for as _c

    return _c(prepared, all_precisions=all_precisions)


def evaluate(prepared, candidate: Candidate, progress: Progress | None = None) -> CandidateResult:
    """Build, validate and benchmark one configuration without writing a package. Never raises for a
    candidate that cannot be built: ``ok=False`` and ``error`` (one line) say why."""
    from .evaluation import evaluate as _evaluate

    return _evaluate(prepared, candidate, progress or NullProgress())


def pick(results: list[CandidateResult]) -> CandidateResult | None:
    """The fastest (lowest p50 latency) result within the accuracy budget, or None."""
    from .evaluation import pick as _pick

    return _pick(results)


def build_package(request: PackageRequest, progress: Progress | None = None) -> BuildResult:
    """Run the whole pipeline and write ``request.output`` (signed, atomically). Raises EdgeoptError."""
    from .build import build_package as _build

    return _build(request, progress or NullProgress())


def export_torch(module, example_inputs, path, *, input_names=None, output_names=None, opset: int = 17):
    """Export a PyTorch module to ONNX (torch is optional: MissingDependencyError names the extra)."""
    from .load import export_torch as _export

    return _export(module, example_inputs, path, input_names=input_names, output_names=output_names, opset=opset)


__all__ = ["PackageRequest", "ImagePreprocessing", "Candidate", "CandidateResult", "Artifact", "BuildResult",
           "PRECISIONS", "prepare", "candidates_for", "evaluate", "pick", "build_package", "export_torch",
           "Progress", "NullProgress", "RichProgress"]
