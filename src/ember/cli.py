"""The ``ember`` command: ``ember config``, ``ember env``, ``ember launch`` and ``ember plot``.

Every command returns an exit code instead of exiting, so ``main([...])`` can be called (and
tested) in-process: 0 on success, 2 for a usage error (as argparse does); for ``launch``, the
script's own code with one process, torchrun's (0, or 1 when a worker failed) with several;
for ``plot``, 1 when an optional package it needs is missing.
``ember`` with no command prints the help and returns 2, since a command is required.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ember.config import config_path, load_config, save_config
from ember.errors import MisconfigurationError

MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
STRATEGY_CHOICES = ("no", "ddp", "fsdp")
#: torchrun's default port on machine 0, for a run over several machines that names none.
DEFAULT_MAIN_PROCESS_PORT = 29500


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


def _strategy(value: Any, argument: str) -> str:
    text = str(value).strip().lower()
    if text in STRATEGY_CHOICES:
        return text
    choices = ", ".join(repr(choice) for choice in STRATEGY_CHOICES)
    raise UsageError(f"`{argument}={value!r}` is not supported. Accepted values: {choices}.")


def _address(value: Any, argument: str) -> str:
    text = str(value).strip()
    if text and not any(character.isspace() for character in text):
        return text
    raise UsageError(
        f"`{argument}={value!r}` is not supported. Accepted values: the IP address or host name "
        "of machine 0, such as '10.0.0.1'."
    )


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
Question = tuple[str, str, Any, Callable[[Any, str], Any]]


def _questions(settings: dict[str, Any]) -> list[Question]:
    """(key, question, default, validator) for the next settings, given the answers so far:
    the machine questions are asked only for a run over several machines."""
    if "mixed_precision" not in settings:
        processes = _cuda_device_count() or 1
        return [
            ("mixed_precision", "Mixed precision (no/fp16/bf16)", "no", _mixed_precision),
            ("num_processes", "Number of processes over all machines", processes, _positive),
            ("num_machines", "Number of machines", 1, _positive),
        ]
    if "strategy" not in settings:
        default_strategy = "ddp" if settings["num_processes"] > 1 else "no"
        questions: list[Question] = [
            ("strategy", "Distributed strategy (no/ddp/fsdp)", default_strategy, _strategy)
        ]
        machines = settings["num_machines"]
        if machines > 1:
            questions += [
                (
                    "machine_rank",
                    f"This machine's rank (0 to {machines - 1})",
                    0,
                    lambda value, key: _whole_number(value, key, 0, machines - 1),
                ),
                ("main_process_ip", "IP address of machine 0", "127.0.0.1", _address),
                ("main_process_port", "Port on machine 0", DEFAULT_MAIN_PROCESS_PORT, _port),
            ]
        return questions + [("gpu_ids", "GPU ids to use ('all' or e.g. 0,1)", "all", _gpu_ids)]
    return []


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
        while questions := _questions(settings):
            for key, question, default, validate in questions:
                settings[key] = _ask(question, default, validate, key) if interactive else default
    except (EOFError, KeyboardInterrupt):
        print("\nAborted: no config file was written.", file=sys.stderr)
        return 1
    path = save_config(settings, args.config_file)
    print(f"ember config written to {path}")
    return 0


# --- ember env -------------------------------------------------------------------------------
def _installed_version(distribution: str) -> str:
    # Reads package metadata only, so `ember env` never imports tensorboard, wandb, matplotlib.
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
            for name in ("numpy", "torchmetrics", "tensorboard", "wandb", "matplotlib")
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
def _launch_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every launch setting, each from the argument ``--key``, else ``EMBER_KEY``, else the
    config file, else the default; each named in its own error."""
    config = load_config(args.config_file)

    def setting(key: str, default: Any, validate: Callable[..., Any], *bounds: int) -> Any:
        given = getattr(args, key)
        if given is not None:
            return validate(given, f"--{key}", *bounds)
        variable = f"EMBER_{key.upper()}"
        if os.environ.get(variable):
            return validate(os.environ[variable], variable, *bounds)
        if key in config:
            return validate(config[key], f"{key} (in the ember config file)", *bounds)
        return default

    settings: dict[str, Any] = {}
    settings["num_processes"] = setting("num_processes", 1, _whole_number, 1)
    settings["num_machines"] = setting("num_machines", 1, _whole_number, 1)
    settings["machine_rank"] = setting(
        "machine_rank", 0, _whole_number, 0, settings["num_machines"] - 1
    )
    settings["main_process_ip"] = setting("main_process_ip", None, _address)
    settings["main_process_port"] = setting("main_process_port", None, _port)
    settings["max_restarts"] = setting("max_restarts", 0, _whole_number, 0)
    settings["mixed_precision"] = setting("mixed_precision", None, _mixed_precision)
    settings["strategy"] = setting("strategy", None, _strategy)
    settings["gpu_ids"] = _gpu_ids(
        config.get("gpu_ids", "all"), "gpu_ids (in the ember config file)"
    )
    return settings


