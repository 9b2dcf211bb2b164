"""Stage `submit`: checked deterministic zips, the JSON beside them, previews, and every refusal."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.core.errors import PipelineError, run_cli
from pipeline.data.cityscapes import CITYSCAPES_TRAIN_TO_LABEL, cityscapes_label_lut
from pipeline.data.manifest import (ClassInfo, Frame, default_palette, identity_lut, read_classes,
                                    read_manifest, write_classes, write_manifest)
from pipeline.evaluate import main as evaluate_main
from pipeline.submission.formats import get_format
from pipeline.submission.packing import PREVIEW_GAP, PREVIEW_MIN_HEIGHT, preview_frames, render_preview
from pipeline.submission.zips import check_zip
from pipeline.submit import main

H, W = 8, 12


def _save(path: Path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def make_project(root: Path, dataset: str = "demo", num_classes: int = 4, videos: int = 3,
                 frames: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """``root/data`` (test videos with masks, one train video) and ``root/pred`` holding the train
    ids of every test frame: the ground truth with a few pixels changed, no void. Returns the
    predictions by frame id."""
    rng = np.random.default_rng(seed)
    data, pred = root / "data", root / "pred"
    lut = cityscapes_label_lut() if dataset == "cityscapes" else identity_lut(num_classes)
    stored = np.asarray(CITYSCAPES_TRAIN_TO_LABEL) if dataset == "cityscapes" else np.arange(num_classes)
    rows, preds = [], {}
    for v in range(videos + 1):
        split = "train" if v == videos else "test"
        video = f"city{v}_{v:06d}" if dataset == "cityscapes" else f"vid{v:03d}"
        for t in range(frames):
            stem = f"{t:06d}" if dataset == "cityscapes" else f"{t:04d}"
            fid = f"{video}_{stem}"
            image = data / "images" / video / f"{stem}.png"
            mask = data / "masks" / f"{fid}.png"
            _save(image, rng.integers(0, 256, (H + v, W, 3)))
            gt = rng.integers(0, num_classes, (H + v, W))
            raw = stored[gt]
            raw[0, 0] = 255 if dataset != "cityscapes" else 0  # a void pixel in the ground truth
            _save(mask, raw)
            rows.append(Frame(id=fid, image=str(image), mask=str(mask), video=video, frame=t, split=split,
                              height=H + v, width=W))
            if split == "test":
                p = gt.copy()
                p[rng.random(p.shape) < 0.2] = rng.integers(0, num_classes)
                preds[fid] = p.astype(np.uint8)
                _save(pred / f"{fid}.png", preds[fid])
    write_manifest(data / "manifest.csv", rows)
    write_classes(data / "classes.json", ClassInfo(names=[f"c{i}" for i in range(num_classes)],
                                                   palette=default_palette(num_classes),
                                                   mask_lut=lut.tolist(), dataset=dataset))
    return preds


def run(root: Path, *args, capsys=None) -> int:
    argv = ["--pred", str(root / "pred"), "--data", str(root / "data"), "--out", str(root / "subs"),
            "--weights", str(root / "weights.json"), "--params", str(root / "params.yaml"),
            "--no-progress", *map(str, args)]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    return exit_info.value.code


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line


def evaluate(root: Path, pred: Path, *args) -> dict:
    out = root / f"{pred.name}.score.json"
    argv = [str(pred), "--manifest", str(root / "data" / "manifest.csv"), "--out", str(out),
            "--params", str(root / "params.yaml"), *args]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate_main, argv)
    assert exit_info.value.code == 0
    summary = json.loads(out.read_text())
    summary.pop("predictions")
    summary.pop("format", None)
    summary.pop("sha256", None)  # a zip's own hash
    return summary


def test_submission_files(tmp_path, capsys):
    make_project(tmp_path)
    weights = {"members": ["unet_r18_s0", "unet_r34_s0"], "alpha": 1.4, "beta": 1.0,
               "groups": {"S": ["unet_r18_s0"], "W": ["unet_r34_s0"]}, "oof_score": 0.61}
    (tmp_path / "weights.json").write_text(json.dumps(weights))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"submit": {"name": "demo1", "format": "vspw",
                                                                     "vspw_offset": 1, "previews": 2}}))
    assert run(tmp_path) == 0
    assert "wrote" in capsys.readouterr().out
    subs = tmp_path / "subs"
    zip_path, info = subs / "demo1.zip", json.loads((subs / "demo1.json").read_text())
    assert info["sha256"] == hashlib.sha256(zip_path.read_bytes()).hexdigest()
    assert info["bytes"] == zip_path.stat().st_size
    assert info["format"] == "vspw" and info["vspw_offset"] == 1 and info["frames"] == 9
    assert info["members"] == weights["members"] and info["oof_score"] == 0.61
    assert info["weights"] == {k: weights[k] for k in ("alpha", "beta", "groups")}
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
    assert names == sorted(names) and names[0] == "vid000/0000.png" and len(names) == 9
    # two previews from different videos: image | overlay side by side
    assert len(info["previews"]) == 2
    shown = [subs / p for p in info["previews"]]
    assert len({p.stem.split("_")[0] for p in shown}) == 2
    for path in shown:
        with Image.open(path) as img:
            height = H + int(path.stem[3:6])  # video v is H + v pixels high
            scale = PREVIEW_MIN_HEIGHT // height
            assert img.mode == "RGB" and img.size == (2 * W * scale + PREVIEW_GAP, height * scale)


def test_render_preview_blends_the_palette():
    image = np.full((2, 3, 3), 100, dtype=np.uint8)
    labels = np.array([[0, 1, 1], [1, 0, 0]], dtype=np.uint8)
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[1] = (200, 0, 50)
    canvas = render_preview(image, labels, palette)
    scale = PREVIEW_MIN_HEIGHT // 2
    assert canvas.shape == (2 * scale, 6 * scale + PREVIEW_GAP, 3)
    np.testing.assert_array_equal(canvas[:, :3 * scale], 100)  # the image, untouched
    overlay = canvas[::scale, 3 * scale + PREVIEW_GAP::scale]
    assert overlay[0, 1].tolist() == [150, 50, 75] and overlay[0, 0].tolist() == [50, 50, 50]


def test_same_predictions_same_bytes(tmp_path):
    make_project(tmp_path)
    assert run(tmp_path, "--name", "a") == 0
    first = (tmp_path / "subs" / "a.zip").read_bytes()
    for i, path in enumerate(sorted((tmp_path / "pred").iterdir())):  # new mtimes, years apart
        os.utime(path, (1_000_000_000 + i * 86_400, 1_000_000_000 + i * 86_400))
    assert run(tmp_path, "--name", "a") == 0
    assert (tmp_path / "subs" / "a.zip").read_bytes() == first
    assert run(tmp_path, "--name", "b") == 0
    assert (tmp_path / "subs" / "b.zip").read_bytes() == first
    a, b = (json.loads((tmp_path / "subs" / f"{n}.json").read_text()) for n in "ab")
    assert a["sha256"] == b["sha256"] and a["members"] is None  # no weights.json: nothing copied


@pytest.mark.parametrize("dataset,fmt,num_classes", [("demo", "vspw", 4), ("demo", "folder", 4),
                                                     ("cityscapes", "auto", 19), ("camvid", "auto", 11)])
def test_zip_scores_like_its_folder(tmp_path, dataset, fmt, num_classes):
    make_project(tmp_path, dataset=dataset, num_classes=num_classes)
    assert run(tmp_path, "--format", fmt, "--name", "s", "--previews", 0) == 0
    from_folder = evaluate(tmp_path, tmp_path / "pred")
    from_zip = evaluate(tmp_path, tmp_path / "subs" / "s.zip")
    assert from_zip == from_folder and 0 < from_zip["mIoU"] < 1
    assert json.loads((tmp_path / "subs" / "s.json").read_text())["format"] == (
        dataset if fmt == "auto" else fmt)


def test_evaluate_zip_needs_its_format(tmp_path, capsys):
    make_project(tmp_path)
    assert run(tmp_path, "--format", "vspw", "--vspw-offset", 1, "--name", "s") == 0
    zip_path = tmp_path / "subs" / "s.zip"
    (tmp_path / "subs" / "s.json").unlink()
    reference = evaluate(tmp_path, tmp_path / "pred")
    assert evaluate(tmp_path, zip_path, "--format", "vspw", "--vspw-offset", "1") == reference
    argv = [str(zip_path), "--manifest", str(tmp_path / "data" / "manifest.csv"),
            "--params", str(tmp_path / "params.yaml")]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate_main, argv)
    assert exit_info.value.code == 2
    assert "s.json" in error_line(capsys) and not (tmp_path / "subs" / "s.zip.eval.json").exists()


def test_missing_and_void_predictions_refused(tmp_path, capsys):
    make_project(tmp_path)
    (tmp_path / "pred" / "vid001_0002.png").unlink()
    assert run(tmp_path) == 2
    line = error_line(capsys)
    assert "1 of 9 test frames" in line and "vid001_0002.png" in line
    assert not (tmp_path / "subs").exists()

    make_project(tmp_path)
    void = np.zeros((H + 2, W), dtype=np.uint8)
    void[3, 4] = 255
    _save(tmp_path / "pred" / "vid002_0001.png", void)
    assert run(tmp_path) == 2
    line = error_line(capsys)
    assert "vid002_0001.png" in line and "void" in line
    assert not list((tmp_path / "subs").glob("*.zip")) and not list((tmp_path / "subs").glob("*.json"))


def test_bad_prediction_size_and_stale_zip_kept(tmp_path, capsys):
    make_project(tmp_path)
    assert run(tmp_path, "--name", "s") == 0
    good = (tmp_path / "subs" / "s.zip").read_bytes()
    _save(tmp_path / "pred" / "vid000_0001.png", np.zeros((H, W + 1)))
    assert run(tmp_path, "--name", "s") == 2
    line = error_line(capsys)
    assert "vid000_0001.png" in line and "8x13" in line and "8x12" in line
    # the failed zip was never moved into place; the earlier checked one is untouched
    assert (tmp_path / "subs" / "s.zip").read_bytes() == good
    assert sorted(p.name for p in (tmp_path / "subs").iterdir()) == ["previews", "s.json", "s.zip"]


def test_format_dataset_mismatch_and_typo(tmp_path, capsys):
    make_project(tmp_path, dataset="camvid", num_classes=11)
    assert run(tmp_path, "--format", "cityscapes") == 2
    line = error_line(capsys)
    assert "'cityscapes'" in line and "'camvid'" in line
    assert run(tmp_path, "--format", "vsp") == 2
    assert "valid: auto, camvid, cityscapes, folder, rle_csv, vspw" in error_line(capsys)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"submit": {"formt": "folder"}}))
    assert run(tmp_path) == 2
    assert "submit.formt" in error_line(capsys)
    assert not (tmp_path / "subs").exists()


def test_check_zip_on_a_submission(tmp_path):
    """The library check used by the stage also accepts the stage's own output for every frame."""
    make_project(tmp_path, dataset="vspw", num_classes=5)
    assert run(tmp_path, "--name", "v", "--previews", 0) == 0
    frames = read_manifest(tmp_path / "data" / "manifest.csv", split="test")
    classes = read_classes(tmp_path / "data" / "classes.json")
    fmt = get_format("vspw", dataset="vspw")
    assert check_zip(tmp_path / "subs" / "v.zip", fmt=fmt, frames=frames, classes=classes)["entries"] == 9
    by_name = check_zip(tmp_path / "subs" / "v.zip", fmt="auto", frames=frames, classes=classes)
    assert by_name["format"] == "vspw"
    extra = Frame(id="vid009_0000", image="/elsewhere/vid009/0000.png", mask=None, video="vid009", frame=0,
                  split="test", height=H, width=W)
    with pytest.raises(PipelineError, match="1 of 10 test frames have no entry; first missing: "
                                            "'vid009/0000.png' \\(frame 'vid009_0000'\\)"):
        check_zip(tmp_path / "subs" / "v.zip", fmt=fmt, frames=[*frames, extra], classes=classes)
    assert json.loads((tmp_path / "subs" / "v.json").read_text())["previews"] == []


