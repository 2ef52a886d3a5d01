"""The fast settings chosen for each device (the GPU path, tested on a CPU)."""

from __future__ import annotations

import pytest

from hf_cellmae.training.arguments import PretrainingArguments
from hf_cellmae.training.device_defaults import resolve_device_defaults
from hf_cellmae.training.optimization import adamw_kernel

GPU = dict(device_type="cuda", cpus_per_process=16, bf16_supported=True, has_torchdata=True)


def test_a_cuda_gpu_gets_bf16_compile_pinned_memory_and_workers_for_its_cores():
    chosen = resolve_device_defaults(**GPU)
    assert (chosen.mixed_precision, chosen.torch_compile, chosen.pin_memory) == ("bf16", True, True)
    assert chosen.dataloader_num_workers == 8 and chosen.notes == ()
    assert resolve_device_defaults(**{**GPU, "cpus_per_process": 4}).dataloader_num_workers == 3
    assert resolve_device_defaults(**{**GPU, "cpus_per_process": 1}).dataloader_num_workers == 1


def test_a_cpu_trains_in_fp32_eager_with_no_worker_processes():
    chosen = resolve_device_defaults(device_type="cpu", cpus_per_process=16, has_torchdata=True)
    assert (chosen.mixed_precision, chosen.torch_compile, chosen.dataloader_num_workers, chosen.pin_memory) == (
        "no",
        False,
        0,
        False,
    )


def test_the_pretraining_arguments_leave_these_settings_to_the_device():
    args = PretrainingArguments(data="shards")
    assert (args.mixed_precision, args.torch_compile, args.dataloader_num_workers) == ("auto", None, None)


def test_settings_the_user_chose_are_kept():
    chosen = resolve_device_defaults(**GPU, mixed_precision="no", torch_compile=False, dataloader_num_workers=2)
    assert (chosen.mixed_precision, chosen.torch_compile, chosen.dataloader_num_workers) == ("no", False, 2)
    on_cpu = resolve_device_defaults(
        device_type="cpu", mixed_precision="bf16", torch_compile=True, dataloader_num_workers=1
    )
    assert (on_cpu.mixed_precision, on_cpu.torch_compile, on_cpu.dataloader_num_workers) == ("bf16", True, 1)


@pytest.mark.parametrize("asked", [None, True])
def test_compile_falls_back_to_eager_with_the_reason_where_it_cannot_run(asked):
    chosen = resolve_device_defaults(
        **GPU, torch_compile=asked, compile_problem="Triton is not installed (pip install triton)"
    )
    assert chosen.torch_compile is False
    assert any("Triton is not installed" in note and "eager" in note for note in chosen.notes)


def test_a_gpu_without_bf16_trains_in_fp32_and_says_so():
    chosen = resolve_device_defaults(**{**GPU, "bf16_supported": False})
    assert chosen.mixed_precision == "no" and any("no bf16" in note for note in chosen.notes)


def test_without_torchdata_a_gpu_run_loads_in_the_main_process_and_says_how_to_get_workers():
    chosen = resolve_device_defaults(**{**GPU, "has_torchdata": False})
    assert chosen.dataloader_num_workers == 0 and any("pip install torchdata" in note for note in chosen.notes)


def test_adamw_uses_the_fused_kernel_on_cuda_and_cpu_and_foreach_elsewhere():
    assert adamw_kernel("cuda") == adamw_kernel("cpu") == {"fused": True}
    assert adamw_kernel("a-device-without-fused-kernels") == {"foreach": True}


def test_what_accelerate_launch_was_told_wins_over_the_device_default_but_not_over_the_training_arguments():
    from_launcher = resolve_device_defaults(**GPU, launcher_mixed_precision="fp16", launcher_compiles=False)
    assert (from_launcher.mixed_precision, from_launcher.torch_compile) == ("fp16", False)
    cpu = resolve_device_defaults(device_type="cpu", launcher_mixed_precision="bf16")
    assert cpu.mixed_precision == "bf16"
    chosen = resolve_device_defaults(
        **GPU, mixed_precision="no", torch_compile=True, launcher_mixed_precision="fp16", launcher_compiles=False
    )
    assert (chosen.mixed_precision, chosen.torch_compile) == ("no", True)
