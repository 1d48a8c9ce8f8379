"""Per-step overhead of ember against a hand-written PyTorch loop, in one invocation.

Workload (fixed, so numbers are comparable between commits and machines):

- model: MLP 32 -> 64 -> ReLU -> 64 -> ReLU -> 10 (6,922 parameters), fp32 on the CPU;
- data: 32-feature Gaussian inputs and 10-class labels made once, as tensors, fed by the same
  ``DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)`` in every variant;
- loss: cross-entropy; optimizer: SGD (lr 0.01, momentum 0.9), rebuilt with seed 0 per run;
- ``torch.set_num_threads(1)``.

Variants:

- ``plain``: ``for x, y in loader: zero_grad; loss = F.cross_entropy(model(x), y);
  backward; step``.
- ``trainer_bare``: ``Trainer`` without logger, checkpointing, progress bar or sanity check;
  ``training_step`` returns the loss.
- ``trainer_defaults``: ``Trainer(max_steps=..., accelerator="cpu", default_root_dir=...)``,
  everything else as a new user gets it: the default logger (TensorBoard when installed),
  progress bar, ``ModelCheckpoint`` (with its ``save_last`` default), model summary and
  sanity check; stdout redirected to a non-terminal (a log file, CI), where the bar prints
  one line per epoch; ``training_step`` calls ``self.log("train_loss", loss, prog_bar=True)``.
  The benchmark prints which logger and callbacks the Trainer really ran with.
- ``trainer_defaults_tty``: the same, with stdout a stream that says it is a terminal
  (``isatty()`` true, the text kept in memory), so the bar is drawn and redrawn while the
  steps run, as a user in a terminal sees it.
- ``accelerator_loop``: the plain loop on ``Accelerator(cpu=True)``-prepared objects, inside
  ``accelerator.accumulate(model)``, with ``accelerator.backward``.

Method: every run iterates a loader of exactly ``warmup + steps`` batches. The first
``warmup`` steps are not timed. The clock starts at the beginning of step ``warmup`` (after its
batch was fetched) and stops at the end of the last step, so each variant's measured interval
holds the same work: ``steps`` steps and ``steps - 1`` batch fetches (ember's prepared loader
reads one batch ahead for loaders of unknown length only, which this one is not). The Trainer is
timed from inside, by a callback (``on_train_batch_start`` / ``on_train_batch_end``): its
one-time costs (fit set-up, loader preparation, the TensorBoard writer created at the first
logger write, at step 50, within the default warm-up; and, after the last step, epoch end,
logger flush and close) are excluded from the per-step figure; the time from the last step
to ``fit`` returning is printed separately. Periodic costs (the logger write every
``log_every_n_steps``) are inside the timed steps. The callback's own two hook calls per step
are counted against ember. Variants run interleaved (plain, bare, defaults, defaults_tty,
accelerator, plain, ...) for ``--rounds`` rounds; the table shows each variant's median time over rounds, and as
its ratio to plain the median of the per-round ratios (each round's pair shares the machine's
state, which damps the noise of a busy 2-core machine).

Two clocks are read at both ends: ``time.perf_counter`` (wall time, the default for the
goals) and ``time.process_time`` (CPU time of this process, all its threads). On a busy
machine the wall time also counts the time other processes held the core; the CPU time does
not, so ``--clock cpu`` gives steadier ratios there.

Before the timed rounds, one untimed pass per variant counts the function calls (Python and
C, through ``sys.setprofile``) per step over at most 200 steps: a measure of the interpreter
work ember adds that does not depend on the machine's load (``--no-count-calls`` skips it).

Run: ``make bench`` or ``python benchmarks/overhead.py [--steps N] [--rounds R] [--warmup W]
[--loader samples|batched] [--clock wall|cpu] [--statistic median|min] [--no-count-calls]
[--json PATH]``. ``--statistic min`` reports each variant's fastest round and its ratio to the
plain loop's fastest (the least disturbed run, as ``timeit`` does): with many short rounds
(``--steps 500 --rounds 15``) it is the steadier figure on a shared machine.
The exit code is 0 whatever the numbers: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

try:
    import ember
except ImportError:  # run from a checkout without an install: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import ember

from ember import Accelerator, Callback, Trainer, TrainModule

BATCH_SIZE = 32
SIZES = (32, 64, 64, 10)  # input, hidden, hidden, classes
LEARNING_RATE = 0.01
MOMENTUM = 0.9
SEED = 0

#: Goal for each variant: its per-step time at most this many times the plain loop's.
GOALS: dict[str, float | None] = {
    "plain": None,
    "trainer_bare": 1.05,
    "trainer_defaults": 1.10,
    "trainer_defaults_tty": 1.10,
    "accelerator_loop": 1.05,
}
VARIANTS = tuple(GOALS)


# --- workload ------------------------------------------------------------------------------------


def make_model() -> nn.Module:
    """The MLP, with the same initial weights every time."""
    torch.manual_seed(SEED)
    n_in, hidden1, hidden2, n_out = SIZES
    return nn.Sequential(
        nn.Linear(n_in, hidden1),
        nn.ReLU(),
        nn.Linear(hidden1, hidden2),
        nn.ReLU(),
        nn.Linear(hidden2, n_out),
    )


def make_optimizer(parameters: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=LEARNING_RATE, momentum=MOMENTUM)


def make_loader(num_batches: int, loader_kind: str) -> DataLoader[Any]:
    """A loader of exactly ``num_batches`` batches of synthetic data, made once.

    ``"samples"``: the ordinary ``DataLoader(dataset, batch_size=32)``, which indexes the
    dataset per sample and collates. ``"batched"``: the sampler yields whole batches of
    indices and the dataset is indexed once per batch (no collate), a much cheaper feed that
    makes the framework's overhead a larger share of the step.
    """
    generator = torch.Generator().manual_seed(SEED)
    count = num_batches * BATCH_SIZE
    inputs = torch.randn(count, SIZES[0], generator=generator)
    labels = torch.randint(0, SIZES[-1], (count,), generator=generator)
    dataset = TensorDataset(inputs, labels)
    if loader_kind == "batched":
        sampler = BatchSampler(SequentialSampler(dataset), BATCH_SIZE, drop_last=False)
        return DataLoader(dataset, sampler=sampler, batch_size=None)
    return DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=False)


class MLPModule(TrainModule):
    """The MLP as a ``TrainModule``; ``training_step`` computes the plain loop's loss."""

    def __init__(self, log: bool) -> None:
        super().__init__()
        self.net = make_model()
        self.log_loss = log

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        # self.net(x), not self(x): the same single Module call as the plain loop's model(x).
        loss = F.cross_entropy(self.net(x), y)
        if self.log_loss:
            self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters())


