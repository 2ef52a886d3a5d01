"""Pre-training: arguments, optimisation, checkpoints, the Accelerate loop, exact resume after a real kill,
two real processes, and learning on real Cell Painting images."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_cellmae import CellMAEConfig, CellMAEForPreTraining
from hf_cellmae.training.arguments import PretrainingArguments, parse_pretraining_arguments
from hf_cellmae.training.checkpoints import list_checkpoints, resolve_checkpoint
from hf_cellmae.training.loop import NonFiniteLossError, pretrain
from hf_cellmae.training.optimization import Lion, build_scheduler, parameter_groups
from tests.helpers.launching import TWO_CPU_PROCESSES, cpu_launch_env, run_all_or_kill
from tests.helpers.scripts import load_script

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY = json.dumps(
    {
        "image_size": 32,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "decoder_hidden_size": 32,
        "decoder_num_hidden_layers": 1,
        "decoder_num_attention_heads": 2,
    }
)


def run_args(shards, out, **overrides) -> list[str]:
    values = dict(
        data=str(shards),
        output_dir=str(out),
        model_overrides=TINY,
        max_steps=12,
        per_device_train_batch_size=4,
        save_steps=4,
        logging_steps=1,
        figure_steps=0,
        report_to="none",
        progress_bar=False,
        optimizer="adamw",
        learning_rate=1e-3,
        crops_per_field=2,
    )
    values.update(overrides)
    return [f"--{k}={v}" for k, v in values.items()]


def cli(*args: str, env=None, **kwargs) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "hf_cellmae.cli", *args], capture_output=True, text=True, env=environment, **kwargs
    )


# ------------------------------------------------------------------------------------------- arguments
def test_config_file_gives_defaults_and_flags_override_them(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data: shards\nmax_steps: 50\nlearning_rate: 0.0003\nmodel_overrides:\n  image_size: 128\n")
    args = parse_pretraining_arguments(["--config", str(config), "--max_steps", "7"])
    assert (args.data, args.max_steps, args.learning_rate) == ("shards", 7, 3e-4)
    assert args.overrides == {"image_size": 128}


def test_unknown_keys_and_bad_choices_in_a_config_are_errors(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data: shards\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown keys \['learning_rat'\]"):
        parse_pretraining_arguments(["--config", str(config)])
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        PretrainingArguments(data="x", optimizer="sgd")


def test_shipped_training_configs_are_valid_arguments():
    configs = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.yaml"))
    configs.append(Path(__file__).resolve().parents[1] / "hf_cellmae" / "configs" / "demo_cpu.yaml")
    assert len(configs) >= 4
    for path in configs:
        args = parse_pretraining_arguments(["--config", str(path), "--data", "shards"])
        CellMAEConfig.from_preset(args.model_preset, **args.overrides)


# -------------------------------------------------------------------------------------------- optimisation
def test_weight_decay_skips_norms_biases_layer_scale_and_tokens():
    model = CellMAEForPreTraining(CellMAEConfig.from_preset("tiny", use_channel_embeddings=True))
    decay, no_decay = parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "cellmae.encoder.layers.0.in_proj.weight" in decayed
    assert not any(
        k in n
        for n in decayed
        for k in ("bias", "norm", "layer_scale", "cls_token", "mask_token", "channel_embeddings")
    )
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_lion_step_is_the_sign_of_the_interpolated_momentum():
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    optimizer = Lion([param], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    param.grad = torch.tensor([0.3, -0.2, 0.0])
    optimizer.step()
    decayed = torch.tensor([1.0, -2.0, 3.0]) * (1 - 0.1 * 0.5)
    torch.testing.assert_close(param.data, decayed - 0.1 * torch.tensor([1.0, -1.0, 0.0]))
    torch.testing.assert_close(optimizer.state[param]["exp_avg"], 0.01 * torch.tensor([0.3, -0.2, 0.0]))


@pytest.mark.parametrize("optimizer_name", ["lion", "adamw"])
def test_a_step_flagged_on_the_device_leaves_weights_and_optimizer_state_untouched(optimizer_name):
    from hf_cellmae.training.optimization import build_optimizer, skip_step_if, skips_on_device

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = build_optimizer(model, optimizer_name, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    assert skips_on_device(optimizer)  # our Lion, torch's fused AdamW
    model(torch.randn(2, 4)).sum().backward()
    skip_step_if(optimizer, torch.tensor(0.0))
    optimizer.step()  # a real step fills the optimizer state
    before = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()]
    for param in model.parameters():
        param.grad = torch.full_like(param, float("nan"))
    skip_step_if(optimizer, torch.tensor(1.0))
    optimizer.step()
    for param, old, old_state in zip(model.parameters(), before, state):
        assert torch.equal(param, old)
        assert all(torch.equal(optimizer.state[param][k], v) for k, v in old_state.items())
    model(torch.randn(2, 4)).sum().backward()
    skip_step_if(optimizer, torch.tensor(0.0))
    optimizer.step()
    assert not torch.equal(next(model.parameters()), before[0])


def test_lion_foreach_kernels_give_the_per_parameter_update_over_several_steps():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    expected = [p.detach().clone() for p in params]
    momenta = [torch.zeros_like(p) for p in params]
    optimizer = Lion(params, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for param, grad, value, momentum in zip(params, grads, expected, momenta):
            param.grad = grad
            value.mul_(1 - 0.01 * 0.1).add_((0.9 * momentum + 0.1 * grad).sign(), alpha=-0.01)
            momentum.mul_(0.99).add_(grad, alpha=0.01)
        optimizer.step()
    for param, value in zip(params, expected):
        torch.testing.assert_close(param.detach(), value)


def test_one_cycle_schedule_warms_up_to_the_peak_then_anneals():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = build_scheduler(optimizer, "one_cycle", max_steps=100, warmup_ratio=0.1)
    rates = []
    for _ in range(100):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    peak = int(np.argmax(rates))
    assert 8 <= peak <= 12 and rates[peak] == pytest.approx(1e-3, rel=1e-2)
    assert rates[0] < 1e-4 and rates[-1] < 1e-5
    assert all(a >= b for a, b in zip(rates[peak:], rates[peak + 1 :]))


def test_latest_checkpoint_ignores_partial_folders(tmp_path):
    for name in ("checkpoint-4", "checkpoint-12", ".partial-checkpoint-16", "checkpoint-8"):
        (tmp_path / name).mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-12"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_checkpoint(str(tmp_path / "checkpoint-4"), tmp_path)


# ------------------------------------------------------------------------------------------------ the loop
def test_raw_crops_are_standardised_on_the_device_exactly_as_the_processor_does():
    from hf_cellmae.image_processing_cellmae import standardize_channels
    from hf_cellmae.training.loop import collate, to_model_input

    rng = np.random.default_rng(0)
    crops16 = [rng.integers(0, 65535, (5, 16, 16)).astype(np.uint16) for _ in range(2)]
    batch = collate([{"pixel_values": c, "channel_ids": np.arange(5)} for c in crops16])
    assert batch["pixel_values"].dtype == torch.uint16  # 2 bytes per pixel through the loader
    np.testing.assert_allclose(
        to_model_input(batch["pixel_values"], "cpu").numpy(), standardize_channels(np.stack(crops16)), atol=1e-5
    )
    mixed = [crops16[0], (crops16[1] // 257).astype(np.uint8)]  # 16- and 8-bit plates in one batch
    out = to_model_input(
        collate([{"pixel_values": c, "channel_ids": np.arange(5)} for c in mixed])["pixel_values"], "cpu"
    )
    np.testing.assert_allclose(out[1].numpy(), standardize_channels(mixed[1]), atol=1e-5)


@pytest.mark.slow
def test_pretraining_writes_a_loadable_model_folder_checkpoints_and_logs(synthetic_shards, tmp_path):
    summary = pretrain(
        parse_pretraining_arguments(run_args(synthetic_shards, tmp_path, figure_steps=6, save_total_limit=2))
    )
    model_dir = Path(summary["model_dir"])
    assert summary["global_step"] == 12
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-8", "checkpoint-12"]
    assert {
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "modeling_cellmae.py",
        "training_args.json",
        "trainer_state.json",
        "reconstruction.png",
    } <= {p.name for p in model_dir.iterdir()}
    state = json.loads((model_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 12 and state["images_seen"] == 48
    assert [r["step"] for r in state["log_history"]] == list(range(1, 13))
    assert {"loss", "mse_loss", "fourier_loss", "learning_rate", "grad_norm", "images_per_s", "tokens_per_s"} <= set(
        state["log_history"][0]
    )
    assert state["dataset"]["channels"] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert sorted(p.name for p in (tmp_path / "figures").glob("*.png")) == [
        "reconstruction-step000006.png",
        "reconstruction-step000012.png",
    ]
    model = CellMAEForPreTraining.from_pretrained(model_dir)
    assert model.config.channel_names == ["DNA", "ER", "RNA", "AGP", "Mito"]


def test_non_finite_losses_are_skipped_counted_and_abort_the_run(synthetic_shards, tmp_path, monkeypatch):
    original = CellMAEForPreTraining.forward
    calls = {"n": 0}

    def sometimes_nan(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in (3, 4):
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(CellMAEForPreTraining, "forward", sometimes_nan)
    summary = pretrain(parse_pretraining_arguments(run_args(synthetic_shards, tmp_path / "a", max_steps=6)))
    state = json.loads((Path(summary["model_dir"]) / "trainer_state.json").read_text())
    assert state["nonfinite_steps"] == 2 and state["global_step"] == 6

    def always_nan(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(CellMAEForPreTraining, "forward", always_nan)
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses"):
        pretrain(parse_pretraining_arguments(run_args(synthetic_shards, tmp_path / "b", max_nonfinite_steps=2)))


# Python-level reads of a tensor's value: on a GPU each makes the host wait until the device has caught up.
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__format__")
# The model's own input checks, which issue 13 moves out of `forward` to the data boundary (the model's part of item 1).
MODEL_INPUT_CHECKS = {"validate_pixel_values", "resolve_channel_ids"}


@pytest.mark.parametrize("optimizer", ["adamw", "lion"])
def test_a_training_step_reads_nothing_from_the_device_between_logging_boundaries(
    optimizer, synthetic_shards, tmp_path, monkeypatch
):
    """Counts every host read of a tensor value during the steady-state steps (after the first logging
    boundary, before the last): only `LoggingWindow.read`, once per window, may read."""
    import traceback

    from hf_cellmae.training import loop

    events, recording = [], {"on": False}

    def counted(name, original):
        def read_value(self, *args, **kwargs):
            if recording["on"]:
                events.append((name, traceback.extract_stack()[:-1]))
            return original(self, *args, **kwargs)

        return read_value

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    recording["on"] = True
    assert bool(torch.tensor(True)) and [name for name, _ in events] == ["__bool__"]  # the counter sees reads
    events.clear()
    recording["on"] = False
    window_read = loop.LoggingWindow.read

    def logging_boundary(self, accelerator):
        recording["on"] = False
        events.append(("logging boundary", None))
        result = window_read(self, accelerator)
        recording["on"] = True
        return result

    monkeypatch.setattr(loop.LoggingWindow, "read", logging_boundary)
    pretrain(
        parse_pretraining_arguments(
            run_args(
                synthetic_shards,
                tmp_path,
                max_steps=6,
                logging_steps=2,
                save_steps=6,
                gradient_accumulation_steps=2,
                optimizer=optimizer,
            )
        )
    )
    boundaries = [i for i, (name, _) in enumerate(events) if name == "logging boundary"]
    assert len(boundaries) == 3
    in_steady_state = [(name, stack) for name, stack in events[boundaries[0] : boundaries[-1]] if stack is not None]
    loop_reads = [
        (name, stack) for name, stack in in_steady_state if not MODEL_INPUT_CHECKS & {frame.name for frame in stack}
    ]
    where = ["".join(traceback.format_list(stack[-4:])) for _, stack in loop_reads[:3]]
    assert not loop_reads, f"{len(loop_reads)} host reads in 4 steady-state optimizer steps; the first:\n" + "\n".join(
        where
    )


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_losses_and_weights(synthetic_shards, tmp_path):
    steps = ["--max_steps=40", "--save_steps=5"]
    reference = cli("pretrain", *run_args(synthetic_shards, tmp_path / "reference"), *steps, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "hf_cellmae.cli", "pretrain", *run_args(synthetic_shards, interrupted), *steps],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.time() + 300
    while (
        not (interrupted / "checkpoints" / "checkpoint-10").exists()
        and time.time() < deadline
        and process.poll() is None
    ):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # a real kill, mid-run
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (interrupted / "model").exists(), "the run finished before it could be killed"
    resumed_from = resolve_checkpoint("latest", interrupted / "checkpoints")
    assert 10 <= int(resumed_from.name.split("-")[1]) < 40

    resumed = cli(
        "pretrain", *run_args(synthetic_shards, interrupted), *steps, "--resume_from_checkpoint=latest", timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from {resumed_from}" in resumed.stdout + resumed.stderr

    expected = load_file(str(tmp_path / "reference" / "model" / "model.safetensors"))
    got = load_file(str(interrupted / "model" / "model.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key

    def history(run):
        return [
            (r["step"], r["loss"])
            for r in json.loads((run / "model" / "trainer_state.json").read_text())["log_history"]
        ]

    assert history(interrupted) == history(tmp_path / "reference")


@pytest.mark.slow
def test_a_run_with_dataloader_workers_resumes_to_the_same_weights(synthetic_shards, tmp_path):
    pytest.importorskip(
        "torchdata", reason="exact resume with DataLoader workers needs torchdata (pip install torchdata)"
    )
    options = dict(max_steps=8, save_steps=4, dataloader_num_workers=1)
    reference = cli("pretrain", *run_args(synthetic_shards, tmp_path / "reference", **options), timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "reference" / "checkpoints" / "checkpoint-4", run / "checkpoints" / "checkpoint-4")
    resumed = cli(
        "pretrain", *run_args(synthetic_shards, run, **options), "--resume_from_checkpoint=latest", timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = load_file(str(tmp_path / "reference" / "model" / "model.safetensors"))
    got = load_file(str(run / "model" / "model.safetensors"))
    assert all(torch.equal(expected[k], got[k]) for k in expected)


# ----------------------------------------------------------------------------------- two real processes
PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    from accelerate import Accelerator
    from hf_cellmae.training.arguments import parse_pretraining_arguments
    from hf_cellmae.training.loop import build_model, collate, to_model_input, training_stream
    from hf_cellmae.data.shards import load_manifest

    args = parse_pretraining_arguments(sys.argv[2:])
    accelerator = Accelerator()
    manifest = load_manifest(args.data)
    model = build_model(args, manifest)
    config, vocabulary = model.config, model.config.channel_names
    stream = training_stream(args, config, vocabulary, accelerator.process_index, accelerator.num_processes)
    seen = []
    for i, sample in enumerate(stream):
        if i == 12:
            break
        seen.append((sample["field_id"], sample["crop_index"], sample["epoch"]))
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    loader = torch.utils.data.DataLoader(training_stream(args, config, vocabulary, accelerator.process_index, accelerator.num_processes), batch_size=4, collate_fn=collate)
    for step, batch in zip(range(3), loader):
        loss = model(to_model_input(batch["pixel_values"], accelerator.device), channel_ids=batch["channel_ids"]).loss
        accelerator.backward(loss)
        optimizer.step(); optimizer.zero_grad()
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
    gathered = accelerator.gather_for_metrics([{"rank": accelerator.process_index, "seen": seen, "checksum": checksum}], use_gather_object=True)
    if accelerator.is_main_process:
        open(sys.argv[1], "w").write(json.dumps(gathered))
    # End as `pretrain` does: a barrier (its wait lets gloo's worker thread release the gathered tensors), then
    # the process group destroyed while the interpreter still runs (left to exit, gloo can abort both ranks).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    """
)


