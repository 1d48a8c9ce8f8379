"""ThroughputMonitor: when it logs, what it measures (on a scripted clock), no per-batch sync,
FLOPs counted without changing training, MFU against the peak table."""

from __future__ import annotations

import io
import types
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils.flop_counter import FlopCounterMode

from ember import MisconfigurationError, Trainer
from ember.callbacks import ProgressBar, ThroughputMonitor
from ember.callbacks.device_peaks import device_peak_flops, peak_flops
from tests.helpers import MemoryLogger, TinyModule, bare_trainer_kwargs, loader

SAMPLES = "throughput/samples_per_sec"
ITEMS = "throughput/items_per_sec"
FLOPS = "throughput/flops_per_sec"
MFU = "throughput/mfu"


class Clock:
    """A scripted ``time.perf_counter``: seconds pass only when the module says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


class Timed(TinyModule):
    """Each training batch takes 0.5 s and each validation batch 10 s on ``clock``; records
    every value logged under ``throughput/`` with the step it was logged at."""

    def __init__(
        self, clock: Clock, num_items: str | None = None, names: tuple[str, ...] = (SAMPLES, ITEMS)
    ) -> None:
        super().__init__()
        self.clock = clock
        self.num_items = num_items
        self.names = names
        self.logged: list[tuple[int, str, float]] = []

    def log(self, name: str, value: Any, **kwargs: Any) -> None:
        if name in self.names:
            self.logged.append((self.global_step, name, float(value)))
        super().log(name, value, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.clock.now += 0.5
        if self.num_items is None:
            return super().training_step(batch, batch_idx)
        x, y = batch
        # Three items per sample: the loss is a sum over them.
        loss = 3 * torch.nn.functional.mse_loss(self(x), y, reduction="sum")
        items = 3 * x.shape[0]
        return {
            "loss": loss,
            "num_items": torch.tensor(items) if self.num_items == "tensor" else items,
        }

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.clock.now += 10.0
        super().validation_step(batch, batch_idx)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(
        "ember.callbacks.throughput.time", types.SimpleNamespace(perf_counter=clock.perf_counter)
    )
    return clock


def _fit(
    module: TinyModule,
    samples: int = 48,
    epochs: int = 2,
    monitor: ThroughputMonitor | None = None,
    **kwargs: Any,
) -> Trainer:
    options = {"log_every_n_steps": 2, "num_sanity_val_steps": 0, **bare_trainer_kwargs(), **kwargs}
    # Known FLOPs and peak unless a test gives its own monitor: no counting, no warning.
    monitor = monitor or ThroughputMonitor(flops_per_sample=10.0, peak_flops=1e3)
    trainer = Trainer(max_epochs=epochs, callbacks=[monitor], **options)
    trainer.fit(module, loader(samples, batch_size=8), loader(16, batch_size=8))
    return trainer


def test_logs_samples_per_second_every_n_steps(clock: Clock) -> None:
    module = Timed(clock)
    trainer = _fit(module)  # 6 steps per epoch, validation (20 s) at each epoch's end
    # 2 batches of 8 samples in 1 s; the validation time between epochs is not counted.
    assert module.logged == [(step, SAMPLES, 16.0) for step in (2, 4, 6, 8, 10, 12)]
    assert trainer.callback_metrics[SAMPLES] == 16.0
    assert ITEMS not in trainer.callback_metrics


def test_the_clock_restarts_each_epoch(clock: Clock) -> None:
    class SlowBetweenEpochs(Timed):
        def on_fit_start(self) -> None:
            self.clock.now += 7.0

        def on_train_epoch_end(self) -> None:
            self.clock.now += 5.0

    module = SlowBetweenEpochs(clock)
    _fit(module, samples=40, epochs=2)  # 5 steps per epoch
    # Step 5 (the first epoch's tail) is dropped; the second epoch's first value measures
    # one batch only, from the epoch's start: the 7 s and 5 s outside epochs do not count.
    assert [step for step, _, _ in module.logged] == [2, 4, 6, 8, 10]
    assert all(value == 16.0 for _, _, value in module.logged)


def test_validation_inside_a_window_is_left_out(clock: Clock) -> None:
    module = Timed(clock)
    _fit(module, epochs=1, log_every_n_steps=3, val_check_interval=2)
    assert module.logged == [(3, SAMPLES, 16.0), (6, SAMPLES, 16.0)]


def test_counts_samples_of_every_batch_of_a_window(clock: Clock) -> None:
    module = Timed(clock)
    _fit(module, samples=64, epochs=1, accumulate_grad_batches=2, log_every_n_steps=1)
    assert module.logged == [(step, SAMPLES, 16.0) for step in (1, 2, 3, 4)]


@pytest.mark.parametrize("kind", ["int", "tensor"])
def test_items_per_second_when_the_step_reports_num_items(clock: Clock, kind: str) -> None:
    module = Timed(clock, num_items=kind)
    trainer = _fit(module)
    items = [(step, value) for step, name, value in module.logged if name == ITEMS]
    samples = [(step, value) for step, name, value in module.logged if name == SAMPLES]
    assert items == [(step, 48.0) for step in (2, 4, 6, 8, 10, 12)]
    assert [step for step, _ in samples] == [step for step, _ in items]
    ratio = trainer.callback_metrics[ITEMS] / trainer.callback_metrics[SAMPLES]
    assert ratio == pytest.approx(3.0, abs=1e-6)


def test_real_clock_gives_positive_rates_and_consistent_items() -> None:
    module = Timed(Clock(), num_items="tensor")  # the monitor reads the real clock here
    trainer = _fit(module, epochs=1)
    assert [step for step, name, _ in module.logged if name == SAMPLES] == [2, 4, 6]
    assert all(value > 0 for _, _, value in module.logged)
    ratio = trainer.callback_metrics[ITEMS] / trainer.callback_metrics[SAMPLES]
    assert ratio == pytest.approx(3.0, abs=1e-6)


def test_values_reach_the_loggers(clock: Clock) -> None:
    logger = MemoryLogger()
    _fit(Timed(clock, num_items="tensor"), epochs=1, logger=logger)
    sent = [
        (metrics[SAMPLES], metrics[ITEMS]) for _, metrics in logger.metrics if SAMPLES in metrics
    ]
    assert sent and all(values == (16.0, 48.0) for values in sent)


def test_loggers_get_each_value_at_the_step_it_measured(clock: Clock) -> None:
    logger = MemoryLogger()
    _fit(Timed(clock), epochs=1, logger=logger)
    assert [step for step, metrics in logger.metrics if SAMPLES in metrics] == [2, 4, 6]


def test_no_host_sync_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting .item() calls: tensor item counts are summed on the device, never read per
    batch, so what the monitor adds does not grow with the number of batches."""

    def count_items(samples: int, monitor: bool) -> int:
        calls = 0
        original = torch.Tensor.item

        def counting(self: torch.Tensor) -> Any:
            nonlocal calls
            calls += 1
            return original(self)

        monkeypatch.setattr(torch.Tensor, "item", counting)
        callbacks = [ThroughputMonitor(flops_per_sample=10.0, peak_flops=1e3)] if monitor else []
        trainer = Trainer(
            max_epochs=1, log_every_n_steps=1000, callbacks=callbacks, **bare_trainer_kwargs()
        )
        trainer.fit(Timed(Clock(), num_items="tensor"), loader(samples, batch_size=8))
        monkeypatch.setattr(torch.Tensor, "item", original)
        return calls

    extra_short = count_items(128, True) - count_items(128, False)  # 16 batches
    extra_long = count_items(512, True) - count_items(512, False)  # 64 batches
    assert extra_short == extra_long


