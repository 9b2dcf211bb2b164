"""kill -9 part way, then look at the disk: resumable inference and the atomic writers.

* ``infer.py`` SIGKILLed after some maps are written resumes: the maps written before the kill
  are kept (same inode and mtime, counted in ``reused_maps``), the final maps equal those of an
  uninterrupted run in another copy, and the temp file of a write cut short is gone.
* ``pipeline.core.atomic.atomic_path`` and ``pipeline.models.checkpoint.save_checkpoint`` killed in the
  middle of writing a large file leave the target absent or complete (the old content), never
  truncated; the only litter is the writer's hidden ``.<name>.<random>.tmp``, a name git
  ignores and the stages that own folder outputs remove on their next run.

Training's kill -9 and resume is tested in test_train.py
(``test_killed_run_resumes_to_the_uninterrupted_weights``); the ensemble search's in
test_ensemble.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.infer import main as infer_main
from pipeline.inference.mapfile import read_probs
from pipeline.inference.members import run_map_dir
from pipeline.models.checkpoint import load_checkpoint

from conftest import REPO  # the repository root, defined once

TIMEOUT = 120  # seconds, for a subprocess that should take a few


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL


def _litter(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.tmp"))


def _git_ignores(relpath: str) -> bool:
    done = subprocess.run(["git", "check-ignore", "-q", "--no-index", relpath], cwd=REPO)
    return done.returncode == 0


# ----------------------------------------------------------------------------- inference
def _maps(out: Path) -> dict[str, Path]:
    """split/id -> map file of the tiny run's fold 0 under the maps root ``out``."""
    run = run_map_dir(out, "tiny_s0", 0)
    return {f"{p.parent.name}/{p.stem}": p for p in sorted(run.glob("*/*.npz"))}


def test_killed_inference_resumes_keeping_its_maps(demo_workspace, tmp_path):
    ws = demo_workspace
    params = ws.write_params(tmp_path / "params.yaml",
                             infer={"device": "cpu", "num_workers": 0, "out": "oof_preds"})
    trained = ws.train()

    def args(name: str) -> list[str]:
        run = shutil.copytree(trained.root, tmp_path / name / "runs" / trained.root.name)
        return [str(run), "--params", str(params), "--data", str(ws.data), "--folds",
                str(ws.folds), "--out", str(tmp_path / name / "oof_preds"), "--no-progress"]

    reference = infer_main(args("a"))  # uninterrupted, in process
    expected = _maps(tmp_path / "a" / "oof_preds")
    total = reference["oof_frames"] + reference["test_frames"]
    assert len(expected) == total >= 10

    b_args, b_out = args("b"), tmp_path / "b" / "oof_preds"
    proc = subprocess.Popen([sys.executable, str(REPO / "pipeline" / "infer.py"), *b_args],
                            cwd=tmp_path / "b", env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT
        while len(_maps(b_out)) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no map appeared"
            time.sleep(0.002)
        _kill(proc)
    finally:
        proc.kill()
        proc.wait(timeout=TIMEOUT)
        proc.stderr.close()
    run_dir = run_map_dir(b_out, "tiny_s0", 0)
    assert not (run_dir / "meta.json").exists()  # written last: the run is visibly unfinished
    before = {key: os.stat(path) for key, path in _maps(b_out).items()}
    assert 3 <= len(before) < total, "the kill came too late to test a resume"
    # what a kill in the middle of a map's write leaves (atomic_path's temp, never the .npz)
    cut_short = run_dir / "oof" / ".vid_cut_0000.npz.k1ll3d.tmp"
    cut_short.write_bytes(b"PK\x03\x04 half a map")

    resumed = infer_main(b_args)  # the same command again
    assert resumed["reused_maps"] == len(before)
    after = _maps(b_out)
    assert sorted(after) == sorted(expected)
    for key, st in before.items():  # not recomputed: the very same files
        now = os.stat(after[key])
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), key
    for key, path in expected.items():  # kill or no kill, the same maps
        np.testing.assert_array_equal(read_probs(after[key]), read_probs(path), err_msg=key)
    assert resumed["oof_miou_tta"] == reference["oof_miou_tta"]
    assert resumed["oof_miou_single"] == reference["oof_miou_single"]
    assert (run_dir / "meta.json").is_file()
    assert not _litter(b_out), "temp files left in a DVC output folder"


