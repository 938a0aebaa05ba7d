"""Evaluate a checkpoint on the `val` patients: per-volume DSC and HD95 per patient, mean/median, and the
effect of post-processing and flip TTA, with the project's own inference.

    python benchmarks/eval_val.py --model src/napari_lgg_seg/models/lgg_fast128.pt > benchmarks/eval_val.txt
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from napari_lgg_seg import checkpoint, data, inference, metrics

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: (tta, keep_largest, min_size)
    "largest component (default)": (False, True, 0),
    "no post-processing": (False, False, 0),
    "drop components < 100 voxels": (False, False, 100),
    "TTA + largest component": (True, True, 0),
    "TTA + drop components < 100 voxels": (True, False, 100),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None, help="default: the built-in model")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "lgg")
    ap.add_argument("--split", default="val")
    args = ap.parse_args()
    ckpt = checkpoint.load_or_builtin(args.model)
    names = json.loads((args.data / "split.json").read_text())[args.split]
    patients = {n: data.read_cached(args.data / "kaggle_3m" / n) for n in names}
    rows, summary = {}, {}
    for variant, (tta, largest, min_size) in VARIANTS.items():
        t0 = time.perf_counter()
        for n, p in patients.items():
            res = inference.segment(p.image, ckpt, tta=tta, keep_largest=largest, min_size=min_size)
            rows.setdefault(n, {})[variant] = (metrics.dice(res.labels, p.mask), metrics.hd95(res.labels, p.mask))
        d = [rows[n][variant][0] for n in names]
        h = [rows[n][variant][1] for n in names]
        summary[variant] = (statistics.mean(d), statistics.median(d), metrics.summarize(h), time.perf_counter() - t0)
    print(f"# Validation of {ckpt.source} on `{args.split}` ({len(names)} patients)")
    print()
    print(f"Command: `python benchmarks/eval_val.py{' --model ' + str(args.model) if args.model else ''}`")
    print()
    print("| variant | DSC mean | DSC median | HD95 mean (px) | HD95 median | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for v, (m, med, h, s) in summary.items():
        inf = f" ({h['n_infinite']} inf)" if h["n_infinite"] else ""
        print(f"| {v} | {m:.4f} | {med:.4f} | {h['mean']:.2f}{inf} | {h['median']:.2f} | {s:.1f} |")
    print()
    default = "largest component (default)"
    print(f"Per patient ({default}; worst first):")
    print()
    print("| patient | slices | lesion slices | DSC | HD95 | DSC without post-processing |")
    print("|---|---:|---:|---:|---:|---:|")
    for n in sorted(names, key=lambda n: rows[n][default][0]):
        p = patients[n]
        print(f"| {n} | {p.n_slices} | {int(p.mask.any(axis=(1, 2)).sum())} | {rows[n][default][0]:.4f} "
              f"| {rows[n][default][1]:.2f} | {rows[n]['no post-processing'][0]:.4f} |")


if __name__ == "__main__":
    main()
