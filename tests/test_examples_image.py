"""The image classifier example, and the scripts that run it: on two processes through
``ember launch`` (ddp.sh, fsdp.sh) and stopped by SIGTERM then resumed (resume.sh)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.launching import clean_environment
from tests.test_examples import EXAMPLES, load_example, run_example

# --- the classifier: data, metrics, early stopping, top-k checkpoints, resume ---------------

IMAGE_TINY = ["--samples", "256", "--batch-size", "32", "--noise", "1.0", "--accelerator", "cpu"]


def test_image_data_is_seeded_balanced_and_separable() -> None:
    images = load_example("image_classifier")
    data = images.make_images(400, seed=3, noise=0.3)
    pictures, labels = data.tensors
    assert pictures.shape == (400, 1, 16, 16) and labels.shape == (400,)
    assert torch.bincount(labels).tolist() == [100] * 4
    again = images.make_images(400, seed=3, noise=0.3).tensors
    assert torch.equal(pictures, again[0]) and torch.equal(labels, again[1])
    assert not torch.equal(pictures, images.make_images(400, seed=4, noise=0.3).tensors[0])
    # Each label is its pattern: the best-matching clean pattern (over every phase) is the label.
    clean = images.patterns(torch.arange(images.PERIOD))  # (phases, classes, 16, 16)
    scores = torch.einsum("nhw,pchw->npc", pictures[:, 0], clean).amax(dim=1)
    assert torch.equal(scores.argmax(dim=1), labels)


def epoch_lines(output: str) -> dict[int, float]:
    """``epoch N: ... val_acc X`` lines as ``{N: X}``."""
    found = re.findall(r"^epoch (\d+): val_loss \S+, val_acc (\S+)$", output, re.MULTILINE)
    return {int(epoch): float(acc) for epoch, acc in found}


def test_image_classifier_script(tmp_path: Path) -> None:
    root = tmp_path / "run"
    args = [*IMAGE_TINY, "--epochs", "2", "--more-epochs", "2", "--root", str(root)]
    output = run_example("image_classifier.py", *args, cwd=tmp_path)
    # 256 images in batches of 32: 8 steps an epoch; the second fit continues at step 16.
    assert "fit starts at step 0" in output and "first run: 2 epochs, 16 steps" in output
    assert "fit starts at step 16" in output and "resumed run: 4 epochs, 32 steps" in output
    accuracies = epoch_lines(output)
    assert sorted(accuracies) == [0, 1, 2, 3], output  # each epoch validated once
    assert accuracies[3] > 0.5, output  # learnt something: guessing scores 0.25
    # The top-3 checkpoints are the 3 best epochs by val_acc, named by it, and `last`.
    kept = sorted(p.name for p in (root / "checkpoints").iterdir())
    best = sorted(accuracies, key=lambda epoch: -accuracies[epoch])[:3]
    assert kept == sorted(
        [f"epoch={epoch}-val_acc={accuracies[epoch]:.4f}" for epoch in best] + ["last-step=32"]
    )
    # The final weights are the last checkpoint's, readable with plain safetensors.
    final = load_file(str(root / "final" / "model.safetensors"))
    last = load_file(str(root / "checkpoints" / "last-step=32" / "model.safetensors"))
    assert final.keys() == last.keys() and "net.head.weight" in final
    assert all(torch.equal(final[name], last[name]) for name in final)


def test_image_classifier_stops_early(tmp_path: Path) -> None:
    # With patience 1 and pure noise (nothing to learn), val_loss soon stops improving.
    args = [*IMAGE_TINY, "--noise", "50", "--patience", "1", "--epochs", "20", "--more-epochs", "0"]
    output = run_example("image_classifier.py", *args, "--root", str(tmp_path / "r"), cwd=tmp_path)
    assert "stopped early by EarlyStopping" in output, output
    assert len(epoch_lines(output)) < 20


# --- scripts: two processes through `ember launch`, and a resume after SIGTERM ----------------


def run_script(script: str, *args: str, cwd: Path, timeout: int = 240) -> str:
    """``bash examples/<script> args`` with this interpreter as PYTHON and OUT in ``cwd``."""
    env = clean_environment(PYTHON=sys.executable, OUT=str(cwd / "out"))
    result = subprocess.run(
        ["bash", str(EXAMPLES / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


SCRIPT_TINY = ["--samples", "256", "--epochs", "1", "--more-epochs", "1", "--noise", "1.0"]


@pytest.fixture(scope="module")
def one_process_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The final weights of image_classifier.py in one process with batches of 64, the global
    batch of the two-process scripts (32 each)."""
    root = tmp_path_factory.mktemp("one_process")
    args = [*SCRIPT_TINY, "--batch-size", "64", "--accelerator", "cpu", "--root", str(root)]
    run_example("image_classifier.py", *args, cwd=root)
    return load_file(str(root / "final" / "model.safetensors"))


@pytest.mark.parametrize("script", ["ddp.sh", "fsdp.sh"])
def test_two_process_scripts(
    tmp_path: Path, script: str, one_process_weights: dict[str, torch.Tensor]
) -> None:
    output = run_script(script, *SCRIPT_TINY, cwd=tmp_path)
    # Printed once (rank 0), 2 steps an epoch (256 images / global batch 64), resumed.
    assert output.count("first run: 1 epochs, 4 steps") == 1, output[-6000:]
    assert "fit starts at step 4" in output and "resumed run: 2 epochs, 8 steps" in output
    assert (tmp_path / "out" / "checkpoints" / "last-step=8" / "model.safetensors").is_file()
    # The same training as one process with the same global batch (FSDP: full weights).
    weights = load_file(str(tmp_path / "out" / "final" / "model.safetensors"))
    assert weights.keys() == one_process_weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, one_process_weights[name], atol=1e-5, rtol=1e-4)


def test_resume_script(tmp_path: Path) -> None:
    args = ["--samples", "256", "--batch-size", "32", "--noise", "1.0"]
    output = run_script("resume.sh", *args, cwd=tmp_path, timeout=180)
    # 3 epochs of 8 steps; STOP_AT=20 is in the third epoch.
    assert "stopped by SIGTERM at global step 20" in output, output[-4000:]
    # The script lists the checkpoint the SIGTERM left (the resumed run replaces it later).
    assert re.search(r"interrupted/checkpoints/last-step=20$", output, re.MULTILINE), output
    assert "fit starts at step 20" in output
    assert re.search(r"OK: \d+ tensors, bit for bit equal", output), output[-4000:]
    # The script's comparison can fail: check it against the files ourselves too.
    first = load_file(str(tmp_path / "out" / "uninterrupted" / "final" / "model.safetensors"))
    second = load_file(str(tmp_path / "out" / "interrupted" / "final" / "model.safetensors"))
    assert all(torch.equal(first[name], second[name]) for name in first)
