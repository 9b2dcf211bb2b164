"""Probability-map storage: size, speed and fidelity of pipeline.inference.mapfile against float32 files.

    python bench/probstore.py [--frames 500] [--classes 10] [--height 96] [--width 128]
                              [--stride 1] [--big] [--dir DIR] [--members 5] [--repeat 3]
                              [--topk-frames 12] [--topk-classes 124] [--oof oof_preds]
                              [--quick]

Maps are softmax(smooth random logits): low-resolution Gaussian noise upsampled (bilinear) to the
frame size and scaled so most pixels are confident, with soft borders between classes, like a
segmentation network's output. ``--big`` = 12 frames of 19 classes at 512x1024 (half-size
Cityscapes).
Contenders, side by side in one process on the same frames (one file per frame):

  * f32 npz-zip : np.savez_compressed of float32 (nnU-Net's softmax export);
  * f32 npy     : np.save of float32, uncompressed;
  * uint8 / float16 via mapfile.write_probs, zip level 0 (stored), 1 and 6.

Per contender: bytes per class-pixel, write and read MB/s in MB of float32-equivalent data
(C*H*W*4 bytes per frame; files go to --dir, so reads usually come from the page cache),
max |read - original| and argmax agreement with the original (on the stored grid).

The ensemble check (``ensemble_miou_float_vs_quantized``) takes two sets of member maps and the
labels and returns both mIoUs; inference does not exist yet, so this script runs it on a
synthetic ensemble (members = noisy copies of a ground-truth logit field). Point it at the demo
OOF predictions once infer.py writes them.

Top-k maps (``write_probs(topk=K)``), side by side with dense uint8 in the same run: on
``--topk-frames`` synthetic frames of ``--topk-classes`` classes (default 124, VSPW's count)
whose scenes hold a few dominant classes (a frame draws 6 of them; softmax of smooth logits;
two regimes: "peaked", top-5 mass ~0.99, and "softer", ~0.89, with a longer tail),
3 members (the truth's logits plus each member's own smooth noise) are written dense and as
top-2/3/5/8, as the runner writes them (uint8, deflate level 1). Per kind: bytes per stored
pixel and per class-pixel (compressed, as written), the mIoU of the argmax of the members'
mean decoded map minus that of the float32 mean (mIoU points; the goal: top-5 within 0.05 at
<= 0.1 byte per class-pixel), write time and read time (all maps through ``read_probs``,
best of ``--repeat``) relative to dense. With member maps under ``--oof`` (what infer.py
wrote) their stored dense maps are re-stored as top-k: bytes and the fused labels' agreement
with the dense fusion (the float32 originals are not kept there, so no mIoU against them).
``--quick`` runs every part small (about a minute on one busy core).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from pipeline.evaluation.metrics import ConfusionMatrix, mean_iou
from pipeline.inference.mapfile import read_probs, write_probs


def smooth_softmax(rng: np.random.Generator, *, classes: int, height: int, width: int,
                   scale: float = 6.0) -> np.ndarray:
    """float32 [C, H, W] softmax of Gaussian noise on a coarse grid (cells of max(16, H/16)
    pixels), bilinearly upsampled."""
    cell = max(16, height // 16)
    lo = rng.normal(size=(classes, -(-height // cell) + 1, -(-width // cell) + 1))
    logits = ndimage.zoom(lo.astype(np.float32), (1, cell, cell), order=1,
                          output=np.float32)[:, :height, :width] * scale
    return softmax(logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=0, keepdims=True))
    return (e / e.sum(axis=0, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------- contenders
def f32_npz_write(path: Path, probs: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.savez_compressed(f, probabilities=probs)


def f32_npz_read(path: Path) -> np.ndarray:
    with np.load(path) as npz:
        return npz["probabilities"]


def f32_npy_write(path: Path, probs: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, probs)


def probstore_writer(quant: str, compress: int, stride: int) -> Callable:
    return lambda path, probs: write_probs(path, probs, quant=quant, compress=compress,
                                           stride=stride)


def contenders(stride: int) -> dict[str, tuple[Callable, Callable, int]]:
    """name -> (write(path, probs), read(path), stride)."""
    table = {"f32 npz-zip (nnU-Net)": (f32_npz_write, f32_npz_read, 1),
             "f32 npy": (f32_npy_write, np.load, 1)}
    for quant in ("uint8", "float16"):
        for level in (0, 1, 6):
            table[f"{quant} zip-{level}"] = (probstore_writer(quant, level, 1), read_probs, 1)
    if stride > 1:
        table[f"uint8 zip-1 stride {stride}"] = (probstore_writer("uint8", 1, stride), read_probs,
                                                 stride)
    return table


def measure(frames: Sequence[np.ndarray], write: Callable, read: Callable, stride: int,
            out: Path, repeat: int) -> dict:
    """Best-of-``repeat`` write and read times of all frames, then size and fidelity."""
    out.mkdir(parents=True)
    paths = [out / f"{i:05d}.npz" for i in range(len(frames))]
    t_write = t_read = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for path, probs in zip(paths, frames):
            write(path, probs)
        t_write = min(t_write, time.perf_counter() - start)
        start = time.perf_counter()
        for path in paths:
            read(path)
        t_read = min(t_read, time.perf_counter() - start)
    size = sum(p.stat().st_size for p in paths)
    err, agree, pixels = 0.0, 0, 0
    for path, probs in zip(paths, frames):
        back, ref = read(path), probs[:, ::stride, ::stride]
        err = max(err, float(np.abs(back - ref).max()))
        agree += int((back.argmax(axis=0) == ref.argmax(axis=0)).sum())
        pixels += ref[0].size
    shutil.rmtree(out)
    mb = sum(p.nbytes for p in frames) / 1e6
    return {"bytes_per_class_pixel": size / sum(p.size for p in frames),
            "write_mb_s": mb / t_write, "read_mb_s": mb / t_read, "max_abs_err": err,
            "argmax_agreement": agree / pixels}


# ----------------------------------------------------------------------------- ensemble mIoU
def _ensemble_labels(maps: np.ndarray) -> np.ndarray:
    maps = np.asarray(maps)
    mean = maps.mean(axis=0) if maps.ndim == 4 else maps
    return mean.argmax(axis=0).astype(np.uint8)


def ensemble_miou_float_vs_quantized(float_maps: Iterable[np.ndarray],
                                     quant_maps: Iterable[np.ndarray],
                                     labels: Iterable[np.ndarray], *, num_classes: int,
                                     ignore_index: int = 255) -> tuple[float, float]:
    """mIoU of the argmax of the member-mean map, for float32 maps and for their stored copies.

    Per frame: ``float_maps`` and ``quant_maps`` items are [M, C, H, W] (M members, averaged)
    or an already averaged [C, H, W]; ``labels`` items are uint8 [H, W] train ids (255 = void).
    Returns (mIoU of the float maps, mIoU of the quantized maps).
    """
    cm_f = ConfusionMatrix(num_classes=num_classes, ignore_index=ignore_index)
    cm_q = ConfusionMatrix(num_classes=num_classes, ignore_index=ignore_index)
    for f_maps, q_maps, gt in zip(float_maps, quant_maps, labels, strict=True):
        cm_f.update(gt, _ensemble_labels(f_maps))
        cm_q.update(gt, _ensemble_labels(q_maps))
    return mean_iou(cm_f.matrix), mean_iou(cm_q.matrix)


def synthetic_ensemble_check(rng: np.random.Generator, *, frames: int, members: int, classes: int,
                             height: int, width: int, work: Path) -> tuple[float, float, float]:
    """Both mIoUs on a synthetic ensemble (uint8 zip-1 copies); also returns the fraction of
    pixels whose ensemble label differs between the two."""
    float_sets, quant_sets, labels = [], [], []
    changed = total = 0
    for i in tqdm(range(frames), desc="synthetic ensemble", leave=False):
        truth = np.log(smooth_softmax(rng, classes=classes, height=height, width=width))
        gt = truth.argmax(axis=0).astype(np.uint8)
        maps = np.stack([softmax(truth + 3.0 * smooth_logit_noise(rng, truth.shape))
                         for _ in range(members)])
        back = []
        for m, probs in enumerate(maps):
            path = work / f"{i}_{m}.npz"
            write_probs(path, probs)
            back.append(read_probs(path))
            path.unlink()
        back = np.stack(back)
        changed += int((_ensemble_labels(maps) != _ensemble_labels(back)).sum())
        total += gt.size
        float_sets.append(maps)
        quant_sets.append(back)
        labels.append(gt)
    miou_f, miou_q = ensemble_miou_float_vs_quantized(float_sets, quant_sets, labels,
                                                      num_classes=classes)
    return miou_f, miou_q, changed / total


def demo_ensemble_check(run_dirs: Sequence[str], *, data: Path, folds: Path,
                        work: Path) -> tuple[float, float, int, int]:
    """Both mIoUs on real OOF predictions: each run predicts its validation fold (one plain
    view, float32 kept in memory and a uint8 copy written and read back through the store);
    runs of one member (model x seed) cover disjoint frames, members are averaged per frame.
    Returns (mIoU float32, mIoU uint8, members, frames)."""
    import torch

    from pipeline.core.names import member_name
    from pipeline.core.runs import RunPaths
    from pipeline.data.dataset import SegmentationDataset
    from pipeline.data.manifest import read_classes, read_manifest, read_mask
    from pipeline.data.splits import train_val_ids
    from pipeline.data.transforms import eval_transform
    from pipeline.inference.tta import TTAConfig, predict_probs
    from pipeline.models.checkpoint import model_from_checkpoint

    classes = read_classes(data / "classes.json")
    frames = {f.id: f for f in read_manifest(data / "manifest.csv", split="train")}
    maps: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for run in run_dirs:
        model, ckpt = model_from_checkpoint(RunPaths(Path(run)).final_weights())
        member = member_name(ckpt["config"]["run"]["name"], int(ckpt["seed"]))
        _, val_ids = train_val_ids(folds, ckpt["fold"])
        dataset = SegmentationDataset([frames[i] for i in val_ids], classes=classes,
                                      transform=eval_transform(), with_mask=False)
        for item in tqdm(dataset, desc=Path(run).name, leave=False, disable=None):
            with torch.no_grad():
                probs = predict_probs(model, item["image"], tta=TTAConfig(scales=(1.0,), flip=False),
                                      num_classes=classes.num_classes).numpy()
            path = work / f"{member}_{item['id']}.npz"
            write_probs(path, probs)
            maps.setdefault(item["id"], {})[member] = (probs, read_probs(path))
    members = sorted({m for per_frame in maps.values() for m in per_frame})
    ids = sorted(i for i, per_frame in maps.items() if len(per_frame) == len(members))
    lut = classes.lut_array()
    miou_f, miou_q = ensemble_miou_float_vs_quantized(
        (np.stack([maps[i][m][0] for m in members]) for i in ids),
        (np.stack([maps[i][m][1] for m in members]) for i in ids),
        (read_mask(frames[i].mask, lut) for i in ids), num_classes=classes.num_classes)
    return miou_f, miou_q, len(members), len(ids)


def smooth_logit_noise(rng: np.random.Generator, shape: tuple[int, ...],
                       cell: int = 8) -> np.ndarray:
    c, h, w = shape
    lo = rng.normal(size=(c, -(-h // cell) + 1, -(-w // cell) + 1))
    return ndimage.zoom(lo, (1, cell, cell), order=1)[:, :h, :w]


# ----------------------------------------------------------------------------- top-k maps
TOPK_KINDS = (0, 2, 3, 5, 8)   # 0 = dense
# (boost of the present classes, logit scale): "peaked" leaves ~5 non-zero uint8 codes per pixel
# (top-5 mass ~0.99), "softer" ~16 (top-5 mass ~0.89), a long tail dense deflate cannot drop
REGIMES = {"peaked": (3.0, 4.0), "softer": (2.0, 3.0)}


def peaked_logits(rng: np.random.Generator, *, classes: int, height: int, width: int,
                  present: int = 6, boost: float = 3.0, scale: float = 4.0) -> np.ndarray:
    """float32 [C, H, W] smooth logits of a scene of ``present`` dominant classes (of C): the
    present ones get +``boost`` x ``scale``, so softmax leaves the other classes little mass."""
    cell = max(16, height // 8)
    lo = rng.normal(size=(classes, -(-height // cell) + 1, -(-width // cell) + 1))
    lo[rng.choice(classes, size=min(present, classes), replace=False)] += boost
    return ndimage.zoom(lo.astype(np.float32), (1, cell, cell), order=1,
                        output=np.float32)[:, :height, :width] * scale


def _kind_name(k: int) -> str:
    return "dense uint8" if not k else f"top-{k} uint8"


def _store_all(maps: Sequence[np.ndarray], k: int, out: Path, repeat: int
               ) -> tuple[list[Path], float, float]:
    """Write ``maps`` as kind ``k`` and read them back; (paths, write s, read s), best of
    ``repeat``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{i:05d}.npz" for i in range(len(maps))]
    t_write = t_read = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for path, probs in zip(paths, maps):
            write_probs(path, probs, topk=k)
        t_write = min(t_write, time.perf_counter() - start)
        start = time.perf_counter()
        for path in paths:
            read_probs(path)
        t_read = min(t_read, time.perf_counter() - start)
    return paths, t_write, t_read


