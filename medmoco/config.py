"""Config schemas of the training stages (YAML in configs/, validated here).

Batch size semantics: ``batch_size`` is **per process** (per GPU); the global batch is
``batch_size x world_size``. The learning rate is given per 256 images and scaled to the global
batch (``lr x global_batch / 256``, the MoCo reference rule).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dicom_preprocess.config import (ConfigError, flatten, from_mapping, load_config, parse_overrides,  # noqa: F401
                                     set_dotted, to_dict)

AMP_MODES = ("none", "bf16", "fp16")


@dataclass
class AugmentConfig:
    """Augmentation settings (the ``augment`` section of a pretraining config)."""

    crop_scale: list = field(default_factory=lambda: [0.2, 1.0])  # area fraction of the crop
    flip_prob: float = 0.5
    intensity_prob: float = 0.8
    intensity_scale: float = 0.2  # per window: x * (1 + U[-s, s])
    intensity_shift: float = 0.1  # per window: x + U[-o, o]
    gamma: list = field(default_factory=lambda: [0.7, 1.5])
    gamma_prob: float = 0.5
    blur_prob: float = 0.5
    blur_sigma: list = field(default_factory=lambda: [0.1, 2.0])  # pixels at 224 px, scaled to the size
    noise_prob: float = 0.5
    noise_std: float = 0.03
    on_device: bool = False  # batched augmentation on the training device instead of loader workers

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"augment.crop_scale {self.crop_scale}: need 0 < low <= high <= 1")
        for name in ("flip_prob", "intensity_prob", "gamma_prob", "blur_prob", "noise_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"augment.{name} {getattr(self, name)}: must be in [0, 1]")


@dataclass
class MoCoConfig:
    version: str = "v2"  # v1: linear head, T=0.07; v2: MLP head, T=0.2, blur
    arch: str = "resnet50"
    dim: int = 128
    K: int = 65536
    m: float = 0.999
    T: float = 0.0  # 0: the version's default
    mlp: str = "auto"  # auto | true | false
    bn_splits: int = 1  # >1 emulates shuffle-BN in one process (split BatchNorm)

    def __post_init__(self) -> None:
        from .models import BACKBONES, MOCO_VERSIONS

        if self.version not in MOCO_VERSIONS:
            raise ConfigError(f"moco.version {self.version!r}: use v1 or v2")
        if self.arch not in BACKBONES:
            raise ConfigError(f"moco.arch {self.arch!r}: use one of {sorted(BACKBONES)}")
        if self.K < 1 or self.dim < 1:
            raise ConfigError(f"moco.K {self.K} and moco.dim {self.dim}: must be >= 1")
        if not 0 <= self.m < 1:
            raise ConfigError(f"moco.m {self.m}: must be in [0, 1)")
        if self.mlp not in ("auto", "true", "false", True, False):
            raise ConfigError(f"moco.mlp {self.mlp!r}: auto, true or false")

    @property
    def temperature(self) -> float:
        from .models import MOCO_VERSIONS

        return self.T or MOCO_VERSIONS[self.version]["T"]

    @property
    def use_mlp(self) -> bool:
        from .models import MOCO_VERSIONS

        if self.mlp in ("auto",):
            return MOCO_VERSIONS[self.version]["mlp"]
        return self.mlp in (True, "true")


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam
    lr: float = 0.03  # per 256 images
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | step | constant
    milestones: list = field(default_factory=lambda: [120, 160])  # epochs, for step
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adam"):
            raise ConfigError(f"optim.name {self.name!r}: sgd or adam")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ConfigError(f"optim.schedule {self.schedule!r}: cosine, step or constant")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr {self.lr}: must be > 0")


@dataclass
class TrackingConfig:
    uri: str = ""  # "" -> MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory
    experiment: str = "medmoco-pretrain"
    run_name: str = ""
    enabled: bool = True
    parent_run_id: str = ""  # makes this run a child (the label-efficiency experiment's trials)
    retry_s: float = 30.0  # while the store is unreachable, calls are spooled and retried this often


@dataclass
class RuntimeConfig:
    """What every training stage carries besides its method: where it runs and how fast, how it
    is seeded, checkpointed, resumed and tracked. ``batch_size`` is per process (per GPU)."""

    cache: str = ""
    run_dir: str = "runs/run"
    epochs: int = 10
    batch_size: int = 32
    max_iters_per_epoch: int = 0  # 0: the whole split each epoch (small values for demos/tests)
    amp: str = "none"  # none | bf16 | fp16 (fp16 uses a GradScaler, CUDA only)
    channels_last: bool = False
    device: str = ""  # "" -> cuda when available
    workers: int = 2
    pin_memory: bool = True
    seed: int = 0
    deterministic: bool = False
    keep_checkpoints: int = 2
    backend: str = ""  # "" -> nccl with CUDA, gloo otherwise
    dist_timeout_s: float = 1800.0  # a collective fails after this long without the other ranks
    progress: bool = True
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp {self.amp!r}: use one of {AMP_MODES}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} {getattr(self, name)}: must be >= 1")
        if self.workers < 0:
            raise ConfigError(f"workers {self.workers}: must be >= 0")


@dataclass
class PretrainConfig(RuntimeConfig):
    run_dir: str = "runs/pretrain"
    splits: list = field(default_factory=lambda: ["unsupervised"])
    context: int = 0  # 2.5D: neighbouring slices s-k..s+k as extra channels
    image_size: int = 224
    epochs: int = 200
    batch_size: int = 64  # per process (GPU); global = batch_size x world size
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    workers: int = 4
    keep_checkpoints: int = 3
    log_every: int = 10
    knn_every: int = 5  # epochs; 0 disables the kNN monitor
    knn_samples: int = 2000
    knn_k: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size < 1:
            raise ConfigError(f"image_size {self.image_size}: must be >= 1")
        if self.context < 0:
            raise ConfigError(f"context {self.context}: must be >= 0")
        if self.moco.bn_splits > 1 and self.batch_size % self.moco.bn_splits:
            raise ConfigError(f"moco.bn_splits {self.moco.bn_splits}: must divide batch_size {self.batch_size}")


FINETUNE_MODES = ("finetune", "linear", "scratch")


@dataclass
class SupervisedAugmentConfig:
    """Light augmentation for the labeled slices (MONAI transforms, per sample)."""

    flip_prob: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.1  # zoom 1 +/- scale
    intensity_shift: float = 0.05
    prob: float = 0.5  # of the affine and of the intensity shift


@dataclass
class BootstrapConfig:
    """Percentile intervals of a bootstrap that resamples patients (slices of one patient are
    correlated: resampling slices makes intervals far too narrow)."""

    replicates: int = 2000
    level: float = 0.95
    seed: int = 0
    # the fewest patients (units) with a positive and with a negative slice a class needs for its
    # intervals; below it they are withheld with the reason (medmoco.intervals)
    min_groups: int = 10

    def __post_init__(self) -> None:
        if self.min_groups < 2:
            raise ConfigError(f"bootstrap.min_groups {self.min_groups}: must be >= 2")
        if self.replicates < 10:
            raise ConfigError(f"bootstrap.replicates {self.replicates}: must be >= 10")
        if not 0.5 <= self.level < 1.0:
            raise ConfigError(f"bootstrap.level {self.level}: must be in [0.5, 1)")


@dataclass
class FinetuneConfig(RuntimeConfig):
    """`medmoco finetune`: a six-subtype head on a MoCo (or random) backbone.

    Modes (the RSNA lab's): ``finetune`` (MoCo init, whole network trained), ``linear`` (MoCo
    init, backbone frozen in eval mode, only the head trains), ``scratch`` (random init).
    """

    run_dir: str = "runs/finetune"
    mode: str = "finetune"
    pretrained: str = ""  # medmoco backbone export, MoCo checkpoint, or runs:/<id> of a pretraining run
    arch: str = ""  # "" -> the pretrained file's arch, else resnet50
    label_fraction: float = 0.2  # of the labeled train split, stratified on `any`
    subset_seed: int = 0  # which slices form the fraction (fixed across trials)
    label_unit: str = "slice"  # slice | series: draw the fraction over slices or over whole series
    extra_labels: str = ""  # RSNA long-format CSV of newly labeled slices (e.g. from `medmoco select`)
    train_split: str = "train"
    val_split: str = "val"  # every choice (epoch, early stop, thresholds) is made here
    test_split: str = "test"  # read once, after training, by the selected model
    early_stopping_patience: int = 0  # epochs without a better val mean AUC before stopping; 0 = off
    target_sensitivity: float = 0.9  # each class's threshold reaches this sensitivity on val
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    context: int = -1  # 2.5D neighbours; -1 -> the pretrained file's, else 0
    image_size: int = 0  # 0 -> the cache's size
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adam", lr=0.01, weight_decay=0.0))
    class_weights: list = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0, 1.0, 2.0])
    pos_weight: list = field(default_factory=list)  # [] or six values
    augment: SupervisedAugmentConfig = field(default_factory=SupervisedAugmentConfig)
    eval_batch_size: int = 64
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="medmoco-finetune"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in FINETUNE_MODES:
            raise ConfigError(f"mode {self.mode!r}: use one of {FINETUNE_MODES}")
        if not 0.0 < self.label_fraction <= 1.0:
            raise ConfigError(f"label_fraction {self.label_fraction}: must be in (0, 1]")
        if self.mode in ("finetune", "linear") and not self.pretrained:
            raise ConfigError(f"pretrained: required for mode {self.mode!r} (a `medmoco pretrain` export or runs:/ID)")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size {self.eval_batch_size}: must be >= 1")
        if self.label_unit not in ("slice", "series"):
            raise ConfigError(f"label_unit {self.label_unit!r}: use slice or series")
        if len({self.train_split, self.val_split, self.test_split}) != 3:
            raise ConfigError(f"train_split, val_split, test_split: must be three different splits "
                              f"({self.train_split}, {self.val_split}, {self.test_split})")
        if self.early_stopping_patience < 0:
            raise ConfigError(f"early_stopping_patience {self.early_stopping_patience}: must be >= 0")
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise ConfigError(f"target_sensitivity {self.target_sensitivity}: must be in (0, 1]")
        if len(self.class_weights) != 6:
            raise ConfigError(f"class_weights {self.class_weights}: need six values (epidural .. any)")
        if self.pos_weight and len(self.pos_weight) != 6:
            raise ConfigError(f"pos_weight {self.pos_weight}: need six values or []")


@dataclass
class SeriesConfig:
    """`medmoco series`: the series head (:mod:`medmoco.models.series`) over a slice classifier's embeddings.

    ``encoder`` is a slice classifier (a `medmoco finetune` model.pt, ``runs:/ID`` or ``models:/``);
    its backbone embeds each slice (in its own input: size, 2.5D context). The labeled fraction is
    drawn by series. Frozen training (default) caches the embeddings once; ``end_to_end`` trains the
    backbone too, one series per step.
    """

    cache: str = ""
    encoder: str = ""
    run_dir: str = "runs/series"
    label_fraction: float = 1.0  # of the labeled train split's series, stratified on the series' `any`
    subset_seed: int = 0
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    epochs: int = 30
    batch_series: int = 8  # series per step (frozen training; end to end uses 1)
    lr: float = 1e-3
    weight_decay: float = 1e-2
    hidden: int = 64
    layers: int = 1
    dropout: float = 0.1
    exam_weight: float = 1.0  # weight of the exam-level BCE beside the slice BCE
    class_weights: list = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0, 1.0, 2.0])
    flip_tta: bool = False  # embed each slice and its mirror image, averaged
    end_to_end: bool = False
    embeddings_dir: str = ""  # "" -> RUN_DIR/embeddings; share one across trials on one encoder
    target_sensitivity: float = 0.9
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    device: str = ""
    seed: int = 0
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="medmoco-series"))

    def __post_init__(self) -> None:
        if not 0.0 < self.label_fraction <= 1.0:
            raise ConfigError(f"label_fraction {self.label_fraction}: must be in (0, 1]")
        for name in ("epochs", "batch_series", "hidden", "layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} {getattr(self, name)}: must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout {self.dropout}: must be in [0, 1)")
        if len(self.class_weights) != 6:
            raise ConfigError(f"class_weights {self.class_weights}: need six values (epidural .. any)")
        if len({self.train_split, self.val_split, self.test_split}) != 3:
            raise ConfigError(f"train_split, val_split, test_split: must be three different splits")


@dataclass
class ExperimentConfig:
    """`medmoco experiment`: every mode x label fraction x trial as a fine-tuning child run.

    ``finetune`` holds the settings every trial shares (a :class:`FinetuneConfig` mapping, checked
    at load; cache, mode, label fraction, seed and run dir are set by the experiment per trial).
    """

    cache: str = ""
    pretrained: str = ""
    run_dir: str = "runs/experiment"
    modes: list = field(default_factory=lambda: ["finetune", "linear", "scratch"])
    label_fractions: list = field(default_factory=lambda: [0.01, 0.05, 0.2, 1.0])
    trials: int = 5  # mean ± std over 5 trials, as the NYU MoCo CT project reported
    finetune: dict = field(default_factory=dict)
    # a series head (`medmoco series`) on each trial's slice model of these modes, same fraction and
    # seed; [] = none. Pairs cleanly only with finetune.label_unit: series (the same labeled series).
    series_modes: list = field(default_factory=list)
    series: dict = field(default_factory=dict)  # SeriesConfig keys every series trial shares
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="medmoco-label-efficiency"))

    def __post_init__(self) -> None:
        for mode in self.modes:
            if mode not in FINETUNE_MODES:
                raise ConfigError(f"modes: {mode!r} is not one of {FINETUNE_MODES}")
        for fraction in self.label_fractions:
            if not 0 < float(fraction) <= 1:
                raise ConfigError(f"label_fractions: {fraction} must be in (0, 1]")
        if self.trials < 1:
            raise ConfigError(f"trials {self.trials}: must be >= 1")
        from_mapping(FinetuneConfig, {**self.finetune, "mode": "scratch"}, "finetune")  # every key checked now
        for mode in self.series_modes:
            if mode not in self.modes:
                raise ConfigError(f"series_modes: {mode!r} is not one of the experiment's modes {self.modes}")
        from_mapping(SeriesConfig, self.series, "series")
