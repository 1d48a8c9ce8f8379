"""Run by ``test_fsdp.py`` under ``torch.distributed.run`` with two processes (gloo, CPU):
FSDP scenarios in one launch. Rank 0 computes each one-process reference with plain PyTorch
(batch N x B) and writes the comparisons to ``<out>/results.json``."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import DataLoader, TensorDataset

from ember import Accelerator, Callback, FSDPStrategy, Trainer, TrainModule
from ember.accelerator import distributed

WORLD = 2
BATCH = 4  # per process


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.tanh(self.linear(x))


class Stack(nn.Module):
    """Blocks in an nn.ModuleList: shard_modules=None shards each block."""

    def __init__(self, features: int = 4, width: int = 6, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class NoSplit(nn.Module):
    """Hugging Face style: ``_no_split_modules`` names the blocks (which sit outside any
    ModuleList); the ModuleList of heads must not be sharded."""

    _no_split_modules = ["Block"]

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.first = Block(6)
        self.second = Block(6)
        self.heads = nn.ModuleList([nn.Linear(6, 1), nn.Linear(6, 1)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.second(self.first(self.embed(x)))
        return self.heads[0](x) + self.heads[1](x)


def data(samples: int = 64) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 4, generator=generator)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(samples, 1, generator=generator)
    return TensorDataset(x, y)


def fresh(seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    return Stack()


def max_diff(left: dict[str, Tensor], right: dict[str, Tensor]) -> float:
    assert set(left) == set(right), (sorted(left), sorted(right))
    return max(float((left[k].float() - right[k].float()).abs().max()) for k in left)


def reference(
    model: nn.Module, samples: int, batch: int, clip: float | None = None, momentum: float = 0.0
) -> tuple[dict[str, Tensor], list[float]]:
    """Plain PyTorch in one process: SGD with batch ``batch``, optional clipping."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    norms = []
    for x, y in DataLoader(data(samples), batch_size=batch):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, norms


def accelerator_loop(
    accumulation: int,
    clip: float | None = None,
    mixed_precision: str = "no",
    momentum: float = 0.0,
    strategy: Any = "fsdp",
) -> tuple[Accelerator, nn.Module, Any, list[float]]:
    accelerator = Accelerator(
        cpu=True,
        strategy=strategy,
        gradient_accumulation_steps=accumulation,
        mixed_precision=mixed_precision,
    )
    model = fresh()
    # The optimizer is built before prepare, over the unsharded parameters (Accelerate's way).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    model, optimizer, loader = accelerator.prepare(
        model, optimizer, DataLoader(data(), batch_size=BATCH)
    )
    norms = []
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            if accelerator.sync_gradients and clip is not None:
                norms.append(float(accelerator.clip_grad_norm_(model.parameters(), clip)))
            optimizer.step()
            optimizer.zero_grad()
    return accelerator, model, optimizer, norms


