"""Reconstruction figure: original, masked input and reconstruction of every channel of one field."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def reconstruction_figure(pixel_values, logits, mask, patch_size: int, channel_names=None, title: str = ""):
    """A matplotlib figure with one row per channel: original | masked input | reconstruction.

    Args:
        pixel_values: `(C, H, W)` standardised field (tensor or array).
        logits: `(C * N, patch_size**2)` predicted patches; mask: `(C * N,)`, 1 = masked.
    The reconstruction shows the prediction on masked patches and the original on visible ones.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = np.asarray(pixel_values, dtype=np.float32)
    channels, height, width = image.shape
    rows, cols = height // patch_size, width // patch_size

    def to_image(patches):  # (C*N, p*p) -> (C, H, W)
        x = np.asarray(patches, dtype=np.float32).reshape(channels, rows, cols, patch_size, patch_size)
        return x.transpose(0, 1, 3, 2, 4).reshape(channels, height, width)

    mask_image = to_image(np.repeat(np.asarray(mask, dtype=np.float32)[:, None], patch_size * patch_size, axis=1))
    predicted = to_image(logits)
    masked = np.where(mask_image > 0, np.nan, image)
    pasted = np.where(mask_image > 0, predicted, image)
    names = channel_names or [f"channel {c}" for c in range(channels)]
    fig, axes = plt.subplots(channels, 3, figsize=(7.5, 2.4 * channels), squeeze=False)
    for c in range(channels):
        low, high = np.percentile(image[c], [1, 99])
        for col, (panel, label) in enumerate(
            ((image[c], "original"), (masked[c], "masked input"), (pasted[c], "reconstruction"))
        ):
            ax = axes[c, col]
            ax.imshow(panel, cmap="gray", vmin=low, vmax=high)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_title(label)
        axes[c, 0].set_ylabel(names[c] if c < len(names) else f"channel {c}")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
