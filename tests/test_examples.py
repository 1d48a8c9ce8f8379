"""The examples: their data and model pieces, and short end-to-end runs as subprocesses."""

from __future__ import annotations

import ast
import importlib.util
import math
import os
import re
import subprocess
import sys
from itertools import pairwise
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Tiny settings: a little text, short windows, a handful of steps.
TINY = ["--max-steps", "3", "--batch-size", "4", "--block-size", "16", "--max-chars", "20000"]


@pytest.fixture(scope="module")
def example() -> ModuleType:
    """``examples/char_transformer.py`` imported as a module (nothing trains on import)."""
    spec = importlib.util.spec_from_file_location(
        "char_transformer", EXAMPLES / "char_transformer.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(script: str, *args: str, cwd: Path) -> str:
    """Run an example with the test's Python; return its output, failing with it on error."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def final_perplexity(output: str) -> float:
    found = re.search(r"final validation perplexity: (\S+)", output)
    assert found is not None, output
    return float(found.group(1))


# --- data -------------------------------------------------------------------------------------


def test_stdlib_text_is_deterministic_and_within_budget(example: ModuleType) -> None:
    text = example.load_stdlib_text(5000)
    assert len(text) == 5000
    assert text == example.load_stdlib_text(5000)
    assert text.isascii()


def test_vocab_round_trip(example: ModuleType) -> None:
    text = example.load_stdlib_text(20000)
    vocab = example.CharVocab.from_text(text)
    assert len(vocab) == len(set(text))
    ids = vocab.encode(text[:500])
    assert ids.dtype == torch.long and ids.shape == (500,)
    assert int(ids.min()) >= 0 and int(ids.max()) < len(vocab)
    assert vocab.decode(ids) == text[:500]
    assert vocab.decode([int(i) for i in ids[:10]]) == text[:10]


def test_windows_are_inputs_and_targets_shifted_by_one(example: ModuleType) -> None:
    data = torch.arange(100)
    windows = example.Windows(data, block_size=8)
    assert len(windows) == 12  # 12 windows of 8 need 97 ids; a 13th would need 105
    for index in (0, 5, len(windows) - 1):
        inputs, targets = windows[index]
        assert inputs.shape == targets.shape == (8,)
        assert torch.equal(inputs, data[index * 8 : index * 8 + 8])
        assert torch.equal(targets[:-1], inputs[1:])
        assert int(targets[-1]) == int(inputs[-1]) + 1
    batch_inputs, batch_targets = next(iter(torch.utils.data.DataLoader(windows, batch_size=4)))
    assert batch_inputs.shape == batch_targets.shape == (4, 8)


def test_warmup_then_cosine_decay(example: ModuleType) -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = example.warmup_cosine(optimizer, warmup_steps=10, total_steps=100)
    rates = []
    for _ in range(120):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.1)
    assert rates[9] == pytest.approx(1.0)
    assert all(before < after for before, after in pairwise(rates[:10]))
    assert all(before >= after for before, after in pairwise(rates[9:]))
    assert rates[100] == pytest.approx(0.1) and rates[-1] == pytest.approx(0.1)


# --- model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie_weights", [True, False])
def test_model_output_shape_and_loss_at_init(example: ModuleType, tie_weights: bool) -> None:
    torch.manual_seed(0)
    vocab_size, block_size = 96, 32
    model = example.CharTransformer(vocab_size, block_size=block_size, tie_weights=tie_weights)
    assert (model.head.weight is model.token_embedding.weight) == tie_weights
    ids = torch.randint(0, vocab_size, (8, block_size))
    logits = model(ids)
    assert logits.shape == (8, block_size, vocab_size)
    # Near-uniform predictions at first: the loss is close to ln(vocab_size).
    targets = torch.randint(0, vocab_size, (8, block_size))
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert loss.item() == pytest.approx(math.log(vocab_size), abs=0.1)
    # Shorter inputs work too (generation starts from a short prompt).
    assert model(ids[:, :5]).shape == (8, 5, vocab_size)


def test_model_is_causal(example: ModuleType) -> None:
    torch.manual_seed(0)
    model = example.CharTransformer(20, block_size=16)
    ids = torch.randint(0, 20, (1, 16))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 20
    # Changing later characters must not change the predictions at earlier positions.
    assert torch.allclose(model(ids)[0, :10], model(changed)[0, :10], atol=1e-6)


def test_generate_extends_the_prompt(example: ModuleType) -> None:
    torch.manual_seed(0)
    model = example.CharTransformer(20, block_size=8)
    prompt = torch.tensor([1, 2, 3])
    ids = example.generate(model, prompt, new_tokens=12, seed=0)
    assert ids.shape == (15,)
    assert torch.equal(ids[:3], prompt)
    assert int(ids.max()) < 20
    assert torch.equal(ids, example.generate(model, prompt, new_tokens=12, seed=0))
    greedy = example.generate(model, prompt, new_tokens=4, temperature=0)
    assert greedy.shape == (7,)
    assert model.training  # restored


# --- end to end -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [[], ["--precision", "bf16-mixed", "--accumulate-grad-batches", "2"]],
    ids=["fp32", "bf16-mixed-accumulate"],
)
def test_char_transformer_script(tmp_path: Path, extra: list[str]) -> None:
    root = tmp_path / "runs"
    output = run_example(
        "char_transformer.py", *TINY, *extra, "--default-root-dir", str(root), cwd=tmp_path
    )
    perplexity = final_perplexity(output)
    assert math.isfinite(perplexity) and 1.0 < perplexity < 200.0
    assert re.search(r"sample:\ndef ", output), output
    assert "3 steps in" in output
    found = re.search(r"logs: (.+)", output)
    assert found is not None, output
    log_dir = Path(found.group(1).strip())
    assert log_dir.is_dir() and log_dir.is_relative_to(root)
    files = [path.name for path in log_dir.iterdir()]
    assert any(name.startswith("events.out.tfevents") or name == "metrics.csv" for name in files)
    # save_hyperparameters() reached the logger.
    assert "vocab_size" in (log_dir / "hparams.yaml").read_text()


def test_accelerator_loop_script(tmp_path: Path) -> None:
    out = tmp_path / "weights"
    args = [*TINY, "--gradient-accumulation-steps", "2", "--cpu", "--output-dir", str(out)]
    output = run_example("accelerator_loop.py", *args, cwd=tmp_path)
    perplexity = final_perplexity(output)
    assert math.isfinite(perplexity) and 1.0 < perplexity < 200.0
    assert re.search(r"sample:\ndef ", output), output
    assert "step 3: train_loss" in output
    weights = load_file(str(out / "model.safetensors"))
    assert {"token_embedding.weight", "head.weight", "position_embedding.weight"} <= set(weights)
    assert weights["position_embedding.weight"].shape[0] == 16


# --- the GAN: two models, two optimizers -----------------------------------------------------

# Tiny settings: a few hundred points, a handful of steps.
GAN_TINY = ["--max-steps", "6", "--batch-size", "32", "--samples", "256", "--seed", "0"]


def gan_metrics(output: str) -> tuple[float, int]:
    distance = re.search(r"mean distance to the nearest mode: (\S+)", output)
    covered = re.search(r"modes covered: (\d+)/8", output)
    assert distance is not None and covered is not None, output
    return float(distance.group(1)), int(covered.group(1))


@pytest.mark.parametrize(
    "extra",
    [[], ["--mixed-precision", "fp16", "--gradient-accumulation-steps", "2"]],
    ids=["fp32", "fp16-accumulate"],
)
def test_gan_accelerator_script(tmp_path: Path, extra: list[str]) -> None:
    output = run_example("gan_accelerator.py", *GAN_TINY, "--cpu", *extra, cwd=tmp_path)
    distance, covered = gan_metrics(output)
    # A few steps from the start: the points sit near the centre, about one radius (2) away.
    assert math.isfinite(distance) and 0.0 < distance < 5.0, output
    assert 0 <= covered <= 8
    assert "step 6: d_loss" in output
    assert "6 steps in" in output


@pytest.mark.parametrize("extra", [[], ["--precision", "16-mixed"]], ids=["fp32", "16-mixed"])
def test_gan_script(tmp_path: Path, extra: list[str]) -> None:
    root = tmp_path / "runs"
    args = [*GAN_TINY, "--accelerator", "cpu", "--default-root-dir", str(root), *extra]
    output = run_example("gan.py", *args, cwd=tmp_path)
    distance, covered = gan_metrics(output)
    assert math.isfinite(distance) and 0.0 < distance < 5.0, output
    assert 0 <= covered <= 8
    # One global step per batch in which an optimizer stepped.
    assert "6 steps in" in output


def test_gan_data_and_metrics() -> None:
    spec = importlib.util.spec_from_file_location("gan", EXAMPLES / "gan.py")
    assert spec is not None and spec.loader is not None
    gan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gan)
    (points,) = gan.ring_of_gaussians(800, seed=0).tensors
    assert points.shape == (800, 2)
    assert torch.equal(points, gan.ring_of_gaussians(800, seed=0).tensors[0])
    distance, covered = gan.mode_metrics(points)
    assert covered == 8
    assert distance == pytest.approx(gan.STD * math.sqrt(math.pi / 2), rel=0.15)
    # Points at the centre are one radius from every mode, and close to none.
    assert gan.mode_metrics(torch.zeros(10, 2)) == (pytest.approx(gan.RADIUS), 0)


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the Hugging Face example -------------------------------------------------------------------

HF_TINY = [
    "--epochs", "1", "--samples", "600", "--batch-size", "32", "--max-length", "16",
    "--vocab-size", "300", "--hidden-size", "32", "--layers", "1", "--accelerator", "cpu",
]  # fmt: skip


def test_hf_example_names_the_extra_when_transformers_is_missing(tmp_path: Path) -> None:
    # A None entry in sys.modules makes `import transformers` fail as if it were not installed.
    code = (
        "import runpy, sys; sys.modules['transformers'] = None; "
        f"sys.argv = ['hf_text_classification.py']; "
        f"runpy.run_path({str(EXAMPLES / 'hf_text_classification.py')!r}, run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "pip install 'ember[examples]'" in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()  # nothing started


def test_hf_labelled_lines() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    hf = load_example("hf_text_classification")
    source = 'def f(x):\n    """Return x plus one, always.\n\n    More words here.\n    """\n    return x + 1\n'
    assert hf.docstring_lines(ast.parse(source)) == {2, 3, 4, 5}
    lines = hf.labelled_lines(400, seed=0)
    assert len(lines) == 400 and sum(label for _, label in lines) == 200
    assert lines == hf.labelled_lines(400, seed=0)
    assert all(len(text) >= 12 and not text.startswith("#") for text, _ in lines)
    tokenizer = hf.train_tokenizer([text for text, _ in lines], vocab_size=300, max_length=16)
    encoded = hf.encode(tokenizer, lines[:5])
    ids, mask, labels = encoded.tensors
    assert ids.shape == mask.shape == (5, 16)
    assert labels.tolist() == [label for _, label in lines[:5]]
    assert bool((ids[:, 0] == tokenizer.token_to_id("[CLS]")).all())
    assert bool((ids[mask == 0] == tokenizer.token_to_id("[PAD]")).all())


def test_hf_text_classification_script(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from transformers import AutoModelForSequenceClassification

    root = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "hf_text_classification.py"),
            *HF_TINY,
            "--root",
            str(root),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # 540 training lines in batches of 32: 17 steps.
    assert "540 training and 60 validation lines" in output
    assert "17 steps in" in output
    found = re.search(r"validation accuracy: (\S+) untrained, (\S+) trained", output)
    assert found is not None, output
    assert 0.0 <= float(found.group(1)) <= 1.0 and 0.0 <= float(found.group(2)) <= 1.0
    assert re.search(r"^ +(code|docstring) [01]\.\d\d  ", output, re.MULTILINE), output
    # The saved Hugging Face model loads back offline, with the weights ember trained.
    saved = root / "hf_model"
    model = AutoModelForSequenceClassification.from_pretrained(saved, local_files_only=True)
    assert model.config.num_labels == 2 and model.config.id2label == {0: "code", 1: "docstring"}
    last = next((root / "checkpoints").glob("last-step=*"))
    weights = load_file(str(last / "model.safetensors"))
    state = model.state_dict()
    for name, tensor in weights.items():
        assert torch.equal(state[name.removeprefix("model.")], tensor), name
    assert (saved / "tokenizer.json").is_file()
