"""PELVIS means the two hip bones in every generator: the sacrum is drawn (the image keeps it) but labelled as
bone the node does not segment, as in the real-shape generator, the stand-in and the acceptance phantoms. A
generator that labelled it pelvis beside one that did not taught the network both (docs/model.md, "What
pelvis means"); the old definition stays available to replay v0.2.0's recipe."""

from __future__ import annotations

import numpy as np

from inference.phantom import PELVIS, small_series
from inference.synth import labelmap
from inference.synth import labels as L
from inference.synth.foreign import make_case
from inference.synth.train import _one_map


def _midline_share(changed: np.ndarray, x_mm: np.ndarray) -> float:
    """Share of the changed voxels within 40 mm of the body's midline (x = 0 in these phantoms)."""
    cols = np.nonzero(changed)[-1]
    return float((np.abs(x_mm[cols]) < 40.0).mean())


def test_randomised_maps_draw_the_sacrum_as_unsegmented_bone():
    new, meta = labelmap.generate(5, size=96, region="pelvis")
    old, _ = labelmap.generate(5, size=96, region="pelvis", sacrum_is_pelvis=True)
    changed = new != old
    assert changed.sum() > 200  # the sacrum
    assert set(np.unique(new[changed])) <= {L.OTHER_CORTEX, L.OTHER_MARROW}
    assert set(np.unique(old[changed])) <= {L.PELVIS_CORTEX, L.PELVIS_MARROW}
    x = (np.arange(96) - 47.5) * meta["pixel_mm"]
    assert _midline_share(changed, x) > 0.9  # a midline bone, not a hip bone
    assert (L.CLASS_OF[new] == 4).any()  # the hip bones are still pelvis


def test_classic_and_foreign_phantoms_keep_the_image_and_drop_the_sacrum_from_the_pelvis():
    for new, old in ((small_series(3, 16, 96, region="pelvis"), small_series(3, 16, 96, region="pelvis",
                                                                              sacrum_is_pelvis=True)),
                     (make_case(500, coarsen=3), make_case(500, coarsen=3, sacrum_is_pelvis=True))):
        assert np.array_equal(new.image, old.image)  # the same bone is drawn: only the truth differs
        changed = new.labels != old.labels
        assert changed.sum() > 100
        assert (old.labels[changed] == PELVIS).all() and (new.labels[changed] == 0).all()
        g = new.geometry
        x = g.origin[0] + np.arange(g.cols) * g.pixel_spacing[1]
        assert _midline_share(changed, x) > 0.9
        assert (new.labels == PELVIS).sum() > 0.4 * (old.labels == PELVIS).sum()


def test_cached_maps_name_their_pelvis_definition(tmp_path):
    new = _one_map((5, 64, "pelvis", "labelmap", str(tmp_path), False))
    old = _one_map((5, 64, "pelvis", "labelmap", str(tmp_path), True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labelmap-hipbones-5-64-pelvis.npy",
                                                         "labelmap-sacrum-5-64-pelvis.npy"]
    assert not np.array_equal(new, old)
    # read back, each from its own file
    assert np.array_equal(_one_map((5, 64, "pelvis", "labelmap", str(tmp_path), False)), new)
    assert np.array_equal(_one_map((5, 64, "pelvis", "labelmap", str(tmp_path), True)), old)
