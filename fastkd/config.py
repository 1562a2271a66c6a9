"""Every hyperparameter of a run in one dataclass, the presets, and their validation."""
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from fastkd.kernels._kd_common import DIVERGENCES  # what kd_loss's divergence= takes

from .precision import check_precision, default_precision
from .schedule import DEFAULT_INTERVAL, METHODS, SELF_METHODS, TEACHER_METHODS

# Paper defaults (Sun et al., ICML 2025): T=3, α=0.3, β=0.03, SGD momentum 0.9, weight decay 5e-4, batch 128.
# β weighs a feature loss in every method: self KD's, and for the two-network methods the official code's
# torch.dist between the pooled penultimate features (its -feature_loss default, passed by every run.sh command),
# which fastkd's default `auto` runs wherever the two networks' feature widths are equal (the official pairs are).
# The lr schedule is ours: lr 0.05 with per-step cosine decay to 0 over each optimizer's own number of steps.
# 15 epochs of the thin ResNet-20 keep the default digits run well under a minute on 2 CPU cores (98% top-1);
# image datasets default to the paper's ResNet-18.
DEFAULT_MODELS = {"digits": "resnet20", "mnist5k": "resnet20", "synthetic": "tiny", "cifar100": "resnet18",
                  "tiny-imagenet": "resnet18"}
DEFAULT_JSD_BETA = 0.5  # kd_loss's


@dataclass
class Config:
    method: str = "spaced"
    interval: Optional[float] = None  # s, in epochs; None: the method's default (1.5 spaced, 4.0 spaced-self)
    teacher: Optional[str] = None  # None: the dataset's default model (DEFAULT_MODELS)
    student: Optional[str] = None
    teacher_weights: Optional[str] = None  # the teacher's starting weights; offline KD then keeps it frozen
    dataset: str = "digits"
    data_dir: Optional[str] = None
    loader: str = "auto"  # image folders: "dali" (default where installed), "torch"; "auto" picks
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.05
    lr_schedule: str = "cosine"  # "cosine" (per step, to 0) or "constant"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    temperature: float = 3.0
    alpha: float = 0.3
    # The soft term's divergence (fastkd.kernels.kd_loss): forward_kl KL(p_t ‖ p_s), reverse_kl KL(p_s ‖ p_t), or jsd
    # β·KL(p_t ‖ m) + (1−β)·KL(p_s ‖ m), m = β·p_t + (1−β)·p_s, β = jsd_beta (None: 0.5 for jsd; only jsd takes one).
    divergence: str = "forward_kl"
    jsd_beta: Optional[float] = None
    beta: float = 0.03
    # Two-network methods: auto, none, dist, l2, l1, smoothl1; None: auto for them, none for the others. auto is
    # dist where the two networks' feature widths are equal, else none (fastkd.models.features.feature_term).
    feature_loss: Optional[str] = None
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    precision: Optional[str] = None  # "fp32" or "bf16"; None: bf16 on a CUDA device that has it, else fp32
    channels_last: bool = False  # models and batches in channels-last memory format
    train_subset: Optional[int] = None
    eval_batch_size: int = 512
    # Quirks of the official code, each off by default (README: the preset `official`).
    kl_on_probabilities: bool = False
    teacher_train_mode_replay: bool = False
    no_final_replay: bool = False
    preset: Optional[str] = None

    def resolve_defaults(self) -> "Config":
        """Fill the dataset- and device-dependent defaults (the models, the precision) so that config.json says
        exactly what ran."""
        default_model = DEFAULT_MODELS.get(self.dataset, "resnet18")
        precision = self.precision or default_precision(self.device)
        feature_loss = self.feature_loss or "auto"
        if self.method not in TEACHER_METHODS and feature_loss == "auto":
            feature_loss = "none"  # no teacher, no two-network term
        jsd_beta = DEFAULT_JSD_BETA if self.divergence == "jsd" and self.jsd_beta is None else self.jsd_beta
        return dataclasses.replace(self, teacher=self.teacher or default_model, student=self.student or default_model,
                                   precision=precision, feature_loss=feature_loss, jsd_beta=jsd_beta)

    def resolved_interval(self) -> Optional[float]:
        if self.method not in DEFAULT_INTERVAL:
            return None
        return self.interval if self.interval is not None else DEFAULT_INTERVAL[self.method]

    def resolved_jsd_beta(self) -> float:
        """jsd's β; for the divergences that take none, kd_loss's default (which they ignore)."""
        return DEFAULT_JSD_BETA if self.jsd_beta is None else self.jsd_beta

    def teacher_frozen(self) -> bool:
        """Offline KD from given teacher weights distils from that teacher without training it."""
        return self.method == "offline" and self.teacher_weights is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DEFAULTS = Config()


