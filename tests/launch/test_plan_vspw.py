"""The cost plan of configs/vspw.yaml's map settings against the maps inference writes.

A synthetic dataset in VSPW's layout (``data/<video>/{origin,mask}/``, split lists, masks of raw
values 0..124) is prepared and split by the stage scripts, one tiny run is trained per fold and
predicted with the config's ``infer.stride``, ``infer.topk`` and ``infer.oof_sample`` (only the
TTA is cut to one view: it changes passes, not maps). The plan must count exactly the map files
that appear and, per file, the bytes of its stored arrays: ``probs`` + ``top_class`` (a dense
map: ``probs``); a file's ``header`` and a dense map's tie list are left out of the plan (a few
hundred bytes, and ~0.1 % of the pixels x 5 bytes), and so are zip overhead and compression.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.folds import main as folds_main
from pipeline.infer import main as infer_main
from pipeline.inference.mapfile import EXT
from pipeline.launch.inputs import plan_from_params
from pipeline.parallel import main as parallel_main
from pipeline.prepare import main as prepare_main

from conftest import REPO, TINY_MODEL, DemoWorkspace

HEIGHT, WIDTH = 32, 48
# (video, frames, list file): three train videos (one in val.txt, pooled into the folds as the
# config's prepare.vspw.train_splits says) and one test video without masks, as VSPW ships it
VIDEOS = [("1001_a", 40, "train"), ("1002_b", 36, "train"), ("1003_c", 20, "val"),
          ("2001_t", 12, "test")]
MODEL = "unet_r50"   # the config's primary model name, on a tiny encoder here
N_FOLDS = 3          # one train video per fold


def write_vspw(root: Path) -> None:
    """Frames ``root/data/<video>/origin/<n>.jpg`` and masks ``mask/<n>.png`` (raw 0..124:
    0 is VSPW's "others", void; 1..124 the classes), and the split lists."""
    rng = np.random.default_rng(0)
    lists: dict[str, list[str]] = {}
    for video, n, split in VIDEOS:
        lists.setdefault(split, []).append(video)
        for k in range(1, n + 1):
            origin = root / "data" / video / "origin" / f"{k:08d}.jpg"
            origin.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(origin)
            if split != "test":
                mask = root / "data" / video / "mask" / f"{k:08d}.png"
                mask.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 125, (HEIGHT, WIDTH), dtype=np.uint8)).save(mask)
    for split, videos in lists.items():
        (root / f"{split}.txt").write_text("\n".join(videos) + "\n")


def vspw_params(root: Path) -> dict:
    """configs/vspw.yaml with its map settings (quant, stride, topk, oof_sample) kept, and the
    rest shrunk: one tiny model config x 3 folds x 1 seed, one TTA view, the CPU."""
    params = yaml.safe_load((REPO / "configs" / "vspw.yaml").read_text())
    params["prepare"].update(root=str(root / "vspw"), out=str(root / "data"), workers=1)
    params["folds"]["n_folds"] = N_FOLDS
    params["train"].update(models=[MODEL], students=[], folds=list(range(N_FOLDS)), seeds=[0],
                           student_seeds=[0], device="cpu", num_workers=0,
                           runs_dir=str(root / "runs"))
    tiny = copy.deepcopy(TINY_MODEL)
    tiny.update(iters=2, val_interval=2, swa={"iters": 0})
    params["models"] = {MODEL: tiny}
    params["infer"].update(tta={"scales": [1.0], "flip": False}, device="cpu", num_workers=0,
                           out=str(root / "oof_preds"))
    return params


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The prepared dataset, its folds, the plan, and the maps of the member's three runs."""
    root = tmp_path_factory.mktemp("vspw_plan")
    write_vspw(root / "vspw")
    ws = DemoWorkspace(root=root, model=MODEL, n_folds=N_FOLDS)
    params = vspw_params(root)
    ws.params.write_text(yaml.safe_dump(params, sort_keys=False))
    prepare_main(["--params", str(ws.params)])
    folds_main(["--manifest", str(ws.manifest), "--out", str(ws.folds), "--params", str(ws.params)])
    plan = plan_from_params(params_path=ws.params, data_dir=ws.data, folds_path=ws.folds,
                            with_models=False)
    for fold in range(N_FOLDS):
        infer_main([str(ws.train(MODEL, fold=fold).root), "--params", str(ws.params),
                    "--data", str(ws.data), "--folds", str(ws.folds), "--no-progress"])
    return ws, params, plan, root / "oof_preds" / f"{MODEL}_s0"


def stored_arrays(path: Path) -> dict[str, int]:
    """{member array: its nbytes} of one map file, read with numpy."""
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name].nbytes for name in npz.files}


def test_the_dataset_is_vspw_shaped(written):
    ws, params, plan, _ = written
    infer = params["infer"]
    assert (infer["quant"], infer["stride"], infer["topk"]) == ("uint8", 4, 5)
    assert infer["oof_sample"] == {"windows": 2, "length": 16, "every_nth_video": 1, "seed": 0}
    data = plan["data"]
    assert data["classes"] == 124 and data["sizes"] == [f"{HEIGHT}x{WIDTH}"]
    assert data["train_frames"] == 40 + 36 + 20 and data["test_frames"] == 12
    # 2 windows of 16 of each video longer than 32 frames; the 20-frame video whole
    assert data["oof_frames"] == 32 + 32 + 20
    assert plan["runs"]["total"] == N_FOLDS and plan["runs"]["members"] == 1


def test_the_plan_counts_the_map_files_written(written):
    ws, _, plan, member = written
    (row,) = plan["rows"]
    oof = sorted(member.glob(f"f*/oof/*{EXT}"))
    test = sorted(member.glob(f"f*/test/*{EXT}"))
    assert len(oof) == plan["data"]["oof_frames"] == 84
    assert len({p.name for p in oof}) == len(oof)   # each sampled frame once, by its own fold
    assert len(test) == row["runs"] * plan["data"]["test_frames"] == 3 * 12
    assert row["tta_passes_oof"] == len(oof) and row["tta_passes_test"] == len(test)  # 1 view


def test_the_plan_bytes_are_the_stored_arrays_of_the_files_written(written):
    _, _, plan, member = written
    (row,) = plan["rows"]
    per_map = 5 * (1 + 1) * math.ceil(HEIGHT / 4) * math.ceil(WIDTH / 4)   # 5 codes + 5 ids
    assert plan["per_frame"]["map_bytes"] == per_map == 960
    for split, planned in (("oof", row["oof_map_bytes"]), ("test", row["test_map_bytes"])):
        files = sorted(member.glob(f"f*/{split}/*{EXT}"))
        arrays = [stored_arrays(p) for p in files]
        # a top-k map holds codes, class ids and its header; no tie list
        assert all(set(a) == {"header", "probs", "top_class"} for a in arrays)
        assert sum(a["probs"] + a["top_class"] for a in arrays) == planned == len(files) * per_map
    assert plan["total"]["map_bytes"] == row["oof_map_bytes"] + row["test_map_bytes"]


def test_plan_cli_prints_the_same_numbers(written, capsys):
    ws, _, plan, _ = written
    parallel_main(["--plan", "--params", str(ws.params), "--data", str(ws.data),
                   "--folds", str(ws.folds)])
    out = capsys.readouterr().out
    assert "OOF maps  84 of 96 train frames, sampled by infer.oof_sample" in out
    assert ("uint8, stride 4, top-5 of 124 classes: 5 x ceil(32/4) x ceil(48/4) x (1 + 1) B "
            "(code + class id) = 960 B per map") in out
    assert f"maps up to {(84 + 36) * 960 / 1000:.1f} KB" in out
