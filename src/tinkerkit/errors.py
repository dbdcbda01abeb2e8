"""The error hierarchy of tinkerkit, and the wording its messages share (:func:`plural`).

Every error a user can cause is a :class:`TinkerkitError`; the CLI prints its message on one line
and exits non-zero, with no traceback. Messages name the file, the line and the field (or the config
key and value) and, where one exists, the fix. Categories also subclass the matching builtin so that
library callers can catch ``ValueError``/``RuntimeError`` as usual (after tinker-cookbook's
``exceptions.py``).
"""

from __future__ import annotations

import re


def plural(count: int, noun: str) -> str:
    """``"1 step"``, ``"2 steps"``: a count and its noun for messages (English ``-s`` plural).

    Example::

        plural(1, "step") == "1 step"; plural(0, "example") == "0 examples"
    """
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class TinkerkitError(Exception):
    """Base class of every error tinkerkit reports to a user."""


class ConfigError(TinkerkitError, ValueError):
    """An invalid config file, config key, config value or command-line argument."""


class DataError(TinkerkitError, ValueError):
    """A data file or record that cannot be read or normalized.

    Attributes:
        path: The file, when known.
        line: The 1-based line (JSON Lines) or record index (JSON arrays), when known.
        field: The record field at fault, when known.
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.path, self.line, self.field = path, line, field
        where = ""
        if path is not None:
            where = f"{path}:{line}" if line is not None else str(path)
            where += f": field '{field}'" if field else ""
            where += ": "
        elif field:
            where = f"field '{field}': "
        super().__init__(where + message)
        self.reason = message


class ModelError(TinkerkitError, ValueError):
    """A model name, directory or tokenizer that cannot be resolved or loaded."""


class EngineError(TinkerkitError, RuntimeError):
    """A training or sampling engine failure (bad request, incompatible checkpoint, ...)."""


class NonFiniteGradientError(EngineError):
    """An optimizer step refused because the gradient norm is NaN or infinite (the step was
    skipped and the gradients dropped): the training diverged.

    The message starts with :func:`non_finite_gradient_message`'s text, which
    ``tinkerkit serve`` passes on to the SDK unchanged, so the Tinker engine recognizes it
    (:data:`NON_FINITE_GRADIENT`).
    """


NON_FINITE_GRADIENT = re.compile(r"gradient norm is (?:nan|-?inf) at step \d+; step skipped")
"""What :func:`non_finite_gradient_message` writes, as it arrives inside another message."""


def non_finite_gradient_message(norm: float, step: int) -> str:
    """The message of a :class:`NonFiniteGradientError` (``norm`` is ``nan``, ``inf``, ...)."""
    return f"gradient norm is {norm} at step {step}; step skipped"


class CheckpointError(EngineError):
    """A checkpoint that is missing, incomplete, corrupted or from another base model or rank."""


class TrainingDivergedError(TinkerkitError, RuntimeError):
    """The training loss or gradient norm became NaN or infinite; the run was stopped.

    The message names the step, the non-finite number and the last good checkpoint, which stays
    the latest listed in the run's ``checkpoints.jsonl`` (nothing of the diverged step is saved).
    """


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training steps; the message says where the run can resume from. A
    ``KeyboardInterrupt``, so that whatever stops on Ctrl-C stops on it too."""


class ExportError(TinkerkitError, RuntimeError):
    """An export or merge that cannot be completed (including non-finite weights)."""


class RequestError(TinkerkitError, ValueError):
    """A request that ``tinkerkit serve`` refuses; ``status`` is the HTTP status it answers with.

    400 malformed or invalid request, 401 missing or unknown API key, 404 unknown session,
    model, checkpoint or future (or one that belongs to another API key), 410 finished session,
    413 body too large.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    @classmethod
    def invalid(cls, what: str, error) -> RequestError:
        """A 400 naming the first invalid field of ``error``, a pydantic ``ValidationError``
        raised while validating ``what`` (a request type's name)."""
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        return cls(400, f"{what}: {where}: {first['msg']}")


class TrackerError(TinkerkitError, RuntimeError):
    """An experiment tracker (``REPORT_TO``) that failed to start its run or to record a value;
    the message names the tracker. The trackers already opened are closed as failed."""