def test_preview_frames_spread_over_videos():
    frames = [Frame(id=f"v{v}_{t}", image="", mask=None, video=f"v{v}", frame=t, split="test")
              for v in range(6) for t in range(5)]
    picked = preview_frames(frames[::-1], 3)
    assert [f.video for f in picked] == ["v0", "v2", "v5"]  # linspace(0, 5, 3) rounded
    assert all(f.frame == 2 for f in picked)  # the middle frame of each
    few = preview_frames([f for f in frames if f.video == "v1"], 3)
    assert [f.frame for f in few] == [0, 2, 4]
    assert preview_frames(frames, 0) == []


# ----------------------------------------------------------------------------- outputs
def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _hidden(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(".*"))


def test_outputs_may_not_overwrite_inputs(tmp_path, capsys):
    make_project(tmp_path)
    (tmp_path / "weights.json").write_text(json.dumps({"alpha": 1.0}))
    before = _files(tmp_path)
    # <out>/<name>.json would be the --weights file the JSON copies from
    assert run(tmp_path, "--out", tmp_path, "--name", "weights") == 2
    line = error_line(capsys)
    assert "--out/--name" in line and "weights.json" in line and "the ensemble weights" in line
    # the previews folder <out>/previews/<name> would replace the prediction folder
    assert run(tmp_path, "--pred", tmp_path / "subs" / "previews" / "s", "--name", "s") == 2
    assert "the predictions" in error_line(capsys)
    assert _files(tmp_path) == before


