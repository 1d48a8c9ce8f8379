"""Precision modes on the CPU (and two on CUDA): autocast dtypes, the fp16 GradScaler,
bf16-true weights and inputs, the accepted names, and where the mode comes from."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Accelerator, MisconfigurationError
from ember.config import save_config
from tests.helpers import regression_data

FEATURES = 4


def make_model() -> nn.Linear:
    torch.manual_seed(0)
    model = nn.Linear(FEATURES, 1)
    with torch.no_grad():
        model.bias.zero_()  # keeps fp16 gradients scaled by 2**16 finite
    return model


def small_batch(samples: int = 8) -> tuple[Tensor, Tensor]:
    """Small values, so that a gradient scaled by the GradScaler stays finite in float16."""
    x, y = regression_data(samples, FEATURES).tensors
    return 0.1 * x, 0.1 * y


# --- autocast per mode -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "dtype"),
    [
        ("no", torch.float32),
        ("32-true", torch.float32),
        ("bf16", torch.bfloat16),
        ("bf16-mixed", torch.bfloat16),
        ("fp16", torch.float16),
        ("16-mixed", torch.float16),
    ],
)
def test_autocast_output_dtype(mode: str, dtype: torch.dtype) -> None:
    accelerator = Accelerator(cpu=True, mixed_precision=mode)
    model = accelerator.prepare(make_model())
    x, _ = small_batch()
    # autocast() serves code outside a prepared model's forward.
    with accelerator.autocast():
        inside = torch.nn.functional.linear(x, model.weight, model.bias)
    outside = torch.nn.functional.linear(x, model.weight, model.bias)
    assert inside.dtype == dtype
    # Mixed precision keeps the weights, and everything outside the context, in float32.
    assert model.weight.dtype == torch.float32
    assert outside.dtype == torch.float32
    # The prepared model's forward runs under autocast itself and returns float32, as in
    # Accelerate: the same numbers as plain autocast, converted.
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        expected = torch.nn.functional.linear(x, model.weight, model.bias).float()
    assert model(x).dtype == torch.float32
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("no", "no"),
        ("fp16", "fp16"),
        ("bf16", "bf16"),
        ("bf16-true", "bf16-true"),
        ("32-true", "no"),
        ("32", "no"),
        (32, "no"),
        ("fp32", "no"),
        ("16-mixed", "fp16"),
        ("16", "fp16"),
        (16, "fp16"),
        ("bf16-mixed", "bf16"),
    ],
)
def test_mixed_precision_names(given: Any, expected: str) -> None:
    assert Accelerator(cpu=True, mixed_precision=given).mixed_precision == expected


@pytest.mark.parametrize("given", ["fp8", "float16", "", "BF16", 64])
def test_unknown_mixed_precision_lists_the_accepted_values(given: Any) -> None:
    with pytest.raises(MisconfigurationError) as caught:
        Accelerator(cpu=True, mixed_precision=given)
    message = str(caught.value)
    assert "mixed_precision" in message
    assert repr(given) in message
    for accepted in ("'no'", "'fp16'", "'bf16'", "'bf16-true'"):
        assert accepted in message


# --- fp16: the GradScaler ------------------------------------------------------------------


def plain_fp16_gradients(x: Tensor, y: Tensor) -> list[Tensor]:
    reference = make_model()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.mse_loss(reference(x), y)
    loss.backward()
    return [parameter.grad for parameter in reference.parameters()]


def test_fp16_scales_the_loss_and_unscales_the_gradient() -> None:
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    model = make_model()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    scaler = accelerator.precision.scaler
    assert isinstance(scaler, torch.amp.GradScaler)
    assert scaler.is_enabled()

    x, y = small_batch()
    with accelerator.autocast():
        loss = nn.functional.mse_loss(model(x), y)
    accelerator.backward(loss)

    expected = plain_fp16_gradients(x, y)
    scale = scaler.get_scale()
    assert scale > 1
    for parameter, want in zip(model.parameters(), expected, strict=True):
        assert torch.allclose(parameter.grad, want * scale, rtol=1e-3, atol=1e-6)

    accelerator.unscale_gradients(optimizer)
    for parameter, want in zip(model.parameters(), expected, strict=True):
        assert torch.allclose(parameter.grad, want, rtol=1e-3, atol=1e-7)


def test_fp16_step_uses_the_unscaled_gradient() -> None:
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    model = make_model()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = small_batch()
    with accelerator.autocast():
        loss = nn.functional.mse_loss(model(x), y)
    accelerator.backward(loss)
    optimizer.step()
    assert not accelerator.optimizer_step_was_skipped

    expected = make_model()
    gradients = plain_fp16_gradients(x, y)
    with torch.no_grad():
        for parameter, grad in zip(expected.parameters(), gradients, strict=True):
            parameter -= 0.1 * grad
    for got, want in zip(model.parameters(), expected.parameters(), strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def _train(mixed_precision: str, epochs: int = 15) -> tuple[nn.Module, list[float]]:
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # Full-size values: early scaled gradients may overflow in float16, and the GradScaler
    # must recover from that by skipping steps and lowering its scale.
    loader = DataLoader(regression_data(64, FEATURES), batch_size=8)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses = []
    for _ in range(epochs):
        for inputs, targets in loader:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = nn.functional.mse_loss(model(inputs), targets)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(loss.item())
    return model, losses


def test_fp16_training_converges_like_fp32() -> None:
    fp16_model, fp16_losses = _train("fp16")
    fp32_model, fp32_losses = _train("no")
    assert all(torch.isfinite(torch.tensor(fp16_losses)))
    assert sum(fp16_losses[-8:]) < 0.2 * sum(fp16_losses[:8])
    assert sum(fp16_losses[-8:]) < 1.5 * sum(fp32_losses[-8:])
    for got, want in zip(fp16_model.parameters(), fp32_model.parameters(), strict=True):
        assert torch.allclose(got, want, atol=2e-2)


def test_fp16_clip_grad_norm_measures_the_unscaled_gradient() -> None:
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    model = make_model()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = small_batch()
    with accelerator.autocast():
        loss = nn.functional.mse_loss(model(x), y)
    accelerator.backward(loss)
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm=1e9)

    expected = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(grad) for grad in plain_fp16_gradients(x, y)])
    )
    assert torch.allclose(norm, expected, rtol=1e-3)
    # The optimizer step after clipping does not unscale a second time.
    before = [parameter.detach().clone() for parameter in model.parameters()]
    grads = [parameter.grad.clone() for parameter in model.parameters()]
    optimizer.step()
    for parameter, old, grad in zip(model.parameters(), before, grads, strict=True):
        assert torch.allclose(parameter, old - 0.1 * grad, atol=1e-7)


# --- bf16-true ----------------------------------------------------------------------------


def test_bf16_true_casts_weights_and_float_inputs_only() -> None:
    accelerator = Accelerator(cpu=True, mixed_precision="bf16-true")
    features = torch.randn(8, FEATURES)
    labels = torch.arange(8)
    loader = DataLoader(TensorDataset(features, labels), batch_size=4)
    model, prepared = accelerator.prepare(make_model(), loader)

    assert all(parameter.dtype == torch.bfloat16 for parameter in model.parameters())
    raw_batches = list(loader)
    batches = list(prepared)
    assert len(batches) == len(raw_batches) == 2
    for (x, label), (raw_x, raw_label) in zip(batches, raw_batches, strict=True):
        assert x.dtype == torch.bfloat16
        assert torch.equal(x, raw_x.to(torch.bfloat16))
        assert label.dtype == torch.int64
        assert torch.equal(label, raw_label)

    with accelerator.autocast():
        output = model(batches[0][0])
        created = torch.zeros(2)
    assert output.dtype == torch.bfloat16
    assert created.dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32  # restored after the context


def test_bf16_true_trains() -> None:
    accelerator = Accelerator(cpu=True, mixed_precision="bf16-true")
    model = make_model()
    x, y = small_batch(32)
    loader = DataLoader(TensorDataset(10 * x, 10 * y), batch_size=8)
    model, optimizer, loader = accelerator.prepare(
        model, torch.optim.SGD(model.parameters(), lr=0.05), loader
    )
    losses = []
    for _ in range(10):
        for inputs, targets in loader:
            with accelerator.accumulate(model), accelerator.autocast():
                loss = nn.functional.mse_loss(model(inputs), targets)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(loss.float().item())
    assert model.weight.dtype == torch.bfloat16
    assert sum(losses[-4:]) < 0.2 * sum(losses[:4])


# --- where the mode comes from --------------------------------------------------------------


def test_default_is_full_precision() -> None:
    accelerator = Accelerator(cpu=True)
    assert accelerator.mixed_precision == "no"


def test_config_file_sets_the_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    save_config({"mixed_precision": "bf16"})
    assert Accelerator(cpu=True).mixed_precision == "bf16"


def test_environment_beats_the_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    save_config({"mixed_precision": "bf16"})
    monkeypatch.setenv("EMBER_MIXED_PRECISION", "fp16")
    assert Accelerator(cpu=True).mixed_precision == "fp16"


def test_argument_beats_environment_and_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    save_config({"mixed_precision": "bf16"})
    monkeypatch.setenv("EMBER_MIXED_PRECISION", "fp16")
    assert Accelerator(cpu=True, mixed_precision="no").mixed_precision == "no"
    assert Accelerator(cpu=True, mixed_precision="bf16-true").mixed_precision == "bf16-true"


def test_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_MIXED_PRECISION", "half")
    with pytest.raises(MisconfigurationError, match="EMBER_MIXED_PRECISION") as caught:
        Accelerator(cpu=True)
    assert "'half'" in str(caught.value)


def test_bad_config_file_value_names_the_file() -> None:
    save_config({"mixed_precision": "half"})
    with pytest.raises(MisconfigurationError, match="config file") as caught:
        Accelerator(cpu=True)
    assert "'half'" in str(caught.value)


@pytest.mark.parametrize(
    ("content", "complaint"),
    [("mixed_precision: [bf16\n", "not valid YAML"), ("- bf16\n- fp16\n", "mapping")],
    ids=["invalid-yaml", "not-a-mapping"],
)
def test_broken_config_file_is_a_misconfiguration(content: str, complaint: str) -> None:
    from ember.config import config_path

    path = config_path()
    path.write_text(content)
    with pytest.raises(MisconfigurationError, match=complaint) as caught:
        Accelerator(cpu=True)
    assert str(path) in str(caught.value)
    # An explicit argument does not need the file at all.
    assert Accelerator(cpu=True, mixed_precision="bf16").mixed_precision == "bf16"


# --- CUDA ----------------------------------------------------------------------------------


@pytest.mark.gpu
def test_fp16_on_cuda_matches_plain_autocast_and_grad_scaler() -> None:
    accelerator = Accelerator(mixed_precision="fp16")
    assert accelerator.device.type == "cuda"
    model = make_model()
    reference = copy.deepcopy(model).cuda()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda")
    x, y = (tensor.cuda() for tensor in small_batch())
    for _ in range(3):
        with accelerator.autocast():
            loss = nn.functional.mse_loss(model(x), y)
        assert loss.dtype == torch.float32
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

        with torch.autocast("cuda", dtype=torch.float16):
            reference_loss = nn.functional.mse_loss(reference(x), y)
        scaler.scale(reference_loss).backward()
        scaler.step(reference_optimizer)
        scaler.update()
        reference_optimizer.zero_grad()
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.gpu
def test_bf16_autocast_on_cuda() -> None:
    accelerator = Accelerator(mixed_precision="bf16")
    model = accelerator.prepare(make_model())
    x, _ = small_batch()
    with accelerator.autocast():
        output = model(x.to(accelerator.device))
    assert output.device.type == "cuda"
    assert output.dtype == torch.bfloat16


@pytest.mark.parametrize("native", [True, False, None])
def test_mixed_precision_on_a_cpu_without_native_support_warns_once(
    monkeypatch: pytest.MonkeyPatch, native: bool | None
) -> None:
    """Emulated fp16/bf16 on a CPU is about 10x slower than fp32: say so, once per mode."""
    import warnings

    from ember.accelerator import precision

    monkeypatch.setattr(precision, "cpu_supports", lambda dtype: native)
    monkeypatch.setattr(precision, "_warned_cpu", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Accelerator(cpu=True, mixed_precision="fp16")
        Accelerator(cpu=True, mixed_precision="fp16")
        Accelerator(cpu=True, mixed_precision="no")
    messages = [str(w.message) for w in caught if "10x slower" in str(w.message)]
    if native is False:
        assert len(messages) == 1
        assert "'16-mixed'" in messages[0] and "avx512_fp16" in messages[0]
    else:
        assert messages == []


def test_cpu_supports_reads_the_cpu_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    import builtins

    from ember.accelerator import precision

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512_bf16\n")
    real_open = builtins.open
    monkeypatch.setattr(
        builtins,
        "open",
        lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **k),
    )
    assert precision.cpu_supports(torch.bfloat16) is True
    assert precision.cpu_supports(torch.float16) is False