PRESETS = {
    # The official code's settings and quirks: constant lr 0.01 for 80 epochs, the feature term torch.dist with
    # β = 0.03 (two-network methods), KLDivLoss on probabilities without T², teacher BatchNorm in train mode during
    # replay, and no replay of the last partial interval.
    "official": dict(lr=0.01, lr_schedule="constant", epochs=80, feature_loss="dist", beta=0.03,
                     kl_on_probabilities=True, teacher_train_mode_replay=True, no_final_replay=True),
}


def preset_settings(name: str, method: str) -> dict:
    """The settings of preset `name` for `method`: its two-network feature term is left out for the methods without
    a teacher (the self methods keep their own feature loss, weighted by the same β)."""
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r} is unknown; choose from {', '.join(PRESETS)}")
    settings = dict(PRESETS[name])
    if method not in TEACHER_METHODS:
        settings.pop("feature_loss", None)
    return settings


# What a run saved before a setting existed ran with: its config.json or checkpoint lacks the key.
LEGACY_SETTINGS = {"precision": "fp32", "channels_last": False, "teacher_weights": None, "feature_loss": "none",
                   "divergence": "forward_kl", "jsd_beta": None}


def with_legacy_settings(saved: dict) -> dict:
    return {**LEGACY_SETTINGS, **saved}


def differing_settings(cfg: Config, saved: dict, may_change=()) -> list[str]:
    """The settings of `cfg` that differ from a saved run's (its config.json, or its checkpoint's settings), except
    those that `may_change`. `feature_loss` auto against a saved explicit term is left to the caller: whether they
    agree depends on the models (auto runs dist or none; runs saved before auto was the default say which)."""
    saved = with_legacy_settings(saved)
    return sorted(k for k, v in cfg.to_dict().items() if saved.get(k) != v and k not in may_change
                  and not (k == "feature_loss" and v == "auto"))


def check_types(settings: dict) -> None:
    """Raise ValueError naming the setting whose value has the wrong type (an int where a float is due is fine)."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for key, value in settings.items():
        default = fields[key].default
        if value is None and default is None:
            continue
        kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
        expected = kinds[type(default)] if default is not None else _OPTIONAL_TYPES.get(key, (str,))
        if not isinstance(value, expected) or (bool not in expected and isinstance(value, bool)):
            raise ValueError(f"{key} must be {' or '.join(t.__name__ for t in expected)}, got {value!r}")


def numbers_from_strings(settings: dict) -> dict:
    """`settings` with each numeric setting given as a string parsed: YAML 1.1 (PyYAML) reads `1e-3` as a string.
    ValueError naming the setting whose string is not a number (of an int setting: not a whole one)."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    parsed = dict(settings)
    for key, value in settings.items():
        default = fields[key].default
        kinds = (type(default),) if default is not None else _OPTIONAL_TYPES.get(key, (str,))
        if not isinstance(value, str) or kinds[0] not in (int, float):
            continue
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{key} must be a number, got {value!r}") from None
        if int in kinds and float not in kinds:
            if not number.is_integer():
                raise ValueError(f"{key} must be a whole number, got {value!r}")
            number = int(number)
        parsed[key] = number
    return parsed


_OPTIONAL_TYPES = {"interval": (int, float), "train_subset": (int,), "precision": (str,), "teacher_weights": (str,),
                   "feature_loss": (str,), "jsd_beta": (int, float)}


