"""Every dataset format parsed from tiny fixtures written in its official layout."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from ureid.data import DATASETS, Record, load_dataset, verify_images


def jpg(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 8), (value, value // 2, 255 - value)).save(path, quality=90)
    return path


def by_name(recs):
    return {Path(r.path).name: (r.pid, r.camid) for r in recs}


# ----------------------------------------------------------------------------- Market / Duke
def market(root: Path) -> Path:
    for name in ["0002_c1s1_000451_03.jpg", "0002_c3s1_000551_01.jpg", "0007_c6s2_000001_01.jpg"]:
        jpg(root / "bounding_box_train" / name)
    for name in ["0003_c2s1_000001_01.jpg", "0003_c1s1_000002_01.jpg", "0000_c4s1_000003_02.jpg", "-1_c5s1_000004_03.jpg"]:
        jpg(root / "bounding_box_test" / name)
    jpg(root / "query" / "0003_c1s1_000009_00.jpg")
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"not an image")  # shipped with Market-1501
    return root


def test_market1501_keeps_junk_and_distractors_with_0_based_cameras(tmp_path):
    ds = load_dataset("market1501", market(tmp_path / "Market"))
    assert not ds.is_video
    assert by_name(ds.train) == {"0002_c1s1_000451_03.jpg": (2, 0), "0002_c3s1_000551_01.jpg": (2, 2), "0007_c6s2_000001_01.jpg": (7, 5)}
    assert by_name(ds.gallery) == {"0003_c2s1_000001_01.jpg": (3, 1), "0003_c1s1_000002_01.jpg": (3, 0),
                                   "0000_c4s1_000003_02.jpg": (0, 3), "-1_c5s1_000004_03.jpg": (-1, 4)}
    assert by_name(ds.query) == {"0003_c1s1_000009_00.jpg": (3, 0)}
    assert [r.path for r in ds.gallery] == sorted(r.path for r in ds.gallery)  # order independent of the file system
    assert all(len(r.paths) == 1 and not r.is_fake for r in ds.train)


def test_market1501_accepts_parent_of_extracted_folder(tmp_path):
    market(tmp_path / "Market-1501-v15.09.15")
    ds = load_dataset("market1501", tmp_path)
    assert ds.root == str(tmp_path / "Market-1501-v15.09.15") and len(ds.train) == 3


def test_market1501_wrong_layout_names_missing_folder(tmp_path):
    root = market(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"market1501: expected .*empty/bounding_box_train \(layout"):
        load_dataset("market1501", tmp_path / "empty")
    (root / "query").rename(root / "queries")
    with pytest.raises(FileNotFoundError, match=r"expected folder .*m/query \(layout"):
        load_dataset("market1501", root)


def test_market1501_bad_file_name_names_file_and_pattern(tmp_path):
    root = market(tmp_path / "m")
    jpg(root / "query" / "person3_cam1.jpg")
    with pytest.raises(ValueError, match=r"person3_cam1\.jpg does not match the expected naming '0002_c1s1_000451_03\.jpg'"):
        load_dataset("market1501", root)


def test_dukemtmc_naming_and_eight_cameras(tmp_path):
    for split, names in {"bounding_box_train": ["0001_c2_f0046182.jpg", "0001_c8_f0000001.jpg"],
                         "bounding_box_test": ["0005_c1_f0000002.jpg", "0000_c3_f0000003.jpg"],
                         "query": ["0005_c7_f0000004.jpg"]}.items():
        for n in names:
            jpg(tmp_path / "DukeMTMC-reID" / split / n)
    ds = load_dataset("dukemtmc", tmp_path)
    assert by_name(ds.train) == {"0001_c2_f0046182.jpg": (1, 1), "0001_c8_f0000001.jpg": (1, 7)}
    assert by_name(ds.gallery)["0000_c3_f0000003.jpg"] == (0, 2)
    assert by_name(ds.query) == {"0005_c7_f0000004.jpg": (5, 6)}
    jpg(tmp_path / "DukeMTMC-reID" / "query" / "0002_c1s1_000451_03.jpg")  # Market naming is not Duke naming
    with pytest.raises(ValueError, match="0001_c2_f0046182"):
        load_dataset("dukemtmc", tmp_path)


# ----------------------------------------------------------------------------- MSMT17
def msmt(root: Path, with_val: bool = True) -> Path:
    lists = {
        "list_train.txt": ("train", [("0000/0000_000_01_0303morning_0015_0.jpg", 0), ("0000/0000_001_14_0303noon_0100_1.jpg", 0)]),
        "list_val.txt": ("train", [("0001/0001_000_05_0303morning_0016_0.jpg", 1)]),
        "list_query.txt": ("test", [("0000/0000_000_03_0303morning_0020_0.jpg", 0)]),
        "list_gallery.txt": ("test", [("0000/0000_001_07_0303noon_0030_0.jpg", 0), ("0002/0002_000_15_0303morning_0040_0.jpg", 2)]),
    }
    for lst, (d, entries) in lists.items():
        if lst == "list_val.txt" and not with_val:
            continue
        for rel, _ in entries:
            jpg(root / d / rel)
        (root / lst).write_text("".join(f"{rel} {pid}\n" for rel, pid in entries))
    return root


def test_msmt17_lists_camera_from_third_field_and_val_joins_train(tmp_path):
    ds = load_dataset("msmt17", msmt(tmp_path / "MSMT17_V1"))
    assert by_name(ds.train) == {"0000_000_01_0303morning_0015_0.jpg": (0, 0), "0000_001_14_0303noon_0100_1.jpg": (0, 13),
                                 "0001_000_05_0303morning_0016_0.jpg": (1, 4)}
    assert by_name(ds.query) == {"0000_000_03_0303morning_0020_0.jpg": (0, 2)}
    assert by_name(ds.gallery) == {"0000_001_07_0303noon_0030_0.jpg": (0, 6), "0002_000_15_0303morning_0040_0.jpg": (2, 14)}
    assert all(Path(r.path).parts[-3] == "test" for r in ds.gallery)
    assert len(load_dataset("msmt17", msmt(tmp_path / "noval", with_val=False)).train) == 2


def test_msmt17_missing_list_and_bad_line(tmp_path):
    root = msmt(tmp_path / "m")
    (root / "list_gallery.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"expected file .*list_gallery\.txt"):
        load_dataset("msmt17", root)
    (root / "list_gallery.txt").write_text("0000/0000_001_07_0303noon_0030_0.jpg\n")
    with pytest.raises(ValueError, match=r"list_gallery\.txt:1: expected 'relpath pid'"):
        load_dataset("msmt17", root)


# ----------------------------------------------------------------------------- CUHK03
def cuhk03(root: Path, protocol: str = "labeled") -> Path:
    files = ["1_001_1_01.png", "1_001_2_06.png", "1_002_1_01.png", "1_002_2_07.png", "2_005_1_02.png", "2_005_2_08.png"]
    for f in files:
        path = root / f"images_{protocol}" / f
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 8), (10, 20, 30)).save(path)
    savemat(str(root / f"cuhk03_new_protocol_config_{protocol}.mat"), {
        "filelist": np.array(files, dtype=object).reshape(-1, 1),  # a MATLAB cell column, as in the release
        "labels": np.array([[1], [1], [2], [2], [705], [705]], dtype=np.float64),
        "camId": np.array([[1], [2], [1], [2], [1], [2]], dtype=np.float64),
        "train_idx": np.array([[1], [2], [3], [4]], dtype=np.float64),  # 1-based
        "query_idx": np.array([[5]], dtype=np.float64),
        "gallery_idx": np.array([[6]], dtype=np.float64),
    })
    return root


def test_cuhk03_new_protocol_one_based_indices(tmp_path):
    ds = load_dataset("cuhk03", cuhk03(tmp_path / "cuhk03"))
    assert by_name(ds.train) == {"1_001_1_01.png": (1, 0), "1_001_2_06.png": (1, 1), "1_002_1_01.png": (2, 0), "1_002_2_07.png": (2, 1)}
    assert by_name(ds.query) == {"2_005_1_02.png": (705, 0)} and by_name(ds.gallery) == {"2_005_2_08.png": (705, 1)}
    assert "images_labeled" in ds.train[0].path


def test_cuhk03_detected_protocol_and_errors(tmp_path):
    root = cuhk03(tmp_path / "c", "detected")
    assert "images_detected" in load_dataset("cuhk03", root, cuhk03_protocol="detected").query[0].path
    with pytest.raises(FileNotFoundError, match=r"cuhk03_new_protocol_config_labeled\.mat"):
        load_dataset("cuhk03", root)  # the labeled split file is absent
    with pytest.raises(ValueError, match="cuhk03_protocol must be one of .*'detected'.*got 'both'"):
        load_dataset("cuhk03", root, cuhk03_protocol="both")


# ----------------------------------------------------------------------------- MARS
def mars(root: Path) -> Path:
    train_names = ["0001C1T0001F001.jpg", "0001C1T0001F002.jpg", "0001C1T0001F003.jpg", "0001C3T0002F001.jpg"]
    # within tracklet 0002C2T0001 the list is out of order on purpose: frames must come back sorted
    test_names = ["00-1C1T0001F001.jpg", "0000C4T0001F001.jpg", "0000C4T0001F002.jpg",
                  "0002C2T0001F002.jpg", "0002C2T0001F001.jpg", "0002C5T0003F001.jpg", "0002C5T0003F002.jpg"]
    for home, names in (("bbox_train", train_names), ("bbox_test", test_names)):
        for n in names:
            jpg(root / home / n[:4] / n)
    info = root / "info"
    info.mkdir()
    (info / "train_name.txt").write_text("\n".join(train_names) + "\n")
    (info / "test_name.txt").write_text("\n".join(test_names) + "\n")
    savemat(str(info / "tracks_train_info.mat"), {"track_train_info": np.array([[1, 3, 1, 1], [4, 4, 1, 3]], float)})
    savemat(str(info / "tracks_test_info.mat"), {"track_test_info": np.array([[1, 1, -1, 1], [2, 3, 0, 4], [4, 5, 2, 2], [6, 7, 2, 5]], float)})
    savemat(str(info / "query_IDX.mat"), {"query_IDX": np.array([[3]], float)})
    return root


def test_mars_tracklets_frame_order_junk_dropped_distractors_kept(tmp_path):
    ds = load_dataset("mars", mars(tmp_path / "mars"))
    assert ds.is_video
    assert [(len(r.paths), r.pid, r.camid) for r in ds.train] == [(3, 1, 0), (1, 1, 2)]
    assert [Path(p).name for p in ds.train[0].paths] == ["0001C1T0001F001.jpg", "0001C1T0001F002.jpg", "0001C1T0001F003.jpg"]
    assert ds.train[0].path.endswith("bbox_train/0001/0001C1T0001F001.jpg")
    (q,) = ds.query
    assert (q.pid, q.camid) == (2, 1) and [Path(p).name for p in q.paths] == ["0002C2T0001F001.jpg", "0002C2T0001F002.jpg"]
    assert [(r.pid, r.camid, len(r.paths)) for r in ds.gallery] == [(0, 3, 2), (2, 4, 2)]  # the -1 tracklet is dropped


def test_mars_inconsistent_track_table_and_missing_info(tmp_path):
    root = mars(tmp_path / "mars")
    savemat(str(root / "info" / "tracks_train_info.mat"), {"track_train_info": np.array([[1, 4, 1, 1]], float)})
    with pytest.raises(ValueError, match="lists frame 0001C3T0002F001.jpg of another person or camera"):
        load_dataset("mars", root)
    (root / "info" / "query_IDX.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"expected file .*info/query_IDX\.mat"):
        load_dataset("mars", root)


# ----------------------------------------------------------------------------- DukeMTMC-VideoReID
def test_dukevideo_tracklets_camera_from_first_frame(tmp_path):
    root = tmp_path / "DukeMTMC-VideoReID"
    for f in ["0001_C6_F0002_X30823.jpg", "0001_C6_F0001_X30822.jpg", "0001_C6_F0010_X30830.jpg"]:
        jpg(root / "train" / "0001" / "0001" / f)
    jpg(root / "train" / "0001" / "0002" / "0001C2F0099X30823.jpg")  # the older naming
    jpg(root / "query" / "0005" / "0003" / "0005_C1_F0001_X1.jpg")
    jpg(root / "gallery" / "0005" / "0004" / "0005_C3_F0001_X1.jpg")
    ds = load_dataset("dukevideo", tmp_path)
    assert ds.is_video
    assert [Path(p).name for p in ds.train[0].paths] == ["0001_C6_F0001_X30822.jpg", "0001_C6_F0002_X30823.jpg", "0001_C6_F0010_X30830.jpg"]
    assert [(r.pid, r.camid, len(r.paths)) for r in ds.train] == [(1, 5, 3), (1, 1, 1)]
    assert (ds.query[0].camid, ds.gallery[0].camid) == (0, 2)
    (root / "gallery").rename(root / "test")
    with pytest.raises(FileNotFoundError, match=r"dukevideo: expected folder .*gallery"):
        load_dataset("dukevideo", root)


# ----------------------------------------------------------------------------- generic folder
def test_folder_with_camid_group_and_nested_dirs(tmp_path, caplog):
    for f in ["a/p12_cam_b_1.jpg", "a/p12_cam_a_2.jpg", "b/deep/p7_cam_c_1.png", "readme_x.jpg"]:
        jpg(tmp_path / f)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("folder", tmp_path, pattern=r"p(?P<pid>\d+)_cam_(?P<camid>[a-z])")
    assert by_name(ds.train) == {"p12_cam_b_1.jpg": (12, 1), "p12_cam_a_2.jpg": (12, 0), "p7_cam_c_1.png": (7, 2)}
    assert ds.query == [] and ds.gallery == []
    assert "1 image(s) do not match" in caplog.text and "readme_x.jpg" in caplog.text  # never silent


def test_folder_without_camid_and_with_splits(tmp_path):
    for f in ["train/1_x.jpg", "train/2_x.jpg", "query/3_q.jpg", "gallery/3_g.jpg", "gallery/4_g.jpg"]:
        jpg(tmp_path / f)
    ds = load_dataset("folder", tmp_path, pattern=r"^(?P<pid>\d+)_")
    assert {r.pid for r in ds.train} == {1, 2} and [r.pid for r in ds.query] == [3] and len(ds.gallery) == 2
    assert {r.camid for r in ds.train + ds.query + ds.gallery} == {0}
    # numeric camera ids are ordered numerically, then made 0-based and contiguous
    for f in ["n/5_c10.jpg", "n/5_c2.jpg"]:
        jpg(tmp_path / f)
    ds = load_dataset("folder", tmp_path / "n", pattern=r"(?P<pid>\d+)_c(?P<camid>\d+)")
    assert by_name(ds.train) == {"5_c2.jpg": (5, 0), "5_c10.jpg": (5, 1)}


def test_folder_per_identity_from_a_pattern_with_a_slash(tmp_path):
    """A folder per identity (the common layout of labeled crops of one's own): a pattern with a '/' is searched
    in the path below the split folder; without one, in the file name as before (a folder name that looks
    like an identity is never read by such a pattern)."""
    for f in ["train/0007/cam1_a.jpg", "train/0007/cam2_b.jpg", "train/0012/sub/cam1_c.jpg", "query/0003/cam1_q.jpg",
              "gallery/0003/cam2_g.jpg", "gallery/0004/cam1_g.jpg"]:
        jpg(tmp_path / f)
    ds = load_dataset("folder", tmp_path, pattern=r"^(?P<pid>\d+)/(?:.*/)?cam(?P<camid>\d)")
    assert by_name(ds.train) == {"cam1_a.jpg": (7, 0), "cam2_b.jpg": (7, 1), "cam1_c.jpg": (12, 0)}
    assert [(r.pid, r.camid) for r in ds.query] == [(3, 0)] and {r.pid for r in ds.gallery} == {3, 4}
    assert {r.pid for r in load_dataset("folder", tmp_path / "train", pattern=r"(?P<pid>\d+)/").train} == {7, 12}
    with pytest.raises(ValueError, match=r"no image under .* has a file name matching pattern .*\(e.g. 'cam1_a.jpg'\)"):
        load_dataset("folder", tmp_path / "train", pattern=r"^(?P<pid>\d+)")
    with pytest.raises(ValueError, match=r"no image under .* has a path below it matching pattern .*"
                                         r"\(e.g. '0007/cam1_a.jpg'\)"):
        load_dataset("folder", tmp_path / "train", pattern=r"^id(?P<pid>\d+)/")


def test_folder_pattern_errors(tmp_path):
    jpg(tmp_path / "1_c1.jpg")
    with pytest.raises(ValueError, match=r"needs a named group \(\?P<pid>...\) and/or \(\?P<camid>"):
        load_dataset("folder", tmp_path, pattern=r"(\d+)_c(\d)")
    with pytest.raises(ValueError, match="no image under .* matching pattern " + re.escape(repr(r"zzz(?P<pid>\d+)"))):
        load_dataset("folder", tmp_path, pattern=r"zzz(?P<pid>\d+)")
    with pytest.raises(ValueError, match="pattern applies only to the 'folder' and 'tracklets' formats"):
        load_dataset("market1501", tmp_path, pattern=r"(?P<pid>\d+)")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"folder: no image under .*empty \(looked for \.bmp, \.gif, \.jpeg, \.jpg, \.pgm, \.png, \.ppm, \.tif, \.tiff, \.webp"):
        load_dataset("folder", tmp_path / "empty")


def test_folder_of_unlabeled_crops(tmp_path):
    """A user's own crops: no pattern (or a camera-only one) gives unlabeled training images, identity -1;
    query/gallery subfolders are scored by identity, so they need a pid group."""
    from ureid.config import CONFIG_DIR, load_config
    from ureid.data.records import UNKNOWN_PID

    for f in ["b/x_cam2.jpg", "a/y_cam1.png", "z_cam2.jpg"]:
        jpg(tmp_path / "own" / f)
    ds = load_dataset("folder", tmp_path / "own")
    assert [Path(r.path).name for r in ds.train] == ["y_cam1.png", "x_cam2.jpg", "z_cam2.jpg"]  # sorted by path
    assert {(r.pid, r.camid) for r in ds.train} == {(UNKNOWN_PID, 0)} and ds.query == [] and ds.gallery == []
    assert "train         3 records unlabeled   1 cameras" in ds.summary()
    ds = load_dataset("folder", tmp_path / "own", pattern=r"_cam(?P<camid>\d)")
    assert by_name(ds.train) == {"y_cam1.png": (UNKNOWN_PID, 0), "x_cam2.jpg": (UNKNOWN_PID, 1),
                                 "z_cam2.jpg": (UNKNOWN_PID, 1)}
    for f in ["query/1_q.jpg", "gallery/1_g.jpg"]:
        jpg(tmp_path / "split" / f)
    for pattern in (None, r"_(?P<camid>[qg])"):
        with pytest.raises(ValueError, match=r"has query/ and gallery/, which are scored by identity: give a pattern"):
            load_dataset("folder", tmp_path / "split", pattern=pattern)
    # the config takes a folder without a pattern, and a pattern only for the folder format
    base = CONFIG_DIR / "buc_cpu.yaml"
    assert load_config(base, ["data.name=folder", f"data.root={tmp_path / 'own'}"]).data.pattern is None
    with pytest.raises(ValueError, match="data.pattern applies only to data.name='folder' or 'tracklets', not 'market1501'"):
        load_config(base, ["data.name=market1501", r"data.pattern=(?P<pid>\d+)"], check_paths=False)


def test_folder_reads_every_image_kind_and_names_the_files_it_does_not(tmp_path, caplog):
    """Crops saved as WebP, TIFF, GIF, PGM, grayscale or RGBA PNG are read (WebP and GIF ones were skipped in
    silence) and load as RGB for training; a file without an image suffix is named in a warning, not hidden
    files, and not a tracklet tree's camstyle output."""
    from ureid.data.records import UNKNOWN_PID
    from ureid.engine.datasets import load_image

    root = tmp_path / "own"
    (root / "sub").mkdir(parents=True)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 16, 3), dtype=np.uint8))
    saved = {"a.webp": rgb, "b.tif": rgb, "c.gif": rgb.convert("P"), "d.pgm": rgb.convert("L"),
             "sub/e.png": rgb.convert("RGBA"), "sub/f.JPG": rgb.convert("L"), "sub/g.tiff": rgb}
    for name, im in saved.items():
        im.save(root / name)
    (root / "notes.txt").write_text("field notes")
    (root / "sub" / "h.heic").write_bytes(b"not read")
    (root / ".DS_Store").write_bytes(b"\0")
    (root / "sub" / "Thumbs.db").write_bytes(b"\0")
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("folder", root)
    assert sorted(Path(r.path).relative_to(root).as_posix() for r in ds.train) == sorted(saved)
    assert {r.pid for r in ds.train} == {UNKNOWN_PID}
    assert all(load_image(r.path).mode == "RGB" and load_image(r.path).size == (16, 32) for r in ds.train)
    warned = [m for m in caplog.messages if "are not read" in m]
    assert len(warned) == 1 and "2 file(s)" in warned[0] and ".heic 1, .txt 1" in warned[0], caplog.messages
    assert ".DS_Store" not in warned[0] and "Thumbs.db" not in warned[0]
    caplog.clear()
    from ureid.embed import collect_inputs  # `ureid embed` / `search` of the same folder: the same warning

    with caplog.at_level(logging.WARNING):
        assert len(collect_inputs([root])) == len(saved)
    assert [m for m in caplog.messages if "are not read" in m and ".heic 1, .txt 1" in m]
    caplog.clear()
    tracks = tmp_path / "tracks"
    for f in ["t1/f1.webp", "t1/f2.webp", "bounding_box_train_camstyle/readme.md"]:
        (tracks / f).parent.mkdir(parents=True, exist_ok=True)
        rgb.save(tracks / f, format="WEBP")
    with caplog.at_level(logging.WARNING):
        assert [len(r.paths) for r in load_dataset("tracklets", tracks).train] == [2]
    assert not [m for m in caplog.messages if "are not read" in m]