# --- FLOP/s and MFU ------------------------------------------------------------------------------


def test_flops_and_mfu_from_given_numbers(clock: Clock) -> None:
    module = Timed(clock, names=(SAMPLES, FLOPS, MFU))
    monitor = ThroughputMonitor(flops_per_sample=1500.0, peak_flops=8000.0)
    trainer = _fit(module, epochs=1, monitor=monitor)
    # By hand: 16 samples/s x 1500 FLOPs = 24000 FLOP/s; 24000 / 8000 (one device) = 3.
    by_step: dict[int, dict[str, float]] = {}
    for step, name, value in module.logged:
        by_step.setdefault(step, {})[name] = value
    assert by_step == {step: {SAMPLES: 16.0, FLOPS: 24000.0, MFU: 3.0} for step in (2, 4, 6)}
    assert trainer.callback_metrics[MFU] == pytest.approx(3.0)


def test_no_mfu_without_a_known_peak_and_it_says_so(clock: Clock) -> None:
    module = Timed(clock, names=(SAMPLES, FLOPS, MFU))
    with pytest.warns(UserWarning, match=r"mfu is not logged.*'cpu'.*peak_flops=") as caught:
        _fit(module, epochs=1, monitor=ThroughputMonitor(flops_per_sample=100.0))
    assert len([w for w in caught if "mfu is not logged" in str(w.message)]) == 1
    assert {name for _, name, _ in module.logged} == {SAMPLES, FLOPS}
    assert all(value == 1600.0 for _, name, value in module.logged if name == FLOPS)


def _mlp() -> TinyModule:
    return TinyModule(hidden=8)


