"""Pictures of a run, as pure functions: arrays and image paths in, PNG files out (no Ray, no MLflow).

- :func:`ranked_lists`: for a fixed, seeded sample of queries, the query image and its top-k gallery
  images under the Market-1501 protocol (same identity *and* same camera, and pid -1, are junk and skipped),
  each gallery image framed green when it shows the query's identity and red when not, one row per query
  (as torchreid's ``visualize_ranked_results``).
- :func:`pseudo_identities`: for a seeded sample of pseudo-labels, the members of each, nearest the cluster's
  mean first (what a user without test labels looks at: do the clusters show one person each?);
  :func:`nearest_neighbours` where every image is a class of its own (SSL).
- :func:`search_results`: queries and the gallery images a search ranked for them (``ureid search``).
- :func:`feature_map` / :func:`feature_maps`: 2-D t-SNE maps (scikit-learn, seeded) of features coloured by
  (pseudo-)label, one panel per (features, labels, title), e.g. stage 0 beside the selected stage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

GREEN = (0, 200, 0)
RED = (220, 0, 0)
QUERY_FRAME = (0, 0, 0)
BACKGROUND = (255, 255, 255)
EMPTY = (225, 225, 225)  # a cell with no gallery image left (fewer valid gallery images than topk)
MEMBER = (150, 150, 150)  # an image whose identity is not known (an unlabeled folder, a search)


def _sample(n: int, k: int, seed: int) -> np.ndarray:
    """``k`` distinct indices out of ``n``, fixed by ``seed``, in increasing order."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(k, n), replace=False))


def ranked_lists(query_paths: Sequence[str | os.PathLike], query_pids, query_cams,
                 gallery_paths: Sequence[str | os.PathLike], gallery_pids, gallery_cams, distances,
                 out_png: str | os.PathLike, num_queries: int = 8, topk: int = 10, seed: int = 0, *,
                 height: int = 128, width: int = 64, border: int = 5, spacing: int = 6,
                 query_gap: int = 30) -> dict:
    """Write a ranked-list picture to ``out_png``; return what it shows.

    Rows are ``num_queries`` queries drawn with ``seed`` (among those with pid >= 0, in query order); each row
    is the query (black frame), a gap, then its ``topk`` nearest valid gallery images by ``distances``
    (shape (num query, num gallery), smaller = closer; ties keep gallery order), framed ``GREEN`` for
    the query's identity and ``RED`` otherwise; the query's image carries its AP (the run's protocol and
    trapezoid AP, :func:`ureid.evaluation.evaluate`). Images are resized to ``height`` x ``width``, framed by
    ``border`` pixels, ``spacing`` pixels apart, with ``spacing`` pixels of margin around the picture.

    Returns ``dict(path, size=(W, H), queries=indices, gallery=(n, topk) gallery indices or -1,
    matches=(n, topk) bool, ap=(n,) float, NaN for a query without a match in another camera)``; cell
    ``(r, j)`` (``j = 0`` the query, ``1..topk`` the ranks) has its top-left frame corner at :func:`cell_origin`.
    """
    qp, qc = np.asarray(query_pids), np.asarray(query_cams)
    gp, gc = np.asarray(gallery_pids), np.asarray(gallery_cams)
    dist = np.asarray(distances)
    if dist.shape != (len(query_paths), len(gallery_paths)):
        raise ValueError(f"distances has shape {dist.shape}, expected ({len(query_paths)}, {len(gallery_paths)})")
    if not (len(qp) == len(qc) == len(query_paths)) or not (len(gp) == len(gc) == len(gallery_paths)):
        raise ValueError("paths, pids and cams must have one entry per image (query and gallery)")
    if num_queries <= 0 or topk <= 0:
        raise ValueError(f"num_queries and topk must be > 0, got {num_queries}, {topk}")
    valid_q = np.flatnonzero(qp >= 0)
    if valid_q.size == 0:
        raise ValueError("no query with a known identity (pid >= 0)")
    queries = valid_q[_sample(valid_q.size, num_queries, seed)]

    n = len(queries)
    ranked = np.full((n, topk), -1, dtype=np.int64)
    matches = np.zeros((n, topk), dtype=bool)
    for r, q in enumerate(queries):
        order = np.argsort(dist[q], kind="stable")
        junk = ((gp[order] == qp[q]) & (gc[order] == qc[q])) | (gp[order] == -1)
        keep = order[~junk][:topk]
        ranked[r, : keep.size] = keep
        matches[r, : keep.size] = gp[keep] == qp[q]

    from .evaluation import evaluate, valid_queries

    aps = np.full(n, np.nan)
    scored = valid_queries(qp[queries], qc[queries], gp, gc)
    if scored.any():
        aps[scored] = evaluate(dist[queries[scored]], qp[queries[scored]], gp, qc[queries[scored]], gc)["ap_per_query"]
    said = ["no match" if np.isnan(ap) else f"AP {ap:.{0 if ap >= 0.1 else 1}%}" for ap in aps]
    rows = [[(query_paths[q], QUERY_FRAME, said[r])]
            + [(None, EMPTY) if g < 0 else (gallery_paths[g], GREEN if m else RED) for g, m in zip(ranked[r], matches[r])]
            for r, q in enumerate(queries)]
    geom = dict(height=height, width=width, border=border, spacing=spacing, query_gap=query_gap)
    out_png, size = _draw_rows(rows, out_png, **geom)
    return {"path": out_png, "size": size, "queries": queries, "gallery": ranked, "matches": matches, "ap": aps}


