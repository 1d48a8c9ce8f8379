"""A Hugging Face ``transformers`` model trained by the ember Trainer: is this line of Python
source part of a docstring, or code?

Nothing is downloaded. The text is the standard library's own source: every non-blank line
inside a docstring is labelled ``docstring``, every line of code ``code`` (comments are left
out), balanced and shuffled from a seed. A WordPiece tokenizer is trained on the training
lines with ``tokenizers``, and the model is a small BERT built from a config
(``AutoModelForSequenceClassification.from_config``), with random weights. The
``TrainModule`` passes the labels to the model and returns ``outputs.loss``, as one does with
any Hugging Face model; torchmetrics measures the accuracy.

Run it (about 30 s on two idle CPU cores; needs ``pip install 'ember[examples]'``)::

    python examples/hf_text_classification.py
    python examples/hf_text_classification.py --epochs 1 --samples 2000   # quick

The trained model and tokenizer are saved in the Hugging Face format under
``<root>/hf_model`` (``from_pretrained`` reads them back, offline).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule

# This example never needs the Hugging Face Hub: make any attempt fail instead of downloading.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
try:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForSequenceClassification, BertConfig
    from transformers.utils import logging as hf_logging
except ImportError as missing:
    sys.exit(
        f"hf_text_classification.py needs transformers and tokenizers ({missing}).\n"
        "Install them with: pip install 'ember[examples]'"
    )

LABELS = ("code", "docstring")
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]

# --- data ------------------------------------------------------------------------------------


def docstring_lines(tree: ast.Module) -> set[int]:
    """The line numbers (from 1) of every docstring of a module, class or function."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                end = body[0].end_lineno or body[0].lineno
                lines.update(range(body[0].lineno, end + 1))
    return lines


def labelled_lines(samples: int, seed: int = 0) -> list[tuple[str, int]]:
    """``samples`` stripped lines of stdlib source, half ``code`` (0), half ``docstring`` (1),
    shuffled; the same for a seed. Lines shorter than 12 characters (``'''``, ``else:``) and
    comments are left out."""
    stdlib = Path(os.__file__).parent
    found: list[list[str]] = [[], []]
    for path in sorted(stdlib.glob("*.py")):
        source = path.read_bytes()
        if not source.isascii():
            continue
        text = source.decode("ascii")
        try:
            in_docstring = docstring_lines(ast.parse(text))
        except SyntaxError:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if len(line.strip("\"'")) < 12 or line.startswith("#"):
                continue
            found[number in in_docstring].append(line)
        if min(len(found[0]), len(found[1])) >= samples:
            break
    half = samples // 2
    lines = [(line, 0) for line in found[0][:half]] + [(line, 1) for line in found[1][:half]]
    order = torch.randperm(len(lines), generator=torch.Generator().manual_seed(seed))
    return [lines[i] for i in order]


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> Tokenizer:
    """A WordPiece tokenizer trained on ``texts``: ``[CLS] tokens [SEP]``, padded and cut to
    ``max_length``."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), length=max_length)
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def encode(tokenizer: Tokenizer, lines: list[tuple[str, int]]) -> TensorDataset:
    """``(input_ids, attention_mask, labels)`` tensors for the lines."""
    encodings = tokenizer.encode_batch([text for text, _ in lines])
    input_ids = torch.tensor([e.ids for e in encodings])
    attention_mask = torch.tensor([e.attention_mask for e in encodings])
    labels = torch.tensor([label for _, label in lines])
    return TensorDataset(input_ids, attention_mask, labels)


# --- the TrainModule -------------------------------------------------------------------------


class LineClassifier(TrainModule):
    """A small BERT for sequence classification, with random weights, built from a config."""

    def __init__(
        self,
        vocab_size: int,
        max_length: int = 32,
        hidden_size: int = 64,
        layers: int = 2,
        heads: int = 2,
        lr: float = 1e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden_size,
            max_position_embeddings=max_length,
            num_labels=len(LABELS),
            id2label=dict(enumerate(LABELS)),
            label2id={label: i for i, label in enumerate(LABELS)},
            pad_token_id=SPECIAL.index("[PAD]"),
        )
        self.model = AutoModelForSequenceClassification.from_config(config)
        # Imported here, after the check for transformers above: torchmetrics' text metrics
        # import transformers when it is installed.
        from torchmetrics.classification import MulticlassAccuracy

        self.val_acc = MulticlassAccuracy(num_classes=len(LABELS))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        input_ids, attention_mask, labels = batch
        # Given labels, a Hugging Face model computes its own loss.
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        self.log("train_loss", outputs.loss, prog_bar=True)
        return outputs.loss

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        input_ids, attention_mask, labels = batch
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        self.log("val_loss", outputs.loss, sync_dist=True)
        self.val_acc(outputs.logits, labels)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)


# --- the script ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=12000, help="lines, train + validation")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=32, help="tokens per line")
    parser.add_argument("--vocab-size", type=int, default=2000, help="of the tokenizer")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--accelerator", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed")
    parser.add_argument("--root", default="runs/hf_text_classification")
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    hf_logging.disable_progress_bar()
    lines = labelled_lines(args.samples, seed=args.seed)
    split = int(0.9 * len(lines))
    train_lines, val_lines = lines[:split], lines[split:]
    tokenizer = train_tokenizer([text for text, _ in train_lines], args.vocab_size, args.max_length)
    train_loader = DataLoader(
        encode(tokenizer, train_lines), batch_size=args.batch_size, shuffle=True
    )
    val_loader = DataLoader(encode(tokenizer, val_lines), batch_size=4 * args.batch_size)
    print(
        f"{len(train_lines)} training and {len(val_lines)} validation lines of stdlib source, "
        f"half code, half docstring; a tokenizer of {tokenizer.get_vocab_size()} tokens"
    )

    module = LineClassifier(
        tokenizer.get_vocab_size(), args.max_length, args.hidden_size, args.layers, lr=args.lr
    )
    trainer = Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        precision=args.precision,
        gradient_clip_val=1.0,
        default_root_dir=args.root,
        log_every_n_steps=10,
        enable_progress_bar=False,
        seed=args.seed,
    )
    before = trainer.validate(module, val_loader)[0]
    trainer.fit(module, train_loader, val_loader)
    after = trainer.callback_metrics

    if trainer.is_global_zero:
        hf_dir = Path(args.root) / "hf_model"
        module.model.save_pretrained(hf_dir)
        tokenizer.save(str(hf_dir / "tokenizer.json"))
        module.eval()
        examples = [text for text, _ in val_lines[:6]]
        batch = encode(tokenizer, [(text, 0) for text in examples]).tensors
        with torch.no_grad():
            probabilities = module(batch[0].to(module.device), batch[1].to(module.device))
            probabilities = probabilities.float().softmax(-1).cpu()
        print("\npredictions on validation lines:")
        for text, p in zip(examples, probabilities, strict=True):
            label = int(p.argmax())
            print(f"  {LABELS[label]:>9} {float(p[label]):.2f}  {text[:60]}")
        print(
            f"\nvalidation accuracy: {before['val_acc']:.4f} untrained, {after['val_acc']:.4f} trained"
        )
        print(f"final validation loss: {after['val_loss']:.4f}")
        print(f"Hugging Face model and tokenizer: {hf_dir}")
        print(f"{trainer.global_step} steps in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
