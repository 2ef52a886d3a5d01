"""`cellmae pretrain` before training starts: shipped configs by name, `--model-preset` against a config's
sizes, the memory estimate (checked against a measured step) and the refusal of a run a CPU cannot hold."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hf_cellmae import CellMAEConfig
from hf_cellmae.training import memory
from hf_cellmae.training.arguments import parse_pretraining_arguments, shipped_configs

REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_config_is_reachable_by_name_and_states_its_hardware():
    shipped = shipped_configs()
    assert {"camae_vit_b16_cellpainting", "vit_s16_rxrx1", "vit_l8_scale", "demo_cpu", "small_cpu"} <= set(shipped)
    for name, path in shipped.items():
        assert path.parent == REPO / "hf_cellmae" / "configs"  # inside the package: in the wheel (package-data)
        args = parse_pretraining_arguments(["--config", name, "--data", "shards"])
        CellMAEConfig.from_preset(args.model_preset, **args.overrides)
        assert any(line.startswith("# Hardware: ") for line in path.read_text().splitlines()), name


def test_examples_configs_are_links_to_the_shipped_files_not_copies():
    for example in (REPO / "examples" / "configs").glob("*.yaml"):
        assert example.is_symlink(), example
        assert example.resolve() == shipped_configs()[example.stem].resolve()


def test_an_unknown_config_name_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="camae_vit_b16_cellpainting"):
        parse_pretraining_arguments(["--config", "no_such_config", "--data", "shards"])


def test_model_preset_on_the_command_line_drops_the_configs_size_overrides_and_says_so(capsys):
    args = parse_pretraining_arguments(
        ["--config", "camae_vit_b16_cellpainting", "--data", "shards", "--model-preset", "tiny"]
    )
    assert args.model_preset == "tiny"
    assert "image_size" not in args.overrides  # the config's 256 px no longer wins over the tiny preset's 64 px
    assert (
        args.overrides["decoder_type"] == "shared" and args.overrides["fourier_loss_weight"] == 0.01
    )  # not size: kept
    assert CellMAEConfig.from_preset(args.model_preset, **args.overrides).image_size == 64
    err = capsys.readouterr().err
    assert "image_size=256" in err and "dropped" in err


def test_model_overrides_typed_with_the_preset_are_kept_and_merge_with_the_configs():
    args = parse_pretraining_arguments(
        [
            "--config",
            "camae_vit_b16_cellpainting",
            "--data",
            "shards",
            "--model-preset",
            "tiny",
            "--model-overrides",
            '{"image_size": 32}',
        ]
    )
    assert args.overrides["image_size"] == 32 and args.overrides["decoder_type"] == "shared"
    same_preset = parse_pretraining_arguments(["--config", "camae_vit_b16_cellpainting", "--data", "shards"])
    assert same_preset.overrides["image_size"] == 256  # without --model-preset the config stays as written


def test_decoder_preset_sets_the_decoder_size_over_the_configs_and_model_overrides_still_win(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model_preset: vit_s16\nmodel_overrides:\n  decoder_hidden_size: 384\n  mask_ratio: 0.6\n")
    args = parse_pretraining_arguments(["--config", str(config), "--data", "shards", "--decoder-preset", "light"])
    built = CellMAEConfig.from_preset(args.model_preset, **args.overrides)
    assert (built.decoder_hidden_size, built.decoder_num_hidden_layers, built.decoder_num_attention_heads) == (
        256,
        4,
        8,
    )
    assert built.mask_ratio == 0.6 and built.hidden_size == 384  # the rest of the config and the encoder stay
    assert "decoder_hidden_size=384" in capsys.readouterr().err
    typed = parse_pretraining_arguments(
        [
            "--data",
            "shards",
            "--model-preset",
            "vit_s16",
            "--decoder-preset",
            "light",
            "--model-overrides",
            '{"decoder_num_hidden_layers": 2}',
        ]
    )
    assert CellMAEConfig.from_preset(typed.model_preset, **typed.overrides).decoder_num_hidden_layers == 2
    with pytest.raises(ValueError, match="decoder_preset='huge' is not one of"):
        parse_pretraining_arguments(["--data", "shards", "--decoder-preset", "huge"])
    with pytest.raises(ValueError, match="--decoder-preset applies to --model-type cellmae"):
        parse_pretraining_arguments(["--data", "shards", "--model-type", "munet", "--decoder-preset", "light"])


@pytest.mark.slow
def test_pretrain_help_imports_neither_torch_nor_transformers():
    code = textwrap.dedent(
        """
        import sys
        from hf_cellmae.cli import main
        try:
            main(["pretrain", "--help"])
        except SystemExit:
            pass
        print(sorted(m for m in ("torch", "transformers", "datasets") if m in sys.modules))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "--model-preset" in result.stdout and "camae_vit_b16_cellpainting" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_a_cpu_run_that_cannot_fit_is_refused_with_the_estimate_and_a_batch_that_fits(
    synthetic_shards, tmp_path, monkeypatch, capsys
):
    from hf_cellmae.cli import main

    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 4 * 2**30)
    code = main(
        [
            "pretrain",
            "--config",
            "camae_vit_b16_cellpainting",
            "--data",
            str(synthetic_shards),
            "--output-dir",
            str(tmp_path / "run"),
            "--mixed-precision",
            "no",
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 2 and len([line for line in err.splitlines() if "error" in line]) == 1
    )  # (and the CPU's settings line)
    assert "GiB" in err and "4.0 GiB available" in err and "--per-device-train-batch-size" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything was written
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 1 * 2**30)
    assert (
        main(
            [
                "pretrain",
                "--config",
                "vit_l8_scale",
                "--data",
                str(synthetic_shards),
                "--output-dir",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    assert "--model-preset tiny" in capsys.readouterr().err


def test_the_cpu_demo_config_fits_the_memory_it_states():
    config = shipped_configs()["demo_cpu"]
    args = parse_pretraining_arguments(["--config", str(config), "--data", "shards"])
    estimate = memory.estimate_training_memory(
        CellMAEConfig.from_preset(args.model_preset, **args.overrides),
        args.per_device_train_batch_size,
        5,
        args.optimizer,
    )
    assert estimate.total < 1.0 * 2**30


def test_the_memory_check_leaves_a_munet_run_alone_and_says_so():
    from hf_cellmae.training.arguments import PretrainingArguments

    said = []
    args = PretrainingArguments(data="shards", model_type="munet", model_preset="munet_l")
    assert memory.check_training_memory(args, announce=said.append) is None
    assert said and "model_type=munet" in said[0]


def test_the_memory_check_takes_the_launchers_open_defaults(synthetic_shards):
    """`mixed_precision="auto"` and `dataloader_num_workers=None` (resolved per device by the loop) are estimated
    as the loop resolves them on a CPU: fp32, no worker processes."""
    args = parse_pretraining_arguments(["--config", "demo_cpu", "--data", str(synthetic_shards)])
    assert args.mixed_precision == "auto" and args.dataloader_num_workers is None
    estimate = memory.check_training_memory(args)
    assert estimate is not None and estimate.total < 1.0 * 2**30


CPU_ONLY = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="what a machine without CUDA does")


def test_a_cpu_replaces_the_gpu_configs_precision_compile_and_workers_but_keeps_typed_flags():
    from hf_cellmae.training.device_defaults import settings_for_a_cpu

    config = {"mixed_precision": "bf16", "torch_compile": True, "dataloader_num_workers": 8, "max_steps": 200000}
    assert settings_for_a_cpu(config, typed=set(), cpus=2) == {
        "mixed_precision": "no",
        "torch_compile": False,
        "dataloader_num_workers": 0,
    }
    assert settings_for_a_cpu(config, typed={"mixed_precision", "dataloader_num_workers"}, cpus=2) == {
        "torch_compile": False
    }
    assert settings_for_a_cpu({"dataloader_num_workers": 1}, typed=set(), cpus=2) == {}  # fits beside the compute


@CPU_ONLY
def test_a_gpu_config_on_a_cpu_is_refused_with_time_and_memory_unless_max_steps_is_given(
    synthetic_shards, tmp_path, capsys
):
    """The README's old CPU advice (issue 24): the ViT-B/16 config with --model-preset tiny started 200,000 steps."""
    from hf_cellmae.cli import main

    run = [
        "pretrain",
        "--config",
        "camae_vit_b16_cellpainting",
        "--data",
        str(synthetic_shards),
        "--model-preset",
        "tiny",
        "--output-dir",
        str(tmp_path / "run"),
        "--report-to",
        "none",
        "--progress-bar",
        "false",
        "--figure-steps",
        "0",
    ]
    assert main(run) == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "error" in line]
    assert len(error_lines) == 1, err
    for words in ("sized for GPUs", "200,000 steps of batch 64", "GiB", "--max-steps N", "--config demo_cpu"):
        assert words in error_lines[0]
    assert re.search(r"would take about [\d,]+ (hours|days)", error_lines[0]), error_lines[0]
    assert "mixed_precision=bf16 -> no" in err and "dataloader_num_workers=8 -> 0" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


@CPU_ONLY
def test_a_gpu_config_on_a_cpu_with_max_steps_trains_in_fp32_eager_without_workers(synthetic_shards, tmp_path, capsys):
    from hf_cellmae.cli import main

    assert (
        main(
            [
                "pretrain",
                "--config",
                "camae_vit_b16_cellpainting",
                "--data",
                str(synthetic_shards),
                "--model-preset",
                "tiny",
                "--max-steps",
                "1",
                "--per-device-train-batch-size",
                "4",
                "--output-dir",
                str(tmp_path / "run"),
                "--report-to",
                "none",
                "--progress-bar",
                "false",
                "--figure-steps",
                "0",
            ]
        )
        == 0
    )
    assert "mixed_precision=bf16 -> no" in capsys.readouterr().err
    args = json.loads((tmp_path / "run" / "model" / "training_args.json").read_text())
    assert args["mixed_precision"] == "no" and args["dataloader_num_workers"] == 0
    state = json.loads((tmp_path / "run" / "model" / "trainer_state.json").read_text())
    assert state["hardware"]["mixed_precision"] == "no"  # what the card's compute table shows