@pytest.mark.parametrize("when", ["zip", "json"])
def test_disk_full_changes_nothing(tmp_path, capsys, monkeypatch, when):
    import errno

    make_project(tmp_path)
    assert run(tmp_path, "--name", "s") == 0
    _save(tmp_path / "pred" / "vid000_0000.png", np.zeros((H, W)))  # a new submission differs
    before = _files(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if when == "zip":  # the first entry cannot be written
        monkeypatch.setattr(zipfile.ZipFile, "writestr", full)
    else:  # zip and previews are written; the JSON, last, is not
        real = Path.write_text
        monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: full() if self.name.startswith(".s.json")
                            else real(self, *a, **k))
    assert run(tmp_path, "--name", "s") == 2
    line = error_line(capsys)
    assert "subs: cannot write the submission (No space left on device)" in line
    assert _files(tmp_path) == before and _hidden(tmp_path / "subs") == []


KILL_AFTER_ZIP = """
import os, signal, sys
real = os.replace
def replace(src, dst):
    real(src, dst)
    if str(dst).endswith(".zip"):  # kill -9 just after the new zip is in place
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from pipeline.submit import main
main(sys.argv[1:])
"""


def test_kill_after_the_zip_never_leaves_another_zips_json(tmp_path, capsys):
    import subprocess
    import sys

    make_project(tmp_path)
    assert run(tmp_path, "--name", "s") == 0
    subs = tmp_path / "subs"
    old_json = (subs / "s.json").read_text()
    _save(tmp_path / "pred" / "vid000_0000.png", np.zeros((H, W)))
    argv = ["--pred", tmp_path / "pred", "--data", tmp_path / "data", "--out", subs, "--name", "s",
            "--weights", tmp_path / "weights.json", "--params", tmp_path / "params.yaml", "--no-progress"]
    done = subprocess.run([sys.executable, "-c", KILL_AFTER_ZIP, *map(str, argv)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    new_zip = (subs / "s.zip").read_bytes()
    assert hashlib.sha256(new_zip).hexdigest() != json.loads(old_json)["sha256"]  # the new zip is there
    assert not (subs / "s.json").exists()  # and no JSON of the old one beside it
    assert _hidden(subs)  # the killed run's temporaries (JSON, previews)

    # evaluate cannot take a format from a JSON that is not there: it says so
    argv_eval = [str(subs / "s.zip"), "--manifest", str(tmp_path / "data" / "manifest.csv"),
                 "--params", str(tmp_path / "params.yaml")]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate_main, argv_eval)
    assert exit_info.value.code == 2 and "no s.json beside it" in error_line(capsys)

    # a torn pair made by hand (the old JSON copied back) is refused, naming the JSON
    (subs / "s.json").write_text(old_json)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate_main, argv_eval)
    line = error_line(capsys)
    assert exit_info.value.code == 2 and "s.json: describes another zip than" in line

    # the next run rebuilds a consistent pair and clears the temporaries
    assert run(tmp_path, "--name", "s") == 0
    info = json.loads((subs / "s.json").read_text())
    assert info["sha256"] == hashlib.sha256((subs / "s.zip").read_bytes()).hexdigest()
    assert (subs / "s.zip").read_bytes() == new_zip and _hidden(subs) == []


