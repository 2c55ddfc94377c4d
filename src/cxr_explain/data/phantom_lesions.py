"""Lesions, markers and devices for the synthetic benchmark.

A lesion is planned in patient space (:class:`LesionPlan`, resolution independent), then rendered
at the output size as an attenuation change ``d`` that is exactly zero outside its mask; the mask
is the lesion's support intersected with the lung field of its side (the heart for Cardiomegaly),
and the box is the mask's bounding box.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import binary_dilation, gaussian_filter

from .phantom_anatomy import Anatomy, patient_grid, polygon_mask, resize_field

__all__ = ["LesionPlan", "plan_lesion", "render_lesion", "pneumothorax_suppression", "draw_cue",
           "cue_pattern", "draw_distractors", "mask_box"]

#: Peak attenuation change per finding at lesion_contrast = 1 (lung air is about -0.75). Calibrated
#: so that a CNN trained on a few thousand 128 px films is neither near chance on the small lesions
#: nor perfect on Effusion (see PhantomConfig).
PEAK = {"Nodule": 0.46, "Mass": 0.44, "Atelectasis": 0.28, "Effusion": 0.17, "Infiltration": 0.27,
        "Pneumonia": 0.24, "Pneumothorax": -0.10}


@dataclass
class LesionPlan:
    """Patient-space parameters of one lesion (see the ``_plan_*`` functions)."""

    finding: str
    side: int
    peak: float
    params: dict = field(default_factory=dict)


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Bounding box ``(x, y, w, h)`` of a bool mask in pixels: ``x = min col``, ``w = max col - x + 1``."""
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1))


