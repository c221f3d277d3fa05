"""Heat maps of attention for `run.py visualize` and `run.py explain` (matplotlib, a Japanese font)."""
from pathlib import Path

import torch


def pyplot():
    """matplotlib without a display, with a font that has Japanese glyphs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib_fontja

    matplotlib_fontja.japanize()
    return matplotlib, plt


def plot_grid(weights: torch.Tensor, rows: list[str], cols: list[str], title: str, path: Path,
              causal: bool = False) -> None:
    """One heat map per layer (rows of the figure) and head (columns); causal: the masked future is blank."""
    matplotlib, plt = pyplot()
    L, H = weights.shape[:2]
    cell = 0.22 * max(len(rows), len(cols)) + 1
    fig, axes = plt.subplots(L, H, figsize=(max(cell * H, 6), cell * L), squeeze=False)
    for layer in range(L):
        for head in range(H):
            ax = axes[layer][head]
            image = weights[layer, head].clone()
            if causal:
                image[torch.ones_like(image, dtype=torch.bool).triu(1)] = float("nan")
            cmap = matplotlib.colormaps["Blues"].with_extremes(bad="white")
            ax.imshow(image.numpy(), cmap=cmap, vmin=0, vmax=1)
            if L * H > 1:
                ax.set_title(f"layer {layer + 1} head {head + 1}", fontsize=8)
            label_axes(ax, rows, cols, fontsize=6)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path, dpi=110)


def label_axes(ax, rows: list[str], cols: list[str], fontsize: int) -> None:
    """Token pieces along both axes (SentencePiece's word-start mark ▁ shown as _)."""
    ax.set_xticks(range(len(cols)), [c.replace("▁", "_") for c in cols], rotation=90, fontsize=fontsize)
    ax.set_yticks(range(len(rows)), [r.replace("▁", "_") for r in rows], fontsize=fontsize)


def save_figure(fig, path: Path, dpi: int) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def heat_map(matrix: torch.Tensor, rows: list[str], cols: list[str], title: str, path: Path, vmin=None,
             vmax=None, cmap: str = "Blues") -> None:
    matplotlib, plt = pyplot()
    image = matrix.float().clone()
    image[torch.isinf(image)] = float("nan")  # hidden cells drawn blank
    fig, ax = plt.subplots(figsize=(0.3 * len(cols) + 2.5, 0.3 * len(rows) + 1.5))
    shown = ax.imshow(image.numpy(), cmap=matplotlib.colormaps[cmap].with_extremes(bad="lightgrey"),
                      vmin=vmin, vmax=vmax, aspect="auto")
    fig.colorbar(shown, ax=ax, shrink=0.8)
    label_axes(ax, rows, cols, fontsize=7)
    ax.set_title(title, fontsize=9)
    save_figure(fig, path, dpi=100)
