"""The ``ember`` command: ``ember config``, ``ember env`` and ``ember launch``.

Every command returns an exit code instead of exiting, so ``main([...])`` can be called (and
tested) in-process: 0 on success, 2 for a usage error (as argparse does), the script's own code
for ``launch``. ``ember`` with no command prints the help and returns 2, since a command is
required.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ember.config import config_path, load_config, save_config
from ember.errors import MisconfigurationError

MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")


class UsageError(Exception):
    """A bad command-line argument or config value: reported in one line, exit code 2."""


# --- validation: every value from the command line, the config file or a question --------------
def _mixed_precision(value: Any, argument: str) -> str:
    # The names Accelerator accepts, written back in the Accelerate spelling ("no"/"fp16"/"bf16").
    from ember.accelerator.precision import ACCELERATE_NAMES, canonical_precision

    try:
        return ACCELERATE_NAMES[canonical_precision(value, argument)]
    except MisconfigurationError as error:
        raise UsageError(str(error)) from None


def _whole_number(value: Any, argument: str, minimum: int, maximum: int | None = None) -> int:
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        try:
            number = int(value)
        except ValueError:
            pass
    bounds = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
    if number is None or number < minimum or (maximum is not None and number > maximum):
        raise UsageError(
            f"`{argument}={value!r}` is not supported. Accepted values: a whole number {bounds}."
        )
    return number


def _positive(value: Any, argument: str) -> int:
    return _whole_number(value, argument, 1)


def _port(value: Any, argument: str) -> int:
    return _whole_number(value, argument, 1, 65535)


def _gpu_ids(value: Any, argument: str) -> str:
    text = str(value).replace(" ", "")
    if text == "all" or (text and all(part.isdigit() for part in text.split(","))):
        return text
    raise UsageError(
        f"`{argument}={value!r}` is not supported. Accepted values: 'all' or GPU indices "
        "separated by commas, such as '0,1'."
    )


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# --- ember config ----------------------------------------------------------------------------
def _questions() -> list[tuple[str, str, Any, Callable[[Any, str], Any]]]:
    """(key, question, default, validator) for every setting ``ember config`` writes."""
    return [
        ("mixed_precision", "Mixed precision (no/fp16/bf16)", "no", _mixed_precision),
        ("num_processes", "Number of processes", _cuda_device_count() or 1, _positive),
        ("num_machines", "Number of machines", 1, _positive),
        ("main_process_port", "Main process port", 29500, _port),
        ("gpu_ids", "GPU ids to use ('all' or e.g. 0,1)", "all", _gpu_ids),
    ]


def _ask(question: str, default: Any, validate: Callable[[Any, str], Any], key: str) -> Any:
    """Ask until the answer is valid; an empty answer takes the default."""
    while True:
        answer = input(f"{question} [{default}]: ").strip()
        try:
            return validate(answer or default, key)
        except UsageError as error:
            print(f"{error} Please answer again.")


def run_config(args: argparse.Namespace) -> int:
    """Ask the questions (or take the defaults) and write the config file."""
    interactive = not args.default and sys.stdin.isatty()
    if not args.default and not interactive:
        print("stdin is not a terminal: writing the default settings without asking.")
    settings: dict[str, Any] = {}
    try:
        for key, question, default, validate in _questions():
            settings[key] = _ask(question, default, validate, key) if interactive else default
    except (EOFError, KeyboardInterrupt):
        print("\nAborted: no config file was written.", file=sys.stderr)
        return 1
    path = save_config(settings, args.config_file)
    print(f"ember config written to {path}")
    return 0


# --- ember env -------------------------------------------------------------------------------
def _installed_version(distribution: str) -> str:
    # Reads package metadata only, so `ember env` never imports tensorboard or wandb.
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run_env(args: argparse.Namespace) -> int:
    """Print the facts a bug report needs, ready to paste."""
    import torch

    import ember

    cuda_count = _cuda_device_count()
    mps = torch.backends.mps.is_available()
    lines = [
        f"- ember version: {ember.__version__}",
        f"- torch version: {torch.__version__}",
        f"- CUDA available: {torch.cuda.is_available()} (CUDA version: {torch.version.cuda})",
        f"- CUDA devices: {cuda_count}",
        *(f"  - cuda:{index}: {torch.cuda.get_device_name(index)}" for index in range(cuda_count)),
        f"- MPS available: {mps}",
        f"- Python version: {platform.python_version()}",
        f"- platform: {platform.platform()}",
        *(
            f"- {name} version: {_installed_version(name)}"
            for name in ("numpy", "torchmetrics", "tensorboard", "wandb")
        ),
    ]
    path = config_path()
    lines.append(f"- config file: {path}")
    if path.is_file():
        # The raw text, not load_config: a broken file is exactly what a bug report should show.
        lines.extend(f"    {line}" for line in path.read_text().splitlines())
    else:
        lines.append("    (no config file)")
    print("\n".join(lines))
    return 0


# --- ember launch ----------------------------------------------------------------------------
def run_launch(args: argparse.Namespace) -> int:
    """Run the script in one process, with the precision and config the arguments settle."""
    config = load_config(args.config_file)
    in_file = " (in the ember config file)"

    def setting(key: str, default: Any, validate: Callable[..., Any], *bounds: int) -> Any:
        # The argument, else the config file, else the default; each named in its own error.
        given = getattr(args, key)
        if given is not None:
            return validate(given, f"--{key}", *bounds)
        if key in config:
            return validate(config[key], key + in_file, *bounds)
        return default

    num_processes = setting("num_processes", 1, _whole_number, 1)
    num_machines = setting("num_machines", 1, _whole_number, 1)
    setting("machine_rank", 0, _whole_number, 0, num_machines - 1)
    setting("main_process_port", 29500, _whole_number, 1, 65535)
    mixed_precision = setting("mixed_precision", None, _mixed_precision)
    gpu_ids = _gpu_ids(config.get("gpu_ids", "all"), "gpu_ids" + in_file)
    if not args.script:
        raise UsageError("no script given. Usage: ember launch [options] script.py [script args]")
    script = Path(args.script[0])
    if not script.is_file():
        raise UsageError(f"the script {str(script)!r} does not exist (looked in {Path.cwd()}).")
    if num_processes > 1 or num_machines > 1:
        raise UsageError(
            f"--num_processes={num_processes} with --num_machines={num_machines}: multi-process "
            "launch arrives with ember's distributed support and is not available yet. Pass "
            "--num_processes 1 --num_machines 1 (or write them with `ember config`)."
        )

    environment = dict(os.environ)
    if args.config_file is not None:  # the script's Accelerator reads the same file
        environment["EMBER_CONFIG_FILE"] = str(Path(args.config_file).resolve())
    # The argument beats EMBER_MIXED_PRECISION, which beats the config file.
    from_argument = args.mixed_precision is not None
    if mixed_precision is not None and (
        from_argument or "EMBER_MIXED_PRECISION" not in environment
    ):
        environment["EMBER_MIXED_PRECISION"] = mixed_precision
    if gpu_ids != "all" and "CUDA_VISIBLE_DEVICES" not in environment:
        environment["CUDA_VISIBLE_DEVICES"] = gpu_ids
    try:
        completed = subprocess.run([sys.executable, str(script), *args.script[1:]], env=environment)
    except KeyboardInterrupt:  # the script got the same Ctrl-C and has stopped
        return 130
    # A script killed by a signal returns -signal; shells report 128 + signal.
    return completed.returncode if completed.returncode >= 0 else 128 - completed.returncode


# --- the parser ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``ember`` argument parser with its three commands."""
    parser = argparse.ArgumentParser(prog="ember", description="ember: a PyTorch training library.")
    commands = parser.add_subparsers(dest="command", metavar="{config,env,launch}")

    config = commands.add_parser("config", help="write the config file (asks, or takes defaults)")
    config.add_argument("--default", action="store_true", help="take every default without asking")
    config.add_argument(
        "--config_file", default=None, help=f"where to write (default: {config_path()})"
    )
    config.set_defaults(run=run_config)

    env = commands.add_parser("env", help="print versions, devices and the config for a bug report")
    env.set_defaults(run=run_env)

    launch = commands.add_parser("launch", help="run a training script with the launch settings")
    launch.add_argument(
        "--num_processes", default=None, help="processes per machine (only 1 for now)"
    )
    launch.add_argument("--num_machines", default=None, help="machines (only 1 for now)")
    launch.add_argument("--machine_rank", default=None, help="this machine's index, from 0")
    launch.add_argument("--main_process_ip", default=None, help="address of machine 0")
    launch.add_argument("--main_process_port", default=None, help="port on machine 0")
    launch.add_argument("--mixed_precision", default=None, help="no, fp16 or bf16")
    launch.add_argument(
        "--config_file", default=None, help="config file to read instead of the default"
    )
    launch.add_argument("script", nargs=argparse.REMAINDER, help="script.py and its arguments")
    launch.set_defaults(run=run_launch)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``ember`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help or an argparse usage error
        return exit_request.code if isinstance(exit_request.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code: int = args.run(args)
    except (UsageError, MisconfigurationError) as error:
        print(f"ember {args.command}: error: {error}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
