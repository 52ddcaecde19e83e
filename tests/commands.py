"""`para-trainer ARGS` run in-process, as the tests call it: the exit status the shell would see."""

from para_trainer import cli


def run_cli(*argv) -> int:
    try:
        cli.main([str(a) for a in argv])
    except SystemExit as stop:
        return stop.code
    return 0
