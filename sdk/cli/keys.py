"""`edgeopt keygen`: create an Ed25519 signing key pair."""
from __future__ import annotations

import click

from ..package import generate_keypair, key_id, load_public_key
from .options import json_option, emit_json


@click.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="keys", show_default=True,
              help="Folder for NAME.key (private, mode 0600) and NAME.pub.")
@click.option("--name", default="edgeopt", show_default=True, help="File stem of the key pair.")
@click.option("--force", is_flag=True, help="Replace existing key files.")
@json_option
def keygen(out_dir: str, name: str, force: bool, as_json: bool) -> None:
    """Create an Ed25519 key pair for signing packages."""
    priv, pub = generate_keypair(out_dir, name=name, overwrite=force)
    kid = key_id(load_public_key(pub))
    if as_json:
        emit_json({"private_key": str(priv), "public_key": str(pub), "key_id": kid})
    else:
        click.echo(f"private key: {priv}  (keep it secret; sign packages with --sign-key {priv})")
        click.echo(f"public key:  {pub}  (give it to agents as --trust-key; key id {kid})")
