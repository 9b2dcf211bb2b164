"""Wall time of the demo chain: a full ``dvc repro`` and a no-op one, in a fresh copy.

    python bench/repro.py [--mode dvc|parallel|both] [--jobs 2] [--keep DIR]

Copies the repository's tracked files (working-tree versions, without dvc.lock and outputs)
into a temp dir, commits them to a throwaway git repo and times, side by side in one run:

  dvc       ``dvc repro`` from nothing (members one after another), then a no-op ``dvc repro``;
  parallel  ``python pipeline/parallel.py --jobs N`` from nothing (members side by side, then a
            plain ``dvc repro``), then a no-op ``dvc repro``.

Targets (issue 6, 2 CPU cores): the demo under 10 minutes, a no-op under 5 seconds. Prints the
seconds, each against its target, and parallel / dvc when both run. The per-member mIoUs of
the run are printed from reports/summary.md so a speed-up that costs accuracy shows.

With both modes it also compares the two chains' outputs (a determinism report): folds and
manifest bytes, the submission zip's sha256, and the largest difference of any run's,
member's or the ensemble's metric. The lanes run with fewer threads per process than the
plain repro, so float reductions may differ in their last bits between the two.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_FULL_S, TARGET_NOOP_S = 600.0, 5.0


def fresh_copy(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file() and name != "dvc.lock":
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    env = git_env()
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True)
    return dest


def git_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
            "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}


def timed(cmd: list[str], cwd: Path, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=git_env())
    seconds = time.perf_counter() - start
    if code:
        sys.exit(f"{' '.join(cmd)} failed with exit {code}; see {log}")
    return seconds


def one_mode(mode: str, work: Path, jobs: int) -> dict[str, float]:
    repo = fresh_copy(work / mode)
    first = ([sys.executable, "-m", "dvc", "repro"] if mode == "dvc"
             else [sys.executable, "pipeline/parallel.py", "--jobs", str(jobs)])
    full = timed(first, repo, work / f"{mode}_full.log")
    noop = timed([sys.executable, "-m", "dvc", "repro"], repo, work / f"{mode}_noop.log")
    if "Data and pipelines are up to date." not in (work / f"{mode}_noop.log").read_text():
        sys.exit(f"the second repro of mode {mode} was not a no-op; see {work / f'{mode}_noop.log'}")
    summary = repo / "reports" / "summary.md"
    print(f"\n[{mode}] full {full:7.1f} s ({full / TARGET_FULL_S:.2f} of the 10 min target: "
          f"{'met' if full < TARGET_FULL_S else 'NOT met'}) | no-op {noop:5.2f} s "
          f"({'met' if noop < TARGET_NOOP_S else 'NOT met'} < 5 s)")
    if summary.exists():
        print(summary.read_text())
    return {"full": full, "noop": noop}


def _numbers(path: Path, prefix: str = "") -> dict[str, float]:
    """Every number in a JSON file, by its key path."""
    out: dict[str, float] = {}

    def walk(value, key):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)

    walk(json.loads(path.read_text()), "")
    return out


def compare(a: Path, b: Path) -> dict:
    """What differs between two chains' outputs (see the module docstring)."""
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()[:16]  # noqa: E731
    report = {name: sha(a / name) == sha(b / name)
              for name in ("data/manifest.csv", "folds/folds.csv")}
    zips = sorted((a / "submissions").glob("*.zip"))
    report["zip"] = {z.name: (sha(z), sha(b / "submissions" / z.name)) for z in zips}
    skip = ("images_per_s", "seconds", "bytes")  # timings, not results
    worst: tuple[float, str] = (0.0, "")
    for path in [*a.glob("runs/*/*metrics.json"), a / "ensemble" / "metrics.json"]:
        other = b / path.relative_to(a)
        if not other.exists():
            continue
        x, y = _numbers(path), _numbers(other)
        for key in x.keys() & y.keys():
            if any(word in key for word in skip):
                continue
            diff = abs(x[key] - y[key])
            if diff > worst[0]:
                worst = (diff, f"{path.relative_to(a)}:{key}")
    report["max_metric_diff"] = worst
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("dvc", "parallel", "both"), default="both")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--keep", default=None, help="work here and keep the copies")
    args = parser.parse_args(argv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="repro_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    modes = ("dvc", "parallel") if args.mode == "both" else (args.mode,)
    print(f"{os.cpu_count()} CPU(s); copies under {work}")
    try:
        results = {mode: one_mode(mode, work, args.jobs) for mode in modes}
        if len(results) == 2:
            print(f"parallel ({args.jobs} jobs) / dvc repro: "
                  f"{results['parallel']['full'] / results['dvc']['full']:.2f}x the wall time")
            same = compare(work / "dvc", work / "parallel")
            results["compare"] = same
            print(f"determinism, dvc vs parallel chain: manifest identical "
                  f"{same['data/manifest.csv']}, folds identical {same['folds/folds.csv']}")
            for name, (x, y) in same["zip"].items():
                print(f"  {name}: {x} vs {y} -> {'identical' if x == y else 'DIFFERENT'}")
            diff, where = same["max_metric_diff"]
            print(f"  largest metric difference {diff:.2e} ({where or 'none'})")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
