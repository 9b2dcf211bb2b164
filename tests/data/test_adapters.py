"""Dataset adapters: layouts, splits, ids and the raw-value -> train-id tables on tiny fake trees."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.errors import PipelineError
from pipeline.data.adapters import (ADAPTERS, CAMVID_CLASSES, CamvidOptions, FolderOptions, build_dataset,
                                    parse_options)
from pipeline.data.cityscapes import (CITYSCAPES_CLASSES, CITYSCAPES_LABEL_TO_TRAIN, CITYSCAPES_PALETTE,
                                      CITYSCAPES_TRAIN_TO_LABEL, CityscapesOptions)
from pipeline.data.manifest import IGNORE_INDEX, INVALID, read_mask
from pipeline.data.vspw import VSPWOptions

# The official Cityscapes table, written out from the spec rather than from the module.
OFFICIAL_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


def png(path: Path, array) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def rgb(h=4, w=6, value=100) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


def build(name, root, tmp_path, **options):
    opts = parse_options(name, options)
    return build_dataset(name, root=root, work_dir=tmp_path / "work", options=opts)


# ----------------------------------------------------------------------------- registry
def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(PipelineError) as err:
        build_dataset("kitti", root=tmp_path, work_dir=tmp_path, options=None)
    for name in ADAPTERS:
        assert name in str(err.value)


def test_option_typo_is_named():
    with pytest.raises(PipelineError, match=r"prepare\.camvid\.train_split"):
        parse_options("camvid", {"train_split": ["train"]})


def test_missing_or_empty_root(tmp_path):
    with pytest.raises(PipelineError, match="prepare.root is empty"):
        build("camvid", "", tmp_path)
    with pytest.raises(PipelineError, match="nowhere.*not found"):
        build("camvid", tmp_path / "nowhere", tmp_path)


# ----------------------------------------------------------------------------- cityscapes
LABEL_MASK = np.array([[0, 7, 8, 26], [33, 5, 255, 24]], dtype=np.uint8)
EXPECTED_TRAIN = np.array([[255, 0, 1, 13], [18, 255, 255, 11]], dtype=np.uint8)


def cityscapes_tree(root: Path, train_ids: bool = False) -> None:
    items = [("train", "aachen", "000000", "000019"), ("train", "aachen", "000001", "000019"),
             ("val", "frankfurt", "000000", "000294"), ("test", "berlin", "000000", "000019")]
    for split, city, seq, frame in items:
        stem = f"{city}_{seq}_{frame}"
        png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb(2, 4))
        png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", LABEL_MASK)  # test: dummy
        if train_ids:
            png(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", EXPECTED_TRAIN)


def test_cityscapes_tables_match_the_official_list():
    assert list(CITYSCAPES_TRAIN_TO_LABEL) == OFFICIAL_LABEL_IDS
    assert CITYSCAPES_LABEL_TO_TRAIN == {label: i for i, label in enumerate(OFFICIAL_LABEL_IDS)}
    assert len(CITYSCAPES_CLASSES) == len(CITYSCAPES_PALETTE) == 19
    assert CITYSCAPES_CLASSES[0] == "road" and CITYSCAPES_CLASSES[-1] == "bicycle"


def test_cityscapes_label_ids_are_mapped(tmp_path):
    cityscapes_tree(tmp_path / "cs")
    frames, classes = build("cityscapes", tmp_path / "cs", tmp_path)
    assert classes.num_classes == 19 and classes.dataset == "cityscapes"
    lut = classes.lut_array()
    for label in range(34):
        expected = OFFICIAL_LABEL_IDS.index(label) if label in OFFICIAL_LABEL_IDS else IGNORE_INDEX
        assert lut[label] == expected
    assert lut[34] == INVALID and lut[255] == IGNORE_INDEX
    by_id = {f.id: f for f in frames}
    assert set(by_id) == {"aachen_000000_000019", "aachen_000001_000019", "frankfurt_000000_000294",
                          "berlin_000000_000019"}
    first = by_id["aachen_000000_000019"]
    assert (first.video, first.frame, first.split) == ("aachen_000000", 19, "train")
    assert first.mask.endswith("_gtFine_labelIds.png")
    assert by_id["frankfurt_000000_000294"].split == "train"  # val joins train for k-fold CV
    test = by_id["berlin_000000_000019"]
    assert test.split == "test" and test.mask is None  # dummy test labels are not used
    np.testing.assert_array_equal(read_mask(first.mask, lut), EXPECTED_TRAIN)
    png(Path(first.mask), np.full((2, 4), 40))
    with pytest.raises(PipelineError, match="label value 40"):
        read_mask(first.mask, lut)


def test_cityscapes_label_train_ids_variant(tmp_path):
    cityscapes_tree(tmp_path / "cs", train_ids=True)
    frames, classes = build("cityscapes", tmp_path / "cs", tmp_path)
    lut = classes.lut_array()
    assert lut[:19].tolist() == list(range(19)) and lut[19] == INVALID and lut[255] == IGNORE_INDEX
    train = [f for f in frames if f.split == "train"]
    assert train and all(f.mask.endswith("_gtFine_labelTrainIds.png") for f in train)
    np.testing.assert_array_equal(read_mask(train[0].mask, lut), EXPECTED_TRAIN)
    # Forcing labelIds ignores the trainId files.
    frames, classes = build("cityscapes", tmp_path / "cs", tmp_path, label_kind="labelIds")
    assert all(f.mask.endswith("_labelIds.png") for f in frames if f.mask)
    with pytest.raises(PipelineError, match="label_kind"):
        build("cityscapes", tmp_path / "cs", tmp_path, label_kind="trainIds")


def test_cityscapes_empty_tree_names_the_layout(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "cs" / "leftImg8bit" / split).mkdir(parents=True)
    with pytest.raises(PipelineError, match="no frames found.*leftImg8bit"):
        build("cityscapes", tmp_path / "cs", tmp_path)


def test_cityscapes_missing_train_split_is_named(tmp_path):
    """A split of train_splits without its folder would drop its frames unseen."""
    cityscapes_tree(tmp_path / "cs")
    shutil.rmtree(tmp_path / "cs" / "leftImg8bit" / "val")
    with pytest.raises(PipelineError, match=r"leftImg8bit/val: Cityscapes split folder not found"):
        build("cityscapes", tmp_path / "cs", tmp_path)
    frames, _ = build("cityscapes", tmp_path / "cs", tmp_path, train_splits=["train"])
    assert {f.split for f in frames} == {"train", "test"}
    shutil.rmtree(tmp_path / "cs" / "leftImg8bit" / "test")  # the test split stays optional
    assert {f.split for f in build("cityscapes", tmp_path / "cs", tmp_path,
                                   train_splits=["train"])[0]} == {"train"}


# ----------------------------------------------------------------------------- vspw
def vspw_video(root: Path, video: str, n: int, masks: bool = True, value=None) -> None:
    for i in range(1, n + 1):
        Image.fromarray(rgb(3, 5)).save(_mk(root / "data" / video / "origin" / f"{i:08d}.jpg"))
        if masks:
            png(root / "data" / video / "mask" / f"{i:08d}.png",
                value if value is not None else np.array([[0, 1, 2, 124, 255]] * 3))


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_vspw_mapping_and_split_files(tmp_path):
    root = tmp_path / "vspw"
    vspw_video(root, "1001_a", 2)
    vspw_video(root, "1002_b", 3)
    vspw_video(root, "2001_c", 2, masks=False)
    vspw_video(root, "9999_unlisted", 1)
    (root / "train.txt").write_text("1001_a\n")
    (root / "val.txt").write_text("1002_b\n\n")
    (root / "test.txt").write_text("2001_c\n")
    (root / "label_num_dic_final.json").write_text(json.dumps({"others": 0, "wall": 1, "ceiling": 2}))
    frames, classes = build("vspw", root, tmp_path)
    assert classes.num_classes == 124
    assert classes.names[:3] == ["wall", "ceiling", "class_3"]
    lut = classes.lut_array()
    assert lut[0] == IGNORE_INDEX and lut[255] == IGNORE_INDEX and lut[125] == INVALID
    assert lut[1:125].tolist() == list(range(124))
    assert {f.video for f in frames} == {"1001_a", "1002_b", "2001_c"}
    assert {f.video for f in frames if f.split == "train"} == {"1001_a", "1002_b"}
    test = [f for f in frames if f.split == "test"]
    assert len(test) == 2 and all(f.mask is None for f in test)
    first = next(f for f in frames if f.id == "1001_a_00000001")
    assert first.frame == 1
    np.testing.assert_array_equal(read_mask(first.mask, lut)[0], [255, 0, 1, 123, 255])


def test_vspw_without_split_files_puts_everything_in_train(tmp_path):
    root = tmp_path / "vspw"
    vspw_video(root, "v1", 1)
    vspw_video(root, "v2", 2)
    frames, classes = build("vspw", root, tmp_path)
    assert len(frames) == 3 and {f.split for f in frames} == {"train"}
    assert classes.names[0] == "class_1"


def test_vspw_listed_video_missing_is_named(tmp_path):
    root = tmp_path / "vspw"
    vspw_video(root, "v1", 1)
    (root / "train.txt").write_text("v1\nghost\n")
    with pytest.raises(PipelineError, match="ghost"):
        build("vspw", root, tmp_path, train_splits=["train"])


def test_vspw_missing_list_of_a_train_split_is_named(tmp_path):
    """val.txt renamed: its videos would silently leave training."""
    root = tmp_path / "vspw"
    vspw_video(root, "v1", 1)
    vspw_video(root, "v2", 1)
    (root / "train.txt").write_text("v1\n")
    (root / "val.renamed").write_text("v2\n")
    with pytest.raises(PipelineError, match=r"val\.txt: list file of split 'val' not found"):
        build("vspw", root, tmp_path)
    (root / "val.txt").write_text("v2\n")  # no test.txt: the test list stays optional
    assert {f.video for f in build("vspw", root, tmp_path)[0]} == {"v1", "v2"}


def test_vspw_dangling_image_or_mask_symlink_is_named(tmp_path):
    root = tmp_path / "vspw"
    vspw_video(root, "v1", 2)
    (root / "data" / "v1" / "origin" / "00000003.jpg").symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(PipelineError, match=r"origin/00000003\.jpg: dangling symlink"):
        build("vspw", root, tmp_path)


# ----------------------------------------------------------------------------- folder
def test_folder_pairs_by_stem_and_parses_video_frame(tmp_path):
    root = tmp_path / "ds"
    for stem, ext in [("street_001", ".png"), ("street_002", ".jpg"), ("park-7", ".jpeg"), ("loner", ".png")]:
        Image.fromarray(rgb()).save(_mk(root / "images" / f"{stem}{ext}"))
        png(root / "masks" / f"{stem}.png", np.zeros((4, 6)))
    Image.fromarray(rgb()).save(_mk(root / "test_images" / "t_1.png"))
    Image.fromarray(rgb()).save(_mk(root / "test_images" / "t_2.png"))
    png(root / "test_masks" / "t_2.png", np.zeros((4, 6)))
    (root / "images" / "notes.txt").write_text("not an image")
    frames, classes = build("folder", root, tmp_path, num_classes=3, test_images="test_images",
                            test_masks="test_masks")
    by_id = {f.id: f for f in frames}
    assert set(by_id) == {"street_001", "street_002", "park-7", "loner", "t_1", "t_2"}
    assert (by_id["street_002"].video, by_id["street_002"].frame) == ("street", 2)
    assert (by_id["park-7"].video, by_id["park-7"].frame) == ("park", 7)
    assert (by_id["loner"].video, by_id["loner"].frame) == ("loner", 0)
    assert by_id["street_002"].mask == str((root / "masks" / "street_002.png").resolve())
    assert by_id["t_1"].split == "test" and by_id["t_1"].mask is None
    assert by_id["t_2"].mask is not None
    assert classes.names == ["class_0", "class_1", "class_2"]
    lut = classes.lut_array()
    assert lut[:3].tolist() == [0, 1, 2] and lut[3] == INVALID and lut[255] == IGNORE_INDEX
    # A custom pattern: the video is the first two characters.
    frames, _ = build("folder", root, tmp_path, class_names=["a", "b"], pattern=r"^(?P<video>..)\D*(?P<frame>\d+)?$")
    assert {f.video for f in frames} >= {"st", "pa", "lo"}


def test_folder_pattern_and_class_errors(tmp_path):
    root = tmp_path / "ds"
    Image.fromarray(rgb()).save(_mk(root / "images" / "a_1.png"))
    with pytest.raises(PipelineError, match="pattern.*valid regex"):
        build("folder", root, tmp_path, num_classes=2, pattern="(")
    with pytest.raises(PipelineError, match="named groups"):
        build("folder", root, tmp_path, num_classes=2, pattern=r"^(?P<video>.+)$")
    with pytest.raises(PipelineError, match="class_names.*num_classes"):
        build("folder", root, tmp_path)
    with pytest.raises(PipelineError, match="void_values"):
        build("folder", root, tmp_path, num_classes=2, void_values=[1])


def test_folder_dangling_symlinks_are_named_not_dropped(tmp_path):
    root = tmp_path / "ds"
    for stem in ("v_1", "v_2"):
        Image.fromarray(rgb()).save(_mk(root / "images" / f"{stem}.png"))
        png(root / "masks" / f"{stem}.png", np.zeros((4, 6)))
    (root / "images" / "v_3.png").symlink_to(tmp_path / "moved" / "v_3.png")
    with pytest.raises(PipelineError, match=r"images/v_3\.png: dangling symlink .*moved/v_3\.png"):
        build("folder", root, tmp_path, num_classes=2)
    (root / "images" / "v_3.png").unlink()
    Image.fromarray(rgb()).save(_mk(root / "test_images" / "t_1.png"))
    _mk(root / "test_masks" / "t_1.png").symlink_to(tmp_path / "gone.png")  # optional, yet named
    with pytest.raises(PipelineError, match=r"test_masks/t_1\.png: dangling symlink"):
        build("folder", root, tmp_path, num_classes=2, test_images="test_images",
              test_masks="test_masks")


def test_camvid_dangling_image_symlink_is_named(tmp_path):
    root = tmp_path / "camvid"
    Image.fromarray(rgb()).save(_mk(root / "train" / "0001TP_000001.png"))
    png(root / "trainannot" / "0001TP_000001.png", np.zeros((4, 6)))
    (root / "train" / "0001TP_000002.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(PipelineError, match=r"train/0001TP_000002\.png: dangling symlink"):
        build("camvid", root, tmp_path, train_splits=["train"])


def test_folder_duplicate_stem_is_an_error(tmp_path):
    root = tmp_path / "ds"
    Image.fromarray(rgb()).save(_mk(root / "images" / "a_1.png"))
    Image.fromarray(rgb()).save(_mk(root / "images" / "a_1.jpg"))
    with pytest.raises(PipelineError, match="duplicate frame id 'a_1'"):
        build("folder", root, tmp_path, num_classes=2)


def test_options_dataclasses_are_registered():
    assert ADAPTERS["folder"].options is FolderOptions
    assert ADAPTERS["camvid"].options is CamvidOptions
    assert ADAPTERS["cityscapes"].options is CityscapesOptions
    assert ADAPTERS["vspw"].options is VSPWOptions


# ----------------------------------------------------------------------------- camvid
def test_camvid_layout_on_a_fake_tree(tmp_path):
    root = tmp_path / "camvid"
    for split, stem in [("train", "0001TP_006690"), ("val", "0016E5_07959"), ("train", "0006R0_f00930"),
                        ("test", "Seq05VD_f00000"), ("test", "Seq05VD_f00030")]:
        Image.fromarray(rgb()).save(_mk(root / split / f"{stem}.png"))
        if stem != "Seq05VD_f00030":
            png(root / f"{split}annot" / f"{stem}.png", np.full((4, 6), 11))
    frames, classes = build("camvid", root, tmp_path)
    by_id = {f.id: f for f in frames}
    assert (by_id["0006R0_f00930"].video, by_id["0006R0_f00930"].frame) == ("0006R0", 930)
    assert by_id["0016E5_07959"].split == "train"
    assert by_id["Seq05VD_f00000"].split == "test" and by_id["Seq05VD_f00000"].mask is not None
    assert by_id["Seq05VD_f00030"].mask is None
    assert (read_mask(by_id["0001TP_006690"].mask, classes.lut_array()) == IGNORE_INDEX).all()
    assert [f.split for f in frames] == ["train"] * 3 + ["test"] * 2  # manifest order: train first



def test_camvid_val_as_the_scored_test_split(tmp_path):
    root = tmp_path / "camvid"
    for split, stem in [("train", "0001TP_006690"), ("val", "0016E5_07959")]:
        Image.fromarray(rgb()).save(_mk(root / split / f"{stem}.png"))
        png(root / f"{split}annot" / f"{stem}.png", np.full((4, 6), 3))
    frames, _ = build("camvid", root, tmp_path, train_splits=["train"], test_splits=["val"])
    assert [(f.id, f.split, f.mask is not None) for f in frames] == [
        ("0001TP_006690", "train", True), ("0016E5_07959", "test", True)]
    with pytest.raises(PipelineError, match=r"\['val'\] are in both"):
        build("camvid", root, tmp_path, train_splits=["train", "val"], test_splits=["val"])

@pytest.mark.camvid
def test_camvid_real_copy(camvid_root):
    frames, classes = build_dataset("camvid", root=camvid_root, work_dir=Path("unused"),
                                    options=parse_options("camvid", {}))
    assert len(frames) == 468 and {f.split for f in frames} == {"train"}
    assert {f.video for f in frames} == {"0001TP", "0006R0", "0016E5"}
    assert classes.names == list(CAMVID_CLASSES) and classes.num_classes == 11
    lut = classes.lut_array()
    assert lut[11] == IGNORE_INDEX and lut[255] == IGNORE_INDEX and lut[12] == INVALID
    frame = frames[0]
    raw = np.asarray(Image.open(frame.mask))
    mapped = read_mask(frame.mask, lut)
    assert (raw == 11).any() and (mapped[raw == 11] == IGNORE_INDEX).all()
    assert mapped[raw != 11].max() < 11
    assert all(Path(f.image).is_file() and Path(f.mask).is_file() for f in frames)


# ----------------------------------------------------------------------------- rle_csv
def rle_tree(root: Path, masks: dict, *, order: str = "column", skip=(IGNORE_INDEX,),
             csv: str = "train.csv") -> None:
    """``root/images/<id>.png`` and ``root/<csv>`` holding ``masks`` (id -> HxW labels) as RLE rows."""
    from pipeline.core.rle import rle_rows, rle_table_text

    rows = []
    for fid, labels in masks.items():
        png(root / "images" / f"{fid}.png", rgb(*labels.shape))
        rows += [(fid, c, r) for c, r in rle_rows(labels, order=order, skip=skip)]
    (root / csv).write_text(rle_table_text(rows))


@pytest.mark.parametrize("order", ["column", "row"])
def test_rle_csv_prepares_the_same_masks(tmp_path, order):
    from pipeline.data.manifest import read_manifest
    from pipeline.data.preparation import prepare_dataset

    rng = np.random.default_rng(1)
    masks = {f"vid{v}_{t:03d}": rng.integers(0, 3, (5, 7)).astype(np.uint8) for v in range(2) for t in range(3)}
    masks["vid0_001"][0, :] = IGNORE_INDEX  # void: no row covers it
    rle_tree(tmp_path / "ds", masks, order=order)
    options = parse_options("rle_csv", {"order": order, "class_names": ["a", "b", "c"]})
    result = prepare_dataset(dataset="rle_csv", root=tmp_path / "ds", out=tmp_path / "data", options=options)
    frames = read_manifest(tmp_path / "data" / "manifest.csv")
    assert [f.id for f in frames] == sorted(masks) and {f.video for f in frames} == {"vid0", "vid1"}
    assert result.classes.dataset == "rle_csv" and result.classes.names == ["a", "b", "c"]
    lut = result.classes.lut_array()
    for frame in frames:
        assert Path(frame.mask).is_relative_to(tmp_path / "data" / "rle_csv" / "train")
        np.testing.assert_array_equal(read_mask(frame.mask, lut), masks[frame.id])


def test_rle_csv_background_class_and_test_split(tmp_path):
    root = tmp_path / "ds"
    labels = np.array([[0, 1, 1], [0, 0, 2]], dtype=np.uint8)
    rle_tree(root, {"a_000": labels, "b_000": np.zeros((2, 3), np.uint8)}, skip=(0,))  # no row = class 0
    png(root / "test" / "t_000.png", rgb(2, 3))
    png(root / "test" / "t_001.png", rgb(2, 3))
    (root / "test.csv").write_text("id,class,rle\nt_000.png,2,1 2\n")  # a file name works as id too
    frames, classes = build("rle_csv", root, tmp_path, num_classes=3, background=0, test_images="test",
                            test_csv="test.csv")
    by_id = {f.id: f for f in frames}
    np.testing.assert_array_equal(read_mask(by_id["a_000"].mask, classes.lut_array()), labels)
    assert not read_mask(by_id["b_000"].mask, classes.lut_array()).any()  # no row at all: background
    np.testing.assert_array_equal(read_mask(by_id["t_000"].mask, classes.lut_array()), [[2, 0, 0], [2, 0, 0]])
    assert by_id["t_001"].split == "test" and by_id["t_001"].mask is not None


@pytest.mark.parametrize("csv,needle", [
    ("id,class,rle\na_000,1,1 2\nzz_009,1,1 1\n", "train.csv line 3: image 'zz_009' not found in "),
    ("id,class,rle\na_000,3,1 2\n", r"train.csv line 2: class 3 is not a class (0..2)"),
    ("id,class,rle\na_000,1,5 3\n", "train.csv line 2: rle run '5 3' ends at pixel 7, outside the image's 6 pixels"),
    ("id,class,rle\na_000,1,1 3\na_000,2,3 1\n", "train.csv line 3: class 2 and class 1 (line 2) both cover "
                                                 "pixel 3 of image 'a_000'"),
    ("id,class,rle\na_000,1,1 3 4\n", "train.csv line 2: malformed rle: 3 numbers"),
    ("image,label\na_000,1\n", "train.csv: header is 'image,label', expected 'id,class,rle'"),
])
def test_rle_csv_bad_rows_are_one_line_errors(tmp_path, csv, needle):
    root = tmp_path / "ds"
    png(root / "images" / "a_000.png", rgb(2, 3))
    (root / "train.csv").write_text(csv)
    with pytest.raises(PipelineError) as err:
        build("rle_csv", root, tmp_path, num_classes=3)
    assert needle in str(err.value) and str(root / "train.csv") in str(err.value)
    assert "\n" not in str(err.value)


def test_rle_csv_option_errors(tmp_path):
    root = tmp_path / "ds"
    rle_tree(root, {"a_000": np.zeros((2, 3), np.uint8)})
    for options, needle in [({"num_classes": 3, "order": "col"}, "prepare.rle_csv.order: unknown rle order 'col'"),
                            ({"num_classes": 3, "background": 3}, "prepare.rle_csv.background: 3 must be 255"),
                            ({}, "prepare.rle_csv: set class_names"),
                            ({"num_classes": 3, "csv": "nope.csv"}, "nope.csv: RLE CSV not found "
                                                                    "(prepare.rle_csv.csv)")]:
        with pytest.raises(PipelineError, match=re.escape(needle)):
            build("rle_csv", root, tmp_path, **options)
    with pytest.raises(PipelineError, match=r"prepare\.rle_csv\.ordr"):
        parse_options("rle_csv", {"ordr": "row"})
