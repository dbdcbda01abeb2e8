"""Which base models ``tinkerkit serve`` serves, under the names Tinker users write.

A Tinker script names its base model as on the hosted service (``Qwen/Qwen3-8B``). The models
file (``--models FILE``, JSON or TOML) maps such names to local models::

    # models.toml
    [models]
    "Qwen/Qwen3-8B" = "/models/Qwen3-8B"            # a HF model directory

    [models."meta-llama/Llama-3.2-1B"]
    path = "/models/Llama-3.2-1B"                    # directory (relative: to this file) or
                                                     # a tinkerkit registry name
    dtype = "bfloat16"                               # float32 (default), bfloat16, float16
    tokenizer_id = "meta-llama/Llama-3.2-1B"         # reported by get_info (default: see
                                                     # ModelRegistry.tokenizer_id)

or the same as JSON: ``{"models": {"Qwen/Qwen3-8B": "/models/Qwen3-8B", "...": {"path": ...}}}``.

Besides the file's names, tinkerkit's own registry names (``smollm2-135m-instruct``) are served
as they are, and, on a loopback bind, so is a path to a HF model directory on the server.
Any other name is refused with the list of served names.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from tinkerkit.errors import ConfigError, RequestError
from tinkerkit.models import REGISTRY, hub_id_of, is_model_dir, resolve_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
"""Files of a saved Hugging Face tokenizer (``save_pretrained`` writes both): a model directory
with one of them holds its own tokenizer."""


@dataclass(frozen=True)
class ServedModel:
    """A base model the server can train and sample.

    Attributes:
        name: The name clients use (``Qwen/Qwen3-8B``, ``smollm2-135m-instruct``, a path).
        source: What :func:`tinkerkit.models.load_model` loads: a model directory or a
            registry name.
        dtype: Base-model dtype (``float32``, ``bfloat16``, ``float16``).
        tokenizer_id: The tokenizer that ``get_info`` reports (the SDK's ``get_tokenizer``
            loads it with ``AutoTokenizer.from_pretrained``); None (the models file names none):
            see :meth:`ModelRegistry.tokenizer_id`.
    """

    name: str
    source: str
    dtype: str = "float32"
    tokenizer_id: str | None = None


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tokenizer_id: str | None = None


def _servable() -> list[str]:
    """The registry names that have model weights (tokenizer-only entries are not served)."""
    return sorted(name for name, entry in REGISTRY.items() if not entry.tokenizer_only)


def _source(path_text: str, base: Path, where: str) -> str:
    if path_text in _servable():
        return path_text
    path = Path(path_text).expanduser()
    path = path if path.is_absolute() else base / path
    if not is_model_dir(path):
        raise ConfigError(f"{where}: '{path_text}' is neither a HF model directory (with "
                          f"config.json) nor a registry model ({', '.join(_servable())})")
    return str(path.resolve())


def _entry(value: object, where: str) -> _Entry:
    """One entry of the models file: a path, or a table of path, dtype and tokenizer_id.

    Raises:
        ConfigError: Another type, an unknown or missing key, or an invalid value (named).
    """
    if isinstance(value, str):
        return _Entry(path=value)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a path (a string) or a table with path, dtype and "
                          f"tokenizer_id, got {type(value).__name__}")
    try:
        return _Entry.model_validate(value)
    except ValidationError as e:
        error = e.errors()[0]
        field = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            problem = f"unknown key '{field}' (an entry takes path, dtype and tokenizer_id)"
        elif error["type"] == "missing":
            problem = f"'{field}' is missing"
        else:
            problem = f"{field}={error['input']!r}: {error['msg']}"
        raise ConfigError(f"{where}: {problem}") from None


def read_models_file(path: str | Path) -> dict[str, ServedModel]:
    """Read a models file (see the module docstring).

    Raises:
        ConfigError: Unreadable file, bad JSON/TOML, an unknown key or value (named by its
            place in the file), or a path that is not a model directory.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the models file: {e}") from e
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: "
                          f"{e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict):
        raise ConfigError(f"{path}: expected a 'models' table of name = path entries")
    unknown = sorted(set(raw) - {"models"})
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}' (the file holds one table, "
                          "'models')")
    served = {}
    for name, value in raw["models"].items():
        where = f"{path}: models.{name}"
        if not name.strip():
            raise ConfigError(f"{path}: a model name is empty")
        entry = _entry(value, where)
        source = _source(entry.path, path.parent, where)
        served[name] = ServedModel(name, source, entry.dtype, entry.tokenizer_id)
    return served


class ModelRegistry:
    """Resolves base model names of requests to served models.

    Args:
        served: The models file's entries (name -> model).
        allow_paths: Also serve HF model directories named by their path (loopback binds).
    """

    def __init__(self, served: dict[str, ServedModel] | None = None,
                 allow_paths: bool = False) -> None:
        self._served = dict(served or {})
        self._allow_paths = allow_paths

    def names(self) -> list[str]:
        """The names listed to clients: the models file's, then tinkerkit's registry names."""
        return list(self._served) + [n for n in _servable() if n not in self._served]

    def resolve(self, name: str) -> ServedModel:
        """The served model called ``name``.

        Raises:
            RequestError: 400 naming the served models when ``name`` is not one of them.
        """
        if name in self._served:
            return self._served[name]
        if name in _servable():
            return ServedModel(name, name)
        if self._allow_paths and name.startswith(("/", "~", ".")):
            path = Path(name).expanduser()
            if is_model_dir(path):
                return ServedModel(name, str(path.resolve()), tokenizer_id=str(path.resolve()))
        paths = " or a HF model directory on the server" if self._allow_paths else ""
        raise RequestError(400, f"base model '{name}' is not served here; served models: "
                                f"{', '.join(self.names())}{paths}")

    def tokenizer_id(self, served: ServedModel) -> str:
        """The tokenizer ``get_info`` reports for a served model.

        The models file's ``tokenizer_id``; else, on a loopback bind (clients share this
        machine, so the SDK's ``get_tokenizer()`` works offline), the model's own directory
        when it holds a tokenizer (a registry model's cached one included); else the name
        clients use (a tinkerkit registry name: its hub id).
        """
        if served.tokenizer_id is not None:
            return served.tokenizer_id
        if self._allow_paths:
            directory = Path(resolve_model(served.source))
            if any((directory / name).is_file() for name in TOKENIZER_FILES):
                return str(directory)
        return hub_id_of(served.name)