@pytest.mark.slow
def test_two_ranks_see_disjoint_data_and_keep_identical_parameters(synthetic_shards, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *TWO_CPU_PROCESSES,
        str(probe),
        str(tmp_path / "ranks.json"),
        *run_args(synthetic_shards, tmp_path / "run"),
    ]
    result = run_all_or_kill(command, cpu_launch_env(), 600, "the two ranks did not finish")
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    first, second = ({tuple(s) for s in r["seen"]} for r in ranks)
    assert len(first) == len(second) == 12 and not first & second
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


# Checkpoint and resume on two ranks, with the shipped DDP and FSDP launch configs: tests/test_distributed.py.


def test_resuming_a_one_cycle_run_with_other_max_steps_is_refused(synthetic_shards, tmp_path):
    pretrain(parse_pretraining_arguments(run_args(synthetic_shards, tmp_path, max_steps=4, save_steps=2)))
    with pytest.raises(ValueError, match="max_steps=4; the one-cycle schedule is fixed by it"):
        pretrain(
            parse_pretraining_arguments(
                run_args(synthetic_shards, tmp_path, max_steps=8, resume_from_checkpoint="latest")
            )
        )


def test_resuming_with_arguments_that_change_the_result_is_refused_naming_them(
    finished_run, synthetic_shards, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(finished_run / "checkpoints" / "checkpoint-2", run / "checkpoints" / "checkpoint-2")
    changed = dict(seed=1, learning_rate=2e-3, per_device_train_batch_size=2, data=str(synthetic_shards) + "_other")
    with pytest.raises(
        ValueError,
        match=r"checkpoint-2 was written with other arguments that change the result: "
        r"data .*_other, per_device_train_batch_size 4 -> 2, learning_rate 0.001 -> 0.002, "
        r"seed 0 -> 1; .*--allow-changed-args",
    ):
        pretrain(
            parse_pretraining_arguments(
                run_args(synthetic_shards, run, max_steps=4, save_steps=2, resume_from_checkpoint="latest", **changed)
            )
        )
    assert not (run / "model").exists()


def test_resuming_with_changed_arguments_goes_on_with_allow_changed_args(finished_run, synthetic_shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run / "checkpoints" / "checkpoint-2", run / "checkpoints" / "checkpoint-2")
    summary = pretrain(
        parse_pretraining_arguments(
            run_args(
                synthetic_shards,
                run,
                max_steps=4,
                save_steps=2,
                seed=1,
                resume_from_checkpoint="latest",
                allow_changed_args=True,
            )
        )
    )
    assert summary["global_step"] == 4


def test_resuming_with_only_logging_and_saving_options_changed_is_accepted(finished_run, synthetic_shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run / "checkpoints" / "checkpoint-2", run / "checkpoints" / "checkpoint-2")
    summary = pretrain(
        parse_pretraining_arguments(
            run_args(
                synthetic_shards, run, max_steps=4, save_steps=1, logging_steps=2, resume_from_checkpoint="latest"
            )
        )
    )
    assert summary["global_step"] == 4


# ------------------------------------------------------------------------ untrusted checkpoints, clean failures
class _CreatesMarkerWhenUnpickled:
    """A pickled object that creates `path` when loaded: what a crafted checkpoint could do."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def finished_run(synthetic_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished")
    pretrain(parse_pretraining_arguments(run_args(synthetic_shards, run, max_steps=4, save_steps=2)))
    return run


def one_line_error(capsys) -> str:
    """The one line `cellmae` printed for an error (no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cellmae ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_checkpoints_keep_the_scheduler_state_as_json_and_no_accelerate_custom_pickle(finished_run):
    checkpoint = finished_run / "checkpoints" / "checkpoint-2"
    names = {p.name for p in checkpoint.iterdir()}
    assert "scheduler_state.json" in names and not [n for n in names if n.startswith("custom_checkpoint_")]
    assert json.loads((checkpoint / "scheduler_state.json").read_text())["last_epoch"] == 2


@pytest.mark.parametrize("crafted", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"])
def test_resuming_from_a_crafted_checkpoint_runs_none_of_its_code_and_says_why_in_one_line(
    crafted, finished_run, synthetic_shards, tmp_path, capsys
):
    from hf_cellmae.cli import main

    run = tmp_path / "run"
    checkpoint = Path(
        shutil.copytree(finished_run / "checkpoints" / "checkpoint-2", run / "checkpoints" / "checkpoint-2")
    )
    if (
        crafted == "custom_checkpoint_0.pkl"
    ):  # how earlier versions stored the scheduler; the JSON state takes precedence
        (checkpoint / "scheduler_state.json").unlink(missing_ok=True)
    marker = tmp_path / "code-ran"
    torch.save({"state": _CreatesMarkerWhenUnpickled(marker)}, checkpoint / crafted)
    code = main(
        ["pretrain", *run_args(synthetic_shards, run, max_steps=4, save_steps=2, resume_from_checkpoint="latest")]
    )
    assert not marker.exists(), f"resuming ran code from {crafted}"
    message = one_line_error(capsys)
    assert code == 2
    assert (
        f"{checkpoint / crafted} is not trusted" in message
        and "io.open" in message
        and "--resume-from-checkpoint" in message
    )
    assert "weights_only=False" not in message


def test_a_checkpoint_with_the_pickled_scheduler_of_earlier_versions_still_resumes_exactly(
    finished_run, synthetic_shards, tmp_path
):
    run = tmp_path / "run"
    checkpoint = Path(
        shutil.copytree(finished_run / "checkpoints" / "checkpoint-2", run / "checkpoints" / "checkpoint-2")
    )
    scheduler_state = json.loads((checkpoint / "scheduler_state.json").read_text())
    (checkpoint / "scheduler_state.json").unlink()
    torch.save(
        scheduler_state, checkpoint / "custom_checkpoint_0.pkl"
    )  # as accelerate's register_for_checkpointing wrote it
    pretrain(
        parse_pretraining_arguments(
            run_args(synthetic_shards, run, max_steps=4, save_steps=2, resume_from_checkpoint="latest")
        )
    )
    expected = load_file(str(finished_run / "model" / "model.safetensors"))
    got = load_file(str(run / "model" / "model.safetensors"))
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_sharded_fsdp_metadata_is_checked_with_an_allow_list_before_torch_unpickles_it(tmp_path):
    """torch.distributed.checkpoint reads `.metadata` with plain pickle.load: a genuine one passes, a crafted one is refused."""
    import torch.distributed.checkpoint as dcp

    from hf_cellmae.errors import UntrustedFileError
    from hf_cellmae.training.checkpoints import check_distributed_checkpoint_metadata

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 3)).sum().backward()
    optimizer.step()
    folder = tmp_path / "pytorch_model_fsdp_0"
    with pytest.warns(UserWarning, match="single process"):  # no process group: DCP's single-process mode
        dcp.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint_id=str(folder))
    check_distributed_checkpoint_metadata(folder / ".metadata")

    marker = tmp_path / "code-ran"
    (folder / ".metadata").write_bytes(pickle.dumps({"payload": _CreatesMarkerWhenUnpickled(marker)}))
    with pytest.raises(UntrustedFileError, match=r"\.metadata is not trusted: it asks for io\.open"):
        check_distributed_checkpoint_metadata(folder / ".metadata")
    assert not marker.exists()


