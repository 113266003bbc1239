"""User errors, and how every command line (stylize, train, evaluate, plan) reports them.

A user error is bad input: a file that cannot be read, a checkpoint that is missing, of the wrong kind or of
another variant, bad training data, a config or setting that cannot work. The CLIs print it as one line on stderr,
`error: <message>` (the message names the file or setting and what is wrong), and exit with status 2. Any other
exception is a bug and keeps its traceback. `--verbose`, or PICKSTYLE_TRACEBACK=1 in the environment, shows the
traceback of a user error too.

The classes are named by dotted path rather than imported, so this module imports nothing of the package
(stylize's argument checks and the evaluator stay free of JAX until they need it, and no import cycles arise);
tests/test_cli_errors.py checks that every name resolves.
"""
from __future__ import annotations

import os
import sys

__all__ = ["InputError", "USER_ERRORS", "TRACEBACK_ENV", "EXIT_CODE", "is_user_error", "one_line",
           "traceback_requested", "report", "add_verbose_argument", "absl_run", "config_flag"]

TRACEBACK_ENV = "PICKSTYLE_TRACEBACK"
EXIT_CODE = 2  # argparse's status for bad usage; stylize always used it


class InputError(ValueError):
    """A command-line input that cannot work (a setting, a file); the message names it and says what to change."""


USER_ERRORS = (
    "pickstyle_jax.errors.InputError",
    "pickstyle_jax.data.sources.DataError",          # training data: unreadable images, pairing, captions
    "pickstyle_jax.checkpoints.CheckpointError",     # missing, incomplete, unreadable or wrong-kind checkpoint
    "pickstyle_jax.sample.stylizer.CompatibilityError",  # checkpoints of different variants
    "pickstyle_jax.sample.settings.SettingsError",   # a sampler setting that cannot work
    "pickstyle_jax.train.setup.ConfigError",
    "pickstyle_jax.train.loop.LossNotFinite",        # names the step and the checkpoint to resume from
    "pickstyle_jax.sharding.ShardingError",          # a mesh the config's rules cannot use
    "pickstyle_jax.video.VideoError",
    "pickstyle_jax.guidance.ApgSettingError",
    # OS errors about a path the user gave (their message names it); other OSErrors stay bugs
    "builtins.FileNotFoundError", "builtins.PermissionError", "builtins.IsADirectoryError",
    "builtins.NotADirectoryError", "builtins.FileExistsError",
)


def is_user_error(e: BaseException) -> bool:
    """True if `e` is an instance of a USER_ERRORS class (or of a subclass of one)."""
    return any(f"{c.__module__}.{c.__qualname__}" in USER_ERRORS for c in type(e).__mro__)


def one_line(e: BaseException | str) -> str:
    """The message on one line. A message that embeds a traceback (ml_collections does so for errors inside a
    config file) keeps its first line and the traceback's last, the error itself."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    if any(ln.startswith("Traceback (most recent call last)") for ln in lines):
        head = lines[0].rstrip(":")
        return f"{head}: {lines[-1]}" if lines[-1] != lines[0] else head
    return " ".join(lines)


def traceback_requested(verbose: bool = False) -> bool:
    return bool(verbose) or os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def report(e: BaseException, verbose: bool = False) -> int:
    """Call from `except Exception as e`: prints a user error as one line and returns EXIT_CODE; re-raises a bug,
    or any error when a traceback was asked for."""
    if traceback_requested(verbose) or not is_user_error(e):
        raise e
    print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
    return EXIT_CODE


VERBOSE_HELP = f"show the full traceback of an error (also: {TRACEBACK_ENV}=1 in the environment)"


def add_verbose_argument(parser) -> None:
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


# ----------------------------------------------------------------------------------------- absl CLIs
def absl_run(main, argv=None) -> None:
    """`absl.app.run(main, argv)` for the config-file CLIs (train, plan): adds --verbose, and makes a flag error (an
    unknown or mistyped --config.x, a config file that fails) and a user error raised by `main` one line each."""
    from absl import app, flags

    if "verbose" not in flags.FLAGS:
        flags.DEFINE_boolean("verbose", False, VERBOSE_HELP)

    def parse(args):
        try:
            return flags.FLAGS(args)
        except flags.Error as e:
            if traceback_requested("--verbose" in args):
                print(f"error: {e}", file=sys.stderr, flush=True)  # absl's full text (a config file's traceback)
            else:
                print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
            sys.exit(EXIT_CODE)
        except (AttributeError, KeyError) as e:
            # ml_collections' answer to an override of a field the locked config lacks: the bare field name
            key = str(e).strip("'\" ")
            culprit = [a.split("=", 1)[0] for a in args[1:] if a.startswith("--") and "." in a
                       and key in a.split("=", 1)[0].split(".")]
            if not culprit or traceback_requested("--verbose" in args):
                raise
            print(f"error: {culprit[0]}: the config has no field {key!r} (a typo?)", file=sys.stderr, flush=True)
            sys.exit(EXIT_CODE)

    def guarded(args):
        try:
            return main(args)
        except Exception as e:  # noqa: BLE001 -- report() re-raises all but user errors (absl's UsageError too)
            return report(e, flags.FLAGS.verbose)

    app.run(guarded, argv, flags_parser=parse)


def config_flag(name: str = "config"):
    """The parsed value of a `config_flags.DEFINE_config_file` flag. ml_collections defers a config file it could
    not open to the first attribute access, as an OSError that says 'earlier failure'; this names the file."""
    from absl import flags

    value = flags.FLAGS[name].value
    try:
        value.get("seed")  # any access raises for a file that could not be loaded
    except OSError as e:
        path = str(flags.FLAGS[name].config_filename).split(":", 1)[0]
        what = "no such file" if not os.path.isfile(path) else one_line(e.__cause__ or e).split(": ", 1)[-1]
        raise InputError(f"{path}: cannot load the config file (--{name}): {what}") from e
    return value
