"""``ModelSummary``: a table of the module's layers and parameter counts at fit start."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

from torch import nn

from ember.errors import MisconfigurationError
from ember.hooks import Callback

if TYPE_CHECKING:
    from ember.module import TrainModule
    from ember.trainer.trainer import Trainer


class ModelSummary(Callback):
    """Prints, at fit start on global rank zero, a table of the module's layers down to
    ``max_depth`` (name, type, parameter count), then the trainable, frozen and total
    parameter counts and their size in MB.

    Args:
        max_depth: 1: the module's direct children; n: n levels of nesting; -1: every layer;
            0: no summary.
        stream: where to print (default: standard output).

    Examples:
        >>> import io
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> import ember
        >>> from ember.callbacks import ModelSummary
        >>> class Classifier(ember.TrainModule):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        ...         self.head = nn.Linear(8, 2)
        ...
        ...     def training_step(self, batch, batch_idx):
        ...         return nn.functional.cross_entropy(self.head(self.body(batch[0])), batch[1])
        ...
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.zeros(8).long()),
        ...                     batch_size=4)
        >>> text = io.StringIO()
        >>> trainer = ember.Trainer(max_steps=1, callbacks=[ModelSummary(stream=text)],
        ...                         logger=False, enable_checkpointing=False,
        ...                         enable_progress_bar=False)
        >>> trainer.fit(Classifier(), loader)
        >>> print(text.getvalue(), end="")
          | Name | Type       | Params
        ------------------------------
        0 | body | Sequential | 40
        1 | head | Linear     | 18
        58         Trainable params
        0          Non-trainable params
        58         Total params
        0.000      Total estimated model params size (MB)
    """

    def __init__(self, max_depth: int = 1, stream: TextIO | None = None) -> None:
        if not isinstance(max_depth, int) or isinstance(max_depth, bool) or max_depth < -1:
            raise MisconfigurationError(
                f"`ModelSummary(max_depth={max_depth!r})` is not supported: use an integer "
                ">= 0 (levels of layers shown; 0: no summary), or -1 for every layer."
            )
        self.max_depth = max_depth
        self.stream = stream

    def on_fit_start(self, trainer: Trainer, module: TrainModule) -> None:
        if self.max_depth == 0 or not trainer.is_global_zero:
            return
        print(summarize(module, self.max_depth), file=self.stream or sys.stdout, flush=True)


def summarize(module: nn.Module, max_depth: int = 1) -> str:
    """The summary table of ``module`` (``ModelSummary``'s text)."""
    rows = [("", "Name", "Type", "Params")]
    for index, (name, layer) in enumerate(_layers(module, max_depth)):
        count = sum(parameter.numel() for parameter in layer.parameters())
        rows.append((str(index), name, type(layer).__name__, human_count(count)))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = [
        " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "-" * max(len(line) for line in lines))
    parameters = list(module.parameters())  # each shared parameter once
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    frozen = sum(p.numel() for p in parameters if not p.requires_grad)
    size = sum(p.numel() * p.element_size() for p in parameters) / 1e6
    if len(rows) == 1:
        lines = []
    lines += [
        f"{human_count(trainable):<10} Trainable params",
        f"{human_count(frozen):<10} Non-trainable params",
        f"{human_count(trainable + frozen):<10} Total params",
        f"{size:<10.3f} Total estimated model params size (MB)",
    ]
    return "\n".join(line.rstrip() for line in lines)


def _layers(module: nn.Module, max_depth: int) -> list[tuple[str, nn.Module]]:
    layers = []
    for name, layer in module.named_modules():
        depth = name.count(".") + 1
        if name and (max_depth == -1 or depth <= max_depth):
            layers.append((name, layer))
    return layers


def human_count(count: int) -> str:
    """``count`` as Lightning writes it: 512, 1.5 K, 2.0 M, 7.1 B."""
    for size, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= size:
            return f"{count / size:.1f} {suffix}"
    return str(count)