def test_stale_temporaries_are_removed_by_the_next_run(tmp_path):
    make_project(tmp_path)
    subs = tmp_path / "subs"
    (subs / "previews" / ".s.k2j3.tmp").mkdir(parents=True)  # atomic_dir of a killed run
    (subs / "previews" / ".s.k2j3.tmp" / "vid000_0001.png").write_bytes(b"half")
    (subs / "previews" / ".s.old.4242").mkdir()  # atomic_dir's swap, cut short
    (subs / ".s.zip.x81q.tmp").write_bytes(b"PK partial")  # atomic_path of a killed run
    (subs / ".other.json.a1b2.tmp").write_text("{")  # another name's: the folder is the stage's
    (subs / "notes.tmp").write_text("mine")  # not hidden: not a temporary of ours
    (subs / ".keep").write_text("")
    assert run(tmp_path, "--name", "s") == 0
    assert _hidden(subs) == [".keep"]
    assert (subs / "notes.tmp").read_text() == "mine"


def test_remove_stale_tmp_is_shallow_unless_asked(tmp_path):
    from pipeline.core.atomic import remove_stale_tmp

    deep = tmp_path / "member" / "f0" / "oof"
    deep.mkdir(parents=True)
    (deep / ".v1_02.npz.ab12.tmp").write_bytes(b"half")
    (tmp_path / ".top.json.x.tmp").write_text("{")
    (deep / "v1_01.npz").write_bytes(b"kept")
    assert remove_stale_tmp(tmp_path) == [tmp_path / ".top.json.x.tmp"]
    assert (deep / ".v1_02.npz.ab12.tmp").exists()  # a subfolder is not the caller's to clean
    assert remove_stale_tmp(tmp_path, recursive=True) == [deep / ".v1_02.npz.ab12.tmp"]
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["v1_01.npz"]
    assert remove_stale_tmp(tmp_path / "absent") == []