def read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write to (a 0o555 folder, or /sys when running as root, which ignores modes)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder / "out", Path("/sys/cellmae-read-only-test")):
        try:
            candidate.mkdir(parents=True)
        except OSError:
            return candidate
        candidate.rmdir()
    pytest.skip("no read-only folder available on this machine")


def test_a_read_only_output_folder_fails_in_one_line_before_training(synthetic_shards, tmp_path, monkeypatch, capsys):
    from hf_cellmae.cli import main

    def no_training(*args, **kwargs):
        raise AssertionError("training started although the output folder cannot be written")

    monkeypatch.setattr(CellMAEForPreTraining, "forward", no_training)
    output_dir = read_only_folder(tmp_path)
    assert main(["pretrain", *run_args(synthetic_shards, output_dir)]) == 2
    message = one_line_error(capsys)
    assert f"cannot write the run's outputs to {output_dir}" in message and "output folder you can write to" in message


def test_a_checkpoint_that_cannot_be_written_after_training_says_how_to_resume(
    synthetic_shards, tmp_path, monkeypatch, capsys
):
    from accelerate import Accelerator

    from hf_cellmae.cli import main

    original = Accelerator.save_state

    def refused_at_step_4(self, output_dir=None, **kwargs):
        if "checkpoint-4" in str(output_dir):
            raise PermissionError(13, "Permission denied", str(Path(output_dir) / "model.safetensors"))
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", refused_at_step_4)
    assert main(["pretrain", *run_args(synthetic_shards, tmp_path, max_steps=4, save_steps=2)]) == 2
    message = one_line_error(capsys)
    assert "could not write checkpoint-4" in message and "Permission denied" in message
    assert "resume from checkpoint-2 with --resume-from-checkpoint latest" in message