def validate(cfg: Config, zoo_models=("teacher", "student")) -> None:
    """Raise ValueError naming the flag for any setting that cannot run. `zoo_models`: the roles given by name
    (checked against fastkd's models); the others are the caller's own modules."""
    from .models import MODELS, MULTI_EXIT_MODELS
    from .models.external import check_external, is_external

    if cfg.method not in METHODS:
        raise ValueError(f"--method {cfg.method!r} is unknown; choose from {', '.join(METHODS)}")
    models = MULTI_EXIT_MODELS if cfg.method in ("self", "spaced-self") else MODELS
    for flag, name in (("--teacher", cfg.teacher), ("--student", cfg.student)):
        if flag[2:] in zoo_models and is_external(name) and models is MODELS:
            check_external(flag, name)
        elif flag[2:] in zoo_models and name not in models:
            raise ValueError(f"{flag} {name!r} is unknown for --method {cfg.method}; choose from {', '.join(models)}")
    if cfg.teacher_weights is not None and cfg.method in ("baseline", "self", "spaced-self"):
        raise ValueError(f"--teacher-weights needs a method with a teacher (online, spaced, offline), "
                         f"not --method {cfg.method}")
    if cfg.interval is not None and not (math.isfinite(cfg.interval) and cfg.interval > 0):
        raise ValueError(f"--interval must be a finite number > 0, got {cfg.interval}")
    if cfg.interval is not None and cfg.method not in DEFAULT_INTERVAL:
        raise ValueError(f"--interval applies to spaced and spaced-self only, not --method {cfg.method}")
    if not (math.isfinite(cfg.temperature) and cfg.temperature > 0):
        raise ValueError(f"--temperature must be a finite number > 0, got {cfg.temperature}")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {cfg.alpha}")
    if not (math.isfinite(cfg.beta) and cfg.beta >= 0):
        raise ValueError(f"--beta must be a finite number >= 0, got {cfg.beta}")
    check_divergence(cfg.divergence, cfg.jsd_beta, cfg.kl_on_probabilities)
    check_feature_loss(cfg.feature_loss, cfg.method)
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {cfg.lr}")
    for flag, value in (("--epochs", cfg.epochs), ("--batch-size", cfg.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if cfg.lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"--lr-schedule must be cosine or constant, got {cfg.lr_schedule!r}")
    if cfg.loader not in ("auto", "dali", "torch"):
        raise ValueError(f"--loader must be auto, dali or torch, got {cfg.loader!r}")
    if cfg.train_subset is not None and cfg.train_subset < 1:
        raise ValueError(f"--train-subset must be >= 1, got {cfg.train_subset}")
    if cfg.eval_batch_size < 1:
        raise ValueError(f"eval_batch_size must be >= 1, got {cfg.eval_batch_size}")
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {cfg.device!r}")
    if cfg.precision is not None:
        check_precision(cfg.precision, cfg.device)


def check_feature_loss(name: Optional[str], method: str) -> None:
    """The two-network feature term needs a teacher; the self methods have their own feature loss (weighted by β)."""
    from .step_functions import FEATURE_LOSSES

    if name is not None and name not in ("auto", "none", *FEATURE_LOSSES):
        raise ValueError(f"--feature-loss must be auto, none, {', '.join(FEATURE_LOSSES)}; got {name!r}")
    if name not in (None, "auto", "none") and method not in TEACHER_METHODS:
        own = " (its own feature loss between heads is always on, weighted by --beta)" if method in SELF_METHODS else ""
        raise ValueError(f"--feature-loss {name} needs a method with a teacher ({', '.join(TEACHER_METHODS)}), "
                         f"not --method {method}{own}")


def check_divergence(divergence: str, jsd_beta: Optional[float], kl_on_probabilities: bool) -> None:
    """The soft term's divergence; β only for jsd (a β given to another divergence would be silently unused), and none
    but forward KL under the official quirk, whose soft term is its own KLDivLoss on probabilities."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"--divergence {divergence!r} is unknown; choose from {', '.join(DIVERGENCES)}")
    if jsd_beta is not None and divergence != "jsd":
        raise ValueError(f"--jsd-beta applies to --divergence jsd only, not {divergence}")
    if jsd_beta is not None and not 0.0 <= jsd_beta <= 1.0:  # NaN fails too
        raise ValueError(f"--jsd-beta must be in [0, 1], got {jsd_beta}")
    if kl_on_probabilities and divergence != "forward_kl":
        raise ValueError(f"--divergence {divergence} cannot go with --kl-on-probabilities (the official quirk, also "
                         f"set by --preset official): its soft term is KLDivLoss on probabilities, forward KL only")
