"""What a training run is: its params (one named model config), its name and its files.

A model config is a named subsection of ``models:`` in params.yaml; two configs may share an
architecture with different settings. A run is (model config, fold, seed) and lives in
``runs/<model>_f<fold>_s<seed>/``:

    train/           the training stage's output (DVC ``persist``: kept for resuming)
      last.pt        resumable checkpoint (model, optimizer, scheduler, RNG states; the
                     config and data digests that decide whether a re-run resumes it)
      best.pt        best validation mIoU (equal to last.pt when there is no validation)
      ema.pt         the EMA of the weights at the last checkpoint (with ``ema.decay`` > 0)
      snapshots/     swa_<iteration>.pt, one per SWA cycle
      class_iou.json per-class IoU of the last validation
    dvclive/         the training curves, logged with DVCLive (DVC plots): train/ loss parts,
                     lr, images/s per logged step; val/ mIoU, pixel accuracy per validation
                     (the layout: :mod:`pipeline.core.curves`)
    metrics.json     the run's final metrics (written by train.py)
    swa.pt           averaged weights (written by swa.py)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pipeline.core.errors import PipelineError, unknown_name
from pipeline.core.names import ALL_FOLDS, INFER_METRICS_FILE, METRICS_FILE, SWA_METRICS_FILE
from pipeline.core.params import build_section, read_params


@dataclass
class OptimizerParams:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    head_lr_mult: float = 10.0
    momentum: float = 0.9


@dataclass
class ScheduleParams:
    warmup_iters: int = 0
    warmup_ratio: float = 1e-3
    power: float = 1.0
    min_lr_ratio: float = 0.0


@dataclass
class SwaParams:
    """Extra iterations after the main schedule at a cyclic lr, a snapshot per cycle."""

    iters: int = 0          # 0 = no SWA phase
    interval: int = 1       # cycle length = snapshot interval
    max_lr_ratio: float = 0.1   # of the base lr, at each cycle's start
    min_lr_ratio: float = 0.01  # at each cycle's end, where the snapshot is taken


@dataclass
class EmaParams:
    """An exponential moving average of the weights (and BatchNorm buffers), updated after
    each optimizer step: ``ema = decay * ema + (1 - decay) * weights``."""

    decay: float = 0.0      # 0 = off; e.g. 0.999 (about the last 1000 steps)


@dataclass
class LogitAdjustParams:
    enabled: bool = False
    tau: float = 0.03
    scale: float = 16.0      # cosine head only
    keep_prior_at_eval: bool = False
    head: str = "cosine"     # cosine | linear (smp's conv plus the prior bias)


@dataclass
class DistillParams:
    teacher: str = ""        # a model config name (same fold), a run dir or a checkpoint file
    teacher_seed: int = -1   # -1: the student's own seed
    weight: float = 1.0
    temperature: float = 1.0
    labelled_only: bool = True  # average the KL over labelled pixels only (void, padding: out)


# How training draws its frames and crops (``sampling.frames`` / ``sampling.crops``):
# ``uniform`` is the plain epoch stream and crop; ``rare`` favours rare classes (see
# :class:`pipeline.data.dataset.ClassDraw`).
RARE = "rare"
SAMPLING_MODES = ("uniform", RARE)


@dataclass
class SamplingParams:
    """Class-aware sampling (DAFormer's rare class sampling, nnU-Net's forced foreground)."""

    frames: str = "uniform"     # uniform | rare: draw a class by rarity, then a frame holding it
    temperature: float = 0.01   # p(class) ~ exp((1 - pixel share) / temperature)
    crops: str = "uniform"      # uniform | rare: crop_share of crops hold a pixel of a drawn class
    crop_share: float = 0.5     # of the crops, with crops: rare

    @property
    def rare_frames(self) -> bool:
        return self.frames == RARE

    @property
    def rare_crop_share(self) -> float:
        """The share of crops that hold their class (0 with uniform crops)."""
        return self.crop_share if self.crops == RARE else 0.0

    @property
    def uniform(self) -> bool:
        """Today's stream: uniform frames and crops (no class draws at all)."""
        return not self.rare_frames and self.rare_crop_share == 0.0


