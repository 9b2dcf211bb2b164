"""One compact, self-describing softmax probability map on disk: write, read, quantise, upsample.

The module is long because its two encodings (dense and top-k) share the header, checks and
decoder, and every reader of a map goes through them here.

One file per frame (``<id>.npz``, a zip of ``.npy`` members that ``np.load`` reads lazily):

* ``probs``      uint8 [C, h, w] codes ``round(255 p)`` (each value within 1/510 of the
                 original) or float16 [C, h, w] (``quant="float16"``, within 2**-12);
* ``tie_index``  uint32 [T] flat pixel indices (into h*w) and ``tie_class`` uint8/uint16 [T]:
                 the pixels where rounding made the true argmax class tie a lower class index,
                 and that true class (~0.1 % of the pixels of smooth uint8 maps, 5 bytes each);
* ``header``     UTF-8 JSON: format, space="prob", classes, height/width of the full frame,
                 stride, quant, topk (top-k maps only) and the writer's ``meta`` (member, frame
                 id, checkpoint, TTA...).

Why a tie list rather than a dense argmax plane: rounding is monotone, so a larger
probability never gets a smaller code; the argmax of the codes can only go wrong where codes
tie, and ``np.argmax`` then picks the lowest tied index. Listing the pixels where that pick is
wrong, and nudging the true class up by one float32 ulp there on read, makes the argmax of the
decoded map equal the argmax of the original at *every* pixel (not only where the top two
differ by > 1/510) for ~1/C of the bytes a dense label plane would cost.

Top-k maps (``topk=K``, 1 <= K < C; the header says "topk": K, a header without it is dense):

* ``probs``      codes as above, [K, h, w]: per pixel the K largest probabilities, slot 0 the
                 largest, sorted by the true probability (ties: the lower class id first);
* ``top_class``  uint8 [K, h, w] (uint16 when C > 255) the class ids of those slots.

On read the mass outside the top K (1 minus the K decoded values, at least 0) is spread evenly
over the other C-K classes, clipped to at most the decoded K-th value. Why spread, not 0: the
decoded map stays a distribution summing to ~1, so fusion weighs every member's total mass
alike and upsampling stays a convex mix; a class outside one member's top K keeps a small share
that never passes a stored class (order kept) instead of an arbitrary 0 that would veto it in a
fused mean. No tie list is needed: slot 0 is ``np.argmax`` of the original (lowest class among
exact ties), and where its decoded value ties slot 1 (or the spread), read nudges it up one
float32 ulp. Readers get dense float32 [C, h, w] from :func:`read_probs` either way.

Stride: ``stride=s`` stores ``probs[:, ::s, ::s]`` (h = ceil(H/s), w = ceil(W/s)) and records
the full (H, W). ``full_size=True`` upsamples separably-linearly with stored sample k sitting at
full-resolution pixel k*s (edge values repeat past the last sample), so the upsampled map equals
the stored one on the strided grid and stays a convex mix of probabilities (sums to 1).

Compression (``bench/probstore.py``, smooth softmax maps, 10-19 classes): uint8 at zip deflate
level 1, the default, takes 0.24-0.40 bytes per class-pixel (stored uint8: 1.0; nnU-Net's
float32 savez_compressed: 3.8) and writes 4-14x faster than the latter; level 6 saves another
~15 % at half the write speed. float16 barely compresses (1.7-1.8 vs 2.0 bytes) at a quarter of
the speed, so float16 is stored uncompressed by default.

124 classes (``bench/probstore.py --quick``, 3 members, scenes of 6 dominant classes, uint8 at
deflate level 1): top-5 takes 0.037-0.045 bytes per class-pixel against dense's 0.038-0.099 (a
dense map deflates its tail of zero codes well; the longer the tail, the more top-k saves),
reads in 0.7-0.9x dense's time and writes in ~2x; the fused labels differ from a float32
fusion at 0.1-0.6 % of the pixels (dense: 0.07-0.13 %). Top-2 changes 2.7-4.6 % of them.

Where the files of a member live (``oof_preds/<member>/f<K>/...``): :mod:`pipeline.inference.members`.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline.core.atomic import atomic_path
from pipeline.core.errors import PipelineError
from pipeline.core.names import MAP_META_FILE

FORMAT = "probstore/1"       # header tag of every map already on disk: keep it as is
EXT = ".npz"
QUANTS = ("uint8", "float16")
DEFAULT_COMPRESS = {"uint8": 1, "float16": 0}   # zip deflate level per quant; 0 = stored
PROB_EPS = 1e-3               # tolerance on [0, 1] before a map is taken for logits
DENSE_ARRAYS = ("probs", "tie_index", "tie_class")
TOPK_ARRAYS = ("probs", "top_class")


def stored_bytes(*, classes: int, height: int, width: int, stride: int = 1,
                 quant: str = "uint8", topk: int = 0) -> int:
    """Bytes of the arrays of one map of a ``height`` x ``width`` frame before compression, less
    its header (a few hundred bytes) and a dense map's tie list (~0.1 % of the pixels x 5 bytes):
    ceil(height / stride) x ceil(width / stride) pixels x, per pixel, ``classes`` codes (dense,
    ``topk`` 0) or ``topk`` codes and class ids (1 byte each for uint8 codes and C <= 255, 2 for
    float16 codes and C > 255); uint8 files are deflated well below it (module docstring)."""
    if quant not in QUANTS or stride < 1 or not 0 <= topk < classes:
        raise PipelineError(f"quant must be one of {', '.join(QUANTS)}, stride >= 1 and "
                            f"0 <= topk < classes ({classes}), got {quant!r}, {stride!r} and "
                            f"{topk!r}")
    per_pixel = (classes * np.dtype(quant).itemsize if not topk else
                 topk * (np.dtype(quant).itemsize + np.dtype(_label_dtype(classes)).itemsize))
    return per_pixel * -(-height // stride) * -(-width // stride)


def _label_dtype(num_classes: int) -> type:
    return np.uint8 if num_classes <= 255 else np.uint16  # 255 stays free for "void"


def _to_float16(probs: np.ndarray) -> np.ndarray:
    """float32 [0, 1] -> float16, round to nearest even like ``astype`` (and -0 -> +0).

    numpy converts values below float16's smallest normal (2**-14) one by one in software,
    ~10x slower than the rest; most entries of a confident softmax map are that small. A
    subnormal float16's bit pattern is round(x * 2**24), so we write those bits directly.
    """
    small = probs < np.float32(2 ** -14)
    out = np.where(small, np.float32(0), probs).astype(np.float16)
    out.view(np.uint16)[small] = np.rint(probs[small] * np.float32(2 ** 24)).astype(np.uint16)
    return out


def _ordered(codes: np.ndarray) -> np.ndarray:
    """An integer view of the codes with the same order: the bits of non-negative float16
    values sort like the values, and integer compares are ~4x faster than float16 ones."""
    return codes.view(np.uint16) if codes.dtype == np.float16 else codes


def _tie_fixes(probs: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels where argmax(codes) != argmax(probs), and the true class there."""
    codes = _ordered(codes)
    c = codes.shape[0]
    top = codes.max(axis=0)
    count = np.zeros(top.shape, dtype=np.uint16)
    for k in range(c):  # C cheap passes instead of two full argmaxes over the map
        count += codes[k] == top
    cand = np.flatnonzero(count > 1)
    true = np.argmax(probs.reshape(c, -1)[:, cand], axis=0)
    wrong = np.argmax(codes.reshape(c, -1)[:, cand], axis=0) != true
    return cand[wrong].astype(np.uint32), true[wrong].astype(_label_dtype(c))