def test_counted_flops_equal_flop_counter_mode_by_hand() -> None:
    monitor = ThroughputMonitor(peak_flops=1e12)
    Trainer(max_epochs=1, callbacks=[monitor], **bare_trainer_kwargs()).fit(
        _mlp(), loader(32, batch_size=8)
    )
    # The same model (same seed) and first batch, forward and backward under the counter.
    module = _mlp()
    x, y = next(iter(loader(32, batch_size=8)))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.mse_loss(module(x), y).backward()
    assert counter.get_total_flops() > 0
    assert monitor.flops_per_sample == counter.get_total_flops() / 8


class Noisy(TinyModule):
    """Dropout in the step: any change to the random stream would change the weights."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        noisy = torch.nn.functional.dropout(x, p=0.3, training=True)
        return torch.nn.functional.mse_loss(self(noisy), y)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])  # fp16: CPU GradScaler too
def test_counting_flops_leaves_training_unchanged(precision: str) -> None:
    def train(callbacks: list[Any]) -> TinyModule:
        torch.manual_seed(1)
        module = Noisy(hidden=8)
        options = {**bare_trainer_kwargs(), "log_every_n_steps": 1, "precision": precision}
        Trainer(max_epochs=2, callbacks=callbacks, **options).fit(module, loader(48, batch_size=8))
        return module

    plain = train([])
    monitor = ThroughputMonitor(peak_flops=1e12)
    watched = train([monitor])
    assert monitor.flops_per_sample is not None and monitor.flops_per_sample > 0
    for (name, a), b in zip(plain.named_parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b), name
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None and b.grad is not None:
            assert torch.equal(a.grad, b.grad), name
    assert not _get_current_dispatch_mode_stack()  # the counting mode was left


def test_values_show_in_the_progress_bar() -> None:
    stream = io.StringIO()
    monitor = ThroughputMonitor(flops_per_sample=100.0, peak_flops=1e9)
    Trainer(
        max_epochs=1,
        log_every_n_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[ProgressBar(stream=stream), monitor],
    ).fit(TinyModule(), loader(32))
    line = stream.getvalue()
    assert f"{SAMPLES}=" in line and f"{MFU}=" in line
    assert FLOPS not in line  # in the loggers, not in the bar


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(MisconfigurationError, match=r"flops_per_sample=-1\).*positive number"):
        ThroughputMonitor(flops_per_sample=-1)
    with pytest.raises(MisconfigurationError, match=r"peak_flops='a100'\).*positive number"):
        ThroughputMonitor(peak_flops="a100")  # type: ignore[arg-type]


# --- the peak table ------------------------------------------------------------------------------

TERA = 1e12


@pytest.mark.parametrize(
    ("device_name", "precision", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.5 * TERA),  # SXM
        ("NVIDIA H100 PCIe", "fp16", 756.5 * TERA),
        ("NVIDIA H100 NVL", "bf16-true", 835.5 * TERA),
        ("NVIDIA H200", "bf16", 989.5 * TERA),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312 * TERA),
        ("NVIDIA A100 80GB PCIe", "no", 19.5 * TERA),  # TF32 off: plain FP32
        ("NVIDIA A10G", "fp16", 125 * TERA),
        ("NVIDIA L4", "bf16", 121 * TERA),
        ("NVIDIA L40S", "bf16", 362 * TERA),  # not taken for an L4
        ("Tesla V100-SXM2-16GB", "fp16", 125 * TERA),
        ("Tesla V100-PCIE-32GB", "fp16", 112 * TERA),
        ("Tesla T4", "fp16", 65 * TERA),
        ("Tesla T4", "bf16", None),  # no bf16 tensor cores
        ("NVIDIA GeForce RTX 4090", "bf16", 165.2 * TERA),
        ("NVIDIA GeForce RTX 3090", "fp16", 71 * TERA),
        ("NVIDIA GeForce RTX 3090 Ti", "fp16", 80 * TERA),
        ("Some Future GPU", "bf16", None),
    ],
)
def test_peak_table_lookup(
    monkeypatch: pytest.MonkeyPatch, device_name: str, precision: str, expected: float | None
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    monkeypatch.setattr("ember.callbacks.device_peaks.tf32_allowed", lambda: False)
    assert device_peak_flops(torch.device("cuda", 0), precision) == expected


def test_fp32_takes_the_tf32_rate_when_pytorch_allows_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    monkeypatch.setattr("ember.callbacks.device_peaks.tf32_allowed", lambda: True)
    assert device_peak_flops(torch.device("cuda"), "no") == 156 * TERA
    assert device_peak_flops(torch.device("cuda"), "32-true") == 156 * TERA
    assert device_peak_flops(torch.device("cuda"), "16-mixed") == 312 * TERA


def test_no_peak_on_a_cpu() -> None:
    assert device_peak_flops(torch.device("cpu"), "bf16") is None


def test_the_monitor_looks_up_its_device_and_precision(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[str, str]] = []

    def lookup(device: torch.device, precision: str) -> float:
        asked.append((device.type, precision))
        return peak_flops("NVIDIA L4", precision, tf32=False) or 0.0

    monkeypatch.setattr("ember.callbacks.throughput.device_peak_flops", lookup)
    module = Timed(clock, names=(MFU,))
    _fit(module, epochs=1, monitor=ThroughputMonitor(flops_per_sample=1e12), precision="bf16-mixed")
    assert asked == [("cpu", "bf16")]
    assert [value for _, _, value in module.logged] == [pytest.approx(16e12 / 121e12)] * 3


class Elementwise(TinyModule):
    """No matrix product: FlopCounterMode counts nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale).sum(dim=1, keepdim=True)


