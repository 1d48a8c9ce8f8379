"""ModelSummary: the table printed at fit start, and Trainer(enable_model_summary=...)."""

from __future__ import annotations

import io

import pytest

from ember import MisconfigurationError, Trainer
from ember.callbacks import ModelSummary
from ember.callbacks.model_summary import human_count, summarize
from tests.helpers import TinyModule, bare_trainer_kwargs, loader


def frozen_mlp() -> TinyModule:
    module = TinyModule(hidden=8)  # net = Linear(4, 8) -> Tanh -> Linear(8, 1): 40 + 9
    module.net[0].requires_grad_(False)
    return module


def test_summary_table_depths() -> None:
    shallow = summarize(frozen_mlp(), max_depth=1)
    lines = shallow.splitlines()
    assert lines[0].split() == ["|", "Name", "|", "Type", "|", "Params"]
    assert lines[2].split() == ["0", "|", "net", "|", "Sequential", "|", "49"]
    assert "net.0" not in shallow
    assert "9          Trainable params" in shallow
    assert "40         Non-trainable params" in shallow
    assert "49         Total params" in shallow
    assert f"{49 * 4 / 1e6:<10.3f} Total estimated model params size (MB)" in shallow
    deep = summarize(frozen_mlp(), max_depth=-1)
    assert [line.split()[2] for line in deep.splitlines()[2:6]] == [
        "net",
        "net.0",
        "net.1",
        "net.2",
    ]
    assert "net.2" in summarize(frozen_mlp(), max_depth=2)


def test_human_count() -> None:
    assert [human_count(n) for n in (999, 1500, 2_000_000, 7_100_000_000)] == [
        "999",
        "1.5 K",
        "2.0 M",
        "7.1 B",
    ]


def test_shared_parameters_count_once() -> None:
    module = TinyModule()
    module.tied = module.net  # the same layer twice
    assert "5          Total params" in summarize(module)


def test_trainer_prints_it_at_fit_start_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    kwargs = {**bare_trainer_kwargs(), "enable_model_summary": True}
    trainer = Trainer(max_steps=1, **kwargs)
    assert sum(isinstance(cb, ModelSummary) for cb in trainer.callbacks) == 1
    trainer.fit(TinyModule(), loader())
    out = capsys.readouterr().out
    assert "net  | Linear" in out and "Total params" in out
    trainer.validate(TinyModule(), loader())  # fit start only
    assert capsys.readouterr().out == ""


def test_given_one_is_kept_and_disabling_prints_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stream = io.StringIO()
    given = ModelSummary(max_depth=-1, stream=stream)
    trainer = Trainer(
        max_steps=1, callbacks=[given], **{**bare_trainer_kwargs(), "enable_model_summary": True}
    )
    assert [cb for cb in trainer.callbacks if isinstance(cb, ModelSummary)] == [given]
    trainer.fit(TinyModule(hidden=2), loader())
    assert "net.0" in stream.getvalue()
    Trainer(max_steps=1, **bare_trainer_kwargs()).fit(TinyModule(), loader())
    assert capsys.readouterr().out == ""


def test_bad_arguments() -> None:
    with pytest.raises(MisconfigurationError, match="enable_model_summary=False.*ModelSummary"):
        Trainer(callbacks=[ModelSummary()], **bare_trainer_kwargs())
    with pytest.raises(MisconfigurationError, match=r"max_depth=-2.*-1 for every layer"):
        ModelSummary(max_depth=-2)
    with pytest.raises(MisconfigurationError, match="`enable_model_summary='yes'`"):
        Trainer(**{**bare_trainer_kwargs(), "enable_model_summary": "yes"})


def test_max_depth_zero_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    kwargs = {**bare_trainer_kwargs(), "enable_model_summary": True}
    Trainer(max_steps=1, callbacks=[ModelSummary(max_depth=0)], **kwargs).fit(
        TinyModule(), loader()
    )
    assert capsys.readouterr().out == ""
