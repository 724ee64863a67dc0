"""ureid.visualize: ranked-list pictures (Market protocol, green/red frames) and t-SNE feature maps."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ureid import visualize as vis

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def gallery_setup(tmp_path_factory):
    """6 queries / 12 gallery images (tiny solid-colour files), pids 0..5 in query, -1 junk in gallery."""
    root = tmp_path_factory.mktemp("imgs")

    def img(name, value):
        p = root / f"{name}.png"
        Image.new("RGB", (8, 16), (value, value, value)).save(p)
        return str(p)

    q_pids = np.array([0, 1, 2, 3, 4, 5])
    q_cams = np.zeros(6, dtype=int)
    # Gallery: pid of each image; cameras: 1 except image 0 (pid 0 in the query's camera 0 -> junk).
    g_pids = np.array([0, 0, 1, 2, 3, 4, 5, -1, 1, 2, 3, 9])
    g_cams = np.ones(12, dtype=int)
    g_cams[0] = 0
    rng = np.random.default_rng(3)
    dist = rng.random((6, 12))
    dist[:, 7] = -1.0  # the pid -1 image is everybody's nearest: it must be skipped
    q_paths = [img(f"q{i}", 40 + 10 * i) for i in range(6)]
    g_paths = [img(f"g{i}", 100 + 10 * i) for i in range(12)]
    return q_paths, q_pids, q_cams, g_paths, g_pids, g_cams, dist


def test_ranked_lists_file_size_and_protocol(gallery_setup, tmp_path):
    q_paths, q_pids, q_cams, g_paths, g_pids, g_cams, dist = gallery_setup
    geom = dict(height=32, width=16, border=3, spacing=4, query_gap=10)
    out = vis.ranked_lists(q_paths, q_pids, q_cams, g_paths, g_pids, g_cams, dist, tmp_path / "sub" / "r.png",
                           num_queries=4, topk=5, seed=0, **geom)
    data = (tmp_path / "sub" / "r.png").read_bytes()
    assert data.startswith(PNG_MAGIC)
    im = Image.open(tmp_path / "sub" / "r.png").convert("RGB")
    assert im.size == out["size"] == vis.picture_size(4, 5, **geom)
    assert len(out["queries"]) == 4 and len(set(out["queries"].tolist())) == 4
    for r, q in enumerate(out["queries"]):
        shown = out["gallery"][r]
        assert 7 not in shown  # pid -1
        if q == 0:
            assert 0 not in shown  # same pid, same camera
        want = np.argsort(dist[q], kind="stable")
        want = [g for g in want if g_pids[g] != -1 and not (g_pids[g] == q_pids[q] and g_cams[g] == q_cams[q])][:5]
        assert shown.tolist() == want
        np.testing.assert_array_equal(out["matches"][r], g_pids[shown] == q_pids[q])
        # Frame colours: the top-left corner pixel of each cell's frame, and one in the middle of its top edge.
        for j in range(5):
            x, y = vis.cell_origin(r, j + 1, **geom)
            colour = vis.GREEN if out["matches"][r, j] else vis.RED
            assert im.getpixel((x, y)) == colour
            assert im.getpixel((x + geom["width"] // 2, y + 1)) == colour
            # Inside the frame: the (grey) gallery image itself.
            inside = im.getpixel((x + geom["border"] + 2, y + geom["border"] + 2))
            assert inside[0] == inside[1] == inside[2] and inside not in (vis.GREEN, vis.RED)
        assert im.getpixel(vis.cell_origin(r, 0, **geom)) == vis.QUERY_FRAME
    assert out["matches"].any() and (~out["matches"]).any()  # both colours are exercised
    # each query's AP, as the run's evaluation computes it, written on the query's image
    from ureid.evaluation import evaluate

    scored = evaluate(dist, q_pids, g_pids, q_cams, g_cams)["ap_per_query"]
    np.testing.assert_array_equal(out["ap"], scored[out["queries"]])
    for r in range(4):
        x, y = vis.cell_origin(r, 0, **geom)
        bottom = np.asarray(im.crop((x + 3, y + 3 + 32 - 2, x + 3 + 16, y + 3 + 32)))
        assert (bottom == 0).all(axis=2).mean() > 0.5  # the caption's black band
        right = vis.cell_origin(r, 1, **geom)
        assert im.getpixel((right[0], right[1] + 3 + 31)) == (vis.GREEN if out["matches"][r, 0] else vis.RED)


def test_ranked_lists_deterministic_for_a_seed_and_fills_short_lists(gallery_setup, tmp_path):
    args = gallery_setup
    kw = dict(num_queries=3, topk=12, height=16, width=8, border=2)
    a = vis.ranked_lists(*args, tmp_path / "a.png", seed=5, **kw)
    b = vis.ranked_lists(*args, tmp_path / "b.png", seed=5, **kw)
    c = vis.ranked_lists(*args, tmp_path / "c.png", seed=6, **kw)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert a["queries"].tolist() == b["queries"].tolist() != c["queries"].tolist()
    # 12 gallery images minus the junk: at most 11 (10 for query pid 0), so the last cells stay empty.
    assert (a["gallery"][:, -1] == -1).all()
    im = Image.open(tmp_path / "a.png").convert("RGB")
    assert im.getpixel(vis.cell_origin(0, 12, height=16, width=8, border=2)) == vis.EMPTY


def test_ranked_lists_bad_input(gallery_setup, tmp_path):
    q_paths, q_pids, q_cams, g_paths, g_pids, g_cams, dist = gallery_setup
    with pytest.raises(ValueError, match="distances has shape"):
        vis.ranked_lists(q_paths, q_pids, q_cams, g_paths, g_pids, g_cams, dist[:, :3], tmp_path / "x.png")


def _blobs(n_per=12, k=3, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 5
    x = np.concatenate([c + rng.normal(size=(n_per, d)) for c in centres]).astype(np.float32)
    return x, np.repeat(np.arange(k), n_per)


def test_feature_map_single_panel(tmp_path):
    x, y = _blobs()
    out = vis.feature_map(x, y, tmp_path / "m.png", "stage 0", seed=0, panel_inches=2.0, dpi=50)
    assert (tmp_path / "m.png").read_bytes().startswith(PNG_MAGIC)
    assert Image.open(tmp_path / "m.png").size == out["size"] == (100, 100)
    assert out["points"][0].shape == (36, 2)


def test_feature_map_colours_no_two_clusters_alike():
    """A palette cycled over hundreds of pseudo-classes gave unrelated clusters one colour (two of them read
    as one large cluster): the 40 largest clusters get a colour each, singletons and the rest grey."""
    # 60 clusters of sizes 61, 60, ..., 2 (label 100 + i: i + 2 points), then 30 singletons and 5 unassigned
    labels = np.concatenate([np.full(61 - i, 100 + i) for i in range(60)] + [np.arange(30), np.full(5, -1)])
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(labels.size)]
    colours, mask, shown = vis._colours(labels)
    assert shown == 40
    grey = (colours == np.asarray(vis._OTHER)).all(axis=1)
    assert (mask == ~grey).all()  # the mask the map draws the grey points from
    coloured = set(np.unique(labels[~grey]).tolist())
    assert coloured == set(range(100, 140))  # the 40 largest
    assert len({tuple(colours[labels == c][0]) for c in coloured}) == 40  # a colour each
    for c in coloured:
        assert (colours[labels == c] == colours[labels == c][0]).all()
    few, _, shown = vis._colours(np.array([3, 3, 7, 7, 7, 9]))
    assert shown == 2 and (few[5] == vis._OTHER).all() and not (few[0] == few[2]).all()


def test_feature_maps_two_panels_max_points_and_determinism(tmp_path):
    x0, y0 = _blobs(seed=0)
    xk, yk = _blobs(seed=1)
    yk[:5] = -1  # unassigned points are allowed (grey)
    panels = [(x0, y0, "stage 0"), (xk, yk, "stage 4")]
    a = vis.feature_maps(panels, tmp_path / "a.png", seed=1, max_points=20, panel_inches=2.0, dpi=50)
    b = vis.feature_maps(panels, tmp_path / "b.png", seed=1, max_points=20, panel_inches=2.0, dpi=50)
    assert Image.open(tmp_path / "a.png").size == a["size"] == (200, 100)
    assert [p.shape for p in a["points"]] == [(20, 2), (20, 2)]
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    for pa, pb in zip(a["points"], b["points"]):
        np.testing.assert_array_equal(pa, pb)
    with pytest.raises(ValueError, match="labels"):
        vis.feature_maps([(x0, y0[:-1], "bad")], tmp_path / "c.png")


def test_visualize_says_what_a_folder_lacks(tmp_path, capsys):
    """A folder that is no run, and a run that has not finished, get one line each saying so."""
    from ureid.cli import main

    assert main(["visualize", str(tmp_path)]) == 2
    assert "not a ureid run folder (no config.yaml" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("method: buc\n")
    assert main(["visualize", str(tmp_path)]) == 2
    assert "has not finished (no summary.json)" in capsys.readouterr().err
    assert not (tmp_path / "pictures").exists()


def test_pseudo_identities_nearest_the_mean_first_and_frames(gallery_setup, tmp_path):
    """Rows are seeded pseudo-labels of two or more samples (outliers, label -1, never), members ordered by
    distance to the cluster mean; frames grey without identities, green/red against the row's majority with."""
    _, _, _, paths, _, _, _ = gallery_setup
    labels = np.array([0, 0, 0, 1, 1, 2, -1, -1, 3, 3, 3, 3])  # 2 and the -1s are no row
    feats = np.zeros((12, 2))
    feats[[0, 1, 2], 0] = [1.0, 0.0, 0.4]        # mean 0.467: 2 nearest, then 1 (0.467), then 0 (0.533)
    feats[[8, 9, 10, 11], 1] = [3.0, 0.0, 1.0, 2.0]  # mean 1.5: ties (10, 11) and (8, 9) keep sample order
    geom = dict(height=32, width=16, border=3, spacing=4, query_gap=10)
    out = vis.pseudo_identities(paths, labels, feats, tmp_path / "p.png", num_clusters=8, members=5, **geom)
    assert list(out["clusters"]) == [0, 1, 3]
    assert out["cells"].shape == (3, 4)  # the largest drawn cluster has 4: no column empty in every row
    assert out["cells"][0].tolist() == [2, 1, 0, -1] and out["cells"][2].tolist() == [10, 11, 8, 9]
    with Image.open(out["path"]) as img:
        assert img.size == vis.picture_size(3, 3, **geom) == out["size"]
        px = img.convert("RGB").load()
        x, y = vis.cell_origin(0, 0, **geom)
        assert px[x, y] == vis.QUERY_FRAME
        x, y = vis.cell_origin(0, 1, **geom)
        assert px[x, y] == vis.MEMBER
        x, y = vis.cell_origin(0, 3, **geom)
        assert px[x, y] == vis.EMPTY
    # each row's first image carries its cluster's size: a black band with white text at its bottom
    big = dict(height=128, width=64, border=5, spacing=6, query_gap=30)
    out = vis.pseudo_identities(paths, labels, feats, tmp_path / "c.png", num_clusters=8, members=5, **big)
    with Image.open(out["path"]) as img:
        for r, col in ((0, 0), (2, 0), (2, 1)):
            x, y = vis.cell_origin(r, col, **big)
            band = np.asarray(img.convert("RGB").crop((x + 5, y + 5 + 128 - 12, x + 5 + 64, y + 5 + 128)))
            text = (band > 200).all(axis=2).sum()
            assert (text > 20 and (band == 0).all(axis=2).sum() > 300) == (col == 0), (r, col, text)
    pids = np.array([7, 7, 8, 5, 5, 0, 0, 0, 4, 4, 4, 6])  # row 3: 11 is not the majority's 4
    out = vis.pseudo_identities(paths, labels, feats, tmp_path / "q.png", num_clusters=3, members=5, seed=1,
                                pids=pids, **geom)
    assert len(out["clusters"]) == 3
    with Image.open(out["path"]) as img:
        px = img.convert("RGB").load()
        seen = set()
        for r, label in enumerate(out["clusters"]):
            for j, i in enumerate(out["cells"][r]):
                if j > 0 and i >= 0:
                    majority = np.bincount(pids[labels == label]).argmax()
                    seen.add(px[vis.cell_origin(r, j, **geom)])
                    assert px[vis.cell_origin(r, j, **geom)] == (vis.GREEN if pids[i] == majority else vis.RED)
        assert seen == {vis.GREEN, vis.RED}
    with pytest.raises(ValueError, match="no pseudo-label with two or more samples"):
        vis.pseudo_identities(paths, np.arange(12), feats, tmp_path / "r.png")
    with pytest.raises(ValueError, match="one entry per sample"):
        vis.pseudo_identities(paths[:3], labels, feats, tmp_path / "r.png")


