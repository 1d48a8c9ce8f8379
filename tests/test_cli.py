"""The ``ember`` command: config, env and launch, called in-process and as ``python -m ember``."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

import ember
from ember.cli import main

SOURCE = Path(ember.__file__).resolve().parents[1]


class _Terminal:
    """A stdin that says it is a terminal, so ``ember config`` asks its questions."""

    def isatty(self) -> bool:
        return True


def _answer(monkeypatch: pytest.MonkeyPatch, answers: list[str]) -> list[str]:
    """Make ``input()`` return ``answers`` in turn; return the list of prompts it was shown."""
    prompts: list[str] = []
    remaining: Iterator[str] = iter(answers)

    def fake_input(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(remaining)

    monkeypatch.setattr(sys, "stdin", _Terminal())
    monkeypatch.setattr("builtins.input", fake_input)
    return prompts


def _read(path: Path) -> dict[str, object]:
    content = yaml.safe_load(path.read_text())
    assert isinstance(content, dict)
    return content


def _python_env() -> dict[str, str]:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join([str(SOURCE), environment.get("PYTHONPATH", "")])
    return environment


# --- ember config ----------------------------------------------------------------------------
def test_config_default_writes_the_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "--default"]) == 0
    path = tmp_path / "ember_config.yaml"
    assert str(path) in capsys.readouterr().out
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # One machine: no address or port is written, so every launch takes a free port.
    assert _read(path) == {
        "mixed_precision": "no",
        "strategy": "ddp" if gpus > 1 else "no",
        "num_processes": gpus or 1,
        "num_machines": 1,
        "gpu_ids": "all",
    }


def test_config_without_a_terminal_takes_defaults_without_asking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("builtins.input", lambda prompt="": pytest.fail("asked a question"))
    assert main(["config"]) == 0  # pytest's stdin is not a terminal
    assert _read(tmp_path / "ember_config.yaml")["mixed_precision"] == "no"


def test_config_asks_and_re_asks_after_an_invalid_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = _answer(monkeypatch, ["fp8", "bf16", "0", "1", "", "", "0,1"])
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "`mixed_precision='fp8'` is not supported" in out and "'bf16'" in out
    assert "`num_processes='0'` is not supported" in out
    assert prompts[0] == prompts[1] and prompts[0].startswith("Mixed precision (no/fp16/bf16)")
    assert prompts[4].startswith("Number of machines") and prompts[5].endswith("[no]: ")
    assert len(prompts) == 7
    assert _read(tmp_path / "ember_config.yaml") == {
        "mixed_precision": "bf16",
        "strategy": "no",
        "num_processes": 1,
        "num_machines": 1,
        "gpu_ids": "0,1",
    }


def test_config_asks_the_machine_questions_for_several_machines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = ["", "8", "2", "zero", "", "2", "1", "10.0.0.1", "70000", "29501", "all"]
    prompts = _answer(monkeypatch, answers)
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "`strategy='zero'` is not supported. Accepted values: 'no', 'ddp', 'fsdp'." in out
    assert "`machine_rank='2'` is not supported" in out and "between 0 and 1" in out
    assert "`main_process_port='70000'` is not supported" in out
    assert prompts[3].endswith("[ddp]: ")  # several processes: DDP is the default
    assert len(prompts) == len(answers)
    assert _read(tmp_path / "ember_config.yaml") == {
        "mixed_precision": "no",
        "strategy": "ddp",
        "num_processes": 8,
        "num_machines": 2,
        "machine_rank": 1,
        "main_process_ip": "10.0.0.1",
        "main_process_port": 29501,
        "gpu_ids": "all",
    }


def test_config_writes_accelerate_names_for_trainer_spellings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _answer(monkeypatch, ["16-mixed", "", "", "", ""])
    assert main(["config"]) == 0
    assert _read(tmp_path / "ember_config.yaml")["mixed_precision"] == "fp16"


def test_config_interrupted_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def end_of_input(prompt: str = "") -> str:
        raise EOFError

    monkeypatch.setattr(sys, "stdin", _Terminal())
    monkeypatch.setattr("builtins.input", end_of_input)
    assert main(["config"]) == 1
    assert not (tmp_path / "ember_config.yaml").exists()


def test_config_file_argument_overrides_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "elsewhere" / "mine.yaml"
    assert main(["config", "--default", "--config_file", str(target)]) == 0
    assert str(target) in capsys.readouterr().out
    assert _read(target)["num_machines"] == 1
    assert not (tmp_path / "ember_config.yaml").exists()


def test_accelerator_reads_mixed_precision_from_the_config_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _answer(monkeypatch, ["bf16", "", "", "", ""])
    assert main(["config"]) == 0
    assert ember.Accelerator(cpu=True).mixed_precision == "bf16"
    monkeypatch.setenv("EMBER_MIXED_PRECISION", "no")  # the environment beats the file
    assert ember.Accelerator(cpu=True).mixed_precision == "no"


# --- ember env -------------------------------------------------------------------------------
def test_env_prints_versions_and_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "(no config file)" in out
    main(["config", "--default"])
    capsys.readouterr()
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"ember version: {ember.__version__}" in out
    assert f"torch version: {torch.__version__}" in out
    assert f"Python version: {platform.python_version()}" in out
    assert "tensorboard version:" in out and "wandb version:" in out
    assert "mixed_precision: 'no'" in out or "mixed_precision: no" in out


def test_python_m_ember_env_does_not_import_optional_packages(tmp_path: Path) -> None:
    (tmp_path / "ember_config.yaml").write_text("mixed_precision: bf16\n")
    result = subprocess.run(
        [sys.executable, "-m", "ember", "env"],
        env=_python_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"torch version: {torch.__version__}" in result.stdout
    assert "mixed_precision: bf16" in result.stdout
    check = (
        "import sys; from ember.cli import main; main(['env']); "
        "print('IMPORTED', sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorboard', 'wandb', 'matplotlib') "
        "or m == 'torch.utils.tensorboard'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], env=_python_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "IMPORTED []" in result.stdout


# --- ember launch ----------------------------------------------------------------------------
@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "train.py"
    path.write_text(
        "import os, sys\n"
        "print('precision', os.environ.get('EMBER_MIXED_PRECISION'), 'args', sys.argv[1:])\n"
        "sys.exit(3)\n"
    )
    return path


def test_launch_runs_the_script_and_returns_its_exit_code(
    script: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert main(["launch", "--mixed_precision", "bf16", str(script), "--lr", "0.1"]) == 3
    assert "precision bf16 args ['--lr', '0.1']" in capfd.readouterr().out


def test_launch_takes_mixed_precision_from_the_config_file(
    tmp_path: Path, script: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "other.yaml"
    other.write_text("mixed_precision: fp16\nnum_processes: 1\n")
    assert main(["launch", "--config_file", str(other), str(script)]) == 3
    assert "precision fp16" in capfd.readouterr().out
    monkeypatch.setenv("EMBER_MIXED_PRECISION", "bf16")  # the environment beats the file...
    assert main(["launch", "--config_file", str(other), str(script)]) == 3
    assert "precision bf16" in capfd.readouterr().out
    # ...and the argument beats the environment.
    assert (
        main(["launch", "--config_file", str(other), "--mixed_precision", "no", str(script)]) == 3
    )
    assert "precision no" in capfd.readouterr().out


def test_launch_restricts_the_visible_gpus_to_the_config_gpu_ids(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    (tmp_path / "ember_config.yaml").write_text("gpu_ids: '1'\n")
    shows = tmp_path / "shows.py"
    shows.write_text("import os\nprint('visible', os.environ.get('CUDA_VISIBLE_DEVICES'))\n")
    assert main(["launch", str(shows)]) == 0
    assert "visible 1" in capfd.readouterr().out


def test_launch_a_missing_script_fails_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["launch", "missing.py"]) == 2
    assert "the script 'missing.py' does not exist" in capsys.readouterr().err
    assert main(["launch"]) == 2
    assert "no script given" in capsys.readouterr().err


def test_launch_an_unknown_mixed_precision_names_the_accepted_values(
    script: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["launch", "--mixed_precision", "fp8", str(script)]) == 2
    error = capsys.readouterr().err
    assert "`--mixed_precision='fp8'` is not supported" in error
    assert "'no'" in error and "'fp16'" in error and "'bf16'" in error


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--num_processes", "0"],
            "`--num_processes='0'` is not supported. Accepted values: a whole number >= 1.",
        ),
        (["--num_machines", "two"], "`--num_machines='two'` is not supported"),
        (
            ["--machine_rank", "1"],
            "`--machine_rank='1'` is not supported. Accepted values: a whole number between 0 and 0.",
        ),
        (["--main_process_port", "70000"], "between 1 and 65535"),
    ],
)
def test_launch_rejects_bad_counts(
    script: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    assert main(["launch", *arguments, str(script)]) == 2
    assert message in capsys.readouterr().err


def test_launch_rejects_a_bad_config_file_value(
    tmp_path: Path, script: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ember_config.yaml").write_text("mixed_precision: fp8\n")
    assert main(["launch", str(script)]) == 2
    assert "in the ember config file" in capsys.readouterr().err


class _FakeTorchrun:
    """Stands in for ``subprocess.Popen`` in ``ember.cli``: records the command, exits 0."""

    calls: list[tuple[list[str], dict[str, str]]]

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        type(self).calls.append((command, env))

    def wait(self, timeout: float | None = None) -> int:
        return 0


@pytest.fixture
def torchrun(monkeypatch: pytest.MonkeyPatch) -> type[_FakeTorchrun]:
    _FakeTorchrun.calls = []
    monkeypatch.setattr("ember.cli.subprocess.Popen", _FakeTorchrun)
    return _FakeTorchrun


def _options(command: list[str]) -> dict[str, str]:
    return dict(part[2:].split("=", 1) for part in command if part.startswith("--"))


def test_launch_starts_torchrun_with_processes_per_machine(
    script: Path, torchrun: type[_FakeTorchrun]
) -> None:
    arguments = ["--num_processes", "4", "--num_machines", "2", "--machine_rank", "1"]
    arguments += ["--main_process_ip", "10.0.0.1", "--max_restarts", "3"]
    assert main(["launch", *arguments, "--strategy", "fsdp", str(script), "--lr", "1"]) == 0
    [(command, environment)] = torchrun.calls
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[-3:] == [str(script), "--lr", "1"]
    assert _options(command[3:-3]) == {
        "nproc_per_node": "2",
        "nnodes": "2",
        "node_rank": "1",
        "master_addr": "10.0.0.1",
        "master_port": "29500",
        "max_restarts": "3",
    }
    assert environment["EMBER_STRATEGY"] == "fsdp"


def test_launch_on_one_machine_takes_a_free_port(
    script: Path, torchrun: type[_FakeTorchrun]
) -> None:
    assert main(["launch", "--num_processes", "2", str(script)]) == 0
    [first] = (_options(command) for command, _ in torchrun.calls)
    assert first["master_addr"] == "127.0.0.1" and first["nproc_per_node"] == "2"
    assert 0 < int(first["master_port"]) < 65536 and first["nnodes"] == "1"
    assert "EMBER_STRATEGY" not in torchrun.calls[0][1]


def test_launch_settings_follow_argument_environment_config_precedence(
    tmp_path: Path, script: Path, torchrun: type[_FakeTorchrun], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ember_config.yaml").write_text(
        "num_processes: 2\nstrategy: ddp\nmixed_precision: fp16\n"
    )
    assert main(["launch", str(script)]) == 0
    monkeypatch.setenv("EMBER_NUM_PROCESSES", "3")
    monkeypatch.setenv("EMBER_STRATEGY", "fsdp")
    assert main(["launch", str(script)]) == 0
    assert main(["launch", "--num_processes", "4", "--strategy", "no", str(script)]) == 0
    counts = [_options(command)["nproc_per_node"] for command, _ in torchrun.calls]
    strategies = [environment["EMBER_STRATEGY"] for _, environment in torchrun.calls]
    assert counts == ["2", "3", "4"]
    assert strategies == ["ddp", "fsdp", "no"]
    assert all(env["EMBER_MIXED_PRECISION"] == "fp16" for _, env in torchrun.calls)


def test_launch_one_process_with_restarts_goes_through_torchrun(
    script: Path, torchrun: type[_FakeTorchrun]
) -> None:
    assert main(["launch", "--max_restarts", "2", str(script)]) == 0
    [(command, _)] = torchrun.calls
    assert _options(command)["max_restarts"] == "2"
    assert _options(command)["nproc_per_node"] == "1"


def test_launch_exports_the_strategy_to_one_process(
    script: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    script.write_text("import os\nprint('strategy', os.environ.get('EMBER_STRATEGY'))\n")
    assert main(["launch", "--strategy", "DDP", str(script)]) == 0
    assert "strategy ddp" in capfd.readouterr().out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--num_processes", "3", "--num_machines", "2", "--main_process_ip", "10.0.0.1"],
            "--num_processes=3 is not divisible by --num_machines=2",
        ),
        (
            ["--num_processes", "4", "--num_machines", "2"],
            "--num_machines=2 needs --main_process_ip",
        ),
        (
            ["--num_machines", "2", "--machine_rank", "2"],
            "`--machine_rank='2'` is not supported. Accepted values: a whole number between 0 and 1.",
        ),
        (["--strategy", "zero"], "`--strategy='zero'` is not supported. Accepted values: 'no', "),
        (["--max_restarts", "-1"], "`--max_restarts='-1'` is not supported"),
        (["--main_process_ip", " "], "`--main_process_ip=' '` is not supported"),
    ],
)
def test_launch_rejects_bad_distributed_arguments(
    script: Path,
    capsys: pytest.CaptureFixture[str],
    torchrun: type[_FakeTorchrun],
    arguments: list[str],
    message: str,
) -> None:
    assert main(["launch", *arguments, str(script)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("ember launch: error: ") and message in error
    assert error.count("\n") == 1  # one line
    assert torchrun.calls == []


def test_launch_rejects_a_port_in_use_on_one_machine(
    script: Path, capsys: pytest.CaptureFixture[str], torchrun: type[_FakeTorchrun]
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        arguments = ["--num_processes", "2", "--main_process_port", str(port)]
        assert main(["launch", *arguments, str(script)]) == 2
    error = capsys.readouterr().err
    assert f"--main_process_port={port} is already in use on this machine" in error
    assert torchrun.calls == []


def test_launch_names_a_bad_environment_variable(
    script: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBER_NUM_PROCESSES", "many")
    assert main(["launch", str(script)]) == 2
    assert "`EMBER_NUM_PROCESSES='many'` is not supported" in capsys.readouterr().err


# --- ember ------------------------------------------------------------------------------------
def test_no_command_prints_help_and_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "config" in out and "env" in out and "launch" in out
    assert main(["--help"]) == 0
    assert main(["frobnicate"]) == 2
