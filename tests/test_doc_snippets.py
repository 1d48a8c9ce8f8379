"""The code the documentation shows runs: every ember snippet in docs/snippets is executed.

The pages include these files with ``--8<-- "name.py"`` (pymdownx.snippets), so a page cannot
show code that does not run. The Lightning / Accelerate originals cannot run here (neither is
installed): they are compiled, and each converted file must differ from its original only
where the migration guide says it does.
"""

from __future__ import annotations

import difflib
import py_compile
import re
import runpy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import ember

DOCS = Path(__file__).resolve().parents[1] / "docs"
SNIPPETS = DOCS / "snippets"
ORIGINALS = sorted(SNIPPETS.glob("*_original.py"))
INCLUDE = re.compile(r'^-{2}8<-{2}\s+"([^"]+)"', flags=re.MULTILINE)


def run_snippet(name: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run ``docs/snippets/<name>`` as ``__main__`` in ``folder``; return its globals."""
    monkeypatch.chdir(folder)
    return runpy.run_path(str(SNIPPETS / name), run_name="__main__")


def included_files() -> dict[str, list[str]]:
    """Every file a page includes, with the pages that include it."""
    found: dict[str, list[str]] = {}
    for page in sorted(DOCS.rglob("*.md")):
        for name in INCLUDE.findall(page.read_text()):
            found.setdefault(name, []).append(page.name)
    return found


def test_every_included_snippet_exists_and_every_snippet_is_shown() -> None:
    included = included_files()
    # pymdownx.snippets' base_path in mkdocs.yml: the snippets, the repository, the examples.
    bases = (SNIPPETS, DOCS.parent, DOCS.parent / "examples")
    missing = []
    for name in included:
        # "file.py:section" includes the lines between a file's section markers.
        file, _, section = name.partition(":")
        found = [base / file for base in bases if (base / file).is_file()]
        text = found[0].read_text() if found else ""
        markers = (f"[start:{section}]", f"[end:{section}]") if section else ()
        if not found or any(marker not in text for marker in markers):
            missing.append(name)
    assert not missing, f"pages include files (or sections) that do not exist: {missing}"
    shown = {name for name in included}
    unused = [path.name for path in sorted(SNIPPETS.iterdir()) if path.name not in shown]
    assert not unused, f"snippets no page includes: {unused}"


@pytest.mark.parametrize("original", ORIGINALS, ids=lambda path: path.name)
def test_the_originals_compile(original: Path, tmp_path: Path) -> None:
    py_compile.compile(str(original), cfile=str(tmp_path / "out.pyc"), doraise=True)


def _changed_lines(original: Path) -> tuple[list[str], list[str]]:
    converted = original.with_name(original.name.replace("_original", "_ember"))
    diff = difflib.ndiff(original.read_text().splitlines(), converted.read_text().splitlines())
    removed = [line[2:] for line in diff if line.startswith("- ")]
    diff = difflib.ndiff(original.read_text().splitlines(), converted.read_text().splitlines())
    added = [line[2:] for line in diff if line.startswith("+ ")]
    return removed, added


@pytest.mark.parametrize(
    "original", [p for p in ORIGINALS if p.name.startswith("accelerate")], ids=lambda p: p.name
)
def test_an_accelerate_script_changes_only_its_imports(original: Path) -> None:
    removed, added = _changed_lines(original)
    assert removed and all(line.startswith("from accelerate") for line in removed), removed
    assert added and all(line.startswith("from ember") for line in added), added


def test_the_lightning_script_changes_only_imports_and_base_classes() -> None:
    removed, added = _changed_lines(SNIPPETS / "lightning_original.py")
    renamed = {"LightningModule": "TrainModule", "LightningDataModule": "DataModule"}
    for old, new in zip(removed, added, strict=True):
        if old.startswith("from lightning"):
            assert new.startswith("from ember"), (old, new)
        else:  # a class statement: only the base class is renamed
            for lightning_name, ember_name in renamed.items():
                old = old.replace(f"({lightning_name})", f"({ember_name})")
            assert old == new


def test_first_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_snippet("first_model.py", tmp_path, monkeypatch)
    output = capsys.readouterr().out
    trainer = result["trainer"]
    assert trainer.global_step == 5 * 14  # 896 samples in batches of 64, 5 epochs
    assert trainer.callback_metrics["val_loss"] < 0.2  # y = sum(x): learnt
    assert f"val_loss {trainer.callback_metrics['val_loss']:.4f}" in output
    # Where getting_started.md says the logs and the checkpoints are.
    log_dir = tmp_path / "runs/first/ember_logs/version_0"
    assert (log_dir / "hparams.yaml").is_file()
    assert any(log_dir.glob("events.out.tfevents.*")) or (log_dir / "metrics.csv").is_file()
    last = tmp_path / "runs/first/checkpoints/last-step=70"
    assert sorted(path.name for path in last.iterdir()) == [
        "meta.json",
        "model.safetensors",
        "state.pt",
    ]
    weights = load_file(last / "model.safetensors")
    assert set(weights) == set(result["Regressor"]().state_dict())


# Run in a folder without a checkpoint, the resume script warns and trains from scratch.
@pytest.mark.filterwarnings("ignore:ckpt_path=.last.. there is no complete .last. checkpoint")
def test_first_model_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """getting_started.md's "Next: resume": first_model_resume.py continues first_model.py's run."""
    monkeypatch.syspath_prepend(str(SNIPPETS))  # `from first_model import Regressor`
    try:
        (tmp_path / "resumed").mkdir()
        run_snippet("first_model.py", tmp_path / "resumed", monkeypatch)
        resumed = run_snippet("first_model_resume.py", tmp_path / "resumed", monkeypatch)["trainer"]
        output = capsys.readouterr().out
        (tmp_path / "whole").mkdir()  # no checkpoint there: ten epochs from scratch
        whole = run_snippet("first_model_resume.py", tmp_path / "whole", monkeypatch)["trainer"]
    finally:
        sys.modules.pop("first_model", None)
    assert resumed.global_step == 140  # epochs 6 to 10, steps 71 to 140
    assert resumed.current_epoch == 10
    assert Path(resumed.log_dir) == Path("runs/first/ember_logs/version_0")  # the same logs
    assert f"step 140, val_loss {resumed.callback_metrics['val_loss']:.4f}" in output
    # The page: the same weights, bit for bit, as a run never interrupted.
    assert whole.global_step == 140
    weights = load_file(tmp_path / "resumed/runs/first/checkpoints/last-step=140/model.safetensors")
    reference = load_file(tmp_path / "whole/runs/first/checkpoints/last-step=140/model.safetensors")
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[key], reference[key]) for key in weights)


@pytest.mark.filterwarnings("ignore:precision .bf16-mixed. on this CPU")
def test_lightning_script_converted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_snippet("lightning_ember.py", tmp_path, monkeypatch)
    output = capsys.readouterr().out
    trainer = result["trainer"]
    accuracy = float(re.search(r"test accuracy (\S+),", output).group(1))  # type: ignore[union-attr]
    assert accuracy > 0.8
    best = Path(trainer.checkpoint_callback.best_model_path)
    assert best.parent == tmp_path / "runs/blobs/checkpoints" and best.name.startswith("epoch=")
    assert (tmp_path / "runs/blobs/version_0/metrics.csv").is_file()  # CSVLogger("runs", "blobs")
    assert trainer.global_step == 5 * 7  # 13 batches in windows of 2: 7 steps an epoch


@pytest.mark.filterwarnings("ignore:precision .bf16-mixed. on this CPU")
def test_accelerate_loop_converted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_snippet("accelerate_loop_ember.py", tmp_path, monkeypatch)
    output = capsys.readouterr().out
    accuracies = [float(value) for value in re.findall(r"accuracy (\S+) on 512 samples", output)]
    assert len(accuracies) == 3 and accuracies[-1] > 0.85
    saved = load_file(tmp_path / "runs/loop/model.safetensors")
    model = result["accelerator"].unwrap_model(result["model"])
    assert all(torch.equal(saved[key], value) for key, value in model.state_dict().items())


def test_accelerate_state_converted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_snippet("accelerate_state_ember.py", tmp_path, monkeypatch)
    assert "uninterrupted run's weights: True" in capsys.readouterr().out
    assert (tmp_path / "runs/state/model.safetensors").is_file()


def test_accelerate_trackers_converted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(ember.Accelerator, "init_trackers"):
        pytest.skip("Accelerator trackers (log_with, init_trackers) have not landed yet")
    pytest.importorskip("tensorboard")
    run_snippet("accelerate_trackers_ember.py", tmp_path, monkeypatch)
    assert any((tmp_path / "runs/trackers_demo").rglob("events.out.tfevents.*"))


@pytest.mark.filterwarnings("ignore:precision .16-mixed. on this CPU")
def test_manual_optimization_gan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(DOCS.parent / "examples"))  # `from gan import ...`
    result = run_snippet("manual_gan.py", tmp_path, monkeypatch)
    trainer = result["trainer"]
    assert trainer.global_step == 40  # one step per batch, however many optimizers stepped
    assert f"40 steps, d_loss {trainer.callback_metrics['d_loss']:.3f}" in capsys.readouterr().out
    opt_g, opt_d = trainer.optimizers
    assert opt_g.state and opt_d.state  # both optimizers stepped


def test_accumulation_equals_the_big_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_snippet("accumulation_equals_big_batch.py", tmp_path, monkeypatch)
    assert "optimizer steps: 12 and 12" in capsys.readouterr().out
    accumulated, _ = result["train"](batch_size=8, accumulate_grad_batches=4)
    # The same training written in plain PyTorch, one batch of 32 per step.
    x = torch.randn(100, 4, generator=torch.Generator().manual_seed(1))
    y = x.sum(dim=1, keepdim=True)
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(3):
        for start in range(0, 100, 32):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(layer(x[start : start + 32]), y[start : start + 32])
            loss.backward()
            optimizer.step()
    assert torch.allclose(accumulated, layer.weight.detach(), atol=1e-6)