def test_nearest_neighbours_within_one_set(gallery_setup, tmp_path):
    """For a class per image (SSL): each drawn image, then its nearest others (itself never), ties in sample
    order; grey frames without identities, green/red for the drawn image's identity with."""
    _, _, _, paths, _, _, _ = gallery_setup
    feats = np.arange(12, dtype=float)[:, None] ** 1.5  # distinct gaps: neighbours are index-near, nearer below
    geom = dict(height=32, width=16, border=3, spacing=4, query_gap=10)
    out = vis.nearest_neighbours(paths, feats, tmp_path / "n.png", num_queries=12, topk=3, **geom)
    assert list(out["queries"]) == list(range(12))
    assert out["cells"][0].tolist() == [1, 2, 3] and out["cells"][5].tolist() == [4, 6, 3]
    assert not any(q in row for q, row in zip(out["queries"], out["cells"].tolist()))
    with Image.open(out["path"]) as img:
        assert img.size == vis.picture_size(12, 3, **geom)
        assert img.convert("RGB").getpixel(vis.cell_origin(0, 1, **geom)) == vis.MEMBER
        for j, black in ((0, False), (1, True), (3, True)):  # each neighbour's distance on a black band
            x, y = vis.cell_origin(0, j, **geom)
            band = np.asarray(img.convert("RGB").crop((x + 3, y + 3 + 30, x + 3 + 16, y + 3 + 32)))
            assert ((band == 0).all(axis=2).mean() > 0.5) == black, j
    pids = np.array([0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2])
    out = vis.nearest_neighbours(paths, feats, tmp_path / "m.png", num_queries=1, topk=20, seed=4, pids=pids, **geom)
    assert out["cells"].shape == (1, 11)  # every other image, no more
    (q,) = out["queries"]
    with Image.open(out["path"]) as img:
        px = img.convert("RGB").load()
        frames = [px[vis.cell_origin(0, j + 1, **geom)] for j in range(11)]
    assert frames == [vis.GREEN if pids[i] == pids[q] else vis.RED for i in out["cells"][0]]
    with pytest.raises(ValueError, match="one entry per sample"):
        vis.nearest_neighbours(paths[:3], feats, tmp_path / "x.png")


def test_search_results_write_each_distance_on_its_image(gallery_setup, tmp_path):
    q_paths, _, _, g_paths, _, _, _ = gallery_setup
    indices = np.array([[3, 1, -1], [0, 2, 4]])
    distances = np.array([[0.5, 0.75, np.inf], [0.1, 0.2, 0.3]])
    out = vis.search_results(q_paths[:2], g_paths, indices, tmp_path / "s.png", distances=distances)
    plain = vis.search_results(q_paths[:2], g_paths, indices, tmp_path / "p.png")
    with Image.open(out["path"]) as a, Image.open(plain["path"]) as b:
        a, b = np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))
    for r in range(2):
        for j in range(4):
            x, y = vis.cell_origin(r, j)
            band = (slice(y + 5 + 128 - 12, y + 5 + 128), slice(x + 5, x + 5 + 64))
            captioned = j > 0 and indices[r, j - 1] >= 0
            assert (a[band] != b[band]).any() == captioned, (r, j)
    with pytest.raises(ValueError, match="one distance per cell"):
        vis.search_results(q_paths[:2], g_paths, indices, tmp_path / "x.png", distances=distances[:, :2])
