"""Stage `prepare`: good output files, and one clean `error:` line with no output for bad input."""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.core.errors import run_cli
from pipeline.core.params import load_section
from pipeline.data.adapters import ADAPTERS, parse_options
from pipeline.data.manifest import MANIFEST_COLUMNS, read_class_counts, read_classes, read_manifest, read_mask
from pipeline.prepare import PrepareParams, main

H, W = 6, 8


def make_dataset(root: Path, videos: int = 2, frames: int = 3, test: int = 2, seed: int = 0) -> None:
    """A folder dataset: 3 classes + void 255, `test` test images (the first without a mask)."""
    rng = np.random.default_rng(seed)
    for v in range(videos):
        for f in range(frames):
            save_image(root / "images" / f"vid{v}_{f:03d}.png", rng.integers(0, 256, (H, W, 3)))
            save_mask(root / "masks" / f"vid{v}_{f:03d}.png", rng.choice([0, 1, 2, 255], (H, W)))
    for t in range(test):
        save_image(root / "test_images" / f"tv_{t:03d}.png", rng.integers(0, 256, (H, W, 3)))
        if t > 0:
            save_mask(root / "test_masks" / f"tv_{t:03d}.png", rng.choice([0, 2], (H, W)))


def save_image(path: Path, array, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(array, dtype=np.uint8))
    (img.convert(mode) if mode else img).save(path)


def save_mask(path: Path, array) -> None:
    save_image(path, array)


def write_params(path: Path, root: Path, out: Path, **folder) -> Path:
    section = {"dataset": "folder", "root": str(root), "out": str(out), "workers": 1,
               "folder": {"num_classes": 3, "test_images": "test_images", "test_masks": "test_masks", **folder}}
    path.write_text(yaml.safe_dump({"prepare": section, "folds": {"n_folds": 2}}))
    return path


def cli(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(a) for a in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


# ----------------------------------------------------------------------------- good path
def test_good_path_writes_consistent_files(tmp_path, capsys):
    root, out = tmp_path / "ds", tmp_path / "prepared"
    make_dataset(root)
    code, stdout, err = cli(["--params", write_params(tmp_path / "p.yaml", root, out)], capsys)
    assert code == 0, err
    assert "train: 6 frames, 2 videos" in stdout and "test: 2 frames" in stdout
    with (out / "manifest.csv").open() as fh:
        assert tuple(next(csv.reader(fh))) == MANIFEST_COLUMNS
    frames = read_manifest(out / "manifest.csv")
    assert [f.split for f in frames] == ["train"] * 6 + ["test"] * 2
    assert {f.video for f in frames if f.split == "train"} == {"vid0", "vid1"}
    assert all((f.height, f.width) == (H, W) and Path(f.image).is_file() for f in frames)
    assert frames[6].mask is None and Path(frames[7].mask).is_file()
    classes = read_classes(out / "classes.json")
    assert classes.num_classes == 3 and classes.dataset == "folder" and len(classes.mask_lut) == 256
    ids, counts = read_class_counts(out / "class_counts.npz")
    labelled = [f for f in frames if f.mask is not None]
    assert ids == [f.id for f in labelled] and counts.shape == (7, 3)
    for f, row in zip(labelled, counts):
        mask = read_mask(f.mask, classes.lut_array())
        assert row.tolist() == [int((mask == c).sum()) for c in range(3)]
    train_rows = counts[[f.split == "train" for f in labelled]]
    assert classes.train_pixel_counts == train_rows.sum(axis=0).tolist()
    assert 0 < sum(classes.train_pixel_counts) < 6 * H * W  # void pixels are not counted
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]