def _top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest values of ``probs`` float32 [C, h, w] per pixel, float32 [k, h, w]
    sorted down, and their classes [k, h, w]; among equal values the lower class comes first,
    so slot 0 is ``np.argmax``. One insertion pass per class, on the pixels where the class
    reaches the current k-th value; classes go by their mass in the frame, largest first, so
    past the first few a peaked map leaves few such pixels (~8x faster than
    ``np.argpartition``, which needs a pixel-major copy and breaks ties arbitrarily)."""
    c, n = probs.shape[0], probs[0].size
    flat = probs.reshape(c, n)
    vals = np.full((k, n), -1.0, dtype=np.float32)
    ids = np.zeros((k, n), dtype=_label_dtype(c))
    for cls in np.argsort(-flat.sum(axis=1, dtype=np.float64), kind="stable"):
        cand = np.flatnonzero(flat[cls] >= vals[k - 1])
        if not cand.size:
            continue
        v, idx = flat[cls, cand], np.full(cand.size, cls, dtype=ids.dtype)
        for j in range(k):  # carry the new value down, swapping with every smaller slot
            slot_v, slot_i = vals[j, cand], ids[j, cand]
            swap = (v > slot_v) | ((v == slot_v) & (idx < slot_i))  # ties: lower class first
            vals[j, cand], ids[j, cand] = np.where(swap, v, slot_v), np.where(swap, idx, slot_i)
            v, idx = np.where(swap, slot_v, v), np.where(swap, slot_i, idx)
    return vals.reshape(k, *probs.shape[1:]), ids.reshape(k, *probs.shape[1:])


def _quantise(probs: np.ndarray, quant: str) -> np.ndarray:
    if quant == "float16":
        return _to_float16(probs)
    codes = np.multiply(probs, 255, dtype=np.float32)
    codes += 0.5
    return codes.astype(np.uint8)  # floor(255 p + 0.5): round to nearest


def _check_probs(probs: Any, path: Path) -> np.ndarray:
    probs = np.asarray(probs)
    if probs.ndim != 3 or min(probs.shape) < 1:
        raise PipelineError(f"{path}: probabilities must be [C, H, W], got shape {probs.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise PipelineError(f"{path}: probabilities must be floating point, got {probs.dtype}")
    lo, hi = float(probs.min()), float(probs.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise PipelineError(f"{path}: probabilities hold nan or inf")
    if lo < -PROB_EPS or hi > 1 + PROB_EPS:
        raise PipelineError(f"{path}: values in [{lo:.3g}, {hi:.3g}] are not probabilities in "
                            f"[0, 1]; logits? apply softmax over the class axis first")
    if lo < 0 or hi > 1:
        probs = np.clip(probs, 0.0, 1.0)
    return probs.astype(np.float32, copy=False)


def write_probs(path: str | os.PathLike, probs: np.ndarray, *, quant: str = "uint8",
                stride: int = 1, meta: Mapping[str, Any] | None = None,
                compress: int | None = None, topk: int = 0) -> None:
    """Write softmax probabilities ``probs`` float [C, H, W] (values in [0, 1]) atomically.

    ``quant``: "uint8" (codes round(255 p), error <= 1/510) or "float16". ``stride``: keep every
    ``stride``-th row and column. ``meta``: JSON-serializable facts about the map (member, frame
    id, checkpoint, TTA...), returned by :func:`read_meta` under "meta". ``compress``: zip
    deflate level 0-9 (0 = stored); None: 1 for uint8, 0 for float16 (see the module docstring).
    ``topk``: 0 = dense; K (1 <= K < C): keep the K most probable classes per pixel.
    """
    path = Path(path)
    if quant not in QUANTS:
        raise PipelineError(f"{path}: quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise PipelineError(f"{path}: stride must be an integer >= 1, got {stride!r}")
    level = DEFAULT_COMPRESS[quant] if compress is None else int(compress)
    if not 0 <= level <= 9:
        raise PipelineError(f"{path}: compress must be a zlib level 0-9, got {compress!r}")
    full = _check_probs(probs, path)
    c, height, width = full.shape
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or not 0 <= topk < c:
        raise PipelineError(f"{path}: topk must be an integer in [0, {c - 1}] for {c} classes "
                            f"(0 = dense), got {topk!r}")
    kept = full[:, ::stride, ::stride] if stride > 1 else full
    header = {"format": FORMAT, "space": "prob", "classes": c, "height": height, "width": width,
              "stride": int(stride), "quant": quant}
    if topk:  # rounding is monotone: the codes stay sorted down like the values
        top, top_class = _top_k(kept, int(topk))
        arrays = {"probs": _quantise(top, quant), "top_class": top_class}
        header["topk"] = int(topk)
    else:
        codes = _quantise(kept, quant)
        tie_index, tie_class = _tie_fixes(kept, codes)
        arrays = {"probs": codes, "tie_index": tie_index, "tie_class": tie_class}
    header["meta"] = dict(meta or {})
    try:
        header_bytes = json.dumps(header).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise PipelineError(f"{path}: meta is not JSON-serializable ({err})") from None
    arrays = {"header": np.frombuffer(header_bytes, dtype=np.uint8), **arrays}
    method = zipfile.ZIP_DEFLATED if level else zipfile.ZIP_STORED
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=method, compresslevel=level or None) as zf:
            for name, arr in arrays.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.ascontiguousarray(arr),
                                              allow_pickle=False)


def _topk_of(header: Mapping[str, Any]) -> Any:
    return header.get("topk", 0)  # maps written before top-k existed are dense


def _check_header(path: Path, header: Any) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise PipelineError(f"{path}: not a probability map of format {FORMAT}")
    sizes = [header.get(key) for key in ("classes", "height", "width", "stride")]
    topk = _topk_of(header)
    if (header.get("space") != "prob" or header.get("quant") not in QUANTS
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes)
            or not isinstance(topk, int) or isinstance(topk, bool)
            or not 0 <= topk < header["classes"]):
        raise PipelineError(f"{path}: corrupt header {header}")


def _open(path: Path, with_arrays: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """Header dict and (``with_arrays``) the arrays of a map file, dense or top-k as its header
    says; any failure a PipelineError."""
    if not path.is_file():
        raise PipelineError(f"{path}: probability map not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            header = json.loads(bytes(npz["header"]).decode("utf-8"))
            _check_header(path, header)
            names = () if not with_arrays else TOPK_ARRAYS if _topk_of(header) else DENSE_ARRAYS
            arrays = {name: npz[name] for name in names}
    except PipelineError:
        raise
    except Exception as err:  # zipfile, zlib, numpy format and JSON errors alike
        raise PipelineError(f"{path}: corrupt or truncated probability map "
                            f"({type(err).__name__}: {err})") from None
    bad = [name for name, arr in arrays.items() if not isinstance(arr, np.ndarray)]
    if bad:  # np.load hands back raw bytes for a member that is not an .npy
        raise PipelineError(f"{path}: corrupt probability map ({bad[0]} is not an array)")
    return header, arrays


def _check_arrays(path: Path, header: dict, arrays: dict[str, np.ndarray]) -> None:
    s, topk = header["stride"], _topk_of(header)
    want = (topk or header["classes"], -(-header["height"] // s), -(-header["width"] // s))
    probs = arrays["probs"]
    if probs.shape != want or probs.dtype != np.dtype(header["quant"]):
        raise PipelineError(f"{path}: probs {probs.dtype}{list(probs.shape)} disagree with the "
                            f"header ({header['quant']}{list(want)})")
    # a finite probability's float16 bits are at most those of 1.0 (0x3C00): NaN, inf, negative
    # values (sign bit) and values above 1 are all larger, so one integer max checks them all
    if probs.dtype == np.float16 and probs.size and probs.view(np.uint16).max() > 0x3C00:
        raise PipelineError(f"{path}: probs hold nan, inf or values outside [0, 1]")
    if topk:
        _check_top_k(path, header["classes"], probs, arrays["top_class"])
        return
    index, cls = arrays["tie_index"], arrays["tie_class"]
    if (index.shape != cls.shape or index.ndim != 1
            or (index.size and (index.max() >= want[1] * want[2] or cls.max() >= want[0]))):
        raise PipelineError(f"{path}: tie-break arrays are inconsistent with the map")


def _check_top_k(path: Path, classes: int, codes: np.ndarray, ids: np.ndarray) -> None:
    """A top-k map's class ids are valid and distinct per pixel, and its codes sorted down and
    summing to at most 1 (plus rounding): what the argmax guarantee and the spread rely on."""
    if ids.shape != codes.shape or ids.dtype != _label_dtype(classes):
        raise PipelineError(f"{path}: top_class {ids.dtype}{list(ids.shape)} disagrees with the "
                            f"header ({np.dtype(_label_dtype(classes))}{list(codes.shape)})")
    if ids.size and ids.max() >= classes:
        raise PipelineError(f"{path}: top_class holds class {ids.max()} >= classes {classes}")
    k = ids.shape[0]
    if any(np.any(ids[a] == ids[b]) for a in range(k) for b in range(a + 1, k)):
        raise PipelineError(f"{path}: top_class lists a class twice at one pixel")
    ordered = _ordered(codes)
    if any(np.any(ordered[j] < ordered[j + 1]) for j in range(k - 1)):
        raise PipelineError(f"{path}: top-k probabilities are not sorted down at every pixel")
    total = codes.sum(axis=0, dtype=np.float32)
    if total.size and total.max() > (255 + k / 2 if codes.dtype == np.uint8 else 1 + k * 2**-11):
        raise PipelineError(f"{path}: top-k probabilities sum above 1")


def read_meta(path: str | os.PathLike) -> dict:
    """The header of a map (format, space, classes, height, width, stride, quant, topk of a
    top-k map, meta) without decoding its arrays."""
    return _open(Path(path), with_arrays=False)[0]


def _read_arrays(path: Path, expect: Mapping[str, Any] | None = None
                 ) -> tuple[dict, dict[str, np.ndarray]]:
    header, arrays = _open(path)
    if expect:  # what the run's meta.json says of its maps: a map stored otherwise is foreign
        found = {key: _topk_of(header) if key == "topk" else header.get(key) for key in expect}
        differ = [f"{key} {found[key]} (its run's {MAP_META_FILE}: {value})"
                  for key, value in expect.items() if found[key] != value]
        if differ:
            raise PipelineError(f"{path}: stored with {', '.join(differ)}")
    _check_arrays(path, header, arrays)
    return header, arrays


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Argmax of the original map at the stored resolution: uint8 [h, w] (uint16 when C > 255).

    For full-resolution labels of a strided map, take the argmax of
    ``read_probs(path, full_size=True)``.
    """
    header, arrays = _read_arrays(Path(path))
    if _topk_of(header):
        return arrays["top_class"][0].copy()  # slot 0 is the original argmax
    codes = arrays["probs"]
    labels = np.argmax(_ordered(codes), axis=0).astype(_label_dtype(codes.shape[0]))
    labels.reshape(-1)[arrays["tie_index"]] = arrays["tie_class"]
    return labels


