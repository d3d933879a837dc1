"""`python -m edgeopt.sdk.cli` runs the `edgeopt` command."""
from . import main

main()