def test_a_split_no_query_can_be_scored_on_is_refused_before_training(tmp_path):
    """A labeled folder whose gallery holds no query's identity from another camera: every stage's evaluation
    failed in the train workers (and Ray Train trained the stage again for each retry); the driver's read of
    the data now refuses it. One query with a match is enough."""
    from ureid.config import CONFIG_DIR, ConfigError, load_config
    from ureid.methods import get_method
    from ureid.runtime.experiment import load_run_data

    root = tmp_path / "lab"
    for f in ["train/1_c1_a.jpg", "train/1_c2_b.jpg", "query/5_c1_q.jpg", "query/6_c2_q.jpg",
              "gallery/5_c1_g.jpg", "gallery/7_c2_g.jpg"]:
        jpg(root / f)
    cfg = load_config(CONFIG_DIR / "buc_cpu.yaml", ["data.name=folder", f"data.root={root}",
                                                    r"data.pattern=(?P<pid>\d+)_c(?P<camid>\d)"])
    with pytest.raises(ConfigError, match=r"data: none of the 2 queries of folder at .* has a gallery image of its "
                                          r"identity from another camera"):
        load_run_data(cfg, get_method("buc"))
    jpg(root / "gallery" / "6_c1_g.jpg")
    assert len(load_run_data(cfg, get_method("buc")).query) == 2


