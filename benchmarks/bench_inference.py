"""Benchmark U-Net inference speed (slices/s) per model preset and precision on a real LGG patient.

Goes through the project's own API: ``io.read_patient`` -> ``checkpoint.Checkpoint.from_model`` (random,
untrained weights: speed does not depend on them) -> ``inference.segment``. For each row it does one warm-up run
per precision, then alternates fp32 / bf16 repeats (so a change in background load hits both alike) and reports
the median.

Two speeds are given per run:

* ``e2e``  : slices / ``Segmentation.seconds`` (what a user waits for: model build from the checkpoint, volume
  statistics, the batched forward passes, post-processing);
* ``loop`` : slices / time between the first and the last ``Progress`` callback (the batched forward passes
  only, preprocessing of each batch and copying back included).

Usage (what produced benchmarks/bench_inference.txt / .json):

    python benchmarks/bench_inference.py --out benchmarks/bench_inference.txt --json benchmarks/bench_inference.json

On a GPU machine: ``--device cuda`` (add ``--precisions fp32,bf16,fp16`` for fp16 as well).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_lgg_seg import checkpoint, inference, io, model

DEFAULT_DATA = "/work/shared/lgg/kaggle_3m"
DEFAULT_PATIENT = "TCGA_CS_5393_19990606"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_bf16_flags() -> str:
    flags = inference._cpu_flags()
    have = sorted({"avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2"} & flags)
    return " ".join(have) or "(none of avx2/avx512f/avx512_bf16/amx)"


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def parse_rows(presets: list[str], extra: list[str]) -> list[tuple[str, tuple[int, int] | None]]:
    """Native rows (input_size None) for each preset, then ``preset@size`` extras (net run at size x size)."""
    rows = [(p, None) for p in presets]
    for item in extra:
        name, _, size = item.partition("@")
        if name not in model.PRESETS or not size:
            raise SystemExit(f"--extra: expected <preset>@<size>, got {item!r}")
        s = int(size)
        rows.append((name, (s, s)))
    return rows


def timed_segment(volume, ckpt, device, precision, batch_size):
    """One ``inference.segment`` call -> (Segmentation, e2e seconds, loop seconds)."""
    stamps = []

    def progress(p):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    seg = inference.segment(volume, ckpt, device=device, precision=precision, batch_size=batch_size,
                            progress=progress)
    loop = stamps[-1] - stamps[0] if len(stamps) >= 2 else float("nan")
    return seg, seg.seconds, loop


def bench_row(volume, ckpt, device, precisions, batch_size, repeats):
    """Warm up each precision once, then alternate precisions for ``repeats`` rounds."""
    res = {p: {"e2e": [], "loop": [], "error": None, "probs": None, "resolved": None, "batch_size": None}
           for p in precisions}
    for p in precisions:  # warm-up (one-time kernel selection, allocator growth, lazy init)
        try:
            seg, _, _ = timed_segment(volume, ckpt, device, p, batch_size)
            res[p]["resolved"] = seg.precision
        except Exception as exc:  # e.g. fp16 on the CPU: report it, keep going
            res[p]["error"] = f"{type(exc).__name__}: {exc}"
    for _ in range(repeats):
        for p in precisions:
            if res[p]["error"]:
                continue
            seg, e2e, loop = timed_segment(volume, ckpt, device, p, batch_size)
            res[p]["e2e"].append(e2e)
            res[p]["loop"].append(loop)
            res[p]["probs"] = seg.probabilities
            res[p]["batch_size"] = seg.batch_size
    return res


def fmt(x, nd=2):
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return f"{x:.{nd}f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA, help="folder holding the patient folders (kaggle_3m)")
    ap.add_argument("--patient", default=DEFAULT_PATIENT, help="patient folder name inside --data")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, auto (default cpu)")
    ap.add_argument("--presets", default="tutorial,buda,fast", help="comma-separated presets at native size")
    ap.add_argument("--extra", default="fast@128",
                    help="comma-separated <preset>@<size> rows: the net runs at size x size, slices resized to it "
                         "and the result back ('' for none)")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated (fp32, bf16, fp16, auto)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per row and precision (after warm-up)")
    ap.add_argument("--slices", type=int, default=0, help="slices per run (0 = the whole patient)")
    ap.add_argument("--tutorial-slices", type=int, default=0,
                    help="slices per run for the slow 'tutorial' preset (0 = same as --slices); lower it on a "
                         "slow machine (about 1.5 slices/s fp32 on 2 AVX-512 cores)")
    ap.add_argument("--tutorial-repeats", type=int, default=3, help="repeats for the 'tutorial' preset")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the report to this file")
    ap.add_argument("--json", help="write machine-readable results to this file")
    args = ap.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    presets = [p for p in args.presets.split(",") if p]
    for p in presets:
        if p not in model.PRESETS:
            raise SystemExit(f"unknown preset {p!r}; known: {', '.join(model.PRESETS)}")
    precisions = [p for p in args.precisions.split(",") if p]
    rows = parse_rows(presets, [e for e in args.extra.split(",") if e])
    dev = inference.resolve_device(args.device)
    device = str(dev) if args.device != "auto" else dev.type

    t_start = time.perf_counter()
    patient = io.read_patient(Path(args.data) / args.patient, with_mask=False)
    vol_all = patient.image
    auto_prec = inference.resolve_precision("auto", dev)
    native_bf16 = inference.cpu_has_native_bf16()  # what `auto` decides on the CPU

    out_lines: list[str] = []

    def emit(s=""):
        out_lines.append(s)
        print(s, flush=True)

    cmd = "python benchmarks/bench_inference.py" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:]))
    emit("# U-Net inference benchmark (napari-lgg-seg)")
    emit()
    emit(f"Command: `{cmd}`  (run from the repository root, venv active)")
    emit()
    emit(f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    emit(f"- host: {platform.node()}  python {platform.python_version()}  {platform.platform()}")
    emit(f"- torch: {torch.__version__}  torch.get_num_threads(): {torch.get_num_threads()}  "
         f"os.cpu_count(): {os.cpu_count()}")
    emit(f"- CPU: {cpu_model_name()}  flags: {cpu_bf16_flags()}")
    emit(f"- torch.backends.cpu.get_cpu_capability(): {torch.backends.cpu.get_cpu_capability()}")
    if dev.type == "cuda":
        emit(f"- GPU: {torch.cuda.get_device_name(dev)}  cuda {torch.version.cuda}  "
             f"bf16 supported: {torch.cuda.is_bf16_supported()}")
    emit(f"- device: {device}  batch_size: {args.batch_size}")
    emit(f"- resolve_precision('auto', {dev}) -> **{auto_prec}**")
    emit(f"- inference.cpu_has_native_bf16(): **{native_bf16}**  (auto picks bf16 on the CPU only with AVX512-BF16/AMX)")
    emit(f"- patient: {patient.patient_id}  volume {tuple(vol_all.shape)} {vol_all.dtype}  ({args.data})")
    emit(f"- weights: random (torch.manual_seed({args.seed})), untrained; speed does not depend on them")
    emit(f"- load average at start: {loadavg()}")
    emit()

    results = []
    diffs = []
    for name, input_size in rows:
        tut = name == "tutorial"
        n = (args.tutorial_slices or args.slices) if tut else args.slices
        n = min(n, len(vol_all)) if n > 0 else len(vol_all)
        reps = args.tutorial_repeats if tut else args.repeats
        volume = vol_all[:n]
        torch.manual_seed(args.seed)
        net = model.UNet(model.PRESETS[name])
        ckpt = checkpoint.Checkpoint.from_model(net, preset=name, input_size=input_size)
        t = time.perf_counter()
        ckpt.build_model()
        build_s = time.perf_counter() - t
        nparams = sum(p.numel() for p in net.parameters())
        label = f"{name}" + (f" @{input_size[0]}x{input_size[1]}" if input_size else " @256 (native)")
        log(f"[{time.perf_counter() - t_start:6.1f}s] {label}: {n} slices x {reps} repeats ...")
        res = bench_row(volume, ckpt, device, precisions, args.batch_size, reps)
        base = res.get("fp32")
        base_med = statistics.median(base["e2e"]) if base and base["e2e"] else None
        base_loop = statistics.median(base["loop"]) if base and base["loop"] else None
        for p in precisions:
            r = res[p]
            row = {"preset": name, "input_size": list(input_size) if input_size else None, "precision": p,
                   "resolved_precision": r["resolved"], "slices": n, "repeats": reps, "batch_size": r["batch_size"],
                   "params": nparams, "build_model_s": build_s, "error": r["error"]}
            if r["e2e"]:
                med, loop = statistics.median(r["e2e"]), statistics.median(r["loop"])
                row.update({
                    "e2e_seconds": r["e2e"], "loop_seconds": r["loop"],
                    "median_e2e_s": med, "median_loop_s": loop,
                    "slices_per_s": n / med, "loop_slices_per_s": n / loop,
                    "min_max_slices_per_s": [n / max(r["e2e"]), n / min(r["e2e"])],
                    "speedup_vs_fp32": (base_med / med) if base_med else None,
                    "loop_speedup_vs_fp32": (base_loop / loop) if base_loop else None,
                })
            results.append(row)
            log(f"    {p}: " + (r["error"] or f"{row['slices_per_s']:.2f} slices/s e2e, "
                                              f"{row['loop_slices_per_s']:.2f} loop"))
        if base and base["probs"] is not None:
            for p in precisions:
                if p != "fp32" and res[p]["probs"] is not None:
                    d = np.abs(res[p]["probs"] - base["probs"])
                    lab_fp32, lab_p = base["probs"] >= 0.5, res[p]["probs"] >= 0.5
                    diffs.append({"preset": name, "input_size": list(input_size) if input_size else None,
                                  "precision": p, "max_abs_prob_diff": float(d.max()),
                                  "mean_abs_prob_diff": float(d.mean()),
                                  "fp32_prob_range": [float(base["probs"].min()), float(base["probs"].max())],
                                  "pixels_flipped_at_0.5": int((lab_fp32 != lab_p).sum()),
                                  "pixels": int(d.size)})

    emit("## Throughput (median over repeats; higher is better)")
    emit()
    emit("| preset | net input | precision | params | slices x repeats | e2e slices/s | (min-max) "
         "| x vs fp32 | loop slices/s | loop x vs fp32 |")
    emit("|---|---|---|---:|---:|---:|---|---:|---:|---:|")
    for r in results:
        size = f"{r['input_size'][0]}x{r['input_size'][1]} (resized)" if r["input_size"] else "256x256"
        prec = r["precision"] + (" + channels_last" if r["precision"] in ("bf16", "fp16") else "")
        if r["error"]:
            emit(f"| {r['preset']} | {size} | {prec} | {r['params'] / 1e6:.2f} M | - | error: {r['error']} "
                 f"| | | | |")
            continue
        lo, hi = r["min_max_slices_per_s"]
        emit(f"| {r['preset']} | {size} | {prec} | {r['params'] / 1e6:.2f} M | {r['slices']} x {r['repeats']} "
             f"| **{fmt(r['slices_per_s'])}** | {fmt(lo)}-{fmt(hi)} | {fmt(r['speedup_vs_fp32'])} "
             f"| {fmt(r['loop_slices_per_s'])} | {fmt(r['loop_speedup_vs_fp32'])} |")
    emit()
    emit("e2e = slices / `Segmentation.seconds` (includes `Checkpoint.build_model()`, volume statistics, "
         "post-processing); loop = forward passes only (first to last `Progress` callback). "
         "bf16 = `torch.autocast` bf16 with the model and input in channels_last (as `inference` does); "
         "fp32 = plain contiguous fp32. Runs of a row alternate fp32/bf16 after one warm-up each.")
    emit()
    emit("Time of `Checkpoint.build_model()` alone (inside every e2e time): " + ", ".join(
        f"{r['preset']} {r['build_model_s']:.3f}s" for r in results
        if r["precision"] == precisions[0] and r["input_size"] is None))
    emit()
    if diffs:
        emit("## fp32 vs reduced precision outputs (random weights, same slices)")
        emit()
        emit("| preset | net input | precision | max abs prob diff | mean abs prob diff | fp32 prob range "
             "| pixels flipped at 0.5 |")
        emit("|---|---|---|---:|---:|---|---:|")
        for d in diffs:
            size = f"{d['input_size'][0]}x{d['input_size'][1]}" if d["input_size"] else "256x256"
            lo, hi = d["fp32_prob_range"]
            emit(f"| {d['preset']} | {size} | {d['precision']} | {d['max_abs_prob_diff']:.2e} "
                 f"| {d['mean_abs_prob_diff']:.2e} | {lo:.3f}-{hi:.3f} "
                 f"| {d['pixels_flipped_at_0.5']} / {d['pixels']} |")
        emit()
        emit("Untrained weights: differences indicate bf16 rounding only, not accuracy on a trained model.")
        emit()
    total = time.perf_counter() - t_start
    emit(f"Total benchmark time: {total:.0f} s; load average at end: {loadavg()}")

    if args.out:
        Path(args.out).write_text("\n".join(out_lines) + "\n")
    if args.json:
        doc = {
            "command": cmd,
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "torch": torch.__version__, "num_threads": torch.get_num_threads(), "cpu": cpu_model_name(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": device, "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "auto_precision": auto_prec, "cpu_has_native_bf16": native_bf16,
            "patient": patient.patient_id, "volume_shape": list(vol_all.shape), "batch_size": args.batch_size,
            "rows": [{k: v for k, v in r.items()} for r in results],
            "fp32_vs_reduced": diffs, "total_seconds": total,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
