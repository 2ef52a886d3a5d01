"""Two real processes (gloo on the CPU): a checkpoint save that fails on one rank fails on every rank, at once."""

from __future__ import annotations

import sys
import textwrap

import pytest

from tests.helpers.launching import TWO_CPU_PROCESSES, cpu_launch_env, run_all_or_kill

pytestmark = pytest.mark.slow  # two processes through accelerate's launcher

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
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *TWO_CPU_PROCESSES,
        str(probe),
        str(tmp_path / "checkpoints"),
    ]
    # before the fix: rank 0 waited in a barrier for rank 1, for ever
    result = run_all_or_kill(command, cpu_launch_env(), 240, "a rank was still waiting after the other failed to save")
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
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *TWO_CPU_PROCESSES,
        str(probe),
        str(tmp_path / "model"),
    ]
    result = run_all_or_kill(
        command, cpu_launch_env(), 240, "a rank was still waiting after the main rank failed to write the model folder"
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "saved" not in result.stdout
    assert "rank 0: could not write the model folder" in output and "Permission denied" in output
    assert "rank 1: could not write the model folder" in output and "rank 0 could not write its part" in output
