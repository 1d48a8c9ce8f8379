"""The two exceptions ember raises on purpose.

Both say what was given, what is accepted and what to do next, so a user can fix the call
without reading ember's source.
"""

from __future__ import annotations


class MisconfigurationError(ValueError):
    """A wrong argument or a misuse, raised before any work is lost.

    The message names the argument, what was given and what is accepted. It is a
    ``ValueError``, so code that catches those keeps working.

    Examples:
        >>> import ember
        >>> try:
        ...     ember.Trainer(precision="fp8")
        ... except ember.MisconfigurationError as error:
        ...     print("precision" in str(error), isinstance(error, ValueError))
        True True
    """


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or does not fit the module.

    Raised before anything is changed: the module, optimizers and loop state stay as they
    were. It is a ``RuntimeError``.

    Examples:
        >>> import ember
        >>> try:
        ...     ember.TrainModule.load_from_checkpoint("no/such/dir")
        ... except ember.CheckpointError as error:
        ...     print("no/such/dir" in str(error))
        True
    """


def not_available_yet(feature: str, instead: str) -> MisconfigurationError:
    """The error for a name of the contract whose capability has not landed yet."""
    return MisconfigurationError(
        f"{feature} is not available in this version of ember yet. {instead}"
    )


def one_of(argument: str, given: object, accepted: list[str] | tuple[str, ...]) -> str:
    """The standard message for an argument outside a fixed set of choices."""
    choices = ", ".join(repr(choice) for choice in accepted)
    return f"`{argument}={given!r}` is not supported. Accepted values: {choices}."
