"""The argument layer: sd-scripts' options from the table, --config_file/--output_config, and the policy checks."""

import argparse
import ast
import csv
import os
from pathlib import Path

import pytest
import toml

from para_trainer.training import args as args_module
from para_trainer.training.args import ArgsError, build_parser, parse_args

TABLE = Path(args_module.__file__).with_name("sd_scripts_args.tsv")
REFERENCE_TABLE = Path("/work/shared/reference/kohya_train_network_args.tsv")


def table_rows() -> list[dict]:
    with open(TABLE, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


ROWS = table_rows()
ROW = {row["option"].removeprefix("--"): row for row in ROWS}


def table_default(name: str):
    return ast.literal_eval(ROW[name]["default"])


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------------------------------
# The parser matches the table


def test_table_is_the_reference_copy():
    if not REFERENCE_TABLE.exists():
        pytest.skip("reference table not present")
    assert TABLE.read_bytes() == REFERENCE_TABLE.read_bytes()
    assert len(ROWS) == 193  # sd-scripts' train_network.py has 193 options


def test_every_table_option_has_its_action_type_nargs_default_and_choices():
    actions = {action.dest: action for action in build_parser()._actions}
    for name, row in ROW.items():
        action = actions[name]
        assert action.option_strings == [row["option"]]
        assert action.default == table_default(name), name
        assert type(action.default) is type(table_default(name)), name
        if row["action"] == "StoreTrue":
            assert isinstance(action, argparse._StoreTrueAction), name
            continue
        assert isinstance(action, argparse._StoreAction), name
        assert action.nargs == (None if row["nargs"] == "None" else row["nargs"]), name
        assert getattr(action.type, "__name__", None) == row["type"], name
        expected = None
        if row["choices"]:
            convert = int if row["type"] == "int" else str
            expected = [None if c == "None" else convert(c) for c in row["choices"].split(",")]
        assert (list(action.choices) if action.choices is not None else None) == expected, name


def test_defaults_spot_checked_against_the_table_and_sd_scripts():
    args = parse_args([])
    for name, value in [("learning_rate", 2e-6), ("caption_extension", ".caption"), ("max_train_steps", 1600),
                        ("network_alpha", 1), ("save_model_as", "safetensors"), ("max_bucket_reso", 1024),
                        ("mixed_precision", "no"), ("optimizer_type", ""), ("lr_scheduler", "constant"),
                        ("prior_loss_weight", 1.0), ("sample_sampler", "ddim"), ("network_dim", None)]:
        assert getattr(args, name) == value == table_default(name), name
    assert args.sdxl is False and args.no_export_lora is False


def test_command_line_values_get_the_table_types():
    args = parse_args(["--max_train_steps", "5", "--learning_rate", "1e-4", "--dataset_config", "d.toml",
                       "--network_args", "conv_dim=4", "preset=exca", "--text_encoder_lr", "1e-5", "2e-5",
                       "--max_token_length", "150", "--network_dim", "8", "--flip_aug", "--sdxl"])
    assert args.max_train_steps == 5 and isinstance(args.max_train_steps, int)
    assert args.learning_rate == 1e-4
    assert args.dataset_config == Path("d.toml") and isinstance(args.dataset_config, Path)
    assert args.network_args == ["conv_dim=4", "preset=exca"]
    assert args.text_encoder_lr == [1e-5, 2e-5]
    assert args.max_token_length == 150 and args.network_dim == 8
    assert args.flip_aug is True and args.sdxl is True


@pytest.mark.parametrize("text, value", [("10%", 0.1), ("0.25", 0.25), ("100", 100), ("1", 1), ("0", 0.0)])
def test_warmup_steps_is_a_count_a_ratio_or_a_percentage(text, value):
    # as sd-scripts' int_or_float: below 1 is a ratio (a float, "0" too), from 1 on a whole step count
    result = parse_args(["--lr_warmup_steps", text]).lr_warmup_steps
    assert result == pytest.approx(value) and type(result) is type(value)


# --------------------------------------------------------------------------------------------------
# --config_file

KOHYA_EXAMPLE = """\
[model]
pretrained_model_name_or_path = "{work}/sdexp/tiny_sd"
tokenizer_cache_dir = "{work}/sdexp/tokcache"

[network]
network_module = "networks.lora"
network_dim = 4
network_alpha = 2.0
network_args = ["conv_dim=2", "conv_alpha=1", "rank_dropout=0.1", "module_dropout=0.1"]

[training]
output_dir = "{work}/sdexp/out3"
output_name = "toml_run"
learning_rate = 1e-4
max_train_steps = 2
max_data_loader_n_workers = 0
seed = 1
save_model_as = "safetensors"
save_precision = "fp16"
optimizer_type = "AdamW"
dataset_config = "{work}/sdexp/dataset.toml"
"""


def test_kohya_example_config_parses_with_sections_flattened(tmp_path):
    work = tmp_path.as_posix()
    path = write(tmp_path / "train.toml", KOHYA_EXAMPLE.format(work=work))
    args = parse_args(["--config_file", path])
    assert args.pretrained_model_name_or_path == f"{work}/sdexp/tiny_sd"
    assert args.tokenizer_cache_dir == f"{work}/sdexp/tokcache"
    assert args.network_module == "networks.lora"
    assert args.network_dim == 4 and args.network_alpha == 2.0
    assert args.network_args == ["conv_dim=2", "conv_alpha=1", "rank_dropout=0.1", "module_dropout=0.1"]
    assert args.output_dir == f"{work}/sdexp/out3" and args.output_name == "toml_run"
    assert args.learning_rate == 1e-4 and args.max_train_steps == 2 and args.seed == 1
    assert args.max_data_loader_n_workers == 0
    assert args.save_model_as == "safetensors" and args.save_precision == "fp16" and args.optimizer_type == "AdamW"
    assert Path(args.dataset_config) == Path(f"{work}/sdexp/dataset.toml")
    # keys the file does not set keep the table's defaults; no section name becomes an attribute
    assert args.caption_extension == table_default("caption_extension")
    assert args.lr_scheduler == table_default("lr_scheduler")
    assert not any(hasattr(args, section) for section in ("model", "network", "training"))
    assert args.config_file == str(tmp_path / "train")  # sd-scripts strips the extension afterwards


def test_command_line_beats_toml_beats_default(tmp_path):
    path = write(tmp_path / "c.toml", '[training]\nmax_train_steps = 2\nlearning_rate = 1e-4\nflip_aug = true\n'
                 'network_args = ["a=1"]\n')
    args = parse_args(["--config_file", path, "--max_train_steps", "3", "--network_args", "b=2", "c=3"])
    assert args.max_train_steps == 3  # command line over TOML
    assert args.network_args == ["b=2", "c=3"]
    assert args.learning_rate == 1e-4  # TOML over default
    assert args.flip_aug is True  # a TOML true is not reset by the flag's absence
    assert args.train_batch_size == table_default("train_batch_size")  # neither: default
    # a command-line value equal to the default still wins over the TOML
    assert parse_args(["--config_file", path, "--max_train_steps", "1600"]).max_train_steps == 1600


def test_config_file_gets_toml_appended_and_top_level_values_are_kept(tmp_path):
    write(tmp_path / "c.toml", 'seed = 7\n[any_name]\nkeep_tokens = 2\n')
    args = parse_args(["--config_file", str(tmp_path / "c")])
    assert args.seed == 7 and args.keep_tokens == 2


def test_toml_values_that_skip_argparse_conversion_are_accepted(tmp_path):
    path = write(tmp_path / "c.toml", 'learning_rate = 1\nresolution = 512\ntext_encoder_lr = 1e-5\n'
                 'lr_warmup_steps = "10%"\nnetwork_alpha = 4\n')
    args = parse_args(["--config_file", path])
    assert args.learning_rate == 1 and args.network_alpha == 4  # an int in a float option is fine
    assert args.resolution == "512"
    assert args.text_encoder_lr == [1e-5]  # sd-scripts' backward compatibility: one number is one rate
    assert args.lr_warmup_steps == pytest.approx(0.1)
    path = write(tmp_path / "d.toml", 'resolution = "512,768"\n')
    assert parse_args(["--config_file", path]).resolution == "512,768"


def test_every_option_accepts_its_own_default_in_toml(tmp_path):
    lines = [f"{name} = {args_module._toml_repr(table_default(name))}" for name in ROW
             if table_default(name) is not None and name not in ("config_file", "output_config")]
    path = write(tmp_path / "defaults.toml", "\n".join(lines) + "\n")
    args = parse_args(["--config_file", path])
    for name in ROW:
        if table_default(name) is not None and name not in ("config_file", "output_config"):
            assert getattr(args, name) == table_default(name), name


def test_misspelled_toml_key_is_an_error_with_a_suggestion(tmp_path):
    path = write(tmp_path / "my.toml", "[training]\nlearning_rat = 1e-4\n")
    with pytest.raises(ArgsError) as error:
        parse_args(["--config_file", path])
    message = str(error.value)
    assert "unknown key 'learning_rat'" in message and "my.toml [training]" in message
    assert "did you mean 'learning_rate'?" in message


def test_dataset_keys_in_the_training_config_point_to_dataset_config(tmp_path):
    path = write(tmp_path / "my.toml", "[[datasets]]\nresolution = 512\n")
    with pytest.raises(ArgsError, match="unknown key 'datasets'.*--dataset_config"):
        parse_args(["--config_file", path])


@pytest.mark.parametrize("line, words", [
    ('max_train_steps = "ten"', ["max_train_steps", "expected an integer", "got a string"]),
    ('network_args = "conv_dim=4"', ["network_args", "expected a list of strings", 'network_args = ["conv_dim=4"]']),
    ('shuffle_caption = "true"', ["shuffle_caption", "expected true or false", "got a string"]),
    ("learning_rate = true", ["learning_rate", "expected a number", "got a boolean"]),
    ("max_train_steps = 10.0", ["max_train_steps", "expected an integer", "got a float"]),
    ('mixed_precision = "fp32"', ["mixed_precision", "'no', 'fp16', 'bf16'"]),
    ("lr_warmup_steps = 100.0", ["lr_warmup_steps", "below 1"]),
])
def test_wrong_toml_value_type_is_an_error_naming_the_key(tmp_path, line, words):
    path = write(tmp_path / "my.toml", f"[training]\n{line}\n")
    with pytest.raises(ArgsError) as error:
        parse_args(["--config_file", path])
    for word in words + ["my.toml [training]"]:
        assert word in str(error.value)


def test_all_toml_problems_come_in_one_message(tmp_path):
    path = write(tmp_path / "my.toml", 'learning_rat = 1e-4\nmax_train_steps = "ten"\n')
    with pytest.raises(ArgsError) as error:
        parse_args(["--config_file", path])
    assert "learning_rat" in str(error.value) and "max_train_steps" in str(error.value)


def test_toml_syntax_error_names_the_file_and_line(tmp_path):
    path = write(tmp_path / "broken.toml", "[training]\nlearning_rate = 1e-4\nmax_train_steps = = 2\n")
    with pytest.raises(ArgsError) as error:
        parse_args(["--config_file", path])
    assert str(error.value).startswith(f"{path}: TOML syntax error at line 3")


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ArgsError, match=r"nothere\.toml not found"):
        parse_args(["--config_file", str(tmp_path / "nothere")])


