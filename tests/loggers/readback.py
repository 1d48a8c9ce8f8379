"""Read back what the loggers wrote, with each tool's own reader where there is one:
``metrics.csv`` with the csv module, event files with TensorBoard's ``EventAccumulator`` and
its HParams plugin (what the HParams tab shows), W&B offline runs from their ``.wandb`` file."""

from __future__ import annotations

import csv
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def csv_values(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``name -> [(step, value), ...]`` of every non-empty cell of ``metrics.csv``, in order."""
    values: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            for name, cell in row.items():
                if name != "step" and cell:
                    values[name].append((int(row["step"]), float(cell)))
    return dict(values)


def recorded_values(calls: list[list[Any]]) -> dict[str, list[tuple[int, float]]]:
    """The same shape, from what a recording logger received (``[[step, metrics], ...]``)."""
    values: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for step, metrics in calls:
        for name, value in metrics.items():
            values[name].append((int(step), float(value)))
    return dict(values)


def tensorboard_values(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``name -> [(step, value), ...]`` of every scalar, as TensorBoard reads the folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def hparams_tab(logdir: Path) -> dict[str, dict[str, Any]]:
    """What TensorBoard's HParams tab lists for ``tensorboard --logdir logdir``, per run:
    ``{"hparams": {...}, "metrics": {tag: value}, "status": "STATUS_..."}``."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    tb_context = base_plugin.TBContext(
        logdir=str(logdir), multiplexer=multiplexer, data_provider=provider
    )
    request = api_pb2.ListSessionGroupsRequest(
        start_index=0,
        slice_size=100,
        allowed_statuses=list(api_pb2.Status.values()),
    )
    response = list_session_groups.Handler(
        context.RequestContext(), backend_context.Context(tb_context), "", request
    ).run()
    runs: dict[str, dict[str, Any]] = {}
    for group in response.session_groups:
        (session,) = group.sessions
        hparams = {
            name: value.number_value if value.HasField("number_value") else value.string_value
            for name, value in group.hparams.items()
        }
        metrics = {value.name.tag: value.value for value in session.metric_values}
        runs[session.name] = {
            "hparams": hparams,
            "metrics": metrics,
            "status": api_pb2.Status.Name(session.status),
        }
    return runs


@dataclass
class WandbRun:
    """What an offline run's ``run-<id>.wandb`` file holds."""

    run_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None

    def values(self) -> dict[str, list[tuple[int, float]]]:
        """``name -> [(step, value), ...]`` of the history, ``_`` names left out."""
        values: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for row in self.history:
            for name, value in row.items():
                if not name.startswith("_"):
                    values[name].append((int(row["_step"]), float(value)))
        return dict(values)


def wandb_run(run_folder: Path, *, finished: bool = True, wait: float = 30.0) -> WandbRun:
    """Parse ``run_folder/run-*.wandb`` (see ``_parse_wandb_run``).

    W&B's service process writes the file on its own after ``finish()`` has returned, so a
    run read at once may still lack its records: with ``finished`` (the default) this reads
    again until the run's id and exit record are there, for at most ``wait`` seconds.
    """
    deadline = time.monotonic() + wait
    while True:
        run = _parse_wandb_run(run_folder)
        complete = run.run_id and (run.exit_code is not None or not finished)
        if complete or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def _parse_wandb_run(run_folder: Path) -> WandbRun:
    """Parse ``run_folder/run-*.wandb``: wandb's record log (LevelDB's log format: 32 KiB
    blocks of records with a 7-byte header, after a 7-byte ``:W&B`` file header)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_folder.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    chunks: list[bytes] = []
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:  # a full record
            chunks.append(chunk)
        elif kind in (2, 3):  # the first or a middle part
            pending = chunk if kind == 2 else pending + chunk
        elif kind == 4:  # the last part
            chunks.append(pending + chunk)
    run = WandbRun()
    for chunk in chunks:
        record = wandb_internal_pb2.Record.FromString(chunk)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id = record.run.run_id
        elif kind == "config":
            for item in record.config.update:
                if not item.key.startswith("_"):
                    run.config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append(
                {
                    ".".join(item.nested_key) or item.key: json.loads(item.value_json)
                    for item in record.history.item
                }
            )
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run
