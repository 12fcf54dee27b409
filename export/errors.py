"""The export stage's user errors: each is one line that says what to do (the CLI prints it and exits).

A parity failure is not a typing mistake but a result the user acts on (another precision, another target), so it
exits 1 instead of 2: scripts can tell "the command was wrong" from "the model did not survive the export".
"""

from __future__ import annotations

from sdloop.errors import UserError


class ExportError(UserError):
    """An export cannot be made: a bad option, a folder sdloop does not own, a graph that does not check."""


class TargetUnavailableError(ExportError):
    """The target (cuda, tensorrt) needs something this machine lacks; the message names it."""


class ParityError(ExportError):
    """The exported pipeline's images differ from the fused PyTorch pipeline's beyond the precision's tolerance."""

    exit_code = 1


class FuseError(ExportError):
    """Fusing the LoRA left LoRA layers behind or changed the images."""


class RegistryError(UserError):
    """A model-store operation cannot be done: unknown tag, nothing to roll back to, not an export folder."""
