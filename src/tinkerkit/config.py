"""One validated training configuration, loaded from ``config.py``, ``.toml`` or ``.yaml``.

A Python config file follows the seed scripts: module-level UPPERCASE names (``DATA_FILES``,
``BASE_MODEL``, ``LORA_RANK``, ``LEARNING_RATE``, ...), each the upper-case form of a field of
:class:`TrainConfig`. TOML and YAML files use the same keys, in either case. ``--set KEY=VALUE``
overrides any key; the value is parsed as a YAML scalar (``1e-4``, ``true``, ``[a.jsonl, b.jsonl]``).

Every problem is collected and reported at once as a :class:`~tinkerkit.errors.ConfigError` that
names each key and value; a mistyped key gets the closest valid key as a suggestion.

Example::

    config = load_config("config.py", overrides=["LEARNING_RATE=2e-4", "MAX_STEPS=100"])
    config.learning_rate  # 0.0002
"""

from __future__ import annotations

import difflib
import os
import runpy
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from tinkerkit.errors import ConfigError
from tinkerkit.loss_rules import resolve_loss_config
from tinkerkit.sampling_rules import SAMPLING_SETTINGS, setting_problem


class TrainOn(StrEnum):
    """Which assistant messages carry loss weight."""

    ALL_ASSISTANT = "all_assistant"
    LAST_ASSISTANT = "last_assistant"


class LRSchedule(StrEnum):
    """Learning-rate schedule after linear warmup: constant, linear decay to 0, or cosine to 0."""

    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


class RLLoss(StrEnum):
    """The policy-gradient losses of ``tinkerkit rl``: Tinker's built-in RL losses."""

    IMPORTANCE_SAMPLING = "importance_sampling"
    PPO = "ppo"
    CISPO = "cispo"
    DRO = "dro"


