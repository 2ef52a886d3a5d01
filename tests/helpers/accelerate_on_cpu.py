"""`python -m hf_cellmae.cli ...` for `accelerate launch` on CPU processes, FSDP configs included.

accelerate 1.16 never selects FSDP on a CPU: `PartialState._prepare_backend` gives every CPU process
group the type MULTI_CPU, and `AcceleratorState.__init__` turns an FSDP config into
`DistributedType.FSDP` only for GPU-like types (MULTI_GPU, MULTI_XPU, ...). A CPU launch of an FSDP
config therefore trains plain data parallel, silently. torch's `fully_shard` itself runs on CPU tensors
over gloo, so this shim sets the type accelerate sets on a GPU, once the state exists, and changes
nothing else: the config file, accelerate's FSDP2 preparation, checkpointing and the training loop are
the real ones.
"""

import runpy
import sys

import accelerate.state
from accelerate.utils import DistributedType

_accelerator_state_init = accelerate.state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _accelerator_state_init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        # A later AcceleratorState() copies PartialState's shared state over its own: set it there too.
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = plugin
        if self._mixed_precision != "no":
            plugin.set_mixed_precision(self._mixed_precision)


accelerate.state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    sys.argv = ["cellmae", *sys.argv[1:]]
    runpy.run_module("hf_cellmae.cli", run_name="__main__", alter_sys=True)
