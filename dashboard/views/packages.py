"""Packages: upload (signature and hashes checked), list, manifest view, downloads.

Two download routes: ``/packages/<id>/file`` for logged-in users, and ``/dl/<token>`` for agents, which
have no user session: the token is signed by the app and names one package (see package_store).
"""
from __future__ import annotations

import logging

from flask import (Blueprint, abort, current_app, flash, redirect, render_template, request, send_file,
                   url_for)
from flask_login import current_user
from flask_wtf import FlaskForm
from flask_wtf.file import FileField, FileRequired
from sqlalchemy import select

from edgeopt.sdk.errors import EdgeoptError

from .. import package_store
from ..models import Deployment, Package
from ..security import requires_role
from . import get_db

log = logging.getLogger(__name__)
bp = Blueprint("packages", __name__)
download_bp = Blueprint("packages_download", __name__)


class UploadForm(FlaskForm):
    file = FileField("Package file (.eopkg)", validators=[FileRequired("choose a .eopkg file")])


def trusted_keys() -> list:
    """The trusted public keys, loaded once per app from ``TRUSTED_KEYS``."""
    ext = current_app.extensions
    if "edgeopt_trusted_keys" not in ext:
        ext["edgeopt_trusted_keys"] = package_store.load_trusted_keys(current_app.config["TRUSTED_KEYS"])
    return ext["edgeopt_trusted_keys"]


def signed_download_url(pkg: Package) -> str:
    """Absolute URL an agent can fetch without logging in (EDGEOPT_PUBLIC_URL, else this request's host)."""
    token = package_store.download_token(current_app.config["SECRET_KEY"], pkg)
    path = url_for("packages_download.download", token=token)
    base = (current_app.config.get("PUBLIC_URL") or request.host_url).rstrip("/")
    return base + path


def upload(file_storage) -> Package:
    """Check and store an uploaded file (shared by the page and the API)."""
    return package_store.store_upload(get_db(), file_storage.stream, file_storage.filename or "upload.eopkg",
                                      current_app.config["PACKAGE_DIR"], trusted_keys(),
                                      uploaded_by_id=current_user.id)


@bp.get("/packages")
def index():
    db = get_db()
    rows = db.scalars(select(Package).order_by(Package.uploaded_at.desc())).all()
    return render_template("packages.html", packages=rows, form=UploadForm())


@bp.post("/packages")
@requires_role("operator")
def create():
    form = UploadForm()
    if not form.validate_on_submit():
        flash("; ".join(e for errs in form.errors.values() for e in errs), "error")
        return redirect(url_for("packages.index"))
    try:
        pkg = upload(form.file.data)
    except EdgeoptError as exc:
        get_db().rollback()
        flash(f"upload refused: {exc.one_line()}", "error")
        return redirect(url_for("packages.index"))
    flash(f"{pkg.name} {pkg.version} ({pkg.profile}) uploaded: signature and hashes verified", "success")
    return redirect(url_for("packages.detail", package_id=pkg.id))


@bp.get("/packages/<int:package_id>")
def detail(package_id: int):
    db = get_db()
    pkg = db.get(Package, package_id) or abort(404, description=f"no package with id {package_id}")
    deployments = db.scalars(select(Deployment).where(Deployment.package_id == pkg.id)
                             .order_by(Deployment.created_at.desc()).limit(20)).all()
    return render_template("package.html", p=pkg, m=pkg.manifest, checks=package_store.manifest_checks(pkg.manifest),
                           agent_url=signed_download_url(pkg), deployments=deployments)


@bp.get("/packages/<int:package_id>/file")
def file(package_id: int):
    pkg = get_db().get(Package, package_id) or abort(404, description=f"no package with id {package_id}")
    return _send(pkg)


def _send(pkg: Package):
    return send_file(pkg.storage_path, mimetype="application/octet-stream", as_attachment=True,
                     download_name=f"{pkg.name}-{pkg.version}-{pkg.profile}.eopkg", conditional=True,
                     etag=pkg.sha256)


@download_bp.get("/dl/<token>")
def download(token: str):
    """Package download for agents: no session, the signed token is the authorization."""
    try:
        pkg_id, sha256 = package_store.resolve_download_token(
            current_app.config["SECRET_KEY"], token, current_app.config["DOWNLOAD_URL_MAX_AGE"])
    except EdgeoptError as exc:
        abort(403, description=exc.one_line())
    pkg = get_db().get(Package, pkg_id)
    if pkg is None or pkg.sha256 != sha256:
        abort(404, description="the package of this link no longer exists")
    return _send(pkg)