class TrainConfig(BaseModel):
    """Every setting of a training run, with its default. Field ``x`` is ``X`` in ``config.py``."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False,
                              allow_inf_nan=False)  # an infinite rate or alpha is never meant

    # Data
    data_files: list[str] = Field(default_factory=list, description="Training data files (JSON, JSON Lines).")
    data_format: str | None = Field(None, description="Force a record shape (messages, prompt_completion, question_answer, math, s1k, alpaca); None detects it.")
    on_error: Literal["raise", "skip"] = Field("raise", description="A malformed record stops the run (raise) or is skipped and counted (skip).")
    test_files: list[str] = Field(default_factory=list, description="Test files for `tinkerkit eval` when --data is not given.")

    # Model and LoRA
    base_model: str = Field("smollm2-135m-instruct", description="HF model directory, hub id, or registry name.")
    backend: Literal["local", "tinker"] = Field("local", description="Training engine: local (in-process PyTorch/PEFT) or tinker (the official SDK: the hosted service, or `tinkerkit serve`).")
    tinker_base_url: str | None = Field(default_factory=lambda: os.environ.get("TINKER_BASE_URL") or None, description="Tinker server for BACKEND=tinker and tinker:// checkpoints (default: $TINKER_BASE_URL, else the hosted service); the API key comes only from $TINKER_API_KEY.")
    lora_rank: int = Field(32, gt=0, description="LoRA rank r.")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; None means alpha = rank (scale 1).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_targets: str = Field("all-linear", description="LoRA target modules: attention, mlp, all-linear, or comma-separated module names; mlp covers the experts of mixture-of-experts models (module name experts).")
    train_unembed: bool = Field(False, description="Also put LoRA on the unembedding (lm_head).")
    device: str = Field("auto", description="Local engine device: auto, cpu, cuda, cuda:N.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Local engine parameter dtype.")
    activation_checkpointing: bool | Literal["auto"] = Field("auto", description="Gradient (activation) checkpointing: decoder layers recompute their activations in the backward pass instead of keeping them (less memory, more compute); auto: on for micro-batches of at least 2,048 tokens.")
    cpu_threads: int | Literal["auto"] = Field("auto", description="Local engine threads on the CPU: auto (every core on an idle machine, one per core left while other programs keep cores busy; OMP_NUM_THREADS, MKL_NUM_THREADS, OMP_WAIT_POLICY, GOMP_SPINCOUNT, KMP_BLOCKTIME or a torch.set_num_threads call after importing tinkerkit win), or a fixed number: results are bitwise repeatable (exact resume on the CPU) only at a fixed thread count.")
    mixed_precision: Literal["auto", "bf16", "no"] = Field("auto", description="bf16 autocast in the local engine: frozen base products in bf16; the LoRA update, norms, attention on the CPU, loss and optimizer in float32. auto: bf16 on CUDA GPUs that support it, float32 on the CPU (bf16 there: about 1.4x faster on CPUs with native bf16, loss within 0.5%; see the README).")

    # Rendering
    max_sequence_length: int = Field(4096, gt=1, description="Longest rendered example in tokens.")
    truncate_long_sequences: bool = Field(True, description="Cut longer examples on the right (True) or skip them (False).")
    train_on: TrainOn = Field(TrainOn.ALL_ASSISTANT, description="Assistant messages that carry loss.")

    # Optimization
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    lr_schedule: LRSchedule = Field(LRSchedule.LINEAR, description="constant, linear or cosine decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup, in optimizer steps.")
    num_epochs: int = Field(1, gt=0, description="Passes over the training data.")
    batch_size: int = Field(8, gt=0, description="Examples per optimizer step.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (None: all epochs).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    grad_clip_norm: float = Field(1.0, ge=0, description="Global gradient-norm clip; 0 disables.")
    seed: int = Field(42, description="Seed for LoRA init, data order and dropout.")

    # Run directory and checkpoints
    run_dir: str | None = Field(None, description="Run directory (default runs/<timestamp>); with --resume only the run's own directory is accepted.")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list, description="Experiment trackers that receive every metrics.jsonl line, the evaluation metrics and this config, under the run's name: any of tensorboard, wandb, mlflow (each needs pip install 'tinkerkit[NAME]').")

    # Sampling for evaluation
    temperature: float = Field(0.0, description="Sampling temperature for evaluation (0 = greedy).")
    max_tokens: int = Field(512, description="Maximum generated tokens per answer.")
    top_p: float = Field(1.0, description="Nucleus sampling threshold.")
    top_k: int = Field(-1, description="Top-k sampling (-1 disables).")
    stop: list[str] | None = Field(None, description="Extra stop strings (the end-of-turn token always stops).")
    eval_limit: int | None = Field(None, gt=0, description="Evaluate only the first N test examples.")

    # Grading
    grader: str | None = Field(None, description="Your own grading functions: a Python file defining any of extract_final_answer(text), check_answer_exact_match(pred, ref), check_answer_contains(output, ref), check_answer_equivalent(pred, ref) and score(output, example); what it does not define stays built in. Used by `tinkerkit eval` and SAMPLE_EVAL_EVERY (--grader FILE). A relative path is from the working directory, as for DATA_FILES. See docs/MODEL_EXPORT_EVALUATION.md.")
    grader_timeout_seconds: float = Field(10.0, gt=0, le=86400, description="Time limit of the GRADER file's functions on one output; an output that overruns it is a grading error (counted as wrong) and the run goes on.")

    # Evaluation during training
    eval_data_files: list[str] = Field(default_factory=list, description="Held-out files for evaluation during training.")
    eval_split_ratio: float | None = Field(None, gt=0, lt=1, description="Hold out this fraction of DATA_FILES instead (no prompt on both sides, as `tinkerkit split`).")
    eval_every: int = Field(0, ge=0, description="Held-out loss (eval_loss) every N steps and at the end (0 disables).")
    sample_eval_every: int = Field(0, ge=0, description="Sample and grade held-out answers (eval_accuracy) every N steps and at the end (0 disables).")
    sample_eval_limit: int = Field(32, gt=0, description="Held-out examples sampled for eval_accuracy (the first N).")

    # Guards
    truncation_warn_ratio: float = Field(0.3, ge=0, le=1, description="Warn when more than this fraction of examples exceed MAX_SEQUENCE_LENGTH.")
    strict: bool = Field(False, description="Stop before training instead of warning about too many long examples (--strict).")
    loss_plateau_window: int = Field(50, ge=0, description="Warn when the mean loss of the last N steps is not below that of the N before (0 disables).")

    # Export at the end
    export_after_training: bool = Field(False, description="Export the final checkpoint into RUN_DIR/export, as `tinkerkit export` does.")
    export_merged: bool = Field(False, description="The export also writes a merged HF model (--merge).")
    export_dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="dtype of the merged model.")

    # Reinforcement learning (`tinkerkit rl`)
    rl_group_size: int = Field(4, ge=2, description="Answers sampled per prompt in `tinkerkit rl`; each is scored against its group's mean reward (at least 2).")
    rl_prompts_per_step: int = Field(8, gt=0, description="Prompts per optimizer step in `tinkerkit rl` (each sampled RL_GROUP_SIZE times).")
    rl_temperature: float = Field(1.0, gt=0, description="Sampling temperature of `tinkerkit rl` (above 0; 1 samples the model's own distribution, whose log-probabilities the losses use).")
    rl_max_tokens: int = Field(256, gt=0, description="Most tokens generated per answer in `tinkerkit rl`.")
    rl_loss: RLLoss = Field(RLLoss.IMPORTANCE_SAMPLING, description="Policy-gradient loss of `tinkerkit rl`: importance_sampling, ppo, cispo or dro (Tinker's built-in losses).")
    rl_loss_config: dict[str, float] = Field(default_factory=dict, description="The loss's settings (Tinker's loss_fn_config): clip_low_threshold and clip_high_threshold for ppo and cispo, beta for dro; absent keys take Tinker's defaults.")
    rl_format_reward: float = Field(0.0, ge=0, le=1, description="Reward added in `tinkerkit rl` to an answer whose final answer can be extracted (right or wrong); 0 disables.")

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1 (and 1.0); `BATCH_SIZE = true` is never meant. Not
        # strict mode: it would also refuse 1000.0 for an int (`--set MAX_STEPS=1e3`).
        if isinstance(value, bool) and _wants_number(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number, got a boolean")
        return value

    @field_validator("data_files", "test_files", "eval_data_files", "report_to", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, Path)) else value

    @field_validator("report_to")
    @classmethod
    def _each_tracker_once(cls, names: list[str]) -> list[str]:
        return list(dict.fromkeys(names))

    @field_validator("data_files", "eval_data_files")  # TEST_FILES are checked when evaluating
    @classmethod
    def _files_exist(cls, paths: list[str]) -> list[str]:
        missing = [p for p in paths if not Path(p).expanduser().exists()]
        if missing:
            raise ValueError(f"file not found: {', '.join(missing)}")
        return [str(p) for p in paths]

    @field_validator("grader")
    @classmethod
    def _grader_file(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = Path(value).expanduser()
        if not path.is_file():
            where = "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
            raise ValueError(f"file not found{where}" if not path.exists() else "not a file")
        if path.suffix != ".py":
            raise ValueError("must be a Python file (.py) defining grading functions")
        return str(value)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _mixed_precision_no(cls, value: Any) -> Any:
        # YAML (--set, .yaml files) reads `no` and `off` as false: that is the "no" choice.
        return "no" if value is False else value

    @field_validator("cpu_threads")
    @classmethod
    def _cpu_threads(cls, value: int | str) -> int | str:
        if value != "auto" and value < 1:
            raise ValueError("must be 'auto' or a positive number of threads")
        return value

    @field_validator("rl_loss_config", mode="before")  # before '0.8' or true became a float
    @classmethod
    def _rl_loss_config(cls, value: Any, info: ValidationInfo) -> Any:
        loss = info.data.get("rl_loss")
        if loss is not None and isinstance(value, dict):  # else reported on its own
            resolve_loss_config(loss.value, value)  # ValueError: the key or value refused
        return value

    @field_validator("tinker_base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parsed = urlsplit(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError("must be an http:// or https:// URL")
        if parsed.username is not None or parsed.password is not None:
            raise ValueError("must not hold credentials; the API key goes in $TINKER_API_KEY")
        return value

    @field_validator(*SAMPLING_SETTINGS)
    @classmethod
    def _sampling_setting(cls, value: float | int, info: ValidationInfo) -> float | int:
        problem = setting_problem(info.field_name, value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("eval_split_ratio")
    @classmethod
    def _one_held_out_source(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("eval_data_files"):
            raise ValueError("give EVAL_DATA_FILES or EVAL_SPLIT_RATIO, not both")
        return value

    @field_validator("eval_every", "sample_eval_every")
    @classmethod
    def _needs_held_out(cls, value: int, info: ValidationInfo) -> int:
        # A source that failed its own validation is missing from info.data: reported already.
        sources_valid = {"eval_data_files", "eval_split_ratio"} <= info.data.keys()
        if value and sources_valid and not (info.data["eval_data_files"]
                                            or info.data["eval_split_ratio"]):
            raise ValueError("needs held-out data: set EVAL_DATA_FILES or EVAL_SPLIT_RATIO")
        return value

    def dump(self) -> dict:
        """The resolved config as JSON-ready data, UPPERCASE keys (no secrets are ever fields)."""
        return {k.upper(): v for k, v in self.model_dump(mode="json").items()}


FIELDS = tuple(TrainConfig.model_fields)


def _wants_number(annotation: Any) -> bool:
    """Whether a field's type takes an int or a float but not a bool (``int | None`` does,
    ``bool | Literal["auto"]`` does not)."""
    types = set()
    pending = [annotation]
    while pending:
        kind = pending.pop()
        args = get_args(kind)
        if args and get_origin(kind) is not Literal:
            pending.extend(args)
        else:
            types.add(kind)
    return bool(types & {int, float}) and bool not in types


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key.lower(), FIELDS, n=1, cutoff=0.6)
    return f"; did you mean {close[0].upper()}?" if close else ""


def _normalize_keys(raw: dict[str, Any], origin: str) -> dict[str, Any]:
    values, problems = {}, []
    for key, value in raw.items():
        name = str(key).lower().replace("-", "_")
        if name not in FIELDS:
            problems.append(f"{origin}: unknown key {key}{_suggest(name)}")
        else:
            values[name] = value
    if problems:
        raise ConfigError("; ".join(problems))
    return values


def _read_python(path: Path) -> dict[str, Any]:
    try:
        namespace = runpy.run_path(str(path))
    except (Exception, SystemExit) as e:  # the user's own code failed: report it on one line
        raise ConfigError(f"{path}: could not run the config file: {type(e).__name__}: {e}") from e
    return {k: v for k, v in namespace.items()
            if k.isupper() and not k.startswith("_") and not callable(v)
            and not isinstance(v, type(runpy))}


def _read_file(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config file {path}: is a directory; pass the config file inside it "
                          "(a .py, .toml or .yaml file)")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".py":
            return _read_python(path)
        text = path.read_text(encoding="utf-8-sig")
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"{path}: unknown config type '{suffix}' (use .py, .toml or .yaml)")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid {suffix[1:]}: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings; values are YAML scalars or lists.

    Raises:
        ConfigError: An item has no ``=`` or an unknown key.
    """
    raw = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        raw[key.strip()] = _parse_scalar(value)
    return _normalize_keys(raw, "--set")