# ----------------------------------------------------------------------------- rle_csv
@pytest.mark.parametrize("order", ["column", "row"])
def test_rle_csv_submission_scores_like_its_folder(tmp_path, order):
    from pipeline.core.rle import RleRow, read_rle_table, rle_labels

    preds = make_project(tmp_path, dataset="demo", num_classes=4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"submit": {"format": "rle_csv",
                                                                     "rle": {"order": order}}}))
    assert run(tmp_path, "--name", "k", "--previews", 0) == 0
    subs = tmp_path / "subs"
    info = json.loads((subs / "k.json").read_text())
    assert info["format"] == "rle_csv" and info["rle_order"] == order and info["table"] == "submission.csv"
    with zipfile.ZipFile(subs / "k.zip") as zf:
        assert zf.namelist() == ["submission.csv"]
        text = zf.read("submission.csv").decode()
    lines = text.splitlines()
    assert lines[0] == "id,class,rle" and lines[1].startswith("vid000_0000,")
    table = read_rle_table(text, name="submission.csv")
    assert sorted(table) == sorted(preds)
    for fid, labels in preds.items():  # one row per class present, decoding to the prediction
        assert [r.cls for r in table[fid]] == sorted(np.unique(labels).tolist())
        rows = [RleRow(*r) for r in table[fid]]
        np.testing.assert_array_equal(rle_labels(rows, shape=labels.shape, num_classes=4, fill=255,
                                                 order=order), labels)
    reference = evaluate(tmp_path, tmp_path / "pred")
    assert evaluate(tmp_path, subs / "k.zip") == reference and 0 < reference["mIoU"] < 1
    # the bare CSV (what a site that wants no zip gets) scores the same with its order
    (tmp_path / "k.csv").write_text(text)
    from_csv = evaluate(tmp_path, tmp_path / "k.csv", "--rle-order", order)
    from_csv.pop("rle_order")
    assert from_csv == reference


