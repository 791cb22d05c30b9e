"""Synthetic screening mammograms with known lesions (pure numpy, no Django, no DICOM).

The platform needs mammograms with exact ground truth where no real data may be
shipped (demos, CI, load tests). These are not realistic enough to train a model for
patients; they are realistic enough to exercise every path a real study takes: a
breast outline with the thickness roll-off at the skin, fibroglandular texture
(power-law noise, stretched toward the nipple, as in real parenchyma), the pectoral
muscle on MLO views, quantum noise, and in some breasts a mass (round/oval or
spiculated) or a microcalcification cluster whose truth box is the exact support of
what was drawn.

A patient's plan (age, density, which breast has which lesion) is drawn from
`default_rng([seed, patient, 0])` and the pixels from `default_rng([seed, patient, 1])`:
a patient is the same whatever the cohort size, the same seed gives the same pixels,
and the truth can be read without drawing the images.
Images are laid out as a left breast (chest wall at column 0) and mirrored for the
right breast, as a reader hangs them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

ROWS, COLUMNS = 1024, 800
MAX_VALUE = 4095  # 12 bits stored
VIEWS = (("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO"))
DENSITIES = ("A", "B", "C", "D")  # ACR breast density categories
DENSITY_WEIGHTS = (0.1, 0.4, 0.4, 0.1)
LESION_PROBABILITY = 0.15  # per breast: most breasts stay normal
# Stamps are cut where they add less than this, so a lesion's footprint is finite
# and its truth box is exactly that footprint.
STAMP_FLOOR = 2.0


@dataclass(frozen=True)
class Lesion:
    """One lesion's truth in one image. Box: (x0, y0, x1, y1), pixels, x1/y1 exclusive."""

    key: str  # the same lesion in both views of a breast has the same key
    kind: str  # "mass" or "calcification"
    pathology: str  # "benign" or "malignant"
    shape: str  # round, oval, spiculated; or the calcification morphology
    size_px: float  # mass radius, or cluster radius
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Phantom:
    """One view: 12-bit pixels in uint16, the window that shows the breast, the truth."""

    laterality: str
    view: str
    pixels: np.ndarray
    window: tuple[float, float]
    lesions: tuple[Lesion, ...]
    density: str


@dataclass(frozen=True)
class LesionPlan:
    """What a breast will show, before it is drawn (the position is chosen per view)."""

    key: str  # the breast's side; the same lesion keeps it in both views
    kind: str
    pathology: str
    shape: str
    size_px: float


@dataclass(frozen=True)
class PatientPlan:
    """A patient's ground truth at the breast level, cheap to draw without the pixels."""

    index: int  # 1-based
    age: int
    density: str
    lesions: dict[str, tuple[LesionPlan, ...]]  # by laterality, "R" and "L"


@dataclass(frozen=True)
class PhantomPatient:
    plan: PatientPlan
    images: tuple[Phantom, ...]

    @property
    def index(self) -> int:
        return self.plan.index


def screening_cohort(patients: int, seed: int = 0) -> Iterator[PhantomPatient]:
    """Patients 1..`patients`, four views each."""
    for index in range(1, patients + 1):
        yield screening_patient(index, seed)


def patient_plan(index: int, seed: int = 0) -> PatientPlan:
    """Age, density and lesions of patient `index`, from their own random stream."""
    rng = np.random.default_rng([seed, index, 0])
    age = int(rng.integers(40, 75))
    density = str(rng.choice(DENSITIES, p=DENSITY_WEIGHTS))
    lesions = {side: (_plan_lesion(rng, side),) if rng.random() < LESION_PROBABILITY else () for side in ("R", "L")}
    return PatientPlan(index=index, age=age, density=density, lesions=lesions)


def screening_patient(index: int, seed: int = 0, *, with_lesions: bool = True) -> PhantomPatient:
    """One patient's four views. `with_lesions=False` draws the very same breasts with
    their lesions left out: the difference is each lesion's footprint, which is how the
    truth boxes are checked."""
    plan = patient_plan(index, seed)
    rng = np.random.default_rng([seed, index, 1])
    images = tuple(
        _view(rng, laterality, view, plan.density, plan.lesions[laterality], with_lesions) for laterality, view in VIEWS
    )
    return PhantomPatient(plan=plan, images=images)


