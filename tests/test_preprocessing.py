"""The way back from the model grid is exact: no half-pixel shift, no flip, for any acquisition geometry.

The network is replaced here by a fixed thresholding layer (not a model: a known function), so any error
in orientation, padding or resizing shows up directly as a displaced mask.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from inference.labels import DEFAULT_LABELS
from inference.model_card import ModelCard
from inference.phantom import Anatomy, Geometry, render
from inference.predict import predict_volume


class Threshold(torch.nn.Module):
    """Class 1 wherever the (normalised) input is above 0.5: a known function of the input."""

    def forward(self, x):
        g = x[:, :1]
        return torch.cat([0.5 - g, g - 0.5], 1) * 20


CARD = ModelCard(labels=[DEFAULT_LABELS[0]], input_size=256)


def blob_volume(rows, cols, n=3):
    """An asymmetric bright shape (an off-centre L) so flips and shifts are visible."""
    v = np.zeros((n, rows, cols), np.float32)
    r0, c0 = rows // 5, cols // 6
    v[:, r0:r0 + rows // 3, c0:c0 + max(3, cols // 10)] = 1.0
    v[:, r0 + rows // 3 - max(3, rows // 12):r0 + rows // 3, c0:c0 + cols // 3] = 1.0
    return v


@pytest.mark.parametrize("rows,cols", [(256, 256), (250, 250), (512, 512), (180, 320), (97, 61), (400, 144)])
@pytest.mark.parametrize("row_dir,col_dir", [
    ((1, 0, 0), (0, 1, 0)), ((-1, 0, 0), (0, 1, 0)), ((1, 0, 0), (0, -1, 0)), ((0, 1, 0), (1, 0, 0)),
    ((0, -1, 0), (-1, 0, 0)),
])
def test_mask_comes_back_on_the_same_pixels(rows, cols, row_dir, col_dir):
    vol = blob_volume(rows, cols)
    out = predict_volume(Threshold(), CARD, vol, row_dir, col_dir, torch.device("cpu"), postprocess=False).labels
    truth = vol > 0.5
    got = out == 1
    # centroid within a tenth of a pixel, and (almost) the same pixels: only boundary pixels may differ
    assert np.allclose(np.argwhere(got).mean(0), np.argwhere(truth).mean(0), atol=0.1)
    mismatch = (got != truth).sum() / truth.sum()
    assert mismatch < (0.02 if max(rows, cols) <= 256 else 0.12), mismatch


def test_bundled_model_segments_the_left_leg_on_the_left_for_every_orientation(bundled_predictor):
    """One-legged phantom, rendered with reversed and swapped axes: the bundled model's bones must land on
    the patient's left (+x in LPS), on the phantom's own bone voxels."""
    predictor = bundled_predictor()
    anat = replace(Anatomy(scale=0.8, legs="left"), noise=0.02)
    for row_dir, col_dir in (((1, 0, 0), (0, 1, 0)), ((-1, 0, 0), (0, -1, 0)), ((0, 1, 0), (1, 0, 0))):
        ps, n = 1.6, 220
        rd, cd = np.asarray(row_dir, float), np.asarray(col_dir, float)
        origin = -(n - 1) / 2 * ps * (rd + cd) + np.array([0, 15, anat.z_knee + 60])
        g = Geometry(n, n, 24, (ps, ps), tuple(origin), row_dir, col_dir, (0, 0, -6.0), 6.0)
        ph = render(anat, g, seed=3)
        # with the pixel spacing, as the node predicts: one leg in a 35 cm field of view is not narrowed to a
        # small body's box (MIN_BOX_MM)
        pred = predictor.predict(ph.image, row_dir, col_dir, pixel_spacing=(ps, ps)).labels
        xs = np.stack([g.world_coords(k)[0] for k in range(g.n_slices)])
        bone = pred > 0
        assert bone.sum() > 100
        assert (xs[bone] > 0).mean() > 0.99, "bone predicted on the right side of a left-only phantom"
        truth = ph.labels > 0
        dice = 2 * (bone & truth).sum() / (bone.sum() + truth.sum())
        assert dice > 0.8, (row_dir, col_dir, dice)


def test_bf16_labels_match_fp32_and_fp16_on_cpu_is_refused(bundled_predictor):
    """The precision knob: bf16 (the default on CPUs with bf16 instructions, and on CUDA) labels a phantom
    as float32 does; fp16 on a CPU is refused with a message saying what to use."""
    from inference.model import BUNDLED_MODEL
    from inference.phantom import small_series
    from inference.predict import Predictor

    ph = small_series(seed=7, n_slices=12, size=128)
    rd, cd = ph.geometry.row_dir, ph.geometry.col_dir
    ref = bundled_predictor("fp32")
    assert ref.dtype == torch.float32
    half = bundled_predictor("bf16")
    assert half.dtype == torch.bfloat16
    a = ref.predict(ph.image, rd, cd).labels
    b = half.predict(ph.image, rd, cd).labels
    bone = (a > 0) | (b > 0)
    assert bone.sum() > 1000
    assert ((a == b) & bone).sum() / bone.sum() > 0.99
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Predictor(BUNDLED_MODEL, device="cpu", precision="fp16")


@pytest.mark.slow
def test_compiled_predictor_pads_the_last_batch_and_labels_as_eager():
    """inference.compile: one compilation at load for batches of batch_size; a series whose last batch is
    short is padded, not recompiled, and labelled as the uncompiled model labels it."""
    from inference.model import BUNDLED_MODEL
    from inference.phantom import small_series
    from inference.predict import Predictor

    ph = small_series(seed=8, n_slices=6, size=128)  # batches of 4: the second holds 2 slices
    rd, cd = ph.geometry.row_dir, ph.geometry.col_dir
    eager = Predictor(BUNDLED_MODEL, device="cpu", batch_size=4, precision="fp32")
    compiled = Predictor(BUNDLED_MODEL, device="cpu", batch_size=4, precision="fp32", compile=True)
    assert compiled.compiled, "torch.compile failed on this machine (see the log): is gcc installed?"
    a = eager.predict(ph.image, rd, cd).labels
    b = compiled.predict(ph.image, rd, cd).labels
    assert b.shape == a.shape == ph.image.shape
    bone = (a > 0) | (b > 0)
    assert bone.sum() > 200 and ((a == b) & bone).sum() / bone.sum() > 0.99


def test_with_the_augmented_pass_the_result_is_the_mean_of_both_passes(bundled_predictor):
    """With ``tta`` the labels sent are the argmax of the two passes' mean probability: where the passes agree
    that is their label, where they differ it sides with either (whichever is surer), and ``first_labels`` is
    exactly what the plain pass alone gives."""
    from inference.phantom import small_series

    ph = small_series(seed=7, n_slices=12, size=128)
    rd, cd = ph.geometry.row_dir, ph.geometry.col_dir
    predictor = bundled_predictor("fp32")
    plain = predictor.predict(ph.image, rd, cd, postprocess=False)
    both = predictor.predict(ph.image, rd, cd, postprocess=False, quality=True, tta=True)
    assert plain.first_labels is None
    assert np.array_equal(both.first_labels, plain.labels)
    agree = both.first_labels == both.tta_labels
    assert np.array_equal(both.labels[agree], both.first_labels[agree])
    differ = ~agree
    assert differ.sum() >= 10, "the passes agree everywhere: this phantom no longer tests the averaging"
    assert (both.labels[differ] == both.first_labels[differ]).any()
    assert (both.labels[differ] == both.tta_labels[differ]).any()
    # the probabilities kept for the gate's confidence are those of the labels sent
    assert both.probs.shape == (len(DEFAULT_LABELS) + 1,) + ph.image.shape
    assert (both.probs.argmax(0) == both.labels).mean() > 0.999
    assert np.abs(both.probs.astype(int).sum(0) - 255).max() <= 3


def _small_body(n=4, size=448, seed=0):
    """A 'child' in an adult's field of view: a bright body of about a third of the image, noise around it."""
    rng = np.random.default_rng(seed)
    v = rng.rayleigh(2.0, (n, size, size)).astype(np.float32)  # air: Rician-like noise floor
    v[:, 150:300, 110:340] += 100.0
    v[:, 200:230, 150:170] += 300.0  # a bright 'bone' inside it (asymmetric, off-centre)
    return v