def drawable_clusters(labels) -> tuple[np.ndarray, np.ndarray]:
    """The pseudo-labels :func:`pseudo_identities` can draw, those of two or more samples (labels < 0, a density
    clustering's outliers, are none), and their sizes; empty where every sample is a class of its own (SSL)."""
    labels = np.asarray(labels)
    values, counts = np.unique(labels[labels >= 0], return_counts=True)
    return values[counts >= 2], counts[counts >= 2]


def pseudo_identities(paths: Sequence[str | os.PathLike], labels, features, out_png: str | os.PathLike,
                      num_clusters: int = 8, members: int = 10, seed: int = 0, pids=None, *, height: int = 128,
                      width: int = 64, border: int = 5, spacing: int = 6, query_gap: int = 30) -> dict:
    """Write a picture of pseudo-identities to ``out_png``; return what it shows.

    Rows are ``num_clusters`` pseudo-labels drawn with ``seed`` among those with two or more samples (labels < 0,
    a density clustering's outliers, are none); each row is the member nearest the cluster's mean feature (black
    frame, captioned with the cluster's size), a gap, then the next ``members`` nearest (ties keep sample
    order). With ``pids`` (ground truth, for a labeled dataset) a member is framed green when it shows the row's
    most frequent identity and red when not; without, grey. The geometry is :func:`ranked_lists`'
    (``cell_origin``, ``picture_size``).

    Returns ``dict(path, size=(W, H), clusters=labels drawn, cells=(n, m + 1) sample indices or -1)``, ``m`` =
    ``members`` or fewer when no drawn cluster has that many more samples.
    """
    labels = np.asarray(labels)
    feats = np.asarray(features, dtype=np.float64)
    if not (len(paths) == len(labels) == len(feats)) or (pids is not None and len(pids) != len(labels)):
        raise ValueError("paths, labels, features (and pids) must have one entry per sample")
    if num_clusters <= 0 or members <= 0:
        raise ValueError(f"num_clusters and members must be > 0, got {num_clusters}, {members}")
    candidates, counts = drawable_clusters(labels)
    if candidates.size == 0:
        raise ValueError("no pseudo-label with two or more samples to draw")
    pick = _sample(candidates.size, num_clusters, seed)
    drawn = candidates[pick]
    members = min(members, int(counts[pick].max()) - 1)  # no column left empty in every row

    cells = np.full((len(drawn), members + 1), -1, dtype=np.int64)
    frames = []
    for r, label in enumerate(drawn):
        idx = np.flatnonzero(labels == label)
        centre = feats[idx].mean(0)
        order = idx[np.argsort(((feats[idx] - centre) ** 2).sum(1), kind="stable")][: members + 1]
        cells[r, : order.size] = order
        if pids is None:
            frames.append([MEMBER] * order.size)
        else:
            ids, n = np.unique(np.asarray(pids)[idx], return_counts=True)
            major = ids[np.argmax(n)]
            frames.append([GREEN if pids[i] == major else RED for i in order])

    sizes = dict(zip(candidates[pick].tolist(), counts[pick].tolist()))
    rows = [[(None, EMPTY) if i < 0 else (paths[i], QUERY_FRAME, f"{sizes[label]} imgs") if j == 0
             else (paths[i], frames[r][j]) for j, i in enumerate(cells[r])] for r, label in enumerate(drawn)]
    geom = dict(height=height, width=width, border=border, spacing=spacing, query_gap=query_gap)
    out_png, size = _draw_rows(rows, out_png, **geom)
    return {"path": out_png, "size": size, "clusters": drawn, "cells": cells}