def _plan_lesion(rng: np.random.Generator, key: str) -> LesionPlan:
    roll = rng.random()
    if roll < 0.4:
        pathology = _pick(rng, 0.85, "benign", "malignant")
        return LesionPlan(key, "mass", pathology, str(rng.choice(["round", "oval"])), float(rng.uniform(10, 28)))
    if roll < 0.65:
        pathology = _pick(rng, 0.9, "malignant", "benign")
        return LesionPlan(key, "mass", pathology, "spiculated", float(rng.uniform(8, 18)))
    pathology = _pick(rng, 0.55, "benign", "malignant")
    shape = "punctate" if pathology == "benign" else "pleomorphic"
    return LesionPlan(key, "calcification", pathology, shape, float(rng.uniform(8, 24)))


def _pick(rng: np.random.Generator, p_first: float, first: str, second: str) -> str:
    return first if rng.random() < p_first else second


# --- one view ---------------------------------------------------------------------------


def _view(
    rng: np.random.Generator,
    laterality: str,
    view: str,
    density: str,
    plans: tuple[LesionPlan, ...],
    with_lesions: bool,
) -> Phantom:
    # Anatomy and parenchyma vary slowly: they are drawn at half resolution and
    # interpolated, which keeps a view near 40 ms here; lesions and noise are drawn at full.
    half = (ROWS // 2, COLUMNS // 2)
    rho_half, pectoral_half = _anatomy(rng, view, half)
    thickness = np.clip((1.0 - rho_half) / 0.12, 0.0, 1.0) ** 0.6

    gland_share = {"A": 0.15, "B": 0.35, "C": 0.55, "D": 0.75}[density]
    texture = _power_noise(rng, half, beta=3.0, stretch=2.5)
    # Parenchyma sits inside the subcutaneous fat and thins toward the skin line.
    envelope = np.clip((0.92 - rho_half) / 0.35, 0.0, 1.0)
    threshold = np.quantile(texture[::4, ::4], 1.0 - gland_share)
    glandular = envelope / (1.0 + np.exp(-(texture - threshold) * 2.0))
    grain = _power_noise(rng, half, beta=2.0, stretch=1.0)

    tissue = thickness * (900.0 + 1000.0 * glandular + 40.0 * grain)
    # A soft muscle edge, denser toward the chest wall and the axilla.
    muscle = np.clip(pectoral_half * 25.0, 0.0, 1.0) * (1750.0 + 700.0 * pectoral_half + 40.0 * grain)
    values = _upsample2(np.maximum(tissue, muscle))
    rho, pectoral = _upsample2(rho_half), _upsample2(pectoral_half)

    lesions = []
    for plan in plans:
        stamp, (top, left) = _stamp(rng, plan, rho, pectoral)
        if with_lesions:
            rows, cols = stamp.shape
            values[top : top + rows, left : left + cols] += stamp
        ys, xs = np.nonzero(stamp)
        box = (left + int(xs.min()), top + int(ys.min()), left + int(xs.max()) + 1, top + int(ys.max()) + 1)
        lesions.append(Lesion(plan.key, plan.kind, plan.pathology, plan.shape, plan.size_px, box))

    values += 60.0  # air behind the breast is not quite zero on a detector
    values += rng.standard_normal(values.shape, dtype=np.float32) * (0.5 * np.sqrt(values))
    pixels = np.clip(np.rint(values), 0, MAX_VALUE).astype(np.uint16)

    breast = pixels[::4, ::4][rho[::4, ::4] < 0.97]
    lo, hi = np.percentile(breast, [1.0, 99.9])
    window = (float(round((lo + hi) / 2.0)), float(round(hi - lo + 1.0)))

    if laterality == "R":  # mirror: the chest wall goes to the right edge
        pixels = np.ascontiguousarray(pixels[:, ::-1])
        lesions = [
            replace(les, box=(COLUMNS - les.box[2], les.box[1], COLUMNS - les.box[0], les.box[3])) for les in lesions
        ]
    return Phantom(laterality, view, pixels, window, tuple(lesions), density)


def _upsample2(a: np.ndarray) -> np.ndarray:
    """Twice the size in both directions, by linear interpolation."""
    rows = np.empty((a.shape[0] * 2, a.shape[1]), dtype=np.float32)
    rows[0::2] = a
    rows[1:-1:2] = (a[:-1] + a[1:]) * 0.5
    rows[-1] = a[-1]
    out = np.empty((rows.shape[0], a.shape[1] * 2), dtype=np.float32)
    out[:, 0::2] = rows
    out[:, 1:-1:2] = (rows[:, :-1] + rows[:, 1:]) * 0.5
    out[:, -1] = rows[:, -1]
    return out


def _anatomy(rng: np.random.Generator, view: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Normalised breast radius ρ (0 at the chest wall centre, 1 at the skin line) and
    the depth into the pectoral muscle (0 outside, 1 at the top corner; MLO only),
    for a left breast."""
    rows, cols = shape
    y, x = np.ogrid[0:rows, 0:cols]
    y = y.astype(np.float32)
    x = x.astype(np.float32)
    if view == "CC":
        cy = rows * rng.uniform(0.46, 0.54)
        a, b, tilt = cols * rng.uniform(0.62, 0.82), rows * rng.uniform(0.36, 0.44), 0.0
    else:
        cy, a, b = rows * rng.uniform(0.54, 0.62), cols * rng.uniform(0.66, 0.84), rows * rng.uniform(0.40, 0.46)
        tilt = rng.uniform(0.15, 0.35)  # MLO breasts droop toward the lower corner
    u = x * np.cos(tilt) + (y - cy) * np.sin(tilt)
    v = -x * np.sin(tilt) + (y - cy) * np.cos(tilt)
    angle = np.arctan2(v / b, u / a)
    # A few low harmonics make the outline less than a perfect ellipse.
    wobble = 1.0 + sum(rng.uniform(-0.025, 0.025) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2) / wobble

    pectoral = np.zeros(shape, dtype=np.float32)
    if view == "MLO":
        px, py = cols * rng.uniform(0.22, 0.36), rows * rng.uniform(0.45, 0.65)
        inside = 1.0 - x / px - y / py  # > 0 in the triangle at the top of the chest wall
        pectoral = np.clip(inside, 0.0, 1.0).astype(np.float32)
        rho = np.where(inside > 0, np.minimum(rho, 0.5), rho)  # tissue all the way up the muscle
    return rho.astype(np.float32), pectoral


def _power_noise(rng: np.random.Generator, shape: tuple[int, int], *, beta: float, stretch: float) -> np.ndarray:
    """Zero-mean, unit-variance noise with power ∝ f^-beta; `stretch` > 1 elongates the
    structures along x (toward the nipple), as ducts and ligaments run."""
    amplitude = _spectrum_amplitude(shape, beta, stretch)
    spectrum = rng.standard_normal(amplitude.shape, dtype=np.float32) + 1j * rng.standard_normal(
        amplitude.shape, dtype=np.float32
    )
    noise = np.fft.irfft2(spectrum * amplitude, s=shape)
    return ((noise - noise.mean()) / noise.std()).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _spectrum_amplitude(shape: tuple[int, int], beta: float, stretch: float) -> np.ndarray:
    rows, cols = shape
    fy = np.fft.fftfreq(rows).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(cols).astype(np.float32)[None, :]
    f = np.sqrt((fx * stretch) ** 2 + fy**2)
    f[0, 0] = 1.0
    amplitude = f ** (-beta / 2.0)
    amplitude[0, 0] = 0.0
    amplitude.flags.writeable = False  # shared by every call through the cache
    return amplitude


# --- lesions ----------------------------------------------------------------------------


def _stamp(
    rng: np.random.Generator, plan: LesionPlan, rho: np.ndarray, pectoral: np.ndarray
) -> tuple[np.ndarray, tuple[int, int]]:
    """The lesion's added intensity on a patch, and the patch's top-left corner."""
    if plan.kind == "mass" and plan.shape == "spiculated":
        patch = _spiculated_mass(rng, plan.size_px)
    elif plan.kind == "mass":
        patch = _round_mass(rng, plan.size_px, oval=plan.shape == "oval")
    else:
        patch = _calcification_cluster(rng, plan.size_px, malignant=plan.pathology == "malignant")
    patch[patch < STAMP_FLOOR] = 0.0
    cy, cx = _lesion_site(rng, rho, pectoral, margin=max(patch.shape) / 2 + 4)
    return patch, (cy - patch.shape[0] // 2, cx - patch.shape[1] // 2)


def _lesion_site(rng: np.random.Generator, rho: np.ndarray, pectoral: np.ndarray, margin: float) -> tuple[int, int]:
    """A centre well inside the breast, off the muscle, whose patch fits in the image."""
    rows, cols = rho.shape
    lo_y, hi_y = int(margin), int(rows - margin)
    lo_x, hi_x = int(margin), int(cols - margin)
    m = int(margin)
    for _ in range(200):
        y, x = int(rng.integers(lo_y, hi_y)), int(rng.integers(lo_x, hi_x))
        if 0.15 < rho[y, x] < 0.7 and not pectoral[y - m : y + m, x - m : x + m].any():
            return y, x
    raise RuntimeError("no room for a lesion in this breast")  # the geometry ranges make this unreachable


def _grid(half: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    return y.astype(np.float32), x.astype(np.float32)


def _round_mass(rng: np.random.Generator, radius: float, *, oval: bool) -> np.ndarray:
    """A dense dome with a circumscribed, slightly lobulated edge."""
    half = int(np.ceil(radius * 1.3)) + 2
    y, x = _grid(half)
    theta = rng.uniform(0, np.pi)
    ratio = rng.uniform(0.55, 0.8) if oval else rng.uniform(0.85, 1.0)
    u = x * np.cos(theta) + y * np.sin(theta)
    v = (-x * np.sin(theta) + y * np.cos(theta)) / ratio
    angle = np.arctan2(v, u)
    edge = radius * (1.0 + 0.06 * np.cos(3 * angle + rng.uniform(0, 2 * np.pi)))
    d = np.sqrt(u**2 + v**2) / edge
    amplitude = rng.uniform(260, 420)
    return (amplitude * np.clip(1.0 - d**2, 0.0, 1.0) ** 0.4).astype(np.float32)


def _spiculated_mass(rng: np.random.Generator, radius: float) -> np.ndarray:
    """An irregular dense core with thin spicules radiating from it."""
    reach = radius * 3.0
    half = int(np.ceil(reach)) + 3
    y, x = _grid(half)
    angle = np.arctan2(y, x)
    edge = radius * (1.0 + sum(rng.uniform(-0.12, 0.12) * np.cos(k * angle + rng.uniform(0, 6.3)) for k in (2, 3, 4)))
    d = np.sqrt(x**2 + y**2) / edge
    amplitude = rng.uniform(300, 460)
    out = amplitude * np.clip(1.0 - d**2, 0.0, 1.0) ** 0.4
    for direction in rng.uniform(0, 2 * np.pi, size=int(rng.integers(10, 22))):
        length = radius * rng.uniform(1.4, 3.0)
        width = rng.uniform(1.0, 2.0)
        along = x * np.cos(direction) + y * np.sin(direction)
        across = -x * np.sin(direction) + y * np.cos(direction)
        fade = np.clip(1.0 - along / length, 0.0, 1.0) * (along > 0)
        out = np.maximum(out, 0.6 * amplitude * fade * np.exp(-((across / width) ** 2)))
    return out.astype(np.float32)


def _calcification_cluster(rng: np.random.Generator, radius: float, *, malignant: bool) -> np.ndarray:
    """Bright specks: malignant clusters have more, smaller, irregular ones close together."""
    count = int(rng.integers(10, 26)) if malignant else int(rng.integers(4, 9))
    half = int(np.ceil(radius)) + 6
    y, x = _grid(half)
    out = np.zeros_like(x)
    for _ in range(count):
        r, phi = radius * np.sqrt(rng.uniform(0, 1)), rng.uniform(0, 2 * np.pi)
        sy, sx = r * np.sin(phi), r * np.cos(phi)
        sigma = rng.uniform(0.6, 1.1) if malignant else rng.uniform(1.0, 1.6)
        stretch = rng.uniform(1.0, 2.2) if malignant else 1.0
        brightness = rng.uniform(700, 1300)
        out = np.maximum(out, brightness * np.exp(-(((x - sx) / (sigma * stretch)) ** 2 + ((y - sy) / sigma) ** 2) / 2))
    return out