# ----------------------------------------------------------------------------- unreadable images
def test_bad_image_fail_names_path_and_skip_warns(tmp_path, caplog):
    root = market(tmp_path / "m")
    bad = root / "bounding_box_test" / "0003_c6s1_000007_01.jpg"
    bad.write_bytes(b"\xff\xd8 truncated garbage")
    with pytest.raises(OSError, match=f"unreadable image {bad} \\(data.bad_images=skip in a config or --set"):
        load_dataset("market1501", root)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("market1501", root, bad_images="skip")
    assert str(bad) not in {r.path for r in ds.gallery} and len(ds.gallery) == 4
    assert "skipped 1 unreadable image(s)" in caplog.text and str(bad) in caplog.text
    assert len(load_dataset("market1501", root, verify=False).gallery) == 5  # not checked when asked not to
    with pytest.raises(ValueError, match="bad_images must be one of .*got 'ignore'"):
        load_dataset("market1501", root, bad_images="ignore")


def test_embed_and_search_inputs_name_an_unreadable_image_first_or_skip_it(tmp_path, caplog):
    """`ureid embed` / `search` of a folder with a broken file failed where the loader met it, after embedding
    what came before (a large gallery: minutes); now before anything is embedded, or it is left out."""
    from ureid.embed import collect_inputs

    good = [jpg(tmp_path / "g" / f"{i}.jpg") for i in range(2)]
    bad = tmp_path / "g" / "sub" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8 truncated garbage")
    with pytest.raises(OSError, match=f"unreadable image {bad} .*--bad-images skip for .*`embed` and `search`"):
        collect_inputs([tmp_path / "g"], bad_images="fail")
    with caplog.at_level(logging.WARNING):
        kept = collect_inputs([tmp_path / "g"], bad_images="skip")
    assert [r.path for r in kept] == [str(p) for p in good] and str(bad) in caplog.text
    assert len(collect_inputs([tmp_path / "g"])) == 3  # the Python API's default: not opened here
    with pytest.raises(ValueError, match="no readable image in"):
        collect_inputs([bad], bad_images="skip")


