"""Normal chest anatomy for the synthetic benchmark: geometry, exact masks and an attenuation map.

Coordinates: a point is ``(u, v)`` in *patient* space, both in units of the image side (0..1,
``u`` to the image right = patient left, ``v`` downward). The image shows patient space rotated by
``theta`` about the image centre: ``q = c + R(theta) (p - c)`` with ``c = (0.5, 0.5)``.
The film is rendered from a line-integral attenuation ``mu`` (soft tissue + bone - lung air) as
``I = 1 - exp(-k mu)``, then windowed with a per-image gamma (:func:`tone_map`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from matplotlib.path import Path as MplPath
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

__all__ = ["Anatomy", "sample_anatomy", "render_anatomy", "lung_masks", "polygon_mask", "patient_grid",
           "resize_field", "smooth_noise", "tone_map", "CTR_NORMAL", "CTR_CARDIOMEGALY"]

#: Cardiothoracic-ratio ranges: normal hearts and enlarged ones (Cardiomegaly); they overlap.
CTR_NORMAL: tuple[float, float] = (0.38, 0.52)
CTR_CARDIOMEGALY: tuple[float, float] = (0.49, 0.62)


@dataclass
class Anatomy:
    """Geometry of one patient's chest in patient space (see module docstring)."""

    cx: float  # midline
    sc: float  # thorax scale
    theta: float  # image rotation (radians)
    T: float  # half thoracic width at the costophrenic angles
    v_apex: float
    v_cp: dict  # side (-1 image-left, +1 image-right) -> costophrenic-angle height
    v_dome: dict  # side -> dome-top height
    ctr: float  # cardiothoracic ratio
    heart: tuple  # (uc, vc, a, b, tilt, v_clip)
    hilum: dict  # side -> (u, v)
    lung_polys: dict = field(default_factory=dict)  # side -> (N, 2) patient coords
    heart_poly: np.ndarray = None
    knob_poly: np.ndarray = None
    sex: str = "M"
    body: dict = field(default_factory=dict)

    def to_image(self, pts: np.ndarray) -> np.ndarray:
        """Patient -> image normalised coords: ``q = c + R(theta)(p - c)``."""
        c, s = np.cos(self.theta), np.sin(self.theta)
        d = np.asarray(pts, dtype=float) - 0.5
        return np.stack([0.5 + c * d[..., 0] - s * d[..., 1], 0.5 + s * d[..., 0] + c * d[..., 1]], -1)

    def lung_path(self, side: int) -> MplPath:
        return MplPath(self.lung_polys[side])

    def in_lung(self, pts: np.ndarray, side: int) -> np.ndarray:
        """Whether patient-space points lie in the lung field of ``side`` (heart and aortic knob excluded)."""
        pts = np.atleast_2d(pts)
        inside = MplPath(self.lung_polys[side]).contains_points(pts)
        inside &= ~MplPath(self.heart_poly).contains_points(pts)
        inside &= ~MplPath(self.knob_poly).contains_points(pts)
        return inside


def _ellipse(uc, vc, a, b, tilt=0.0, n=64) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = a * np.cos(t), b * np.sin(t)
    c, s = np.cos(tilt), np.sin(tilt)
    return np.stack([uc + c * x - s * y, vc + s * x + c * y], -1)


