"""The evaluate stage on a tiny manifest: perfect and partial predictions, and every input error."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.errors import run_cli
from pipeline.data.manifest import ClassInfo, Frame, default_palette, write_classes, write_manifest
from pipeline.evaluate import main
from pipeline.evaluation.scoring import evaluate_predictions

NUM_CLASSES = 3
SHAPE = (8, 10)  # H x W


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode="L").save(path)


@pytest.fixture
def dataset(tmp_path):
    """Test videos of 18 and 5 labelled frames (+ one unlabelled), a train video; masks slowly change."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    frames, masks = [], {}
    for video, n, split in (("v1", 18, "test"), ("v2", 5, "test"), ("t1", 4, "train")):
        mask = rng.integers(0, NUM_CLASSES, size=SHAPE).astype(np.uint8)
        mask[0, :3] = 255  # a few void pixels
        for i in range(n):
            mask = mask.copy()
            mask[rng.integers(1, SHAPE[0]), rng.integers(0, SHAPE[1])] = rng.integers(0, NUM_CLASSES)
            fid = f"{video}_{i:03d}"
            _save(data / "masks" / f"{fid}.png", mask)
            masks[fid] = mask
            frames.append(Frame(id=fid, image=str(data / "images" / f"{fid}.jpg"),
                                mask=str(data / "masks" / f"{fid}.png"), video=video, frame=i,
                                split=split, height=SHAPE[0], width=SHAPE[1]))
    frames.append(Frame(id="v2_unlabelled", image=str(data / "images" / "u.jpg"), mask=None,
                        video="v2", frame=99, split="test", height=SHAPE[0], width=SHAPE[1]))
    write_manifest(data / "manifest.csv", frames[::-1])  # order on disk must not matter
    write_classes(data / "classes.json", ClassInfo(names=["a", "b", "c"],
                                                   palette=default_palette(NUM_CLASSES)))
    test_masks = {k: v for k, v in masks.items() if not k.startswith("t1")}
    return tmp_path, test_masks


def _write_preds(folder: Path, masks: dict) -> None:
    for fid, mask in masks.items():
        _save(folder / f"{fid}.png", np.where(mask == 255, 0, mask))


def _run(tmp_path, *args):
    argv = [*args, "--manifest", str(tmp_path / "data" / "manifest.csv"),
            "--params", str(tmp_path / "no_params.yaml")]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    return exit_info.value.code


def test_perfect_predictions(dataset, capsys):
    tmp_path, masks = dataset
    preds = tmp_path / "preds"
    _write_preds(preds, masks)
    assert _run(tmp_path, str(preds)) == 0
    summary = json.loads((tmp_path / "preds.eval.json").read_text())
    assert summary["mIoU"] == 1.0 and summary["pixel_accuracy"] == 1.0
    assert summary["mVC8"] == 1.0 and summary["mVC16"] == 1.0  # v1 has 18 > 16 frames
    assert summary["frames"] == 23 and summary["videos"] == 2 and summary["split"] == "test"
    assert summary["labelled_pixels"] == 23 * (SHAPE[0] * SHAPE[1] - 3)
    out = capsys.readouterr().out
    assert "mIoU 100.00" in out and "mVC16 100.00" in out


def test_no_prediction_value_counts_as_wrong(dataset):
    tmp_path, masks = dataset
    preds = tmp_path / "preds"
    _write_preds(preds, masks)
    _save(preds / "v2_001.png", np.full(SHAPE, 255))  # nothing predicted on one frame
    out = tmp_path / "custom.json"
    assert _run(tmp_path, str(preds), "--out", str(out)) == 0
    summary = json.loads(out.read_text())
    per_frame = SHAPE[0] * SHAPE[1] - 3
    assert summary["pixel_accuracy"] == pytest.approx(1 - per_frame / (23 * per_frame))
    assert summary["mIoU"] < 1.0
    assert not (tmp_path / "preds.eval.json").exists()


