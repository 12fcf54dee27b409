"""Files people open: the loss-curve PNG with the best step marked, and labelled sample grids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw

from sdloop.atomic import atomic_path


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl; a torn last line (killed run) is skipped, not fatal."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def loss_curve_png(rows: list[dict], path: Path, best_step: Optional[int] = None, title: str = "",
                   train_label: str = "train loss") -> Path:
    """Plot train loss (raw and smoothed) and validation loss against steps; mark the best validation step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r and "val_loss" not in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        xs, ys = zip(*train)
        ax.plot(xs, ys, color="#9ecae1", lw=0.8, label=train_label)
        k = max(1, len(ys) // 20)
        smooth = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
        ax.plot(xs, smooth, color="#3182bd", lw=1.5, label=f"{train_label} (mean of {k})")
    if val:
        xs, ys = zip(*val)
        ax.plot(xs, ys, "o-", color="#e6550d", lw=1.5, ms=3, label="validation loss (fixed noise)")
    if best_step is not None:
        best = [v for s, v in val if s == best_step]
        ax.axvline(best_step, color="#31a354", ls="--", lw=1)
        if best:
            ax.plot([best_step], best[-1:], "*", color="#31a354", ms=14, label=f"best step {best_step}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title or "sdloop training")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path, fsync=False) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def image_grid(images: list[list[Image.Image]], row_labels: list[str], col_labels: list[str], path: Path,
               title: str = "") -> Path:
    """A grid of images (rows = prompts, columns = seeds) with a caption strip, saved as PNG atomically."""
    rows, cols = len(images), max(len(r) for r in images)
    w, h = images[0][0].size
    if w < 128:  # tiny-model samples: enlarge (nearest) so a person can see them
        k = -(-128 // w)
        images = [[im.resize((w * k, h * k), Image.NEAREST) for im in row] for row in images]
        w, h = w * k, h * k
    cell_w = max(w, 96)
    label_h, title_h = 28, 18 if title else 0
    grid = Image.new("RGB", (cols * cell_w, title_h + rows * (h + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 2), title, fill="black")
    for r, row in enumerate(images):
        y = title_h + r * (h + label_h)
        draw.text((4, y + 2), row_labels[r][: max(8, cols * cell_w // 6)], fill="black")
        for c, img in enumerate(row):
            x = c * cell_w
            grid.paste(img, (x + (cell_w - w) // 2, y + label_h))
            if r == 0 and col_labels:
                draw.text((x + 4, y + 14), col_labels[c], fill="#555555")
    with atomic_path(path, fsync=False) as tmp:
        grid.save(tmp, format="PNG")
    return path
