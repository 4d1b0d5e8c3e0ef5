"""Knowledge distillation and BatchNorm recalibration: win back what compression cost.

``distill`` fine-tunes the current ONNX model (the student) against a teacher (the original
model, or the model after a named earlier pass) through optcc's trainable torch view, and
writes the trained weights back into the same initializers. The loss is

    L = kd_weight · T² · KL(softmax(teacher / T) ‖ softmax(student / T))
      + label_weight · CE(student, labels)                   (when the data has labels)
      + feature_weight · Σ MSE(student[a], teacher[b])       (for feature_mse pairs a → b)

for classifier outputs (2-D); other outputs (encoder states) use MSE to the teacher instead
of KL. Training is seeded and deterministic on CPU, shows a progress bar with the loss,
checkpoints every epoch (an interrupted run resumes from its last epoch when re-run with the
same model and options, in any process), honours sparsity masks, and trains Q/DQ models
quantization-aware. It stops with a clear error when the loss stops being a finite number.

Checkpoints never run code: the weights are written with ``torch.save`` and read back with
``torch.load(weights_only=True)``, and a JSON record beside them holds their SHA-256. A
checkpoint whose hash, contents or shapes do not match is reported in one warning line and
ignored; training then starts from the beginning.
Under ``torchrun`` (``torchrun --nproc_per_node N -m optcc.cli build recipe.yaml``) every
rank runs the same deterministic build; ``distill`` joins the process group (NCCL on CUDA,
gloo on CPU) and trains with DistributedDataParallel, each rank taking every
world_size-th batch; only rank 0 publishes the output folder.

``recalibrate-batchnorm`` re-estimates BatchNormalization running statistics on the
calibration data: after pruning, the surviving channels' statistics shift and accuracy can
fall to chance before any training; this restores much of it for the cost of one pass over
the data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from optcc import (
    Capability,
    Model,
    OptccError,
    Pass,
    PassContext,
    PassOptions,
    PassResult,
    Tolerance,
    hookimpl,
)

logger = logging.getLogger(__name__)


class DistillOptions(PassOptions):
    teacher: str = Field(
        "original", description="'original' (the model as loaded) or the name of an earlier pass "
        "whose output teaches.",
    )
    epochs: int = Field(3, ge=1, le=10_000, description="Passes over the training data.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate.")
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adamw", description="Optimizer.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="Learning-rate schedule over all steps."
    )
    temperature: float = Field(4.0, gt=0, description="Softmax temperature T of the KD term.")
    kd_weight: float = Field(1.0, ge=0, description="Weight of the distillation term.")
    label_weight: float = Field(
        0.0, ge=0, description="Weight of hard-label cross-entropy (needs labels)."
    )
    feature_mse: dict[str, str] = Field(
        default_factory=dict, description="Intermediate tensors to match: student name -> teacher name."
    )
    feature_weight: float = Field(1.0, ge=0, description="Weight of the feature MSE terms.")
    batchnorm: Literal["update", "frozen"] = Field(
        "update", description="update: BatchNorm uses batch statistics while training and its "
        "running statistics follow; frozen: running statistics stay as they are.",
    )
    keep_zeros: bool = Field(
        True, description="Weights that are exactly zero stay zero (unstructured / 2:4 sparsity)."
    )
    shuffle_buffer: int = Field(
        4096, ge=0, description="Samples shuffled together (seeded); 0 keeps the data order."
    )
    max_batches: int | None = Field(
        None, ge=1, description="Stop each epoch after this many batches."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train.")
    resume: bool = Field(True, description="Resume an interrupted run from its last checkpoint.")


def _device(choice: str) -> Any:
    import torch

    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _shuffled(batches: Iterator[Any], buffer: int, rng: np.random.Generator) -> Iterator[Any]:
    """Re-batch a stream with samples shuffled inside a bounded buffer (streaming-safe)."""
    from optcc import Batch

    if buffer <= 0:
        yield from batches
        return
    pending: list[Any] = []
    size = None
    count = 0

    def flush(items: list[Any]) -> Iterator[Any]:
        inputs = {k: np.concatenate([b.inputs[k] for b in items]) for k in items[0].inputs}
        labels = (np.concatenate([b.labels for b in items])
                  if all(b.labels is not None for b in items) else None)
        order = rng.permutation(len(next(iter(inputs.values()))))
        n = size or len(order)
        for start in range(0, len(order), n):
            idx = order[start:start + n]
            yield Batch({k: v[idx] for k, v in inputs.items()}, None if labels is None else labels[idx])

    for batch in batches:
        size = size or batch.size
        pending.append(batch)
        count += batch.size
        if count >= buffer:
            yield from flush(pending)
            pending, count = [], 0
    if pending:
        yield from flush(pending)


def join_process_group() -> bool:
    """Under torchrun (WORLD_SIZE > 1 in the environment), join the process group: NCCL
    on CUDA, gloo on CPU. Returns whether training is distributed."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_available():
        return False
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend, init_method="env://")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def checkpoint_key(student: Model, teacher: Model, options: dict[str, Any]) -> str:
    """A content hash of the student, the teacher and the options: the same training in any
    process (or on any rank) gets the same checkpoint name."""
    digest = hashlib.sha256()
    for m in (student, teacher):
        for t in sorted(m.graph.tensors().values(), key=lambda t: t.name):
            if hasattr(t, "values"):
                digest.update(t.name.encode())
                digest.update(np.ascontiguousarray(t.values).tobytes())
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def train_distill(
    student_model: Model,
    teacher_model: Model,
    batches: Callable[[], Iterator[Any]],
    options: DistillOptions,
    *,
    seed: int = 0,
    progress: Any = None,
    checkpoint: Path | None = None,
) -> tuple[Model, dict[str, Any]]:
    """The training loop (also used directly under torchrun). Returns the trained model
    and statistics: loss per epoch, seconds, device, resumed epoch, world size."""
    import torch
    import torch.nn.functional as F

    from optcc import GraphModule

    torch.manual_seed(seed)
    device = _device(options.device)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    student = GraphModule(student_model, keep_zeros=options.keep_zeros,
                          update_batchnorm=options.batchnorm == "update").to(device)
    teacher = GraphModule(teacher_model).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    model: Any = student
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(student)
    params = [p for p in student.parameters() if p.requires_grad]

    def make_optimizer() -> Any:
        if options.optimizer == "sgd":
            return torch.optim.SGD(params, lr=options.learning_rate, momentum=options.momentum,
                                   weight_decay=options.weight_decay)
        kind = torch.optim.Adam if options.optimizer == "adam" else torch.optim.AdamW
        return kind(params, lr=options.learning_rate, weight_decay=options.weight_decay)

    opt = make_optimizer()
    steps_per_epoch = sum(1 for _ in batches())
    if options.max_batches:
        steps_per_epoch = min(steps_per_epoch, options.max_batches)
    steps_per_epoch = max(1, steps_per_epoch // world)
    total = steps_per_epoch * options.epochs

    def lr_at(step: int) -> float:
        if options.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start_epoch, history = 0, []
    state = read_checkpoint(checkpoint, device, options.epochs) if checkpoint and options.resume else None
    if state is not None:
        snapshot = {k: v.detach().clone() for k, v in student.state_dict().items()}
        try:
            _check_state_shapes(student.state_dict(), state["model"])
            student.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            start_epoch, history = int(state["epoch"]), [float(v) for v in state["history"]]
            logger.info("distill: resumed from epoch %d (%s)", start_epoch, checkpoint)
        except Exception as exc:  # a checkpoint of another model: start over, cleanly
            logger.warning("distill: ignoring checkpoint %s (%s); training starts from epoch 1",
                           checkpoint, _first_line(exc))
            student.load_state_dict(snapshot)
            opt = make_optimizer()
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
            torch.manual_seed(seed)
    student.apply_masks()
    out_names = student.output_names
    student_features = list(options.feature_mse)
    teacher_features = [options.feature_mse[k] for k in student_features]
    started = time.perf_counter()
    for epoch in range(start_epoch, options.epochs):
        rng = np.random.default_rng([seed, epoch])
        student.train()
        total_loss, seen = 0.0, 0
        last = f" (last loss {history[-1]:.4f})" if history else ""
        stream = _shuffled(batches(), options.shuffle_buffer, rng)
        if progress is not None:
            stream = progress.track(stream, description=f"distill: epoch {epoch + 1}/{options.epochs}{last}",
                                    total=steps_per_epoch * world)
        for i, batch in enumerate(stream):
            if options.max_batches and i >= options.max_batches:
                break
            if i >= steps_per_epoch * world:
                break
            if i % world != rank:
                continue
            feeds = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in batch.inputs.items()}
            with torch.no_grad():
                t_out = teacher.run(dict(feeds), out_names[:1] + teacher_features)
            env = dict(feeds)
            if distributed:  # DDP needs its forward to run for gradient synchronisation
                s_first = model(**feeds)[0]
                s_out = [s_first] + (student.run(env, student_features) if student_features else [])
            else:
                s_out = student.run(env, out_names[:1] + student_features)
            s_logits, t_logits = s_out[0], t_out[0]
            loss = torch.zeros((), device=device)
            if s_logits.ndim == 2 and options.kd_weight:
                temp = options.temperature
                loss = loss + options.kd_weight * temp * temp * F.kl_div(
                    F.log_softmax(s_logits / temp, dim=1), F.softmax(t_logits / temp, dim=1),
                    reduction="batchmean")
            elif options.kd_weight:
                loss = loss + options.kd_weight * F.mse_loss(s_logits, t_logits)
            if options.label_weight and batch.labels is not None and s_logits.ndim == 2:
                labels = torch.from_numpy(np.asarray(batch.labels)).long().to(device)
                loss = loss + options.label_weight * F.cross_entropy(s_logits, labels)
            for s_f, t_f in zip(s_out[1:], t_out[1:], strict=True):
                loss = loss + options.feature_weight * F.mse_loss(s_f, t_f)
            _stop_unless_finite(loss, epoch, i, options, distributed)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            student.mask_gradients()
            opt.step()
            sched.step()
            student.apply_masks()
            total_loss += float(loss.detach()) * batch.size
            seen += batch.size
        if distributed:
            # Running statistics are state, not gradients: DDP does not sync them, so each
            # rank saw only its shard. Average them so every replica is identical.
            with torch.no_grad():
                for p in student.parameters():
                    if not p.requires_grad:
                        torch.distributed.all_reduce(p.data)
                        p.data /= world
            loss_sum = torch.tensor([total_loss, float(seen)], dtype=torch.float64)
            torch.distributed.all_reduce(loss_sum)
            total_loss, seen = float(loss_sum[0]), int(loss_sum[1])
        history.append(total_loss / max(seen, 1))
        if checkpoint is not None and rank == 0:
            write_checkpoint(checkpoint, {
                "epoch": epoch + 1, "history": history, "model": student.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state()})
    trained = student.to("cpu").write_back()
    return trained, {
        "loss_per_epoch": history, "seconds": round(time.perf_counter() - started, 3),
        "device": str(device), "resumed_from_epoch": start_epoch, "world_size": world,
        "steps_per_epoch": steps_per_epoch,
    }


