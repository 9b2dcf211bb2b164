"""The cost plan as text: what it was computed from, one table row per model config, and notes
saying how each column is counted (the numbers themselves: :mod:`pipeline.launch.plan`)."""

from __future__ import annotations

from typing import Sequence

from pipeline.launch.costs import human_bytes, human_count
from pipeline.launch.plan import UNKNOWN_SPEED

COLUMNS = (  # header, row key, formatter
    ("config", "config", str), ("kind", "kind", str), ("runs", "runs", human_count),
    ("weights", "weights", human_count), ("images seen", "images_seen", human_count),
    ("TTA passes", "tta_passes", human_count), ("other passes", "other_passes", human_count),
    ("checkpoints", "checkpoint_bytes", human_bytes), ("snapshots", "snapshot_bytes", human_bytes),
    ("OOF maps", "oof_map_bytes", human_bytes), ("test maps", "test_map_bytes", human_bytes),
    ("device-h", "device_hours", lambda h: "unknown" if h is None else f"{h:,.1f}"),
)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 'es' if word.endswith('s') else 's'}"


def _grid(rows: Sequence[dict]) -> list[str]:
    cells = [[header for header, _, _ in COLUMNS]]
    for row in rows:
        tta = (None if row.get("tta_passes_oof") is None
               else row["tta_passes_oof"] + row["tta_passes_test"])
        values = {**row, "tta_passes": tta}
        cells.append(["" if values.get(key, "") == "" else fmt(values[key])
                      for _, key, fmt in COLUMNS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                      enumerate(zip(line, widths))).rstrip() for line in cells]


def _head(plan: dict) -> list[str]:
    runs, f = plan["runs"], plan["runs"]["factors"]
    lines = [f"Cost plan of {plan['params']} (nothing has run; maps are upper bounds)"]
    data = plan["data"]
    if data is None:
        lines.append("data      not prepared: frames unknown (prepare it, or give --frames N "
                     "--height H --width W --classes C [--test-frames M])")
    else:
        classes = "classes unknown (give --classes)" if data["classes"] is None else \
            _plural(data["classes"], "class")
        videos = "" if data["videos"] is None else f", {data['videos']:,} videos"
        lines.append(f"data      {data['source']}: {data['train_frames']:,} train + "
                     f"{data['test_frames']:,} test frames ({', '.join(data['sizes'][:3])}"
                     f"{' ...' if len(data['sizes']) > 3 else ''}){videos}, {classes}")
        lines.append(f"folds     {data['folds']}")
        if data.get("oof_sample"):
            lines.append(f"OOF maps  {data['oof_frames']:,} of {data['train_frames']:,} train frames, "
                         f"sampled by infer.oof_sample {data['oof_sample']}")
    folds = _plural(f["folds"], "fold")
    lines.append(f"runs      {runs['total']} = {_plural(f['models'], 'model')} x {folds} x "
                 f"{_plural(f['seeds'], 'seed')} + {_plural(f['students'], 'student')} x "
                 f"{folds} x {_plural(f['student_seeds'], 'student seed')}; "
                 f"{runs['members']} ensemble members")
    inf, frame = plan["infer"], plan["per_frame"]
    windows = (f"windows of {inf['crop_hw'][0]}x{inf['crop_hw'][1]} (overlap "
               f"{inf['overlap']:.3g})" if inf["crop_hw"] else "1 window")
    per = "" if frame is None else (f" = {frame['tta_passes']} passes per "
                                    f"{frame['size'][0]}x{frame['size'][1]} frame")
    lines.append(f"TTA       {_plural(len(inf['scales']), 'scale')} x "
                 f"{2 if inf['flip'] else 1} (flip) x {windows}{per}; splits "
                 f"{', '.join(inf['splits'])}; each run predicts its fold's OOF frames and "
                 f"every test frame")
    if frame is not None and frame["map_bytes"] is not None:
        h, w = frame["size"]
        s, nbytes = inf["stride"], 1 if inf["quant"] == "uint8" else 2
        k = inf.get("topk") or 0   # top-k maps: k codes and k class ids per pixel
        kind = f", top-{k} of {data['classes']} classes" if k else ""
        unit = f"({nbytes} + {1 if data['classes'] <= 255 else 2}) B (code + class id)" if k else \
            f"{nbytes} B"
        lines.append(f"maps      {inf['quant']}, stride {s}{kind}: {k or data['classes']} x "
                     f"ceil({h}/{s}) x ceil({w}/{s}) x {unit} = "
                     f"{human_bytes(frame['map_bytes'])} per map, upper bound before compression"
                     + (" (uint8 maps are stored deflated to 0.24-0.40 of it on smooth maps)"
                        if inf["quant"] == "uint8" and not k else ""))
    return lines


def _foot(plan: dict) -> list[str]:
    total, disk = plan["total"], plan["disk"]
    lines = []
    if total["map_bytes"] is not None:
        ok = "fits" if total["map_bytes"] <= disk["free_bytes"] else "DOES NOT FIT: make run refuses"
        lines.append(f"disk      maps up to {human_bytes(total['map_bytes'])}; "
                     f"{disk['checked_at']} has {human_bytes(disk['free_bytes'])} free ({ok})")
    if total["checkpoint_bytes"] is not None:
        files = total["checkpoint_bytes"] + total["snapshot_bytes"]
        guessed = plan["data"] is None or plan["data"]["classes"] is None
        lines.append(f"files     checkpoints + snapshots {human_bytes(files)} (last.pt: weights "
                     f"+ optimizer state, AdamW 3x; best.pt, swa.pt: weights; counted for "
                     f"{_plural(plan['weights_counted_for_classes'], 'class')}"
                     f"{', the classes being unknown' if guessed else ''})")
    speed = plan["throughput"]
    if speed["source"] is None:
        lines.append(f"device-h  {UNKNOWN_SPEED}")
    else:
        measured = "; ".join(
            f"{r['config']} {r['train_images_per_s']:.3g} img/s, {r['infer_views_per_s']:.3g} fwd/s"
            for r in plan["rows"] if r["train_images_per_s"])
        where = f"probe on {speed['device']}" if speed["source"] == "probe" else speed["source"]
        hours = "unknown" if total["device_hours"] is None else f"{total['device_hours']:,.1f}"
        lines.append(f"device-h  {hours} on one device ({where}: {measured})")
    lines.append("units     1 KB = 1000 B; a pass is one image, view or window through the "
                 "network; other passes: validations, SWA's BatchNorm pass and check, "
                 "compare_single's plain view, a student's teacher")
    return lines


def format_plan(plan: dict) -> str:
    """The plan of :func:`pipeline.launch.plan.make_plan` (with the adapter's keys) as text."""
    rows = list(plan["rows"])
    if len(rows) > 1:
        rows.append({"config": "total", "kind": "", **plan["total"], "weights": ""})
    grid = _grid(rows)
    if len(rows) > 1:
        grid.insert(-1, "-" * len(grid[0]))
    return "\n".join([*_head(plan), "", *grid, "", *_foot(plan)])