def _decode(codes: np.ndarray) -> np.ndarray:
    probs = codes.astype(np.float32)
    if codes.dtype == np.uint8:
        probs /= 255
    return probs


def _dense_from_top_k(top: np.ndarray, ids: np.ndarray, *, classes: int) -> np.ndarray:
    """float32 [C, h, w] from the decoded top-k values [K, h, w] (sorted down) and their class
    ids: the rest of the mass spread evenly, at most the K-th value; slot 0 nudged up one ulp
    where it ties, so the argmax is slot 0's class (the module docstring says why)."""
    k = top.shape[0]
    rest = np.maximum(1 - top.sum(axis=0), 0, dtype=np.float32)
    spread = np.minimum(rest / np.float32(classes - k), top[k - 1])
    rival = top[1] if k > 1 else spread
    top[0] = np.where(top[0] <= rival, np.nextafter(top[0], np.float32(np.inf)), top[0])
    probs = np.empty((classes, *top.shape[1:]), dtype=np.float32)
    probs[...] = spread
    np.put_along_axis(probs, ids.astype(np.intp), top, axis=0)
    return probs


def upsample(probs: np.ndarray, *, height: int, width: int, stride: int) -> np.ndarray:
    """Separable linear upsampling of a strided map float32 [C, h, w] to [C, height, width].

    Sample k of an axis sits at full-resolution pixel k*stride; pixels past the last sample
    repeat it. Exact on the strided grid; each output is a convex mix of stored values.
    """
    if stride == 1:
        return probs

    def axis_weights(n_full: int, n_kept: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.arange(n_full, dtype=np.float64) / stride
        lo = np.minimum(np.floor(pos).astype(np.intp), n_kept - 1)
        hi = np.minimum(lo + 1, n_kept - 1)
        frac = np.where(hi > lo, pos - lo, 0.0).astype(np.float32)
        return lo, hi, frac

    lo, hi, f = axis_weights(height, probs.shape[1])
    rows = probs[:, lo] * (1 - f)[:, None] + probs[:, hi] * f[:, None]
    lo, hi, f = axis_weights(width, probs.shape[2])
    return rows[:, :, lo] * (1 - f) + rows[:, :, hi] * f


def read_probs(path: str | os.PathLike, *, full_size: bool = False,
               expect: Mapping[str, Any] | None = None) -> np.ndarray:
    """Probabilities float32 [C, h, w] at the stored resolution, or [C, H, W] with ``full_size``.

    argmax over C equals the argmax of the map that was written (see the module docstring); a
    top-k map is decoded to the same dense shape (the rest of its mass spread evenly).
    ``expect``: header values the map must have ({"quant": "uint8", "classes": 19, ...}, what
    its run's meta.json says); every map is checked on read: its arrays match its header and
    a float16 map holds finite values in [0, 1]. Any failure names the file.
    """
    header, arrays = _read_arrays(Path(path), expect)
    probs = _decode(arrays["probs"])
    if _topk_of(header):
        probs = _dense_from_top_k(probs, arrays["top_class"], classes=header["classes"])
    else:
        index, cls = arrays["tie_index"], arrays["tie_class"]
        flat = probs.reshape(probs.shape[0], -1)
        flat[cls, index] = np.nextafter(flat[cls, index], np.float32(np.inf))
    if full_size:
        probs = upsample(probs, height=header["height"], width=header["width"],
                         stride=header["stride"])
    return probs
