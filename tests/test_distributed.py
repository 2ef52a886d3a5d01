"""The shipped `accelerate launch` configs on two real CPU processes (gloo): DDP and FSDP2 each train,
checkpoint, resume to the same weights bit for bit, and write a model folder that loads.

Each launch reads the config file itself and overrides only what a CPU needs: 2 processes instead of
8 GPUs and a free port (`--num_processes 2 --main_process_port 0`), with `ACCELERATE_USE_CPU=true`.
FSDP goes through `tests/helpers/accelerate_on_cpu.py`, which sets the FSDP type that accelerate assigns only on
GPUs (its docstring says exactly why); the DDP run goes through it too, where it changes nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_cellmae import CellMAEForPreTraining
from tests.helpers.launching import cpu_launch_env, run_all_or_kill
from tests.test_training import run_args

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "accelerate"
ON_CPU = Path(__file__).resolve().parent / "helpers" / "accelerate_on_cpu.py"
CPU_OVERRIDES = ["--num_processes", "2", "--main_process_port", "0"]


def launch_pretraining(config: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        *CPU_OVERRIDES,
        str(ON_CPU),
        "pretrain",
        *args,
    ]
    return run_all_or_kill(command, cpu_launch_env(), 300, "the 2-process run did not end")


def history(run: Path) -> list:
    return [
        (r["step"], r["loss"]) for r in json.loads((run / "model" / "trainer_state.json").read_text())["log_history"]
    ]


@pytest.mark.slow
@pytest.mark.parametrize("config, distributed_type", [("ddp.yaml", "MULTI_CPU"), ("fsdp_vit_l8.yaml", "FSDP")])
def test_a_shipped_launch_config_trains_checkpoints_resumes_bit_exactly_and_saves_a_loadable_model(
    config, distributed_type, synthetic_shards, tmp_path
):
    options = run_args(synthetic_shards, tmp_path, max_steps=4, save_steps=2)
    first = launch_pretraining(CONFIGS / config, *options)
    assert first.returncode == 0, first.stderr[-4000:]
    state = json.loads((tmp_path / "model" / "trainer_state.json").read_text())
    hardware = state["hardware"]
    assert (hardware["num_processes"], hardware["distributed_type"]) == (2, distributed_type)
    checkpoint = tmp_path / "checkpoints" / "checkpoint-2"
    if distributed_type == "FSDP":
        model = CellMAEForPreTraining.from_pretrained(tmp_path / "model")
        blocks = sorted(type(m).__name__ for m in model.modules() if type(m).__name__ in model._no_split_modules)
        units = hardware["fully_sharded_modules"]
        assert len(blocks) == 3 and [u for u in units if u in model._no_split_modules] == blocks  # every block a unit
        assert "CellMAEForPreTraining" in units  # and the root holds the rest
        assert hardware["activation_checkpointing"] is True
        for sharded in ("pytorch_model_fsdp_0", "optimizer_0"):  # torch.distributed.checkpoint: one file per rank
            assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= {p.name for p in (checkpoint / sharded).iterdir()}
    assert {"data_state_rank0.json", "data_state_rank1.json"} <= {p.name for p in checkpoint.iterdir()}

    uninterrupted, uninterrupted_history = load_file(str(tmp_path / "model" / "model.safetensors")), history(tmp_path)
    shutil.rmtree(tmp_path / "model")
    second = launch_pretraining(CONFIGS / config, *options, f"--resume_from_checkpoint={checkpoint}")
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"Resumed from {checkpoint}" in second.stdout + second.stderr
    resumed = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    assert history(tmp_path) == uninterrupted_history

    model = CellMAEForPreTraining.from_pretrained(tmp_path / "model")
    assert all(torch.equal(model.state_dict()[k], resumed[k]) for k in resumed)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 5, 32, 32), mask_seed=0).loss)
