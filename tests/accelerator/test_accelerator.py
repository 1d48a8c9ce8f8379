"""The Accelerator in one process: prepare, clipping, the collectives (identities here),
process facts, unwrapping and saving models, and the constructor's errors."""

from __future__ import annotations

import collections
import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ember import Accelerator, DataLoaderConfiguration, MisconfigurationError
from ember.accelerator.optim import AcceleratedOptimizer, AcceleratedScheduler
from tests.helpers import regression_data

FEATURES = 4
Pair = collections.namedtuple("Pair", ["first", "second"])


def make_model(hidden: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def make_loader(samples: int = 20, batch_size: int = 8) -> DataLoader:
    return DataLoader(regression_data(samples, FEATURES), batch_size=batch_size)


def backward_once(model: nn.Module, scale: float = 1.0) -> None:
    x, y = regression_data(16, FEATURES).tensors
    (scale * nn.functional.mse_loss(model(x), y)).backward()


def copy_with_grads(model: nn.Module) -> nn.Module:
    """A deep copy that also carries each parameter's gradient (deepcopy drops them)."""
    duplicate = copy.deepcopy(model)
    for original, copied in zip(model.parameters(), duplicate.parameters(), strict=True):
        copied.grad = None if original.grad is None else original.grad.clone()
    return duplicate


def assert_nested_equal(actual: Any, expected: Any) -> None:
    assert type(actual) is type(expected)
    if isinstance(expected, Tensor):
        assert torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_nested_equal(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for got, want in zip(actual, expected, strict=True):
            assert_nested_equal(got, want)
    else:
        assert actual == expected


# --- prepare ---------------------------------------------------------------------------------


def test_prepare_returns_objects_in_the_given_order() -> None:
    accelerator = Accelerator(cpu=True)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    loader = make_loader()

    prepared = accelerator.prepare(loader, scheduler, model, optimizer)

    assert isinstance(prepared, tuple)
    assert len(prepared) == 4
    prepared_loader, prepared_scheduler, prepared_model, prepared_optimizer = prepared
    assert len(prepared_loader) == len(loader)
    assert isinstance(prepared_scheduler, AcceleratedScheduler)
    assert prepared_scheduler.scheduler is scheduler
    assert isinstance(prepared_model, nn.Module)
    assert isinstance(prepared_optimizer, AcceleratedOptimizer)
    assert prepared_optimizer.optimizer is optimizer
    # The scheduler is tied to the wrapped optimizer of its own raw optimizer.
    assert prepared_scheduler.optimizers == [prepared_optimizer]


def test_prepare_of_one_object_returns_it_alone() -> None:
    accelerator = Accelerator(cpu=True)
    model = make_model()
    prepared = accelerator.prepare(model)
    assert not isinstance(prepared, tuple)
    assert isinstance(prepared, nn.Module)
    assert accelerator.unwrap_model(prepared) is model


def test_prepared_module_is_on_the_device() -> None:
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(make_model())
    assert accelerator.device == torch.device("cpu")
    for tensor in [*model.parameters(), *model.buffers()]:
        assert tensor.device == accelerator.device


def test_prepared_optimizer_passes_through_to_the_raw_one() -> None:
    accelerator = Accelerator(cpu=True)
    model = make_model()
    raw = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, raw)

    assert isinstance(optimizer, AcceleratedOptimizer)
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer.param_groups is raw.param_groups
    optimizer.param_groups[0]["lr"] = 0.5
    assert raw.param_groups[0]["lr"] == 0.5
    assert optimizer.defaults is raw.defaults

    backward_once(model)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    optimizer.step()
    assert all(
        not torch.equal(parameter, old)
        for parameter, old in zip(model.parameters(), before, strict=True)
    )
    state = optimizer.state_dict()
    raw_state = raw.state_dict()
    assert state["param_groups"] == raw_state["param_groups"]
    assert state["state"].keys() == raw_state["state"].keys()
    assert len(state["state"]) == len(list(model.parameters()))
    for index, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, raw_state["state"][index][key])

    # load_state_dict reaches the raw optimizer too.
    fresh_model = make_model()
    fresh_raw = torch.optim.Adam(fresh_model.parameters(), lr=1e-3)
    fresh = Accelerator(cpu=True).prepare(fresh_raw)
    fresh.load_state_dict(copy.deepcopy(state))
    assert fresh_raw.param_groups[0]["lr"] == 0.5
    assert torch.equal(
        fresh_raw.state_dict()["state"][0]["exp_avg"], raw_state["state"][0]["exp_avg"]
    )


def test_prepared_scheduler_follows_the_raw_one() -> None:
    accelerator = Accelerator(cpu=True)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    raw = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, raw)
    assert isinstance(scheduler, AcceleratedScheduler)
    backward_once(model)
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr() == raw.get_last_lr() == pytest.approx([0.1])
    assert scheduler.state_dict() == raw.state_dict()