def synthetic_topk_check(rng: np.random.Generator, *, frames: int, members: int, classes: int,
                         height: int, width: int, work: Path, repeat: int,
                         boost: float, scale: float) -> dict:
    """Dense vs top-k on a synthetic ensemble (see the module docstring): per kind, bytes per
    pixel and class-pixel, fused mIoU minus float32's, write and read time."""
    truth, maps = [], []
    for _ in tqdm(range(frames), desc="peaked maps", leave=False):
        logits = peaked_logits(rng, classes=classes, height=height, width=width, boost=boost,
                               scale=scale)
        truth.append(logits.argmax(axis=0).astype(np.uint8 if classes <= 255 else np.uint16))
        maps += [softmax(logits + 2.0 * smooth_logit_noise(rng, logits.shape).astype(np.float32))
                 for _ in range(members)]
    pixels = frames * members * height * width
    cm_f = ConfusionMatrix(num_classes=classes, ignore_index=255 if classes <= 255 else 65535)
    fused_f = [_ensemble_labels(np.stack(maps[i * members:(i + 1) * members]))
               for i in range(frames)]
    for gt, labels in zip(truth, fused_f):
        cm_f.update(gt, labels)
    miou_f = mean_iou(cm_f.matrix)
    top = np.sort(np.stack(maps), axis=1)[:, ::-1]
    results = {"float32": {"miou": miou_f, "top5_mass": float(top[:, :5].sum(axis=1).mean())}}
    for k in TOPK_KINDS:
        paths, t_write, t_read = _store_all(maps, k, work / f"top{k}", repeat)
        size = sum(p.stat().st_size for p in paths)
        cm = ConfusionMatrix(num_classes=classes, ignore_index=cm_f.ignore_index)
        changed = 0
        for i, gt in enumerate(truth):
            labels = _ensemble_labels(np.stack([read_probs(p) for p in
                                                paths[i * members:(i + 1) * members]]))
            cm.update(gt, labels)
            changed += int((labels != fused_f[i]).sum())
        results[_kind_name(k)] = {"bytes_per_pixel": size / pixels,
                                  "bytes_per_class_pixel": size / pixels / classes,
                                  "miou_minus_float32": mean_iou(cm.matrix) - miou_f,
                                  "labels_changed": changed / (frames * height * width),
                                  "write_s": t_write, "read_s": t_read}
        shutil.rmtree(work / f"top{k}")
    return results