def test_verify_images_drops_bad_frames_of_tracklets(tmp_path, caplog):
    good = [str(jpg(tmp_path / f"f{i}.jpg")) for i in range(2)]
    bad = tmp_path / "f9.jpg"
    bad.write_bytes(b"")
    recs = [Record((good[0], str(bad), good[1]), 1, 0), Record((str(bad),), 2, 1)]
    with caplog.at_level(logging.WARNING):
        kept = verify_images(recs, "skip")
    assert kept == [Record((good[0], good[1]), 1, 0)]  # the all-bad tracklet is gone, order kept
    assert "skipped 2 unreadable image(s)" in caplog.text
    with pytest.raises(OSError, match="f9.jpg"):
        verify_images(recs, "fail")


def test_registry_and_unknown_format(tmp_path):
    assert set(DATASETS) == {"market1501", "dukemtmc", "msmt17", "cuhk03", "mars", "dukevideo", "folder", "tracklets"}
    with pytest.raises(ValueError, match="unknown dataset format 'market'; choose one of"):
        load_dataset("market", tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_dataset("market1501", tmp_path / "nope")


def test_camstyle_fakes_of_a_folder_stay_out_of_its_training_images(tmp_path, capsys):
    """camstyle writes its fakes (and a StarGAN) under the dataset root; a folder dataset reads its root
    recursively, so it must skip them. The fakes need two cameras and one source per file stem."""
    from ureid.cli import main
    from ureid.data.camstyle import load_fakes, write_fakes

    root = tmp_path / "own"
    for f in ["a/x_cam1.jpg", "a/y_cam2.jpg", "b/z_cam2.jpg"]:
        jpg(root / f)
    assert main(["data", "camstyle", "--root", str(root), "--format", "folder", "--pattern", r"_cam(?P<camid>\d)"]) == 0
    assert "wrote 3 camera-style fakes" in capsys.readouterr().out
    jpg(root / "camstyle_stargan" / "key" / "samples" / "s_cam1.jpg")
    ds = load_dataset("folder", root, pattern=r"_cam(?P<camid>\d)")
    assert sorted(Path(r.path).name for r in ds.train) == ["x_cam1.jpg", "y_cam2.jpg", "z_cam2.jpg"]
    assert len(load_fakes(root / "bounding_box_train_camstyle", ds.train)) == 3

    with pytest.raises(ValueError, match=r"1 camera\(s\): camera-style transfer needs at least 2 .*\(\?P<camid>"):
        write_fakes(load_dataset("folder", root).train, tmp_path / "fakes")
    jpg(root / "c" / "x_cam1.jpg")
    with pytest.raises(ValueError, match=r"a/x_cam1.jpg and .*c/x_cam1.jpg share the stem 'x_cam1'"):
        write_fakes(load_dataset("folder", root, pattern=r"_cam(?P<camid>\d)").train, tmp_path / "fakes")


def test_tracklets_of_your_own(tmp_path):
    """`tracklets`: every folder of frames is one tracklet (a MARS tracklet name, several to a folder), frames in
    name order, unlabeled, camera 0, training only; camstyle's output under the root is not read."""
    from ureid.config import CONFIG_DIR, load_config
    from ureid.data.records import UNKNOWN_PID

    root = tmp_path / "tracks"
    for f in ["cam1/t2/f010.jpg", "cam1/t2/f002.jpg", "cam1/t1/f001.jpg", "mars/0001C1T0001F002.jpg",
              "mars/0001C1T0001F001.jpg", "mars/0001C1T0002F001.jpg", "bounding_box_train_camstyle/x_fake_c1.jpg"]:
        jpg(root / f)
    ds = load_dataset("tracklets", root)
    assert ds.is_video and ds.query == [] and ds.gallery == []
    assert [[Path(p).relative_to(root).as_posix() for p in r.paths] for r in ds.train] == [
        ["cam1/t1/f001.jpg"], ["cam1/t2/f002.jpg", "cam1/t2/f010.jpg"],
        ["mars/0001C1T0001F001.jpg", "mars/0001C1T0001F002.jpg"], ["mars/0001C1T0002F001.jpg"]]
    assert {(r.pid, r.camid) for r in ds.train} == {(UNKNOWN_PID, 0)}
    assert "train         4 records unlabeled   1 cameras" in ds.summary()
    assert load_config(CONFIG_DIR / "buc_video_cpu.yaml", ["data.name=tracklets", f"data.root={root}"]).data.is_video
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"tracklets: no frame under .*empty"):
        load_dataset("tracklets", tmp_path / "empty")


