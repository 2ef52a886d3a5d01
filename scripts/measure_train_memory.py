"""Peak memory of one CA-MAE training step on the CPU, measured, next to `hf_cellmae.training.memory`'s estimate.

Each case runs in a fresh process: build the model and an AdamW optimizer, read the resident memory, run
two training steps (forward, backward, optimizer step: the optimizer state is allocated by the first) and
read the peak resident memory (`ru_maxrss`). The measured step cost (peak - resident before the steps)
is compared with the estimate's gradients + optimizer + activations terms.

    python scripts/measure_train_memory.py            # the default cases
    python scripts/measure_train_memory.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASES = [
    # (preset, overrides, batch, channels)
    ("tiny", {}, 32, 5),
    ("tiny", {"image_size": 128}, 8, 5),
    ("tiny", {"image_size": 128}, 32, 5),
    (
        "vit_s16",
        {
            "image_size": 64,
            "decoder_hidden_size": 128,
            "decoder_num_hidden_layers": 2,
            "decoder_num_attention_heads": 4,
        },
        16,
        5,
    ),
    (
        "vit_s16",
        {
            "image_size": 128,
            "decoder_hidden_size": 256,
            "decoder_num_hidden_layers": 4,
            "decoder_num_attention_heads": 8,
        },
        8,
        5,
    ),
]

CHILD = r"""
import json, resource, sys
import torch
from hf_cellmae.configuration_cellmae import CellMAEConfig
from hf_cellmae.modeling_cellmae import CellMAEForPreTraining
preset, overrides, batch, channels = json.loads(sys.argv[1])
torch.manual_seed(0)
config = CellMAEConfig.from_preset(preset, **overrides)
model = CellMAEForPreTraining(config)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
pixels = torch.randn(batch, channels, config.image_size, config.image_size)
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
before = rss()
for _ in range(2):
    model(pixels).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "peak": peak, "parameters": sum(p.numel() for p in model.parameters())}))
"""


def measure(case) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(case)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from hf_cellmae.configuration_cellmae import CellMAEConfig
    from hf_cellmae.training.memory import estimate_training_memory

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = []
    print("| preset | image | batch | channels | parameters | measured step (MiB) | estimated step (MiB) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for preset, overrides, batch, channels in CASES:
        measured = measure((preset, overrides, batch, channels))
        config = CellMAEConfig.from_preset(preset, **overrides)
        estimate = estimate_training_memory(
            config, batch, channels, optimizer="adamw", parameters=measured["parameters"]
        )
        step_measured = measured["peak"] - measured["before"]
        step_estimated = estimate.gradients + estimate.optimizer + estimate.activations
        row = {
            "preset": preset,
            "overrides": overrides,
            "batch": batch,
            "channels": channels,
            "parameters": measured["parameters"],
            "measured_step_bytes": step_measured,
            "estimated_step_bytes": step_estimated,
            "measured_peak_bytes": measured["peak"],
            "estimated_total_bytes": estimate.total,
        }
        rows.append(row)
        print(
            f"| {preset} | {config.image_size} | {batch} | {channels} | {measured['parameters'] / 1e6:.2f} M | "
            f"{step_measured / 2**20:.0f} | {step_estimated / 2**20:.0f} | {step_estimated / max(step_measured, 1):.2f} |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
