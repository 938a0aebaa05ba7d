"""``lgg-seg``: the headless entry point (predict, evaluate). A thin layer over the core modules."""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from . import checkpoint, inference, io, metrics, preprocess
from . import data as data_mod
from . import train as train_mod
from .model import PRESETS


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="segment patients and write <patient>_<n>_mask.tif (0/255) per slice")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="patient folder, TIFF stack or kaggle_3m root")
    p.add_argument("--output", "-o", required=True, type=Path, help="folder; masks go to OUTPUT/<patient>/")
    p.add_argument("--model", "-m", type=Path, default=None, help="checkpoint file (default: the built-in model)")
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
    ckpt = checkpoint.load_or_builtin(args.model)
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


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a U-Net on LGG patients (one machine, or several GPUs under torchrun)")
    p.add_argument("data", nargs="+", type=Path, metavar="DATA", help="kaggle_3m root or patient folders")
    p.add_argument("--output", "-o", required=True, type=Path, help="folder for checkpoints, metrics.csv, curves.png")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--split", type=Path, help='split file {"train": [...], "val": [...]} (patient names)')
    g.add_argument("--val-patients", type=int, default=None, help="hold out N random patients (seeded)")
    p.add_argument("--preset", default="fast", choices=list(PRESETS))
    p.add_argument("--input-size", type=int, default=128, help="side the net runs at (0: native size)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--steps-per-epoch", type=int, default=None, help="default: one pass over the training slices")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="default: 2e-3 (adamw), 0.05 (sgd one-cycle peak)")
    p.add_argument("--optimizer", default="adamw", choices=list(train_mod.OPTIMIZERS))
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--dice-weight", type=float, default=0.3, help="loss = W x soft Dice + (1 - W) x BCE")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--early-stop", type=int, default=None, help="stop after N epochs without a better val DSC")
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--resume", type=Path, default=None, help="epoch checkpoint of an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="allow an output folder that holds checkpoints")
    p.add_argument("--device", default="auto", choices=inference.DEVICES)
    p.add_argument("--precision", default="auto", choices=inference.PRECISIONS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None, help="decoded-array cache (default ~/.cache/napari-lgg-seg)")


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model on corrected masks and write a new checkpoint")
    p.add_argument("--model", "-m", type=Path, default=None, help="checkpoint to start from (default: built-in)")
    p.add_argument("--data", required=True, nargs="+", type=Path, metavar="PATIENT_DIR", help="corrected patients")
    p.add_argument("--output", "-o", required=True, type=Path, help="new checkpoint file")
    p.add_argument("--slices", default=None, help="1-based slices to learn from, e.g. 12-18,22 (default: all)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="optimiser steps (default 60)")
    g.add_argument("--epochs", type=int, default=None, help="passes over the selected slices")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--train-layers", default="all", choices=list(train_mod.TRAIN_LAYERS))
    p.add_argument("--device", default="auto", choices=inference.DEVICES)
    p.add_argument("--precision", default="auto", choices=inference.PRECISIONS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")


def _init_distributed():
    """Under torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPUs."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return True
    return False


def train(args) -> int:
    import torch.distributed as dist

    started = _init_distributed()
    rank = dist.get_rank() if started else 0
    try:
        folders = io.resolve_inputs(args.data)
        train_dirs, val_dirs = data_mod.split_patients(folders, args.split, args.val_patients, args.seed)
        cfg = train_mod.TrainConfig(
            preset=args.preset, input_size=(args.input_size, args.input_size) if args.input_size else None,
            epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, lr=args.lr,
            optimizer=args.optimizer, weight_decay=args.weight_decay, dice_weight=args.dice_weight,
            augment=not args.no_augment, precision=args.precision, device=args.device, seed=args.seed,
            keep_last=args.keep_last, early_stop=args.early_stop)
        pre = preprocess.DEFAULT
        if args.resume is not None:
            pre = checkpoint.load(args.resume).preprocessing
        t0 = time.perf_counter()
        tr = data_mod.load_samples(train_dirs, pre, args.cache)
        va = data_mod.load_samples(val_dirs, pre, args.cache)
        if rank == 0:
            print(f"data: {len(tr)} train patients ({sum(s.image.shape[0] for s in tr)} slices), {len(va)} val "
                  f"patients, read in {time.perf_counter() - t0:.0f}s", flush=True)
        gen = train_mod.iter_train(tr, va, cfg, args.output, resume=args.resume, overwrite=args.overwrite,
                                   data_info={"source": [str(p) for p in args.data],
                                              "split": str(args.split) if args.split else None})
        result = inference.run(gen, lambda ev: print(ev.line(), flush=True)
                               if rank == 0 and isinstance(ev, train_mod.EpochReport) else None)
        if rank == 0:
            print(f"{result.stopped}: best val DSC "
                  f"{max((r.get('val_dsc_mean', float('nan')) for r in result.history), default=float('nan')):.4f}"
                  f" -> {result.best_path}; metrics.csv and curves.png in {args.output}")
    finally:
        if started:
            dist.destroy_process_group()
    return 0


def finetune(args) -> int:
    base = checkpoint.load_or_builtin(args.model)
    start = args.model if args.model is not None else checkpoint.BUILTIN_FILE
    if args.output.resolve() == start.resolve():
        raise FileExistsError(f"{args.output}: is the starting model; write the fine-tuned model to a new file")
    if args.output.exists() and not args.overwrite:
        raise FileExistsError(f"{args.output}: exists; pass --overwrite to replace it")
    samples = []
    for folder in io.resolve_inputs(args.data):
        p = io.read_patient(folder)
        if p.mask is None:
            raise io.LGGFormatError(f"{folder}: no mask files to learn from")
        samples.append(data_mod.Sample.from_arrays(p.patient_id, p.image, p.mask, base.preprocessing,
                                                   data_mod.parse_slices(args.slices, p.n_slices)))
    gen = train_mod.iter_finetune(base, samples, steps=args.steps, epochs=args.epochs, lr=args.lr,
                                  batch_size=args.batch_size, augment=not args.no_augment,
                                  train_layers=args.train_layers, device=args.device, precision=args.precision,
                                  seed=args.seed)
    result = inference.run(gen, lambda ev: print(ev.line(), flush=True)
                           if isinstance(ev, train_mod.EpochReport) else None)
    checkpoint.save(result.checkpoint, args.output, overwrite=args.overwrite)
    n = sum(len(s.slices) for s in samples)
    print(f"fine-tuned on {n} slices of {len(samples)} patients -> {args.output} (parent {base.source})")
    return 0


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="segment the bundled sample patient with the built-in model, write its "
                                      "masks, print DSC against its own masks, and show it in napari if a display exists")
    p.add_argument("--output", "-o", type=Path, default=Path("lgg-sample-prediction"))
    p.add_argument("--model", "-m", type=Path, default=None, help="checkpoint (default: the built-in model)")
    p.add_argument("--device", default="auto", choices=inference.DEVICES)
    p.add_argument("--precision", default="auto", choices=inference.PRECISIONS)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-view", action="store_true", help="do not open napari even when a display exists")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="strip a training checkpoint to a model file (no optimiser state; fp16 option)")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--output", "-o", required=True, type=Path)
    p.add_argument("--half", action="store_true", help="store weights in fp16 (half the size; cast back on load)")
    p.add_argument("--overwrite", action="store_true")


def export(args) -> int:
    ckpt = checkpoint.load(args.checkpoint)
    ckpt.training = {k: v for k, v in ckpt.training.items() if k != "resume"}
    checkpoint.save(ckpt, args.output, overwrite=args.overwrite, half=args.half)
    print(f"{args.output}: {args.output.stat().st_size / 2**20:.1f} MB (epoch {ckpt.training.get('epochs')})")
    return 0


def _has_display() -> bool:
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def sample(args) -> int:
    from ._sample_data import sample_path

    ckpt = checkpoint.load_or_builtin(args.model)
    patient = io.read_patient(sample_path())
    result = inference.segment(patient.image, ckpt, device=args.device, precision=args.precision)
    target = args.output / patient.patient_id
    io.write_masks(result.labels, target, patient.patient_id, overwrite=args.overwrite)
    dsc, hd = metrics.dice(result.labels, patient.mask), metrics.hd95(result.labels, patient.mask)
    print(f"{patient.patient_id}: {patient.n_slices} slices segmented in {result.seconds:.1f}s "
          f"({result.device}, {result.precision}) with {ckpt.source}; masks -> {target}")
    print(f"per-volume DSC vs the sample's own masks: {dsc:.4f}  HD95: {hd:.2f} px")
    if not args.no_view and _has_display() and os.environ.get("CI", "").lower() not in ("1", "true"):
        import napari

        from ._reader import patient_layers

        viewer = napari.Viewer()
        for data, kwargs, kind in patient_layers(patient):
            getattr(viewer, f"add_{kind}")(data, **kwargs)
        viewer.add_labels(result.labels, name=f"{patient.patient_id} prediction", opacity=0.6)
        napari.run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lgg-seg", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_predict(sub)
    _add_evaluate(sub)
    _add_train(sub)
    _add_finetune(sub)
    _add_sample(sub)
    _add_export(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"predict": predict, "evaluate": evaluate, "train": train, "finetune": finetune,
                "sample": sample, "export": export}[args.command](args)
    except (io.LGGFormatError, checkpoint.CheckpointError, FileExistsError, ValueError, RuntimeError) as exc:
        print(f"lgg-seg {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