def nearest_neighbours(paths: Sequence[str | os.PathLike], features, out_png: str | os.PathLike,
                       num_queries: int = 8, topk: int = 10, seed: int = 0, pids=None, *, height: int = 128,
                       width: int = 64, border: int = 5, spacing: int = 6, query_gap: int = 30) -> dict:
    """Write a picture of what the embedding retrieves within one set of images; return what it shows.

    Rows are ``num_queries`` images drawn with ``seed``; each is the image (black frame), a gap, then its
    ``topk`` nearest other images by squared Euclidean distance of ``features`` (the evaluation's
    ``nearest``; ties keep sample order), each with its distance written on it, framed grey, or with ``pids``
    green for the same identity and red for another. For pseudo-labels that keep every image a class of its
    own (SSL), in place of :func:`pseudo_identities`.

    Returns ``dict(path, size=(W, H), queries=indices, cells=(n, topk) sample indices)``.
    """
    from .evaluation import nearest

    feats = np.asarray(features)
    if len(paths) != len(feats) or (pids is not None and len(pids) != len(feats)):
        raise ValueError("paths, features (and pids) must have one entry per sample")
    if len(feats) < 2 or num_queries <= 0 or topk <= 0:
        raise ValueError(f"need two or more images and num_queries, topk > 0; got {len(feats)}, {num_queries}, {topk}")
    topk = min(topk, len(feats) - 1)
    queries = _sample(len(feats), num_queries, seed)
    cells, dist = nearest(feats[queries], feats, topk, skip=queries)
    rows = [[(paths[q], QUERY_FRAME)] + [(paths[i], MEMBER if pids is None else GREEN if pids[i] == pids[q] else RED,
                                          f"{d:.3f}") for i, d in zip(cells[r], dist[r])]
            for r, q in enumerate(queries)]
    geom = dict(height=height, width=width, border=border, spacing=spacing, query_gap=query_gap)
    out_png, size = _draw_rows(rows, out_png, **geom)
    return {"path": out_png, "size": size, "queries": queries, "cells": cells}


def search_results(query_paths: Sequence[str | os.PathLike], gallery_paths: Sequence[str | os.PathLike], indices,
                   out_png: str | os.PathLike, distances=None, *, height: int = 128, width: int = 64,
                   border: int = 5, spacing: int = 6, query_gap: int = 30) -> dict:
    """Write the picture of a search (``ureid search``): each query (black frame), a gap, then the gallery images
    ``indices`` names in order (grey frames; -1 an empty cell), each with its distance written on it when
    ``distances`` (the shape of ``indices``) is given. Returns ``dict(path, size=(W, H))``."""
    indices = np.asarray(indices)
    said = np.full(indices.shape, "", dtype=object) if distances is None else \
        np.vectorize(lambda d: f"{d:.3f}", otypes=[object])(np.asarray(distances, dtype=np.float64))
    if said.shape != indices.shape:
        raise ValueError(f"distances has shape {said.shape}, indices {indices.shape}: one distance per cell")
    rows = [[(query_paths[r], QUERY_FRAME)] + [(None, EMPTY) if g < 0 else (gallery_paths[g], MEMBER, said[r, j])
                                               for j, g in enumerate(row)]
            for r, row in enumerate(indices)]
    if not rows:
        raise ValueError("no query to draw")
    geom = dict(height=height, width=width, border=border, spacing=spacing, query_gap=query_gap)
    out_png, size = _draw_rows(rows, out_png, **geom)
    return {"path": out_png, "size": size}


