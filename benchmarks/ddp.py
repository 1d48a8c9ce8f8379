"""Per-step time of ember under two-process DDP against a hand-written DDP loop, in one run.

Workload: the MLP of ``overhead.py`` (32 -> 64 -> 64 -> 10), batch 32 per process, SGD with
momentum, fp32 on the CPU, gloo on 127.0.0.1, one thread per process. Variants, interleaved
for ``--rounds`` rounds inside the same two processes:

- ``plain_ddp``: ``DistributedDataParallel`` + ``DistributedSampler`` + the plain loop;
- ``accelerator_loop``: the same loop on ``Accelerator(cpu=True)``-prepared objects
  (``accumulate``, ``backward``), the loader sharded by ember;
- ``trainer_bare``: ``Trainer(accelerator="cpu")`` without logger, checkpointing, progress
  bar or sanity check, timed from inside by a callback.

Each variant's time per step is the slowest process's (DDP steps together); the ratio is the
median over rounds of each round's ratio to ``plain_ddp``. Goal (issue 6): within 1.10x.

Run: ``python benchmarks/ddp.py [--steps N] [--rounds R] [--json PATH]``; it starts its own
two workers with ``torch.distributed.run``. The exit code is 0 whatever the numbers (1 only
when the workers failed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("plain_ddp", "accelerator_loop", "trainer_bare")
GOAL = 1.10


def _data(batches: int) -> Any:
    import torch
    from torch.utils.data import TensorDataset

    generator = torch.Generator().manual_seed(0)
    size = batches * 32 * 2  # two processes
    x = torch.randn(size, 32, generator=generator)
    y = torch.randint(0, 10, (size,), generator=generator)
    return TensorDataset(x, y)


def _model() -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def _plain(dataset: Any, warmup: int) -> float:
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    model = DistributedDataParallel(_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = DataLoader(dataset, batch_size=32, sampler=DistributedSampler(dataset, shuffle=False))
    start = 0.0
    for index, (x, y) in enumerate(loader):
        if index == warmup:
            start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return time.perf_counter() - start


def _accelerator(dataset: Any, warmup: int) -> float:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from ember import Accelerator

    accelerator = Accelerator(cpu=True)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model, optimizer, loader = accelerator.prepare(
        model, optimizer, DataLoader(dataset, batch_size=32)
    )
    start = 0.0
    for index, (x, y) in enumerate(loader):
        if index == warmup:
            start = time.perf_counter()
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
    return time.perf_counter() - start


def _trainer(dataset: Any, warmup: int) -> float:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from ember import Callback, Trainer, TrainModule

    class Classifier(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model()

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    class Clock(Callback):
        start = 0.0
        end = 0.0

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, index: int) -> None:
            if index == warmup:
                self.start = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            self.end = time.perf_counter()

    clock = Clock()
    trainer = Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=[clock],
    )
    trainer.fit(Classifier(), DataLoader(dataset, batch_size=32))
    return clock.end - clock.start


def worker(steps: int, rounds: int, warmup: int, output: Path) -> None:
    """One of the two processes: every variant, interleaved, ``rounds`` times."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    dataset = _data(warmup + steps)
    runs = {"plain_ddp": _plain, "accelerator_loop": _accelerator, "trainer_bare": _trainer}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name in VARIANTS:
            dist.barrier()
            seconds = torch.tensor([runs[name](dataset, warmup)])
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # DDP steps together: the slowest
            times[name].append(seconds.item() / steps * 1e6)
    if dist.get_rank() == 0:
        output.write_text(json.dumps(times))
    from ember.accelerator import distributed

    distributed.destroy_process_group()  # together, after gc: gloo can abort otherwise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="timed steps per run (1000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    parser.add_argument("--warmup", type=int, default=50, help="untimed steps per run (50)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.steps, args.rounds, args.warmup, args.worker)
        return 0
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "times.json"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            __file__, "--steps", str(args.steps), "--rounds", str(args.rounds),
            "--warmup", str(args.warmup), "--worker", str(output),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        completed = subprocess.run(command, env=env, capture_output=True, text=True)
        if completed.returncode != 0:  # the workers failed: no numbers to show
            print(completed.stdout, completed.stderr, sep="\n")
            return 1
        times = json.loads(output.read_text())
    results = {}
    print(f"{'variant':<18} {'us/step':>9} {'vs plain_ddp':>13}   goal   result")
    print("-" * 58)
    for name in VARIANTS:
        ratio = statistics.median(
            mine / plain for mine, plain in zip(times[name], times["plain_ddp"], strict=True)
        )
        median = statistics.median(times[name])
        verdict = "baseline" if name == "plain_ddp" else ("PASS" if ratio <= GOAL else "over")
        goal = "-" if name == "plain_ddp" else f"{GOAL:.2f}x"
        print(f"{name:<18} {median:>9.1f} {ratio:>12.3f}x {goal:>6}   {verdict}")
        results[name] = {"us_per_step": median, "ratio": ratio, "rounds": times[name]}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
