"""Uploaded packages: check, store, and hand out signed download URLs to agents.

An upload is streamed to a temporary file (hashing as it goes), opened with the SDK's defensive
:class:`~edgeopt.sdk.package.PackageReader`, and verified: the manifest's Ed25519 signature against the
keys the dashboard trusts (``EDGEOPT_TRUSTED_KEYS``) and every file's sha256. Only then is it moved to
``<PACKAGE_DIR>/<sha256>.eopkg`` and recorded; any failure leaves nothing behind.

Agents download without a user session: the deploy command carries a URL with an itsdangerous token
(package id and sha256, signed with the app's secret key, limited in time). The agent checks the
sha256 and the signature again after downloading, so the URL only needs to be unguessable, not secret.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterable

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeopt.sdk.errors import ConfigError, InputError, PackageError, SecurityError
from edgeopt.sdk.package import PackageReader, load_public_key

from .models import Package

log = logging.getLogger(__name__)

DOWNLOAD_SALT = "edgeopt-package-download"


def load_trusted_keys(entries: Iterable[str]) -> list:
    """Public keys from PEM files (or PEM text). Raises :class:`ConfigError` naming a bad entry."""
    keys = []
    for entry in entries:
        entry = str(entry).strip()
        if not entry:
            continue
        try:
            keys.append(load_public_key(entry.encode() if entry.startswith("-----BEGIN") else Path(entry)))
        except PackageError as exc:
            raise ConfigError(f"EDGEOPT_TRUSTED_KEYS: {exc.message}",
                              hint="list PEM public key files made by 'edgeopt keygen'") from None
    return keys


def _spool(stream: BinaryIO, directory: Path, chunk: int = 1 << 20) -> tuple[Path, str, int]:
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".upload-", suffix=".eopkg")
    h, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            for block in iter(lambda: stream.read(chunk), b""):
                h.update(block)
                size += len(block)
                out.write(block)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp), h.hexdigest(), size


def store_upload(db: Session, stream: BinaryIO, filename: str, package_dir: str | Path, trusted_keys: list,
                 uploaded_by_id: int | None = None) -> Package:
    """Verify and store an uploaded package; returns the new :class:`Package` row (committed).

    Raises :class:`SecurityError` (unsigned, wrong key, tampered file), :class:`PackageError` (not a
    package, unsafe archive, bad manifest) or :class:`InputError` (already uploaded).
    """
    if not trusted_keys:
        raise SecurityError("no trusted signing keys are configured, so no package can be accepted",
                            hint="set EDGEOPT_TRUSTED_KEYS to the public key file(s) of your signing keys")
    package_dir = Path(package_dir)
    tmp, sha256, size = _spool(stream, package_dir / ".incoming")
    try:
        if size == 0:
            raise PackageError(f"{filename}: the uploaded file is empty")
        try:
            with PackageReader(tmp) as reader:
                signer = reader.verify(trusted_keys)
                manifest = reader.manifest
        except (PackageError, SecurityError) as exc:
            # The reader names the temporary file; users know their file by its own name.
            raise exc.__class__(exc.message.replace(str(tmp), filename), hint=exc.hint) from None
        same = db.scalar(select(Package).where(Package.sha256 == sha256))
        if same is not None:
            raise InputError(f"{filename}: this exact file is already uploaded as {same.name} {same.version} "
                             f"({same.profile})")
        clash = db.scalar(select(Package).where(Package.name == manifest.name, Package.version == manifest.version,
                                                Package.profile == manifest.profile_name))
        if clash is not None:
            raise InputError(f"{filename}: {manifest.name} {manifest.version} for profile {manifest.profile_name} "
                             f"already exists with different content",
                             hint="bump the version: a version number must always mean the same package")
        final = package_dir / f"{sha256}.eopkg"
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    pkg = Package(name=manifest.name, version=manifest.version, profile=manifest.profile_name,
                  runtime=manifest.runtime, precision=manifest.precision, sha256=sha256, size=size,
                  manifest=manifest.model_dump(mode="json"), signer_key_id=signer, storage_path=str(final),
                  uploaded_by_id=uploaded_by_id)
    db.add(pkg)
    try:
        db.commit()
    except BaseException:
        db.rollback()
        final.unlink(missing_ok=True)
        raise
    log.info("package %s %s (%s) stored as %s, signed by %s", pkg.name, pkg.version, pkg.profile, final, signer)
    return pkg


def _serializer(secret_key: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(secret_key, salt=DOWNLOAD_SALT)


def download_token(secret_key: str, package: Package) -> str:
    """A signed, time-limited token naming one package (id and sha256)."""
    return _serializer(secret_key).dumps({"id": package.id, "sha256": package.sha256})


def resolve_download_token(secret_key: str, token: str, max_age_s: int) -> tuple[int, str]:
    """(package id, sha256) of a valid token; :class:`SecurityError` for a bad or expired one."""
    try:
        data = _serializer(secret_key).loads(token, max_age=max_age_s)
    except SignatureExpired:
        raise SecurityError("download link expired", hint="start the deployment again for a fresh link") from None
    except BadSignature:
        raise SecurityError("download link is not valid") from None
    return int(data["id"]), str(data["sha256"])


def manifest_checks(manifest: dict) -> list[tuple[str, bool, str]]:
    """What the package page shows under "checks": (name, passed, detail)."""
    checks: list[tuple[str, bool, str]] = [("signature", True, "verified against a trusted key on upload"),
                                           ("file hashes", True, f"{len(manifest.get('files', {}))} file(s) match the signed manifest")]
    val = manifest.get("validation")
    if val is None:
        checks.append(("accuracy validation", False, "no validation report in the manifest"))
    else:
        detail = f"{val.get('samples', 0)} samples, task {val.get('task', 'generic')}"
        metric = val.get("metric") or {}
        if metric.get("name"):
            detail += f", {metric['name']} {float(metric.get('optimized', 0)):.4f}"
        detail += f", min cosine {val.get('min_cosine', 0):.4f}"
        if val.get("top1_agreement") is not None:
            detail += f", top-1 agreement {val['top1_agreement']:.1%}"
        if val.get("failures"):
            detail += "; " + "; ".join(val["failures"])
        checks.append(("accuracy validation", bool(val.get("passed")), detail))
    calib = manifest.get("calibration")
    if calib is not None and not calib.get("meaningful", True):
        checks.append(("calibration data", False, "random calibration: the accuracy check means little"))
    bench = manifest.get("benchmark")
    if bench is None:
        checks.append(("benchmark", False, "no benchmark report in the manifest"))
    else:
        proxy = " (host proxy for the target device)" if bench.get("host_proxy") else ""
        checks.append(("benchmark", True, f"speedup {bench.get('speedup', 0):.2f}x vs fp32{proxy}"))
    checks.append(("golden samples", manifest.get("golden") is not None,
                   "present: the agent self-tests after install" if manifest.get("golden")
                   else "none: the agent cannot self-test this package"))
    return checks