def test_prepared_loader_yields_the_raw_batches() -> None:
    accelerator = Accelerator(cpu=True)
    loader = make_loader(samples=20, batch_size=8)
    prepared = accelerator.prepare(loader)
    assert len(prepared) == len(loader) == 3
    raw_batches = list(loader)
    for _ in range(2):  # every epoch, not only the first
        batches = list(prepared)
        assert len(batches) == len(raw_batches)
        for got, want in zip(batches, raw_batches, strict=True):
            assert_nested_equal(got, want)


@pytest.mark.parametrize(
    ("unsupported", "type_name"),
    [("a string", "str"), ({"lr": 0.1}, "dict"), (3, "int"), (object(), "object")],
)
def test_prepare_rejects_an_unsupported_object(unsupported: Any, type_name: str) -> None:
    accelerator = Accelerator(cpu=True)
    with pytest.raises(MisconfigurationError, match=f"type {type_name}\\b"):
        accelerator.prepare(make_model(), unsupported)


# --- clipping --------------------------------------------------------------------------------


def test_clip_grad_norm_matches_torch() -> None:
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(make_model())
    backward_once(model, scale=10.0)
    reference = copy_with_grads(model)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=0.5)

    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm=0.5)

    assert expected > 0.5  # the clip really changed something
    assert torch.allclose(norm, expected)
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(got.grad, want.grad)
    total = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(parameter.grad) for parameter in model.parameters()])
    )
    assert total == pytest.approx(0.5, rel=1e-4)


def test_clip_grad_norm_with_another_norm_and_a_single_tensor() -> None:
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(make_model())
    backward_once(model, scale=10.0)
    reference = copy_with_grads(model)
    weight = model[0].weight
    expected = torch.nn.utils.clip_grad_norm_(reference[0].weight, max_norm=0.1, norm_type=1.0)
    norm = accelerator.clip_grad_norm_(weight, max_norm=0.1, norm_type=1.0)
    assert torch.allclose(norm, expected)
    assert torch.allclose(weight.grad, reference[0].weight.grad)


def test_clip_grad_value_clamps_every_element() -> None:
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(make_model())
    backward_once(model, scale=10.0)
    unclipped = [parameter.grad.clone() for parameter in model.parameters()]
    assert max(grad.abs().max() for grad in unclipped) > 0.05

    accelerator.clip_grad_value_(model.parameters(), 0.05)

    for parameter, grad in zip(model.parameters(), unclipped, strict=True):
        assert torch.equal(parameter.grad, grad.clamp(-0.05, 0.05))


# --- one process: facts and collectives ------------------------------------------------------


def test_process_facts_in_one_process() -> None:
    accelerator = Accelerator(cpu=True)
    assert accelerator.is_main_process
    assert accelerator.is_local_main_process
    assert accelerator.process_index == 0
    assert accelerator.local_process_index == 0
    assert accelerator.num_processes == 1
    assert accelerator.device.type == "cpu"
    assert accelerator.sync_gradients
    assert not accelerator.optimizer_step_was_skipped


def test_cpu_flag_forces_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend a GPU is present (only the choice of device is made here, nothing runs on it).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert Accelerator().device.type == "cuda"
    assert Accelerator(cpu=True).device == torch.device("cpu")


def nested_sample() -> dict[str, Any]:
    return {
        "logits": torch.randn(3, 2),
        "parts": [torch.arange(3), {"deep": torch.ones(2, 2)}, "a label"],
        "pair": Pair(torch.zeros(1), torch.tensor([1.5, 2.5])),
        "count": 7,
    }


def test_gather_and_gather_for_metrics_are_identities() -> None:
    accelerator = Accelerator(cpu=True)
    tensor = torch.randn(4, 3)
    assert torch.equal(accelerator.gather(tensor), tensor)
    assert torch.equal(accelerator.gather_for_metrics(tensor), tensor)
    sample = nested_sample()
    assert_nested_equal(accelerator.gather(sample), sample)
    assert_nested_equal(accelerator.gather_for_metrics(sample), sample)


@pytest.mark.parametrize("reduction", ["sum", "mean", "min", "max"])
def test_reduce_is_the_identity(reduction: str) -> None:
    accelerator = Accelerator(cpu=True)
    tensor = torch.tensor([1.0, -2.0, 3.0])
    assert torch.equal(accelerator.reduce(tensor, reduction), tensor)
    sample = nested_sample()
    assert_nested_equal(accelerator.reduce(sample, reduction), sample)


def test_reduce_rejects_an_unknown_reduction() -> None:
    with pytest.raises(MisconfigurationError, match="'median'") as caught:
        Accelerator(cpu=True).reduce(torch.ones(2), "median")
    for accepted in ("'sum'", "'mean'", "'min'", "'max'"):
        assert accepted in str(caught.value)


def test_pad_across_processes_and_broadcast_are_identities() -> None:
    accelerator = Accelerator(cpu=True)
    tensor = torch.arange(5)
    assert torch.equal(accelerator.pad_across_processes(tensor, dim=0, pad_index=-1), tensor)
    sample = nested_sample()
    assert_nested_equal(accelerator.pad_across_processes(sample), sample)
    assert_nested_equal(accelerator.broadcast(sample), sample)
    assert accelerator.broadcast(["any", "object", 3]) == ["any", "object", 3]