# ----------------------------------------------------------------------------- atomic writers
WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pipeline.core.atomic import atomic_path

    target, size = Path(sys.argv[1]), int(sys.argv[2])
    chunk = bytes(range(256)) * 4096  # 1 MiB
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            for i in range(size // len(chunk)):
                fh.write(chunk)
                if i == size // len(chunk) // 2:
                    fh.flush()
                    print("half", flush=True)
                    sys.stdin.read()  # wait here, half written, for the kill
""")

SAVER = textwrap.dedent("""
    import os
    import sys
    import torch
    from pipeline.models.checkpoint import save_checkpoint

    class Pausing:
        '''The file torch.save writes to; stops for good half way through the stream.'''
        def __init__(self, fh, pause_at):
            self.fh, self.pause_at, self.written = fh, pause_at, 0
        def write(self, data):
            n = self.fh.write(data)
            self.written += n
            if self.written >= self.pause_at:
                self.fh.flush()
                print("half", flush=True)
                sys.stdin.read()
            return n
        def flush(self):
            self.fh.flush()

    real_save = torch.save
    def paused_save(obj, dest):  # save_checkpoint hands torch.save a path or an open file
        if isinstance(dest, (str, os.PathLike)):
            with open(dest, "wb") as fh:
                real_save(obj, Pausing(fh, int(sys.argv[2])))
        else:
            real_save(obj, Pausing(dest, int(sys.argv[2])))
    torch.save = paused_save

    from pipeline.models.build import build_model
    model = build_model(arch="Unet", encoder="resnet18", num_classes=3)  # 57 MB of weights
    save_checkpoint(sys.argv[1], model=model, config={}, classes={"names": ["a", "b", "c"]},
                    fold=0, seed=0, iteration=99, rng_state=False)
""")


def _kill_half_way(script: str, target: Path, arg: int) -> None:
    """Run ``script target arg`` until it prints "half" (its file half written), then kill -9."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(target), str(arg)],
                            cwd=target.parent, env=_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline() != "half\n":
            proc.wait(timeout=TIMEOUT)
            pytest.fail(f"the writer never got half way: {proc.stderr.read()[-3000:]}")
        _kill(proc)
    finally:
        proc.kill()
        proc.wait(timeout=TIMEOUT)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()


def _the_cut_short_temp(target: Path) -> Path:
    """The one file besides ``target`` in its folder: atomic_path's hidden, git-ignored temp."""
    others = [p for p in target.parent.iterdir() if p != target]
    assert len(others) == 1, others
    tmp = others[0]
    assert tmp.name.startswith(f".{target.name}.") and tmp.name.endswith(".tmp"), tmp.name
    for folder in ("", "pipeline/", "tests/"):  # anywhere, not only in ignored output folders
        assert _git_ignores(f"{folder}{tmp.name}"), folder
    return tmp


@pytest.mark.parametrize("earlier", [False, True], ids=["no_earlier_file", "earlier_file"])
def test_atomic_path_killed_mid_write_leaves_old_or_nothing(tmp_path, earlier):
    target, size = tmp_path / "big.bin", 64 << 20
    if earlier:
        target.write_bytes(b"the complete earlier version\n")
    _kill_half_way(WRITER, target, size)
    if earlier:
        assert target.read_bytes() == b"the complete earlier version\n"
    else:
        assert not target.exists()
    tmp = _the_cut_short_temp(target)
    assert 0 < tmp.stat().st_size < size  # it really was killed mid-write


def test_checkpoint_save_killed_mid_write_keeps_the_earlier_checkpoint(tmp_path):
    target = tmp_path / "last.pt"
    from pipeline.models.build import build_model
    from pipeline.models.checkpoint import save_checkpoint

    earlier = build_model(arch="Unet", encoder="tu-test_resnet", num_classes=3,
                          decoder_channels=[16, 16, 8, 8, 8])
    save_checkpoint(target, model=earlier, config={}, classes={"names": ["a", "b", "c"]},
                    fold=0, seed=0, iteration=7, rng_state=False)
    old = target.read_bytes()
    _kill_half_way(SAVER, target, 16 << 20)
    assert target.read_bytes() == old
    assert load_checkpoint(target)["iteration"] == 7
    tmp = _the_cut_short_temp(target)
    assert tmp.stat().st_size >= 16 << 20
    with pytest.raises(Exception):
        torch.load(tmp, weights_only=True)  # truncated: this is what the target never becomes
