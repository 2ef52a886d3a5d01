#!/usr/bin/env python3
"""Model throughput: forward+backward images/s and achieved GFLOP/s of CA-MAE pre-training steps.

Measures, in one run on this machine:
  * the fp32 matmul peak (4096 x 4096 x 4096 `torch.mm`, median of repeats),
  * hf_cellmae `CellMAEForPreTraining` (tiny and ViT-S/16 presets) on 6 x 256 x 256 images,
  * transformers' `ViTMAEForPreTraining` at the same width/depth on the same images,
and prints images/s, GFLOP per image (counted with `torch.utils.flop_counter`, attention added
analytically where the CPU kernel is not counted) and achieved FLOP/s as a share of the matmul peak.

    python scripts/benchmark_model.py [--batch-size 2] [--steps 3] [--presets tiny vit_s16] [--bf16]

With `--openphenom`, instead times hf_cellmae side by side with OpenPhenom at its exact architecture
(the `openphenom` preset, the same random weights in both, converted with
`hf_cellmae.openphenom.convert_openphenom_state_dict`). OpenPhenom's side is its own public code when
`--reference PATH` points at a checkout of https://github.com/recursionpharma/maes_microscopy (not
shipped here: its licence is Recursion's CC-BY-NC; it is imported from PATH at run time and needs
timm, e.g. `pip install hf-cellmae[bench]`). Without `--reference` it is the re-statement in
`tests/helpers/openphenom_reference.py`, whose encoder attention is an explicit (unfused) softmax where
OpenPhenom's timm blocks use the fused kernel, so its ratio overstates hf_cellmae's speed (a warning
says so). Both implementations must give the same pooled embedding (max |diff| printed) and loss. It
times the pooled embedding (both standardise 0..255 pixels inside
the timed call) and a training step (mask 0.75, Fourier weight 0.01, forward + backward), in fp32 and
under bf16 autocast. Rounds are interleaved (every variant once per round, after a warm-up), medians
are reported with the reference / hf_cellmae ratio (> 1: hf_cellmae is faster), and the matmul peaks
are measured in the same run. The FLOPs of one call of each are counted too: their ratio is the speed
ratio that equal work per FLOP would give, the bound a faster implementation of the same kernels reaches.

    python scripts/benchmark_model.py --openphenom [--reference PATH/TO/maes_microscopy] [--batch-size 2]
        [--rounds 7] [--precisions fp32 bf16] [--workloads embedding training]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from hf_cellmae import CellMAEConfig, CellMAEForPreTraining

from _bench import interleaved_rounds, matmul_peak, median_seconds  # scripts/_bench.py


def attention_is_counted() -> bool:
    """Whether FlopCounterMode counts the SDPA kernel on this device (it does not on some CPU builds)."""
    q = torch.randn(1, 2, 8, 4)
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, q, q)
    return counter.get_total_flops() > 0


def attention_flops(config: CellMAEConfig, batch: int, channels: int) -> int:
    """Forward FLOPs of the attention products (QK^T and AV: 4 * Lq * Lk * width per layer)."""
    tokens = channels * config.tokens_per_channel
    visible = 1 + int(tokens * (1 - config.mask_ratio))
    flops = config.num_hidden_layers * 4 * visible * visible * config.hidden_size
    width = config.decoder_hidden_size
    if config.decoder_type == "shared":
        flops += config.decoder_num_hidden_layers * 4 * tokens * tokens * width
    else:
        per = config.tokens_per_channel
        flops += 4 * tokens * tokens * width + channels * config.decoder_num_hidden_layers * 4 * per * per * width
    return batch * flops


def vit_mae_attention_flops(config: ViTMAEConfig, batch: int) -> int:
    tokens = (config.image_size // config.patch_size) ** 2
    visible = 1 + int(tokens * (1 - config.mask_ratio))
    return batch * (
        config.num_hidden_layers * 4 * visible**2 * config.hidden_size
        + config.decoder_num_hidden_layers * 4 * (tokens + 1) ** 2 * config.decoder_hidden_size
    )


def time_steps(model, step, steps: int, bf16: bool) -> float:
    """Median seconds of a forward+backward step after one warm-up step."""

    def train_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = step()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return median_seconds(train_step, steps)


def count_flops(model, step) -> int:
    with FlopCounterMode(display=False) as counter:
        step().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def counted_gflop(run) -> float:
    """GFLOP of one call of `run`, every attention through the math kernel so that FlopCounterMode sees its
    matmuls (it does not count the fused CPU kernels)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / 1e9


