"""The letters testbed: deterministic rendering, the font-keyed split, the shipped ``letters`` model."""

from __future__ import annotations

import pytest
import torch

import steersample as ss
from steersample.default import DEFAULT_MODELS, held_out, load_default, load_default_info
from steersample.letters import FONTS, LETTERS, _family, font_split, render_letters


@pytest.fixture(scope="module")
def rendered():
    return render_letters(seed=0, variants=8)


def test_rendering_is_deterministic_and_well_formed(rendered):
    x, y, f = rendered
    n = len(LETTERS) * len(FONTS) * 8
    assert x.shape == (n, 1, 16, 16) and x.dtype == torch.float32
    assert y.shape == f.shape == (n,) and y.dtype == f.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1 and (x.amax(dim=(1, 2, 3)) > 0.2).all()  # ink (thin eroded italics: ~0.4)
    assert (x[:, 0, 0, 0] == -1).float().mean() > 0.95  # paper in the corners
    assert torch.equal(torch.bincount(y), torch.full((len(LETTERS),), len(FONTS) * 8))
    x2, y2, f2 = render_letters(seed=0, variants=8)
    assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(f, f2)


def test_rendering_depends_on_the_seed_and_not_on_the_subset(rendered):
    x, y, f = rendered
    sub_x, sub_y, sub_f = render_letters(seed=0, variants=3, letters=("G",),
                                         fonts=("cmr10.ttf", "DejaVuSans.ttf"))
    for img, fid in zip(sub_x.view(2, 3, 1, 16, 16), (FONTS.index("cmr10.ttf"),
                                                      FONTS.index("DejaVuSans.ttf"))):
        mask = (y == LETTERS.index("G")) & (f == fid)
        assert torch.equal(img, x[mask][:3])
    other, _, _ = render_letters(seed=1, variants=3, letters=("G",), fonts=("cmr10.ttf",))
    assert torch.equal(other[0], sub_x[0])  # variant 0 is the plain glyph, seed-free
    assert not torch.equal(other[1:], sub_x[1:3])
    with pytest.raises(ValueError, match="unknown font"):
        render_letters(fonts=("Arial.ttf",))


def test_split_keeps_fonts_apart_per_letter(rendered):
    _, y, f = rendered
    rare = (LETTERS.index("A"), LETTERS.index("G"), LETTERS.index("M"))
    train, held, train_fonts = font_split(f, y, rare, rare_fonts=3, rare_variants=3,
                                          frequent_fonts=16, seed=0)
    assert not set(train.tolist()) & set(held.tolist())
    for c in range(len(LETTERS)):
        tr_fonts = set(f[train][y[train] == c].tolist())
        held_fonts = set(f[held][y[held] == c].tolist())
        assert tr_fonts == set(train_fonts[c]) and not tr_fonts & held_fonts
        assert tr_fonts | held_fonts == set(range(len(FONTS)))
        n_train = int((y[train] == c).sum())
        if c in rare:
            assert len(tr_fonts) == 3 and len({_family(FONTS[i]) for i in tr_fonts}) == 3
            assert n_train == 9
        else:
            assert len(tr_fonts) == 16 and n_train == 16 * 8
    again = font_split(f, y, rare, seed=0)
    assert torch.equal(again[0], train) and torch.equal(again[1], held)
    assert not torch.equal(font_split(f, y, rare, seed=1)[0], train)


def test_load_default_letters_round_trip(rendered):
    pipe, ref = ss.load_default("letters")
    info = load_default_info("letters")
    x, y, _ = rendered  # the shipped split indexes this rendering (render_seed 0, 8 variants)
    assert info.training_config["render_seed"] == 0 and info.training_config["variants"] == 8
    idx = torch.tensor(info.train_indices)
    assert torch.equal(ref.latents, x[idx]) and torch.equal(ref.labels, y[idx])
    held_x, held_y = held_out("letters")
    hidx = torch.tensor(info.held_out_indices)
    assert torch.equal(held_x, x[hidx]) and torch.equal(held_y, y[hidx])
    assert sorted(info.rare_classes) == [LETTERS.index(c) for c in ("A", "G", "M")]
    out = pipe(class_labels=[0, 3], num_inference_steps=2, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    _, ref_kw = load_default(name="letters")
    assert torch.equal(ref_kw.latents, ref.latents)
    size = sum(p.stat().st_size for p in DEFAULT_MODELS["letters"].rglob("*") if p.is_file())
    assert size <= 8 * 2**20


def test_digits_is_still_the_default():
    _, ref = load_default()
    _, ref_named = load_default("digits")
    assert torch.equal(ref.latents, ref_named.latents) and ref.latents.shape[1:] == (1, 8, 8)
    assert load_default_info("digits").train_indices == load_default_info().train_indices
    hx, hy = held_out("digits")
    assert hx.shape[1:] == (1, 8, 8) and len(hy) + len(ref) == 1797


def test_unknown_name_is_explained():
    with pytest.raises(ValueError, match="unknown default model 'fonts'.*digits, letters"):
        load_default("fonts")
    with pytest.raises(ValueError, match="known names: digits, letters"):
        load_default_info(name="fonts")
    with pytest.raises(ValueError, match="known names"):
        held_out("fonts")
    with pytest.raises(ValueError, match="not both"):
        load_default("letters", name="letters")