@dataclass
class ModelParams:
    """One named model config (``models.<name>`` in params.yaml)."""

    arch: str = "Unet"
    encoder: str = "resnet18"
    arch_kwargs: dict = field(default_factory=dict)
    weights: str = ""            # "" random init | PATH local file | imagenet / "hub:<tag>"
    family: str = "primary"      # ensemble grouping: primary (S/W) or an auxiliary family (A)
    batch_size: int = 8          # the global batch of one forward, split evenly across DDP ranks
    accum_steps: int = 1         # forwards per optimizer step: batch_size * accum_steps per step
    iters: int = 200
    val_interval: int = 50
    ckpt_interval: int = 0       # 0: at each validation
    log_interval: int = 10
    augment: dict = field(default_factory=lambda: {"crop": [64, 64]})
    loss: list = field(default_factory=lambda: [{"name": "ce"}])
    optimizer: dict = field(default_factory=dict)
    schedule: dict = field(default_factory=dict)
    swa: dict = field(default_factory=dict)
    logit_adjust: dict = field(default_factory=dict)
    distill: dict = field(default_factory=dict)
    sampling: dict = field(default_factory=dict)
    ema: dict = field(default_factory=dict)
    grad_clip: float = 0.0       # max global grad norm; 0 = off
    amp: bool | str = True       # auto | bf16 | fp16 | off (true = auto, false = off): AMP_MODES
    channels_last: bool = True   # on CUDA (ignored on CPU)


SUBSECTIONS = {"optimizer": OptimizerParams, "schedule": ScheduleParams, "swa": SwaParams,
               "logit_adjust": LogitAdjustParams, "distill": DistillParams,
               "sampling": SamplingParams, "ema": EmaParams}
# run-config sections and model keys newer than some checkpoints: a last.pt saved without one
# ran with its defaults (which reproduce the older code exactly), so resuming it stays allowed
ADDED_SECTIONS = ("sampling", "ema")
ADDED_KEYS = ("accum_steps",)

# Mixed precision (``models.<name>.amp``): ``auto`` is bf16 autocast on a CUDA device that
# supports it, else fp16 with a gradient scaler, and nothing on the CPU; ``bf16`` / ``fp16``
# autocast on any device (fp16 always with the scaler); ``off`` runs in float32. The booleans
# of older params mean ``auto`` (true) and ``off`` (false).
AMP_MODES = ("auto", "bf16", "fp16", "off")


def amp_mode(value: Any, where: str = "amp") -> str:
    """The :data:`AMP_MODES` name of an ``amp`` setting (a name or a boolean); anything else is
    one line naming the valid values."""
    if isinstance(value, bool):
        return "auto" if value else "off"
    if isinstance(value, str) and value in AMP_MODES:
        return value
    raise PipelineError(f"{where}: amp must be one of {', '.join(AMP_MODES)} (or true = auto, "
                        f"false = off), got {value!r}")


@dataclass
class TrainParams:
    """The ``train:`` section: which runs exist and how the machine runs them."""

    models: list = field(default_factory=list)    # model configs trained as the k-fold matrix
    students: list = field(default_factory=list)  # distilled configs (after their teachers)
    folds: list = field(default_factory=lambda: [0, 1, 2, 3, 4])
    seeds: list = field(default_factory=lambda: [0])
    student_seeds: list = field(default_factory=lambda: [0])  # students' seeds (within seeds)
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    num_workers: int = 2
    deterministic: bool = True
    runs_dir: str = "runs"
    weights_dir: str = ""         # offline hub weights: <encoder>.<tag>.pth files (pipeline/weights.py)


