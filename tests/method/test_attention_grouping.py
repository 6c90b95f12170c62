"""The in-object share of attention (diclip.method.attention_grouping) on hand-built maps, and the preview
captions that show it."""
import numpy as np
import pytest
import torch

from diclip import viz
from diclip.method.attention_grouping import (attention_spread, colour_affinity, image_grouping, object_shares,
                                              objects_from_class_mask, summarize, token_coverage,
                                              walk_in_object_mass)


def two_objects(size: int = 8) -> torch.Tensor:
    """Object ids on a size x size image whose tokens are single pixels: object 1 = top-left 3x3 block,
    object 2 = the bottom two rows, the rest background."""
    ids = torch.zeros(size, size, dtype=torch.long)
    ids[:3, :3] = 1
    ids[-2:, :] = 2
    return ids


def test_coverage_is_the_object_fraction_of_each_token():
    ids = two_objects()
    cov = token_coverage(ids, (4, 4))  # 2x2-pixel tokens
    assert cov.shape == (3, 16)
    torch.testing.assert_close(cov.sum(0), torch.ones(16))
    assert cov[1, 0] == 1.0 and cov[1, 1] == 0.5 and cov[1, 5] == 0.25  # the 3x3 block on the 2x2 tokens
    assert torch.equal(cov[2], torch.tensor([0.0] * 12 + [1.0] * 4))


def test_attention_equal_to_the_object_indicator_has_share_one():
    ids = two_objects()
    cov = token_coverage(ids, (8, 8))
    own = cov.argmax(0)  # each token's object
    attn = (own[:, None] == own[None, :]).float() * 7.0  # any scale: rows are normalised
    shares = object_shares(attn, cov)
    assert [s.object_id for s in shares] == [1, 2]
    assert all(s.share == pytest.approx(1.0) for s in shares)
    assert shares[0].tokens == 9 and shares[0].chance == pytest.approx(9 / 64)
    assert shares[1].tokens == 16 and shares[1].ratio == pytest.approx(64 / 16)


@pytest.mark.parametrize("grid", [(8, 8), (3, 3), (5, 2)])
def test_uniform_attention_scores_exactly_the_area_share(grid):
    """Chance is what attention that ignores the objects gives, also for tokens only partly inside."""
    ids = two_objects()
    cov = token_coverage(ids, grid)
    m = grid[0] * grid[1]
    shares = object_shares(torch.ones(m, m), cov, inside=0.3)
    assert shares
    for s in shares:
        assert s.share == pytest.approx(s.chance, abs=1e-6)
    assert summarize(shares)["ratio"] == pytest.approx(1.0, abs=1e-5)


def test_negative_and_empty_rows_and_missing_objects():
    ids = two_objects()
    cov = token_coverage(ids, (8, 8))
    attn = -torch.ones(64, 64)  # no positive mass anywhere: nothing to score
    assert object_shares(attn, cov) == []
    assert np.isnan(summarize([])["ratio"]) and summarize([])["objects"] == 0
    # an object smaller than half a token owns no token and is left out
    tiny = torch.zeros(8, 8, dtype=torch.long)
    tiny[0, 0] = 1
    assert object_shares(torch.ones(4, 4), token_coverage(tiny, (2, 2))) == []
    with pytest.raises(ValueError):
        object_shares(torch.ones(4, 4), token_coverage(ids, (8, 8)))


def test_colour_kernel_on_a_two_colour_image_groups_by_colour():
    """Left half red (the object), right half blue: the colour kernel keeps each token's mass on its own
    colour, so the object's share is ~1 (chance 0.5); with the object's colour also painted in the
    background the kernel leaks there and the share falls to the colour's share inside vs outside."""
    img = torch.zeros(1, 3, 8, 8)
    img[0, 0, :, :4] = 1.0
    img[0, 2, :, 4:] = 1.0
    ids = torch.zeros(8, 8, dtype=torch.long)
    ids[:, :4] = 1
    k = colour_affinity(img, (8, 8), 0.1)
    torch.testing.assert_close(k.sum(-1), torch.ones(1, 64))
    s = image_grouping(k[0], (8, 8), ids)
    assert s["share"] == pytest.approx(1.0, abs=1e-6) and s["chance"] == pytest.approx(0.5) and s["objects"] == 1
    img[0, 0, :, 6:] = 1.0  # the two right-most columns red too: the object's colour outside it
    img[0, 2, :, 6:] = 0.0
    s = image_grouping(colour_affinity(img, (8, 8), 0.1)[0], (8, 8), ids)
    assert s["share"] == pytest.approx(32 / 48, abs=1e-6)


