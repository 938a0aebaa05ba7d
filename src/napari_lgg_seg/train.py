"""The training engine: one loop for training from scratch (CLI, one machine or DDP under torchrun) and for
fine-tuning on corrected slices (CLI and the napari widget).

:func:`iter_train` is a plain generator: it yields :class:`StepProgress` and :class:`EpochReport` and returns a
:class:`TrainResult`; the CLI prints the reports, the widget plots them. A cancel flag is checked between steps.
Every epoch is seeded from (seed, epoch), so resuming from epoch k gives the same epoch k+1 as an uninterrupted run.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint as ckpt_mod
from . import inference, metrics, preprocess
from .checkpoint import Checkpoint
from .data import Augment, Sample, SliceIndex
from .inference import Cancelled
from .model import PRESETS, UNet

OPTIMIZERS = ("adamw", "sgd")
TRAIN_LAYERS = ("all", "decoder", "head")


@dataclass
class TrainConfig:
    preset: str = "fast"
    input_size: tuple[int, int] | None = (128, 128)  # resolution the net runs at (new models; fine-tune keeps its own)
    epochs: int = 30
    steps_per_epoch: int | None = None  # default: one pass over the training slices
    batch_size: int = 16
    lr: float | None = None  # default: 2e-3 (adamw), 0.05 (sgd, the one-cycle peak)
    optimizer: str = "adamw"  # adamw + cosine, or sgd (momentum 0.9) + one-cycle (the tutorial's)
    weight_decay: float = 1e-4
    dice_weight: float = 0.3  # loss = w x soft Dice + (1 - w) x BCE
    augment: bool = True
    scale: float = 0.05
    rotate: float = 15.0
    flip: bool = True
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    keep_last: int = 3  # epoch checkpoints kept besides best.pt
    early_stop: int | None = None  # stop after this many epochs without a better val DSC
    train_layers: str = "all"  # all | decoder | head (fine-tuning few slices)
    freeze_batchnorm: bool = False  # keep batch-norm statistics fixed (fine-tuning few slices)
    threshold: float = 0.5
    keep_largest: bool = True  # post-processing used for the val DSC, as inference does by default

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size) if self.input_size else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        if d.get("input_size"):
            d["input_size"] = tuple(d["input_size"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (2e-3 if self.optimizer == "adamw" else 0.05)


@dataclass(frozen=True)
class StepProgress:
    epoch: int  # 1-based
    epochs: int
    step: int  # 1-based within the epoch
    steps: int
    loss: float
    eta_s: float  # seconds left for the whole run, from the pace so far


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    epochs: int
    train: dict  # bce, dice, loss
    val: dict  # bce, dice, loss, dsc_mean, dsc_median, dsc (per patient) (empty without validation)
    lr: float
    seconds: float
    best: bool  # this epoch has the best val DSC so far (and was saved as best.pt)

    def row(self) -> dict:
        r = {"epoch": self.epoch, "lr": self.lr, "seconds": round(self.seconds, 2)}
        r.update({f"train_{k}": v for k, v in self.train.items()})
        r.update({f"val_{k}": v for k, v in self.val.items() if k != "dsc"})
        return r

    def line(self) -> str:
        t = self.train
        s = f"epoch {self.epoch:3d}/{self.epochs}  train loss {t['loss']:.4f} (bce {t['bce']:.4f} dice {t['dice']:.4f})"
        if self.val:
            v = self.val
            s += (f"  val loss {v['loss']:.4f} (bce {v['bce']:.4f} dice {v['dice']:.4f})"
                  f"  val DSC mean {v['dsc_mean']:.4f} median {v['dsc_median']:.4f}")
        return s + f"  lr {self.lr:.2e}  {self.seconds:.0f}s" + ("  *best" if self.best else "")


@dataclass
class TrainResult:
    checkpoint: Checkpoint  # the best by val DSC (the last epoch's without validation)
    history: list[dict]
    best_path: Path | None
    last_path: Path | None
    stopped: str  # "completed" | "early stop"


# ------------------------------------------------------------------------------------------------------ parts


def loss_terms(logits: torch.Tensor, target: torch.Tensor, dice_weight: float) -> tuple[torch.Tensor, ...]:
    """(total, bce, soft dice loss) for logits and soft targets in [0, 1]; computed in fp32."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return dice_weight * dice + (1 - dice_weight) * bce, bce, dice


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _set_trainable(net: UNet, which: str) -> None:
    if which not in TRAIN_LAYERS:
        raise ValueError(f"train_layers must be one of {TRAIN_LAYERS}, got {which!r}")
    for name, p in net.named_parameters():
        if which == "all":
            p.requires_grad_(True)
        elif which == "decoder":
            p.requires_grad_(name.startswith(("decoders", "upconvs", "head")))
        else:
            p.requires_grad_(name.startswith("head"))