# --- one timed run per variant ---------------------------------------------------------------


@dataclass
class RunTiming:
    """One run: wall and CPU seconds of the timed steps, and wall seconds from the last step
    until the run returned."""

    seconds: float
    cpu_seconds: float
    teardown_seconds: float = 0.0
    calls: int = 0


class Window:
    """The timed part of a run: ``begin`` at the start of the first timed step, ``end`` at
    the end of the last one. Reads both clocks; with ``count_calls`` it instead counts every
    Python and C function call in between (``sys.setprofile``), a noise-free measure of
    the interpreter work per step, for a separate, untimed pass."""

    def __init__(self, count_calls: bool = False) -> None:
        self.count_calls = count_calls
        self.start = self.stop = (0.0, 0.0)
        self.calls = 0

    def _count(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call" or event == "c_call":
            self.calls += 1

    def begin(self) -> None:
        self.start = (time.perf_counter(), time.process_time())
        if self.count_calls:
            sys.setprofile(self._count)

    def end(self) -> None:
        if self.count_calls:
            sys.setprofile(None)
        self.stop = (time.perf_counter(), time.process_time())

    def timing(self, teardown_seconds: float = 0.0) -> RunTiming:
        return RunTiming(
            self.stop[0] - self.start[0],
            self.stop[1] - self.start[1],
            teardown_seconds,
            self.calls,
        )


class StepTimer(Callback):
    """Opens ``window`` at the start of batch ``first``, closes it at the end of ``last``."""

    def __init__(self, window: Window, first: int, last: int) -> None:
        self.window = window
        self.first = first
        self.last = last

    def on_train_batch_start(
        self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.first:
            self.window.begin()

    def on_train_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.last:
            self.window.end()


def run_plain(loader: DataLoader[Any], warmup: int, window: Window) -> RunTiming:
    model = make_model()
    model.train()
    optimizer = make_optimizer(model.parameters())
    last = len(loader) - 1
    for index, (x, y) in enumerate(loader):
        if index == warmup:
            window.begin()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if index == last:
            window.end()
    return window.timing()


def run_accelerator(loader: DataLoader[Any], warmup: int, window: Window) -> RunTiming:
    accelerator = Accelerator(cpu=True)
    model = make_model()
    model.train()
    optimizer = make_optimizer(model.parameters())
    model, optimizer, prepared = accelerator.prepare(model, optimizer, loader)
    last = len(prepared) - 1
    for index, (x, y) in enumerate(prepared):
        if index == warmup:
            window.begin()
        with accelerator.accumulate(model):
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if index == last:
            window.end()
    return window.timing()


class TerminalStream(io.StringIO):
    """Stands for a terminal: ``isatty()`` is true, so the progress bar draws a bar (and
    redraws it as the steps run) rather than one line per epoch; the text stays in memory."""

    def isatty(self) -> bool:
        return True


#: What ``trainer_defaults`` ran with (logger and callback classes), filled by its first run.
DEFAULTS_SEEN: list[str] = []


def describe_defaults(trainer: Trainer) -> str:
    """The loggers and callbacks a default ``Trainer`` runs with, by class name."""
    loggers = ", ".join(type(logger).__name__ for logger in trainer.loggers) or "none"
    callbacks = []
    for callback in trainer.callbacks:
        if isinstance(callback, StepTimer):
            continue
        name = type(callback).__name__
        save_last = getattr(callback, "save_last", None)
        callbacks.append(f"{name}(save_last={save_last})" if save_last is not None else name)
    return f"loggers: {loggers}; callbacks: {', '.join(callbacks) or 'none'}"


def run_trainer(
    loader: DataLoader[Any], warmup: int, window: Window, defaults: bool, terminal: bool = False
) -> RunTiming:
    num_batches = len(loader)
    timer = StepTimer(window, first=warmup, last=num_batches - 1)
    with tempfile.TemporaryDirectory(prefix="ember-bench-") as root:
        if defaults:
            trainer = Trainer(
                max_steps=num_batches, accelerator="cpu", default_root_dir=root, callbacks=[timer]
            )
        else:
            trainer = Trainer(
                max_steps=num_batches,
                accelerator="cpu",
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                num_sanity_val_steps=0,
                default_root_dir=root,
                callbacks=[timer],
            )
        module = MLPModule(log=defaults)
        # The progress bar writes to sys.stdout: a non-terminal stream makes it print one
        # line per epoch, as it does in a log file or CI; a terminal stream, a redrawn bar.
        with contextlib.redirect_stdout(TerminalStream() if terminal else io.StringIO()):
            trainer.fit(module, loader)
        if defaults and not DEFAULTS_SEEN:
            DEFAULTS_SEEN.append(describe_defaults(trainer))
        fit_returned = time.perf_counter()
    if trainer.global_step != num_batches:
        raise RuntimeError(
            f"the Trainer took {trainer.global_step} steps, expected {num_batches}: the "
            "benchmark's timings would not be comparable"
        )
    return window.timing(teardown_seconds=fit_returned - window.stop[0])


RUNNERS: dict[str, Callable[[DataLoader[Any], int, Window], RunTiming]] = {
    "plain": run_plain,
    "trainer_bare": lambda loader, warmup, window: run_trainer(loader, warmup, window, False),
    "trainer_defaults": lambda loader, warmup, window: run_trainer(loader, warmup, window, True),
    "trainer_defaults_tty": lambda loader, warmup, window: run_trainer(
        loader, warmup, window, True, terminal=True
    ),
    "accelerator_loop": run_accelerator,
}


# --- the whole benchmark -------------------------------------------------------------------------


@dataclass
class VariantResult:
    """Every round's per-step times of one variant."""

    name: str
    goal: float | None
    wall_us: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    teardown_ms: list[float] = field(default_factory=list)
    calls_per_step: float | None = None

    def median_us(self, clock: str) -> float:
        return statistics.median(self.wall_us if clock == "wall" else self.cpu_us)

    def fastest_us(self, clock: str) -> float:
        return min(self.wall_us if clock == "wall" else self.cpu_us)

    def paired_ratio(self, base: VariantResult, clock: str) -> float:
        """The median over rounds of this variant's time divided by the base's time in the
        same round. Each round runs the variants back to back, so a pair shares the state of
        the machine; on a busy 2-core box this is steadier than a ratio of medians."""
        mine = self.wall_us if clock == "wall" else self.cpu_us
        theirs = base.wall_us if clock == "wall" else base.cpu_us
        return statistics.median(m / t for m, t in zip(mine, theirs, strict=True))


#: Steps of the (untimed) pass that counts function calls per step, and its least warm-up:
#: past the Trainer's first logger write (``log_every_n_steps=50``), which creates the
#: TensorBoard writer once.
COUNT_STEPS = 200
COUNT_WARMUP = 60


def run_benchmark(
    steps: int, rounds: int, warmup: int, loader_kind: str, count_calls: bool
) -> dict[str, VariantResult]:
    results = {name: VariantResult(name, GOALS[name]) for name in VARIANTS}
    if count_calls:
        count_steps = min(steps, COUNT_STEPS)
        count_warmup = max(warmup, COUNT_WARMUP)
        count_loader = make_loader(count_warmup + count_steps, loader_kind)
        for name in VARIANTS:
            timing = RUNNERS[name](count_loader, count_warmup, Window(count_calls=True))
            results[name].calls_per_step = timing.calls / count_steps
    loader = make_loader(warmup + steps, loader_kind)
    for round_index in range(rounds):
        for name in VARIANTS:
            gc.collect()
            timing = RUNNERS[name](loader, warmup, Window())
            result = results[name]
            result.wall_us.append(timing.seconds / steps * 1e6)
            result.cpu_us.append(timing.cpu_seconds / steps * 1e6)
            result.teardown_ms.append(timing.teardown_seconds * 1e3)
        progress = ", ".join(
            f"{n} {results[n].wall_us[-1]:.1f} ({results[n].cpu_us[-1]:.1f} cpu)" for n in VARIANTS
        )
        print(f"round {round_index + 1}/{rounds}, us/step: {progress}", file=sys.stderr, flush=True)
    return results


def machine_info() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "ember": getattr(ember, "__version__", "unknown"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }


def report(
    results: dict[str, VariantResult], args: argparse.Namespace, info: dict[str, Any]
) -> dict[str, Any]:
    """Print the table; return the JSON document."""
    clock = args.clock
    fastest = args.statistic == "min"
    load = info["load_average"]
    print(
        f"ember overhead benchmark: MLP {'-'.join(map(str, SIZES))}, batch {BATCH_SIZE}, "
        f"SGD, CPU, loader={args.loader}"
    )
    print(
        f"torch {info['torch']}, python {info['python']}, {info['platform']}, "
        f"{info['cpu_count']} CPUs, torch threads {info['torch_threads']}"
        + (f", load average {load[0]:.2f}" if load else "")
    )
    print(
        f"{args.steps} timed steps after {args.warmup} warm-up steps; {args.rounds} interleaved "
        + (
            "rounds; us/step: fastest round; ratio: fastest round to plain's fastest; "
            if fastest
            else "rounds; us/step: median over rounds; ratio: median of the per-round ratios "
            "to plain; "
        )
        + f"goals judged on {clock} time"
    )
    print()
    header = (
        f"{'variant':<20} {'us/step':>9} {'vs plain':>9} {'cpu us/step':>12} {'vs plain':>9} "
        f"{'calls/step':>11} {'goal':>7}  result"
    )
    print(header)
    print("-" * len(header))
    document: dict[str, Any] = {
        "machine": info,
        "config": {
            "steps": args.steps,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "loader": args.loader,
            "clock": clock,
            "statistic": args.statistic,
            "count_calls_steps": min(args.steps, COUNT_STEPS) if args.count_calls else None,
            "batch_size": BATCH_SIZE,
            "sizes": list(SIZES),
            "optimizer": f"SGD(lr={LEARNING_RATE}, momentum={MOMENTUM})",
        },
        "variants": {},
    }
    for name, result in results.items():
        if fastest:
            wall, cpu = result.fastest_us("wall"), result.fastest_us("cpu")
            wall_ratio = wall / results["plain"].fastest_us("wall")
            cpu_ratio = cpu / results["plain"].fastest_us("cpu")
        else:
            wall, cpu = result.median_us("wall"), result.median_us("cpu")
            wall_ratio = result.paired_ratio(results["plain"], "wall")
            cpu_ratio = result.paired_ratio(results["plain"], "cpu")
        ratio = wall_ratio if clock == "wall" else cpu_ratio
        goal = result.goal
        met = goal is None or ratio <= goal
        verdict = "baseline" if goal is None else ("PASS" if met else "over")
        goal_text = "-" if goal is None else f"{goal:.2f}x"
        calls = result.calls_per_step
        calls_text = "-" if calls is None else f"{calls:.1f}"
        print(
            f"{name:<20} {wall:>9.1f} {wall_ratio:>8.3f}x {cpu:>12.1f} {cpu_ratio:>8.3f}x "
            f"{calls_text:>11} {goal_text:>7}  {verdict}"
        )
        document["variants"][name] = {
            "us_per_step": wall,
            "ratio": wall_ratio,
            "cpu_us_per_step": cpu,
            "cpu_ratio": cpu_ratio,
            "goal": goal,
            "met": met,
            "rounds_us_per_step": result.wall_us,
            "rounds_cpu_us_per_step": result.cpu_us,
            "after_last_step_ms": statistics.median(result.teardown_ms),
            "calls_per_step": calls,
        }
    print()
    for name in ("trainer_bare", "trainer_defaults", "trainer_defaults_tty"):
        teardown = document["variants"][name]["after_last_step_ms"]
        print(f"{name}: {teardown:.1f} ms from the last step to fit() returning (once per run)")
    if DEFAULTS_SEEN:
        print(f"trainer_defaults ran with {DEFAULTS_SEEN[0]}")
        document["trainer_defaults_ran_with"] = DEFAULTS_SEEN[0]
    print(
        "Reference (same workload, measured by the issue author on this machine): "
        "Lightning 2.6 at 2.18x the plain loop, Accelerate 1.15 at 1.63x."
    )
    over = [name for name, entry in document["variants"].items() if not entry["met"]]
    document["all_goals_met"] = not over
    if over:
        print(f"Goals NOT met ({clock} time): {', '.join(over)}.")
    else:
        print(f"All goals met ({clock} time).")
    # Wall time well above CPU time: other processes held the core during the timed steps.
    busy = [
        w / c for r in results.values() for w, c in zip(r.wall_us, r.cpu_us, strict=True) if c > 0
    ]
    preempted = statistics.median(busy) if busy else 1.0
    if preempted > 1.05:
        print(
            f"Note: the machine was busy while this ran (wall time {preempted:.2f}x the CPU "
            "time, median); wall times are noisy. Compare the cpu columns, or rerun with "
            "--clock cpu / more --rounds."
        )
    return document


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Per-step overhead of ember against a plain PyTorch loop."
    )
    parser.add_argument("--steps", type=int, default=2000, help="timed steps per run (2000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    parser.add_argument("--warmup", type=int, default=50, help="untimed steps per run (50)")
    parser.add_argument(
        "--loader",
        choices=("samples", "batched"),
        default="samples",
        help="samples (default): DataLoader(dataset, batch_size=32); batched: the dataset is "
        "indexed once per batch, without collate (a cheaper feed, so a stricter ratio)",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="which time the goals are judged on: wall (time.perf_counter, default) or cpu "
        "(time.process_time: this process's CPU time, steadier on a busy machine)",
    )
    parser.add_argument(
        "--statistic",
        choices=("median", "min"),
        default="median",
        help="median (default): each variant's median round, and the median of the per-round "
        "ratios to plain; min: each variant's fastest round, and its ratio to plain's fastest "
        "(the least disturbed run, as timeit takes: steadier on a shared machine with many "
        "short --rounds)",
    )
    parser.add_argument(
        "--no-count-calls",
        dest="count_calls",
        action="store_false",
        help="skip the untimed pass that counts function calls per step",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    for name in ("steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    info = machine_info()
    results = run_benchmark(args.steps, args.rounds, args.warmup, args.loader, args.count_calls)
    # The load over the last minute, i.e. while the benchmark ran.
    info["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    document = report(results, args, info)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"Results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