def test_a_model_folder_that_cannot_be_written_after_training_says_how_to_resume(
    synthetic_shards, tmp_path, monkeypatch, capsys
):
    from hf_cellmae.cli import main

    def refused(self, path, **kwargs):
        raise PermissionError(13, "Permission denied", str(Path(path) / "model.safetensors"))

    monkeypatch.setattr(CellMAEForPreTraining, "save_pretrained", refused)
    assert main(["pretrain", *run_args(synthetic_shards, tmp_path, max_steps=2, save_steps=2)]) == 2
    message = one_line_error(capsys)
    assert f"could not write the model folder {tmp_path / 'model'}: Permission denied" in message
    assert "--resume-from-checkpoint latest (checkpoint-2 holds the trained weights)" in message


def test_no_code_in_the_package_loads_a_pickle_unsafely():
    """No `weights_only=False`, no `pickle.load(s)`, and nothing registered for accelerate's custom (unsafe) checkpoints."""
    import ast

    package = Path(__file__).resolve().parents[1] / "hf_cellmae"
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            unsafe_keyword = any(
                k.arg == "weights_only" and not (isinstance(k.value, ast.Constant) and k.value.value is True)
                for k in node.keywords
            )
            if (
                unsafe_keyword
                or name in ("register_for_checkpointing", "load_custom_state")
                or (
                    name in ("load", "loads")
                    and getattr(node.func, "value", None) is not None
                    and getattr(node.func.value, "id", "") in ("pickle", "joblib", "dill")
                )
            ):
                found.append(f"{path.relative_to(package.parent)}:{node.lineno}")
    assert not found, found