def _assert_error(tmp_path, capsys, args, *needles):
    assert _run(tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = err.strip().splitlines()[-1]  # a progress bar may precede it
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err
    assert not list(tmp_path.glob("*.json"))


def test_missing_predictions(dataset, capsys):
    tmp_path, masks = dataset
    preds = tmp_path / "preds"
    _write_preds(preds, masks)
    (preds / "v1_004.png").unlink()
    (preds / "v2_000.png").unlink()
    _assert_error(tmp_path, capsys, [str(preds)], "2 of 23", "v1_004.png")


def test_size_mismatch(dataset, capsys):
    tmp_path, masks = dataset
    preds = tmp_path / "preds"
    _write_preds(preds, masks)
    _save(preds / "v1_002.png", np.zeros((SHAPE[0], SHAPE[1] + 1)))
    _assert_error(tmp_path, capsys, [str(preds)], "v1_002.png", "8x11")


def test_bad_prediction_value(dataset, capsys):
    tmp_path, masks = dataset
    preds = tmp_path / "preds"
    _write_preds(preds, masks)
    bad = np.zeros(SHAPE)
    bad[3, 3] = 7
    _save(preds / "v2_003.png", bad)
    _assert_error(tmp_path, capsys, [str(preds)], "v2_003.png", "value 7")


def test_missing_dir_and_empty_split(dataset, capsys):
    tmp_path, masks = dataset
    _assert_error(tmp_path, capsys, [str(tmp_path / "nope")], "nope", "not found")
    preds = tmp_path / "preds"
    _write_preds(preds, masks)
    _assert_error(tmp_path, capsys, [str(preds), "--split", "val"], "manifest.csv", "'val'")


# ----------------------------------------------------------------------------- submission zips
def _write_zip(path: Path, masks: dict, fmt_name: str = "folder", drop: str | None = None) -> None:
    from pipeline.submission.formats import get_format
    from pipeline.submission.zips import png_bytes, write_zip

    fmt = get_format(fmt_name, dataset="")
    preds = {fid: np.where(mask == 255, 0, mask).astype(np.uint8) for fid, mask in masks.items()}
    preds["v1_003"] = np.roll(preds["v1_003"], 1, axis=1)  # some mistakes
    write_zip(path, sorted((f"{fid}.png", png_bytes(fmt.encode(p, num_classes=NUM_CLASSES, name=fid)))
                           for fid, p in preds.items() if fid != drop))
    for fid, p in preds.items():
        _save(path.parent / "same_as_zip" / f"{fid}.png", p)


def test_zip_scores_like_its_folder(dataset):
    tmp_path, masks = dataset
    sub = tmp_path / "sub"
    sub.mkdir()
    _write_zip(sub / "s.zip", masks)
    (sub / "s.json").write_text(json.dumps({"format": "folder"}))  # as submit.py writes it
    assert _run(tmp_path, str(sub / "s.zip")) == 0
    assert _run(tmp_path, str(sub / "same_as_zip")) == 0
    from_zip = json.loads((sub / "s.zip.eval.json").read_text())
    from_folder = json.loads((sub / "same_as_zip.eval.json").read_text())
    assert from_zip.pop("format") == "folder"
    assert from_zip.pop("sha256") == hashlib.sha256((sub / "s.zip").read_bytes()).hexdigest()
    assert from_zip.pop("predictions") != from_folder.pop("predictions")
    assert from_zip == from_folder and from_zip["mIoU"] < 1.0


def test_zip_errors(dataset, capsys):
    tmp_path, masks = dataset
    _write_zip(tmp_path / "s.zip", masks, drop="v2_004")
    _assert_error(tmp_path, capsys, [str(tmp_path / "s.zip")], "s.zip", "--format")  # no s.json
    _assert_error(tmp_path, capsys, [str(tmp_path / "s.zip"), "--format", "folder"],
                  "1 of 23", "s.zip:v2_004.png")
    _assert_error(tmp_path, capsys, [str(tmp_path / "s.zip"), "--format", "cityscapes"],
                  "'cityscapes'", "does not fit")
    _assert_error(tmp_path, capsys, [str(tmp_path / "none.zip")], "none.zip", "not found")
    _assert_error(tmp_path, capsys, [str(tmp_path / "same_as_zip"), "--format", "folder"],
                  "same_as_zip", "zip only")


def test_unlabelled_split_is_noted_when_labels_are_not_required(dataset, capsys):
    tmp_path, masks = dataset
    preds = tmp_path / "preds"
    _write_preds(preds, masks)
    params = tmp_path / "params.yaml"
    params.write_text("evaluate: {split: val, require_labels: false}\n")
    manifest = str(tmp_path / "data" / "manifest.csv")
    summary = main([str(preds), "--manifest", manifest, "--params", str(params)])
    assert summary["mIoU"] is None and summary["frames"] == 0 and "no labels" in summary["note"]
    assert json.loads((tmp_path / "preds.eval.json").read_text()) == summary
    # labelled splits are still scored, and a missing split stays an error by default
    params.write_text("evaluate: {split: test, require_labels: false}\n")
    assert main([str(preds), "--manifest", manifest, "--params", str(params)])["mIoU"] is not None


# ----------------------------------------------------------------------------- definitions
def _one_frame(tmp_path: Path, gt: np.ndarray, names: list[str]):
    _save(tmp_path / "m.png", gt)
    frame = Frame(id="f", image="", mask=str(tmp_path / "m.png"), video="v", frame=0, split="test",
                  height=gt.shape[0], width=gt.shape[1])
    return [frame], ClassInfo(names=names, palette=default_palette(len(names)))


def test_void_prediction_is_a_miss_of_the_true_class_only(tmp_path):
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = np.array([[0, 255, 1, 2], [2, 255, 255, 0]], dtype=np.uint8)
    frames, classes = _one_frame(tmp_path, gt, ["a", "b", "c"])
    summary = evaluate_predictions(frames, classes, lambda f: pred, progress=False)
    # 7 labelled pixels (the void one is dropped): class 0: TP 2, FN 1 (missed) -> 2/3;
    # class 1: TP 1, FN 1 (predicted 2) -> 1/2, no FP from the misses; class 2: TP 1, FP 1,
    # FN 1 (missed) -> 1/3. mIoU (2/3 + 1/2 + 1/3) / 3 = 1/2; the old "(gt + 1) % C" scoring
    # gave class 1 a false positive (1/3) and class 0 one too (2/4).
    per_class = {k: v["iou"] for k, v in summary["per_class"].items()}
    assert per_class == pytest.approx({"a": 2 / 3, "b": 1 / 2, "c": 1 / 3})
    assert summary["mIoU"] == pytest.approx(0.5)
    assert summary["pixel_accuracy"] == pytest.approx(4 / 7)
    assert summary["labelled_pixels"] == 7 and summary["unpredicted_pixels"] == 2
    assert summary["per_class"]["b"]["pred_pixels"] == 1  # the misses predicted nothing
    assert summary["miou_definition"] == "mean over classes with TP+FP+FN > 0"


def test_void_prediction_with_one_class_and_a_class_absent_from_gt(tmp_path):
    # one class: the miss is still wrong (there is no "other" class to blame): IoU 1/2
    frames, classes = _one_frame(tmp_path, np.zeros((1, 2)), ["only"])
    summary = evaluate_predictions(frames, classes, lambda f: np.array([[0, 255]], np.uint8),
                                   progress=False)
    assert summary["mIoU"] == pytest.approx(0.5) and summary["pixel_accuracy"] == pytest.approx(0.5)
    # issue 12's example: class 2 predicted, absent from gt -> IoU 0 counted: 50.0, not 75.0
    frames, classes = _one_frame(tmp_path, np.array([[0, 0, 1, 1]]), ["a", "b", "c"])
    summary = evaluate_predictions(frames, classes, lambda f: np.array([[0, 2, 1, 1]], np.uint8),
                                   progress=False)
    assert 100 * summary["mIoU"] == pytest.approx(50.0)


def test_definition_stated_once_in_table_and_json(dataset, capsys):
    tmp_path, masks = dataset
    _write_preds(tmp_path / "preds", masks)
    assert _run(tmp_path, str(tmp_path / "preds")) == 0
    out = capsys.readouterr().out
    assert out.count("TP+FP+FN > 0") == 1
    text = (tmp_path / "preds.eval.json").read_text()
    assert text.count("TP+FP+FN > 0") == 1 and '"miou_definition"' in text


# ----------------------------------------------------------------------------- outputs
def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_out_may_not_overwrite_an_input(dataset, capsys):
    tmp_path, masks = dataset
    sub = tmp_path / "sub"
    sub.mkdir()
    _write_zip(sub / "s.zip", masks)
    before = _files(tmp_path)
    _assert_error(tmp_path, capsys, [str(sub / "s.zip"), "--format", "folder", "--out", str(sub / "s.zip")],
                  "--out", "s.zip", "the predictions")
    manifest = tmp_path / "data" / "manifest.csv"
    link = tmp_path / "link.csv"
    link.symlink_to(manifest)
    before["link.csv"] = manifest.read_bytes()
    _assert_error(tmp_path, capsys, [str(sub / "same_as_zip"), "--out", str(link)],
                  "--out", "link.csv", "the manifest")  # through a symlink
    _assert_error(tmp_path, capsys, [str(sub / "same_as_zip"), "--out", str(sub / "same_as_zip")],
                  "the predictions")
    (sub / "s.json").write_text("{}")
    before["sub/s.json"] = b"{}"
    _assert_error(tmp_path, capsys, [str(sub / "s.zip"), "--format", "folder", "--out", str(sub / "s.json")],
                  "the submission JSON")
    assert _files(tmp_path) == before


def test_disk_full_is_one_error_line_and_no_file(dataset, capsys, monkeypatch):
    import errno

    tmp_path, masks = dataset
    _write_preds(tmp_path / "preds", masks)
    real = Path.write_bytes

    def full(self, data):
        if self.name.endswith(".tmp"):  # the atomic writer's temporary file
            real(self, data[: len(data) // 2])  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    before = _files(tmp_path)
    _assert_error(tmp_path, capsys, [str(tmp_path / "preds")], "preds.eval.json", "No space left on device")
    assert _files(tmp_path) == before  # the temporary is gone too