def test_spread_is_one_for_uniform_and_one_over_m_for_identity():
    assert attention_spread(torch.ones(2, 10, 10)) == pytest.approx(1.0)
    assert attention_spread(torch.eye(10)) == pytest.approx(0.1)


def test_walk_of_a_perfect_cam_stays_in_the_object_only_on_a_grouping_map():
    ids = two_objects()
    clip_cov, attn_cov = token_coverage(ids, (4, 4)), token_coverage(ids, (8, 8))
    own = attn_cov.argmax(0)
    grouping = (own[:, None] == own[None, :]).float()
    grouping = grouping / grouping.sum(-1, keepdim=True)  # the walk within each object's tokens
    start = list(walk_in_object_mass(grouping, clip_cov, attn_cov, 0, (4, 4), (8, 8)).values())
    assert len(start) == 2 and all(0 < m < 1 for m in start)  # bilinear resizing blurs the CAM at first
    kept = list(walk_in_object_mass(grouping, clip_cov, attn_cov, 5, (4, 4), (8, 8)).values())
    # walking within objects never moves mass across a border: what the blur left outside stays outside
    assert all(k >= s - 1e-6 for k, s in zip(kept, start))
    assert kept == pytest.approx(list(walk_in_object_mass(grouping, clip_cov, attn_cov, 1, (4, 4), (8, 8)).values()))
    # a map that groups something else (the image's left and right halves) carries the mass across borders
    half = torch.arange(64) % 8 < 4
    other = (half[:, None] == half[None, :]).float()
    other = other / other.sum(-1, keepdim=True)
    after = walk_in_object_mass(other, clip_cov, attn_cov, 5, (4, 4), (8, 8)).values()
    assert all(a < s - 0.1 for a, s in zip(after, start))
    # a flat map's constant part is what the walk's min-subtraction removes: flat + a little identity
    # keeps the CAM as it is (what matters is how a map deviates from flat, not its in-object share alone)
    flat = torch.full((64, 64), 0.9 / 64) + torch.eye(64) * 0.1
    same = list(walk_in_object_mass(flat, clip_cov, attn_cov, 5, (4, 4), (8, 8)).values())
    assert same == pytest.approx(start, abs=1e-5)


def test_the_walk_skips_object_ids_with_no_pixels():
    ids = two_objects()
    ids[ids == 1] = 3  # id 1 has no pixels left (as an object another one fully occludes)
    cov4, cov8 = token_coverage(ids, (4, 4)), token_coverage(ids, (8, 8))
    assert set(walk_in_object_mass(torch.eye(64), cov4, cov8, 2, (4, 4), (8, 8))) == {2, 3}


def test_objects_from_a_class_mask_are_its_connected_class_regions():
    mask = np.zeros((6, 6), np.uint8)
    mask[0:2, 0:2] = 1
    mask[4:6, 4:6] = 1  # same class, apart: a second object
    mask[0:2, 4:6] = 2
    mask[3, 0] = 255  # ignore: not an object
    objs = objects_from_class_mask(torch.from_numpy(mask))
    assert int(objs.max()) == 3 and int(objs[3, 0]) == 0
    assert len({int(objs[0, 0]), int(objs[5, 5]), int(objs[0, 5])}) == 3


def test_preview_caption_and_grid_captions():
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :4] = 3
    cov = token_coverage(torch.from_numpy(mask.astype(np.int64) > 0).long(), (4, 4))
    own = cov.argmax(0)
    attn = (own[:, None] == own[None, :]).float()
    assert viz.grouping_caption(attn, (4, 4), mask) == "in-obj 1.00 vs area 0.50"
    assert viz.grouping_caption(attn, (4, 4), None) is None
    assert viz.grouping_caption(attn, (4, 4), np.zeros((8, 8), np.uint8)) is None  # no object
    pic = np.zeros((8, 8, 3), np.uint8)
    plain = viz.picture_grid([[pic, pic]], ["a", "b"], cell=64)
    captioned = viz.picture_grid([[pic, pic]], ["a", "b"], cell=64, captions=[[None, "x 0.1"]])
    assert plain.size == captioned.size
    a, b = np.asarray(plain), np.asarray(captioned)
    x0 = viz.GRID_PAD * 2 + 64  # second cell
    y0 = viz.GRID_HEADER + viz.GRID_PAD
    assert np.array_equal(a[:, :x0], b[:, :x0])  # the first cell has no caption
    assert (b[y0:y0 + 12, x0:x0 + 64] != a[y0:y0 + 12, x0:x0 + 64]).any()  # text drawn on the second
