"""The two exceptions ember raises on purpose.

Both say what was given, what is accepted and what to do next, so a user can fix the call
without reading ember's source.
"""

from __future__ import annotations


class MisconfigurationError(ValueError):
    """A wrong argument or a misuse, raised before any work is lost."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or does not fit the module."""


def not_available_yet(feature: str, instead: str) -> MisconfigurationError:
    """The error for a name of the contract whose capability has not landed yet."""
    return MisconfigurationError(
        f"{feature} is not available in this version of ember yet. {instead}"
    )


def one_of(argument: str, given: object, accepted: list[str] | tuple[str, ...]) -> str:
    """The standard message for an argument outside a fixed set of choices."""
    choices = ", ".join(repr(choice) for choice in accepted)
    return f"`{argument}={given!r}` is not supported. Accepted values: {choices}."