def _parse_scalar(text: str) -> Any:
    """A YAML scalar or list; numbers YAML 1.1 leaves as strings (``1e-4``) become floats."""
    if not text.strip():
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        if value in ("None", "none"):  # as config.py writes it
            return None
        try:
            return float(value)
        except ValueError:
            return value
    return value


def without_userinfo(url: str) -> str:
    """``url`` with any ``user:password@`` part replaced by ``***@`` (for error messages)."""
    parsed = urlsplit(url)
    if parsed.username is None and parsed.password is None:
        return url
    return parsed._replace(netloc="***@" + parsed.netloc.rpartition("@")[2]).geturl()


def _toml_form(value: Any) -> str:
    """A value as a TOML/YAML file or ``--set`` spells it where Python's ``repr`` differs
    (``true``, ``false``, ``null``; lists of them); other values as ``repr``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml_form, value)) + "]"
    return repr(value)


def _format_validation(error: ValidationError, values: dict[str, Any],
                       origins: dict[str, str]) -> str:
    problems = []
    for item in error.errors():
        name = str(item["loc"][0]) if item["loc"] else "?"
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key {name.upper()}{_suggest(name)}")
            continue
        value = values.get(name, item.get("input"))
        if name == "tinker_base_url" and isinstance(value, str):
            value = without_userinfo(value)
        message = item["msg"].removeprefix("Value error, ")
        where = f"{origins[name]}: " if name in origins else ""
        shown = repr(value) if origins.get(name, "").endswith(".py") else _toml_form(value)
        problems.append(f"{where}{name.upper()}={shown}: {message}")
    return "invalid config: " + "; ".join(problems)


def build_config(values: dict[str, Any], origins: dict[str, str] | None = None) -> TrainConfig:
    """Validate lower-case field values into a :class:`TrainConfig`.

    Args:
        values: Lower-case field values.
        origins: Where each value came from (a config file, ``--set``, ...), named in errors.

    Raises:
        ConfigError: Listing every invalid key and value, and where each came from.
    """
    try:
        return TrainConfig(**values)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, values, origins or {})) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                **fields: Any) -> TrainConfig:
    """Load a config file, apply keyword ``fields`` (from CLI flags), then ``--set`` overrides.

    Args:
        path: ``config.py``, ``*.toml`` or ``*.yaml``; ``None`` uses defaults only.
        overrides: ``KEY=VALUE`` strings, applied last.
        **fields: Lower-case field values; ``None`` values are ignored.

    Raises:
        ConfigError: Unreadable file, unknown key (with a suggestion), or invalid value.
    """
    layers = []
    if path is not None:
        layers.append((str(path), _normalize_keys(_read_file(Path(path)), str(path))))
    layers.append(("the command line", {k: v for k, v in fields.items() if v is not None}))
    layers.append(("--set", parse_overrides(overrides or [])))
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for origin, layer in layers:
        values.update(layer)
        origins.update(dict.fromkeys(layer, origin))
    return build_config(values, origins)