def _make_optimizer(net: UNet, cfg: TrainConfig, total_steps: int):
    params = [p for p in net.parameters() if p.requires_grad]
    lr = cfg.resolved_lr()
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps), eta_min=lr * 0.01)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(2, total_steps))
    else:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}")
    return opt, sched


def validate(net: UNet, samples: list[Sample], cfg: TrainConfig, dev, prec, input_size, cancel=None) -> dict:
    """Per-volume DSC (and BCE / soft Dice at full resolution) on validation samples, with inference's own
    forward pass and post-processing. For a sample restricted to some slices, DSC is over those slices."""
    if not samples:
        return {}
    dscs, bce_sum, n_vox, inter, psum, tsum = {}, 0.0, 0, 0.0, 0.0, 0.0
    was_training = net.training
    net.eval()
    for s in samples:
        vol = s.image[s.slices]
        probs, _ = inference.run(inference.iter_probabilities(net, vol, s.stats, dev, prec, 16, False, input_size,
                                                              cancel))
        truth = s.mask[s.slices].astype(np.float32)
        p = np.clip(probs, 1e-6, 1 - 1e-6)
        bce_sum += float(-(truth * np.log(p) + (1 - truth) * np.log(1 - p)).sum())
        n_vox += truth.size
        inter += float((probs * truth).sum())
        psum += float(probs.sum())
        tsum += float(truth.sum())
        whole = len(s.slices) == s.image.shape[0]
        labels = inference.postprocess(probs >= cfg.threshold, keep_largest=cfg.keep_largest and whole)
        dscs[s.patient_id] = metrics.dice(labels, truth)
    net.train(was_training)
    bce = bce_sum / n_vox
    dice = 1 - (2 * inter + 1) / (psum + tsum + 1)
    vals = list(dscs.values())
    return {"bce": bce, "dice": dice, "loss": cfg.dice_weight * dice + (1 - cfg.dice_weight) * bce,
            "dsc_mean": float(np.mean(vals)), "dsc_median": float(np.median(vals)), "dsc": dscs}


def write_history(history: list[dict], folder: Path) -> None:
    """metrics.csv and curves.png (loss and val DSC per epoch), written atomically."""
    if not history:
        return
    keys = list(dict.fromkeys(k for row in history for k in row))
    fd, tmp = tempfile.mkstemp(prefix=".metrics.", suffix=".csv", dir=folder)
    with os.fdopen(fd, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, folder / "metrics.csv")
    plot_history(history, folder / "curves.png")


