"""Subcommands of the fastelbo command line (see fastelbo.cli)."""
