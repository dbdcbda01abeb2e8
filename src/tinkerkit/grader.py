"""Your own grading functions: a ``GRADER`` file that replaces any of the built-in graders.

A grader file is plain Python that defines any of these functions (the names of
:mod:`tinkerkit.grading`'s built-ins, plus ``score``):

- ``extract_final_answer(text) -> str | None``: the final answer of an output (None: no answer);
- ``check_answer_exact_match(pred, ref) -> bool``: the extracted answer ``pred`` (a str) vs the
  reference;
- ``check_answer_contains(output, ref) -> bool``: the whole output vs the reference;
- ``check_answer_equivalent(pred, ref) -> bool``: replaces math-verify's equivalence check;
- ``score(output, example) -> float``: a graded verdict in [0, 1]: ``mean_score`` in eval, the
  reward of RL (:meth:`Grader.reward`).

What the file does not define stays built in, and the built-ins are importable from it, so it can
wrap them (``from tinkerkit.grading import extract_final_answer as builtin_extract``).

How the functions combine into one :class:`~tinkerkit.grading.Grade`, per output:

1. ``extracted = extract_final_answer(output)``: yours or the built-in; it feeds both comparisons
   below, so a custom extractor changes exact match and equivalence alike.
2. ``exact_match = check_answer_exact_match(extracted, reference)``; no answer (None) is never a
   match and the check is not called.
3. ``contains = check_answer_contains(output, reference)`` (the whole output, not the extract).
4. ``equivalent = exact_match or check_answer_equivalent(extracted, reference)``; the built-in
   equivalence is math-verify on the extracted answer, run in this process with its own time limit
   (:func:`tinkerkit.grading.equivalence`). So a custom exact match that accepts more (``"(c)"``
   for ``"C"``) also raises equivalence; define ``check_answer_equivalent`` to replace math-verify
   (say, for answers that are not math, where it could read letters as symbols).
5. ``score = score(output, example)`` when defined; ``example`` is :func:`grading_example`'s dict
   (``messages``, ``question``, ``reference_answer``, ``source``).

An output whose example has no reference answer is only extracted (no verdict, no score).

Isolation. The file's functions run in one worker process (``python -c``, the file loaded there by
path with :func:`importlib.util.spec_from_file_location`), which this process talks to in JSON
lines and waits on with a per-output deadline, ``GRADER_TIMEOUT_SECONDS``. A hung Python function
cannot be stopped inside a process (a thread cannot be killed, ``signal.alarm`` works only in the
main thread and not during C code), but a process can: an output that overruns its deadline is a
grading error, the worker is killed and the next output starts a fresh one. The same worker also
turns any exception or wrong return type into a grading error for that output, so a broken grader
never stops the run. Nothing is pickled: requests and replies are JSON.

Loading checks the file before any sampling: a syntax error, a failed import, a name that is not a
function, a coroutine, or a signature that cannot take the arguments the function is called with
(:func:`inspect.signature`) is a one-line :class:`~tinkerkit.errors.ConfigError` naming the file
and the function.

Example::

    with GraderConfig("my_grading.py").build() as grader:
        verdict = grader.grade("The answer is (C).", "C")
        verdict.equivalent, grader.reward("The answer is (C).", "C")
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import inspect
import json
import math
import numbers
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinkerkit import grading
from tinkerkit.config import TrainConfig
from tinkerkit.data.conversation import Conversation
from tinkerkit.errors import ConfigError
from tinkerkit.grading import Grade

__all__ = [
    "GRADER_FUNCTIONS",
    "Grader",
    "GraderConfig",
    "grading_example",
]

GRADER_FUNCTIONS: dict[str, tuple[str, ...]] = {
    "extract_final_answer": ("text",),
    "check_answer_exact_match": ("pred", "ref"),
    "check_answer_contains": ("output", "ref"),
    "check_answer_equivalent": ("pred", "ref"),
    "score": ("output", "example"),
}
"""The functions a grader file may define, with the arguments each is called with."""

_RETURNS = {"extract_final_answer": "a str or None", "check_answer_exact_match": "a bool",
            "check_answer_contains": "a bool", "check_answer_equivalent": "a bool",
            "score": "a number in [0, 1]"}
_BUILTINS: dict[str, Callable] = {
    "extract_final_answer": grading.extract_final_answer,
    "check_answer_exact_match": grading.check_answer_exact_match,
    "check_answer_contains": grading.check_answer_contains,
}
DEFAULT_TIMEOUT_SECONDS: float = TrainConfig.model_fields["grader_timeout_seconds"].default
"""``GRADER_TIMEOUT_SECONDS``'s default."""
EQUIVALENCE_TIMEOUT_SECONDS = 5.0
"""The built-in (math-verify) equivalence check's time limit, as :func:`grading.grade`'s."""
_MODULE_NAME = "_tinkerkit_grader"  # never a name the file could shadow (json, grading, ...)
_WORKER_CODE = "import sys; from tinkerkit.grader import _serve; _serve(sys.argv[1], sys.argv[2])"
_WORKER_START_SECONDS = 120.0  # the file's own imports (torch, ...) on a loaded machine
_MESSAGE_CHARS = 300


