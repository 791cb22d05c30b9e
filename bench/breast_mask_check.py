"""How good are the weak breast masks the segmenter learns from? Checked against experts.

The U-Net's "breast" channel is trained on automatic masks (`segmentation.breast_mask`:
Otsu at half its cut, largest component, holes filled), and `evaluate_triage` reports
breast Dice against those same masks. This script measures the automatic masks against
the tissue maps of `ddsm-normals-tissue` (Tiryaki & Kaplanoğlu 2022: background,
adipose, fibroglandular, pectoral muscle, drawn per pixel), read in place:

    python bench/breast_mask_check.py ../shared/datasets/ddsm-normals-tissue [--out DIR] [--json FILE]

It prints Dice per film summarised (mean, median, worst) against two references: the
whole non-background region (breast + pectoral muscle, what a threshold can see) and
the breast without the pectoral muscle. With --out it draws the worst films, the
automatic mask's outline in red over the expert map's in green.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "platform")]

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from triage.localisation_metrics import dice  # noqa: E402
from triage.segmentation import breast_mask  # noqa: E402

# Tissue map values (the folder's PROVENANCE.md).
BACKGROUND, PECTORAL = 64, 255


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the ddsm-normals-tissue folder (labels.csv, images/, tissue_masks/)")
    parser.add_argument("--out", type=Path, help="draw the worst films here (PNG)")
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    parser.add_argument("--worst", type=int, default=6, help="films to draw with --out (default 6)")
    args = parser.parse_args(argv)

    labels = args.folder / "labels.csv"
    if not labels.is_file():
        parser.error(f"{labels} not found: give the ddsm-normals-tissue folder")
    with labels.open(newline="") as fh:
        rows = [row for row in csv.DictReader(fh) if row.get("tissue_mask")]
    if not rows:
        parser.error(f"{labels} lists no tissue maps")

    results = []
    for row in tqdm(rows, desc="films", unit="film"):
        with Image.open(args.folder / row["image"]) as image:
            pixels = np.asarray(image.convert("L"))
        with Image.open(args.folder / row["tissue_mask"]) as image:
            tissue = np.asarray(image.convert("L"))
        automatic = breast_mask(pixels)
        body = tissue != BACKGROUND
        results.append(
            {
                "image": row["image"],
                "dice_body": dice(automatic, body),
                "dice_breast": dice(automatic, body & (tissue != PECTORAL)),
                "automatic": automatic,
                "body": body,
                "pixels": pixels,
            }
        )

    summary = {key: _summary([r[key] for r in results]) for key in ("dice_body", "dice_breast")}
    summary["films"] = len(results)
    print(f"weak breast masks vs DDSM tissue maps, {len(results)} films")
    for key, label in (("dice_body", "breast + pectoral muscle"), ("dice_breast", "breast without pectoral")):
        s = summary[key]
        print(f"  Dice vs {label}: mean {s['mean']:.3f}, median {s['median']:.3f}, worst {s['min']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        worst = sorted(results, key=lambda r: r["dice_body"])[: args.worst]
        path = args.out / "breast_mask_worst.png"
        _draw(worst).save(path)
        print(f"  worst {len(worst)} films drawn: {path}")
    return 0


def _summary(values: list[float]) -> dict[str, float]:
    array = np.asarray(values)
    return {"mean": float(array.mean()), "median": float(np.median(array)), "min": float(array.min())}


def _draw(results: list[dict]) -> Image.Image:
    """The films side by side: expert outline green, automatic outline red, Dice on top."""
    from PIL import ImageDraw

    tiles = []
    for r in results:
        rgb = np.repeat(r["pixels"][..., None], 3, axis=2).copy()
        rgb[_outline(r["body"])] = (0, 220, 0)
        rgb[_outline(r["automatic"])] = (230, 0, 0)
        tile = Image.fromarray(rgb)
        ImageDraw.Draw(tile).text((8, 8), f"Dice {r['dice_body']:.3f}", fill=(255, 255, 0))
        tiles.append(tile)
    width = sum(t.width for t in tiles)
    sheet = Image.new("RGB", (width, max(t.height for t in tiles)))
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width
    return sheet


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask with a 4-neighbour outside it, thickened to 3 px."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    edge = mask & ~inner
    thick = edge.copy()
    for shift in (1, 2):
        thick[shift:, :] |= edge[:-shift, :]
        thick[:, shift:] |= edge[:, :-shift]
    return thick


if __name__ == "__main__":
    raise SystemExit(main())
