"""The `edgeopt` command line: a click group whose subcommands import lazily.

Heavy modules (onnx, openvino, nncf) are imported only by the command that needs them, so
`edgeopt --help` and `edgeopt inspect` start fast and work where no runtime is installed.
"""
from __future__ import annotations

import importlib
import logging
import sys

import click

from .. import __version__
from ..errors import EdgeoptError, ExitCode

# name -> "module:attribute" of a click command; imported only when used.
COMMANDS: dict[str, str] = {
    "keygen": "edgeopt.sdk.cli.keys:keygen",
    "package": "edgeopt.sdk.cli.package_cmd:package",
    "inspect": "edgeopt.sdk.cli.inspect_cmd:inspect_",
    "verify": "edgeopt.sdk.cli.inspect_cmd:verify",
    "bench": "edgeopt.sdk.cli.bench_cmd:bench",
    "compare": "edgeopt.sdk.cli.compare_cmd:compare",
    "prune": "edgeopt.sdk.cli.prune_cmd:prune",
    "profiles": "edgeopt.sdk.cli.profiles_cmd:profiles",
    "profile": "edgeopt.sdk.cli.profiles_cmd:profile",
    "agent": "edgeopt.agent.cli:agent",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use (click's documented lazy-loading pattern)."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, attr = self.lazy[name].split(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except ImportError as exc:
                return _unavailable(name, exc)
        return super().get_command(ctx, name)

    def resolve_command(self, ctx, args):
        # "did you mean" for mistyped commands, like git.
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:
            import difflib

            if args and args[0] not in self.list_commands(ctx):
                close = difflib.get_close_matches(args[0], self.list_commands(ctx), n=1)
                if close:
                    raise click.UsageError(f"No such command '{args[0]}'. Did you mean '{close[0]}'?", ctx) from None
            raise exc


def _unavailable(name: str, exc: ImportError) -> click.Command:
    """Stand-in for a command whose module cannot be imported: listed in --help, fails with the fix."""
    extra = "agent" if name == "agent" else "sdk"
    message = (f"command '{name}' needs a module that is not installed ({exc.name}); "
               f"install it with: pip install 'edgeopt[{extra}]'")

    def fail(**_: object) -> None:
        raise click.ClickException(message)

    return click.Command(name, callback=fail, help=f"(unavailable: {message})", short_help="(not installed)",
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True})


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeopt")
@click.option("-v", "--verbose", count=True, help="Log output: -v info, -vv debug (default: errors only; "
              "commands report what matters themselves).")
@click.option("--traceback", is_flag=True, help="Show the full Python traceback on errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, traceback: bool) -> None:
    """edgeopt: compile, quantize, validate, benchmark and sign models for edge hardware profiles."""
    ctx.ensure_object(dict)
    ctx.obj["traceback"] = traceback
    # Commands print their own results and one-line errors; library warnings would repeat them.
    level = {0: logging.ERROR, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def run_cli(group: click.Group, argv: list[str] | None = None, prog_name: str | None = None) -> int:
    """Run a click group, turning EdgeoptError into one line on stderr and its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_tb = "--traceback" in argv
    try:
        group.main(args=argv, prog_name=prog_name, standalone_mode=False)
        return ExitCode.OK
    except EdgeoptError as exc:
        if show_tb:
            raise
        click.echo(f"error: {exc.one_line()}", err=True)
        return int(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as exc:  # a bug: one line, and how to see more
        if show_tb:
            raise
        click.echo(f"error: unexpected {exc.__class__.__name__}: {exc} (rerun with --traceback for details)",
                   err=True)
        return int(ExitCode.ERROR)


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_cli(cli, argv, prog_name="edgeopt"))
