"""Package endpoints: list, detail (with manifest and checks), upload, download."""
from __future__ import annotations

from flask import abort, request
from sqlalchemy import select

from edgeopt.sdk.errors import InputError

from .. import package_store
from ..models import Package
from ..security import requires_role
from ..views import get_db
from ..views.packages import _send, signed_download_url, upload
from . import bp, ok
from .serialize import package_json


@bp.get("/packages")
def packages():
    rows = get_db().scalars(select(Package).order_by(Package.uploaded_at.desc())).all()
    return ok({"packages": [package_json(p) for p in rows]})


@bp.post("/packages")
@requires_role("operator")
def upload_package():
    """Multipart upload, field ``file``: signature and hashes are checked before anything is stored."""
    f = request.files.get("file")
    if f is None:
        raise InputError("no file: send the package as multipart form field 'file'")
    pkg = upload(f)
    return ok(package_json(pkg, download_url=signed_download_url(pkg), full=True), 201)


@bp.get("/packages/<int:package_id>")
def package(package_id: int):
    pkg = get_db().get(Package, package_id) or abort(404, description=f"no package with id {package_id}")
    out = package_json(pkg, download_url=signed_download_url(pkg), full=True)
    out["checks"] = [{"name": n, "passed": p, "detail": d} for n, p, d in package_store.manifest_checks(pkg.manifest)]
    return ok(out)


@bp.get("/packages/<int:package_id>/file")
def package_file(package_id: int):
    pkg = get_db().get(Package, package_id) or abort(404, description=f"no package with id {package_id}")
    return _send(pkg)