class DistillPass(Pass):
    """Fine-tune the compressed model against the teacher (see the module docstring)."""

    name = "distill"
    summary = "Knowledge-distillation fine-tune of the ONNX model against the original."
    Options = DistillOptions
    requires = frozenset({Capability.TRAINING_DATA, Capability.TORCH})
    tolerance = Tolerance.lossy()

    @classmethod
    def required_for(cls, options: Any) -> frozenset[Capability]:
        needs = set(cls.requires)
        if options.device == "cuda":
            needs.add(Capability.CUDA)
        return frozenset(needs)

    @classmethod
    def problems_in_recipe(cls, options: Any, earlier: list[str]) -> list[str]:
        if options.teacher == "original" or options.teacher in earlier:
            return []
        return [f"teacher '{options.teacher}' is neither 'original' nor a pass that runs "
                f"before this one (earlier passes: {', '.join(earlier) or 'none'})"]

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        opts: Any = self.options
        if opts.teacher == "original":
            teacher = ctx.original
        else:
            teacher = ctx.stages.get(opts.teacher)
            if teacher is None:
                raise ValueError(f"teacher '{opts.teacher}' is not an earlier pass "
                                 f"(earlier passes: {', '.join(ctx.stages) or 'none'})")
        if teacher is None:
            teacher = model
        options = opts.model_dump(mode="json")
        checkpoint = None
        if ctx.cache_dir is not None:
            key = checkpoint_key(model, teacher, {**options, "seed": ctx.seed})
            checkpoint = ctx.cache_dir / f"distill-{key}.json"
        distributed = join_process_group()
        trained, stats = train_distill(
            model, teacher, lambda: ctx.batches("training"), opts, seed=ctx.seed,
            progress=ctx.progress, checkpoint=checkpoint,
        )
        if checkpoint is not None and (not distributed or _rank() == 0):
            remove_checkpoint(checkpoint)  # finished: the checkpoint has served its purpose
        trained.source = model.source
        return PassResult(trained, True, stats)