def test_demo_paths_are_relative_and_survive_a_move(tmp_path, capsys):
    params = tmp_path / "p.yaml"
    demo = dict(seed=1, videos=3, test_videos=1, min_frames=2, max_frames=3, height=32, width=40)
    params.write_text(yaml.safe_dump({"prepare": {"dataset": "demo", "workers": 1, "demo": demo}}))
    code, _, err = cli(["--params", params, "--out", tmp_path / "data"], capsys)
    assert code == 0, err
    with (tmp_path / "data" / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(not os.path.isabs(r["image"]) and not os.path.isabs(r["mask"]) for r in rows)
    shutil.move(tmp_path / "data", tmp_path / "moved")
    frames = read_manifest(tmp_path / "moved" / "manifest.csv")
    assert all(Path(f.image).is_file() and Path(f.mask).is_file() for f in frames)
    assert {f.split for f in frames} == {"train", "test"}
    assert (frames[0].height, frames[0].width) == (32, 40)


def test_parallel_workers_give_the_same_output(tmp_path, capsys):
    root = tmp_path / "ds"
    make_dataset(root, videos=3, frames=4)
    params = write_params(tmp_path / "p.yaml", root, tmp_path / "unused")
    for workers in (1, 2):
        code, _, err = cli(["--params", params, "--out", tmp_path / f"w{workers}", "--workers", workers], capsys)
        assert code == 0, err
    assert (tmp_path / "w1" / "manifest.csv").read_text() == (tmp_path / "w2" / "manifest.csv").read_text()
    assert (tmp_path / "w1" / "classes.json").read_text() == (tmp_path / "w2" / "classes.json").read_text()
    np.testing.assert_array_equal(read_class_counts(tmp_path / "w1" / "class_counts.npz")[1],
                                  read_class_counts(tmp_path / "w2" / "class_counts.npz")[1])


def test_params_cover_every_adapter_and_repo_params_parse(repo_root):
    fields = {f.name for f in dataclasses.fields(PrepareParams)}
    assert set(ADAPTERS) <= fields
    params = load_section(PrepareParams, "prepare", repo_root / "params.yaml")
    for name in ADAPTERS:
        assert dataclasses.is_dataclass(parse_options(name, getattr(params, name)))


# ----------------------------------------------------------------------------- bad input
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_CASES = {
    # name: (break the dataset / params, text the one-line error must contain)
    "missing_mask": (lambda r, p: (r / "masks" / "vid0_001.png").unlink(), "vid0_001"),
    "size_mismatch": (lambda r, p: save_mask(r / "masks" / "vid1_002.png", np.zeros((H + 1, W))), "vid1_002.png"),
    "label_out_of_range": (lambda r, p: save_mask(r / "masks" / "vid0_002.png", np.full((H, W), 7)),
                           "vid0_002.png: label value 7"),
    "corrupt_image": (lambda r, p: _truncate(r / "images" / "vid1_000.png"), "vid1_000.png: unreadable or corrupt"),
    "corrupt_mask": (lambda r, p: (r / "masks" / "vid1_001.png").write_bytes(b"\x89PNG garbage"), "vid1_001.png"),
    "grayscale_image": (lambda r, p: save_image(r / "images" / "vid0_000.png", np.zeros((H, W, 3)), "L"),
                        "vid0_000.png: image mode is L"),
    "rgba_image": (lambda r, p: save_image(r / "images" / "vid0_000.png", np.zeros((H, W, 3)), "RGBA"),
                   "vid0_000.png: image mode is RGBA"),
    "empty_dataset": (lambda r, p: [f.unlink() for d in ("images", "test_images") for f in (r / d).iterdir()],
                      "no frames found"),
    "no_train_frames": (lambda r, p: [f.unlink() for f in (r / "images").iterdir()], "no train frames"),
    "missing_root": (lambda r, p: shutil.rmtree(r), "dataset root not found"),
    "unknown_dataset": (lambda r, p: _edit(p, dataset="kitti"), "valid: camvid, cityscapes, demo, folder, rle_csv, vspw"),
    "unknown_adapter_key": (lambda r, p: _edit(p, folder={"num_classes": 3, "imagez": "x"}), "prepare.folder.imagez"),
    "unused_section_typo": (lambda r, p: _edit(p, vspw={"train_split": ["a"]}), "prepare.vspw.train_split"),
    "unknown_top_key": (lambda r, p: _edit(p, datset="folder"), "prepare.datset"),
    "jpeg_data_in_png_mask": (lambda r, p: save_jpeg(r / "masks" / "vid0_001.png"),
                              "vid0_001.png: mask holds JPEG data, not a lossless PNG"),
    "dangling_image_symlink": (lambda r, p: (r / "images" / "vid1_003.png").symlink_to(r / "gone.png"),
                               "vid1_003.png: dangling symlink"),
    "two_sizes_in_one_video": (lambda r, p: resize_frame(r, "vid1_002"), "vid1_000.png of the same video"),
}


def save_jpeg(path: Path) -> None:
    """A lossy mask under a .png name: JPEG blurs label edges into values of other classes."""
    rng = np.random.default_rng(1)
    Image.fromarray(rng.choice([0, 1, 2], (H, W)).astype(np.uint8)).save(path, format="JPEG")


def resize_frame(root: Path, stem: str) -> None:
    """Image and mask of one frame agree with each other, not with the rest of its video."""
    save_image(root / "images" / f"{stem}.png", np.zeros((H + 2, W, 3)))
    save_mask(root / "masks" / f"{stem}.png", np.zeros((H + 2, W)))


def _edit(params: Path, **changes) -> None:
    data = yaml.safe_load(params.read_text())
    data["prepare"].update(changes)
    params.write_text(yaml.safe_dump(data))


@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "previous_output"])
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_one_line_and_leaves_no_output(case, previous, tmp_path, capsys):
    root, out = tmp_path / "ds", tmp_path / "prepared"
    make_dataset(root)
    params = write_params(tmp_path / "p.yaml", root, out)
    if previous:
        out.mkdir()
        (out / "manifest.csv").write_text("old")
    breaker, expected = BAD_CASES[case]
    breaker(root, params)
    code, _, err = cli(["--params", params], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    assert expected in lines[0]
    if previous:
        assert sorted(p.name for p in out.iterdir()) == ["manifest.csv"]
        assert (out / "manifest.csv").read_text() == "old"
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]  # no temp dir left


