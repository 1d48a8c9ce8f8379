"""A small GPT-style character model, trained with ember on the Python standard library.

The text is the standard library's own ``.py`` files (every Python install has them, so
nothing is downloaded). The model predicts the next character: causal self-attention,
pre-LayerNorm blocks, learned position embeddings and, by default, a head that shares the
embedding's weights. It trains with AdamW, linear warm-up then cosine decay, gradient
clipping, and reports the validation loss and perplexity.

Run it (about a minute on two CPU cores)::

    python examples/char_transformer.py
    python examples/char_transformer.py --max-steps 5000 --precision bf16-mixed
    tensorboard --logdir runs/char_transformer
    ember plot runs/char_transformer   # the curves as a PNG (PlotCurves also writes one)

The data and model pieces are importable without training; ``accelerator_loop.py`` trains
the same model with a hand-written loop on ``ember.Accelerator``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from ember import Trainer, TrainModule
from ember.callbacks import PlotCurves

# --- data ------------------------------------------------------------------------------------


def load_stdlib_text(max_chars: int = 1_000_000) -> str:
    """The standard library's top-level ``.py`` files, in sorted order, up to ``max_chars``.

    Only pure-ASCII files are kept, so the vocabulary stays at about 100 characters.
    """
    stdlib = Path(os.__file__).parent
    parts: list[str] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        source = path.read_bytes()
        if not source.isascii():
            continue
        parts.append(source.decode("ascii"))
        total += len(parts[-1])
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


class CharVocab:
    """Maps characters to integer ids and back."""

    def __init__(self, characters: str) -> None:
        self.characters = characters
        self.index = {character: i for i, character in enumerate(characters)}

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.characters)

    def encode(self, text: str) -> Tensor:
        return torch.tensor([self.index[character] for character in text], dtype=torch.long)

    def decode(self, ids: Tensor | list[int]) -> str:
        return "".join(self.characters[int(i)] for i in ids)


class Windows(Dataset[tuple[Tensor, Tensor]]):
    """Consecutive, non-overlapping windows of ``block_size`` ids, as ``(input, target)`` pairs
    where the target is the input shifted by one character."""

    def __init__(self, data: Tensor, block_size: int) -> None:
        self.data = data
        self.block_size = block_size

    def __len__(self) -> int:
        # Each window needs block_size + 1 ids: the last target is one past the input.
        return max(0, (len(self.data) - 1) // self.block_size)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} of {len(self)}")
        start = index * self.block_size
        chunk = self.data[start : start + self.block_size + 1]
        return chunk[:-1], chunk[1:]


# --- model -----------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.attention_norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.projection = nn.Linear(d_model, d_model)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        batch, length, d_model = x.shape
        # (batch, length, 3 * d_model) -> three (batch, heads, length, head_dim) tensors.
        qkv = self.qkv(self.attention_norm(x)).view(batch, length, 3, self.n_heads, -1)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.projection(attended.transpose(1, 2).reshape(batch, length, d_model))
        return x + self.mlp(self.mlp_norm(x))


class CharTransformer(nn.Module):
    """Token ids ``(batch, length)`` to next-character logits ``(batch, length, vocab)``."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 64,
        d_model: int = 96,
        n_layers: int = 2,
        n_heads: int = 4,
        dropout: float = 0.0,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(block_size, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, n_heads, dropout) for _ in range(n_layers)))
        self.final_norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init_weights)
        if tie_weights:  # fewer parameters; input and output share one character embedding
            self.head.weight = self.token_embedding.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Small weights give near-uniform predictions at first: a loss close to ln(vocab).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.token_embedding(ids) + self.position_embedding(positions)
        return self.head(self.final_norm(self.blocks(x)))


@torch.no_grad()
def generate(
    model: CharTransformer, prompt: Tensor, new_tokens: int, temperature: float = 0.8, seed: int = 0
) -> Tensor:
    """Extend ``prompt`` (1-D ids) by sampling; ``temperature=0`` picks the likeliest character."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = prompt.to(device)
    for _ in range(new_tokens):
        logits = model(ids[-model.block_size :].unsqueeze(0))[0, -1].float().cpu()
        if temperature == 0:
            next_id = logits.argmax().view(1)
        else:
            next_id = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator)
        ids = torch.cat([ids, next_id.to(device)])
    model.train(was_training)
    return ids.cpu()


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> LambdaLR:
    """Linear warm-up to the base learning rate, then cosine decay to a tenth of it."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW that decays matrices and embeddings but not biases or LayerNorm weights."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


# --- the TrainModule ------------------------------------------------------------------------