@dataclass
class RunConfig:
    """A model config with its sub-sections parsed into dataclasses."""

    name: str
    model: ModelParams
    optimizer: OptimizerParams
    schedule: ScheduleParams
    swa: SwaParams
    logit_adjust: LogitAdjustParams
    distill: DistillParams
    sampling: SamplingParams
    ema: EmaParams

    def to_dict(self) -> dict:
        """Plain, JSON-able resolved config (what checkpoints store)."""
        out = dataclasses.asdict(self.model)
        for key in SUBSECTIONS:
            out[key] = dataclasses.asdict(getattr(self, key))
        out["name"] = self.name
        return out

    @property
    def total_iters(self) -> int:
        return self.model.iters + self.swa.iters


def parse_model_params(name: str, values: Mapping[str, Any] | None, *,
                       source: str = "params.yaml") -> RunConfig:
    """Validate ``models.<name>`` (and its sub-sections) into a :class:`RunConfig`."""
    values = dict(values or {})
    amp = values.pop("amp", ModelParams.amp)  # a name or a boolean: checked by amp_mode
    amp_mode(amp, f"{source}: models.{name}.amp")
    model = build_section(ModelParams, values, section=f"models.{name}", source=source)
    model.amp = amp  # kept as written: checkpoints of `amp: true` still match their config
    subs = {key: build_section(schema, getattr(model, key), section=f"models.{name}.{key}",
                               source=source)
            for key, schema in SUBSECTIONS.items()}
    cfg = RunConfig(name=name, model=model, **subs)
    _check(cfg, source)
    return cfg


def _check(cfg: RunConfig, source: str) -> None:
    where = f"{source}: models.{cfg.name}"
    m = cfg.model
    for key in ("batch_size", "accum_steps", "iters", "val_interval", "log_interval"):
        if getattr(m, key) < 1:
            raise PipelineError(f"{where}.{key} must be >= 1, got {getattr(m, key)}")
    if cfg.swa.iters < 0 or cfg.swa.interval < 1 or cfg.swa.iters % cfg.swa.interval:
        raise PipelineError(f"{where}.swa: iters ({cfg.swa.iters}) must be a non-negative "
                            f"multiple of interval ({cfg.swa.interval})")
    if cfg.schedule.warmup_iters >= m.iters:
        raise PipelineError(f"{where}.schedule.warmup_iters ({cfg.schedule.warmup_iters}) must "
                            f"be below iters ({m.iters})")
    if cfg.distill.teacher and cfg.distill.teacher == cfg.name:
        raise PipelineError(f"{where}.distill.teacher: a config cannot distill from itself")
    _check_sampling(cfg.sampling, f"{where}.sampling")
    if not 0.0 <= cfg.ema.decay < 1.0:
        raise PipelineError(f"{where}.ema.decay must be in [0, 1) (0 = off), got {cfg.ema.decay}")


def _check_sampling(s: SamplingParams, where: str) -> None:
    for key in ("frames", "crops"):
        if getattr(s, key) not in SAMPLING_MODES:
            raise PipelineError(f"{where}.{key}: "
                                f"{unknown_name('sampling mode', getattr(s, key), SAMPLING_MODES)}")
    if not s.temperature > 0:
        raise PipelineError(f"{where}.temperature must be > 0, got {s.temperature}")
    if not 0.0 <= s.crop_share <= 1.0:
        raise PipelineError(f"{where}.crop_share must be in [0, 1], got {s.crop_share}")


def load_model_params(name: str, params_path: str | Path = "params.yaml") -> RunConfig:
    """Read ``models.<name>`` from the params file (unknown name: list the valid ones)."""
    params = read_params(params_path)
    models = params.get("models") or {}
    if name not in models:
        raise PipelineError(f"{params_path}: {unknown_name('model config', name, list(models))}"
                            f" (configs live under 'models:')")
    return parse_model_params(name, models[name], source=str(params_path))


