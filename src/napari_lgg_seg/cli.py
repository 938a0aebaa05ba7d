"""``lgg-seg``: the headless entry point (predict, evaluate). A thin layer over the core modules."""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from . import checkpoint, inference, io, metrics


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="segment patients and write <patient>_<n>_mask.tif (0/255) per slice")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="patient folder, TIFF stack or kaggle_3m root")
    p.add_argument("--output", "-o", required=True, type=Path, help="folder; masks go to OUTPUT/<patient>/")
    p.add_argument("--model", "-m", required=True, type=Path, help="checkpoint file (.pt)")
    p.add_argument("--device", default="auto", choices=inference.DEVICES)
    p.add_argument("--precision", default="auto", choices=inference.PRECISIONS)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threshold", type=float, default=None, help="default: the checkpoint's")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped prediction")
    p.add_argument("--no-postprocess", action="store_true", help="keep every connected component")
    p.add_argument("--min-size", type=int, default=0, help="drop 3D components smaller than this (voxels)")
    p.add_argument("--overwrite", action="store_true", help="replace existing mask files")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="per-patient DSC and HD95 of predicted masks against true masks")
    p.add_argument("pred_dir", type=Path, help="folder of predicted patient folders (or one patient folder)")
    p.add_argument("truth_dir", type=Path, help="kaggle_3m-style folder with the true masks (or one patient)")
    p.add_argument("--csv", type=Path, default=None, help="also write the per-patient table here")


def _mask_folders(path: Path) -> dict[str, Path]:
    """Patient id -> folder, for one folder of masks or a folder of such folders."""
    try:
        return {io.scan_patient_folder(path, masks_only=True)[0]: path}
    except io.NotAnLGGFolder:
        pass
    if not path.is_dir():
        raise io.LGGFormatError(f"{path}: not a folder")
    found = {}
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            found[io.scan_patient_folder(sub, masks_only=True)[0]] = sub
        except io.NotAnLGGFolder:
            continue
    if not found:
        raise io.LGGFormatError(f"{path}: no folders with mask files (<patient>_<n>_mask.tif)")
    return found


def predict(args) -> int:
    ckpt = checkpoint.load(args.model)
    sources = io.resolve_inputs(args.inputs)
    outdir: Path = args.output
    outdir.mkdir(parents=True, exist_ok=True)
    total = 0
    for src in sources:
        patient = io.read_any(src, with_mask=False)
        target = outdir / patient.patient_id
        if not args.overwrite:  # refuse before spending minutes on a patient whose masks cannot be written
            clash = [p for p in io.mask_paths_for(target, patient.patient_id, patient.n_slices) if p.exists()]
            if clash:
                raise FileExistsError(f"{clash[0]}: exists; pass --overwrite to replace it")
        with tqdm(total=patient.n_slices, desc=patient.patient_id, unit="slice", file=sys.stderr,
                  leave=False, disable=None) as bar:
            result = inference.segment(
                patient.image, ckpt, progress=lambda pr: bar.update(pr.done - bar.n),
                device=args.device, precision=args.precision, batch_size=args.batch_size,
                threshold=args.threshold, tta=args.tta, keep_largest=not args.no_postprocess,
                min_size=args.min_size,
            )
        io.write_masks(result.labels, target, patient.patient_id, overwrite=args.overwrite)
        total += patient.n_slices
        print(f"{patient.patient_id}: {patient.n_slices} slices, {int(result.labels.sum())} abnormal pixels in "
              f"{int(result.labels.any(axis=(1, 2)).sum())} slices, {result.seconds:.1f}s "
              f"({result.device}, {result.precision}) -> {target}")
    print(f"done: {len(sources)} patients, {total} slices")
    return 0


def evaluate(args) -> int:
    preds, truths = _mask_folders(args.pred_dir), _mask_folders(args.truth_dir)
    common = sorted(set(preds) & set(truths))
    if not common:
        raise io.LGGFormatError(f"{args.pred_dir}: no patient in common with {args.truth_dir}")
    missing = sorted(set(truths) - set(preds)) if len(truths) > 1 else []
    rows = []
    for pid in common:
        pred = io.read_masks(preds[pid])[1]
        truth = io.read_masks(truths[pid])[1]
        if pred.shape != truth.shape:
            raise io.LGGFormatError(f"{preds[pid]}: prediction is {pred.shape}, truth is {truth.shape}")
        row = {"patient": pid, "slices": pred.shape[0], "dsc": metrics.dice(pred, truth), "hd95": metrics.hd95(pred, truth)}
        rows.append(row)
        print(f"{pid}  DSC {row['dsc']:.4f}  HD95 {row['hd95']:.2f}")
    dsc, hd = metrics.summarize(r["dsc"] for r in rows), metrics.summarize(r["hd95"] for r in rows)
    print(f"patients: {len(rows)}  DSC mean {dsc['mean']:.4f} median {dsc['median']:.4f}  "
          f"HD95 mean {hd['mean']:.2f} median {hd['median']:.2f}"
          + (f" ({hd['n_infinite']} infinite: one side empty, left out of the mean)" if hd["n_infinite"] else ""))
    if missing:
        print(f"warning: {len(missing)} patients have no prediction: {', '.join(missing[:5])}", file=sys.stderr)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{args.csv.name}.", dir=args.csv.parent)
        with os.fdopen(fd, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["patient", "slices", "dsc", "hd95"])
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, args.csv)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lgg-seg", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_predict(sub)
    _add_evaluate(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"predict": predict, "evaluate": evaluate}[args.command](args)
    except (io.LGGFormatError, checkpoint.CheckpointError, FileExistsError, ValueError, RuntimeError) as exc:
        print(f"lgg-seg {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
