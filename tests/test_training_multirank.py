"""Two real processes (gloo on the CPU): a checkpoint save that fails on one rank fails on every rank, at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

# Rank 1 cannot write its data state (as on a node whose disk is full or read-only); rank 0 can.
PROBE = textwrap.dedent(
    """
    import pathlib, sys
    import torch
    from accelerate import Accelerator
    from hf_cellmae.errors import UserError
    from hf_cellmae.training.checkpoints import save_checkpoint

    accelerator = Accelerator()
    model, optimizer = accelerator.prepare(torch.nn.Linear(4, 2), torch.optim.AdamW(torch.nn.Linear(4, 2).parameters()))
    if accelerator.process_index == 1:
        write_text = pathlib.Path.write_text

        def refuse(path, *args, **kwargs):
            if path.name.startswith("data_state"):
                raise PermissionError(13, "Permission denied", str(path))
            return write_text(path, *args, **kwargs)

        pathlib.Path.write_text = refuse
    try:
        save_checkpoint(accelerator, sys.argv[1], 2, {"position": 2}, {"global_step": 2}, keep=2)
    except UserError as error:
        print(f"rank {accelerator.process_index}: {error}", flush=True)
        sys.exit(3)
    print(f"rank {accelerator.process_index}: saved", flush=True)
    """
)


def test_a_checkpoint_save_failing_on_one_rank_makes_every_rank_exit_with_the_error(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", str(probe), str(tmp_path / "checkpoints")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:  # before the fix: rank 0 waited in a barrier for rank 1, for ever
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("a rank was still waiting 240 s after the other failed to save")
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "rank 1: could not write checkpoint-2" in output and "Permission denied" in output
    assert "rank 0: could not write checkpoint-2" in output and "rank 1 could not write its part" in output
    assert "saved" not in result.stdout
    assert not (tmp_path / "checkpoints" / "checkpoint-2").exists()  # no half-written checkpoint looks complete


# The main rank cannot write the final model folder's processor file; rank 1 (which writes nothing itself)
# used to wait for it in the closing barrier.
MODEL_PROBE = textwrap.dedent(
    """
    import pathlib, sys
    from accelerate import Accelerator
    from hf_cellmae import CellMAEConfig, CellMAEForPreTraining, CellMAEImageProcessor
    from hf_cellmae.errors import UserError
    from hf_cellmae.training.arguments import PretrainingArguments
    from hf_cellmae.training.loop import save_model_folder

    accelerator = Accelerator()
    model = accelerator.prepare(CellMAEForPreTraining(CellMAEConfig.from_preset("tiny", num_hidden_layers=1)))
    if accelerator.is_main_process:
        def refuse(self, folder, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(pathlib.Path(folder) / "preprocessor_config.json"))

        CellMAEImageProcessor.save_pretrained = refuse
    try:
        save_model_folder(accelerator, model, pathlib.Path(sys.argv[1]), PretrainingArguments(data="shards"), {"log_history": []})
    except UserError as error:
        print(f"rank {accelerator.process_index}: {error}", flush=True)
        sys.exit(3)
    print(f"rank {accelerator.process_index}: saved", flush=True)
    """
)


def test_a_model_folder_save_failing_on_the_main_rank_makes_every_rank_exit_with_the_error(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(MODEL_PROBE)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", str(probe), str(tmp_path / "model")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("a rank was still waiting 240 s after the main rank failed to write the model folder")
    output = stdout + stderr
    assert process.returncode != 0 and "saved" not in stdout
    assert "rank 0: could not write the model folder" in output and "Permission denied" in output
    assert "rank 1: could not write the model folder" in output and "rank 0 could not write its part" in output