def _draw_rows(rows: list[list[tuple]], out_png, **geom) -> tuple[Path, tuple[int, int]]:
    """Rows of ``(image path or None, frame colour[, caption])`` cells, the first of each set apart by the query
    gap, resized to the geometry's cell and written as a PNG: the drawing every picture here shares. A caption
    is written white on a black band across the bottom of its image (the geometry stays the same)."""
    from PIL import Image, ImageDraw

    height, width, border = geom["height"], geom["width"], geom["border"]
    size = picture_size(len(rows), max(len(r) for r in rows) - 1, **geom)
    canvas = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    cell = (width + 2 * border, height + 2 * border)
    for r, row in enumerate(rows):
        for j, (path, colour, *caption) in enumerate(row):
            origin = cell_origin(r, j, **geom)
            canvas.paste(Image.new("RGB", cell, colour), origin)
            if path is not None:
                with Image.open(path) as im:
                    canvas.paste(im.convert("RGB").resize((width, height), Image.BILINEAR),
                                 (origin[0] + border, origin[1] + border))
            if caption and caption[0]:  # drawn on a band of the image's width: clipped there, never on a neighbour
                _, top, _, low = draw.textbbox((0, 0), caption[0])
                band = Image.new("RGB", (width, min(height, low - top + 4)), (0, 0, 0))
                ImageDraw.Draw(band).text((2, 2 - top), caption[0], fill=(255, 255, 255))
                canvas.paste(band, (origin[0] + border, origin[1] + border + height - band.height))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png, format="PNG")
    return out_png, size


def cell_origin(row: int, col: int, *, height: int = 128, width: int = 64, border: int = 5, spacing: int = 6,
                query_gap: int = 30) -> tuple[int, int]:
    """Top-left pixel (x, y) of the frame of cell ``(row, col)`` in a :func:`ranked_lists` picture."""
    cw, ch = width + 2 * border, height + 2 * border
    x = spacing + col * (cw + spacing) + (query_gap if col > 0 else 0)
    y = spacing + row * (ch + spacing)
    return x, y


def picture_size(num_rows: int, topk: int, *, height: int = 128, width: int = 64, border: int = 5,
                 spacing: int = 6, query_gap: int = 30) -> tuple[int, int]:
    """(W, H) in pixels of a :func:`ranked_lists` picture with ``num_rows`` rows."""
    cw, ch = width + 2 * border, height + 2 * border
    return (spacing + (topk + 1) * (cw + spacing) + query_gap, spacing + num_rows * (ch + spacing))


# -- t-SNE maps -----------------------------------------------------------------------------------------

EXACT_TSNE_MAX = 300  # up to this many points t-SNE uses exact gradients, above it Barnes-Hut

def _embed_2d(features: np.ndarray, seed: int, normalise: bool) -> np.ndarray:
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float32)
    if normalise:  # ureid clusters and evaluates L2-normalised features
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"a t-SNE map needs at least 3 points, got {n}")
    perplexity = float(min(30.0, (n - 1) / 3.0))  # scikit-learn requires perplexity < n
    # Exact gradients for small maps: O(n^2) numpy, single-threaded and quick below a few hundred points,
    # where Barnes-Hut's OpenMP loop can crawl on a busy machine. Default iterations (1000): the name of that
    # argument changed across scikit-learn releases.
    method = "exact" if n <= EXACT_TSNE_MAX else "barnes_hut"
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                method=method).fit_transform(x)


# Light grey: the points of the clusters left without a colour of their own, and of none (label -1).
_OTHER = (0.75, 0.75, 0.75, 0.6)