def real_topk_check(root: Path, *, work: Path, max_frames: int) -> dict | None:
    """Dense vs top-k on the member maps under ``root`` (infer.py's output): their OOF maps as
    stored (decoded) re-stored as top-k; per kind bytes per pixel and class-pixel and the
    share of pixels whose fused label (mean of the members) equals the dense fusion's. None
    without members with common OOF frames."""
    from pipeline.core.errors import PipelineError
    from pipeline.inference.members import list_members

    try:
        members = list_members(root)
    except PipelineError:
        return None
    ids = sorted(set.intersection(*(set(m.oof_ids()) for m in members)))[:max_frames]
    if not ids or any(m.topk for m in members):
        return None
    dense = {(m.name, i): m.read_oof(i) for m in members for i in ids}
    classes, pixels = members[0].classes, sum(p[0].size for p in dense.values())
    fused = {i: _ensemble_labels(np.stack([dense[m.name, i] for m in members])) for i in ids}
    results = {"members": len(members), "frames": len(ids), "classes": classes}
    for k in (k for k in TOPK_KINDS if k < classes):
        paths = {key: work / f"top{k}" / f"{n:05d}.npz" for n, key in enumerate(dense)}
        work.joinpath(f"top{k}").mkdir(parents=True, exist_ok=True)
        for key, path in paths.items():
            write_probs(path, dense[key], topk=k)
        same = sum(int((_ensemble_labels(np.stack([read_probs(paths[m.name, i]) for m in members]))
                        == fused[i]).sum()) for i in ids)
        size = sum(p.stat().st_size for p in paths.values())
        results[_kind_name(k)] = {"bytes_per_pixel": size / pixels,
                                  "bytes_per_class_pixel": size / pixels / classes,
                                  "fused_label_agreement": same / (pixels / len(members))}
        shutil.rmtree(work / f"top{k}")
    return results