def test_tracklets_cameras_from_a_path_pattern(tmp_path, caplog, capsys):
    """`tracklets` with a pattern: each tracklet's camera from its first frame's path below the root (a
    tracker's per-camera folders, or MARS names), numbered in sorted order; an unmatched tracklet is named in a
    warning and left out; a pattern without camid, or with pid, is refused; so is one nothing matches."""
    import logging

    from ureid.config import CONFIG_DIR, load_config

    root = tmp_path / "tracks"
    for f in ["cam10/t1/f001.jpg", "cam2/t1/f001.jpg", "cam2/t2/f001.jpg", "cam2/t2/f002.jpg", "other/t9/f001.jpg"]:
        jpg(root / f)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("tracklets", root, pattern=r"^cam(?P<camid>\d+)/")
    got = [(Path(r.paths[0]).relative_to(root).as_posix(), len(r.paths), r.camid) for r in ds.train]
    assert got == [("cam10/t1/f001.jpg", 1, 1), ("cam2/t1/f001.jpg", 1, 0), ("cam2/t2/f001.jpg", 2, 0)]
    assert "1 tracklet(s) do not match pattern" in caplog.text and "other/t9/f001.jpg" in caplog.text
    assert "2 cameras" in ds.summary()
    from ureid.cli import main

    capsys.readouterr()
    assert main(["data", "info", "--format", "tracklets", "--root", str(root), "--pattern", r"^cam(?P<camid>\d+)/"]) == 0
    # the cameras as the paths name them (camid 0 and 1 were all it said: which folder was which?)
    assert "  train   per camera: 2: 2, 10: 1\n" in capsys.readouterr().out
    mars = tmp_path / "mars"
    for f in ["a/0001C1T0001F001.jpg", "a/0001C1T0001F002.jpg", "a/0001C3T0002F001.jpg", "b/0002C3T0001F001.jpg"]:
        jpg(mars / f)
    assert [r.camid for r in load_dataset("tracklets", mars, pattern=r"C(?P<camid>\d+)T").train] == [0, 1, 1]
    for bad, says in ((r"cam\d+", "needs a named group"), (r"(?P<pid>\d+)C(?P<camid>\d)", "and no"),
                      (r"cam(?P<camid>[", "not a valid regular expression")):
        with pytest.raises(ValueError, match=re.escape(says)):
            load_dataset("tracklets", root, pattern=bad)
    with pytest.raises(ValueError, match=r"no tracklet under .* matches pattern 'zz.*' \(e\.g\. cam10/t1/f001\.jpg\)"):
        load_dataset("tracklets", root, pattern=r"zz(?P<camid>\d)")
    cfg = load_config(CONFIG_DIR / "buc_video_cpu.yaml",
                      ["data.name=tracklets", f"data.root={root}", r"data.pattern=^cam(?P<camid>\d+)/"])
    from ureid.data.run_data import load_split_dataset

    assert [r.camid for r in load_split_dataset(cfg.data).train] == [1, 0, 0]