def test_root_inside_out_is_refused(tmp_path, capsys):
    out = tmp_path / "data"
    make_dataset(out / "raw")
    code, _, err = cli(["--params", write_params(tmp_path / "p.yaml", out / "raw", out)], capsys)
    assert code == 2 and "inside the output folder" in err
    assert (out / "raw" / "images").is_dir()  # the dataset itself is untouched


def _user_folder(path: Path) -> dict[str, bytes]:
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "sub" / "model.pt").write_bytes(b"weights")
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_output_folder_of_a_user_is_refused_untouched(tmp_path, capsys):
    root, mine = tmp_path / "ds", tmp_path / "mine"
    make_dataset(root)
    before = _user_folder(mine)
    code, _, err = cli(["--params", write_params(tmp_path / "p.yaml", root, mine)], capsys)
    assert code == 2 and err.count("error:") == 1, err
    assert f"{mine}: output folder holds files but no manifest.csv" in err
    assert _files(mine) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mine")]


@pytest.mark.parametrize("where", ["cwd", "parent_of_cwd", "root_itself"])
def test_cwd_its_parents_and_the_dataset_root_are_never_outputs(where, tmp_path, capsys, monkeypatch):
    root, work = tmp_path / "ds", tmp_path / "work"
    make_dataset(root)
    (work / "deep").mkdir(parents=True)
    (work / "params.yaml").write_text("keep me")
    monkeypatch.chdir(work / "deep" if where == "parent_of_cwd" else work)
    out = {"cwd": ".", "parent_of_cwd": "..", "root_itself": str(root)}[where]
    before = _files(tmp_path)
    code, _, err = cli(["--params", write_params(tmp_path / "p.yaml", root, Path("unused")),
                        "--out", out], capsys)
    assert code == 2 and err.count("error:") == 1, err
    expected = "dataset root lies inside" if where == "root_itself" else "current directory or contains it"
    assert expected in err and str(Path(out).resolve()) in err
    assert _files(tmp_path) == {**before, "p.yaml": (tmp_path / "p.yaml").read_bytes()}
    assert not [p for p in tmp_path.rglob(".*") if p.name.endswith(".tmp")]  # no hidden temp folder


