"""Letters rendered from matplotlib's bundled fonts: a second testbed with a split keyed on fonts.

``render_letters(seed)`` draws every letter of ``LETTERS`` in every font of ``FONTS`` (the TTF
files matplotlib ships in ``mpl-data/fonts/ttf`` that hold latin letters), ``variants`` times
per font, with matplotlib's own FreeType wrapper (``matplotlib.ft2font.FT2Font``):

    1. the glyph is rasterised antialiased at ``_RENDER_PX`` pixels per em, unhinted;
    2. stroke weight: grey dilation or erosion of that bitmap by 0-2 pixels (random per variant);
    3. it is resampled (bilinear, 4x4 supersampling, then block mean) onto a 16x16 grid with its
       bounding box centred and its larger side scaled to ``_FIT`` pixels times a random scale in
       [0.88, 1.05], a random rotation in [-6, 6] degrees and a random sub-pixel shift in
       [-0.6, 0.6] pixels per axis;
    4. ink 1 / paper 0 is mapped linearly to [-1, 1] (paper = -1), as ``steersample.data`` does
       for the digits.

Variant 0 of every font has no augmentation (the plain glyph). Every draw comes from a
``numpy.random.Generator`` seeded with ``(seed, font, letter, variant)``, so the images depend
only on the seed (and matplotlib's bundled FreeType), not on which fonts or letters are asked for.

``font_split(fonts, labels, rare, ...)`` is the imbalanced split keyed on *fonts*: a rare letter
is trained on ``rare_fonts`` fonts from distinct families (``rare_variants`` variants each), a
frequent letter on ``frequent_fonts`` fonts (all their variants); the held-out images of a letter
are all variants of the fonts that letter was *not* trained on. ``scripts/train_letters.py``
trains the ``letters`` default model (``steersample.default.load_default("letters")``) on it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

__all__ = ["LETTERS", "FONTS", "FONT_FAMILIES", "LETTER_SIZE", "render_letters", "font_split"]

LETTERS: tuple[str, ...] = ("A", "B", "E", "G", "K", "M", "R", "S", "W", "X")
"""The ten letters; label ``i`` is ``LETTERS[i]``."""

FONTS: tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf", "cmmi10.ttf",
)
"""matplotlib's bundled TTF files with latin letters; font id ``i`` is ``FONTS[i]``."""

FONT_FAMILIES: tuple[str, ...] = ("DejaVuSans", "DejaVuSerif", "STIX", "cm")
"""Family of each font (by file-name prefix; DejaVu Sans Mono counts as DejaVu Sans, its capitals
are nearly the same glyphs); rare letters take their fonts from distinct families, so that their
training images are far apart and a copy is unambiguous under the ratio test."""

LETTER_SIZE = 16
"""Side of the square images."""

_RENDER_PX = 96  # glyph size (pixels per em) of the high-resolution rasterisation
_FIT = 12.0  # larger side of the glyph's bounding box on the 16x16 grid, before scale jitter
_SUPER = 4  # supersampling factor of the resampling step


def _family(font: str) -> int:
    for i, prefix in sorted(enumerate(FONT_FAMILIES), key=lambda p: -len(p[1])):
        if font.startswith(prefix):
            return i
    raise ValueError(f"font {font!r} belongs to none of {FONT_FAMILIES}")


def _font_path(font: str) -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / font


