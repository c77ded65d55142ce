"""Running `wb` as a user types it, from tests: argv through the CLI's entry point, exit code checked."""
from workbench.cli import main


def wb(*argv, ok=True):
    code = main([str(a) for a in argv])
    assert (code == 0) == ok, (argv, code)
    return code