def _rank() -> int:
    import torch

    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _stop_unless_finite(loss: Any, epoch: int, step: int, options: DistillOptions,
                        distributed: bool) -> None:
    """Stop training on a NaN or infinite loss (on every rank at once under DDP)."""
    import torch

    bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach())) else 1.0], device=loss.device)
    if distributed:
        torch.distributed.all_reduce(bad)
    if bad.item():
        raise OptccError(
            f"the training loss became {float(loss.detach())} in epoch {epoch + 1}, step "
            f"{step + 1}; the weights would be garbage, so training stopped",
            hint=f"lower learning_rate (now {options.learning_rate:g}) or temperature "
            f"(now {options.temperature:g}), or check the training data for extreme values",
        )


# ---- checkpoints: a JSON record (epoch, file, SHA-256) beside weights saved without pickle
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_file(record: Path, epoch: int) -> Path:
    return record.with_name(f"{record.stem}-epoch{epoch:05d}.pt")


def write_checkpoint(record: Path, state: dict[str, Any]) -> None:
    """Save ``state`` as ``RECORD-epochNNNNN.pt`` and point ``record`` at it with its hash;
    older epochs' files go. A crash at any point leaves the record naming a complete file."""
    import torch

    record.parent.mkdir(parents=True, exist_ok=True)
    weights = _weights_file(record, int(state["epoch"]))
    tmp = weights.with_name(weights.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, weights)
    entry = {"format": 1, "file": weights.name, "sha256": _sha256(weights), "epoch": state["epoch"]}
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps(entry) + "\n")
    os.replace(tmp, record)
    for old in record.parent.glob(f"{record.stem}-epoch*.pt"):
        if old != weights:
            old.unlink(missing_ok=True)


