"""The ``cellmae`` command line as a whole: start-up cost, option spelling, and how user errors look."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


def run_python(code: str, cwd=None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports this checkout's hf_cellmae."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd=cwd
    )


@pytest.mark.slow
def test_building_the_cellmae_parser_imports_neither_torch_nor_transformers_nor_pandas():
    result = run_python(
        """
        import sys
        import hf_cellmae.cli
        hf_cellmae.cli.build_parser()
        print(sorted(m for m in ("torch", "transformers", "datasets", "pandas") if m in sys.modules))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_import_hf_cellmae_still_registers_the_auto_classes_in_a_fresh_process(tmp_path):
    from hf_cellmae.configuration_cellmae import CellMAEConfig
    from hf_cellmae.modeling_cellmae import CellMAEForPreTraining

    CellMAEForPreTraining(CellMAEConfig.from_preset("tiny", image_size=32)).save_pretrained(tmp_path)
    result = run_python(
        f"""
        import hf_cellmae
        from transformers import AutoModel, AutoModelForPreTraining
        print(type(AutoModel.from_pretrained({str(tmp_path)!r})).__name__,
              type(AutoModelForPreTraining.from_pretrained({str(tmp_path)!r})).__name__)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["CellMAEModel", "CellMAEForPreTraining"]


@pytest.mark.slow
def test_a_model_class_imported_first_registers_the_auto_classes_too():
    result = run_python(
        """
        from hf_cellmae.modeling_cellmae import CellMAEModel
        from transformers import AutoConfig
        print(type(AutoConfig.for_model("cellmae")).__name__)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "CellMAEConfig"


def test_every_option_is_shown_with_dashes_in_every_commands_help():
    import argparse
    import re

    from hf_cellmae.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        if name == "pretrain":
            continue  # its options come from a dataclass, checked below
        assert not re.findall(r"--[a-z0-9-]*_[a-z0-9_-]*", command.format_help()), name


def test_pretrain_help_shows_dashed_options(capsys):
    import re

    import pytest

    from hf_cellmae.training.arguments import parse_pretraining_arguments

    with pytest.raises(SystemExit):
        parse_pretraining_arguments(["--help"])
    help_text = capsys.readouterr().out
    assert "--output-dir" in help_text and "--no-augment" in help_text
    assert not re.findall(r"--[a-z0-9-]*_[a-z0-9_-]*", help_text)


def test_options_accept_the_underscore_spelling_accelerate_users_type():
    from hf_cellmae.cli import build_parser
    from hf_cellmae.training.arguments import parse_pretraining_arguments

    args = build_parser().parse_args(
        ["evaluate", "emb", "--batch_col", "Metadata_plate", "--perturbation-col", "Metadata_gene"]
    )
    assert args.batch_col == "Metadata_plate" and args.perturbation_col == "Metadata_gene"
    assert build_parser().parse_args(["evaluate", "emb", "--batch", "P"]).batch_col == "P"  # abbreviations still work
    dashed = parse_pretraining_arguments(
        ["--data", "shards", "--output-dir", "run", "--max-steps", "3", "--no-augment"]
    )
    underscored = parse_pretraining_arguments(
        ["--data", "shards", "--output_dir", "run", "--max_steps", "3", "--no_augment"]
    )
    assert dashed == underscored
    assert (dashed.output_dir, dashed.max_steps, dashed.augment) == ("run", 3, False)


def test_cellmae_embed_reads_the_folder_cellmae_synthetic_wrote(tmp_path, capsys):
    from hf_cellmae.cli import main

    assert (
        main(
            [
                "synthetic",
                str(tmp_path / "plate"),
                "--plates",
                "1",
                "--field-size",
                "64",
                "--sites",
                "1",
                "--quiet",
                "--num-workers",
                "1",
            ]
        )
        == 0
    )
    code = main(
        ["embed", "pixel_stats", str(tmp_path / "plate"), str(tmp_path / "emb"), "--no-progress", "--on-error", "fail"]
    )
    assert code == 0, capsys.readouterr().err
    assert "embed: 60 fields" in capsys.readouterr().out


def test_cellmae_embed_with_a_missing_model_folder_says_so_in_one_line(tmp_path, capsys):
    from hf_cellmae.cli import main

    (tmp_path / "images").mkdir()
    assert main(["embed", str(tmp_path / "run" / "model"), str(tmp_path / "images"), str(tmp_path / "emb")]) == 2
    err = capsys.readouterr().err
    assert f"model folder {tmp_path / 'run' / 'model'} does not exist" in err and "cellmae pretrain" in err
    assert len(err.strip().splitlines()) == 1


def test_every_public_name_of_the_package_and_its_stages_resolves():
    import importlib

    for name in ("hf_cellmae", "hf_cellmae.data", "hf_cellmae.evaluation", "hf_cellmae.hub", "hf_cellmae.training"):
        module = importlib.import_module(name)
        for public in module.__all__:
            assert getattr(module, public) is not None, f"{name}.{public}"


class _FailsInTheWorker:
    """A dataset whose every item is a user error, raised inside a DataLoader worker process."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        from hf_cellmae.errors import UserError

        raise UserError("shard-00000.parquet field P1/A01/1: pixels fail their CRC-32 check; re-shard it")


def test_an_error_in_a_dataloader_worker_is_one_line_with_its_cause_and_fix():
    import pytest
    import torch

    from hf_cellmae.cli import one_line

    with pytest.raises(ValueError) as caught:
        next(iter(torch.utils.data.DataLoader(_FailsInTheWorker(), num_workers=1)))
    assert "Traceback" in str(caught.value)  # torch's wrapped message: the worker's whole traceback
    line = one_line(caught.value)
    assert "\n" not in line and "Traceback" not in line and 'File "' not in line
    assert line.startswith(
        "in DataLoader worker process 0: shard-00000.parquet field P1/A01/1: pixels fail their CRC-32 check; re-shard it"
    )
    assert "--dataloader-num-workers 0" in line


def test_cellmae_synthetic_takes_its_defaults_from_the_screen_dataclass():
    from dataclasses import asdict

    from hf_cellmae.cli import build_parser
    from hf_cellmae.data.commands import SYNTHETIC_OPTIONS
    from hf_cellmae.data.synthetic import SyntheticScreenConfig

    args = vars(build_parser().parse_args(["synthetic", "plate"]))
    defaults = asdict(SyntheticScreenConfig())
    assert {name: args[name] for name, _ in SYNTHETIC_OPTIONS.values()} == {
        name: defaults[name] for name, _ in SYNTHETIC_OPTIONS.values()
    }


def test_shard_embed_and_evaluate_options_and_their_defaults_come_from_one_dataclass_each():
    import argparse
    import dataclasses

    from hf_cellmae.cli import build_parser
    from hf_cellmae.data.shards import ShardOptions
    from hf_cellmae.evaluation.options import EmbedOptions, EvaluateOptions
    from hf_cellmae.options import field_default

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    hand_written = {"evaluate": {"baseline"}}  # --baseline NAME TABLE (repeatable) is not a dataclass field
    for command, positionals, options_class in (
        ("shard", ["in", "out"], ShardOptions),
        ("embed", ["model", "data", "out"], EmbedOptions),
        ("evaluate", ["table"], EvaluateOptions),
    ):
        fields = {field.name: field for field in dataclasses.fields(options_class)}
        options = {a.dest: a for a in commands[command]._actions if a.option_strings and a.dest != "help"}
        assert set(options) == set(fields) | hand_written.get(command, set()), command
        parsed = vars(parser.parse_args([command, *positionals]))
        for name, field in fields.items():
            assert parsed[name] == field_default(field), (command, name)
            assert options[name].choices == field.metadata.get("choices"), (command, name)


def test_the_featurisers_and_write_shards_default_to_the_options_dataclasses():
    import inspect

    from hf_cellmae.data.shards import ShardOptions, write_shards
    from hf_cellmae.evaluation.cellprofiler import CellProfilerFeaturizer
    from hf_cellmae.evaluation.embed import ModelFeaturizer
    from hf_cellmae.evaluation.options import EmbedOptions

    def defaults(function) -> dict:
        return {
            name: p.default for name, p in inspect.signature(function).parameters.items() if p.default is not p.empty
        }

    for function, options, renamed in (
        (write_shards, ShardOptions(), {"target_shard_size": "shard_size"}),
        (ModelFeaturizer, EmbedOptions(), {}),
        (CellProfilerFeaturizer, EmbedOptions(), {"num_workers": "measure_workers"}),
    ):
        shared = {
            param: renamed.get(param, param)
            for param in defaults(function)
            if hasattr(options, renamed.get(param, param))
        }
        assert len(shared) >= 5, function.__name__
        for param, name in shared.items():
            expected = getattr(options, name)
            default = defaults(function)[param]
            assert (list(default) if isinstance(default, tuple) else default) == expected, (function.__name__, param)
    assert defaults(write_shards)["shuffle"] is not ShardOptions().no_shuffle


def test_shard_folder_embed_dataset_and_evaluate_embeddings_take_the_options_whole_or_as_keywords():
    import inspect

    import pytest

    from hf_cellmae.data.shards import _SHARD_SETTINGS, ShardOptions, shard_folder
    from hf_cellmae.evaluation.embed import embed_dataset
    from hf_cellmae.evaluation.options import EmbedOptions, EvaluateOptions, embed_options, evaluate_options
    from hf_cellmae.evaluation.report import evaluate_embeddings
    from hf_cellmae.options import replace_options

    for function, options_class in (
        (shard_folder, ShardOptions),
        (embed_dataset, EmbedOptions),
        (evaluate_embeddings, EvaluateOptions),
    ):
        parameter = inspect.signature(function).parameters["options"]
        assert parameter.default is None and options_class.__name__ in str(parameter.annotation), function.__name__
    # the keywords Python callers have always passed set the options of the same meaning
    shard = replace_options(
        ShardOptions(),
        {"channel_names": "w1=DNA", "target_shard_size": "4MB", "shuffle": False, "progress": False, "num_workers": 1},
        _SHARD_SETTINGS,
    )
    assert (shard.channels, shard.shard_size, shard.no_shuffle, shard.quiet, shard.num_workers) == (
        "w1=DNA",
        "4MB",
        True,
        True,
        1,
    )
    assert embed_options(progress=False, channels="w1=DNA").no_progress is True
    assert evaluate_options(progress=False).no_progress is True
    given = EmbedOptions(fields_per_batch=2)
    assert embed_options(given, num_workers=0).fields_per_batch == 2 and given.num_workers is None  # not changed
    with pytest.raises(TypeError, match="'workers' is not a setting of ShardOptions"):
        shard_folder("images", "shards", workers=2)


def test_the_demos_help_and_the_readme_state_the_same_measured_time(capsys):
    """Issue 24: the help said "a few minutes", the README "about 8 minutes", the runs 493 s idle and 1,639 s loaded."""
    import pytest

    from hf_cellmae.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    readme = " ".join(open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md")).read().split())
    for measured in (
        "8 min 42 s on 2 idle CPU cores",  # issue 25's 1,600 steps, one idle run
        "400-step demo before it took 493 s",
    ):
        assert measured in help_text and measured in readme, measured
    assert "few minutes" not in help_text


def test_an_error_after_a_progress_bar_starts_on_a_line_of_its_own(tmp_path, capsys):
    from hf_cellmae.cli import main
    from hf_cellmae.data.shards import shard_folder
    from tests.helpers.data_fixtures import flip_pixel_byte, make_rxrx_plate

    make_rxrx_plate(tmp_path / "images", plates=1, wells=("A01", "A02"), sites=2)
    shard_folder(tmp_path / "images", tmp_path / "shards", num_workers=1, progress=False, shuffle=False)
    flip_pixel_byte(tmp_path / "shards" / "shard-00000.parquet")
    capsys.readouterr()
    assert main(["embed", "pixel_stats", str(tmp_path / "shards"), str(tmp_path / "emb")]) == 2
    err = capsys.readouterr().err
    assert "%|" in err  # a bar was drawn
    error = next(line for line in err.split("\n") if "error:" in line)
    assert error.startswith("cellmae embed: error:"), repr(error)


@pytest.mark.slow
def test_a_warning_during_a_progress_bar_gets_a_line_of_its_own(tmp_path):
    import numpy as np
    import tifffile

    from hf_cellmae import CellMAEConfig, CellMAEForPreTraining

    CellMAEForPreTraining(CellMAEConfig.from_preset("tiny", hidden_size=32, decoder_hidden_size=32)).save_pretrained(
        tmp_path / "model"
    )
    images = tmp_path / "images"
    images.mkdir()
    for well in ("A01", "A02", "A03"):
        for channel in (1, 2):
            tifffile.imwrite(
                images / f"plate1_{well}_site1_Ch{channel}.tif", np.full((64, 64), 100 * channel, np.uint16)
            )
    result = run_python(f"""
        import sys
        from hf_cellmae.cli import main
        sys.exit(main(["embed", {str(tmp_path / "model")!r}, {str(images)!r}, {str(tmp_path / "emb")!r}, "--fields-per-batch", "1"]))
    """)
    assert result.returncode == 0, result.stderr
    warning = next(line for line in result.stderr.split("\n") if "matched by position" in line)
    assert "%|" not in warning and "UserWarning" in warning, repr(warning)


def test_a_model_folder_with_only_a_crafted_pickle_is_refused_in_one_line_without_running_it(tmp_path, capsys):
    import torch

    from hf_cellmae import CellMAEConfig, CellMAEModel
    from hf_cellmae.cli import main

    marker = tmp_path / "code-ran"

    class CreatesMarker:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    model = CellMAEModel(
        CellMAEConfig.from_preset("tiny", image_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    model.config.save_pretrained(tmp_path / "model")
    torch.save({"payload": CreatesMarker(), **model.state_dict()}, tmp_path / "model" / "pytorch_model.bin")
    (tmp_path / "images").mkdir()
    code = main(["embed", str(tmp_path / "model"), str(tmp_path / "images"), str(tmp_path / "emb")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and not marker.exists()
    assert len(error.splitlines()) == 1, error
    assert f"{tmp_path / 'model'}" in error and "pytorch_model.bin" in error and "not loaded" in error
    assert "weights_only=False" not in error
