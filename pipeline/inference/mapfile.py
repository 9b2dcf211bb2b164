"""One compact, self-describing softmax probability map on disk: write, read, quantise, upsample.

One file per frame (``<id>.npz``, a zip of ``.npy`` members that ``np.load`` reads lazily):

* ``probs``      uint8 [C, h, w] codes ``round(255 p)`` (each value within 1/510 of the
                 original) or float16 [C, h, w] (``quant="float16"``, within 2**-12);
* ``tie_index``  uint32 [K] flat pixel indices (into h*w) and ``tie_class`` uint8/uint16 [K]:
                 the pixels where rounding made the true argmax class tie a lower class index,
                 and that true class (~0.1 % of the pixels of smooth uint8 maps, 5 bytes each);
* ``header``     UTF-8 JSON: format, space="prob", classes, height/width of the full frame,
                 stride, quant, and the writer's ``meta`` (member, frame id, checkpoint, TTA...).

Why a tie list rather than a dense argmax plane: rounding is monotone, so a larger
probability never gets a smaller code; the argmax of the codes can only go wrong where codes
tie, and ``np.argmax`` then picks the lowest tied index. Listing the pixels where that pick is
wrong, and nudging the true class up by one float32 ulp there on read, makes the argmax of the
decoded map equal the argmax of the original at *every* pixel (not only where the top two
differ by > 1/510) for ~1/C of the bytes a dense label plane would cost.

Stride: ``stride=s`` stores ``probs[:, ::s, ::s]`` (h = ceil(H/s), w = ceil(W/s)) and records
the full (H, W). ``full_size=True`` upsamples separably-linearly with stored sample k sitting at
full-resolution pixel k*s (edge values repeat past the last sample), so the upsampled map equals
the stored one on the strided grid and stays a convex mix of probabilities (sums to 1).

Compression (``bench/probstore.py``, smooth softmax maps, 10-19 classes): uint8 at zip deflate
level 1, the default, takes 0.24-0.40 bytes per class-pixel (stored uint8: 1.0; nnU-Net's
float32 savez_compressed: 3.8) and writes 4-14x faster than the latter; level 6 saves another
~15 % at half the write speed. float16 barely compresses (1.7-1.8 vs 2.0 bytes) at a quarter of
the speed, so float16 is stored uncompressed by default.

Where the files of a member live (``oof_preds/<member>/f<K>/...``): :mod:`pipeline.inference.members`.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.core.atomic import atomic_path
from pipeline.core.errors import PipelineError
from pipeline.core.names import MAP_META_FILE

FORMAT = "probstore/1"       # header tag of every map already on disk: keep it as is
EXT = ".npz"
QUANTS = ("uint8", "float16")
DEFAULT_COMPRESS = {"uint8": 1, "float16": 0}   # zip deflate level per quant; 0 = stored
PROB_EPS = 1e-3               # tolerance on [0, 1] before a map is taken for logits


def stored_bytes(*, classes: int, height: int, width: int, stride: int = 1,
                 quant: str = "uint8") -> int:
    """Bytes of the ``probs`` codes of one map of a ``height`` x ``width`` frame: ``classes`` x
    ceil(height / stride) x ceil(width / stride) x (1 for uint8, 2 for float16): the file before
    compression, less its tie list and header (a few hundred bytes and ~0.1 % of the pixels x 5
    bytes); uint8 files are deflated to about a third of it (module docstring)."""
    if quant not in QUANTS or stride < 1:
        raise PipelineError(f"quant must be one of {', '.join(QUANTS)} and stride >= 1, got "
                            f"{quant!r} and {stride!r}")
    return classes * -(-height // stride) * -(-width // stride) * np.dtype(quant).itemsize


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
                compress: int | None = None) -> None:
    """Write softmax probabilities ``probs`` float [C, H, W] (values in [0, 1]) atomically.

    ``quant``: "uint8" (codes round(255 p), error <= 1/510) or "float16". ``stride``: keep every
    ``stride``-th row and column. ``meta``: JSON-serializable facts about the map (member, frame
    id, checkpoint, TTA...), returned by :func:`read_meta` under "meta". ``compress``: zip
    deflate level 0-9 (0 = stored); None: 1 for uint8, 0 for float16 (see the module docstring).
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
    kept = full[:, ::stride, ::stride] if stride > 1 else full
    if quant == "uint8":
        codes = np.multiply(kept, 255, dtype=np.float32)
        codes += 0.5
        codes = codes.astype(np.uint8)  # floor(255 p + 0.5): round to nearest
    else:
        codes = _to_float16(kept)
    tie_index, tie_class = _tie_fixes(kept, codes)
    header = {"format": FORMAT, "space": "prob", "classes": c, "height": height, "width": width,
              "stride": int(stride), "quant": quant, "meta": dict(meta or {})}
    try:
        header_bytes = json.dumps(header).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise PipelineError(f"{path}: meta is not JSON-serializable ({err})") from None
    arrays = {"header": np.frombuffer(header_bytes, dtype=np.uint8), "probs": codes,
              "tie_index": tie_index, "tie_class": tie_class}
    method = zipfile.ZIP_DEFLATED if level else zipfile.ZIP_STORED
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=method, compresslevel=level or None) as zf:
            for name, arr in arrays.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.ascontiguousarray(arr),
                                              allow_pickle=False)