def _colours(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """RGBA per point, which points got their cluster's colour, and how many clusters did: each of the largest
    clusters (by points drawn, ties to the lower label) a colour of its own from a 40-colour qualitative palette,
    every other point light grey.
    A palette cycled over hundreds of pseudo-classes gave unrelated clusters one colour, so that two of them
    read as one large cluster."""
    from matplotlib import colormaps

    palette = np.concatenate([colormaps["tab20"](np.arange(20)), colormaps["tab20b"](np.arange(20))])
    out = np.tile(np.asarray(_OTHER), (labels.size, 1))
    uniq, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    counts[uniq < 0] = 0
    largest = np.lexsort((uniq, -counts))[:len(palette)]  # by size, then label
    largest = largest[counts[largest] >= 2]  # a singleton has no cluster to show
    colour_of = np.full(uniq.size, -1)
    colour_of[largest] = np.arange(largest.size)
    coloured = colour_of[inv] >= 0
    out[coloured] = palette[colour_of[inv][coloured]]
    return out, coloured, int(largest.size)


def feature_maps(panels: Sequence[tuple], out_png: str | os.PathLike, seed: int = 0, max_points: int = 2000,
                 normalise: bool = True, panel_inches: float = 5.0, dpi: int = 100) -> dict:
    """Write t-SNE maps side by side to ``out_png``, one panel per ``(features, labels, title)``.

    ``features`` (N, D) and ``labels`` (N,) (pseudo-labels; -1 = unassigned). The 40 largest clusters of a
    panel each get a colour of their own, other points are grey (see ``_colours``). Each panel keeps
    at most ``max_points`` points, drawn with ``seed``; t-SNE is seeded with ``seed`` too, so the picture is
    reproducible. Features are L2-normalised first unless ``normalise=False``. The PNG is
    ``len(panels) * panel_inches * dpi`` by ``panel_inches * dpi`` pixels.

    Returns ``dict(path, size=(W, H), points=[(M, 2) map coordinates per panel], indices=[kept rows])``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("feature_maps needs at least one (features, labels, title) panel")
    if max_points < 3:
        raise ValueError(f"max_points must be >= 3, got {max_points}")
    # A Figure without pyplot: no global backend or figure state is touched.
    fig = Figure(figsize=(panel_inches * len(panels), panel_inches), dpi=dpi)
    FigureCanvasAgg(fig)
    points, kept = [], []
    for i, (features, labels, title) in enumerate(panels):
        features, labels = np.asarray(features), np.asarray(labels)
        if features.ndim != 2 or labels.shape != (features.shape[0],):
            raise ValueError(f"panel {title!r}: features must be (N, D) and labels (N,), got "
                             f"{features.shape} and {labels.shape}")
        idx = _sample(features.shape[0], max_points, seed)
        xy = _embed_2d(features[idx], seed, normalise)
        lab = labels[idx]
        ax = fig.add_subplot(1, len(panels), i + 1)
        colours, coloured, shown = _colours(lab)
        ax.scatter(xy[~coloured, 0], xy[~coloured, 1], c=colours[~coloured], s=6, linewidths=0)  # the grey, under
        ax.scatter(xy[coloured, 0], xy[coloured, 1], c=colours[coloured], s=8, linewidths=0)
        n_clusters = np.unique(lab[lab >= 0]).size
        drawn = f"{idx.size} points" if idx.size == features.shape[0] else \
            f"{idx.size} of {features.shape[0]} points"
        legend = f"colour: the {shown} largest, grey: the rest" if 0 < shown < n_clusters else \
            "grey: no cluster of two" if shown == 0 else "a colour each"
        ax.set_title(f"{title}\n{drawn}, {n_clusters} clusters ({legend})", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        points.append(xy)
        kept.append(idx)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.88, wspace=0.05)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png", dpi=dpi, metadata={"Software": None})
    size = (int(round(panel_inches * dpi * len(panels))), int(round(panel_inches * dpi)))
    return {"path": out_png, "size": size, "points": points, "indices": kept}


def feature_map(features, labels, out_png: str | os.PathLike, title: str, seed: int = 0, max_points: int = 2000,
                **kw) -> dict:
    """One t-SNE panel; see :func:`feature_maps`."""
    return feature_maps([(features, labels, title)], out_png, seed=seed, max_points=max_points, **kw)