def _torchrun_arguments(settings: dict[str, Any]) -> list[str]:
    """torchrun's options for these settings (static rendezvous: machine 0 hosts the store)."""
    processes, machines = settings["num_processes"], settings["num_machines"]
    if processes % machines:
        raise UsageError(
            f"--num_processes={processes} is not divisible by --num_machines={machines}: "
            "--num_processes counts the processes over all machines, the same number on each. "
            f"Pass a multiple of {machines}."
        )
    address, port = settings["main_process_ip"], settings["main_process_port"]
    if machines > 1 and address is None:
        raise UsageError(
            f"--num_machines={machines} needs --main_process_ip: the address of machine 0 "
            "that every machine can reach (the same on every machine)."
        )
    if machines > 1 and port is None:
        port = DEFAULT_MAIN_PROCESS_PORT
    if machines == 1:
        from ember.launcher import find_free_port, port_in_use

        address = address or "127.0.0.1"
        if port is None:
            port = find_free_port()
        elif port_in_use(port):
            raise UsageError(
                f"--main_process_port={port} is already in use on this machine (another run "
                "or program holds it). Pass another port, or leave it out to take a free one."
            )
    return [
        f"--nproc_per_node={processes // machines}",
        f"--nnodes={machines}",
        f"--node_rank={settings['machine_rank']}",
        f"--master_addr={address}",
        f"--master_port={port}",
        f"--max_restarts={settings['max_restarts']}",
    ]


def _script_environment(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, str]:
    environment = dict(os.environ)
    if args.config_file is not None:  # the script's Accelerator reads the same file
        environment["EMBER_CONFIG_FILE"] = str(Path(args.config_file).resolve())
    # Already settled by precedence (argument > EMBER_* > config file): the script only reads.
    if settings["mixed_precision"] is not None:
        environment["EMBER_MIXED_PRECISION"] = settings["mixed_precision"]
    if settings["strategy"] is not None:
        environment["EMBER_STRATEGY"] = settings["strategy"]
    if settings["gpu_ids"] != "all" and "CUDA_VISIBLE_DEVICES" not in environment:
        environment["CUDA_VISIBLE_DEVICES"] = settings["gpu_ids"]
    return environment


def _wait(process: subprocess.Popen[bytes]) -> int:
    try:
        returncode = process.wait()
    except KeyboardInterrupt:  # the processes got the same Ctrl-C; let them stop
        try:
            process.wait(timeout=60)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            process.kill()
        return 130
    # A process killed by a signal returns -signal; shells report 128 + signal.
    return returncode if returncode >= 0 else 128 - returncode


def run_launch(args: argparse.Namespace) -> int:
    """Run the script: directly for one process, through torchrun for more (or restarts)."""
    settings = _launch_settings(args)
    if not args.script:
        raise UsageError("no script given. Usage: ember launch [options] script.py [script args]")
    script = Path(args.script[0])
    if not script.is_file():
        raise UsageError(f"the script {str(script)!r} does not exist (looked in {Path.cwd()}).")
    environment = _script_environment(args, settings)
    distributed = (
        settings["num_processes"] > 1
        or settings["num_machines"] > 1
        or settings["max_restarts"] > 0
    )
    if not distributed:
        return _wait(
            subprocess.Popen([sys.executable, str(script), *args.script[1:]], env=environment)
        )

    from ember.launcher import FAILURES_DIRECTORY_VARIABLE, launch_failure_summary

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *_torchrun_arguments(settings),
        str(script),
        *args.script[1:],
    ]
    with tempfile.TemporaryDirectory(prefix="ember-launch-") as failures:
        environment[FAILURES_DIRECTORY_VARIABLE] = failures
        code = _wait(subprocess.Popen(command, env=environment))
        if code not in (0, 130):
            summary = launch_failure_summary(Path(failures)) or (
                "a worker failed; torchrun's summary above names its rank and exit code (a "
                "Python error's traceback is above it, lines prefixed [rankN]:)."
            )
            print(f"ember launch: error: {summary} Exit code {code}.", file=sys.stderr)
    return code