def _open(path: Path, names: Sequence[str]) -> tuple[dict, dict[str, np.ndarray]]:
    """Header dict and the named arrays of a map file, any failure a PipelineError."""
    if not path.is_file():
        raise PipelineError(f"{path}: probability map not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            header = json.loads(bytes(npz["header"]).decode("utf-8"))
            arrays = {name: npz[name] for name in names}
    except PipelineError:
        raise
    except Exception as err:  # zipfile, zlib, numpy format and JSON errors alike
        raise PipelineError(f"{path}: corrupt or truncated probability map "
                            f"({type(err).__name__}: {err})") from None
    bad = [name for name, arr in arrays.items() if not isinstance(arr, np.ndarray)]
    if bad:  # np.load hands back raw bytes for a member that is not an .npy
        raise PipelineError(f"{path}: corrupt probability map ({bad[0]} is not an array)")
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise PipelineError(f"{path}: not a probability map of format {FORMAT}")
    sizes = [header.get(key) for key in ("classes", "height", "width", "stride")]
    if (header.get("space") != "prob" or header.get("quant") not in QUANTS
            or not all(isinstance(v, int) and v >= 1 for v in sizes)):
        raise PipelineError(f"{path}: corrupt header {header}")
    return header, arrays


def _check_arrays(path: Path, header: dict, arrays: dict[str, np.ndarray]) -> None:
    s = header["stride"]
    want = (header["classes"], -(-header["height"] // s), -(-header["width"] // s))
    probs = arrays["probs"]
    if probs.shape != want or probs.dtype != np.dtype(header["quant"]):
        raise PipelineError(f"{path}: probs {probs.dtype}{list(probs.shape)} disagree with the "
                            f"header ({header['quant']}{list(want)})")
    # a finite probability's float16 bits are at most those of 1.0 (0x3C00): NaN, inf, negative
    # values (sign bit) and values above 1 are all larger, so one integer max checks them all
    if probs.dtype == np.float16 and probs.size and probs.view(np.uint16).max() > 0x3C00:
        raise PipelineError(f"{path}: probs hold nan, inf or values outside [0, 1]")
    index, cls = arrays["tie_index"], arrays["tie_class"]
    if (index.shape != cls.shape or index.ndim != 1
            or (index.size and (index.max() >= want[1] * want[2] or cls.max() >= want[0]))):
        raise PipelineError(f"{path}: tie-break arrays are inconsistent with the map")


def read_meta(path: str | os.PathLike) -> dict:
    """The header of a map (format, space, classes, height, width, stride, quant, meta) without
    decoding its arrays."""
    return _open(Path(path), ())[0]


def _read_codes(path: Path, expect: Mapping[str, Any] | None = None
                ) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    header, arrays = _open(path, ("probs", "tie_index", "tie_class"))
    if expect:  # what the run's meta.json says of its maps: a map stored otherwise is foreign
        differ = [f"{key} {header[key]} (its run's {MAP_META_FILE}: {value})"
                  for key, value in expect.items() if header.get(key) != value]
        if differ:
            raise PipelineError(f"{path}: stored with {', '.join(differ)}")
    _check_arrays(path, header, arrays)
    return header, arrays["probs"], arrays["tie_index"], arrays["tie_class"]


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Argmax of the original map at the stored resolution: uint8 [h, w] (uint16 when C > 255).

    For full-resolution labels of a strided map, take the argmax of
    ``read_probs(path, full_size=True)``.
    """
    _, codes, index, cls = _read_codes(Path(path))
    labels = np.argmax(_ordered(codes), axis=0).astype(_label_dtype(codes.shape[0]))
    labels.reshape(-1)[index] = cls
    return labels


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

    argmax over C equals the argmax of the map that was written (see the module docstring).
    ``expect``: header values the map must have ({"quant": "uint8", "classes": 19, ...}, what
    its run's meta.json says); every map is checked on read: its arrays match its header and
    a float16 map holds finite values in [0, 1]. Any failure names the file.
    """
    path = Path(path)
    header, codes, index, cls = _read_codes(path, expect)
    if codes.dtype == np.uint8:
        probs = codes.astype(np.float32)
        probs /= 255
    else:
        probs = codes.astype(np.float32)
    flat = probs.reshape(probs.shape[0], -1)
    flat[cls, index] = np.nextafter(flat[cls, index], np.float32(np.inf))
    if full_size:
        probs = upsample(probs, height=header["height"], width=header["width"],
                         stride=header["stride"])
    return probs