# --------------------------------------------------------------------------------------- real images
@pytest.mark.slow
def test_the_same_command_line_pretrains_on_real_cell_painting_images(tmp_path):
    source = DATA / "cellpainting_bbbc022" / "images"
    if not source.exists():
        pytest.skip(f"real images not found: {source}")
    import tifffile

    from hf_cellmae import CellMAEImageProcessor

    held_out = "E18"
    train_images = tmp_path / "train"
    train_images.mkdir()
    for path in source.glob("*.tif"):
        if f"_{held_out}_" not in path.name:
            (train_images / path.name).symlink_to(path)
    shard = cli(
        "shard", str(train_images), str(tmp_path / "shards"), "--layout", "pattern", "--pattern", "bbbc", timeout=600
    )
    assert shard.returncode == 0, shard.stderr[-3000:]
    overrides = json.dumps({"image_size": 64, "fourier_loss_weight": 0.01})
    run = cli(
        "pretrain",
        *run_args(
            tmp_path / "shards",
            tmp_path / "run",
            model_overrides=overrides,
            max_steps=150,
            per_device_train_batch_size=16,
            crops_per_field=16,
            save_steps=150,
            model_preset="tiny",
        ),
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    fields = [
        np.stack([tifffile.imread(source / f"plate1_{held_out}_site{s}_Ch{c}.tif") for c in range(1, 6)])
        for s in (1, 2)
    ]
    pixels = CellMAEImageProcessor(image_size=64, crop_mode="tile")(fields)["pixel_values"]  # 2 x 80 crops
    trained = CellMAEForPreTraining.from_pretrained(tmp_path / "run" / "model").eval()
    torch.manual_seed(0)
    untrained = CellMAEForPreTraining(trained.config).eval()
    with torch.no_grad():
        after = trained(pixels, mask_seed=0)
        before = untrained(pixels, mask_seed=0)
    # Per-channel-mean predictor: every masked patch predicted by the mean of its channel's visible pixels.
    target = trained.patchify(pixels).reshape(len(pixels), 5, -1, 64)  # (B, C, N, p*p)
    mask = after.mask.reshape(len(pixels), 5, -1)
    visible_mean = ((target.mean(-1) * (1 - mask)).sum(-1) / (1 - mask).sum(-1).clamp_min(1))[..., None, None]
    per_patch = ((target - visible_mean) ** 2).mean(-1)
    mean_predictor = float((per_patch * mask).sum() / mask.sum())
    assert after.mse_loss.item() < before.mse_loss.item()
    assert after.mse_loss.item() < mean_predictor, (after.mse_loss.item(), mean_predictor)


# ------------------------------------------------------------------------------------------ throughput
def test_the_training_benchmark_reports_throughput_and_mfu_against_a_peak_measured_in_the_same_run(
    tmp_path, monkeypatch
):
    benchmark = load_script("benchmark_train")
    out = tmp_path / "rows.json"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "benchmark_train.py",
            "--models",
            "tiny",
            "--precisions",
            "fp32",
            "--image-size",
            "32",
            "--channels",
            "3",
            "--batch",
            "2",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--peak-size",
            "128",
            "--json",
            str(out),
        ],
    )
    benchmark.main()
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["model"], row["precision"], row["compiled"]) == ("tiny", "fp32", False)  # no compile on a CPU
    assert row["tokens_per_s"] == pytest.approx(row["images_per_s"] * 3 * (32 // 8) ** 2)
    assert row["step_gflop"] > 0 and row["mfu"] == pytest.approx(row["achieved_tflop_s"] / row["peak_tflop_s"])


def test_the_decoder_benchmark_counts_the_decoder_blocks_and_their_attention():
    benchmark = load_script("benchmark_decoder")
    pixels, tokens = torch.randn(2, 3, 64, 64), 3 * 16  # 3 channels of 4 x 4 patches of 16 px
    noise = torch.rand(2, tokens, generator=torch.Generator().manual_seed(0))
    counted = {}
    for name in ("mae", "light"):
        config = CellMAEConfig.from_preset("vit_s16", decoder=name, image_size=64)
        model = CellMAEForPreTraining(config)
        width, depth = config.decoder_hidden_size, config.decoder_num_hidden_layers
        # The blocks: qkv + projection + MLP (24 T w^2) and the attention products (4 T^2 w); the small
        # embedding and prediction layers make the rest.
        blocks = depth * (24 * tokens * width**2 + 4 * tokens**2 * width)
        counted[name] = benchmark.decoder_flops(
            model, pixels, noise, add_attention=not benchmark.attention_is_counted()
        )
        assert blocks < counted[name] < 1.05 * blocks, name
    assert counted["light"] < counted["mae"] / 5


def test_the_side_by_side_benchmark_counts_the_arithmetic_of_fused_attention():
    """The FLOP ratio beside the OpenPhenom speed ratio must include attention, which the fused CPU kernel hides
    from FlopCounterMode: a lone attention call is counted at its 4 * Lq * Lk * width FLOPs."""
    benchmark = load_script("benchmark_model")
    batch, heads, queries, keys, head_dim = 2, 4, 24, 40, 8
    q = torch.randn(batch, heads, queries, head_dim)
    k, v = torch.randn(batch, heads, keys, head_dim), torch.randn(batch, heads, keys, head_dim)
    gflop = benchmark.counted_gflop(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert gflop * 1e9 == pytest.approx(4 * batch * queries * keys * heads * head_dim)


# ------------------------------------------------------------------------------------------- corrupt shards


@pytest.fixture
def corrupt_shards(synthetic_shards, tmp_path):
    """A copy of the session's shards with one byte of the first field's pixels flipped."""
    from tests.helpers.data_fixtures import flip_pixel_byte

    shards = tmp_path / "shards"
    shutil.copytree(synthetic_shards, shards)
    return shards, flip_pixel_byte(sorted(shards.glob("shard-*.parquet"))[0])


def test_pretrain_fails_on_a_corrupt_field_naming_it_by_default(corrupt_shards, tmp_path):
    from hf_cellmae.data.problems import BadInputError

    shards, field_id = corrupt_shards
    args = parse_pretraining_arguments(run_args(shards, tmp_path / "run", max_steps=8, save_steps=100))
    with pytest.raises(BadInputError, match=f"field {field_id} in shard .* fails its CRC-32 check"):
        pretrain(args)


def test_pretrain_on_error_skip_trains_without_the_corrupt_field_and_reports_it(corrupt_shards, tmp_path, capsys):
    from hf_cellmae.cli import main

    shards, field_id = corrupt_shards
    # 8 steps x 4 crops = 32 samples, 2 crops per field: every one of the 24 fields is read at least once
    assert (
        main(["pretrain", *run_args(shards, tmp_path / "run", max_steps=8, save_steps=100), "--on-error", "skip"]) == 0
    )
    out = capsys.readouterr().out
    assert "Skipped 1 corrupt field(s) (--on-error skip)" in out
    summary = pretrain(
        parse_pretraining_arguments(run_args(shards, tmp_path / "again", max_steps=8, save_steps=100, on_error="skip"))
    )
    assert [skip["field"] for skip in summary["skipped_fields"]] == [field_id]