PRECISION_NAMES = {"fp32": "fp32", "bf16": "bf16 autocast"}

MAES_MICROSCOPY_URL = "https://github.com/recursionpharma/maes_microscopy"
RESTATEMENT_WARNING = (
    "WARNING: no --reference given, so OpenPhenom's side is tests/helpers/openphenom_reference.py, a re-statement of its\n"
    "computation whose encoder computes attention with an explicit softmax (unfused), whereas OpenPhenom's own\n"
    "code runs timm's blocks with the fused scaled_dot_product_attention: the speed ratio below overstates\n"
    "hf_cellmae's speed. For the comparison users would make, time against the real code (its licence is\n"
    f"Recursion's CC-BY-NC, so it is not shipped here): git clone {MAES_MICROSCOPY_URL};\n"
    "pip install timm (or hf-cellmae[bench]); then add --reference PATH/TO/maes_microscopy."
)


def find_maes_microscopy(path: str | Path) -> Path:
    """The folder of a maes_microscopy checkout that holds its model code (`mae_modules.py`, `vit.py`, `loss.py`,
    `mae_utils.py`): its root, or its `maes_microscopy/` package folder; SystemExit with one line if neither."""
    root = Path(path).expanduser()
    for folder in (root, root / "maes_microscopy"):
        if all((folder / name).is_file() for name in ("mae_modules.py", "vit.py", "loss.py", "mae_utils.py")):
            return folder
    raise SystemExit(
        f"--reference {path}: not a checkout of {MAES_MICROSCOPY_URL} (no mae_modules.py, vit.py, loss.py and "
        "mae_utils.py in it or in its maes_microscopy/ folder)"
    )


def import_maes_microscopy(folder: Path) -> dict:
    """Import the modules of the maes_microscopy code in `folder` at run time. Some versions import their
    siblings relatively (`from .vit import ...`), others absolutely (`from vit import ...`): the folder is
    imported as a package and is also put on sys.path, so both work."""
    import importlib
    import types

    try:
        import timm
    except ImportError as error:
        raise SystemExit(
            f"--reference needs timm, which OpenPhenom's code is built on (pip install timm): {error}"
        ) from None
    package = "_maes_microscopy_reference"
    module = types.ModuleType(package)
    module.__path__ = [str(folder)]
    sys.modules[package] = module
    for entry in (str(folder.parent), str(folder)):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    modules = {
        name: importlib.import_module(f"{package}.{name}") for name in ("vit", "mae_modules", "loss", "mae_utils")
    }
    modules["timm"] = timm
    return modules