def read_checkpoint(record: Path, device: Any, epochs: int) -> dict[str, Any] | None:
    """The state saved under ``record``, or None (with one warning line when there was a
    checkpoint that cannot be used). Nothing in it is executed: weights_only loading."""
    import torch

    if not record.exists():
        return None
    try:
        entry = json.loads(record.read_text())
        name = entry["file"]
        if not isinstance(name, str) or not name.startswith(record.stem + "-epoch") or "/" in name:
            raise ValueError(f"the record names an unexpected file {name!r}")
        weights = record.with_name(name)
        if _sha256(weights) != entry["sha256"]:
            raise ValueError(f"{weights.name} does not match the SHA-256 recorded when it was "
                             "written")
        state = torch.load(weights, map_location=device, weights_only=True)
        if not isinstance(state, dict) or not 1 <= int(state["epoch"]) <= epochs:
            raise ValueError("it does not hold a distillation state")
    except Exception as exc:
        logger.warning("distill: ignoring checkpoint %s (%s); training starts from epoch 1",
                       record, _first_line(exc))
        return None
    return state


def remove_checkpoint(record: Path) -> None:
    for old in record.parent.glob(f"{record.stem}-epoch*.pt"):
        old.unlink(missing_ok=True)
    record.unlink(missing_ok=True)


def _check_state_shapes(expected: dict[str, Any], found: Any) -> None:
    if not isinstance(found, dict) or set(found) != set(expected):
        raise ValueError("its parameters are not this model's")
    for key, value in expected.items():
        if tuple(getattr(found[key], "shape", ())) != tuple(value.shape):
            raise ValueError(f"parameter {key} has shape {tuple(found[key].shape)}, "
                             f"expected {tuple(value.shape)}")


