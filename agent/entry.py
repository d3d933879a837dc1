"""The ``edgeopt-agent`` console script: the daemon, or one line naming the extra when it is not installed.

The script exists in every install of edgeopt (console scripts cannot belong to an extra), so without
the agent's dependencies it must say what to install instead of showing an ImportError traceback.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run :func:`edgeopt.agent.daemon.main`; exit 5 with the install command when it cannot be imported."""
    try:
        from .daemon import main as daemon_main
    except ImportError as exc:
        from ..sdk.errors import ExitCode

        print(f"edgeopt-agent: error: the agent is not installed ({exc.name} cannot be imported) (install it "
              "with one runtime: pip install 'edgeopt[agent-openvino]', 'edgeopt[agent-onnxruntime]' or "
              "'edgeopt[agent-tflite]')", file=sys.stderr)
        return int(ExitCode.MISSING_DEPENDENCY)
    return daemon_main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