# --------------------------------------------------------------------------------------------------
# Policy: unsupported options are rejected, harmless ones accepted


@pytest.mark.parametrize("argv, name", [
    (["--blocks_to_swap", "8"], "blocks_to_swap"),
    (["--in_json", "x"], "in_json"),
    (["--deepspeed"], "deepspeed"),
    (["--color_aug"], "color_aug"),
    (["--masked_loss"], "masked_loss"),
])
def test_unsupported_option_is_rejected_by_name(argv, name):
    with pytest.raises(ArgsError, match=rf"^--{name} is not supported by para-trainer: "):
        parse_args(argv)


def test_several_unsupported_options_are_reported_together():
    with pytest.raises(ArgsError) as error:
        parse_args(["--blocks_to_swap", "8", "--in_json", "x", "--deepspeed"])
    lines = str(error.value).splitlines()
    assert len(lines) == 3
    assert {line.split()[0] for line in lines} == {"--blocks_to_swap", "--in_json", "--deepspeed"}


def test_unsupported_option_in_toml_is_rejected_but_off_values_are_fine(tmp_path):
    path = write(tmp_path / "c.toml", "color_aug = true\n")
    with pytest.raises(ArgsError, match="--color_aug is not supported"):
        parse_args(["--config_file", path])
    # GUI-written configs set unused options to 0/false/""; those leave the option off, as in sd-scripts
    path = write(tmp_path / "d.toml", 'multires_noise_iterations = 0\nip_noise_gamma = 0.0\ncolor_aug = false\n'
                 'huggingface_repo_id = ""\nvalidation_split = 0.0\n')
    parse_args(["--config_file", path])