def run(out: Path) -> dict[str, Any]:
    rank = distributed.global_rank()
    results: dict[str, Any] = {}

    # 1. Plain loop, fp32, no accumulation: the weights of one process with batch N x B.
    accelerator, model, optimizer, _ = accelerator_loop(1, momentum=0.9)
    results["distributed_type"] = str(accelerator.distributed_type)
    results["pads_evaluation"] = accelerator.pads_evaluation
    results["param_types"] = sorted({type(p).__name__ for p in model.parameters()})
    results["sharded_blocks"] = [isinstance(b, FSDPModule) for b in model.blocks]
    results["root_sharded"] = isinstance(model, FSDPModule)
    full = accelerator.get_state_dict(model)
    saved = accelerator.save_model(model, out / "saved")
    optimizer_state = accelerator.strategy.full_optimizer_state_dict(model, optimizer)
    results["full_state_dict_empty_on_rank1"] = rank == 1 and not full
    if rank == 0:
        expected, _ = reference(fresh(), 64, BATCH * WORLD, momentum=0.9)
        results["plain_diff"] = max_diff(full, expected)
        loaded = load_file(str(saved))
        results["saved_diff"] = max_diff(loaded, expected)
        results["saved_keys"] = sorted(loaded)
        results["optimizer_state_keys"] = sorted(optimizer_state["state"])
        results["momentum_shapes_full"] = all(
            tuple(optimizer_state["state"][name]["momentum_buffer"].shape)
            == tuple(expected[name].shape)
            for name in optimizer_state["state"]
        )
    # Loading full weights back into the sharded module (rank 0's are broadcast).
    zeros = {k: torch.zeros_like(v) for k, v in full.items()} if rank == 0 else {}
    accelerator.strategy.load_full_state_dict(model, zeros)
    back = accelerator.get_state_dict(model)
    if rank == 0:
        results["loaded_zeros"] = all(bool((v == 0).all()) for v in back.values())

    # 2. Accumulation (2 batches of B per process) and clipping: batch 2 x N x B, the same
    # global norms.
    accelerator, model, _, norms = accelerator_loop(2, clip=0.5)
    full = accelerator.get_state_dict(model)
    if rank == 0:
        expected, expected_norms = reference(fresh(), 64, 2 * BATCH * WORLD, clip=0.5)
        results["accumulation_diff"] = max_diff(full, expected)
        results["norms"] = norms
        results["expected_norms"] = expected_norms
    results[f"norms_rank{rank}"] = norms

    # 3. The shard_modules=None rule, and an explicit list.
    accelerator = Accelerator(cpu=True, strategy=FSDPStrategy())
    torch.manual_seed(0)
    no_split = accelerator.prepare(NoSplit())
    results["no_split_sharded"] = {
        name: isinstance(module, FSDPModule)
        for name, module in no_split.named_modules()
        if name in ("", "first", "second", "heads.0", "heads.1", "embed")
    }
    accelerator = Accelerator(
        cpu=True, strategy=FSDPStrategy(shard_modules=["Linear"], reshard_after_forward=False)
    )
    explicit = accelerator.prepare(fresh())
    results["explicit_sharded"] = sorted(
        name for name, module in explicit.named_modules() if isinstance(module, FSDPModule)
    )
    x = torch.randn(3, 4)
    results["explicit_forward_shape"] = list(explicit(x).shape)

    # 4. bf16-mixed: weights gathered in bf16 inside the forward, trains close to fp32.
    accelerator, model, _, _ = accelerator_loop(1, mixed_precision="bf16")
    seen: list[str] = []
    handle = model.blocks[0].linear.register_forward_hook(
        lambda module, args, output: seen.append(str(module.weight.dtype))
    )
    model(torch.randn(2, 4, device=accelerator.device))
    handle.remove()
    full = accelerator.get_state_dict(model)
    results["bf16_weight_dtype_in_forward"] = seen
    if rank == 0:
        expected, _ = reference(fresh(), 64, BATCH * WORLD)
        results["bf16_diff"] = max_diff(full, expected)
        results["bf16_saved_dtypes"] = sorted({str(v.dtype) for v in full.values()})

    # 5. fp16 with the loss scaler: an inf in one process's gradient shard skips the step in
    # both (the first steps skip while the scale comes down from 2**16).
    accelerator = Accelerator(cpu=True, strategy="fsdp", mixed_precision="fp16")
    model = fresh()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    skipped = []
    generator = torch.Generator().manual_seed(rank)
    for step in range(6):
        x = torch.randn(BATCH, 4, generator=generator)
        loss = nn.functional.mse_loss(model(x), torch.zeros(BATCH, 1))
        accelerator.backward(loss)
        if step == 4 and rank == 1:  # only this process's shard of one gradient
            with torch.no_grad():
                model.embed.weight.grad.to_local().view(-1)[0] = float("inf")
        optimizer.step()
        optimizer.zero_grad()
        skipped.append(accelerator.optimizer_step_was_skipped)
    results[f"fp16_skipped_rank{rank}"] = skipped
    results[f"fp16_finite_rank{rank}"] = all(
        bool(p.to_local().isfinite().all()) for p in model.parameters()
    )

    # 6. The Trainer under strategy="fsdp": the same weights as one process with batch N x B;
    # validation padded (10 samples, batch 4 x 2 processes: a warning).
    class Module(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = fresh()

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self(x), y))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    module = Module()
    trainer = Trainer(
        max_epochs=1,
        strategy="fsdp",
        accelerator="cpu",
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out / "trainer"),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(
            module,
            DataLoader(data(), batch_size=BATCH),
            DataLoader(data(10), batch_size=BATCH),
        )
    results["trainer_warnings"] = [str(w.message) for w in caught if "FSDP" in str(w.message)]
    results["trainer_distributed_type"] = str(trainer.accelerator.distributed_type)
    results["trainer_val_loss"] = float(trainer.callback_metrics["val_loss"])
    full = trainer.accelerator.get_state_dict(module)
    # validate() after fit() on the same, already sharded module: the same sharded root
    # again (sharding it twice raised inside torch), the same weights, the same value.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        [again] = trainer.validate(module, DataLoader(data(10), batch_size=BATCH))
    results["trainer_validate_after_fit"] = again["val_loss"]
    if rank == 0:
        expected, _ = reference(fresh(), 64, 2 * BATCH * WORLD, clip=0.5)
        results["trainer_diff"] = max_diff(
            full, {f"net.{name}": value for name, value in expected.items()}
        )

    # 7. Checkpoints under FSDP: a fit interrupted at a step boundary mid-epoch and resumed
    # ends with the weights of the fit never interrupted; the checkpoint holds full weights.
    class Resumable(Module):
        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=0.01)

    class Crash(Callback):
        def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
            if trainer.state.total_batch_idx == 12:  # epoch 1, batch 4: a step boundary
                trainer.save_checkpoint(out / "fsdp_checkpoint")
                raise RuntimeError("crash")

    options: dict[str, Any] = {
        "max_epochs": 2,
        "strategy": "fsdp",
        "accelerator": "cpu",
        "accumulate_grad_batches": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
    }

    def shuffled() -> DataLoader:
        return DataLoader(data(), batch_size=BATCH, shuffle=True)

    torch.manual_seed(0)
    whole = Resumable()
    trainer = Trainer(**options)
    trainer.fit(whole, shuffled())
    whole_full = trainer.accelerator.get_state_dict(whole)
    torch.manual_seed(0)
    try:
        Trainer(callbacks=[Crash()], **options).fit(Resumable(), shuffled())
    except RuntimeError:
        pass
    torch.manual_seed(100 + rank)
    resumed = Resumable()
    trainer = Trainer(**options)
    trainer.fit(resumed, shuffled(), ckpt_path=out / "fsdp_checkpoint")
    resumed_full = trainer.accelerator.get_state_dict(resumed)
    if rank == 0:
        results["fsdp_resume_equal"] = sorted(whole_full) == sorted(resumed_full) and all(
            torch.equal(whole_full[name], resumed_full[name]) for name in whole_full
        )
        saved = load_file(str(out / "fsdp_checkpoint" / "model.safetensors"))
        results["fsdp_checkpoint_keys"] = sorted(saved)
        state = torch.load(out / "fsdp_checkpoint" / "state.pt", weights_only=True)
        results["fsdp_optimizer_format"] = state["optimizer_format"]
    return results


def main() -> None:
    out = Path(sys.argv[1])
    results = run(out)
    gathered = distributed.all_gather_object(results)
    if distributed.global_rank() == 0:
        merged: dict[str, Any] = {}
        for part in gathered:
            merged.update(part)
        (out / "results.json").write_text(json.dumps(merged, indent=1))
    # The sharded modules' states (reference cycles) hold the process group: collected after
    # it was destroyed, at interpreter exit, gloo aborts now and then ("terminate called
    # without an active exception"). Collect them first.
    distributed.destroy_process_group()  # gc, then leave together (bounded)


if __name__ == "__main__":
    main()
