"""The dashboard's command-signing key: every command it sends to an agent is signed with it.

Where the key lives: ``EDGEOPT_COMMAND_KEY`` (a PEM Ed25519 private key; it must exist), else
``command-signing.key`` in the instance folder (``EDGEOPT_INSTANCE_DIR``, else the data directory),
generated on first use with its public half ``command-signing.pub`` beside it. The web workers and the
ingest process (which sends later rollout stages) must read the same key. Agents trust its public half
through ``[control] trust_keys``; ``edgeopt-dashboard command-key`` prints it.

Key rotation (see docs/security.md): make a new key (``edgeopt keygen --name command-2``), add its
``.pub`` to every agent's ``trust_keys`` next to the old one, point ``EDGEOPT_COMMAND_KEY`` at the new
key and restart the web and ingest processes, then drop the old ``.pub`` from the agents.
"""
from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from edgeopt.sdk.command_signing import DEFAULT_TTL_S, new_command, sign_command
from edgeopt.sdk.errors import ConfigError
from edgeopt.sdk.package import key_id, load_private_key
from edgeopt.sdk.topics import topic

log = logging.getLogger(__name__)

KEY_NAME = "command-signing"


def instance_dir() -> Path:
    """The dashboard's instance folder, as ``create_app`` resolves it."""
    from .db import data_dir

    env = os.environ.get("EDGEOPT_INSTANCE_DIR")
    return Path(env).expanduser() if env else data_dir()


def command_key_path(instance: Path | None = None) -> tuple[Path, bool]:
    """The private key's path, and whether it was named explicitly (then it is never generated)."""
    env = os.environ.get("EDGEOPT_COMMAND_KEY")
    if env:
        return Path(env).expanduser(), True
    return Path(instance or instance_dir()) / f"{KEY_NAME}.key", False


def _generate(path: Path) -> None:
    """Write a new key pair at ``path`` (+ .pub); several processes starting at once agree on one key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, path)  # fails if another process won the race: then its key is the key
        log.warning("generated a new command-signing key %s (key id %s): add %s to the agents' [control] "
                    "trust_keys", path, key_id(key.public_key()), path.with_suffix(".pub"))
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def _write_public(path: Path, private_key) -> Path:
    from cryptography.hazmat.primitives import serialization

    pub_path = path.with_suffix(".pub")
    pem = private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    if not pub_path.is_file() or pub_path.read_bytes() != pem:
        tmp = pub_path.with_name(f".{pub_path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        tmp.write_bytes(pem)
        os.replace(tmp, pub_path)
    return pub_path


@dataclass
class CommandSigner:
    """Signs commands for one device each; ``ttl_s`` is how long a command stays valid."""

    private_key: Any
    path: Path
    ttl_s: float = DEFAULT_TTL_S

    @property
    def key_id(self) -> str:
        return key_id(self.private_key.public_key())

    @property
    def public_path(self) -> Path:
        return self.path.with_suffix(".pub")

    def message(self, fleet: str, device_id: str, command: str, args: dict[str, Any] | None = None, *,
                command_id: str | None = None, deployment_id: str | None = None,
                now: datetime | None = None) -> tuple[str, bytes]:
        """The (topic, payload) of a signed command for one device."""
        cmd = new_command(command, fleet=fleet, device_id=device_id, args=args, command_id=command_id,
                          deployment_id=deployment_id, ttl_s=self.ttl_s, now=now)
        return topic(fleet, device_id, "cmd"), sign_command(cmd, self.private_key).to_json()


def load_signer(instance: Path | None = None, ttl_s: float | None = None) -> CommandSigner:
    """The dashboard's signer: the configured key, or the instance folder's (generated when missing)."""
    path, explicit = command_key_path(instance)
    if not path.is_file():
        if explicit:
            raise ConfigError(f"EDGEOPT_COMMAND_KEY: command-signing key {path} not found",
                              hint="create one with: edgeopt keygen --out DIR --name command")
        _generate(path)
    try:
        key = load_private_key(path)
    except ConfigError:
        raise
    except Exception as exc:  # PackageError from the shared helper: say which setting is wrong
        raise ConfigError(f"command-signing key {path}: {getattr(exc, 'message', exc)}") from None
    if not explicit:
        _write_public(path, key)
    try:
        ttl = ttl_s if ttl_s is not None else float(os.environ.get("EDGEOPT_COMMAND_TTL_S", DEFAULT_TTL_S))
    except ValueError:
        raise ConfigError(f"EDGEOPT_COMMAND_TTL_S must be a number of seconds, found "
                          f"{os.environ.get('EDGEOPT_COMMAND_TTL_S')!r}") from None
    if not 10 <= ttl <= 86400:
        raise ConfigError(f"EDGEOPT_COMMAND_TTL_S must be between 10 and 86400 seconds, found {ttl:g}")
    return CommandSigner(key, path, ttl)