def sample_anatomy(rng_patient: np.random.Generator, rng_image: np.random.Generator, *,
                   cardiomegaly: bool = False, raised_side: int = 0) -> Anatomy:
    """Draw a patient's chest (``rng_patient``) and this film's pose / inspiration (``rng_image``).

    CTR: normal hearts ``U(0.38, 0.52)`` per patient; ``cardiomegaly`` (an enlarged heart) draws
    ``0.49 + 0.13 * Beta(1, 2)`` in [0.49, 0.62], most often mild, so the two ranges overlap on
    [0.49, 0.52] (CTR alone separates them with AUROC ~0.95, not 1). ``raised_side`` lifts that
    hemidiaphragm (volume loss of atelectasis).
    """
    rp, ri = rng_patient, rng_image
    sex = "F" if rp.random() < 0.45 else "M"
    sc = rp.uniform(0.86, 1.04) * (0.95 if sex == "F" else 1.0)
    cx = 0.5 + ri.normal(0, 0.015)
    theta = np.deg2rad(ri.normal(0, 1.6))
    insp = ri.uniform(0.9, 1.07)  # inspiration depth
    T = 0.42 * sc * rp.uniform(0.95, 1.05)
    v_apex = 0.095 + ri.normal(0, 0.015) + (1 - sc) * 0.08
    H = 0.63 * sc * insp
    v_cp = {s: v_apex + H * (1 + (0.03 if s == -1 else 0)) for s in (-1, 1)}
    dome_h = rp.uniform(0.08, 0.12) * sc
    v_dome = {-1: v_cp[-1] - dome_h - 0.02, 1: v_cp[1] - dome_h}
    v_dome[-1] = min(v_dome[-1], v_dome[1] - 0.005)  # right (image-left) hemidiaphragm is higher
    if raised_side:
        v_cp[raised_side] -= 0.035
        v_dome[raised_side] -= 0.04
    ctr_normal = rp.uniform(*CTR_NORMAL)  # always drawn: follow-ups of a patient share anatomy
    lo, hi = CTR_CARDIOMEGALY
    ctr = lo + (hi - lo) * ri.beta(1.0, 2.0) if cardiomegaly else ctr_normal
    w_h = ctr * 2 * T
    a_r, a_l = 0.32 * w_h, 0.68 * w_h
    uc = cx + (a_l - a_r) / 2
    a_ax = w_h / 2 * 1.02
    b_ax = a_ax * rp.uniform(0.72, 0.95)
    v_mean_dome = 0.5 * (v_dome[-1] + v_dome[1])
    vc = v_mean_dome + 0.05 - b_ax * 0.72
    tilt = np.deg2rad(rp.uniform(12, 26))
    v_clip = v_mean_dome + 0.065
    hilum = {s: (cx + s * 0.085 * sc, v_apex + 0.25 * sc) for s in (-1, 1)}
    an = Anatomy(cx=cx, sc=sc, theta=theta, T=T, v_apex=v_apex, v_cp=v_cp, v_dome=v_dome, ctr=ctr,
                 heart=(uc, vc, a_ax, b_ax, tilt, v_clip), hilum=hilum, sex=sex)
    # lung outlines
    for s in (-1, 1):
        a_mt = 0.045 * sc + (0.012 if s == 1 else 0.0)
        a_l1 = rp.uniform(0.31, 0.34) * sc
        a_c, r_h, r_v = (a_mt + a_l1) / 2, (a_l1 - a_mt) / 2, 0.07 * sc
        phi = np.linspace(np.pi, 0, 24)
        apex = np.stack([a_c + r_h * np.cos(phi), v_apex + r_v - r_v * np.sin(phi)], -1)
        t = np.linspace(0, 1, 30)[1:]
        a_cp = T * 0.985
        lat = np.stack([a_l1 + (a_cp - a_l1) * np.sin(np.pi / 2 * np.minimum(t / 0.8, 1)) ** 0.8,
                        v_apex + r_v + (v_cp[s] - v_apex - r_v) * t], -1)
        a_mb = 0.035 * sc
        a_dc = 0.55 * a_cp + 0.45 * a_mb
        aa = np.linspace(a_cp, a_mb, 30)[1:]
        dv = np.where(aa >= a_dc, (v_cp[s] - v_dome[s]) * ((aa - a_dc) / (a_cp - a_dc)) ** 2,
                      0.25 * (v_cp[s] - v_dome[s]) * ((a_dc - aa) / (a_dc - a_mb)) ** 2)
        dia = np.stack([aa, v_dome[s] + dv], -1)
        vv = np.linspace(dia[-1, 1], v_apex + r_v, 12)[1:-1]
        med = np.stack([a_mb + (a_mt - a_mb) * (vv - vv[0]) / (vv[-1] - vv[0] + 1e-9), vv], -1)
        poly = np.concatenate([apex, lat, dia, med])
        an.lung_polys[s] = np.stack([cx + s * poly[:, 0], poly[:, 1]], -1)
    an.heart_poly = _heart_polygon(an)
    an.knob_poly = _ellipse(cx + 0.05 * sc, v_apex + 0.155 * sc, 0.04 * sc, 0.032 * sc)
    an.body = {
        "neck": rp.uniform(0.15, 0.19) * sc, "shoulder": rp.uniform(0.55, 0.68) * sc,
        "v_sh": v_apex - rp.uniform(0.0, 0.05), "fat": rp.uniform(0.8, 1.3),
        "arm_gap": rp.uniform(0.0, 0.03),
    }
    return an