def test_split_between_processes_gives_everything_to_the_one_process() -> None:
    accelerator = Accelerator(cpu=True)
    items = ["a", "b", "c"]
    with accelerator.split_between_processes(items) as share:
        assert share == items
    tensor = torch.arange(6)
    with accelerator.split_between_processes(tensor) as share:
        assert torch.equal(share, tensor)
    mapping = {"prompts": ["x", "y"], "ids": torch.arange(2)}
    with accelerator.split_between_processes(mapping) as share:
        assert_nested_equal(share, mapping)


def test_main_process_first_runs_the_block() -> None:
    accelerator = Accelerator(cpu=True)
    ran = []
    with accelerator.main_process_first():
        ran.append(accelerator.process_index)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    assert ran == [0]


def test_print_on_the_main_process(capsys: pytest.CaptureFixture[str]) -> None:
    Accelerator(cpu=True).print("hello", 3, sep="-")
    assert capsys.readouterr().out == "hello-3\n"


# --- models and files ------------------------------------------------------------------------


def test_unwrap_model_returns_the_module() -> None:
    accelerator = Accelerator(cpu=True)
    model = make_model()
    assert accelerator.unwrap_model(accelerator.prepare(model)) is model


def test_unwrap_model_removes_torch_compile() -> None:
    accelerator = Accelerator(cpu=True)
    model = make_model()
    compiled = torch.compile(model, backend="eager")
    assert compiled is not model
    assert accelerator.unwrap_model(compiled) is model
    assert accelerator.unwrap_model(accelerator.prepare(compiled)) is model


def test_save_model_writes_a_plain_safetensors_file(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(make_model())
    path = accelerator.save_model(model, tmp_path / "export")
    assert path == tmp_path / "export" / "model.safetensors"
    loaded = load_file(str(path))
    state = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


class TiedModel(nn.Module):
    """An embedding and an output layer sharing one weight, as language models do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.embed(tokens))


def test_save_model_keeps_both_names_of_tied_weights(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(TiedModel())
    assert model.head.weight is model.embed.weight
    path = accelerator.save_model(model, tmp_path)

    loaded = load_file(str(path))
    assert set(loaded) == {"embed.weight", "head.weight"}
    assert torch.equal(loaded["embed.weight"], model.embed.weight.detach())
    assert torch.equal(loaded["head.weight"], model.embed.weight.detach())
    fresh = TiedModel()
    with torch.no_grad():
        fresh.embed.weight.zero_()
    fresh.load_state_dict(loaded, strict=True)
    assert torch.equal(fresh.embed.weight, model.embed.weight)


def test_save_model_unwraps_a_compiled_model(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True)
    model = make_model()
    path = accelerator.save_model(torch.compile(model, backend="eager"), tmp_path)
    loaded = load_file(str(path))
    assert loaded.keys() == model.state_dict().keys()  # no "_orig_mod." prefix


# --- constructor errors ----------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, -1, 1.5, True, "2"])
def test_invalid_gradient_accumulation_steps(steps: Any) -> None:
    with pytest.raises(MisconfigurationError, match="gradient_accumulation_steps") as caught:
        Accelerator(cpu=True, gradient_accumulation_steps=steps)
    assert repr(steps) in str(caught.value)


def test_dataloader_config_must_be_a_dataloader_configuration() -> None:
    with pytest.raises(MisconfigurationError, match="dataloader_config") as caught:
        Accelerator(cpu=True, dataloader_config={"even_batches": False})  # type: ignore[arg-type]
    assert "dict" in str(caught.value)
    config = DataLoaderConfiguration(even_batches=False)
    assert Accelerator(cpu=True, dataloader_config=config).dataloader_config is config


def test_ddp_in_one_process_is_one_device() -> None:
    """strategy="ddp" without a launcher: one process, nothing to synchronise, no wrapper."""
    accelerator = Accelerator(cpu=True, strategy="ddp")
    model = torch.nn.Linear(2, 1)
    assert accelerator.prepare(model) is model
    assert accelerator.num_processes == 1
    assert str(accelerator.distributed_type) == "NO"


def test_unknown_strategy_lists_the_accepted_values() -> None:
    with pytest.raises(MisconfigurationError, match="'deepspeed'") as caught:
        Accelerator(cpu=True, strategy="deepspeed")
    for accepted in ("'auto'", "'ddp'", "'fsdp'"):
        assert accepted in str(caught.value)


def test_auto_strategy_under_a_multi_process_launcher_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MisconfigurationError, match="WORLD_SIZE"):
        Accelerator(cpu=True)


# --- CUDA ----------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_device_placement() -> None:
    accelerator = Accelerator()
    assert accelerator.device.type == "cuda"
    model = make_model()
    model, optimizer, loader = accelerator.prepare(
        model, torch.optim.SGD(model.parameters(), lr=0.1), make_loader()
    )
    assert all(parameter.device.type == "cuda" for parameter in model.parameters())
    for x, y in loader:
        assert x.device.type == "cuda"
        assert y.device.type == "cuda"
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
    assert Accelerator(cpu=True).device == torch.device("cpu")
