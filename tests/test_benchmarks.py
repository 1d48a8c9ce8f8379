"""Smoke test of ``benchmarks/overhead.py``: it runs and writes complete results.

No timing is asserted: a few steps on a shared machine measure nothing reliable.
"""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"
VARIANTS = (
    "plain",
    "trainer_bare",
    "trainer_defaults",
    "trainer_defaults_tty",
    "accelerator_loop",
)


def test_overhead_benchmark_runs_and_writes_json(tmp_path: Path) -> None:
    output = tmp_path / "results" / "overhead.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--steps",
            "30",
            "--rounds",
            "1",
            "--warmup",
            "5",
            "--json",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr
    document = json.loads(output.read_text())
    variants = document["variants"]
    assert set(variants) == set(VARIANTS)
    for name in VARIANTS:
        entry = variants[name]
        assert entry["us_per_step"] > 0, name
        assert entry["ratio"] > 0, name
        assert entry["cpu_us_per_step"] >= 0, name
        assert len(entry["rounds_us_per_step"]) == 1, name
    assert variants["plain"]["ratio"] == 1.0
    assert document["config"]["steps"] == 30
    assert document["machine"]["torch_threads"] == 1
    for name in VARIANTS:
        assert name in completed.stdout
    # The progress bar of the trainer_defaults variants is kept out of the output.
    assert "Epoch 1" not in completed.stdout
    # The defaults variant runs what a new user gets, and says so.
    ran_with = document["trainer_defaults_ran_with"]
    assert f"trainer_defaults ran with {ran_with}" in completed.stdout
    try:
        import tensorboard  # noqa: F401

        default_logger = "TensorBoardLogger"
    except ImportError:
        default_logger = "CSVLogger"
    assert ran_with.startswith(f"loggers: {default_logger};"), ran_with
    for callback in ("ProgressBar", "ModelCheckpoint(save_last=True)", "ModelSummary"):
        assert callback in ran_with, ran_with


def test_overhead_benchmark_options_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The other loader and clock, run in this process (torch is imported already: fast).
    spec = importlib.util.spec_from_file_location("ember_bench_overhead", SCRIPT)
    assert spec is not None and spec.loader is not None
    overhead = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, overhead)  # dataclasses look the module up
    spec.loader.exec_module(overhead)
    streams: list[io.StringIO] = []

    class RecordedTerminal(overhead.TerminalStream):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            streams.append(self)

    monkeypatch.setattr(overhead, "TerminalStream", RecordedTerminal)
    output = tmp_path / "overhead.json"
    argv = ["--steps", "4", "--rounds", "2", "--warmup", "0", "--loader", "batched"]
    with torch.random.fork_rng():  # the benchmark seeds torch; leave the global RNG as it was
        assert (
            overhead.main([*argv, "--clock", "cpu", "--statistic", "min", "--json", str(output)])
            == 0
        )
    document = json.loads(output.read_text())
    # --statistic min: each variant's fastest round, its ratio to plain's fastest.
    assert document["config"]["statistic"] == "min"
    for entry in document["variants"].values():
        assert entry["us_per_step"] == min(entry["rounds_us_per_step"])
    plain_fastest = document["variants"]["plain"]["us_per_step"]
    bare = document["variants"]["trainer_bare"]
    assert bare["ratio"] == pytest.approx(bare["us_per_step"] / plain_fastest)
    # The terminal variant drew a bar (tqdm's carriage-return redraws), not epoch lines.
    assert streams and all("\r" in stream.getvalue() for stream in streams)
    assert all("batches in" not in stream.getvalue() for stream in streams)
    assert document["config"]["loader"] == "batched"
    assert document["config"]["clock"] == "cpu"
    assert all(entry["us_per_step"] > 0 for entry in document["variants"].values())


def test_ddp_benchmark_runs_two_processes_and_writes_json(tmp_path: Path) -> None:
    script = SCRIPT.parent / "ddp.py"
    output = tmp_path / "ddp.json"
    completed = subprocess.run(
        [sys.executable, str(script), "--steps", "5", "--rounds", "1", "--warmup", "2",
         "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads(output.read_text())
    assert set(results) == {"plain_ddp", "accelerator_loop", "trainer_bare"}
    for name, result in results.items():
        assert result["us_per_step"] > 0, name
        assert len(result["rounds"]) == 1


def test_checkpoint_benchmark_runs_and_writes_json(tmp_path: Path) -> None:
    script = SCRIPT.parent / "checkpoint.py"
    output = tmp_path / "checkpoint.json"
    completed = subprocess.run(
        [sys.executable, str(script), "--quick", "--dir", str(tmp_path / "files"),
         "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    document = json.loads(output.read_text())
    summary = document["summary"]
    for name, seconds in summary["save_seconds"].items():
        assert seconds > 0, name
    assert summary["ember_vs_safetensors"] > 0
    assert summary["trainer_save_seconds"] > 0 and summary["step_seconds"] > 0
    assert summary["restore_seconds"] > 0
    assert set(document["files"]["phases"]) >= {"safetensors write", "fsync files", "total"}
    assert "blocks the loop for" in completed.stdout
    assert list((tmp_path / "files").iterdir()) == []  # every file it wrote is gone