def test_rle_csv_check_and_refusals(tmp_path, capsys):
    make_project(tmp_path, dataset="demo", num_classes=4)
    assert run(tmp_path, "--format", "rle_csv", "--name", "k", "--previews", 0) == 0
    frames = read_manifest(tmp_path / "data" / "manifest.csv", split="test")
    classes = read_classes(tmp_path / "data" / "classes.json")
    summary = check_zip(tmp_path / "subs" / "k.zip", fmt="rle_csv", frames=frames, classes=classes)
    assert summary["entries"] == 1 and summary["format"] == "rle_csv" and summary["rows"] >= len(frames)
    with zipfile.ZipFile(tmp_path / "subs" / "k.zip") as zf:
        text = zf.read("submission.csv").decode()

    def score(table: str, *args) -> str:
        (tmp_path / "bad.csv").write_text(table)
        argv = [str(tmp_path / "bad.csv"), "--manifest", str(tmp_path / "data" / "manifest.csv"),
                "--params", str(tmp_path / "params.yaml"), *args]
        with pytest.raises(SystemExit) as exit_info:
            run_cli(evaluate_main, argv)
        assert exit_info.value.code == 2
        return error_line(capsys)

    lines = text.splitlines()
    first = lines[1].split(",")
    assert "bad.csv line 2: class 9 is not a class (0..3)" in score(
        "\n".join([lines[0], f"{first[0]},9,{first[2]}", *lines[2:]]))
    assert "match no 'test' frame" in score(text + "vid777_0000,1,1 1\n")
    assert "1 of 9 labelled 'test' frames have no row; first missing: " in score(
        "\n".join(line for line in lines if not line.startswith("vid000_0000,")))
    assert "malformed rle" in score("\n".join([lines[0], f"{first[0]},{first[1]},1 x", *lines[2:]]))
    assert "--format and --vspw-offset apply to a submission zip only" in score(text, "--format", "folder")
    # a table missing a frame's pixels is no valid submission
    with zipfile.ZipFile(tmp_path / "half.zip", "w") as zf:
        zf.writestr("submission.csv", "\n".join(lines[:2] + lines[3:]))
    with pytest.raises(PipelineError, match="pixel\\(s\\) of frame 'vid000_0000' are in no row"):
        check_zip(tmp_path / "half.zip", fmt="rle_csv", frames=frames, classes=classes)
    with zipfile.ZipFile(tmp_path / "wrapped.zip", "w") as zf:
        zf.writestr("k/submission.csv", text)
    with pytest.raises(PipelineError, match="inside the folder 'k/'"):
        check_zip(tmp_path / "wrapped.zip", fmt="rle_csv", frames=frames, classes=classes)
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("submission.csv", text + " " * (8 << 20))
    with pytest.raises(PipelineError, match="more than a table of 9 frame\\(s\\) can take"):
        check_zip(tmp_path / "bomb.zip", fmt="rle_csv", frames=frames, classes=classes)


def test_rle_order_typos_are_named(tmp_path, capsys):
    make_project(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"submit": {"format": "rle_csv",
                                                                     "rle": {"ordr": "row"}}}))
    assert run(tmp_path) == 2
    assert "unknown key 'submit.rle.ordr'; valid keys of 'submit.rle': order" in error_line(capsys)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"submit": {"format": "rle_csv"}}))
    assert run(tmp_path, "--rle-order", "rows") == 2
    assert "submit.rle.order: unknown rle order 'rows'; valid: column, row" in error_line(capsys)
    assert not (tmp_path / "subs").exists()