def load_train_params(params_path: str | Path = "params.yaml") -> TrainParams:
    params = read_params(params_path)
    train = build_section(TrainParams, params.get("train"), section="train",
                          source=str(params_path))
    models = params.get("models") or {}
    for name in train.models:
        if name not in models:
            raise PipelineError(f"{params_path}: train.models: "
                                f"{unknown_name('model config', str(name), list(models))}")
    if train.students and not train.student_seeds:
        raise PipelineError(f"{params_path}: train.student_seeds is empty; list the seeds the "
                            f"students train with (e.g. [{train.seeds[0] if train.seeds else 0}])")
    extra = [s for s in train.student_seeds if s not in train.seeds]  # no teacher run of theirs
    for i, student in enumerate(train.students):
        if not (isinstance(student, dict) and set(student) == {"name", "teacher"}):
            raise PipelineError(f"{params_path}: train.students[{i}] must be "
                                f"{{name: <config>, teacher: <config>}}, got {student!r}")
        for key in ("name", "teacher"):
            if student[key] not in models:
                raise PipelineError(f"{params_path}: train.students[{i}].{key}: "
                                    f"{unknown_name('model config', str(student[key]), list(models))}")
        distill = (models[student["name"]] or {}).get("distill") or {}
        teacher = distill.get("teacher")
        if extra and distill.get("teacher_seed", -1) < 0:
            raise PipelineError(f"{params_path}: train.student_seeds {extra} not in train.seeds "
                                f"{train.seeds}: student '{student['name']}' learns from its "
                                f"teacher's run of the same seed (or set its "
                                f"distill.teacher_seed)")
        if teacher != student["teacher"]:
            raise PipelineError(f"{params_path}: train.students[{i}]: teacher '{student['teacher']}' "
                                f"differs from models.{student['name']}.distill.teacher ({teacher!r})")
    return train


def parse_fold(fold: str | int) -> int | str:
    """``"all"`` or a non-negative fold number."""
    if isinstance(fold, str) and fold == ALL_FOLDS:
        return ALL_FOLDS
    try:
        value = int(fold)
    except (TypeError, ValueError):
        raise PipelineError(f"--fold must be a fold number or '{ALL_FOLDS}', got {fold!r}") from None
    if value < 0:
        raise PipelineError(f"--fold must be >= 0, got {value}")
    return value


# which weights of a run later stages use (RunPaths.final_weights); auto: the first present
WEIGHT_CHOICES = ("auto", "swa", "ema", "best", "last")


@dataclass(frozen=True)
class RunPaths:
    """Every file of a run directory (see the module docstring)."""

    root: Path

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def last(self) -> Path:
        return self.train_dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.train_dir / "best.pt"

    @property
    def ema(self) -> Path:
        return self.train_dir / "ema.pt"

    @property
    def snapshots(self) -> Path:
        return self.train_dir / "snapshots"

    def snapshot(self, iteration: int) -> Path:
        return self.snapshots / f"swa_{iteration:07d}.pt"

    @property
    def curves(self) -> Path:
        return self.root / "dvclive"

    @property
    def class_iou(self) -> Path:
        return self.train_dir / "class_iou.json"

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def swa_metrics(self) -> Path:
        return self.root / SWA_METRICS_FILE

    @property
    def infer_metrics(self) -> Path:
        return self.root / INFER_METRICS_FILE

    @property
    def swa(self) -> Path:
        return self.root / "swa.pt"

    def final_weights(self, choice: str = "auto") -> Path:
        """The weights later stages use: ``choice`` of :data:`WEIGHT_CHOICES`; ``auto`` is the
        first file present of SWA, EMA, best, last. A missing explicit choice is an error."""
        files = {"swa": self.swa, "ema": self.ema, "best": self.best, "last": self.last}
        if choice not in WEIGHT_CHOICES:
            raise unknown_name("weights choice", choice, WEIGHT_CHOICES)
        if choice != "auto":
            if not files[choice].is_file():
                raise PipelineError(f"{files[choice]}: no {choice} weights for this run (chosen "
                                    f"explicitly; 'auto' takes the first of swa, ema, best, last)")
            return files[choice]
        for path in files.values():
            if path.is_file():
                return path
        raise PipelineError(f"{self.root}: no finished training run (no swa.pt, train/ema.pt, "
                            f"train/best.pt or train/last.pt); run `python pipeline/train.py` first")