def test_body_box_narrows_a_small_body_and_leaves_one_that_fills_the_view():
    from inference.preprocessing import MAX_MAGNIFICATION, MIN_BOX_MM, body_box

    v = _small_body()
    rows, cols = body_box(v, (1.0, 1.0))
    assert rows.start <= 150 and rows.stop >= 300 and cols.start <= 110 and cols.stop >= 340  # all of the body
    assert 1.5 < 448 / max(rows.stop - rows.start, cols.stop - cols.start) <= MAX_MAGNIFICATION
    assert body_box(v, None) is None  # the pixel spacing unknown: the whole field of view, as before
    # the same image at 2 mm pixels is a 90 cm field of view: the box is widened to MIN_BOX_MM (125 px), no less
    rows, cols = body_box(v, (2.0, 2.0))
    assert rows.stop - rows.start >= MIN_BOX_MM / 2 and cols.stop - cols.start >= MIN_BOX_MM / 2
    full = np.random.default_rng(1).rayleigh(2.0, (4, 300, 200)).astype(np.float32)
    full[:, 5:295, 3:197] += 100.0
    assert body_box(full, (1.0, 1.0)) is None  # fills the field of view: the same input as ever
    assert body_box(np.zeros((3, 64, 64), np.float32), (1.0, 1.0)) is None
    speck = np.zeros((3, 400, 400), np.float32)
    speck[:, 170:230, 170:230] = 50.0
    r, c = body_box(speck, (2.0, 2.0))  # 12 cm of "body" in an 80 cm field of view
    assert 400 / max(r.stop - r.start, c.stop - c.start) <= MAX_MAGNIFICATION + 0.01  # widened, not zoomed 6x
    assert r.start <= 170 and r.stop >= 230 and c.start <= 170 and c.stop >= 230