def _heart_polygon(an: Anatomy) -> np.ndarray:
    uc, vc, a, b, tilt, v_clip = an.heart
    e = _ellipse(uc, vc, a, b, tilt, n=96)
    # pear shape: the upper half narrows toward the mediastinum (great vessels)
    top = e[:, 1].min()
    t = np.clip((e[:, 1] - top) / max(vc - top, 1e-6), 0, 1)
    squeeze = np.where(e[:, 1] < vc, 0.55 + 0.45 * np.sqrt(t), 1.0)
    e[:, 0] = an.cx + 0.01 + (e[:, 0] - an.cx - 0.01) * squeeze
    e[:, 1] = np.minimum(e[:, 1], v_clip)
    return e


def patient_grid(an: Anatomy, size: int, y0: int = 0, y1: int | None = None, x0: int = 0,
                 x1: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Patient coords (U, V) of pixel centres ``[y0:y1, x0:x1]`` of a ``size``-pixel image."""
    y1 = size if y1 is None else y1
    x1 = size if x1 is None else x1
    qx = (np.arange(x0, x1, dtype=np.float32) + 0.5) / size - 0.5
    qy = (np.arange(y0, y1, dtype=np.float32) + 0.5) / size - 0.5
    c, s = np.float32(np.cos(an.theta)), np.float32(np.sin(an.theta))
    U = 0.5 + c * qx[None, :] + s * qy[:, None]
    V = 0.5 - s * qx[None, :] + c * qy[:, None]
    return U, V


def polygon_mask(an: Anatomy, polys: list, size: int, values: list | None = None) -> np.ndarray:
    """Rasterise patient-space polygons (drawn in order, value 1 or 0) into a bool ``size``² mask."""
    img = Image.new("L", (size, size), 0)
    dr = ImageDraw.Draw(img)
    values = values or [1] * len(polys)
    for poly, val in zip(polys, values):
        q = an.to_image(poly) * size - 0.5
        dr.polygon([tuple(p) for p in q], fill=int(val))
    return np.asarray(img, dtype=np.uint8) > 0


def lung_masks(an: Anatomy, size: int) -> dict:
    """Exact lung-field masks per side (heart and aortic knob removed), ``size``² bool."""
    return {s: polygon_mask(an, [an.lung_polys[s], an.heart_poly, an.knob_poly], size, [1, 0, 0])
            for s in (-1, 1)}


def resize_field(a: np.ndarray, size: int, resample=Image.BILINEAR) -> np.ndarray:
    """Resize a float field to ``size``² (PIL 'F' image, bilinear by default)."""
    if a.shape == (size, size):
        return a.astype(np.float32, copy=False)
    return np.array(Image.fromarray(a.astype(np.float32), "F").resize((size, size), resample))


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean unit-ish smooth random field: a ``cells``² normal grid upsampled bicubically."""
    g = rng.standard_normal((cells, cells)).astype(np.float32)
    return resize_field(g, size, Image.BICUBIC)


def _band(d: np.ndarray, half: float) -> np.ndarray:
    """Smooth band profile ``max(0, 1 - (d/half)^2)`` (a bone's projected thickness)."""
    return np.clip(1.0 - (d / half) ** 2, 0.0, None)


def _vessel_image(an: Anatomy, rng: np.random.Generator, size: int) -> np.ndarray:
    """Branching vessel trees from each hilum, drawn with PIL; brighter and wider near the hilum."""
    img = Image.new("F", (size, size), 0.0)
    dr = ImageDraw.Draw(img)
    segs = []

    def grow(p, ang, length, width, gen):
        if gen > 5 or length < 0.01:
            return
        ang = ang + rng.normal(0, 0.12)
        q = (p[0] + length * np.cos(ang), p[1] + length * np.sin(ang))
        segs.append((p, q, width, 0.82 ** gen))
        nkids = 2 if rng.random() < 0.85 else 1
        for k in range(nkids):
            da = rng.uniform(0.25, 0.6) * (1 if k == 0 else -1)
            grow(q, ang + da, length * rng.uniform(0.68, 0.85), width * 0.72, gen + 1)

    for s in (-1, 1):
        hu, hv = an.hilum[s]
        base = [-1.25, -0.75, -0.3, 0.25, 0.75, 1.2]
        for b in base:
            # angle measured from the lateral direction; upward negative
            ang0 = b + rng.normal(0, 0.12)
            ang = ang0 if s == 1 else np.pi - ang0
            grow((hu, hv + 0.02 * b), ang, 0.06 * an.sc * rng.uniform(0.8, 1.2), 0.009 * an.sc, 0)
    pts = an.to_image(np.array([[p, q] for p, q, _, _ in segs])) * size
    for (_, _, w, inten), pq in zip(segs, pts.tolist()):
        dr.line([tuple(pq[0]), tuple(pq[1])], fill=float(inten), width=max(1, int(round(w * size))))
    return np.asarray(img)


def render_anatomy(an: Anatomy, rng: np.random.Generator, size: int,
                   lung_field: np.ndarray, suppress: np.ndarray | None = None) -> np.ndarray:
    """Attenuation ``mu`` (float32, ``size``²) of the normal chest.

    ``mu = body + spine + heart + ribs + clavicles + vessels - air * lungs``; ``lung_field`` is the
    union lung mask at this size, ``suppress`` (0..1) removes lung markings (pneumothorax).
    """
    U, V = patient_grid(an, size)
    cx, sc, b = an.cx, an.sc, an.body
    x = U - cx
    ax = np.abs(x)
    # --- body soft tissue: neck, sloping shoulders, trunk ---
    v_top = b["v_sh"] - 0.03 + 0.9 * np.clip(ax - b["neck"], 0, None) ** 2 / sc
    shoulder = np.clip((V - v_top) / 0.05, 0, 1)
    neck = np.clip(1 - (x / b["neck"]) ** 2, 0, None) ** 0.5
    trunk_w = b["shoulder"] + 0.05 * np.clip(V - 0.5, 0, None)
    trunk = np.clip(1 - (x / trunk_w) ** 2, 0, None) ** 0.5 * shoulder
    body = np.maximum(trunk, 0.8 * neck)
    body = gaussian_filter(body, 1.5 * size / 512)
    mu = (0.8 + 0.25 * b["fat"]) * body
    # --- mediastinum and spine ---
    med = np.exp(-(x / (0.075 * sc)) ** 2) * np.clip((V - an.v_apex + 0.15) / 0.2, 0, 1)
    period = 0.042 * sc
    phase = ((V - an.v_apex) / period) % 1.0
    vert = 0.7 + 0.3 * _band(phase - 0.5, 0.5) ** 0.3
    spine = np.exp(-(x / (0.04 * sc)) ** 4) * vert
    ped = _band(np.hypot((ax - 0.025 * sc) / 0.9, (phase - 0.45) * period), 0.008 * sc)
    mu += 0.12 * spine + 0.06 * ped * (ax < 0.045 * sc)
    # --- abdomen / liver below the domes ---
    a_cp = an.T
    xs_ = np.clip(ax / a_cp, 0, 1.2)
    v_d = np.where(x < 0, an.v_dome[-1], an.v_dome[1]) + (
        np.where(x < 0, an.v_cp[-1] - an.v_dome[-1], an.v_cp[1] - an.v_dome[1])) * np.clip((xs_ - 0.55) / 0.45, 0, None) ** 2
    abd = np.clip((V - v_d + 0.01) / 0.04, 0, 1) * np.clip((1.1 - ax / a_cp) / 0.2, 0, 1)
    # heart: about as dense as the liver below it, so its lower border merges with the diaphragm
    heart = gaussian_filter(polygon_mask(an, [an.heart_poly], size).astype(np.float32), 3.0 * size / 512)
    mu += 0.33 * np.maximum(np.maximum(abd * body, 0.9 * heart), med)
    # trachea (air column down to the carina)
    tr = np.exp(-(x / (0.018 * sc)) ** 2) * np.clip((an.v_apex + 0.2 * sc - V) / 0.05, 0, 1)
    mu -= 0.3 * tr
    # --- lungs (air) ---
    lf = gaussian_filter(lung_field.astype(np.float32), 2.5 * size / 512)
    depth = np.clip((V - an.v_apex) / (0.45 * sc), 0.2, 1.0) ** 0.5
    lat = np.clip(1 - ((ax - 0.18 * sc) / (0.25 * sc)) ** 2, 0.3, 1)
    mu -= 0.64 * lf * (0.5 + 0.5 * depth * lat)
    # --- posterior ribs: periodic bands along v - g(x) ---
    xr = ax / an.T
    rib_zone = (xr > 0.07) & (xr < 1.12)
    dv = 0.06 * sc * (1 + 0.25 * xr)
    w = V - (an.v_apex - 0.04) + 0.07 * sc * xr - 0.2 * sc * xr ** 2
    w += (0.006 * sc) * smooth_noise(rng, size, 6)  # ribs are not perfectly regular
    ph = w / dv
    fr = ph % 1.0
    k = np.floor(ph)
    ok = rib_zone & (k >= 0) & (k < 10)
    th = 0.42
    d = (fr - th / 2) / (th / 2)
    cortex = np.clip(1 - d * d, 0, None)
    rib = np.where(ok & (np.abs(d) < 1), 0.55 * cortex ** 0.4 + 0.45 * np.abs(d) ** 6, 0)
    rib *= np.clip((1.12 - xr) / 0.1, 0, 1) * np.clip((max(an.v_cp.values()) + 0.06 - V) / 0.08, 0, 1)
    mu += 0.2 * rib * (0.35 + 0.65 * lf)
    # faint anterior ribs (opposite curvature)
    wa = V - (an.v_apex + 0.05) - 0.18 * sc * (1 - xr) ** 2
    fa = (wa / (0.055 * sc)) % 1.0
    ka = np.floor(wa / (0.055 * sc))
    ant = np.where((xr > 0.2) & (xr < 1.0) & (ka >= 0) & (ka < 6), _band(fa - 0.2, 0.15), 0)
    mu += 0.03 * ant * lf
    # --- clavicles ---
    for s in (-1, 1):
        xs = s * x / sc  # lateral distance, signed so positive is lateral on this side
        vc = an.v_apex + 0.075 * sc - 0.22 * (xs - 0.05) + 0.5 * (xs - 0.12) ** 2
        zone = (xs > 0.035) & (xs < 0.34)
        cl = np.where(zone, _band(V - vc, 0.02 * sc), 0) * np.clip((0.34 - xs) / 0.03, 0, 1)
        cl *= np.clip((xs - 0.035) / 0.02, 0, 1)
        mu += 0.3 * cl ** 0.5
    # --- breast shadows ---
    if an.sex == "F":
        for s in (-1, 1):
            bu, bv = cx + s * 0.24 * sc, an.v_dome[s] + 0.05
            r = np.hypot((U - bu) / (0.17 * sc), (V - bv) / (0.13 * sc))
            t = np.clip((1 - r) / 0.35, 0, 1)
            mu += 0.1 * t * t * (3 - 2 * t)  # smoothstep edge
    # --- gastric bubble ---
    if rng.random() < 0.6:
        gu, gv = cx + 0.13 * sc, an.v_dome[1] + 0.05 * sc
        r = np.hypot((U - gu) / (0.045 * sc), (V - gv) / (0.03 * sc))
        t = np.clip((1 - r) / 0.3, 0, 1)
        mu -= 0.25 * t * t * (3 - 2 * t)
    # --- vessels and parenchymal texture ---
    ves = _vessel_image(an, rng, size)
    ves = gaussian_filter(ves, 0.7 * size / 512)
    tex = smooth_noise(rng, size, 64) * 0.6 + smooth_noise(rng, size, 20)
    lm = lf if suppress is None else lf * (1 - suppress)
    fade = np.clip(1.25 - np.hypot(U - np.where(x < 0, an.hilum[-1][0], an.hilum[1][0]),
                                   V - an.hilum[1][1]) / (0.3 * sc), 0.15, 1)
    mu += (0.2 * ves * fade + 0.045 * tex) * lm
    if suppress is not None:
        mu -= 0.08 * suppress * lf
    return mu.astype(np.float32)


def tone_map(mu: np.ndarray, k: float, lo: float, hi: float, gamma: float) -> np.ndarray:
    """Film response ``I = 1 - exp(-k mu)``, windowed to ``((I - lo)/(hi - lo))^gamma`` in [0, 1]."""
    i = np.maximum(mu, 0).astype(np.float32, copy=False)
    i *= np.float32(-k)
    np.exp(i, out=i)  # exp(-k mu); then (1 - e - lo) / (hi - lo), in place
    i *= np.float32(-1.0 / (hi - lo))
    i += np.float32((1.0 - lo) / (hi - lo))
    np.clip(i, 0, 1, out=i)
    return np.power(i, np.float32(gamma), out=i)
