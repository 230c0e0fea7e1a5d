"""The ``fastelbo`` command line. Each subcommand lives in its own module
exposing ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "check": ("fastelbo.commands.check", "build the kernels and check every available backend against the reference"),
    "build": ("fastelbo.commands.build", "prebuild the C++ kernels into the cache"),
    "info": ("fastelbo.commands.info", "versions, available backends and why not, build cache location"),
    "bench": ("fastelbo.commands.bench", "benchmark every op against eager and torch.compile; compare with a baseline"),
    "demo": ("fastelbo.commands.demo", "train a small VAE on the digits with fastelbo and with the reference; compare"),
}


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="fastelbo", description="Fused, exact ELBO losses for PyTorch.")
    parser.add_argument("--version", action="version", version=f"fastelbo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