def test_guess_format_reads_each_published_layout_and_the_refusal_says_it(tmp_path, capsys):
    """A folder's format from its layout: `ureid data info` without --format, and the run's refusal to write the
    synthetic default into a dataset whose data.name was left at the default."""
    from ureid.cli import main
    from ureid.config import DataConfig
    from ureid.data.formats import guess_format
    from ureid.data.run_data import ensure_synthetic

    duke = tmp_path / "duke"
    for split, n in (("bounding_box_train", "0001_c2_f0046182.jpg"), ("bounding_box_train", "0001_c8_f0000001.jpg"),
                     ("bounding_box_test", "0005_c1_f0000002.jpg"), ("query", "0005_c7_f0000004.jpg")):
        jpg(duke / "DukeMTMC-reID" / split / n)
    dv = tmp_path / "dv" / "DukeMTMC-VideoReID"
    for split, rel in (("train", "0001/0001/0001_C6_F0001_X1.jpg"), ("query", "0005/0003/0005_C1_F0001_X1.jpg"),
                       ("gallery", "0005/0004/0005_C3_F0001_X1.jpg")):
        jpg(dv / split / rel)
    jpg(tmp_path / "crops" / "a" / "x.png")
    roots = {"market1501": market(tmp_path / "m" / "Market-1501-v15.09.15").parent, "dukemtmc": duke,
             "msmt17": msmt(tmp_path / "ms"), "cuhk03": cuhk03(tmp_path / "c", "detected"), "mars": mars(tmp_path / "mars"),
             "dukevideo": dv.parent, "folder": tmp_path / "crops"}
    for name, root in roots.items():
        guess = guess_format(root)
        assert guess is not None and guess[0] == name, (name, guess)
        load_dataset(name, root, cuhk03_protocol="detected")  # the guess reads
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("no image")
    assert [guess_format(tmp_path / d) for d in ("empty", "text", "nope")] == [None, None, None]

    capsys.readouterr()
    assert main(["data", "info", "--root", str(duke)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("format dukemtmc, guessed from ") and "0001_c2_f0046182.jpg" in out and "train" in out
    assert main(["data", "info", str(duke)]) == 0  # the folder as the positional argument reads the same
    timing = re.compile(r"read in \S+ s")
    assert timing.sub("", capsys.readouterr().out) == timing.sub("", out)
    for argv, said in ((["data", "info"], "the dataset folder is required: ureid data info DIR"),
                       (["data", "info", str(duke), "--root", str(tmp_path / "m")], "two dataset folders")):
        with pytest.raises(SystemExit):
            main(argv)
        assert said in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"text holds no image; --format is one of cuhk03, "):
        main(["data", "info", "--root", str(tmp_path / "text")])
    # the camera-style commands guess among the layouts they read
    assert main(["data", "camstyle", "--root", str(duke), "--out", str(tmp_path / "fakes")]) == 0
    assert capsys.readouterr().out.startswith("format dukemtmc, guessed from ")
    with pytest.raises(SystemExit, match=r"ureid data camstyle: .*mars looks like mars \(.*\); --format is one of "
                                         r"dukemtmc, folder, market1501$"):
        main(["data", "camstyle", "--root", str(roots["mars"])])

    # data.name left at 'synthetic' with data.root at a real dataset: refused, naming the format that reads it
    with pytest.raises(FileExistsError, match=r"data.root=.*holds no synthetic dataset .*It looks like dukemtmc "
                                              r"\(.*bounding_box_train/ .*\): --set data.name=dukemtmc"):
        ensure_synthetic(DataConfig(root=str(duke)))
    with pytest.raises(FileExistsError, match=r"It holds no image; to read a dataset, set data.name to its format"):
        ensure_synthetic(DataConfig(root=str(tmp_path / "text")))
    assert not (duke / "manifest.json").exists() and sorted(p.name for p in duke.iterdir()) == ["DukeMTMC-reID"]


def test_a_run_says_what_it_trains_on():
    """The run's data line, printed before the first stage: the format (a synthetic default written now says
    so), the training set and its cameras, camstyle's fakes apart, and whether stages get an mAP."""
    from ureid.config import CONFIG_DIR, load_config
    from ureid.methods import RunData
    from ureid.runtime.experiment import _data_line

    cfg = load_config(CONFIG_DIR / "camstyle_cpu.yaml", ["data.root=/data/x"], check_paths=False)
    real = [Record((f"{i}.jpg",), -1, i % 3) for i in range(1200)]
    fakes = [Record((f"f{i}.jpg",), -1, 0, is_fake=True) for i in range(40)]
    q = [Record(("q.jpg",), 1, 0)]
    line = _data_line(cfg, RunData(train=real + fakes, query=q, gallery=q * 3, num_real=1200), generated=True)
    assert line == ("data: synthetic (market1501 layout, generated now) at /data/x: 1,200 training images from 3 "
                    "cameras (+40 camera-style fakes); 1 query, 3 gallery images (mAP per stage)")
    video = load_config(CONFIG_DIR / "buc_video_cpu.yaml", ["data.name=tracklets", "data.root=/v"], check_paths=False)
    line = _data_line(video, RunData(train=real[:1], query=[], gallery=[], num_real=1), generated=False)
    assert line == "data: tracklets at /v: 1 training tracklet from 1 camera; no labeled query/gallery, so no mAP per stage"


def test_hidden_files_and_folders_are_not_crops(tmp_path, caplog):
    """macOS leaves `._name.jpg` resource forks beside every image copied to a FAT/exFAT drive, Jupyter
    `.ipynb_checkpoints/` folders: a folder of crops read them as images (a `._x.jpg` failed the run as
    unreadable). Hidden files and folders are left out, as they already were from the unread-file warning;
    the images and the warning come from one walk of the tree."""
    root = tmp_path / "crops"
    jpg(root / "cam1" / "a.jpg")
    jpg(root / "b.png")
    (root / "cam1" / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    jpg(root / ".ipynb_checkpoints" / "b-checkpoint.png")
    (root / "notes.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="ureid.data.formats"):
        ds = load_dataset("folder", root)
    assert sorted(Path(r.path).relative_to(root).as_posix() for r in ds.train) == ["b.png", "cam1/a.jpg"]
    assert "1 file(s) under" in caplog.text and "notes.txt" in caplog.text and "._a" not in caplog.text
    # a camera folder linked in from elsewhere (shared storage) is read; a link back up the tree ends
    jpg(tmp_path / "shared" / "cam2" / "c.jpg")
    (root / "cam2").symlink_to(tmp_path / "shared" / "cam2")
    (root / "cam1" / "up").symlink_to(root)
    ds = load_dataset("folder", root)
    assert [Path(r.path).relative_to(root).as_posix() for r in ds.train] == ["b.png", "cam1/a.jpg", "cam2/c.jpg"]
