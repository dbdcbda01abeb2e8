"""Config loading from .py, .toml, .yaml and --set, with one-line errors for bad keys and values."""

import pytest

from tinkerkit.config import LRSchedule, TrainOn, load_config, parse_overrides
from tinkerkit.errors import ConfigError


def test_python_config_uppercase_names(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    path = tmp_path / "config.py"
    path.write_text(f"import os\nDATA_FILES = [{str(data)!r}]\nLORA_RANK = 8\nLEARNING_RATE = 3e-4\n"
                    "MAX_SEQUENCE_LENGTH = 16384\nTRUNCATE_LONG_SEQUENCES = False\n"
                    "def helper():\n    return 1\n")
    config = load_config(path)
    assert config.data_files == [str(data)]
    assert (config.lora_rank, config.learning_rate) == (8, 3e-4)
    assert (config.max_sequence_length, config.truncate_long_sequences) == (16384, False)


@pytest.mark.parametrize("name,text", [
    ("c.toml", 'LORA_RANK = 4\nlr_schedule = "cosine"\nTRAIN_ON = "last_assistant"\n'),
    ("c.yaml", "LORA_RANK: 4\nlr_schedule: cosine\nTRAIN_ON: last_assistant\n"),
])
def test_toml_and_yaml(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    config = load_config(path)
    assert config.lora_rank == 4
    assert config.lr_schedule is LRSchedule.COSINE
    assert config.train_on is TrainOn.LAST_ASSISTANT


def test_overrides_win_and_parse_yaml_scalars(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("LORA_RANK: 4\n")
    config = load_config(path, ["LORA_RANK=16", "max_steps=100", "STOP=[a, b]"], lora_rank=8)
    assert (config.lora_rank, config.max_steps, config.stop) == (16, 100, ["a", "b"])
    assert parse_overrides(["LEARNING_RATE=1e-4"]) == {"learning_rate": 1e-4}


def test_mistyped_key_suggests_closest(tmp_path):
    path = tmp_path / "config.py"
    path.write_text("LEARNNG_RATE = 1e-4\n")
    with pytest.raises(ConfigError, match=r"unknown key LEARNNG_RATE; did you mean LEARNING_RATE\?"):
        load_config(path)


@pytest.mark.parametrize("override,message", [
    ("LEARNING_RATE=-1", "LEARNING_RATE=-1: Input should be greater than 0"),
    ("LORA_RANK=0", "LORA_RANK=0: Input should be greater than 0"),
    ("DATA_FILES=missing.jsonl", "DATA_FILES='missing.jsonl': file not found: missing.jsonl"),
    ("LR_SCHEDULE=step", "LR_SCHEDULE='step'"),
    ("BATCH_SIZE=x", "BATCH_SIZE='x'"),
    # non-finite numbers: inf passed every bound and failed only at the first step (or as a NaN
    # loss for LORA_ALPHA), after the model was loaded and the run directory written
    ("LEARNING_RATE=inf", "LEARNING_RATE=inf: Input should be a finite number"),
    ("LEARNING_RATE=1e400", "LEARNING_RATE=inf: Input should be a finite number"),
    ("LORA_ALPHA=.inf", "LORA_ALPHA=inf: Input should be a finite number"),
    ("ADAM_EPS=inf", "ADAM_EPS=inf: Input should be a finite number"),
    ("WEIGHT_DECAY=inf", "WEIGHT_DECAY=inf: Input should be a finite number"),
    ("LEARNING_RATE=nan", "LEARNING_RATE=nan: Input should be a finite number"),
])
def test_invalid_values_name_key_and_value(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("override,message", [
    ("TOP_K=0", "TOP_K=0: must be -1 (off) or at least 1"),
    ("TOP_K=-2", "TOP_K=-2: must be -1 (off) or at least 1"),
    ("TOP_P=0", "TOP_P=0: must be in (0, 1] (1 is off)"),
    ("TOP_P=1.5", "TOP_P=1.5: must be in (0, 1] (1 is off)"),
    ("TEMPERATURE=-0.5", "TEMPERATURE=-0.5: must be a finite number, at least 0 (0 is greedy)"),
    ("MAX_TOKENS=0", "MAX_TOKENS=0: must be at least 1"),
])
def test_sampling_settings_follow_the_sampling_rules(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert str(error.value) == f"invalid config: --set: {message}"


def test_valid_sampling_settings():
    config = load_config(None, ["TOP_K=1", "TOP_P=1", "TEMPERATURE=0", "MAX_TOKENS=1"])
    assert (config.top_k, config.top_p, config.temperature, config.max_tokens) == (1, 1.0, 0.0, 1)
    assert load_config(None, ["TOP_K=-1"]).top_k == -1


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["LEARNING_RATE=-1", "LORA_RANK=0"])
    assert "LEARNING_RATE" in str(error.value) and "LORA_RANK" in str(error.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.py")
    exits = tmp_path / "exits.py"
    exits.write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(ConfigError) as error:  # not a silent exit of the whole command
        load_config(exits)
    assert str(error.value) == f"{exits}: could not run the config file: SystemExit: 3"
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path)
    assert str(error.value) == (f"config file {tmp_path}: is a directory; pass the config file "
                                "inside it (a .py, .toml or .yaml file)")
    bad = tmp_path / "bad.toml"
    bad.write_text("LORA_RANK = = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml: invalid toml"):
        load_config(bad)
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match="could not run the config file: RuntimeError: boom"):
        load_config(broken)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["LORA_RANK"])


def test_dump_round_trips():
    config = load_config(None, ["LORA_RANK=8"])
    dumped = config.dump()
    assert dumped["LORA_RANK"] == 8 and dumped["TRAIN_ON"] == "all_assistant"
    assert load_config(None, [f"{k}={v}" for k, v in dumped.items()
                              if v is not None and not isinstance(v, list)]) == config


def test_none_in_overrides_means_none():
    config = load_config(None, ["MAX_STEPS=100", "MAX_STEPS=None", "RUN_DIR=none"])
    assert config.max_steps is None and config.run_dir is None


def test_test_files_are_not_required_to_exist_for_training():
    assert load_config(None, ["TEST_FILES=not/yet/there.json"]).test_files == ["not/yet/there.json"]


def test_long_sequence_settings_reach_the_local_engine(tmp_path):
    from tinkerkit.engines import _local_kwargs

    assert (load_config(None).activation_checkpointing, load_config(None).mixed_precision) == (
        "auto", "auto")
    config = load_config(None, ["ACTIVATION_CHECKPOINTING=true", "MIXED_PRECISION=bf16"])
    kwargs = _local_kwargs(config, tmp_path)
    assert (kwargs["activation_checkpointing"], kwargs["mixed_precision"]) == (True, "bf16")
    assert load_config(None, ["ACTIVATION_CHECKPOINTING=auto"]).activation_checkpointing == "auto"
    for off in ("no", "off", "false"):  # YAML reads all three as false: the "no" choice
        assert load_config(None, [f"MIXED_PRECISION={off}"]).mixed_precision == "no"
    (tmp_path / "c.yaml").write_text("MIXED_PRECISION: no\n")
    assert load_config(tmp_path / "c.yaml").mixed_precision == "no"
    with pytest.raises(ConfigError, match="MIXED_PRECISION=true: Input should be 'auto', 'bf16'"):
        load_config(None, ["MIXED_PRECISION=yes"])
    for bad in ("ACTIVATION_CHECKPOINTING=sometimes", "MIXED_PRECISION=fp16"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])


@pytest.mark.parametrize("name,text,true,false", [  # echoed as the file spells them
    ("c.py", "BATCH_SIZE = True\nLEARNING_RATE = False\n", "True", "False"),
    ("c.toml", "BATCH_SIZE = true\nLEARNING_RATE = false\n", "true", "false"),
    ("c.yaml", "BATCH_SIZE: true\nLEARNING_RATE: no\n", "true", "false"),
])
def test_a_boolean_for_a_number_is_an_error(tmp_path, name, text, true, false):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (f"invalid config: {path}: LEARNING_RATE={false}: expected a "
                               f"number, got a boolean; {path}: BATCH_SIZE={true}: expected a "
                               "number, got a boolean")


def test_a_boolean_for_a_number_in_set_is_an_error_and_numbers_still_parse():
    with pytest.raises(ConfigError, match=r"--set: MAX_STEPS=true: expected a number, got a boolean"):
        load_config(None, ["MAX_STEPS=true"])
    config = load_config(None, ["MAX_STEPS=1e3", "LORA_ALPHA=16", "ACTIVATION_CHECKPOINTING=true",
                                "STRICT=yes"])
    assert (config.max_steps, config.lora_alpha) == (1000, 16.0)
    assert (config.activation_checkpointing, config.strict) == (True, True)