def test_output_path_that_is_a_file_is_refused(tmp_path, capsys):
    root = tmp_path / "ds"
    make_dataset(root)
    (tmp_path / "data").write_text("a file")
    code, _, err = cli(["--params", write_params(tmp_path / "p.yaml", root, tmp_path / "data")], capsys)
    assert code == 2 and "output path is a file" in err and (tmp_path / "data").read_text() == "a file"


@pytest.mark.parametrize("earlier", ["empty", "earlier_output"])
def test_empty_folder_or_earlier_output_is_replaced(earlier, tmp_path, capsys):
    root, out = tmp_path / "ds", tmp_path / "prepared"
    make_dataset(root)
    out.mkdir()
    if earlier == "earlier_output":
        (out / "manifest.csv").write_text("old")
        (out / "stale.txt").write_text("left by an older version")
    code, _, err = cli(["--params", write_params(tmp_path / "p.yaml", root, out)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["class_counts.npz", "classes.json", "manifest.csv"]


def test_two_frame_sizes_in_one_video_name_both_frames(tmp_path, capsys):
    root = tmp_path / "ds"
    make_dataset(root)
    resize_frame(root, "vid1_002")
    code, _, err = cli(["--params", write_params(tmp_path / "p.yaml", root, tmp_path / "o")], capsys)
    assert code == 2, err
    assert (f"{root / 'images' / 'vid1_002.png'}: frame is 8x8 but {root / 'images' / 'vid1_000.png'} "
            f"of the same video 'vid1' is 8x6") in err
    # the same sizes in different videos are fine
    for f in range(3):
        resize_frame(root, f"vid1_{f:03d}")
    code, _, err = cli(["--params", write_params(tmp_path / "p.yaml", root, tmp_path / "o")], capsys)
    assert code == 0, err


def test_duplicate_ids_are_an_error(tmp_path, capsys):
    root = tmp_path / "ds"
    make_dataset(root)
    save_image(root / "test_images" / "vid0_000.png", np.zeros((H, W, 3)))
    code, _, err = cli(["--params", write_params(tmp_path / "p.yaml", root, tmp_path / "o")], capsys)
    assert code == 2 and "duplicate frame id 'vid0_000'" in err and not (tmp_path / "o").exists()


def test_script_runs_as_a_subprocess(repo_root, tmp_path):
    root = tmp_path / "ds"
    make_dataset(root)
    params = write_params(tmp_path / "p.yaml", root, tmp_path / "unused")
    command = [sys.executable, "pipeline/prepare.py", "--params", str(params), "--workers", "2"]
    good = subprocess.run([*command, "--out", str(tmp_path / "ok")], cwd=repo_root, capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert len(read_manifest(tmp_path / "ok" / "manifest.csv")) == 8
    _truncate(root / "images" / "vid1_001.png")
    bad = subprocess.run([*command, "--out", str(tmp_path / "bad")], cwd=repo_root, capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ") and "vid1_001.png" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_manifest_digests_each_frame_and_an_older_manifest_still_reads(tmp_path, capsys):
    from pipeline.data.manifest import frame_digest

    root, out = tmp_path / "ds", tmp_path / "prepared"
    make_dataset(root)
    params = write_params(tmp_path / "p.yaml", root, out)
    assert cli(["--params", params], capsys)[0] == 0
    frames = read_manifest(out / "manifest.csv")
    assert all(f.digest == frame_digest(f.image, f.mask) and len(f.digest) == 16 for f in frames)
    assert len({f.digest for f in frames}) == len(frames)
    assert frames[6].mask is None and frames[6].digest == frame_digest(frames[6].image, None)
    before = {f.id: f.digest for f in frames}

    save_mask(root / "masks" / "vid1_000.png", np.zeros((H, W)))  # one mask redrawn
    assert cli(["--params", params], capsys)[0] == 0
    after = {f.id: f.digest for f in read_manifest(out / "manifest.csv")}
    assert [i for i in before if before[i] != after[i]] == ["vid1_000"]

    # a manifest written before the digest column reads, with empty digests
    lines = (out / "manifest.csv").read_text().splitlines()
    old = tmp_path / "old.csv"
    old.write_text("\n".join(ln.rsplit(",", 1)[0] for ln in lines) + "\n")
    assert [f.digest for f in read_manifest(old)] == [""] * len(lines[1:])