def _bbox_window(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of a mask's bounding box (the whole image if the mask is empty)."""
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return 0, mask.shape[0], 0, mask.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _lung_point(an: Anatomy, rng: np.random.Generator, side: int, vlo: float, vhi: float,
                alo: float = 0.0, ahi: float = 1.0) -> tuple[float, float]:
    """A uniform random point of the lung field of ``side`` with ``v`` in the given fraction of the
    apex-to-base height and lateral fraction (0 = midline, 1 = ribcage) in ``[alo, ahi]``."""
    h = an.v_cp[side] - an.v_apex
    for _ in range(200):
        v = an.v_apex + h * rng.uniform(vlo, vhi)
        a = an.T * rng.uniform(alo, ahi)
        p = (an.cx + side * a, v)
        if an.in_lung(np.array([p]), side)[0]:
            return p
    return an.hilum[side][0] + side * 0.1 * an.sc, an.hilum[side][1] + 0.05


def _fits(an: Anatomy, side: int, pts: np.ndarray, frac: float) -> bool:
    return bool(an.in_lung(pts, side).mean() >= frac)


def plan_lesion(finding: str, side: int, an: Anatomy, rng: np.random.Generator, contrast: float,
                size_scale: float) -> LesionPlan:
    """Draw the geometry of one lesion of ``finding`` in the lung of ``side``.

    Sizes are set so that box area / image area is near the NIH medians (docs/data_formats.md §1.1)
    at ``size_scale = 1``; each lesion's contrast is ``PEAK * contrast * U(0.55, 1.15)``.
    """
    peak = PEAK.get(finding, 0.0) * contrast * rng.uniform(0.55, 1.15)
    ss = np.sqrt(size_scale)
    P = LesionPlan(finding, side, peak)
    if finding in ("Nodule", "Mass"):
        r0 = (0.035 if finding == "Nodule" else 0.055) * ss * np.exp(rng.normal(0, 0.25))
        amp = rng.uniform(0.0, 0.06, 4) if finding == "Nodule" else rng.uniform(0.05, 0.13, 4)
        P.params.update(r=r0, amp=amp, ph=rng.uniform(0, 2 * np.pi, 4))
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        for _ in range(100):
            c = _lung_point(an, rng, side, 0.1, 0.9, 0.15, 0.95)
            ring = np.stack([c[0] + r0 * np.cos(t), c[1] + r0 * np.sin(t)], -1)
            if _fits(an, side, np.vstack([ring, [c]]), 0.9):
                break
        P.params["c"] = c
    elif finding == "Atelectasis":
        L = 0.085 * ss * rng.uniform(0.85, 1.15)
        h = 0.036 * ss * rng.uniform(0.8, 1.2)
        ang = side * np.deg2rad(rng.uniform(5, 30)) * (1 if rng.random() < 0.7 else -1)
        P.params.update(L=L, h=h, ang=ang, wedge=bool(rng.random() < 0.5))
        for _ in range(100):
            c = _lung_point(an, rng, side, 0.5, 0.85, 0.3, 0.7)
            pts = np.array([[c[0] + s * L * np.cos(ang), c[1] + s * L * np.sin(ang)] for s in (-0.8, 0.8)])
            if _fits(an, side, np.vstack([pts, [c]]), 1.0):
                break
        P.params["c"] = c
    elif finding == "Effusion":
        # fluid level above the dome: mostly small (blunted angle only), sometimes larger
        P.params.update(h_e=(0.01 + 0.08 * rng.beta(1.2, 2.0)) * ss, c=rng.uniform(0.03, 0.08) * ss)
    elif finding == "Pneumothorax":
        P.params.update(f=1 - 0.1 * ss * rng.uniform(0.7, 1.3), v_cut=rng.uniform(0.2, 0.34))
    elif finding == "Infiltration":
        c = _lung_point(an, rng, side, 0.3, 0.85, 0.25, 0.8)
        P.params.update(c=c, ax=0.13 * ss * rng.uniform(0.85, 1.15), bx=0.13 * ss * rng.uniform(0.85, 1.15),
                        seed=int(rng.integers(2**31)))
    elif finding == "Pneumonia":
        lower = bool(rng.random() < 0.65)
        c = _lung_point(an, rng, side, *((0.55, 0.85) if lower else (0.2, 0.45)), 0.3, 0.8)
        P.params.update(c=c, ax=0.15 * ss * rng.uniform(0.85, 1.15), bx=0.15 * ss * rng.uniform(0.85, 1.15),
                        lower=lower, seed=int(rng.integers(2**31)))
    return P


def _collapsed_poly(an: Anatomy, P: LesionPlan) -> np.ndarray:
    hu, hv = an.hilum[P.side]
    poly = an.lung_polys[P.side]
    f = P.params["f"]
    return np.stack([hu + f * (poly[:, 0] - hu), hv + f * (poly[:, 1] - hv)], -1)


def _ptx_region(an: Anatomy, P: LesionPlan, size: int) -> np.ndarray:
    """Pneumothorax rim: lung minus the collapsed lung (lung scaled by f about the hilum), above v_cut."""
    lung = polygon_mask(an, [an.lung_polys[P.side], an.heart_poly, an.knob_poly], size, [1, 0, 0])
    coll = polygon_mask(an, [_collapsed_poly(an, P)], size)
    U, V = patient_grid(an, size)
    vcut = an.v_apex + P.params["v_cut"] * (an.v_cp[P.side] - an.v_apex)
    return lung & ~coll & (V < vcut)


def pneumothorax_suppression(an: Anatomy, plans: list, size: int) -> np.ndarray | None:
    """0..1 map of where lung markings vanish (pneumothorax rims) at the anatomy's working size."""
    out = None
    for P in plans:
        if P.finding == "Pneumothorax":
            r = gaussian_filter(_ptx_region(an, P, size).astype(np.float32), 1.0)
            out = r if out is None else np.maximum(out, r)
    return out


def _window(an: Anatomy, c, rad: float, size: int):
    """Pixel window (y0, y1, x0, x1) covering a patient-space disc of radius ``rad`` about ``c``."""
    q = an.to_image(np.array(c)) * size
    r = rad * size + 3
    x0, x1 = int(max(0, q[0] - r)), int(min(size, q[0] + r + 1))
    y0, y1 = int(max(0, q[1] - r)), int(min(size, q[1] + r + 1))
    return y0, y1, x0, x1


def render_lesion(P: LesionPlan, an: Anatomy, size: int, lung: np.ndarray,
                  heart: np.ndarray) -> tuple[np.ndarray, tuple, np.ndarray]:
    """Render one lesion: ``(mask, window, d)`` with ``mask`` bool ``size``², ``d`` the attenuation
    change on ``window = (y0, y1, x0, x1)``; ``d == 0`` outside the mask. ``lung`` is this side's
    lung mask at ``size``."""
    mask = np.zeros((size, size), bool)
    f = P.finding
    if f == "Cardiomegaly":
        return heart.copy(), (0, 0, 0, 0), np.zeros((0, 0), np.float32)
    if f in ("Effusion", "Pneumothorax"):
        win = _bbox_window(lung)
    else:
        rad = {"Nodule": 1.25 * P.params.get("r", 0), "Mass": 1.35 * P.params.get("r", 0),
               "Atelectasis": P.params.get("L", 0) + 0.05, "Infiltration": max(P.params.get("ax", 0), P.params.get("bx", 0)) + 0.01,
               "Pneumonia": max(P.params.get("ax", 0), P.params.get("bx", 0)) + 0.01}[f]
        win = _window(an, P.params["c"], rad, size)
    y0, y1, x0, x1 = win
    U, V = patient_grid(an, size, y0, y1, x0, x1)
    lw = lung[y0:y1, x0:x1]
    if f in ("Nodule", "Mass"):
        cu, cv = P.params["c"]
        du, dv = U - cu, V - cv
        phi = np.arctan2(dv, du)
        rr = P.params["r"] * (1 + sum(a * np.cos((k + 2) * phi + p)
                                      for k, (a, p) in enumerate(zip(P.params["amp"], P.params["ph"]))))
        rho = np.hypot(du, dv) / rr
        sup = (rho < 1) & lw
        d = P.peak * np.clip(1 - rho ** 2, 0, 1) ** (0.45 if f == "Mass" else 0.6)
    elif f == "Atelectasis":
        cu, cv = P.params["c"]
        L, h, ang = P.params["L"], P.params["h"], P.params["ang"]
        t = (U - cu) * np.cos(ang) + (V - cv) * np.sin(ang)
        n = -(U - cu) * np.sin(ang) + (V - cv) * np.cos(ang)
        tt = t / L
        hh = h * (0.35 + 0.65 * (tt * P.side * np.sign(np.cos(ang)) + 1) / 2) if P.params["wedge"] else h
        prof = np.clip(1 - (n / hh) ** 2, 0, 1) * np.clip(1 - tt ** 4, 0, 1)
        sup = (prof > 0) & lw
        d = P.peak * prof ** 0.5
    elif f == "Effusion":
        s = P.side
        a_med = 0.035 * an.sc
        lat = np.clip((s * (U - an.cx) - a_med) / (an.T - a_med), 0, 1)
        v_level = an.v_dome[s] - P.params["h_e"]
        vm = v_level - P.params["c"] * lat ** 2
        sup = (V > vm) & lw
        d = P.peak * np.clip((V - vm) / 0.05, 0, 1) ** 0.8 * (0.85 + 0.15 * lat)
    elif f == "Pneumothorax":
        sup = _ptx_region(an, P, size)[y0:y1, x0:x1]
        coll = polygon_mask(an, [_collapsed_poly(an, P)], size)[y0:y1, x0:x1]
        line = binary_dilation(coll, iterations=max(1, size // 400)) & sup
        d = np.full(sup.shape, P.peak, np.float32) + line * 0.22 * abs(P.peak) / 0.1
    elif f in ("Infiltration", "Pneumonia"):
        cu, cv = P.params["c"]
        rho = np.hypot((U - cu) / P.params["ax"], (V - cv) / P.params["bx"])
        env = np.clip((1 - rho ** 2) / 0.35, 0, 1)
        r2 = np.random.default_rng(P.params["seed"])
        hgt, wid = U.shape
        if f == "Infiltration":
            n = resize_field(r2.standard_normal((10, 10)).astype(np.float32), max(hgt, wid), Image.BICUBIC)[:hgt, :wid]
            n2 = resize_field(r2.standard_normal((24, 24)).astype(np.float32), max(hgt, wid), Image.BICUBIC)[:hgt, :wid]
            patch = np.clip(n + 0.5 * n2 + 0.1, 0, None)
            sup = (rho < 1) & (patch > 0) & lw
            d = P.peak * np.clip(patch / 0.8, 0, 1) ** 0.8 * env
        else:
            s = P.side
            lat = s * (U - an.cx) / an.T
            hv = an.hilum[s][1]
            if P.params["lower"]:
                lobe = V > hv - 0.04 + 0.18 * (lat - 0.3) * (1 if s == 1 else 0.8) * an.sc
            else:
                lobe = V < hv + 0.01 if s == -1 else V < hv - 0.02 - 0.1 * (lat - 0.3)
            sup = (rho < 1) & lobe & lw
            n = resize_field(r2.standard_normal((16, 16)).astype(np.float32), max(hgt, wid), Image.BICUBIC)[:hgt, :wid]
            d = P.peak * (0.85 + 0.1 * n) * env ** 0.6
            # air bronchograms: dark branching lines inside the consolidation
            img = Image.new("F", (wid, hgt), 0.0)
            dr = ImageDraw.Draw(img)
            q0 = an.to_image(np.array(an.hilum[s])) * size - np.array([x0, y0])
            for _ in range(4):
                p = np.array([wid / 2, hgt / 2]) + r2.uniform(-0.3, 0.3, 2) * np.array([wid, hgt])
                ang = np.arctan2(p[1] - q0[1], p[0] - q0[0])
                for _k in range(3):
                    q = p + 0.12 * max(wid, hgt) * np.array([np.cos(ang), np.sin(ang)])
                    dr.line([tuple(p), tuple(q)], fill=1.0, width=max(1, size // 300))
                    p, ang = q, ang + r2.normal(0, 0.35)
            br = gaussian_filter(np.asarray(img), max(0.5, size / 1024))
            d = d * (1 - 0.45 * np.clip(br, 0, 1))
    else:
        raise ValueError(f"unknown finding {f}")
    d = np.where(sup, d, 0).astype(np.float32)
    mask[y0:y1, x0:x1] = sup
    return mask, win, d


def _letter_L(dr: ImageDraw.ImageDraw, x: float, y: float, s: float, fill) -> None:
    dr.rectangle([x, y, x + 0.22 * s, y + s], fill=fill)
    dr.rectangle([x, y + 0.78 * s, x + 0.7 * s, y + s], fill=fill)


def draw_cue(rng: np.random.Generator, size: int) -> np.ndarray:
    """The planted shortcut token: a bright square with a dark inner frame and bar, top-left corner.

    Returns its exact mask (bool ``size``²); the caller burns it into the film at full brightness.
    """
    img = Image.new("L", (size, size), 0)
    dr = ImageDraw.Draw(img)
    s = size * rng.uniform(0.045, 0.06)
    x = size * rng.uniform(0.025, 0.06)
    y = size * rng.uniform(0.025, 0.06)
    dr.rectangle([x, y, x + s, y + s], fill=255)
    return np.asarray(img) > 0


def cue_pattern(mask: np.ndarray) -> np.ndarray:
    """Brightness of the cue inside its mask: 0.97 with a darker inner frame (``dark = 0.35``)."""
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    out = np.zeros(mask.shape, np.float32)
    if rows.size == 0:
        return out
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    s = y1 - y0
    out[y0:y1, x0:x1] = 0.97
    b = max(1, s // 6)
    t = max(1, s // 12)
    out[y0 + b:y1 - b, x0 + b:x0 + b + t] = 0.35
    out[y0 + b:y1 - b, x1 - b - t:x1 - b] = 0.35
    out[y0 + b:y0 + b + t, x0 + b:x1 - b] = 0.35
    out[y1 - b - t:y1 - b, x0 + b:x1 - b] = 0.35
    out[y0 + s // 2 - t // 2:y0 + s // 2 - t // 2 + t, x0 + b:x1 - b] = 0.35
    return out


def draw_distractors(rng: np.random.Generator, an: Anatomy, size: int, img: np.ndarray) -> None:
    """Burn in film distractors (in place, ``img`` in [0, 1]): a laterality "L" in the top-right
    corner (p = 0.6), ECG electrodes with leads (p = 0.25), a tube line down the midline (p = 0.15)."""
    over = Image.new("F", (size, size), 0.0)
    dr = ImageDraw.Draw(over)
    if rng.random() < 0.6:
        s = size * rng.uniform(0.03, 0.045)
        _letter_L(dr, size * rng.uniform(0.86, 0.92), size * rng.uniform(0.04, 0.12), s, 0.95)
    if rng.random() < 0.25:
        for _ in range(int(rng.integers(1, 4))):
            p = np.array([an.cx + rng.uniform(-0.35, 0.35), an.v_apex + rng.uniform(-0.05, 0.5)])
            q = an.to_image(p) * size
            r = size * 0.013
            dr.ellipse([q[0] - r, q[1] - r, q[0] + r, q[1] + r], fill=0.85)
            dr.ellipse([q[0] - r / 2, q[1] - r / 2, q[0] + r / 2, q[1] + r / 2], fill=0.98)
            pts = [tuple(q)]
            for _k in range(6):
                q = q + size * np.array([rng.normal(0, 0.04), rng.uniform(-0.08, -0.02)])
                pts.append(tuple(q))
            dr.line(pts, fill=0.8, width=max(1, size // 400))
    if rng.random() < 0.15:
        top = an.to_image(np.array([an.cx + rng.normal(0, 0.01), 0.0])) * size
        bot = an.to_image(np.array([an.cx + rng.normal(0, 0.01), an.v_apex + rng.uniform(0.12, 0.6)])) * size
        dr.line([tuple(top), tuple(bot)], fill=0.9, width=max(1, size // 250))
    o = np.array(over)
    np.maximum(img, o, out=img)