class CharLanguageModel(TrainModule):
    """Trains ``CharTransformer``; logs ``train_loss``, ``val_loss`` and ``val_ppl``.

    The model arguments go to ``CharTransformer``; ``lr`` is AdamW's peak learning rate,
    reached after ``warmup_steps`` and decayed along a cosine until ``max_steps``.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 64,
        d_model: int = 96,
        n_layers: int = 2,
        n_heads: int = 4,
        dropout: float = 0.0,
        tie_weights: bool = True,
        lr: float = 5e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 120,
        max_steps: int = 2400,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # in self.hparams, the loggers' hparams and checkpoints
        self.model = CharTransformer(
            vocab_size, block_size, d_model, n_layers, n_heads, dropout, tie_weights
        )
        self.val_totals = torch.zeros(2)  # summed loss over validation tokens, token count

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(ids)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        logits = self(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_totals = torch.zeros(2, device=self.device)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        logits = self(inputs)
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
        self.val_totals += torch.stack([loss_sum, loss_sum.new_tensor(targets.numel())])

    def on_validation_epoch_end(self) -> None:
        # Perplexity is exp of the mean loss per token over the whole validation set (every
        # process), not a mean of per-batch perplexities.
        loss_sum, tokens = self.trainer.accelerator.reduce(self.val_totals, "sum")
        val_loss = loss_sum / tokens
        self.log("val_loss", val_loss, prog_bar=True)
        self.log("val_ppl", torch.exp(val_loss))

    def configure_optimizers(self) -> dict[str, Any]:
        hparams = self.hparams
        optimizer = adamw(self, hparams.lr, hparams.weight_decay)
        scheduler = warmup_cosine(optimizer, hparams.warmup_steps, hparams.max_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


# --- command line ---------------------------------------------------------------------------


def batches_or_fraction(text: str) -> int | float:
    """``"100"`` -> 100 batches; ``"0.25"`` -> a quarter of the epoch."""
    return float(text) if "." in text else int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=2400, help="optimizer steps")
    parser.add_argument(
        "--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed, bf16-true"
    )
    parser.add_argument("--accelerator", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--accumulate-grad-batches", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument(
        "--val-check-interval",
        type=batches_or_fraction,
        default=1.0,
        help="validate every N training batches (int) or this fraction of an epoch (float)",
    )
    parser.add_argument("--max-chars", type=int, default=1_000_000, help="characters of text")
    parser.add_argument("--default-root-dir", default="runs/char_transformer")
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    trainer = Trainer(
        max_steps=args.max_steps,
        accelerator=args.accelerator,
        devices=args.devices,
        precision=args.precision,
        accumulate_grad_batches=args.accumulate_grad_batches,
        gradient_clip_val=1.0,
        val_check_interval=args.val_check_interval,
        log_every_n_steps=10,
        default_root_dir=args.default_root_dir,
        compile=args.compile,
        seed=args.seed,
        callbacks=[PlotCurves()],  # <log dir>/curves.png when fit ends
    )

    text = load_stdlib_text(args.max_chars)
    vocab = CharVocab.from_text(text)
    data = vocab.encode(text)
    split = int(0.9 * len(data))  # the first 90% trains, the last 10% validates
    train_set = Windows(data[:split], args.block_size)
    val_set = Windows(data[split:], args.block_size)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True)
    val_loader = DataLoader(val_set, batch_size=4 * args.batch_size)
    print(
        f"{len(text):,} characters of stdlib source; vocabulary of {len(vocab)}, so a uniform "
        f"guess scores ln({len(vocab)}) = {math.log(len(vocab)):.2f} nats per character"
    )

    module = CharLanguageModel(
        len(vocab),
        block_size=args.block_size,
        warmup_steps=max(1, args.max_steps // 20),
        max_steps=args.max_steps,
    )
    trainer.validate(module, val_loader)  # untrained: about ln(vocabulary size)
    trainer.fit(module, train_loader, val_loader)
    # max_steps usually stops mid-epoch, after the last scheduled validation: measure once more.
    final = trainer.validate(module, val_loader)[0]

    if trainer.is_global_zero:
        prompt = vocab.encode("def ")
        sample = vocab.decode(generate(module.model, prompt, new_tokens=300, seed=args.seed))
        print(f"\nsample:\n{sample}\n")
        print(f"final validation loss: {final['val_loss']:.4f} nats per character")
        print(f"final validation perplexity: {final['val_ppl']:.3f}")
        print(f"logs: {trainer.log_dir}")
        print(f"{trainer.global_step} steps in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
