"""A seeded synthetic left-atrium phantom so the demo and the tests run offline.

Each case is a small LGE-MRI-like volume of the heart: the LA body with 2–4 pulmonary veins and the appendage,
and the other blood pools of the *same* brightness (LV, RV, RA with the caval veins, aorta, pulmonary artery),
separated by thin dark walls, inside textured tissue and dark lungs; then partial-volume blur, a smooth
multiplicative bias field, Rician noise and an arbitrary intensity scale. Structures keep their anatomical
arrangement (LA posterior, descending aorta behind it, RA to the right, LV left-anterior-inferior, aorta and
pulmonary artery anterior-superior) under a per-patient pose, size and shape change, so the LA is found from
context and shape, never by thresholding.

The label is the LA blood pool: body, appendage and the proximal ~9 mm of each pulmonary vein (the distal veins
are blood of the same brightness but not LA, as in the challenge labels).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from lasegseg.data.io import write_volume
from lasegseg.errors import DataError

DEFAULT_SHAPE = (104, 104, 40)
DEFAULT_SPACING = (1.25, 1.25, 2.5)
PHANTOM_LAYOUTS = ("msd", "lasc2018", "lascarqs", "generic")

# Mean intensities before bias, noise and scaling; every blood pool shares one value.
_BLOOD, _WALL, _TISSUE, _LUNG = 1.0, 0.16, 0.38, 0.06
# Blood pools closer than this (mm, in the distance-like field) are split by a wall (septa).
_SEPTUM_MM = 2.0
# Length of each pulmonary vein counted as LA beyond the body surface (mm).
_PV_LABEL_MM = 9.0


@dataclass
class _Part:
    """An ellipsoid (``radii`` set) or a tapered capsule from ``a`` to ``b``, in anatomy coordinates (mm)."""

    a: np.ndarray
    b: np.ndarray | None = None
    radii: np.ndarray | None = None
    r0: float = 0.0
    r1: float = 0.0
    rot: np.ndarray | None = None

    def inside(self, q: np.ndarray) -> np.ndarray:
        """Approximate signed distance (mm), positive inside; ``q`` is (3, ...) coordinates."""
        d = [q[k] - np.float32(self.a[k]) for k in range(3)]
        if self.radii is not None:
            if self.rot is not None:
                d = [sum(d[j] * np.float32(self.rot[j, k]) for j in range(3)) for k in range(3)]
            u = [d[k] / np.float32(self.radii[k]) for k in range(3)]
            r = np.sqrt(u[0] * u[0] + u[1] * u[1] + u[2] * u[2])
            # First-order distance to the surface: (r - 1) / |grad r|.
            g = [u[k] / np.float32(self.radii[k]) for k in range(3)]
            grad = np.sqrt(g[0] * g[0] + g[1] * g[1] + g[2] * g[2]) / np.maximum(r, 1e-6)
            return (1.0 - r) / np.maximum(grad, 1e-6)
        v = (self.b - self.a).astype(np.float32)
        t = np.clip((d[0] * v[0] + d[1] * v[1] + d[2] * v[2]) / np.float32(v @ v), 0.0, 1.0)
        e = [d[k] - t * v[k] for k in range(3)]
        dist = np.sqrt(e[0] * e[0] + e[1] * e[1] + e[2] * e[2])
        return np.float32(self.r0) + np.float32(self.r1 - self.r0) * t - dist


def _ellipsoid(c, radii, axis=None) -> _Part:
    """Ellipsoid whose first radius lies along ``axis`` (the others perpendicular to it)."""
    rot = None
    if axis is not None:
        e0 = np.asarray(axis, float) / np.linalg.norm(axis)
        helper = np.array([0.0, 1.0, 0.0]) if abs(e0[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
        e1 = np.cross(e0, helper)
        e1 /= np.linalg.norm(e1)
        rot = np.stack([e0, e1, np.cross(e0, e1)], axis=1)
    return _Part(np.asarray(c, float), radii=np.asarray(radii, float), rot=rot)


def _tube(a, b, r0, r1=None) -> _Part:
    return _Part(np.asarray(a, float), np.asarray(b, float), r0=float(r0), r1=float(r0 if r1 is None else r1))


def _rotation(rng: np.random.Generator, max_deg: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = (np.deg2rad(rng.uniform(-m, m)) for m in max_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _anatomy(rng: np.random.Generator) -> tuple[dict[str, list[_Part]], list[_Part], dict[str, float]]:
    """Chambers (name → parts, unioned), the parts labelled LA, and wall thickness per chamber (mm).

    Anatomy frame: RAS+ mm, origin near the middle of the heart; +x patient right, +y anterior, +z superior.
    """

    def j(v, mm=3.0):
        return np.asarray(v, float) + rng.uniform(-mm, mm, 3)

    def s(v, f=0.1):
        return np.asarray(v, float) * rng.uniform(1 - f, 1 + f, np.size(v))

    la_c = j([-4, -25, 8], 2.0)
    la_r = s([20, 15, 19])
    body = _ellipsoid(la_c, la_r)
    la_parts, labelled = [body], [body]

    # Pulmonary veins leave the LA posterolaterally: left veins towards -x, right towards +x; 2–4 of them
    # (a common trunk replaces the two veins of a side).
    n_pv = int(rng.integers(2, 5))
    two_veins = {"left": n_pv == 4, "right": n_pv >= 3}
    for side, sign in (("left", -1.0), ("right", 1.0)):
        levels = [(+0.45, 5.5), (-0.45, 5.5)] if two_veins[side] else [(0.0, 7.5)]
        for up, radius in levels:
            direction = _unit([sign * 1.0, -0.55 + rng.uniform(-0.2, 0.2), up + rng.uniform(-0.15, 0.15)])
            # Where the vein direction leaves the body ellipsoid.
            reach = 1.0 / np.linalg.norm(direction / la_r)
            start = la_c + direction * reach * 0.7
            surface = la_c + direction * reach
            radius *= rng.uniform(0.85, 1.15)
            end = surface + direction * rng.uniform(24, 32)
            la_parts.append(_tube(start, end, radius, radius * 0.85))
            labelled.append(_tube(start, surface + direction * _PV_LABEL_MM, radius))

    # Left atrial appendage: a tapered finger, left-anterior-superior of the body.
    laa_a = la_c + np.array([-0.6, 0.5, 0.45]) * la_r
    laa_b = laa_a + _unit([-0.8, 0.7, 0.35] + rng.uniform(-0.2, 0.2, 3)) * rng.uniform(13, 18)
    laa = _tube(laa_a, laa_b, rng.uniform(5.5, 7.0), rng.uniform(2.5, 3.5))
    la_parts.append(laa)
    labelled.append(laa)

    # Ascending aorta anterior to the LA, arch over it, descending aorta behind-left of it down the whole volume.
    root = j([0, 10, -6])
    arch_top = j([0, 8, 38])
    arch_back = j([-12, -18, 46])
    desc_top = j([-20, -50, 36])
    desc_bottom = desc_top + np.array([0, -2, -100])
    r_ao = rng.uniform(11, 14)
    aorta = [
        _tube(root, arch_top, r_ao),
        _tube(arch_top, arch_back, r_ao, r_ao * 0.9),
        _tube(arch_back, desc_top, r_ao * 0.9, r_ao * 0.85),
        _tube(desc_top, desc_bottom, r_ao * 0.85),
    ]
    # Pulmonary trunk from the right-ventricular outflow, left of the aorta, then the branches; the right branch
    # runs over the LA roof.
    pa_root = j([-12, 38, -2])
    pa_fork = j([-16, 18, 30])
    pa = [
        _tube(pa_root, pa_fork, rng.uniform(11, 13)),
        _tube(pa_fork, j([-48, 0, 30]), 9.0),
        _tube(pa_fork, j([30, -8, la_c[2] + la_r[2] + 12]), 8.5),
    ]
    lv_axis = _unit([-0.55, 0.45, -0.7] + rng.uniform(-0.1, 0.1, 3))
    lv = [_ellipsoid(j([-24, 20, -18]) + lv_axis * 4, s([36, 21, 20]), lv_axis)]
    rv = [_ellipsoid(j([8, 42, -20]), s([28, 11, 24]), _unit([1.0, 0.25, -0.35]))]
    ra_c = j([33, -4, 0])
    ra = [
        _ellipsoid(ra_c, s([17, 16, 21])),
        _tube(ra_c + [0, -2, 14], j([30, -6, 60]), rng.uniform(8, 10)),
        _tube(ra_c + [0, 0, -14], j([28, -4, -60]), rng.uniform(10, 12)),
    ]
    chambers = {"la": la_parts, "lv": lv, "rv": rv, "ra": ra, "aorta": aorta, "pa": pa}
    walls = {"la": 2.0, "lv": 9.0, "rv": 4.0, "ra": 2.5, "aorta": 2.5, "pa": 2.0}
    return chambers, labelled, walls


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, ...]) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-12)


def make_case(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    *,
    snr: tuple[float, float] = (8.0, 15.0),
    max_rotation_deg: tuple[float, float, float] = (8.0, 8.0, 15.0),
    max_shift_mm: tuple[float, float, float] = (8.0, 8.0, 5.0),
    size_range: tuple[float, float] = (0.85, 1.15),
    intensity_scale: tuple[float, float] = (50.0, 3000.0),
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """One phantom patient in canonical RAS+ order (axial slices ``[:, :, k]``).

    Args:
        rng: the only source of randomness; the same generator state gives identical arrays.
        shape: voxels along (x, y, z).
        spacing: voxel size in mm along (x, y, z); anisotropic by default (thicker slices).
        snr: range of the blood signal-to-noise ratio (Rician noise).
        max_rotation_deg: pose rotation range about x, y, z.
        max_shift_mm: pose translation range.
        size_range: range of the global size factor.
        intensity_scale: range of the arbitrary intensity scale (an offset up to 10% of it is added too).

    Returns:
        ``(image, label, spacing)``: float32 image, uint8 label (1 = LA), spacing as given.
    """
    chambers, labelled, walls = _anatomy(rng)
    rot = _rotation(rng, max_rotation_deg)
    shift = np.array([rng.uniform(-m, m) for m in max_shift_mm])
    size = rng.uniform(*size_range)

    # World (mm) coordinates of voxel centres, centred on the volume; anatomy coordinates undo the pose.
    axes = [(np.arange(n) - (n - 1) / 2.0) * sp for n, sp in zip(shape, spacing, strict=True)]
    world = np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)
    centred = world - shift.astype(np.float32)[:, None, None, None]
    q = np.einsum("j...,jk->k...", centred, (rot / size).astype(np.float32))

    fields = {name: np.max([p.inside(q) for p in parts], axis=0) * size for name, parts in chambers.items()}
    names = list(fields)
    stack = np.stack([fields[n] for n in names])
    order = np.argsort(stack, axis=0)
    best_idx = order[-1]
    best = np.take_along_axis(stack, best_idx[None], 0)[0]
    second = np.take_along_axis(stack, order[-2][None], 0)[0]
    blood = (best > 0) & (best - np.maximum(second, 0) > _SEPTUM_MM)
    wall_mm = np.array([walls[n] for n in names])
    wall = ~blood & np.any(stack > -wall_mm[:, None, None, None], axis=0)

    la_blood = blood & (best_idx == names.index("la"))
    label_region = np.max([p.inside(q) for p in labelled], axis=0) > 0
    label = (la_blood & label_region).astype(np.uint8)

    # Lungs lie lateral and posterior; everything cardiac is drawn over them.
    lungs = np.maximum(
        _ellipsoid([-68, -22, 0], [38, 60, 90]).inside(q), _ellipsoid([70, -22, 0], [36, 60, 90]).inside(q)
    )
    texture = _smooth_noise(rng, shape, (2.0, 2.0, 1.0))
    image = _TISSUE * (1.0 + 0.18 * texture)
    image = np.where(lungs > 0, _LUNG * (1.0 + 0.3 * texture), image)
    image = np.where(wall, _WALL * (1.0 + 0.15 * texture), image)
    image = np.where(blood, _BLOOD, image)
    # Partial volume: thicker slices blur more across z in mm but less in voxels.
    image = ndimage.gaussian_filter(image, (0.7, 0.7, 0.4))

    # Smooth multiplicative bias field (coil sensitivity): a random low-order polynomial, about ±25%.
    u = world / (np.array(shape) * np.array(spacing) / 2.0).astype(np.float32)[:, None, None, None]
    coef = rng.uniform(-0.15, 0.15, 6)
    poly = np.einsum("k...,k->...", u, coef[:3]) + coef[3] * u[0] * u[1] + coef[4] * u[0] ** 2 + coef[5] * u[1] ** 2
    image = image * np.exp(poly)

    sigma = _BLOOD / rng.uniform(*snr)
    real = image + sigma * rng.standard_normal(shape)
    imag = sigma * rng.standard_normal(shape)
    image = np.sqrt(real * real + imag * imag)

    scale = rng.uniform(*intensity_scale)
    image = image * scale + rng.uniform(0.0, 0.1) * scale
    return image.astype(np.float32), label, tuple(float(s) for s in spacing)


# Voxel axes flipped on disk per layout, so every reader path goes through a real reorientation.
_FILE_FLIPS = {"msd": (0, 1), "lasc2018": (0, 1), "lascarqs": (0,), "generic": ()}


def _to_file(data: np.ndarray, affine: np.ndarray, flips: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    affine = affine.copy()
    for ax in flips:
        data = np.flip(data, ax)
        affine[:3, 3] += affine[:3, ax] * (data.shape[ax] - 1)
        affine[:3, ax] *= -1
    return np.ascontiguousarray(data), affine


def _case_paths(out: Path, layout: str, i: int) -> tuple[str, Path, Path]:
    if layout == "msd":
        cid = f"la_{i + 1:03d}"
        return cid, out / "imagesTr" / f"{cid}.nii.gz", out / "labelsTr" / f"{cid}.nii.gz"
    if layout == "lasc2018":
        cid = f"patient_{i + 1:03d}"
        return cid, out / cid / "lgemri.nrrd", out / cid / "laendo.nrrd"
    if layout == "lascarqs":
        cid = f"train_{i + 1}"
        return cid, out / cid / "enhanced.nii.gz", out / cid / "atriumSegImgMO.nii.gz"
    cid = f"case_{i + 1:03d}"
    return cid, out / "images" / f"{cid}.nii.gz", out / "labels" / f"{cid}.nii.gz"


def write_phantom(
    out_dir: str | os.PathLike,
    cases: int = 12,
    seed: int = 0,
    layout: str = "msd",
    *,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
) -> list[Path]:
    """Write a phantom dataset in one of the supported layouts.

    Case ``i`` depends only on ``(seed, i)``, so a larger ``cases`` adds patients without changing the others.

    Args:
        out_dir: dataset folder (created if needed).
        cases: number of patients.
        seed: dataset seed.
        layout: ``msd`` (NIfTI + dataset.json, label 1), ``lasc2018`` (NRRD in LPS space, label 255),
            ``lascarqs`` (NIfTI, label 1) or ``generic`` (NIfTI, label 1).
        shape: voxels per case along (x, y, z).
        spacing: voxel size in mm.

    Returns:
        The image files written, in case order.
    """
    if layout not in PHANTOM_LAYOUTS:
        raise DataError(f"unknown phantom layout '{layout}' (valid layouts: {', '.join(PHANTOM_LAYOUTS)})")
    if cases < 1:
        raise DataError(f"phantom needs at least 1 case, got {cases}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label_value = 255 if layout == "lasc2018" else 1
    images: list[Path] = []
    training = []
    for i in range(cases):
        rng = np.random.default_rng([seed, i])
        image, label, sp = make_case(rng, shape, spacing)
        affine = np.diag([*sp, 1.0])
        # A scanner-like origin: the volume centre sits near, not at, the world origin.
        affine[:3, 3] = -(np.array(shape) - 1) / 2.0 * np.array(sp) + rng.uniform(-20, 20, 3)
        cid, image_path, label_path = _case_paths(out, layout, i)
        image_f, affine_f = _to_file(image, affine, _FILE_FLIPS[layout])
        label_f, _ = _to_file(label * np.uint8(label_value), affine, _FILE_FLIPS[layout])
        write_volume(image_path, image_f, affine_f)
        write_volume(label_path, label_f, affine_f)
        images.append(image_path)
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
    if layout == "msd":
        meta = {
            "name": "LA phantom",
            "description": f"Synthetic left-atrium phantom (lasegseg, seed {seed})",
            "tensorImageSize": "3D",
            "modality": {"0": "MRI"},
            "labels": {"0": "background", "1": "left atrium"},
            "numTraining": cases,
            "numTest": 0,
            "training": training,
            "test": [],
        }
        (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return images