def test_nothing_counted_says_so_and_logs_no_flops() -> None:
    monitor = ThroughputMonitor(peak_flops=1e12)
    logger = MemoryLogger()
    options = {**bare_trainer_kwargs(), "logger": logger, "log_every_n_steps": 1}
    with pytest.warns(UserWarning, match=r"no FLOPs were counted.*flops_per_sample="):
        Trainer(max_epochs=1, callbacks=[monitor], **options).fit(Elementwise(), loader(32))
    names = {name for _, metrics in logger.metrics for name in metrics}
    assert SAMPLES in names and FLOPS not in names and MFU not in names


def test_the_counted_batch_is_not_timed(clock: Clock) -> None:
    class SlowFirstBatch(Timed):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if self.global_step == 0:
                self.clock.now += 10.0  # counting makes the first batch slow
            return super().training_step(batch, batch_idx)

    module = SlowFirstBatch(clock, names=(SAMPLES, FLOPS))
    monitor = ThroughputMonitor(peak_flops=1e12)
    _fit(module, epochs=1, monitor=monitor)
    assert monitor.flops_per_sample is not None and monitor.flops_per_sample > 0
    # Step 2's window holds batch 2 only (8 samples in 0.5 s), not the counted batch 1.
    assert [(step, value) for step, name, value in module.logged if name == SAMPLES] == [
        (2, 16.0),
        (4, 16.0),
        (6, 16.0),
    ]
    flops = [value for _, name, value in module.logged if name == FLOPS]
    assert flops == [pytest.approx(16.0 * monitor.flops_per_sample)] * 3


def _train_compiled(callbacks: list[Any], compile: Any, steps: int = 4) -> TinyModule:
    torch.manual_seed(1)
    module = TinyModule(hidden=8)
    options = {**bare_trainer_kwargs(), "log_every_n_steps": 2, "compile": compile}
    trainer = Trainer(max_steps=steps, callbacks=callbacks, accelerator="cpu", **options)
    trainer.fit(module, loader(48, batch_size=8))
    return module


@pytest.mark.slow  # inductor compiles on the CPU (tens of seconds the first time)
def test_a_compiled_model_trains_bitwise_as_without_the_monitor(
    recwarn: pytest.WarningsRecorder,
) -> None:
    plain = _train_compiled([], compile=True)
    monitor = ThroughputMonitor(peak_flops=1e12)
    watched = _train_compiled([monitor], compile=True)
    for (name, a), b in zip(plain.named_parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b), name  # counting the first step changed the last bits
    assert monitor.flops_per_sample is None
    assert any("the model is compiled" in str(w.message) for w in recwarn)


def test_a_compiled_model_is_not_counted_and_says_so(recwarn: pytest.WarningsRecorder) -> None:
    logger = MemoryLogger()
    monitor = ThroughputMonitor(peak_flops=1e12)
    torch.manual_seed(1)
    module = TinyModule(hidden=8)
    options = {**bare_trainer_kwargs(), "logger": logger, "log_every_n_steps": 2}
    for _ in range(2):  # a second fit with the same monitor: the warning is not repeated
        trainer = Trainer(max_steps=4, callbacks=[monitor], compile={"backend": "eager"}, **options)
        trainer.fit(module, loader(48, batch_size=8))
    assert monitor.flops_per_sample is None
    logged = {name for metrics in logger.metrics for name in metrics[1]}
    assert "throughput/samples_per_sec" in logged
    assert not {"throughput/flops_per_sec", "throughput/mfu"} & logged
    warned = [w for w in recwarn if "the model is compiled" in str(w.message)]
    assert len(warned) == 1 and "flops_per_sample" in str(warned[0].message)
    # A torch.compile'd submodule is a compiled model too; a given number is used as it is.
    module.net = torch.compile(module.net, backend="eager")  # type: ignore[assignment]
    with pytest.warns(UserWarning, match="the model is compiled"):
        Trainer(max_steps=2, callbacks=[ThroughputMonitor()], **options).fit(
            module, loader(48, batch_size=8)
        )
    given = ThroughputMonitor(flops_per_sample=5.0, peak_flops=1e12)
    Trainer(max_steps=2, callbacks=[given], **options).fit(module, loader(48, batch_size=8))
    assert given.flops_per_sample == 5.0
