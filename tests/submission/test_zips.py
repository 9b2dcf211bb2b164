"""Submission zips: every format's round trip, deterministic bytes, every refusal of check_zip,
and untrusted zips read back (duplicates, strays, bombs)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.errors import PipelineError
from pipeline.data.cityscapes import CITYSCAPES_TRAIN_TO_LABEL
from pipeline.data.manifest import ClassInfo, Frame, default_palette
from pipeline.submission.formats import expected_entries, get_format
from pipeline.submission.zips import ZIP_DATE, ZipPredictions, check_zip, png_bytes, png_size_limit, write_zip

H, W = 6, 9
# format name, dataset, vspw offset, number of classes
CASES = [("folder", "demo", 0, 10), ("camvid", "camvid", 0, 11), ("cityscapes", "cityscapes", 0, 19),
         ("vspw", "vspw", 0, 124), ("vspw", "vspw", 1, 124), ("vspw", "demo", 1, 10)]


def make_frames(fmt_name: str) -> list[Frame]:
    """Two test videos of three frames each, ids/paths as the adapter of that dataset builds them."""
    frames = []
    for v, video in enumerate(("aachen_000001", "bonn_000002") if fmt_name == "cityscapes" else ("v0", "v1")):
        for t in range(3):
            stem = f"{t:06d}" if fmt_name == "cityscapes" else f"{t:04d}"
            fid = f"{video}_{stem}"
            image = f"/data/{video}/origin/{stem}.jpg" if fmt_name == "vspw" else f"/data/img/{fid}.png"
            frames.append(Frame(id=fid, image=image, mask=None, video=video, frame=t, split="test",
                                height=H + v, width=W))
    return frames


def make_classes(dataset: str, num_classes: int) -> ClassInfo:
    return ClassInfo(names=[f"c{i}" for i in range(num_classes)], palette=default_palette(num_classes),
                     dataset=dataset)


def predictions(frames, num_classes, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    preds = {f.id: rng.integers(0, num_classes, (f.height, f.width)).astype(np.uint8) for f in frames}
    preds[frames[0].id].flat[:num_classes] = np.arange(num_classes)  # every class at least once
    return preds


def build_zip(path: Path, fmt, frames, preds, num_classes) -> None:
    entries = expected_entries(fmt, frames)
    write_zip(path, ((name, png_bytes(fmt.encode(preds[f.id], num_classes=num_classes, name=name)))
                     for name, f in entries.items()))


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a zip entry by entry through ``edit(name, data) -> [(name, data), ...]``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            for name, data in edit(info.filename, zin.read(info.filename)):
                zout.writestr(name, data)
    return dst


def png_of(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(np.asarray(array, dtype=np.uint8))
    (img.convert(mode) if mode else img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name,dataset,offset,num_classes", CASES)
def test_round_trip(tmp_path, name, dataset, offset, num_classes):
    fmt = get_format(name, dataset=dataset, vspw_offset=offset)
    frames, classes = make_frames(name), make_classes(dataset, num_classes)
    preds = predictions(frames, num_classes)
    path = tmp_path / "sub.zip"
    build_zip(path, fmt, frames, preds, num_classes)
    assert check_zip(path, fmt=fmt, frames=frames, classes=classes)["entries"] == len(frames)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        stored = np.asarray(Image.open(io.BytesIO(zf.read(names[0]))))
    assert names == sorted(names) and len(names) == len(frames)
    if name == "vspw":
        assert names[0] == "v0/0000.png"  # <video>/<image stem>.png
        assert stored.min() >= offset and stored.max() <= num_classes - 1 + offset
    elif name == "cityscapes":
        assert names[0] == "aachen_000001_000000.png"
        assert set(np.unique(stored)) <= set(CITYSCAPES_TRAIN_TO_LABEL)
    else:
        assert names[0] == "v0_0000.png"
    with ZipPredictions(path, fmt=fmt, num_classes=num_classes) as source:
        assert source.missing(frames) == []
        for frame in frames:
            decoded = source(frame)
            assert decoded.dtype == np.uint8
            np.testing.assert_array_equal(decoded, preds[frame.id])


def test_zip_is_deterministic(tmp_path):
    fmt = get_format("vspw", dataset="vspw", vspw_offset=1)
    frames = make_frames("vspw")
    preds = predictions(frames, 124)
    build_zip(tmp_path / "a.zip", fmt, frames, preds, 124)
    build_zip(tmp_path / "b.zip", fmt, frames, {k: v.copy() for k, v in preds.items()}, 124)
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.zip") as zf:
        for info in zf.infolist():
            assert info.date_time == ZIP_DATE
            assert info.external_attr >> 16 == 0o100644
            assert info.compress_type == zipfile.ZIP_DEFLATED
    preds[frames[-1].id][0, 0] = (preds[frames[-1].id][0, 0] + 1) % 124
    build_zip(tmp_path / "c.zip", fmt, frames, preds, 124)
    assert (tmp_path / "c.zip").read_bytes() != (tmp_path / "a.zip").read_bytes()
    with pytest.raises(ValueError, match="sorted"):
        write_zip(tmp_path / "d.zip", [("b.png", b""), ("a.png", b"")])
    assert not (tmp_path / "d.zip").exists() and not list(tmp_path.glob(".d.zip*"))


@pytest.fixture
def good_zip(tmp_path):
    fmt = get_format("vspw", dataset="vspw", vspw_offset=1)
    frames, classes = make_frames("vspw"), make_classes("vspw", 124)
    path = tmp_path / "good.zip"
    build_zip(path, fmt, frames, predictions(frames, 124), 124)
    return path, dict(fmt=fmt, frames=frames, classes=classes)


def _refused(path: Path, kwargs: dict, *needles: str) -> str:
    with pytest.raises(PipelineError) as err:
        check_zip(path, **kwargs)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    for needle in needles:
        assert needle in message
    return message


def test_check_zip_refuses_wrong_layouts(good_zip, tmp_path):
    path, kwargs = good_zip
    nested = rewrite(path, tmp_path / "nested.zip", lambda n, d: [(f"submission/{n}", d)])
    _refused(nested, kwargs, "inside the folder 'submission/'", "<video>/<frame>.png")
    flat = rewrite(path, tmp_path / "flat.zip", lambda n, d: [(n.replace("/", "_"), d)])
    _refused(flat, kwargs, "unexpected entry 'v0_0000.png'")
    missing = rewrite(path, tmp_path / "missing.zip", lambda n, d: [] if n == "v1/0002.png" else [(n, d)])
    _refused(missing, kwargs, "1 of 6", "'v1/0002.png'", "frame 'v1_0002'")
    extra = rewrite(path, tmp_path / "extra.zip",
                    lambda n, d: [(n, d), ("v1/0099.png", d)] if n == "v1/0002.png" else [(n, d)])
    _refused(extra, kwargs, "unexpected entry 'v1/0099.png'")
    stray_dir = rewrite(path, tmp_path / "dir.zip",
                        lambda n, d: [(n, d), ("notes/", b"")] if n == "v0/0000.png" else [(n, d)])
    _refused(stray_dir, kwargs, "unexpected entry 'notes/'")
    video_dir = rewrite(path, tmp_path / "vdir.zip",
                        lambda n, d: [("v0/", b""), (n, d)] if n == "v0/0000.png" else [(n, d)])
    assert check_zip(video_dir, **kwargs)["entries"] == 6  # folder entries of the layout are fine


def test_check_zip_refuses_a_wrapped_flat_format(tmp_path):
    fmt = get_format("cityscapes", dataset="cityscapes")
    frames, classes = make_frames("cityscapes"), make_classes("cityscapes", 19)
    build_zip(tmp_path / "ok.zip", fmt, frames, predictions(frames, 19), 19)
    wrapped = rewrite(tmp_path / "ok.zip", tmp_path / "wrapped.zip", lambda n, d: [(f"results/{n}", d)])
    _refused(wrapped, dict(fmt=fmt, frames=frames, classes=classes), "inside the folder 'results/'",
             "<city>_<seq>_<frame>.png at the zip root")


def test_check_zip_refuses_bad_entries(good_zip, tmp_path):
    path, kwargs = good_zip
    small = rewrite(path, tmp_path / "size.zip",
                    lambda n, d: [(n, png_of(np.ones((H, W - 1)))) if n == "v0/0001.png" else (n, d)])
    _refused(small, kwargs, "v0/0001.png", "size 6x8", "(6x9, HxW)")
    rgb = rewrite(path, tmp_path / "rgb.zip",
                  lambda n, d: [(n, png_of(np.ones((H, W)), "RGB")) if n == "v0/0001.png" else (n, d)])
    _refused(rgb, kwargs, "v0/0001.png", "mode is RGB")
    wide = rewrite(path, tmp_path / "i16.zip",
                   lambda n, d: [(n, png_of(np.ones((H, W)), "I;16")) if n == "v0/0001.png" else (n, d)])
    _refused(wide, kwargs, "v0/0001.png", "mode is I;16")
    high = np.ones((H, W))
    high[2, 2] = 125
    out_of_range = rewrite(path, tmp_path / "range.zip",
                           lambda n, d: [(n, png_of(high)) if n == "v0/0002.png" else (n, d)])
    _refused(out_of_range, kwargs, "v0/0002.png", "value 125", "1..124")
    void = rewrite(path, tmp_path / "void.zip",
                   lambda n, d: [(n, png_of(np.zeros((H, W)))) if n == "v0/0002.png" else (n, d)])
    _refused(void, kwargs, "v0/0002.png", "value 0")
    jpeg = io.BytesIO()
    Image.fromarray(np.ones((H, W), dtype=np.uint8)).save(jpeg, format="JPEG")
    not_png = rewrite(path, tmp_path / "jpeg.zip",
                      lambda n, d: [(n, jpeg.getvalue()) if n == "v0/0002.png" else (n, d)])
    _refused(not_png, kwargs, "v0/0002.png", "JPEG")
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"not a zip")
    _refused(garbage, kwargs, "not a readable zip")


# ----------------------------------------------------------------------------- untrusted zips
def _png_header_only(height: int, width: int) -> bytes:
    """A PNG that declares HxW 8-bit grey but holds one row of data: decoding it would
    allocate H*W bytes, reading its header costs nothing."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
            + chunk(b"IEND", b""))