class RecalibrateBatchNormOptions(PassOptions):
    pass


class RecalibrateBatchNormPass(Pass):
    """Re-estimate every BatchNormalization's running mean and variance on the calibration
    data: the exact per-channel mean and (biased) variance of its input over all samples and
    positions, accumulated batch by batch (sums of x and x², so memory stays bounded).
    BatchNorms are recalibrated level by level in graph order, one pass over the data per
    level, so each one sees inputs already normalised by its recalibrated predecessors."""

    name = "recalibrate-batchnorm"
    summary = "Recompute BatchNorm running statistics on calibration data (cheap accuracy rescue)."
    Options = RecalibrateBatchNormOptions
    requires = frozenset({Capability.CALIBRATION_DATA})
    tolerance = Tolerance.lossy()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        import onnx_graphsurgeon as gs

        bns = [n for n in model.graph.nodes if n.op == "BatchNormalization"
               and all(isinstance(t, gs.Constant) for t in n.inputs[1:5])]
        if not bns:
            return PassResult(model, False, reason="no BatchNormalization with constant statistics "
                              "(fold-batchnorm already ran? recalibrate before folding)")
        levels = self._levels(model, bns)
        shifts: dict[str, float] = {}
        for depth in sorted(set(levels.values())):
            level = [bn for bn in bns if levels[bn.name] == depth]
            stats = self._measure(model, level, ctx, f"recalibrating BatchNorm (level {depth + 1})")
            for bn in level:
                mean, var = stats[bn.inputs[0].name]
                old_mean = np.asarray(bn.inputs[3].values)
                shifts[bn.name] = float(np.abs(mean - old_mean).mean())
                bn.inputs[3] = gs.Constant(f"{bn.inputs[3].name}_recal_{bn.name}", mean.astype(old_mean.dtype))
                bn.inputs[4] = gs.Constant(f"{bn.inputs[4].name}_recal_{bn.name}", var.astype(old_mean.dtype))
        return PassResult(model, True, {"batchnorms": len(bns), "levels": len(set(levels.values())),
                                        "mean_shift": shifts})

    @staticmethod
    def _levels(model: Model, bns: list[Any]) -> dict[str, int]:
        """Depth of each BatchNorm in terms of BatchNorms upstream of it: a level can be
        measured in one pass once every shallower level is recalibrated."""
        model.graph.toposort()
        bn_names = {bn.name for bn in bns}
        depth_of_tensor: dict[str, int] = {}
        levels: dict[str, int] = {}
        for node in model.graph.nodes:
            depth = max((depth_of_tensor.get(t.name, -1) for t in node.inputs), default=-1)
            if node.name in bn_names:
                levels[node.name] = depth + 1
                depth += 1
            for t in node.outputs:
                depth_of_tensor[t.name] = depth
        return levels

    @staticmethod
    def _measure(model: Model, level: list[Any], ctx: PassContext, label: str) -> dict[str, tuple[Any, Any]]:
        """Exact per-channel mean and variance of the level's BatchNorm inputs."""
        from optcc import OrtRunner

        names = list(dict.fromkeys(bn.inputs[0].name for bn in level))
        runner = OrtRunner(model, extra_outputs=names, optimization="disable")
        sums: dict[str, Any] = {}
        squares: dict[str, Any] = {}
        counts: dict[str, int] = {}
        for batch in ctx.progress.track(ctx.batches("calibration"), description=label):
            outs = dict(zip(runner.output_names, runner.run(batch.inputs), strict=True))
            for name in names:
                x = np.moveaxis(outs[name].astype(np.float64), 1, 0).reshape(outs[name].shape[1], -1)
                sums[name] = sums.get(name, 0) + x.sum(axis=1)
                squares[name] = squares.get(name, 0) + (x * x).sum(axis=1)
                counts[name] = counts.get(name, 0) + x.shape[1]
        return {
            name: (sums[name] / counts[name],
                   np.maximum(squares[name] / counts[name] - (sums[name] / counts[name]) ** 2, 0.0))
            for name in names
        }


@hookimpl
def optcc_passes() -> list[type[Pass]]:
    return [DistillPass, RecalibrateBatchNormPass]
