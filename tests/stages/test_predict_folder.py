"""pipeline/predict.py and pipeline/bundle.py through their command lines: a bundle used by a
fresh process in another folder, and bad input (no image, an unreadable one, another class set,
a missing or corrupt bundle, an output over an input): exit 2, one ``error:`` line, no file
written; an interrupted prediction leaves nothing either."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline import bundle as bundle_stage
from pipeline import predict as predict_stage
from pipeline.core.errors import run_cli
from pipeline.ensembling import folder
from pipeline.ensembling.bundle import BUNDLE_INDEX

from conftest import REPO
from test_bundle import build_workspace, labels_of, workspace_args

GROUPS = {"S": ["tiny_s0"], "W": [], "A": []}
MIXES = {"tiny_s0": {"f0": 0.5, "f1": 0.5}}


@pytest.fixture(scope="module")
def small(demo_workspace, tmp_path_factory):
    """One member (the tiny config's two fold runs of seed 0), its prediction and its bundle."""
    w = build_workspace(demo_workspace, tmp_path_factory.mktemp("predict_cli"), groups=GROUPS,
                        mixes=MIXES)
    w["pred"], w["bundle"] = w["root"] / "pred", w["root"] / "small.bundle"
    predict_stage.main([str(w["images"]), "--out", str(w["pred"]), *workspace_args(w)])
    bundle_stage.main([str(w["bundle"]), *workspace_args(w)[:-3], "--no-progress"])
    return w


def _error(capsys, stage, args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(stage.main, args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def test_a_fresh_process_predicts_from_the_bundle_alone(small, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "pipeline" / "predict.py"),
                             str(small["images"]), "--out", "pred", "--bundle",
                             str(small["bundle"]), "--device", "cpu", "--no-progress"],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "predicted" in result.stdout
    got, expected = labels_of(elsewhere / "pred"), labels_of(small["pred"])
    assert sorted(got) == sorted(expected) and all(np.array_equal(got[k], expected[k])
                                                   for k in expected)


def _tamper(bundle: Path, out: Path, edit) -> Path:
    """A copy of ``bundle`` with ``edit(name, bytes) -> bytes`` applied to each entry (the zip
    itself stays valid: CRCs are recomputed)."""
    with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, edit(info.filename, src.read(info.filename)))
    return out


def _flip_checkpoint(name: str, data: bytes) -> bytes:
    if not name.endswith(".pt"):
        return data
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


def _retag(name: str, data: bytes) -> bytes:
    if name != BUNDLE_INDEX:
        return data
    return json.dumps({**json.loads(data), "format": "something-else"}).encode()


CASES = {
    # name: (make the case in tmp: returns extra argv and input folder, expected words)
    "empty folder": (lambda w, t: ([], t / "empty"), "no images"),
    "unreadable image": (lambda w, t: ([], t / "bad"), "unreadable or corrupt image"),
    "missing bundle": (lambda w, t: (["--bundle", str(t / "nothing.bundle")], None),
                       "bundle not found"),
    "not a bundle": (lambda w, t: (["--bundle", str(t / "junk.bundle")], None),
                     "not a readable zip (ensemble bundle"),
    "truncated bundle": (lambda w, t: (["--bundle", str(t / "cut.bundle")], None),
                         "ensemble bundle"),
    "other format tag": (lambda w, t: (["--bundle", str(_tamper(w["bundle"], t / "tag.bundle",
                                                                _retag))], None),
                         "format tag"),
    "changed checkpoint": (lambda w, t: (["--bundle", str(_tamper(w["bundle"], t / "flip.bundle",
                                                                  _flip_checkpoint))], None),
                           "sha256 differs"),
    "other class set": (lambda w, t: (["--bundle", str(w["bundle"]), "--data", str(t / "data")],
                                      None), "classes differ from"),
    "workspace option with a bundle": (lambda w, t: (["--bundle", str(w["bundle"]), "--runs",
                                                      str(w["runs"])], None), "read from the bundle"),
    "compared zip lacks images": (lambda w, t: (["--compare", str(t / "few.zip"),
                                                 *workspace_args(w)], None), "no prediction of"),
}


def _prepare(w: dict, tmp: Path) -> None:
    (tmp / "empty").mkdir()
    (tmp / "empty" / "notes.txt").write_text("no image here")
    (tmp / "bad").mkdir()
    for image in sorted(w["images"].iterdir())[:2]:
        (tmp / "bad" / image.name).write_bytes(image.read_bytes())
    (tmp / "bad" / "z.png").write_bytes(image.read_bytes()[:60])  # a truncated PNG
    (tmp / "junk.bundle").write_bytes(b"not a zip at all")
    (tmp / "cut.bundle").write_bytes(w["bundle"].read_bytes()[:4096])
    (tmp / "data").mkdir()
    classes = json.loads((w["data"] / "classes.json").read_text())
    classes["names"] = [*classes["names"][:-1], "unicorn"]
    (tmp / "data" / "classes.json").write_text(json.dumps(classes))
    with zipfile.ZipFile(tmp / "few.zip", "w") as zf:
        first = sorted(w["images"].iterdir())[0]
        zf.writestr(first.name, (w["pred"] / first.name).read_bytes())


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_writes_nothing(small, tmp_path, capsys, case):
    make, words = CASES[case]
    _prepare(small, tmp_path)
    extra, images = make(small, tmp_path)
    out = tmp_path / "out"
    for as_zip in ([], ["--zip"]):
        line = _error(capsys, predict_stage, [str(images or small["images"]), "--out", str(out),
                                              "--no-progress", *as_zip,
                                              *(extra or workspace_args(small))])
        assert words in line, line
        assert _files(out) == []


def test_outputs_never_overwrite_inputs_or_other_files(small, tmp_path, capsys):
    line = _error(capsys, predict_stage, [str(small["images"]), "--out", str(small["images"]),
                                          *workspace_args(small)])
    assert "would overwrite the input images" in line
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    line = _error(capsys, predict_stage, [str(small["images"]), "--out", str(busy),
                                          *workspace_args(small)])
    assert "holds other files than label PNGs" in line and (busy / "keep.txt").is_file()
    line = _error(capsys, bundle_stage, [str(small["weights"]), *workspace_args(small)[:-3]])
    assert "would overwrite the ensemble weights" in line


def test_bundle_errors_name_the_missing_input(small, tmp_path, capsys):
    line = _error(capsys, bundle_stage, [str(tmp_path / "b.bundle"), "--weights",
                                         str(tmp_path / "none.json"), *workspace_args(small)[2:-3]])
    assert "weights not found" in line and not (tmp_path / "b.bundle").exists()
    weights = json.loads(small["weights"].read_text())
    weights["members"]["tiny_s0"]["test_weights"] = {"f0": 0.5, "f7": 0.5}
    (tmp_path / "w.json").write_text(json.dumps(weights))
    line = _error(capsys, bundle_stage, [str(tmp_path / "b.bundle"), "--weights",
                                         str(tmp_path / "w.json"), *workspace_args(small)[2:-3]])
    assert "no run folder of member 'tiny_s0' for f7" in line
    assert not (tmp_path / "b.bundle").exists()


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_an_interrupted_prediction_leaves_nothing(small, tmp_path, capsys, monkeypatch, as_zip):
    calls = []
    real = folder.predict_probs_and_plain

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # the third image
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(folder, "predict_probs_and_plain", dying)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(predict_stage.main, [str(small["images"]), "--out", str(out), "--no-progress",
                                     *(["--zip"] if as_zip else []), *workspace_args(small)])
    assert exit_info.value.code == 130 and len(calls) == 5
    assert _files(out) == [] and _files(tmp_path) == []