def print_topk(results: dict, *, title: str, columns: Sequence[tuple[str, str, str]]) -> None:
    print(f"  {title}")
    print(f"    {'kind':<14}" + "".join(f"{head:>{len(head) + 3}}" for head, _, _ in columns))
    for name, r in results.items():
        if isinstance(r, dict) and "bytes_per_pixel" in r:
            print(f"    {name:<14}" + "".join(f"{fmt.format(r[key]):>{len(head) + 3}}"
                                              for head, key, fmt in columns))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--stride", type=int, default=1, help="also time uint8 with this stride")
    parser.add_argument("--big", action="store_true", help="12 frames, 19 classes, 512x1024")
    parser.add_argument("--members", type=int, default=5, help="synthetic ensemble size (0 = skip)")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many passes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", nargs="*", default=None,
                        help="run dirs (e.g. runs/*_f*_s*): also compare the ensemble mIoU of "
                             "their real OOF maps, float32 vs uint8")
    parser.add_argument("--data", default="data")
    parser.add_argument("--folds", default="folds/folds.csv")
    parser.add_argument("--topk-frames", type=int, default=12,
                        help="synthetic frames of the top-k check (0 = skip)")
    parser.add_argument("--topk-classes", type=int, default=124)
    parser.add_argument("--topk-size", type=int, nargs=2, default=[240, 427], metavar=("H", "W"))
    parser.add_argument("--oof", default="oof_preds",
                        help="member maps to re-store as top-k (skipped when absent)")
    parser.add_argument("--quick", action="store_true",
                        help="everything small: about a minute on one busy core")
    args = parser.parse_args(argv)
    if args.big:
        args.frames, args.classes, args.height, args.width = 12, 19, 512, 1024
    if args.quick:
        args.frames, args.repeat, args.members = min(args.frames, 20), 1, min(args.members, 2)
        args.topk_frames, args.topk_size = min(args.topk_frames, 4), [96, 160]

    rng = np.random.default_rng(args.seed)
    frames = [smooth_softmax(rng, classes=args.classes, height=args.height, width=args.width)
              for _ in tqdm(range(args.frames), desc="maps", leave=False)]
    mb = sum(p.nbytes for p in frames) / 1e6
    print(f"{args.frames} maps of {args.classes}x{args.height}x{args.width} "
          f"({mb:.0f} MB float32), best of {args.repeat}, {os.cpu_count()} CPU(s), "
          f"numpy {np.__version__}")
    work = Path(tempfile.mkdtemp(prefix="probstore_bench_", dir=args.dir))
    results = {}
    try:
        print(f"  {'contender':<26}{'B/class-px':>11}{'write MB/s':>12}{'read MB/s':>11}"
              f"{'max err':>10}{'argmax ok':>11}")
        for i, (name, (write, read, stride)) in enumerate(contenders(args.stride).items()):
            r = measure(frames, write, read, stride, work / str(i), args.repeat)
            results[name] = r
            print(f"  {name:<26}{r['bytes_per_class_pixel']:>11.3f}{r['write_mb_s']:>12.0f}"
                  f"{r['read_mb_s']:>11.0f}{r['max_abs_err']:>10.2e}"
                  f"{r['argmax_agreement']:>10.4%}")
        print(f"  (uint8 bound 1/510 = {1 / 510:.2e}; target <= 1 byte per class-pixel for uint8)")
        if args.members:
            n = min(args.frames, 50)
            miou_f, miou_q, changed = synthetic_ensemble_check(
                rng, frames=n, members=args.members, classes=args.classes,
                height=args.height, width=args.width, work=work)
            results["ensemble"] = {"miou_float32": miou_f, "miou_uint8": miou_q,
                                   "label_changed": changed}
            print(f"  synthetic {args.members}-member ensemble, {n} frames: mIoU float32 "
                  f"{miou_f:.4%}, uint8 {miou_q:.4%}, labels changed at {changed:.4%} of pixels")
        if args.runs:
            miou_f, miou_q, members, n = demo_ensemble_check(
                args.runs, data=Path(args.data), folds=Path(args.folds), work=work / "demo")
            results["demo_oof"] = {"miou_float32": miou_f, "miou_uint8": miou_q}
            print(f"  OOF maps of {len(args.runs)} run(s), {members} member(s), {n} frames: "
                  f"ensemble mIoU float32 {miou_f:.4%}, uint8 {miou_q:.4%}, difference "
                  f"{100 * abs(miou_f - miou_q):.4f} mIoU points (target < 0.05)")
        for regime, (boost, scale) in REGIMES.items() if args.topk_frames else ():
            h, w = args.topk_size
            r = synthetic_topk_check(rng, frames=args.topk_frames, members=3,
                                     classes=args.topk_classes, height=h, width=w,
                                     work=work / "topk", repeat=args.repeat, boost=boost,
                                     scale=scale)
            dense = r["dense uint8"]
            for name, row in r.items():
                if "write_s" in row:
                    row["write_vs_dense"] = row["write_s"] / dense["write_s"]
                    row["read_vs_dense"] = row["read_s"] / dense["read_s"]
            results[f"topk_{regime}"] = r
            print_topk(r, title=f"top-k, {regime}: {args.topk_frames} frames x 3 members of "
                       f"{args.topk_classes}x{h}x{w} (mean top-5 mass "
                       f"{r['float32']['top5_mass']:.3f}), float32 fusion mIoU "
                       f"{r['float32']['miou']:.4%}", columns=(
                           ("B/px", "bytes_per_pixel", "{:.3f}"),
                           ("B/class-px", "bytes_per_class_pixel", "{:.4f}"),
                           ("mIoU - f32 (pts)", "miou_minus_float32", "{:+.4%}"),
                           ("labels != f32", "labels_changed", "{:.4%}"),
                           ("write vs dense", "write_vs_dense", "{:.2f}x"),
                           ("read vs dense", "read_vs_dense", "{:.2f}x")))
        if args.topk_frames:
            print("    (goal: top-5 within 0.05 mIoU points of float32 at <= 0.1 B/class-px)")
        real = real_topk_check(Path(args.oof), work=work / "real",
                               max_frames=10 if args.quick else 100)
        if real is None:
            print(f"  real OOF maps: skipped, no members with common OOF maps under {args.oof} "
                  f"(run infer.py first)")
        else:
            results["topk_real"] = real
            print_topk(real, title=f"real OOF maps of {real['members']} member(s), "
                       f"{real['frames']} frames, {real['classes']} classes, re-stored from "
                       f"their dense uint8", columns=(
                           ("B/px", "bytes_per_pixel", "{:.3f}"),
                           ("B/class-px", "bytes_per_class_pixel", "{:.4f}"),
                           ("fused labels = dense", "fused_label_agreement", "{:.4%}")))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
