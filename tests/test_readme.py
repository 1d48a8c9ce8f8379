"""The README's quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_starts_with_the_two_commands() -> None:
    text = README.read_text()
    first_block = text.index("```bash")
    assert text.index("make demo") > first_block
    assert text.index("make test") > first_block
    assert text.index("make demo") < text.index("## Quick start")


# The second run finds the first one's checkpoints in the same folder.
@pytest.mark.filterwarnings("ignore:ModelCheckpoint.*already holds")
def test_quick_start_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    quick_start = _python_blocks()[0]
    losses = []
    for _ in range(2):  # seeded before the data is drawn: every run prints the same loss
        namespace: dict[str, object] = {"__name__": "__readme__"}
        exec(compile(quick_start, str(README), "exec"), namespace)
        trainer: Any = namespace["trainer"]
        assert trainer.global_step == 5 * 7
        output = capsys.readouterr().out
        assert "Epoch 5/5" in output
        assert "logs in" in output
        assert "Total params" in output  # the model summary
        # default_root_dir="runs/quickstart": nothing lands in the current folder itself
        assert sorted(path.name for path in tmp_path.iterdir()) == ["runs"]
        assert (tmp_path / "runs/quickstart/checkpoints").is_dir()
        assert Path(trainer.log_dir).resolve().parent == tmp_path / "runs/quickstart/ember_logs"
        metrics: Any = namespace["metrics"]  # validate() after fit: the same weights
        assert metrics[0]["val_loss"] < 1.0
        losses.append(metrics[0]["val_loss"])
        # what fit printed is the validation of the same final weights
        printed = next(line for line in output.splitlines() if "logs in" in line)
        assert float(printed.split()[0]) == pytest.approx(metrics[0]["val_loss"], rel=1e-5)
        predictions: Any = namespace["predictions"]
        assert [tuple(p.shape) for p in predictions] == [(64, 1), (64, 1)]
    assert losses[0] == losses[1]


def test_callbacks_page_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    page = README.parent / "docs" / "callbacks.md"
    example = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)[0]
    namespace: dict[str, object] = {}
    exec(compile(example, str(page), "exec"), namespace)
    from tests.helpers import TinyModule, loader

    trainer = namespace["trainer"]
    trainer.max_epochs = 2  # type: ignore[attr-defined]
    trainer.fit(TinyModule(), loader(16), loader(16))  # type: ignore[attr-defined]
    printed = [line for line in capsys.readouterr().out.splitlines() if "val_loss=" in line]
    assert printed[0].startswith("step 2: val_loss=")
    assert printed[1].startswith("step 4: val_loss=")