def grading_example(conversation: Conversation) -> dict:
    """The ``example`` argument of a grader's ``score(output, example)``: JSON data only.

    Args:
        conversation: The evaluated conversation.

    Returns:
        ``{"messages": [{"role", "content", "thinking"?}, ...] (every message, the reference
        solution included when the record has one), "question": the last prompt message's text,
        "reference_answer": str or None, "source": "path:line" or None}``.
    """
    return {"messages": [m.model_dump(exclude_none=True) for m in conversation.messages],
            "question": conversation.prompt_messages()[-1].content,
            "reference_answer": conversation.reference_answer, "source": conversation.source}


# ---------------------------------------------------------------------------------------------
# The worker process: loads the file, checks it, runs its functions
# ---------------------------------------------------------------------------------------------


class _GradingError(Exception):
    """One output could not be graded (raised and caught inside the worker)."""


def _one_line(text: object) -> str:
    try:
        text = " ".join(str(text).split())
    except Exception:  # an exception whose __str__ itself fails
        text = f"<{type(text).__name__} that cannot be shown>"
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS] + " …"


def _line_in(error: BaseException, path: Path) -> str:
    """`` (line N)`` of the innermost traceback frame in the grader file, or ``""``."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename) == path]
    return f" (line {frames[-1].lineno})" if frames else ""


def _signature_problem(name: str, function: Callable) -> str | None:
    """Why ``function`` cannot be called as the grader calls ``name``, or None."""
    expected = GRADER_FUNCTIONS[name]
    call = f"{name}({', '.join(expected)})"
    if inspect.iscoroutinefunction(function):
        return f"{name} is async; it must be a plain function: def {call}"
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: its calls will tell
        return None
    kinds = inspect.Parameter
    parameters = list(signature.parameters.values())
    positional = [p for p in parameters if p.kind in (kinds.POSITIONAL_ONLY,
                                                      kinds.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is kinds.empty]
    varargs = any(p.kind == kinds.VAR_POSITIONAL for p in parameters)
    keyword_only = [p.name for p in parameters
                    if p.kind == kinds.KEYWORD_ONLY and p.default is kinds.empty]
    if keyword_only:
        return (f"{name}{signature} has required keyword-only arguments "
                f"({', '.join(keyword_only)}); it is called as {call}")
    if len(required) > len(expected) or (len(positional) < len(expected) and not varargs):
        too_many = len(required) > len(expected)
        count = len(required) if too_many else len(positional)
        takes = f"{count} required" if too_many else f"at most {count}"
        return (f"{name}{signature} takes {takes} positional argument{'s' * (count != 1)}; "
                f"it is called with {len(expected)}: {call}")
    return None


def _load_functions(path: Path, sha256: str) -> dict[str, Callable]:
    """Load the grader file and check what it defines (runs in the worker).

    Raises:
        ConfigError: The file changed since it was hashed, does not load, defines none of
            :data:`GRADER_FUNCTIONS`, or defines one that cannot be called as the grader calls it.
    """
    source = path.read_bytes()
    if hashlib.sha256(source).hexdigest() != sha256:
        raise ConfigError("the file changed since the run started (sha256 differs); restart "
                          "the run to grade with the new version")
    sys.path.insert(0, str(path.parent))  # so that it can import its own helper modules
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module  # dataclasses and the like look their module up
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"line {e.lineno}: {_one_line(e.msg)} (SyntaxError)") from None
    except (Exception, SystemExit) as e:
        raise ConfigError(f"could not be loaded: {type(e).__name__}: {_one_line(e)}"
                          f"{_line_in(e, path)}") from None
    functions, problems = {}, []
    for name in GRADER_FUNCTIONS:
        if not hasattr(module, name):
            continue
        function = getattr(module, name)
        if not callable(function):
            problems.append(f"{name} is {type(function).__name__}, not a function: "
                            f"def {name}({', '.join(GRADER_FUNCTIONS[name])})")
        elif problem := _signature_problem(name, function):
            problems.append(problem)
        else:
            functions[name] = function
    if problems:
        raise ConfigError("; ".join(problems))
    if not functions:
        defined = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                   and getattr(v, "__module__", None) == _MODULE_NAME]
        close = {c for n in defined for c in difflib.get_close_matches(n, GRADER_FUNCTIONS, 1)}
        hint = f"; did you mean {', '.join(sorted(close))}?" if close else ""
        raise ConfigError(f"defines none of {', '.join(GRADER_FUNCTIONS)}{hint}")
    return functions


def _checked(name: str, value: Any) -> Any:
    """``value`` as the grader needs it, or a :class:`_GradingError` naming the wrong type."""
    if name == "extract_final_answer":
        if value is None:
            return value
        if isinstance(value, str):
            try:
                value.encode("utf-8")
                return value
            except UnicodeEncodeError:  # a lone surrogate: no file could hold the results
                raise _GradingError(f"{name} returned a str that is not valid Unicode "
                                    f"({_one_line(ascii(value))[:80]})") from None
    elif name == "score":
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            number = float(value)
            if math.isfinite(number) and 0.0 <= number <= 1.0:
                return number
    elif isinstance(value, bool) or type(value).__name__ in ("bool_", "bool"):  # numpy's too
        return bool(value)
    shown = _one_line(repr(value))[:80]
    raise _GradingError(f"{name} returned {type(value).__name__} {shown}; it must return "
                        f"{_RETURNS[name]}")


def _grade_request(functions: dict[str, Callable], request: dict, path: Path,
                   announce: Callable[[dict], None]) -> dict:
    """The verdicts of one output, or ``{"error": message}`` (runs in the worker)."""
    def call(name: str, *args: Any) -> Any:
        if name not in functions:
            return _BUILTINS[name](*args)
        announce({"calling": name})  # so that a timeout names the function that hung
        try:
            value = functions[name](*args)
        except (Exception, SystemExit, KeyboardInterrupt) as e:
            raise _GradingError(f"{name} raised {type(e).__name__}: {_one_line(e)}"
                                f"{_line_in(e, path)}") from None
        return _checked(name, value)

    output, reference = request["output"], request["reference"]
    try:
        extracted = call("extract_final_answer", output)
        result: dict[str, Any] = {"extracted": extracted}
        if reference is None:
            return result
        result["exact_match"] = extracted is not None and call("check_answer_exact_match",
                                                               extracted, reference)
        result["contains"] = call("check_answer_contains", output, reference)
        if "check_answer_equivalent" in functions:
            result["equivalent"] = result["exact_match"] or (
                extracted is not None and call("check_answer_equivalent", extracted, reference))
        if "score" in functions:
            result["score"] = call("score", output, request["example"])
        return result
    except _GradingError as e:
        return {"error": f"{path.name}: {e}"}


def _serve(path: str, sha256: str) -> None:
    """The worker's main loop: load the file, then one JSON request per stdin line.

    Replies, one JSON object per line: ``{"ready": [names]}`` or ``{"error": message}`` once;
    then per request any number of ``{"calling": name}`` and one ``{"result": ...}``. Whatever
    else writes to ``sys.stdout`` (the file's prints) goes to stderr instead.
    """
    # Replies travel on a descriptor of their own (not inherited by the file's subprocesses),
    # and descriptor 1 becomes stderr: whatever the file writes there (print, os.write(1, ...),
    # os.system, a subprocess, sys.__stdout__) cannot corrupt a reply, nor closing it end them.
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(message: dict) -> None:
        print(json.dumps(message), file=replies, flush=True)

    try:
        functions = _load_functions(Path(path), sha256)
    except ConfigError as e:
        reply({"error": str(e)})
        return
    reply({"ready": sorted(functions)})
    for line in sys.stdin:
        reply({"result": _grade_request(functions, json.loads(line), Path(path), reply)})


# ---------------------------------------------------------------------------------------------
# This side: the worker process, and the Grader
# ---------------------------------------------------------------------------------------------


def _kill(holder: list) -> None:
    """Kill the worker held in ``holder[0]``, if any (also run at exit by ``weakref.finalize``)."""
    process = holder[0]
    holder[0] = None
    if process is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the worker and whatever it started
        process.wait()
        process.stdin.close()
        process.stdout.close()


class _Worker:
    """One ``python -c _WORKER_CODE`` process serving a grader file; reads with deadlines.

    Replies are read from the raw pipe into a buffer (``select`` then ``os.read``), so that a
    reply already read ahead is never waited for again. Waiting uses ``select`` (POSIX).
    """

    def __init__(self, path: Path, sha256: str) -> None:
        package_root = str(Path(__file__).resolve().parents[1])  # the worker imports this copy
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [package_root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        # A session of its own: Ctrl-C in the terminal reaches only this process (which kills
        # the worker), and killing the worker's process group also ends what the file started.
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE, str(path), sha256], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, bufsize=0, env=env, start_new_session=True)
        self._buffer = b""

    def send(self, message: dict) -> bool:
        """Write one request; False when the worker has died."""
        try:
            self.process.stdin.write(json.dumps(message).encode() + b"\n")
            return True
        except (BrokenPipeError, OSError):
            return False

    def receive(self, deadline: float) -> dict | None:
        """The next reply, or None when none is complete by ``deadline`` (monotonic).

        Raises:
            EOFError: The worker closed its end (it exited).
        """
        while b"\n" not in self._buffer:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([self.process.stdout], [], [], wait)[0]:
                return None
            chunk = os.read(self.process.stdout.fileno(), 1 << 16)
            if not chunk:
                raise EOFError
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:  # not a reply: treat the worker as gone
            raise EOFError from None


class Grader:
    """Grades outputs with the built-in functions, or with those of a grader file.

    Build it with :meth:`GraderConfig.build` (or directly); close it (or use it as a context
    manager) to stop the worker process of a grader file. Safe to call from several threads
    (calls are serialized).

    Attributes:
        path: The grader file, resolved; None for the built-in grader.
        sha256: The file's SHA-256 (hex) when it was loaded; None for the built-in grader.
        defines: The functions the file defines (sorted); empty for the built-in grader.
        timeout_seconds: Time limit of the file's functions on one output.

    Example::

        grader = Grader("examples/multiple_choice_grader.py")
        grader.grade("**C**", "C").equivalent  # True
        grader.reward("**C**", "C")            # 1.0
        grader.close()
    """

    def __init__(self, path: str | Path | None = None,
                 timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        """Load the grader file (in its worker process) and check it.

        Args:
            path: The grader file; None grades with the built-ins only (no worker).
            timeout_seconds: Time limit of the file's functions on one output, in seconds.

        Raises:
            ConfigError: ``timeout_seconds`` is not positive; the file is missing or not a
                ``.py`` file, does not load (syntax error, failed import, an exception), defines
                none of :data:`GRADER_FUNCTIONS`, or defines one with a signature it cannot be
                called with. The message names the file (as ``GRADER``) and the function.
        """
        if not timeout_seconds > 0:
            raise ConfigError(f"GRADER_TIMEOUT_SECONDS={timeout_seconds!r}: must be positive")
        self.timeout_seconds = float(timeout_seconds)
        self.path: Path | None = None
        self.sha256: str | None = None
        self.defines: tuple[str, ...] = ()
        self._lock = threading.Lock()
        self._holder: list = [None]  # the worker's process, for _kill
        self._worker: _Worker | None = None
        self._broken: str | None = None  # why a restarted worker could not load the file
        self._finalizer = weakref.finalize(self, _kill, self._holder)
        if path is None:
            return
        self._given = str(path)
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_file():
            raise ConfigError(f"GRADER {path}: file not found")
        if self.path.suffix != ".py":
            raise ConfigError(f"GRADER {path}: must be a Python file (.py)")
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.defines = tuple(self._start())

    # -- the worker ------------------------------------------------------------------------

    def _start(self) -> list[str]:
        """Start a worker and wait until it has loaded the file; returns what the file defines.

        Raises:
            ConfigError: The file does not load or check (the worker's message).
        """
        worker = _Worker(self.path, self.sha256)
        self._worker, self._holder[0] = worker, worker.process
        try:
            reply = worker.receive(time.monotonic() + _WORKER_START_SECONDS)
        except EOFError:
            _kill(self._holder)
            reply = {"error": f"the worker process exited (code {worker.process.returncode}) "
                              "while loading it (its errors are on stderr above)"}
        if reply is None or "ready" not in reply:
            _kill(self._holder)
            self._worker = None
            reason = reply["error"] if reply else (
                f"the worker process did not load it within {_WORKER_START_SECONDS:.0f} s "
                "(its errors, if any, are on stderr above)")
            raise ConfigError(f"GRADER {self._given}: {reason}")
        return reply["ready"]

    def _stop(self) -> None:
        _kill(self._holder)
        self._worker = None

    def close(self) -> None:
        """Stop the worker process (a later :meth:`grade` starts a new one)."""
        with self._lock:
            self._stop()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, request: dict) -> dict:
        """The worker's result for one output, or ``{"error": ...}`` (a hang, a dead worker)."""
        with self._lock:
            if self._broken is None and self._worker is None:
                try:
                    self._start()
                except ConfigError as e:  # the file changed or broke during the run
                    self._broken = str(e)
            if self._broken is not None:
                return {"error": self._broken}
            worker = self._worker
            deadline = time.monotonic() + self.timeout_seconds
            calling = "the grader"
            try:
                if not worker.send(request):
                    raise EOFError
                reply = worker.receive(deadline)
                while reply is not None and "calling" in reply:
                    calling = reply["calling"]
                    reply = worker.receive(deadline)
            except EOFError:  # it died: os._exit, a crash in C code, killed from outside
                self._stop()  # kills what is left of it, then waits
                exit_code = worker.process.returncode
                return {"error": f"{self.path.name}: the grader's process exited (code "
                                 f"{exit_code}) in {calling}"}
            if reply is not None:
                return reply["result"]
            self._stop()
            return {"error": f"{self.path.name}: {calling} did not return within "
                             f"{self.timeout_seconds:g} s (GRADER_TIMEOUT_SECONDS); stopped"}

    # -- grading ---------------------------------------------------------------------------

    def grade(self, output: str, reference: str | None, example: dict | None = None) -> Grade:
        """Extract the final answer of ``output`` and judge it against ``reference``.

        With no grader file this is :func:`tinkerkit.grading.grade`. With one, its functions
        replace the built-ins as the module docstring says; an exception, a wrong return type
        or a hang in them makes the output a grading error (:attr:`Grade.error`, every verdict
        False) instead of stopping the caller.

        Args:
            output: The generated text.
            reference: The reference answer; None: extraction only, every verdict None.
            example: What ``score(output, example)`` receives (:func:`grading_example`).

        Returns:
            The :class:`~tinkerkit.grading.Grade`.
        """
        if self.path is None:
            return grading.grade(output, reference, EQUIVALENCE_TIMEOUT_SECONDS)
        result = self._run({"output": output, "reference": reference, "example": example})
        verdict = None if reference is None else False
        if "error" in result:
            return Grade(extracted=None, exact_match=verdict, contains=verdict,
                         equivalent=verdict, no_answer=False, error=result["error"])
        extracted = result["extracted"]
        if reference is None:
            return Grade(extracted, None, None, None, no_answer=extracted is None)
        equivalent, timed_out = result.get("equivalent"), False
        if equivalent is None:  # the built-in: exact match, or math-verify on the extract
            equivalent = result["exact_match"]
            if not equivalent and extracted is not None:
                equivalent, timed_out = grading.equivalence(extracted, reference,
                                                            EQUIVALENCE_TIMEOUT_SECONDS)
        return Grade(extracted=extracted, exact_match=result["exact_match"],
                     contains=result["contains"], equivalent=equivalent,
                     no_answer=extracted is None, timed_out=timed_out, score=result.get("score"))

    @property
    def scores(self) -> bool:
        """Whether the grader file defines ``score`` (then :attr:`Grade.score` is set)."""
        return "score" in self.defines

    def reward_of(self, verdict: Grade) -> float:
        """The reward of a graded output: its score when the file defines one, else 1.0 when
        it is equivalent to the reference and 0.0 otherwise (a grading error is 0.0)."""
        if verdict.error is not None:
            return 0.0
        if self.scores:
            return verdict.score if verdict.score is not None else 0.0
        return 1.0 if verdict.equivalent else 0.0

    def reward(self, output: str, reference: str | None, example: dict | None = None) -> float:
        """:meth:`grade` then :meth:`reward_of`: the reward in [0, 1] of one output (for RL).

        Args:
            output: The generated text.
            reference: The reference answer; None gives no verdict and no score, so 0.0.
            example: What ``score(output, example)`` receives.

        Returns:
            A float in [0, 1].
        """
        return self.reward_of(self.grade(output, reference, example))

    def describe(self) -> dict:
        """The grader as results files record it: ``{"file", "sha256", "defines",
        "timeout_seconds"}`` (``file`` None for the built-in grader)."""
        return {"file": str(self.path) if self.path else None, "sha256": self.sha256,
                "defines": list(self.defines),
                "timeout_seconds": self.timeout_seconds if self.path else None}


@dataclass(frozen=True)
class GraderConfig:
    """What builds a :class:`Grader` (``GRADER`` and ``GRADER_TIMEOUT_SECONDS``).

    Attributes:
        path: The grader file; None for the built-in grader.
        timeout_seconds: Time limit of the file's functions on one output, in seconds.
    """

    path: str | None = None
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS

    @classmethod
    def from_config(cls, config: TrainConfig) -> GraderConfig:
        """The grader settings of a :class:`~tinkerkit.config.TrainConfig`."""
        return cls(config.grader, config.grader_timeout_seconds)

    def build(self) -> Grader:
        """Load and check the grader (see :class:`Grader`).

        Raises:
            ConfigError: The file is missing, does not load or check.
        """
        return Grader(self.path, self.timeout_seconds)
