"""Drawing for the viewer's overlays: a colour per class, and a stored 0/255 mask
turned into a semi-transparent RGBA PNG the browser lays over the image. Pure numpy
and Pillow, no Django.

The PNG keeps the mask's (the image's) rows × columns, so the viewer stretches it
over the image exactly as it stretches the image: it stays aligned under zoom and pan.
"""

from __future__ import annotations

import colorsys
import hashlib
import io

import numpy as np
from PIL import Image

# Fixed colours for the labels one sees most; anything else gets a stable colour
# derived from its name (the same in every session and process).
PALETTE: dict[str, tuple[int, int, int]] = {
    "breast": (56, 139, 253),
    "lesion": (248, 81, 73),
    "calc": (255, 200, 0),
    "circ": (248, 81, 73),
    "spic": (219, 39, 119),
    "misc": (163, 113, 247),
    "arch": (255, 140, 0),
    "asym": (46, 160, 67),
    "mass": (248, 81, 73),
    "nodule": (255, 200, 0),
}
FILL_ALPHA = 0.35
EDGE_ALPHA = 0.9


def label_colour(label: str) -> tuple[int, int, int]:
    key = label.strip().lower().rpartition(":")[2]
    if key in PALETTE:
        return PALETTE[key]
    hue = int.from_bytes(hashlib.sha256(key.encode()).digest()[:2], "big") / 65536
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def hex_colour(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def mask_edge(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask with a 4-neighbour outside it (the image border counts as outside)."""
    inside = mask.astype(bool)
    padded = np.pad(inside, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return inside & ~interior


def mask_rgba(
    mask: np.ndarray,
    colour: tuple[int, int, int],
    *,
    fill_alpha: float = FILL_ALPHA,
    edge_alpha: float = EDGE_ALPHA,
) -> np.ndarray:
    """H×W mask (bool, or 0/255) → H×W×4 uint8: the colour, semi-transparent inside,
    almost opaque on the outline (a thin lesion stays visible on a bright film),
    fully transparent outside."""
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    inside = mask > (127 if mask.dtype != bool else 0)
    rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
    rgba[inside, :3] = colour
    rgba[inside, 3] = round(255 * fill_alpha)
    rgba[mask_edge(inside), 3] = round(255 * edge_alpha)
    return rgba


def encode_png(rgba: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def read_mask(path) -> np.ndarray:
    """A stored mask PNG as a 2-D uint8 array."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))
