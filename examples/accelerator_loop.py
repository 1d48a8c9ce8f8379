"""The character transformer of ``char_transformer.py``, trained by a hand-written loop.

No Trainer here: the loop is yours, and ``ember.Accelerator`` handles the device, mixed
precision, gradient accumulation and clipping, in the style of the Hugging Face Accelerate
tutorials. The data, model, optimizer and schedule are imported from ``char_transformer.py``.

Run it (about half a minute on two CPU cores)::

    python examples/accelerator_loop.py
    python examples/accelerator_loop.py --mixed-precision bf16 --gradient-accumulation-steps 2
    EMBER_MIXED_PRECISION=bf16 python examples/accelerator_loop.py   # or set it with `ember config`
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from char_transformer import (
    CharTransformer,
    CharVocab,
    Windows,
    adamw,
    generate,
    load_stdlib_text,
    warmup_cosine,
)
from torch import nn
from torch.utils.data import DataLoader

from ember import Accelerator, seed_everything


def evaluate(accelerator: Accelerator, model: nn.Module, loader: DataLoader) -> float:
    """The mean loss per character over the whole validation set (every process)."""
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device)
    count = 0
    with torch.no_grad():
        for inputs, targets in loader:
            with accelerator.autocast():
                logits = model(inputs)
            losses = F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), reduction="none"
            )
            # One row per window: gather_for_metrics drops the windows that a distributed
            # loader repeated to even out its last batch, so none is counted twice.
            losses = accelerator.gather_for_metrics(losses.view(len(targets), -1))
            loss_sum += losses.sum()
            count += losses.numel()
    model.train()
    return loss_sum.item() / count


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    parser.add_argument(
        "--mixed-precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="default: EMBER_MIXED_PRECISION, then the `ember config` file, then 'no'",
    )
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=250, help="optimizer steps")
    parser.add_argument("--max-chars", type=int, default=1_000_000, help="characters of text")
    parser.add_argument("--output-dir", default="runs/accelerator_loop")
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        cpu=args.cpu,
    )
    seed_everything(args.seed)

    text = load_stdlib_text(args.max_chars)
    vocab = CharVocab.from_text(text)
    data = vocab.encode(text)
    split = int(0.9 * len(data))
    train_set = Windows(data[:split], args.block_size)
    val_set = Windows(data[split:], args.block_size)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True)
    val_loader = DataLoader(val_set, batch_size=4 * args.batch_size)

    model = CharTransformer(len(vocab), block_size=args.block_size)
    optimizer = adamw(model, lr=5e-3, weight_decay=0.1)
    # The prepared scheduler advances num_processes times per optimizer step (Accelerate's
    # convention), so the schedule is sized in optimizer steps times the process count.
    n = accelerator.num_processes
    scheduler = warmup_cosine(optimizer, max(1, args.max_steps // 20) * n, args.max_steps * n)
    # Modules are placed (and cast), loaders deliver batches on the device, the optimizer
    # and scheduler step only at the end of each accumulation window.
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler
    )
    accelerator.print(
        f"{len(text):,} characters, vocabulary of {len(vocab)}, device {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision!r}"
    )

    val_loss = evaluate(accelerator, model, val_loader)
    accelerator.print(
        f"step 0: val_loss {val_loss:.3f} (a uniform guess: {math.log(len(vocab)):.3f})"
    )
    step = 0
    model.train()
    while step < args.max_steps:
        for inputs, targets in train_loader:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    logits = model(inputs)
                    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
                accelerator.backward(loss)  # divided by the window's size for you
                if accelerator.sync_gradients:  # the whole window's gradient, once per step
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            if step % args.eval_every == 0 or step == args.max_steps:
                val_loss = evaluate(accelerator, model, val_loader)
                accelerator.print(
                    f"step {step}: train_loss {loss.item():.3f}, val_loss {val_loss:.3f}, "
                    f"lr {scheduler.get_last_lr()[0]:.2e}"
                )
            if step == args.max_steps:
                break

    path = accelerator.save_model(model, args.output_dir)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        assert isinstance(unwrapped, CharTransformer)
        ids = generate(unwrapped, vocab.encode("def "), new_tokens=300, seed=args.seed)
        sample = vocab.decode(ids)
        print(f"\nsample:\n{sample}\n")
        print(f"final validation perplexity: {math.exp(val_loss):.3f}")
        print(f"weights: {path}")
        print(f"{step} steps in {time.perf_counter() - started:.1f} s")
    accelerator.end_training()


if __name__ == "__main__":
    main()