def _glyph(font: str, letter: str) -> np.ndarray:
    """The letter rasterised antialiased and unhinted: float64 (h, w) in [0, 1], cropped to ink."""
    from matplotlib.ft2font import FT2Font, LoadFlags

    ft = FT2Font(str(_font_path(font)))
    ft.set_size(_RENDER_PX, 72)  # 72 dpi: size in points = size in pixels
    ft.set_text(letter, 0.0, flags=LoadFlags.NO_HINTING)
    ft.draw_glyphs_to_bitmap(antialiased=True)
    img = np.asarray(ft.get_image(), dtype=np.float64) / 255.0
    rows, cols = np.nonzero(img > 0)
    if rows.size == 0:
        raise ValueError(f"font {font!r} renders no ink for {letter!r}")
    return img[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def _place(glyph: np.ndarray, rng: np.random.Generator | None, size: int) -> np.ndarray:
    """Augment (stroke, scale, rotation, shift; none when ``rng`` is None) and resample to size."""
    from scipy import ndimage

    if rng is not None:
        stroke = int(rng.integers(-1, 3))  # -1 thinner, 0 as drawn, 1-2 bolder (hi-res pixels)
        scale = rng.uniform(0.88, 1.05)
        angle = math.radians(rng.uniform(-6.0, 6.0))
        shift = rng.uniform(-0.6, 0.6, size=2)
    else:
        stroke, scale, angle, shift = 0, 1.0, 0.0, np.zeros(2)
    pad = 4
    g = np.pad(glyph, pad)
    if stroke > 0:
        g = ndimage.grey_dilation(g, size=(2 * stroke + 1, 2 * stroke + 1))
    elif stroke < 0:
        g = ndimage.grey_erosion(g, size=(3, 3))
    h, w = glyph.shape
    centre_in = np.array([pad + (h - 1) / 2.0, pad + (w - 1) / 2.0])
    zoom = _FIT * scale / max(h, w)  # output pixels per input pixel
    n = size * _SUPER
    # output (super-sampled) coordinate o -> input coordinate: R^-1 (o - c_out) / (zoom * S) + c_in
    c_out = np.array([(n - 1) / 2.0, (n - 1) / 2.0]) + shift * _SUPER
    cos, sin = math.cos(angle), math.sin(angle)
    rot_inv = np.array([[cos, sin], [-sin, cos]])
    matrix = rot_inv / (zoom * _SUPER)
    offset = centre_in - matrix @ c_out
    hi = ndimage.affine_transform(g, matrix, offset=offset, output_shape=(n, n), order=1,
                                  mode="constant", cval=0.0)
    img = hi.reshape(size, _SUPER, size, _SUPER).mean(axis=(1, 3))
    return np.clip(img, 0.0, 1.0)


def render_letters(seed: int = 0, variants: int = 8, letters: tuple[str, ...] = LETTERS,
                   fonts: tuple[str, ...] = FONTS, size: int = LETTER_SIZE,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render every letter in every font ``variants`` times.

    Returns ``(images, labels, font_ids)``: float32 ``(N, 1, size, size)`` in [-1, 1] (paper -1,
    ink +1), int64 ``(N,)`` indices into ``letters``, int64 ``(N,)`` indices into ``FONTS``;
    ``N = len(letters) * len(fonts) * variants``, ordered by letter, then font, then variant.
    Variant 0 is the plain glyph; the others are augmented with draws from a generator seeded
    with ``(seed, font id, letter code, variant)``. Deterministic for a seed.
    """
    if variants < 1:
        raise ValueError(f"variants must be >= 1, got {variants}")
    unknown = [f for f in fonts if f not in FONTS]
    if unknown:
        raise ValueError(f"unknown font(s) {unknown}; choose from steersample.letters.FONTS")
    images, labels, font_ids = [], [], []
    for li, letter in enumerate(letters):
        for font in fonts:
            fid = FONTS.index(font)
            glyph = _glyph(font, letter)
            for v in range(variants):
                rng = None if v == 0 else np.random.default_rng([seed, fid, ord(letter), v])
                images.append(_place(glyph, rng, size))
                labels.append(li)
                font_ids.append(fid)
    x = torch.as_tensor(np.stack(images), dtype=torch.float32).unsqueeze(1) * 2.0 - 1.0
    return (x.contiguous(), torch.tensor(labels, dtype=torch.int64),
            torch.tensor(font_ids, dtype=torch.int64))


def font_split(font_ids: torch.Tensor, labels: torch.Tensor, rare: tuple[int, ...],
               rare_fonts: int = 3, rare_variants: int = 3, frequent_fonts: int = 16,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[int, list[int]]]:
    """The imbalanced split keyed on fonts: ``(train_idx, held_idx, train_fonts)``.

    For every letter (ascending label order; one ``torch.Generator`` seeded with ``seed``):

    - rare (label in ``rare``): ``rare_fonts`` fonts, each from a different family of
      ``FONT_FAMILIES`` (families and fonts drawn at random), and of each the variants
      ``0 .. rare_variants - 1`` go to training; the letter's other variants of those fonts are
      used nowhere;
    - frequent: ``frequent_fonts`` fonts drawn at random, all their variants go to training.

    The held-out images of a letter are every variant of the fonts it was not trained on, so no
    font is on both sides for any letter. Index tensors are sorted; ``train_fonts`` maps a label
    to its sorted training font ids. ``variant`` is recovered from the rendering order (font
    blocks of equal size), so pass the tensors ``render_letters`` returned.
    """
    labels = labels.to(torch.int64)
    font_ids = font_ids.to(torch.int64)
    g = torch.Generator().manual_seed(int(seed))
    train, held = [], []
    train_fonts: dict[int, list[int]] = {}
    for c in sorted(int(c) for c in torch.unique(labels)):
        members = (labels == c).nonzero().flatten()
        present = sorted(int(f) for f in torch.unique(font_ids[members]))
        if c in rare:
            families = sorted({_family(FONTS[f]) for f in present})
            if rare_fonts > len(families):
                raise ValueError(f"rare_fonts={rare_fonts} but only {len(families)} families")
            chosen_fam = [families[i] for i in torch.randperm(len(families), generator=g)[:rare_fonts]]
            chosen = []
            for fam in chosen_fam:
                in_fam = [f for f in present if _family(FONTS[f]) == fam]
                chosen.append(in_fam[int(torch.randint(len(in_fam), (1,), generator=g))])
        else:
            if frequent_fonts > len(present):
                raise ValueError(f"frequent_fonts={frequent_fonts} but only {len(present)} fonts")
            chosen = [present[i] for i in torch.randperm(len(present), generator=g)[:frequent_fonts]]
        chosen = sorted(chosen)
        train_fonts[c] = chosen
        for f in present:
            idx = members[font_ids[members] == f]  # this letter's variants of font f, in order
            if f not in chosen:
                held.append(idx)
            elif c in rare:
                train.append(idx[:rare_variants])
            else:
                train.append(idx)
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(held)).values, train_fonts