def test_harmless_options_are_accepted_and_kept():
    args = parse_args(["--max_data_loader_n_workers", "0", "--persistent_data_loader_workers", "--lowram",
                       "--console_log_level", "DEBUG", "--vae_batch_size", "4", "--torch_compile",
                       "--zero_stage", "3", "--huber_c", "0.2", "--log_config", "--ddp_timeout", "5"])
    assert args.max_data_loader_n_workers == 0 and args.lowram and args.vae_batch_size == 4
    assert args.zero_stage == 3 and args.huber_c == 0.2 and args.ddp_timeout == 5


def test_loss_type_and_log_with_accept_only_implemented_values():
    assert parse_args(["--loss_type", "l1"]).loss_type == "l1"
    assert parse_args(["--log_with", "tensorboard"]).log_with == "tensorboard"
    with pytest.raises(ArgsError, match="--loss_type huber is not supported.*l2 and l1"):
        parse_args(["--loss_type", "huber"])
    with pytest.raises(ArgsError, match="--log_with wandb is not supported.*TensorBoard"):
        parse_args(["--log_with", "wandb"])


def test_policy_tables_name_real_options_and_do_not_overlap():
    names = {spec.name for spec in args_module.OPTION_SPECS}
    assert set(ROW) <= names
    assert args_module.SUPPORTED <= names and set(args_module.HARMLESS) <= names
    assert set(args_module.UNSUPPORTED_REASONS) <= names
    assert not args_module.SUPPORTED & set(args_module.HARMLESS)
    assert not set(args_module.UNSUPPORTED_REASONS) & (args_module.SUPPORTED | set(args_module.HARMLESS))
    assert args_module.policy_of("network_args")[0] == "supported"
    assert args_module.policy_of("lowram")[0] == "harmless"
    assert args_module.policy_of("blocks_to_swap")[0] == "unsupported"
    assert args_module.policy_of("fp8_base")[0] == "supported"  # FLUX only: check_model_options refuses it on SD