def test_png_size_limit_bounds_a_legit_png():
    # the worst legit encoding: no compression at all (PIL's level 0), and a 16-bit PNG
    rng = np.random.default_rng(0)
    for height, width in ((1, 1), (6, 9), (300, 517)):
        noise = rng.integers(0, 256, (height, width)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noise).save(buf, format="PNG", compress_level=0)
        assert len(buf.getvalue()) <= png_size_limit(height, width)
        assert len(png_of(noise.astype(np.uint16) * 257, "I;16")) <= png_size_limit(height, width)
    assert png_size_limit(1080, 1920) < 6 * 2**20  # a 1 GiB entry is far beyond any frame


def test_zip_predictions_refuse_duplicates_strays_and_bombs(good_zip, tmp_path, monkeypatch):
    path, kwargs = good_zip
    fmt, frames = kwargs["fmt"], kwargs["frames"]
    with pytest.warns(UserWarning, match="Duplicate name"):
        twice = rewrite(path, tmp_path / "twice.zip", lambda n, d: [(n, d), (n, png_of(np.ones((H, W))))]
                        if n == "v0/0001.png" else [(n, d)])
    with pytest.raises(PipelineError, match=r"twice.zip: entry 'v0/0001.png' appears 2 times"):
        ZipPredictions(twice, fmt=fmt, num_classes=124)
    _refused(twice, kwargs, "entry 'v0/0001.png' appears 2 times")

    stray = rewrite(path, tmp_path / "stray.zip",
                    lambda n, d: [(n, d), ("v7/0000.png", d), ("v7/", b"")] if n == "v1/0002.png" else [(n, d)])
    with ZipPredictions(stray, fmt=fmt, num_classes=124) as source:
        assert source.unmatched(frames) == ["v7/0000.png"]  # the folder entry holds nothing
        assert source.unmatched(frames[:-1]) == ["v1/0002.png", "v7/0000.png"]

    # 64 MiB of zeros deflate to ~64 KiB: refused from the header, never inflated
    bomb = rewrite(path, tmp_path / "bomb.zip",
                   lambda n, d: [(n, b"\0" * (64 << 20))] if n == "v0/0002.png" else [(n, d)])
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: (
        opened.append(getattr(name, "filename", name)), real_open(self, name, *a, **k))[1])
    with ZipPredictions(bomb, fmt=fmt, num_classes=124) as source:
        source(frames[0])
        with pytest.raises(PipelineError, match=r"bomb.zip:v0/0002.png: inflates to 67108864 bytes, "
                                                r"more than a 6x9 8-bit PNG can take \(1048696\)"):
            source(frames[2])
    _refused(bomb, kwargs, "v0/0002.png", "inflates to 67108864 bytes")
    assert "v0/0002.png" not in opened and "v0/0000.png" in opened

    # a small entry whose PNG header declares 81 Mpixels (below PIL's own bomb check): refused
    # from the header, before decoding
    huge = rewrite(path, tmp_path / "huge.zip",
                   lambda n, d: [(n, _png_header_only(9000, 9000))] if n == "v0/0001.png" else [(n, d)])
    with ZipPredictions(huge, fmt=fmt, num_classes=124) as source:
        with pytest.raises(PipelineError, match=r"v0/0001.png: size 9000x9000 differs from frame "
                                                r"'v0_0001' \(6x9, HxW\)"):
            source(frames[1])
    _refused(huge, kwargs, "v0/0001.png", "size 9000x9000")
