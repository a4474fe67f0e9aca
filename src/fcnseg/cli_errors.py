"""Turning user errors into one clear line (``error: …``, exit status 2) instead of a traceback."""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterator

from fcnseg.errors import FcnsegError

USER_ERROR_EXIT = 2


def user_message(exc: BaseException) -> str:
    """The error's one line. An error raised in a DataLoader worker comes back wrapped in the worker's traceback
    ("Caught DataError in DataLoader worker process 0 … Original Traceback …"): keep only its own message."""
    text = str(exc).strip()
    lines = text.splitlines()
    if len(lines) > 1 and "Original Traceback" in text:
        prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
        last = lines[-1].strip()
        return last[len(prefix):] if last.startswith(prefix) else last.split(": ", 1)[-1]
    return " ".join(line.strip() for line in lines)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(USER_ERROR_EXIT)


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    try:
        yield
    except FcnsegError as exc:
        fail(user_message(exc))


def _hydra_one_line(exc: BaseException) -> str:
    """Hydra's multi-line message folded into one line, without the config search path dump."""
    lines = []
    for line in str(exc).splitlines():
        if line.strip().startswith("Config search path"):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines) if lines else type(exc).__name__


def precheck_overrides(config_dir: str, config_name: str, argv: list[str] | None = None) -> None:
    """Composes the config once before Hydra runs, so a malformed or unknown override ends in one line.

    Hydra's own report spans several lines (search path, hint to set HYDRA_FULL_ERROR); users need the one
    that says what was wrong. The command line is split as Hydra splits it (its own argument parser), so flag
    values such as ``--cfg job`` or ``--package model`` are never taken for overrides. Sweeps (-m) are checked
    for syntax only; help, info, shell completion, another config name/dir, and anything Hydra's parser
    rejects are left to Hydra.
    """
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = sys.argv[1:] if argv is None else argv
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            parsed_args = get_args_parser().parse_args(args)
    except SystemExit:
        return  # Hydra reports its own usage errors (and --version) the same way
    if (parsed_args.help or parsed_args.hydra_help or parsed_args.info or parsed_args.shell_completion
            or parsed_args.config_path or parsed_args.config_name or parsed_args.config_dir
            or parsed_args.experimental_rerun):
        return
    multirun = parsed_args.multirun
    overrides = list(parsed_args.overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        if multirun or any(o.is_sweep_override() for o in parsed):
            return
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            compose(config_name=config_name, overrides=[o for o in overrides if not o.startswith("hydra.")])
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        fail(f"invalid override: {_hydra_one_line(exc)}; "
             f"see `python -m fcnseg.train --help` for the config groups and keys")