def test_a_prediction_on_the_body_box_lands_on_the_same_pixels_and_is_background_outside():
    """The network sees the body's box magnified; what comes back is placed exactly where it was predicted
    (the known thresholding function finds the same 'bone' pixels as on the whole image), and outside the
    box the result is background, certain."""
    v = _small_body(n=3)
    pelvis = next(lab for lab in DEFAULT_LABELS if lab.name == "PELVIS")
    # the known function's class 1 named pelvis: the series reaches the hips, so it is narrowed
    card = ModelCard(labels=[replace(pelvis, value=1)], input_size=256, normalisation={"upper_percentile": 100.0})
    dirs = ((1, 0, 0), (0, 1, 0))
    boxed = predict_volume(Threshold(), card, v, *dirs, torch.device("cpu"), postprocess=False, quality=True,
                           tta=True, pixel_spacing=(1.0, 1.0))
    whole = predict_volume(Threshold(), card, v, *dirs, torch.device("cpu"), postprocess=False, quality=True,
                           tta=True)
    truth = np.zeros(v.shape, bool)
    truth[:, 200:230, 150:170] = True
    for pred in (boxed, whole):
        assert pred.labels.shape == pred.tta_labels.shape == pred.first_labels.shape == v.shape
        assert pred.probs.shape == (2,) + v.shape
    got = boxed.labels == 1
    assert np.allclose(np.argwhere(got).mean(0), np.argwhere(truth).mean(0), atol=0.1)
    assert (got != truth).sum() / truth.sum() < 0.05
    assert (got != (whole.labels == 1)).sum() / truth.sum() < 0.1  # the boxed view is the sharper of the two
    from inference.preprocessing import body_box

    rows, cols = body_box(v, (1.0, 1.0))
    outside = np.ones(v.shape[1:], bool)
    outside[rows, cols] = False
    assert (boxed.probs[0][:, outside] == 255).all() and not boxed.probs[1][:, outside].any()
    assert not boxed.labels[:, outside].any() and not boxed.tta_labels[:, outside].any()
    # the same series whose class 1 is a femur (calves, thighs: no pelvis found on the whole field of view) is
    # not narrowed: magnified, a tibia would reach the network at a femur's size
    femur = next(lab for lab in DEFAULT_LABELS if lab.name == "FEMUR")
    legs = ModelCard(labels=[replace(femur, value=1)], input_size=256, normalisation={"upper_percentile": 100.0})
    kept = predict_volume(Threshold(), legs, v, *dirs, torch.device("cpu"), postprocess=False, quality=True, tta=True,
                          pixel_spacing=(1.0, 1.0))
    assert np.array_equal(kept.labels, whole.labels) and np.array_equal(kept.probs, whole.probs)