class RestatedOpenPhenom:
    """OpenPhenom's side as re-stated in tests/helpers/openphenom_reference.py (functional, on the state dict)."""

    name = "re-statement"
    mlp_bias_layout = "legacy_timm"  # the re-statement follows timm <= 1.0.24, OpenPhenom's

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        from tests.helpers.openphenom_reference import reference_predict, reference_pretraining_loss

        self.sd, self._predict, self._loss = state_dict, reference_predict, reference_pretraining_loss
        fixed = {"encoder.vit_backbone.pos_embed", "decoder.pos_embeddings", "decoder.placeholder"}
        for key, tensor in state_dict.items():
            tensor.requires_grad_(key not in fixed)

    def describe(self) -> str:
        return "tests/helpers/openphenom_reference.py (re-statement, unfused encoder attention)"

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._predict(self.sd, pixels)[0]

    def loss(self, pixels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._loss(self.sd, pixels, noise)["loss"]

    def train(self) -> None:
        pass

    def eval(self) -> None:
        pass

    def zero_grad(self) -> None:
        for tensor in self.sd.values():
            tensor.grad = None


class MaesMicroscopyOpenPhenom:
    """OpenPhenom built from the public maes_microscopy code in a user's checkout: its timm ViT-S/16 encoder
    (`vit.vit_small_patch16_256`, `mae_modules.MAEEncoder`, channel-agnostic), its `CAMAEDecoder` (512 wide,
    8 blocks per channel, LayerNorm eps 1e-5 as in its Hugging Face wrapper), its masking, `flatten_images`
    and `FourierLoss`, with the weights of `state_dict` (OpenPhenom's layout, loaded strictly). The few lines
    that join them follow the wrapper's `predict`, `forward` and `compute_MAE_loss`: x / 255 and per-channel
    standardisation (its `SelfStandardize`), the encoder-decoder projection and the prediction layer,
    per-patch MSE and Fourier loss averaged over the masked tokens, mixed 0.99 / 0.01."""

    name = "maes_microscopy"

    def __init__(
        self,
        path: str | Path,
        state_dict: dict[str, torch.Tensor],
        mask_ratio: float = 0.75,
        fourier_weight: float = 0.01,
    ):
        from torch import nn

        self.folder = find_maes_microscopy(path)
        code = import_maes_microscopy(self.folder)
        self.timm_version = code["timm"].__version__
        vit, mae_modules, loss, self.mae_utils = code["vit"], code["mae_modules"], code["loss"], code["mae_utils"]
        # No stochastic depth (hf_cellmae's side has none either), so both compute the same training step.
        backbone = vit.sincos_positional_encoding_vit(vit.vit_small_patch16_256(global_pool="avg", drop_path_rate=0.0))
        model = nn.Module()
        model.encoder = mae_modules.MAEEncoder(backbone, max_in_chans=11, channel_agnostic=True)
        model.decoder = mae_modules.CAMAEDecoder(
            num_modalities=6,
            tokens_per_modality=256,
            embed_dim=512,
            depth=8,
            num_heads=16,
            mlp_ratio=4,
            qkv_bias=True,
            norm_layer=nn.LayerNorm,
        )
        model.decoder.pos_embeddings = vit.generate_2d_sincos_pos_embeddings(
            512, length=16, use_class_token=True, num_modality=6
        )
        model.encoder_decoder_proj = nn.Linear(384, 512)
        model.decoder_pred = nn.Linear(512, 256)
        model.load_state_dict({k: v.detach().clone() for k, v in state_dict.items()}, strict=True)
        self.model, self.mask_ratio, self.fourier_weight = model, mask_ratio, fourier_weight
        self.standardize = getattr(mae_modules, "SelfStandardize", None)
        self.standardize = (
            self.standardize() if self.standardize else (lambda p: F.instance_norm(p.float() / 255.0, eps=1e-5))
        )
        self.fourier = loss.FourierLoss(num_multimodal_modalities=6)
        if not hasattr(self.fourier, "num_bins"):
            self.fourier.num_bins = None  # read by its forward but never set (it raises otherwise)
        from packaging.version import Version

        # timm moved ParallelScalingBlock's mlp_bias in 1.0.25: convert the weights for the installed one.
        self.mlp_bias_layout = "legacy_timm" if Version(self.timm_version) < Version("1.0.25") else "current"

    def describe(self) -> str:
        return f"maes_microscopy at {self.folder} (timm {self.timm_version}, fused attention in its timm blocks)"

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.model.encoder.vit_backbone.forward_features(self.standardize(pixels))
        return tokens[:, 1:].mean(1)  # `predict`: mean of the patch tokens, no final norm

    def loss(self, pixels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        m = self.model
        images = self.standardize(pixels)
        latent, mask, restore = m.encoder.forward_masked(images, self.mask_ratio, noise)
        reconstruction = m.decoder_pred(m.decoder.forward_masked(m.encoder_decoder_proj(latent), restore))[:, 1:]
        target = self.mae_utils.flatten_images(self.standardize(pixels), patch_size=16, channel_agnostic=True)
        mse = ((reconstruction - target) ** 2).mean(-1)
        fourier = self.fourier(reconstruction, target).mean(-1)
        mse, fourier = ((t * mask).sum() / mask.sum() for t in (mse, fourier))
        return (1 - self.fourier_weight) * mse + self.fourier_weight * fourier

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)


def openphenom_reference(path: str | Path | None, state_dict: dict[str, torch.Tensor]):
    """OpenPhenom's side of the comparison: the maes_microscopy code at `path`, or without a path the
    re-statement (see RESTATEMENT_WARNING)."""
    return RestatedOpenPhenom(state_dict) if path is None else MaesMicroscopyOpenPhenom(path, state_dict)


def under_autocast(run, bf16: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        run()


def forward_loss(model, **inputs) -> torch.Tensor:
    return model(**inputs).loss


def openphenom_side_by_side(
    batch: int,
    rounds: int,
    precisions: tuple[str, ...] = ("fp32", "bf16"),
    workloads: tuple[str, ...] = ("embedding", "training"),
    reference_path: str | None = None,
) -> None:
    """hf_cellmae vs OpenPhenom at OpenPhenom's architecture (see the module doc): OpenPhenom's own code at
    `reference_path` (a maes_microscopy checkout) or, without it, the functional re-statement; for each of
    `workloads` ("embedding", "training") in each of `precisions` ("fp32", "bf16" = bf16 autocast)."""
    if reference_path is None:
        print(RESTATEMENT_WARNING, flush=True)
    else:
        find_maes_microscopy(reference_path)  # fail in one line before any work
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's root: its tests/helpers/
    from hf_cellmae.image_processing_cellmae import standardize_channels
    from hf_cellmae.openphenom import convert_openphenom_state_dict
    from tests.helpers.openphenom_reference import random_openphenom_state_dict

    channels, size = 6, 256
    reference_sd = random_openphenom_state_dict(seed=0)
    reference = openphenom_reference(reference_path, reference_sd)
    # The reference has no stochastic depth: none in hf_cellmae either, so both compute the same thing.
    config = CellMAEConfig.from_preset("openphenom", drop_path_rate=0.0)
    model = CellMAEForPreTraining(config)
    converted = convert_openphenom_state_dict(
        {k: v.detach() for k, v in reference_sd.items()}, reference.mlp_bias_layout
    )[0]
    model.load_state_dict(converted)
    encoder = model.cellmae.eval()

    pixels = torch.randint(0, 256, (batch, channels, size, size), generator=torch.Generator().manual_seed(0)).to(
        torch.uint8
    )
    noise = torch.rand(batch, channels * config.tokens_per_channel, generator=torch.Generator().manual_seed(0))

    def ours_embed():
        with torch.no_grad():
            return encoder(standardize_channels(pixels)).pooler_output

    def reference_embed():
        reference.eval()
        with torch.no_grad():
            return reference.embed(pixels)

    def ours_train():
        model.train()
        model(standardize_channels(pixels), noise=noise).loss.backward()
        model.zero_grad(set_to_none=True)

    def reference_train():
        reference.train()
        reference.loss(pixels, noise).backward()
        reference.zero_grad()

    with torch.no_grad():  # the comparison is of equal computations
        ours_loss = model.eval()(standardize_channels(pixels), noise=noise).loss
        reference.eval()
        reference_loss = reference.loss(pixels, noise)
        embed_gap = (ours_embed() - reference_embed()).abs().max().item()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; images {batch} x {channels} x {size} x {size}"
    )
    print(f"OpenPhenom's side ('reference'): {reference.describe()}; mlp_bias layout {reference.mlp_bias_layout}")
    print(
        f"same computation: pooled embedding max |diff| {embed_gap:.1e}; loss {ours_loss.item():.6f} vs {reference_loss.item():.6f}"
    )
    work = {
        ("pooled embedding", impl): counted_gflop(run)
        for impl, run in (("hf_cellmae", ours_embed), ("reference", reference_embed))
    }
    work.update(
        {
            ("training step", impl): counted_gflop(run)
            for impl, run in (("hf_cellmae", ours_train), ("reference", reference_train))
        }
    )
    print(
        "arithmetic per call (FlopCounterMode, attention through the math kernel so that it is counted): "
        + "; ".join(
            f"{w} {work[(w, 'hf_cellmae')]:.1f} vs {work[(w, 'reference')]:.1f} GFLOP"
            for w in ("pooled embedding", "training step")
        )
    )

    variants = {}
    pairs = {
        "embedding": ("pooled embedding", ours_embed, reference_embed),
        "training": ("training step", ours_train, reference_train),
    }
    for workload, ours, theirs in (pairs[w] for w in workloads):
        for precision in [PRECISION_NAMES[p] for p in precisions]:
            variants[(workload, precision, "hf_cellmae")] = ours
            variants[(workload, precision, "reference")] = theirs
    peaks: dict[str, list[float]] = {p: [] for p in precisions}

    def after_round(index: int, warming_up: bool) -> None:
        if not warming_up:
            for p in precisions:
                peaks[p].append(matmul_peak(torch.float32 if p == "fp32" else torch.bfloat16) / 1e9)
        print(f"round {index} done" + (" (warm-up)" if warming_up else ""), flush=True)

    timed = {key: functools.partial(under_autocast, run, key[1] != "fp32") for key, run in variants.items()}
    times = interleaved_rounds(timed, rounds, warmup=1, after_round=after_round)
    if not rounds:
        return
    print(
        "matmul peak, median over rounds: "
        + ", ".join(f"{p} {statistics.median(v):.1f} GFLOP/s" for p, v in peaks.items())
    )
    print(f"{rounds} interleaved rounds, median seconds per call (min-max); reference = {reference.name}:")
    print(f"{'workload':<18}{'precision':<15}{'hf_cellmae':>22}{'reference':>22}{'speed ratio':>13}{'FLOP ratio':>12}")
    for workload in (pairs[w][0] for w in workloads):
        for precision in [PRECISION_NAMES[p] for p in precisions]:
            ours, theirs = (times[(workload, precision, impl)] for impl in ("hf_cellmae", "reference"))
            spread = lambda t: f"{statistics.median(t):.3f} ({min(t):.2f}-{max(t):.2f})"  # noqa: E731
            ratio = statistics.median(theirs) / statistics.median(ours)
            flop_ratio = work[(workload, "reference")] / work[(workload, "hf_cellmae")]
            print(
                f"{workload:<18}{precision:<15}{spread(ours):>22}{spread(theirs):>22}{ratio:>12.2f}x{flop_ratio:>11.2f}x"
            )
    print(
        "speed ratio = reference median / hf_cellmae median (> 1: hf_cellmae faster); FLOP ratio = reference FLOPs /"
    )
    print(
        "hf_cellmae FLOPs: the speed ratio that equal work per FLOP would give (above it, hf_cellmae's kernels are faster)"
    )
    if reference_path is None:
        print(
            "(re-statement: unfused encoder attention, the ratio overstates hf_cellmae's speed; see the warning above)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--channels", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["tiny", "vit_s16"])
    parser.add_argument(
        "--bf16", action="store_true", help="time under bf16 autocast (FLOP share still vs the fp32 peak)"
    )
    parser.add_argument(
        "--openphenom",
        action="store_true",
        help="time side by side with OpenPhenom: its own code with --reference, else tests/helpers/openphenom_reference.py",
    )
    parser.add_argument(
        "--reference",
        metavar="PATH",
        help=f"with --openphenom: a checkout of {MAES_MICROSCOPY_URL} (needs timm) to build OpenPhenom from",
    )
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of --openphenom")
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=list(PRECISION_NAMES),
        default=list(PRECISION_NAMES),
        help="precisions of --openphenom (bf16 = bf16 autocast; slow on CPUs without bf16 matmul units)",
    )
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=["embedding", "training"],
        default=["embedding", "training"],
        help="what --openphenom times: the pooled embedding, the training step",
    )
    args = parser.parse_args()
    if args.reference is not None and not args.openphenom:
        parser.error("--reference goes with --openphenom")
    torch.manual_seed(0)
    if args.openphenom:
        openphenom_side_by_side(
            args.batch_size, args.rounds, tuple(args.precisions), tuple(args.workloads), args.reference
        )
        return
    batch, channels, size = args.batch_size, args.channels, args.image_size
    peak = matmul_peak(torch.float32, repeats=5) / 1e9
    add_attention = not attention_is_counted()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul peak {peak:.1f} GFLOP/s")
    print(
        f"images: {batch} x {channels} x {size} x {size}; attention FLOPs {'added analytically' if add_attention else 'counted'}"
    )
    print(f"{'model':<34}{'s/step':>8}{'img/s':>8}{'GFLOP/img':>11}{'GFLOP/s':>9}{'% peak':>8}")
    pixels = torch.randn(batch, channels, size, size)
    results = {}
    for preset in args.presets:
        config = CellMAEConfig.from_preset(preset, image_size=size, max_channels=max(channels, 11))
        model = CellMAEForPreTraining(config).train()
        step = functools.partial(forward_loss, model, pixel_values=pixels, mask_seed=0)
        flops = count_flops(model, step) + (3 * attention_flops(config, batch, channels) if add_attention else 0)
        seconds = time_steps(model, step, args.steps, args.bf16)
        results[f"hf_cellmae {preset}"] = (seconds, flops)
        # transformers' ViT-MAE at the same encoder/decoder width and depth (not channel-agnostic:
        # one token per 16x16x6 patch, so 6x fewer tokens per image).
        reference = ViTMAEConfig(
            image_size=size,
            patch_size=config.patch_size,
            num_channels=channels,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            decoder_hidden_size=config.decoder_hidden_size,
            decoder_num_hidden_layers=config.decoder_num_hidden_layers,
            decoder_num_attention_heads=config.decoder_num_attention_heads,
            decoder_intermediate_size=config.decoder_intermediate_size,
            mask_ratio=config.mask_ratio,
        )
        vit_mae = ViTMAEForPreTraining(reference).train()
        noise = torch.rand(batch, (size // config.patch_size) ** 2, generator=torch.Generator().manual_seed(0))
        ref_step = functools.partial(forward_loss, vit_mae, pixel_values=pixels, noise=noise)
        ref_flops = count_flops(vit_mae, ref_step) + (
            3 * vit_mae_attention_flops(reference, batch) if add_attention else 0
        )
        results[f"transformers ViTMAE {preset}-size"] = (
            time_steps(vit_mae, ref_step, args.steps, args.bf16),
            ref_flops,
        )
        for name in (f"hf_cellmae {preset}", f"transformers ViTMAE {preset}-size"):
            seconds, flops = results[name]
            achieved = flops / seconds / 1e9
            print(
                f"{name:<34}{seconds:>8.3f}{batch / seconds:>8.2f}{flops / batch / 1e9:>11.2f}{achieved:>9.1f}{100 * achieved / peak:>7.1f}%"
            )
        ours, theirs = results[f"hf_cellmae {preset}"], results[f"transformers ViTMAE {preset}-size"]
        ratio = (ours[1] / ours[0]) / (theirs[1] / theirs[0])
        print(f"  -> {preset}: hf_cellmae achieves {ratio:.2f}x the FLOP/s of transformers' ViTMAE at the same size")


if __name__ == "__main__":
    main()