# --- ember plot ------------------------------------------------------------------------------
def run_plot(args: argparse.Namespace) -> int:
    """Draw a run's curves into a PNG (the drawing lives in ``ember.plotting``)."""
    from ember.plotting import DEFAULT_SMOOTHING, RunNotFoundError, check_image_path, plot_run

    if args.out is not None:
        check_image_path(args.out, "--out")
    smoothing = DEFAULT_SMOOTHING if args.smoothing is None else args.smoothing
    try:
        result = plot_run(args.run_dir, args.out, smoothing=smoothing)
    except RunNotFoundError as error:
        raise UsageError(str(error)) from None
    except ModuleNotFoundError as error:
        if error.name not in ("matplotlib", "tensorboard"):
            raise
        print(f"ember plot: error: {error}", file=sys.stderr)
        return 1
    run = result.run
    if len(run.candidates) > 1:
        print(f"{len(run.candidates)} runs under {args.run_dir}: plotting the newest, {run.folder}")
    panels = [axes.get_title() for axes in result.figure.axes]
    print(f"{result.path} ({len(panels)} panels: {', '.join(panels)}; from {run.source})")
    return 0


# --- the parser ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``ember`` argument parser with its four commands."""
    parser = argparse.ArgumentParser(prog="ember", description="ember: a PyTorch training library.")
    commands = parser.add_subparsers(dest="command", metavar="{config,env,launch,plot}")

    config = commands.add_parser("config", help="write the config file (asks, or takes defaults)")
    config.add_argument("--default", action="store_true", help="take every default without asking")
    config.add_argument(
        "--config_file", default=None, help=f"where to write (default: {config_path()})"
    )
    config.set_defaults(run=run_config)

    env = commands.add_parser("env", help="print versions, devices and the config for a bug report")
    env.set_defaults(run=run_env)

    launch = commands.add_parser(
        "launch", help="run a training script in one or several processes (torchrun)"
    )
    launch.add_argument(
        "--num_processes", default=None, help="processes over all machines (default 1)"
    )
    launch.add_argument("--num_machines", default=None, help="machines (default 1)")
    launch.add_argument("--machine_rank", default=None, help="this machine's index, from 0")
    launch.add_argument("--main_process_ip", default=None, help="address of machine 0")
    launch.add_argument(
        "--main_process_port",
        default=None,
        help="port on machine 0 (default: a free one on one machine, 29500 on several)",
    )
    launch.add_argument("--mixed_precision", default=None, help="no, fp16 or bf16")
    launch.add_argument("--strategy", default=None, help="no, ddp or fsdp (EMBER_STRATEGY)")
    launch.add_argument(
        "--max_restarts", default=None, help="torchrun's restarts of a failed group (default 0)"
    )
    launch.add_argument(
        "--config_file", default=None, help="config file to read instead of the default"
    )
    launch.add_argument("script", nargs=argparse.REMAINDER, help="script.py and its arguments")
    launch.set_defaults(run=run_launch)

    plot = commands.add_parser(
        "plot", help="draw a run's curves (metrics.csv or TensorBoard events) into a PNG"
    )
    plot.add_argument(
        "run_dir", help="a run folder (logs/ember/version_0), or a folder of runs: the newest"
    )
    plot.add_argument("--out", default=None, help="the image to write (default: RUN/curves.png)")
    plot.add_argument(
        "--smoothing",
        type=float,
        default=None,
        help="moving-average weight over the training loss, in [0, 1) (default 0.6, as "
        "TensorBoard)",
    )
    plot.set_defaults(run=run_plot)
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
