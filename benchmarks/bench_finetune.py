"""Human-in-the-loop benchmark: does fine-tuning on a few corrected slices help?

For each chosen `val` patient: segment it with the starting model, take the K lesion slices where the model
is worst (the ones a user would correct), give their true masks as the "corrections", fine-tune for a fixed
budget, and report before/after DSC on (a) that patient's other slices and (b) the other `val` patients
(forgetting). Several fine-tuning settings are compared so the widget's defaults can be chosen from data.

    python benchmarks/bench_finetune.py --model MODEL.pt > benchmarks/bench_finetune.txt
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from napari_lgg_seg import checkpoint, data, inference, io, metrics, train

ROOT = Path(__file__).resolve().parents[1]


def dsc_on(labels, truth, slices):
    return metrics.dice(labels[slices], truth[slices])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "lgg")
    ap.add_argument("--patients", type=int, default=4, help="val patients to correct (the lowest-DSC ones)")
    ap.add_argument("--k", type=int, default=3, help="corrected slices per patient")
    ap.add_argument("--configs", default="3e-4:all:1,1e-3:all:1,1e-3:decoder:1,3e-4:all:0",
                    help="lr:train_layers:freeze_batchnorm[:context], comma separated; 'context' also learns from the "
                         "uncorrected slices as the layer shows them (the model's own prediction), to hold it in place")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    split = json.loads((args.data / "split.json").read_text())
    base = checkpoint.load(args.model)
    val = {pid: data.read_cached(args.data / "kaggle_3m" / pid) for pid in split["val"]}
    before = {pid: inference.segment(p.image, base).labels for pid, p in val.items()}
    base_dsc = {pid: metrics.dice(before[pid], p.mask) for pid, p in val.items()}
    chosen = sorted(base_dsc, key=base_dsc.get)[: args.patients]

    print("# Fine-tuning on corrected slices (human in the loop)")
    print()
    print(f"Command: `python benchmarks/bench_finetune.py --model {args.model} --patients {args.patients} --k {args.k} "
          f"--steps {args.steps} --configs {args.configs}`")
    print()
    print(f"- date {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"- starting model: {args.model} (val per-volume DSC mean {statistics.mean(base_dsc.values()):.4f})")
    print(f"- corrected patients: the {args.patients} lowest-DSC val patients; per patient the {args.k} lesion slices "
          f"with the lowest slice Dice get their true masks; budget {args.steps} steps, batch {args.batch_size}")
    print("- 'other slices' = that patient's remaining slices (per-volume DSC over them); 'other patients' = mean "
          "per-volume DSC of the 12 other val patients (does the model forget?)")
    print()
    print("| setting | patient | other slices before | after | other patients before | after | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|")
    summary = {}
    for spec in args.configs.split(","):
        lr, layers, freeze, *ctx = spec.split(":")
        gains, forget = [], []
        for pid in chosen:
            p = val[pid]
            lesion = np.flatnonzero(p.mask.any(axis=(1, 2)))
            sd = metrics.dice_per_slice(before[pid], p.mask)
            corr = sorted(lesion[np.argsort(sd[lesion])[: args.k]].tolist())
            rest = [z for z in range(p.n_slices) if z not in corr]
            if ctx:  # the corrected layer: truth on the corrected slices, the model's prediction elsewhere
                layer = before[pid].copy()
                layer[corr] = p.mask[corr]
                sample = data.Sample.from_arrays(pid, p.image, layer, base.preprocessing)
            else:
                sample = data.Sample.from_arrays(pid, p.image, p.mask, base.preprocessing, corr)
            t0 = time.perf_counter()
            res = inference.run(train.iter_finetune(base, [sample], steps=args.steps, lr=float(lr),
                                                    batch_size=args.batch_size, train_layers=layers,
                                                    freeze_batchnorm=bool(int(freeze)), device="cpu"))
            secs = time.perf_counter() - t0
            after = {q: inference.segment(v.image, res.checkpoint).labels for q, v in val.items()}
            b_rest, a_rest = dsc_on(before[pid], p.mask, rest), dsc_on(after[pid], p.mask, rest)
            others = [q for q in val if q != pid]
            b_oth = statistics.mean(base_dsc[q] for q in others)
            a_oth = statistics.mean(metrics.dice(after[q], val[q].mask) for q in others)
            gains.append(a_rest - b_rest)
            forget.append(a_oth - b_oth)
            print(f"| lr {lr}, {layers}, freeze BN {bool(int(freeze))}{', context' if ctx else ''} | {pid} | {b_rest:.4f} | {a_rest:.4f} "
                  f"| {b_oth:.4f} | {a_oth:.4f} | {secs:.1f} |", flush=True)
        summary[spec] = (statistics.mean(gains), statistics.mean(forget))
    print()
    print("| setting | mean change, other slices | mean change, other patients |")
    print("|---|---:|---:|")
    for spec, (g, f) in summary.items():
        lr, layers, freeze, *ctx = spec.split(":")
        print(f"| lr {lr}, {layers}, freeze BN {bool(int(freeze))}{', context' if ctx else ''} | {g:+.4f} | {f:+.4f} |")


if __name__ == "__main__":
    main()