@pytest.mark.parametrize("argv, words", [
    (["--use_8bit_adam", "--optimizer_type", "AdamW"], ["--use_8bit_adam", "--optimizer_type"]),
    (["--use_lion_optimizer", "--optimizer_type", "Lion"], ["--use_lion_optimizer", "--optimizer_type"]),
    (["--network_train_unet_only", "--network_train_text_encoder_only"], ["would train nothing"]),
    (["--full_fp16"], ["--full_fp16 requires --mixed_precision fp16"]),
    (["--dim_from_weights"], ["--network_weights"]),
    (["--cache_text_encoder_outputs"], ["--network_train_unet_only"]),
    (["--resolution", "512x512"], ["--resolution"]),
    (["--sdxl", "--v2"], ["--sdxl and --v2"]),
    (["--cache_latents", "--random_crop"], ["--cache_latents cannot be used with --random_crop"]),
])
def test_option_combinations_that_sd_scripts_refuses(argv, words):
    with pytest.raises(ArgsError) as error:
        parse_args(argv)
    for word in words:
        assert word in str(error.value)


def test_allowed_combinations_pass():
    args = parse_args(["--use_8bit_adam", "--full_bf16", "--mixed_precision", "bf16", "--resolution", "512,768",
                       "--cache_text_encoder_outputs", "--network_train_unet_only"])
    assert args.use_8bit_adam and args.full_bf16 and args.resolution == "512,768"


# --------------------------------------------------------------------------------------------------
# Command-line errors raise ArgsError, never sys.exit


def test_unknown_command_line_option_suggests_the_closest():
    with pytest.raises(ArgsError, match=r"unknown option --learnin_rate \(did you mean --learning_rate\?\)"):
        parse_args(["--learnin_rate", "1e-4"])
    with pytest.raises(ArgsError, match="did you mean --network_alpha"):
        parse_args(["--network_alhpa=2"])


def test_argparse_errors_raise_args_error():
    with pytest.raises(ArgsError, match="--mixed_precision: invalid choice: 'fp32'"):
        parse_args(["--mixed_precision", "fp32"])
    with pytest.raises(ArgsError, match="--max_train_steps: invalid int value: 'ten'"):
        parse_args(["--max_train_steps", "ten"])


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--pretrained_model_name_or_path" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# --output_config


def test_output_config_writes_only_non_defaults_and_refuses_to_overwrite(tmp_path, capsys):
    target = tmp_path / "saved"
    argv = ["--output_config", "--config_file", str(target), "--learning_rate", "1e-4", "--network_args", "a=1",
            "b=2", "--flip_aug", "--max_train_steps", str(table_default("max_train_steps")), "--wandb_api_key", "k",
            "--dataset_config", "data.toml"]
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 0
    written = tmp_path / "saved.toml"
    assert str(written) in capsys.readouterr().out
    assert toml.loads(written.read_text(encoding="utf-8")) == {
        "learning_rate": 1e-4, "network_args": ["a=1", "b=2"], "flip_aug": True, "dataset_config": "data.toml"}
    # the written file reads back to the same settings
    args = parse_args(["--config_file", str(written)])
    assert args.learning_rate == 1e-4 and args.network_args == ["a=1", "b=2"] and args.flip_aug
    # a second run does not overwrite it
    before = written.read_bytes()
    with pytest.raises(ArgsError, match="already exists"):
        parse_args(["--output_config", "--config_file", str(target), "--seed", "3"])
    assert written.read_bytes() == before


def test_output_config_needs_a_config_file_path_and_a_valid_command_line(tmp_path):
    with pytest.raises(ArgsError, match="give --config_file"):
        parse_args(["--output_config", "--seed", "1"])
    with pytest.raises(ArgsError, match="--blocks_to_swap is not supported"):
        parse_args(["--output_config", "--config_file", str(tmp_path / "x"), "--blocks_to_swap", "8"])
    assert not os.path.exists(tmp_path / "x.toml")
