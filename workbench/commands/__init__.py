"""CLI subcommands contributed by the library packages: each module has `register(subparsers)`."""
