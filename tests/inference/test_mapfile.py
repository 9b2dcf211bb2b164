"""Map files: quantization bounds, argmax fidelity, stride, metadata, errors, checks on read
and atomic writes."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.inference import mapfile
from pipeline.inference.mapfile import read_labels, read_meta, read_probs, write_probs

U8_BOUND = 1 / 510 + 1e-6  # round-to-nearest of 255 p, plus float32 slack


def softmax_map(rng, classes, height, width, scale=4.0):
    logits = rng.normal(size=(classes, height, width)) * scale
    e = np.exp(logits - logits.max(axis=0))
    return (e / e.sum(axis=0)).astype(np.float32)


def plain_argmax_fails(probs):
    """True where argmax of plain-rounded uint8 codes differs from the argmax of ``probs``."""
    codes = np.floor(probs * 255 + 0.5)
    return np.argmax(codes, axis=0) != np.argmax(probs, axis=0)


@pytest.mark.parametrize("classes", [2, 40, 300])
def test_uint8_round_trip_within_bound_and_argmax_kept(tmp_path, classes):
    rng = np.random.default_rng(classes)
    probs = softmax_map(rng, classes, 23, 31, scale=1.5 if classes > 100 else 4.0)
    path = tmp_path / "a.npz"
    write_probs(path, probs)
    back = read_probs(path)
    assert back.dtype == np.float32 and back.shape == probs.shape
    assert np.abs(back - probs).max() <= U8_BOUND
    assert np.array_equal(back.argmax(axis=0), probs.argmax(axis=0))
    labels = read_labels(path)
    assert labels.dtype == (np.uint8 if classes <= 255 else np.uint16)
    assert np.array_equal(labels, probs.argmax(axis=0))


def test_uint8_bucket_edges(tmp_path):
    # values straddling every rounding boundary (k + 0.5) / 255, and the ends of [0, 1]
    k = np.arange(255, dtype=np.float64)
    edges = np.concatenate([(k + 0.5) / 255 - 1e-7, (k + 0.5) / 255, (k + 0.5) / 255 + 1e-7,
                            k / 255, [0.0, 1.0]])
    p0 = np.clip(edges, 0, 1).astype(np.float32).reshape(1, 1, -1)
    probs = np.concatenate([p0, 1 - p0])
    write_probs(tmp_path / "e.npz", probs)
    back = read_probs(tmp_path / "e.npz")
    assert np.abs(back - probs).max() <= U8_BOUND
    assert back[:, 0, -2:].tolist() == [[0.0, 1.0], [1.0, 0.0]]  # the ends are exact


def _bucket_ties(rng: np.random.Generator, classes: int, h: int, w: int) -> np.ndarray:
    """Maps whose winner sits at a higher index than a runner-up 1/510..1/255 below it, both in
    the same uint8 rounding bucket: plain rounding ties them and argmax picks the runner-up."""
    probs = np.zeros((classes, h, w), np.float32)
    code = rng.integers(60, 120, size=(h, w))
    offset = rng.uniform(0.26, 0.49, size=(h, w))
    low = rng.integers(0, classes - 1, size=(h, w))
    high = low + 1 + rng.integers(0, classes - 1 - low)
    rows, cols = np.indices((h, w))
    probs[low, rows, cols] = (code - offset) / 255
    probs[high, rows, cols] = (code + offset) / 255
    rest = (1 - probs.sum(axis=0)) / (classes - 2)
    probs += np.where(probs == 0, rest, 0).astype(np.float32)
    return probs


def test_argmax_kept_where_plain_rounding_collides(tmp_path):
    rng = np.random.default_rng(1)
    classes, h, w = 6, 20, 30
    # the winner sits at a higher index than a runner-up that is 1/510..1/255 below it, both in
    # the same rounding bucket, so plain rounding ties them and argmax picks the runner-up
    probs = _bucket_ties(rng, classes, h, w)
    probs[:, 0, 0] = 1 / classes  # and an exact tie: argmax is the lowest index, as np.argmax
    assert (np.sort(probs, axis=0)[-1] - np.sort(probs, axis=0)[-2])[1:].min() > 1 / 510
    assert plain_argmax_fails(probs).mean() > 0.9  # the test is adversarial
    for quant in ("uint8", "float16"):
        path = tmp_path / f"{quant}.npz"
        write_probs(path, probs, quant=quant)
        back = read_probs(path)
        assert np.array_equal(back.argmax(axis=0), probs.argmax(axis=0)), quant
        assert np.array_equal(read_labels(path), probs.argmax(axis=0)), quant
        bound = U8_BOUND if quant == "uint8" else 2 ** -12 + 1e-7
        assert np.abs(back - probs).max() <= bound, quant


def test_float16_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    probs = softmax_map(rng, 8, 30, 40, scale=8.0)  # confident: many float16 subnormals
    assert (probs < 2 ** -14).mean() > 0.3
    write_probs(tmp_path / "h.npz", probs, quant="float16")
    back = read_probs(tmp_path / "h.npz")
    ref = probs.astype(np.float16).astype(np.float32)
    # numpy's float16 rounding bit for bit, except a one-ulp argmax nudge at ties
    assert np.all(np.abs(back - ref) <= np.spacing(ref))
    assert np.abs(back - probs).max() <= 2 ** -12 + 1e-7
    assert np.array_equal(back.argmax(axis=0), probs.argmax(axis=0))
    assert read_meta(tmp_path / "h.npz")["quant"] == "float16"


@pytest.mark.parametrize("stride", [2, 3])
def test_stride_store_and_full_size_read(tmp_path, stride):
    rng = np.random.default_rng(stride)
    probs = softmax_map(rng, 5, 25, 37)
    path = tmp_path / "s.npz"
    write_probs(path, probs, stride=stride)
    small = read_probs(path)
    assert small.shape == (5, -(-25 // stride), -(-37 // stride))
    assert np.abs(small - probs[:, ::stride, ::stride]).max() <= U8_BOUND
    full = read_probs(path, full_size=True)
    assert full.shape == probs.shape
    assert np.array_equal(full[:, ::stride, ::stride], small)  # exact on the strided grid
    assert np.allclose(full.sum(axis=0), 1, atol=5 * 1 / 510)  # still probabilities
    lo, hi = small.min(axis=(1, 2)), small.max(axis=(1, 2))  # convex mixes stay in range
    assert np.all(full.min(axis=(1, 2)) >= lo - 1e-6) and np.all(full.max(axis=(1, 2)) <= hi + 1e-6)
    meta = read_meta(path)
    assert (meta["height"], meta["width"], meta["stride"]) == (25, 37, stride)


def test_metadata_round_trip(tmp_path):
    probs = softmax_map(np.random.default_rng(3), 4, 6, 7)
    meta = {"member": "unet_s0", "frame": "vid_0001", "checkpoint": "runs/x/swa.pt",
            "tta": {"hflip": True, "scales": [0.75, 1.0]}}
    write_probs(tmp_path / "m.npz", probs, meta=meta, compress=0)
    header = read_meta(tmp_path / "m.npz")
    assert header == {"format": mapfile.FORMAT, "space": "prob", "classes": 4, "height": 6,
                      "width": 7, "stride": 1, "quant": "uint8", "meta": meta}
    with pytest.raises(PipelineError, match="JSON"):
        write_probs(tmp_path / "bad.npz", probs, meta={"x": object()})
    assert not (tmp_path / "bad.npz").exists()


@pytest.mark.parametrize("bad, match", [
    (lambda p: np.log(p), "logits"),
    (lambda p: p * 3, "logits"),
    (lambda p: p[0], r"\[C, H, W\]"),
    (lambda p: (p * 255).astype(np.uint8), "floating"),
    (lambda p: np.where(p > 0.5, np.nan, p), "nan"),
])
def test_bad_input_rejected(tmp_path, bad, match):
    probs = softmax_map(np.random.default_rng(4), 3, 5, 5)
    path = tmp_path / "x.npz"
    with pytest.raises(PipelineError, match=match) as err:
        write_probs(path, bad(probs))
    assert str(path) in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_options_rejected(tmp_path):
    probs = softmax_map(np.random.default_rng(5), 3, 5, 5)
    for kwargs in ({"quant": "int4"}, {"stride": 0}, {"compress": 11}):
        with pytest.raises(PipelineError):
            write_probs(tmp_path / "x.npz", probs, **kwargs)


@pytest.mark.parametrize("compress", [0, 1])
def test_corrupt_truncated_missing_files_named(tmp_path, compress):
    probs = softmax_map(np.random.default_rng(6), 5, 40, 40)
    good = tmp_path / "good.npz"
    write_probs(good, probs, compress=compress)
    data = good.read_bytes()
    truncated, flipped = tmp_path / "trunc.npz", tmp_path / "flip.npz"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = bytearray(data)
    middle = len(corrupt) // 2
    corrupt[middle:middle + 16] = bytes(b ^ 0xFF for b in corrupt[middle:middle + 16])
    flipped.write_bytes(bytes(corrupt))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all")
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, probs=probs)
    for path in (truncated, flipped, garbage, foreign, tmp_path / "missing.npz"):
        with pytest.raises(PipelineError) as err:
            read_probs(path)
        assert str(path) in str(err.value)
    for path in (truncated, garbage, foreign):
        with pytest.raises(PipelineError, match=str(path.name)):
            read_meta(path)


def test_header_shape_mismatch_detected(tmp_path):
    path = tmp_path / "odd.npz"
    write_probs(path, softmax_map(np.random.default_rng(7), 3, 4, 4))
    header = read_meta(path)
    header["classes"] = 4  # a header that no longer matches its arrays
    with zipfile.ZipFile(path) as zf:
        arrays = {name: zf.read(name) for name in zf.namelist() if name != "header.npy"}
    with zipfile.ZipFile(path, "w") as zf:
        with zf.open("header.npy", "w") as f:
            np.lib.format.write_array(f, np.frombuffer(json.dumps(header).encode(), np.uint8))
        for name, raw in arrays.items():
            zf.writestr(name, raw)
    assert read_meta(path)["classes"] == 4
    with pytest.raises(PipelineError, match="disagree with the header"):
        read_probs(path)


def test_read_meta_leaves_arrays_alone(tmp_path):
    path = tmp_path / "m.npz"
    write_probs(path, softmax_map(np.random.default_rng(9), 3, 4, 4), meta={"frame": "f"})
    with zipfile.ZipFile(path) as zf:
        raw = {name: zf.read(name) for name in zf.namelist()}
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in raw.items():
            zf.writestr(name, b"garbage" if name == "probs.npy" else data)
    assert read_meta(path)["meta"] == {"frame": "f"}
    with pytest.raises(PipelineError, match="corrupt"):
        read_probs(path)


def test_default_compression_per_quant(tmp_path):
    probs = softmax_map(np.random.default_rng(10), 3, 16, 16)
    for quant, method in (("uint8", zipfile.ZIP_DEFLATED), ("float16", zipfile.ZIP_STORED)):
        write_probs(tmp_path / f"{quant}.npz", probs, quant=quant)
        with zipfile.ZipFile(tmp_path / f"{quant}.npz") as zf:
            assert zf.getinfo("probs.npy").compress_type == method, quant
    write_probs(tmp_path / "stored.npz", probs, compress=0)
    assert (tmp_path / "uint8.npz").stat().st_size < (tmp_path / "stored.npz").stat().st_size


def test_atomic_writes(tmp_path, monkeypatch):
    probs = softmax_map(np.random.default_rng(8), 3, 8, 8)
    path = tmp_path / "maps" / "a.npz"
    write_probs(path, probs)
    assert [p.name for p in path.parent.iterdir()] == ["a.npz"]
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np.lib.format, "write_array", boom)
    with pytest.raises(OSError):
        write_probs(path, probs * 0.5)  # overwrite fails: the old file stays
    with pytest.raises(OSError):
        write_probs(path.parent / "b.npz", probs)  # a new file fails: nothing appears
    assert [p.name for p in path.parent.iterdir()] == ["a.npz"]
    assert path.read_bytes() == before


def _rewrite_probs(path, probs) -> None:
    """Replace the probs array of a map file, its header and tie lists kept (a foreign writer)."""
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["probs"] = probs
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -0.25, 1.5])
def test_float16_maps_are_checked_on_read(tmp_path, bad):
    path = tmp_path / "x.npz"
    probs = softmax_map(np.random.default_rng(9), 3, 4, 5)
    write_probs(path, probs, quant="float16")
    codes = read_probs(path).astype(np.float16)
    codes[1, 2, 3] = bad
    _rewrite_probs(path, codes)
    for read in (read_probs, read_labels):
        with pytest.raises(PipelineError, match="nan, inf or values outside") as err:
            read(path)
        assert str(path) in str(err.value)
    codes[1, 2, 3] = 1.0  # the bounds themselves are probabilities
    codes[0, 0, 0] = 0.0
    _rewrite_probs(path, codes)
    assert read_probs(path)[1, 2, 3] == 1.0


# ----------------------------------------------------------------------------- top-k maps
def _arrays(path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {name: npz[name] for name in npz.files}


def _rewrite_arrays(path, **changed) -> None:
    """Replace some arrays of a map file, the others kept (a foreign or broken writer)."""
    arrays = {**_arrays(path), **changed}
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def true_top_k(probs, k):
    """Classes of the k largest values per pixel, larger first, ties by the lower class."""
    return np.argsort(-probs, axis=0, kind="stable")[:k]


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("quant", ["uint8", "float16"])
def test_topk_round_trip(tmp_path, k, quant):
    classes = 12
    probs = softmax_map(np.random.default_rng(k), classes, 21, 26, scale=2.5)
    path = tmp_path / "k.npz"
    write_probs(path, probs, topk=k, quant=quant, meta={"frame": "f"})
    stored = _arrays(path)
    assert sorted(stored) == ["header", "probs", "top_class"]
    assert stored["top_class"].dtype == np.uint8 and stored["probs"].dtype == np.dtype(quant)
    top = true_top_k(probs, k)
    assert np.array_equal(stored["top_class"], top)   # exactly the K most probable, in order
    assert read_meta(path)["topk"] == k and read_meta(path)["meta"] == {"frame": "f"}
    back = read_probs(path)
    assert back.dtype == np.float32 and back.shape == probs.shape
    bound = U8_BOUND if quant == "uint8" else 2 ** -12 + 1e-7
    kept = np.take_along_axis(back, top.astype(np.intp), axis=0)
    assert np.abs(kept - np.take_along_axis(probs, top.astype(np.intp), axis=0)).max() <= bound
    # the other C-K classes share one value per pixel, never above the K-th stored value
    rest = np.ones(probs.shape, bool)
    np.put_along_axis(rest, top.astype(np.intp), False, axis=0)
    others = back.transpose(1, 2, 0)[rest.transpose(1, 2, 0)].reshape(*probs.shape[1:], -1)
    assert others.shape[-1] == classes - k and np.all(others == others[..., :1])
    assert np.all(others[..., 0] <= kept[-1])
    assert np.abs(back.sum(axis=0) - 1).max() <= (k + 1) * bound
    assert np.array_equal(back.argmax(axis=0), probs.argmax(axis=0))
    assert np.array_equal(read_labels(path), probs.argmax(axis=0))


def test_topk_spread_is_the_missing_mass_unless_clipped(tmp_path):
    probs = np.zeros((6, 1, 3), np.float32)
    probs[:, 0, 0] = [0.5, 0.3, 0.05, 0.05, 0.05, 0.05]  # rest 0.2 over 4 classes: 0.05
    probs[:, 0, 1] = [0.4, 0.2, 0.1, 0.1, 0.1, 0.1]
    probs[:, 0, 2] = [0.0, 0.5, 0.0, 0.0, 0.5, 0.0]      # a tie at the top: class 1 wins
    write_probs(tmp_path / "s.npz", probs, topk=2)
    back = read_probs(tmp_path / "s.npz")
    assert np.allclose(back[:, 0, 0], [128 / 255, 77 / 255] + [(1 - 205 / 255) / 4] * 4)
    # rest 0.4 over 4 = 0.1 per class; the 2nd stored value is 0.2: no clipping
    assert np.allclose(back[2:, 0, 1], (1 - (102 + 51) / 255) / 4)
    assert back[:, 0, 2].argmax() == 1 and read_labels(tmp_path / "s.npz")[0, 2] == 1
    assert np.allclose(back[[0, 2, 3, 5], 0, 2], 0)
    # clipped: K=1 of a flat map, the spread may not pass the stored top value
    flat = np.full((4, 2, 2), 0.25, np.float32)
    write_probs(tmp_path / "f.npz", flat, topk=1)
    back = read_probs(tmp_path / "f.npz")
    assert np.all(back[1:] <= 64 / 255) and np.all(back[0] > back[1:])  # class 0, nudged
    assert np.array_equal(read_labels(tmp_path / "f.npz"), np.zeros((2, 2)))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_topk_argmax_kept_with_planted_ties(tmp_path, k):
    rng = np.random.default_rng(10 + k)
    classes, h, w = 6, 20, 30
    # as in the dense test: winner above a runner-up of a lower index in the same rounding bucket
    probs = _bucket_ties(rng, classes, h, w)
    probs[:, 0, 0] = 1 / classes                       # all tie: class 0
    probs[:, 0, 1] = [0.1, 0.1, 0.1, 0.1, 0.3, 0.3]    # two tie at the top: class 4
    probs[:, 0, 2] = [0.0, 0.0, 0.5, 0.5, 0.0, 0.0]
    probs[:, 0, 3] = [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]    # more ties than K at the top
    assert plain_argmax_fails(probs).mean() > 0.9
    for quant in ("uint8", "float16"):
        path = tmp_path / f"{quant}.npz"
        write_probs(path, probs, quant=quant, topk=k)
        back = read_probs(path)
        assert np.array_equal(back.argmax(axis=0), probs.argmax(axis=0)), quant
        assert np.array_equal(read_labels(path), probs.argmax(axis=0)), quant
        full = read_probs(path, full_size=True)
        assert np.array_equal(full.argmax(axis=0), probs.argmax(axis=0)), quant


def test_topk_above_255_classes_uses_uint16_ids(tmp_path):
    probs = softmax_map(np.random.default_rng(11), 300, 9, 11, scale=3.0)
    path = tmp_path / "big.npz"
    write_probs(path, probs, topk=3)
    stored = _arrays(path)
    assert stored["top_class"].dtype == np.uint16
    assert np.array_equal(stored["top_class"], true_top_k(probs, 3))
    assert stored["top_class"].max() > 255
    labels = read_labels(path)
    assert labels.dtype == np.uint16 and np.array_equal(labels, probs.argmax(axis=0))
    assert np.array_equal(read_probs(path).argmax(axis=0), probs.argmax(axis=0))


def test_topk_strided_full_size_read(tmp_path):
    probs = softmax_map(np.random.default_rng(12), 7, 25, 37)
    path = tmp_path / "s.npz"
    write_probs(path, probs, topk=2, stride=3)
    small = read_probs(path)
    assert small.shape == (7, 9, 13)
    assert np.array_equal(small.argmax(axis=0), probs[:, ::3, ::3].argmax(axis=0))
    full = read_probs(path, full_size=True)
    assert full.shape == probs.shape
    assert np.array_equal(full[:, ::3, ::3], small)
    assert np.allclose(full.sum(axis=0), 1, atol=3 / 510)  # still probabilities


def test_dense_maps_unchanged_and_old_files_read(tmp_path):
    probs = softmax_map(np.random.default_rng(13), 5, 8, 9)
    write_probs(tmp_path / "default.npz", probs)
    write_probs(tmp_path / "zero.npz", probs, topk=0)
    data = (tmp_path / "default.npz").read_bytes()
    assert (tmp_path / "zero.npz").read_bytes() == data      # topk=0 is today's dense file
    header = read_meta(tmp_path / "default.npz")
    assert "topk" not in header and sorted(_arrays(tmp_path / "default.npz")) == [
        "header", "probs", "tie_class", "tie_index"]
    # an old dense map has no "topk": it counts as 0 for what its run's meta.json expects
    expect = {"classes": 5, "quant": "uint8", "stride": 1, "topk": 0}
    assert np.array_equal(read_probs(tmp_path / "default.npz", expect=expect),
                          read_probs(tmp_path / "default.npz"))
    with pytest.raises(PipelineError, match=r"default\.npz: stored with topk 0 \(its run's"):
        read_probs(tmp_path / "default.npz", expect={**expect, "topk": 2})
    write_probs(tmp_path / "k.npz", probs, topk=2)
    with pytest.raises(PipelineError, match=r"k\.npz: stored with topk 2 \(its run's"):
        read_probs(tmp_path / "k.npz", expect=expect)


def test_topk_options_rejected(tmp_path):
    probs = softmax_map(np.random.default_rng(14), 4, 5, 5)
    for topk in (4, 5, -1, True, 1.5):
        with pytest.raises(PipelineError, match="topk") as err:
            write_probs(tmp_path / "x.npz", probs, topk=topk)
        assert "x.npz" in str(err.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PipelineError, match="topk"):
        mapfile.stored_bytes(classes=4, height=5, width=5, topk=4)


@pytest.mark.parametrize("corrupt, match", [
    (lambda a: {"top_class": np.where(a["top_class"] == a["top_class"][0, 0, 0], 7,
                                      a["top_class"]).astype(np.uint8)}, "class 7 >= classes"),
    (lambda a: {"top_class": np.concatenate([a["top_class"][:1]] * 3)}, "twice"),
    (lambda a: {"top_class": a["top_class"].astype(np.uint16)}, "top_class uint16"),
    (lambda a: {"top_class": a["top_class"][:2]}, "disagrees with the header"),
    (lambda a: {"probs": a["probs"][:2]}, "disagree with the header"),
    (lambda a: {"probs": a["probs"][::-1].copy()}, "not sorted down"),
    (lambda a: {"probs": np.full_like(a["probs"], 200)}, "sum above 1"),
    (lambda a: {"top_class": None}, "corrupt"),
])
def test_corrupt_topk_arrays_rejected_naming_the_file(tmp_path, corrupt, match):
    path = tmp_path / "bad.npz"
    write_probs(path, softmax_map(np.random.default_rng(15), 6, 5, 7), topk=3)
    changed = corrupt(_arrays(path))
    if changed.get("top_class", 0) is None:  # a missing array
        arrays = _arrays(path)
        del arrays["top_class"]
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
    else:
        _rewrite_arrays(path, **changed)
    for read in (read_probs, read_labels):
        with pytest.raises(PipelineError, match=match) as err:
            read(path)
        assert str(path) in str(err.value)


@pytest.mark.parametrize("topk", [6, -1, True, "2"])
def test_corrupt_topk_header_rejected(tmp_path, topk):
    path = tmp_path / "h.npz"
    write_probs(path, softmax_map(np.random.default_rng(16), 6, 4, 4), topk=2)
    header = {**read_meta(path), "topk": topk}
    _rewrite_arrays(path, header=np.frombuffer(json.dumps(header).encode(), np.uint8))
    for read in (read_probs, read_meta):
        with pytest.raises(PipelineError, match="corrupt header") as err:
            read(path)
        assert str(path) in str(err.value)


@pytest.mark.parametrize("classes, quant, k", [(6, "uint8", 2), (6, "float16", 3),
                                               (300, "uint8", 5), (300, "float16", 1)])
def test_stored_bytes_are_the_arrays_of_a_topk_map(tmp_path, classes, quant, k):
    probs = softmax_map(np.random.default_rng(17), classes, 11, 13)
    write_probs(tmp_path / "m.npz", probs, quant=quant, topk=k, stride=2, compress=0)
    stored = _arrays(tmp_path / "m.npz")
    assert (stored["probs"].nbytes + stored["top_class"].nbytes
            == mapfile.stored_bytes(classes=classes, height=11, width=13, stride=2, quant=quant,
                                    topk=k))


def test_member_with_topk_maps_fuses_like_their_dense_decode(tmp_path):
    """A Member of top-k maps returns the decoded maps, and over 3 classes at K=2 (the third
    class gets the rest, as a dense map) the fused labels match a member of dense maps."""
    from pipeline.ensembling.fusion import fuse_labels, group_mean
    from pipeline.inference.members import Member, map_path, run_map_dir, write_run_meta

    rng = np.random.default_rng(18)
    root, classes = tmp_path / "oof_preds", 3
    truth = {(m, f, i): softmax_map(rng, classes, 6, 8, scale=2.0)
             for m in ("a", "b") for f in (0, 1) for i in ("t1", "t2")}
    for stored, topk in (("dense", 0), ("sparse", 2)):
        for m in ("a", "b"):
            for fold in (0, 1):
                run = run_map_dir(root / stored, f"{m}_s0", fold)
                for frame in ("t1", "t2"):
                    write_probs(map_path(run / "test", frame), truth[m, fold, frame], topk=topk)
                write_run_meta(run, {"member": f"{m}_s0", "fold": fold, "classes": classes,
                                     "quant": "uint8", "stride": 1,
                                     **({"topk": topk} if topk else {})})  # old meta: no topk
    dense = [Member(root / "dense" / f"{m}_s0") for m in ("a", "b")]
    sparse = [Member(root / "sparse" / f"{m}_s0") for m in ("a", "b")]
    assert [m.topk for m in dense + sparse] == [0, 0, 2, 2]
    for frame in ("t1", "t2"):
        for member in sparse:
            decoded = [read_probs(map_path(member.run_dir(f) / "test", frame)) for f in (0, 1)]
            assert np.array_equal(member.read_test(frame), (decoded[0] + decoded[1]) / 2)
        fused_dense = group_mean([m.read_test(frame) for m in dense])
        fused_sparse = group_mean([m.read_test(frame) for m in sparse])
        assert np.abs(fused_sparse - fused_dense).max() <= 3 / 510 + 1e-6
        labels_dense = fuse_labels(fused_dense, None, None, alpha=0.0, beta=0.0)
        labels_sparse = fuse_labels(fused_sparse, None, None, alpha=0.0, beta=0.0)
        top2 = np.sort(fused_dense, axis=0)[-2:]
        clear = top2[1] - top2[0] > 6 / 510
        assert clear.mean() > 0.8 and np.array_equal(labels_dense[clear], labels_sparse[clear])
    # a top-k map among a dense member's maps is foreign
    write_probs(map_path(dense[0].run_dir(0) / "test", "t1"), truth["a", 0, "t1"], topk=2)
    with pytest.raises(PipelineError, match=r"t1\.npz: stored with topk 2"):
        dense[0].read_test("t1")