def plot_history(history: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ep = [r["epoch"] for r in history]
    ax1.plot(ep, [r["train_loss"] for r in history], label="train loss")
    if "val_loss" in history[0]:
        ax1.plot(ep, [r["val_loss"] for r in history], label="val loss")
        ax2.plot(ep, [r["val_dsc_mean"] for r in history], label="val DSC mean")
        ax2.plot(ep, [r["val_dsc_median"] for r in history], label="val DSC median")
        ax2.set_ylim(0, 1)
        ax2.legend()
    ax1.set_xlabel("epoch"), ax2.set_xlabel("epoch"), ax1.set_ylabel("loss"), ax2.set_ylabel("per-volume DSC")
    ax1.legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=".curves.", suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------- loop


def iter_train(
    train: list[Sample],
    val: list[Sample],
    config: TrainConfig,
    output_dir: str | os.PathLike | None = None,
    *,
    init: Checkpoint | None = None,
    resume: str | os.PathLike | None = None,
    cancel=None,
    overwrite: bool = False,
    data_info: dict | None = None,
):
    """Train; yields :class:`StepProgress` / :class:`EpochReport`, returns :class:`TrainResult`.

    ``init``: start from this checkpoint's weights, preprocessing and resolution (fine-tuning); it is never
    modified. ``resume``: continue an interrupted run from one of its epoch checkpoints (its recorded config wins).
    ``output_dir``: epoch checkpoints (last ``keep_last``), ``best.pt``, ``metrics.csv``, ``curves.png``; refused
    when it already holds checkpoints, unless resuming or ``overwrite``.
    """
    rank, world = _world()
    history: list[dict] = []
    start_epoch, best_dsc, state = 1, -math.inf, None
    if resume is not None:
        res = ckpt_mod.load(resume)
        state = res.training.get("resume")
        if not state:
            raise ckpt_mod.CheckpointError(f"{resume}: has no training state to resume from (use an epoch checkpoint)")
        config = TrainConfig.from_dict(state["config"])
        history, start_epoch, best_dsc = list(res.training.get("history", [])), state["epoch"] + 1, state["best_dsc"]
        base = res
    else:
        base = init
    cfg = config
    if base is not None:
        net = base.build_model()
        preprocessing, input_size, preset = base.preprocessing, base.input_size, base.preset
    else:
        if cfg.preset not in PRESETS:
            raise ValueError(f"unknown preset {cfg.preset!r}")
        torch.manual_seed(cfg.seed)
        net = UNet(PRESETS[cfg.preset])
        preprocessing, input_size, preset = copy.deepcopy(preprocess.DEFAULT), cfg.input_size, cfg.preset
    for s in train + val:
        if s.stats is None:
            raise ValueError(f"{s.patient_id}: sample has no preprocessing statistics")

    out = Path(output_dir) if output_dir is not None else None
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if resume is None and not overwrite and any(out.glob("*.pt")):
            raise FileExistsError(f"{out}: already holds checkpoints; choose another folder, --resume, or overwrite")

    dev = inference.resolve_device(cfg.device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(dev)
    prec = inference.resolve_precision(cfg.precision, dev)
    index = SliceIndex(train)
    steps = cfg.steps_per_epoch or max(1, math.ceil(len(index) / (cfg.batch_size * world)))
    total_steps = steps * cfg.epochs

    net = net.to(dev)
    if prec != "fp32":
        net = net.to(memory_format=torch.channels_last)
    _set_trainable(net, cfg.train_layers)
    opt, sched = _make_optimizer(net, cfg, total_steps)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    model = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    scaler = torch.amp.GradScaler("cuda") if (prec == "fp16" and dev.type == "cuda") else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)
    augment = Augment(cfg.scale, cfg.rotate, cfg.flip, cfg.augment)
    info = {"preset": preset, "train_patients": [s.patient_id for s in train],
            "val_patients": [s.patient_id for s in val], "train_slices": len(index), **(data_info or {})}

    def make_ckpt(with_state: bool, epoch: int) -> Checkpoint:
        training = {"config": cfg.to_dict(), "epochs": epoch, "history": copy.deepcopy(history), "data": info,
                    "device": dev.type, "precision": prec, "world_size": world}
        if with_state:
            training["resume"] = {"epoch": epoch, "best_dsc": best_dsc, "config": cfg.to_dict(),
                                  "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
        parent = base.source if base is not None and resume is None else (base.parent if base is not None else None)
        return Checkpoint.from_model(net, preset=preset, preprocessing=copy.deepcopy(preprocessing),
                                     input_size=input_size, threshold=cfg.threshold, training=training, parent=parent)

    best_path = out / "best.pt" if out is not None else None
    last_path = None
    best_ckpt: Checkpoint | None = None
    stopped = "completed"
    t_run, steps_done = time.perf_counter(), 0
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout
            draws = index.draw(steps * cfg.batch_size * world, gen)[rank::world]
            model.train()
            if cfg.freeze_batchnorm:
                for m in net.modules():
                    if isinstance(m, torch.nn.BatchNorm2d):
                        m.eval()
            sums = np.zeros(3)
            for step in range(steps):
                if inference._is_cancelled(cancel):
                    raise Cancelled("training cancelled")
                x, y = index.batch(draws[step * cfg.batch_size:(step + 1) * cfg.batch_size], input_size, dev)
                x, y = augment(x, y, gen)
                if prec != "fp32":
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    logits = model(x)
                total, bce, dice = loss_terms(logits, y, cfg.dice_weight)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(total).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    total.backward()
                    opt.step()
                sched.step()
                sums += [total.item(), bce.item(), dice.item()]
                steps_done += 1
                pace = (time.perf_counter() - t_run) / steps_done
                remaining = (cfg.epochs - epoch) * steps + (steps - step - 1)
                yield StepProgress(epoch, cfg.epochs, step + 1, steps, sums[0] / (step + 1), pace * remaining)
            tr = dict(zip(("loss", "bce", "dice"), (sums / steps).tolist()))
            if world > 1:  # average the epoch's training metrics over ranks
                t = torch.tensor([tr["loss"], tr["bce"], tr["dice"]], dtype=torch.float64)
                dist.all_reduce(t)
                tr = dict(zip(("loss", "bce", "dice"), (t / world).tolist()))
            stop = torch.zeros(1)
            is_best = False
            va: dict = {}
            if rank == 0:
                va = validate(net, val, cfg, dev, prec, input_size, cancel)
                if va and va["dsc_mean"] > best_dsc:
                    best_dsc, is_best = va["dsc_mean"], True
                report = EpochReport(epoch, cfg.epochs, tr, va, sched.get_last_lr()[0], time.perf_counter() - t0,
                                     is_best)
                history.append(report.row())
                if is_best or (not val):
                    best_ckpt = make_ckpt(False, epoch)
                if out is not None:
                    last_path = ckpt_mod.save(make_ckpt(True, epoch), out / f"epoch_{epoch:03d}.pt", overwrite=True)
                    for old in sorted(out.glob("epoch_*.pt"))[: -max(1, cfg.keep_last)]:
                        old.unlink()
                    if is_best or not val:
                        ckpt_mod.save(best_ckpt, best_path, overwrite=True)
                    write_history(history, out)
                if cfg.early_stop and val:
                    best_epoch = max(history, key=lambda r: r.get("val_dsc_mean", -1))["epoch"]
                    if epoch - best_epoch >= cfg.early_stop:
                        stop[0] = 1
                yield report
            if world > 1:
                dist.broadcast(stop, 0)
            if stop.item():
                stopped = "early stop"
                break
    finally:
        if dev.type == "cuda":  # release GPU memory whether training ended, failed or was cancelled
            del model, opt
            torch.cuda.empty_cache()
    if best_ckpt is None:
        best_ckpt = make_ckpt(False, cfg.epochs)
    return TrainResult(best_ckpt, history, best_path if out is not None else None, last_path, stopped)


# ------------------------------------------------------------------------------------------------ fine-tuning


def iter_finetune(
    base: Checkpoint,
    train: list[Sample],
    val: list[Sample] | None = None,
    *,
    steps: int | None = None,
    epochs: int | None = None,
    lr: float = 3e-4,
    batch_size: int = 8,
    augment: bool = True,
    train_layers: str = "all",
    freeze_batchnorm: bool = True,
    device: str = "auto",
    precision: str = "auto",
    seed: int = 0,
    output_dir=None,
    cancel=None,
):
    """Fine-tune ``base`` on the given samples (typically restricted to corrected slices). ``steps`` are split
    into up to 10 rounds, each followed by validation, so progress can be watched; ``epochs`` are passes over
    the selected slices. Returns a :class:`TrainResult` whose checkpoint records ``base`` as its parent."""
    n = sum(len(s.slices) for s in train)
    if steps is None and epochs is None:
        steps = 60
    if steps is not None:
        rounds = max(1, min(10, steps // 5))
        per, n_epochs = max(1, steps // rounds), rounds
    else:
        per, n_epochs = max(1, math.ceil(n / batch_size)), int(epochs)
    cfg = TrainConfig(preset=base.preset or "custom", input_size=base.input_size, epochs=n_epochs,
                      steps_per_epoch=per, batch_size=batch_size, lr=lr, optimizer="adamw", weight_decay=0.0,
                      augment=augment, precision=precision, device=device, seed=seed, train_layers=train_layers,
                      freeze_batchnorm=freeze_batchnorm, threshold=base.threshold, keep_last=1)
    slices = {s.patient_id: (s.slices + 1).tolist() for s in train}
    result = yield from iter_train(train, val or [], cfg, output_dir, init=base, cancel=cancel,
                                   data_info={"finetune_slices": slices})
    return result


# ---------------------------------------------------------------------------------------------- torchrun entry


def main(argv=None) -> int:
    """``torchrun --nproc_per_node=N -m napari_lgg_seg.train DATA --output DIR ...`` (same options as
    ``lgg-seg train``)."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
