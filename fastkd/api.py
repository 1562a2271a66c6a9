"""`fastkd.fit`: spaced (and every other) KD on your own models and datasets, or on fastkd's by name.

The command line (`python -m fastkd.train`) is a thin layer over this function: one code path.
"""
import dataclasses
import os
import time
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import engine
from .checkpoint import load_checkpoint
from .config import DEFAULTS, Config, check_types, differing_settings, preset_settings, validate, with_legacy_settings
from .data import make_batches
from .data.user import DatasetBatches, describe_dataset
from .distributed import DataParallelRanks, join, leave
from .models import build_model
from .models.features import ClassifierNotRun, FeatureTap, feature_term
from .models.weights import load_teacher_weights
from .outputs import BOARD, check_out_is_free, check_tensorboard, check_trace, clear_run
from .schedule import SELF_METHODS

SETTINGS = tuple(DEFAULTS.to_dict())
RESUME_MAY_CHANGE = {"epochs"}
USER = "python:"  # config.json's name for a model or dataset passed as an object: "python:<class name>"


def fit(method: str = DEFAULTS.method, teacher: Union[nn.Module, str, None] = None,
        student: Union[nn.Module, str, None] = None, train_data=None, test_data=None, *,
        out: Union[str, Path, None] = None, trace: Optional[str] = None, resume: bool = False, overwrite: bool = False,
        check_replay: bool = False, save_every: Optional[int] = None, quiet: bool = False, num_workers: int = 2,
        tensorboard: Union[str, Path, bool, None] = None, **settings) -> dict:
    """Train `student` (and `teacher`) with `method`; returns the run's summary (the last line of metrics.jsonl).

    teacher, student: an nn.Module (trained in place) or a fastkd model name; None: the dataset's default model
    (baseline and the self methods take no teacher). For self / spaced-self the student is a multi-exit network whose
    forward returns (logits_list, features_list), deepest last, features mapped to the deepest feature's shape.
    train_data, test_data: map-style Datasets of (image tensor, int label), or train_data a fastkd dataset name
    (then test_data is None and `data_dir` / `loader` apply). settings: any `fastkd.config.Config` field (epochs,
    batch_size, interval, compile, device, seed, lr, temperature, alpha, beta, ...). resume=True continues the run
    in `out` exactly; a fresh run into an `out` that holds a run is a ValueError unless overwrite=True, which
    removes that run's files first. out=None: a new folder runs/<time>-<method>. check_replay=True re-fetches the
    first replayed batch and compares it with the teacher's.
    tensorboard: a folder (or True: `out`/tensorboard) that receives every metrics.jsonl record as scalars.
    """
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                         f"fastkd.fit takes the fields of fastkd.config.Config")
    check_types(settings)
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if save_every is not None and (not isinstance(save_every, int) or save_every < 1):
        raise ValueError(f"--save-every must be >= 1, got {save_every}")
    if tensorboard not in (None, False):
        check_tensorboard()
    settings = {"method": method, **settings}
    settings.update(_names(teacher, student, train_data, test_data, settings))
    cfg = config_from_settings(settings)
    if resume and overwrite:
        raise ValueError("--overwrite starts a new run and --resume continues one: give only one of them")
    state = None
    if resume:  # a setting that differs from the saved run is the error to report, before any other
        if out is None:
            raise ValueError("resume=True needs out=, the folder of the run to continue")
        state = load_checkpoint(Path(out))
        _check_resumable(cfg, state["config"])
    validate(cfg, zoo_models=[role for role, m in (("teacher", teacher), ("student", student))
                              if not isinstance(m, nn.Module)])
    if out is not None and not resume:  # on every rank, before any collective work
        check_out_is_free(Path(out), overwrite)
    check_trace(trace)

    parallel, device = join(cfg.device)
    try:
        batches = _batches(cfg, train_data, test_data, device, parallel, num_workers)
        if cfg.channels_last:
            batches.memory_format = torch.channels_last
        models = _models(cfg, teacher, student, batches.info)
        not_run = ()
        if any(x is not None and not isinstance(x, str) for x in (teacher, student, train_data)):
            num_classes, not_run = check_models(cfg.method, models, batches, device, features=cfg.feature_loss)
            batches.info = dataclasses.replace(batches.info, num_classes=num_classes)
        term, said = feature_term(cfg.feature_loss, cfg.beta, models, {"teacher": cfg.teacher, "student": cfg.student},
                                  batches.info.num_classes, not_run)
        if state is not None:
            cfg = _check_resumed_feature_term(cfg, state["config"], term)
        if said and parallel.is_main:
            print(said, flush=True)
        if out is None:  # made here, once the run is sure to start; only rank 0 makes it (the others never write)
            out = default_out(cfg.method, create=parallel.is_main)
        out = Path(out)
        if overwrite and parallel.is_main:
            clear_run(out)
        board = None if tensorboard in (None, False) else out / BOARD if tensorboard is True else Path(tensorboard)
        return engine.train(cfg, batches, models, out, device, parallel, trace_path=trace, quiet=quiet,
                            resume=state, save_every=save_every, check_replay=check_replay, tensorboard=board,
                            feature_term=term)
    finally:
        leave(parallel)


def default_out(method: str, create: bool = True) -> Path:
    """runs/<time>-<method>, made exclusively (a run started in the same second gets -2, -3, ...): no two runs
    ever share a default folder. create=False: the name only (a torchrun rank other than 0 writes nothing)."""
    base = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{method}"
    if not create:
        return base
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise ValueError(f"--out: no free name after {path} (pass --out)")


def _names(teacher, student, train_data, test_data, settings: dict) -> dict:
    """The Config names of the models and the dataset: fastkd names as given, objects as "python:<class>"."""
    method = settings["method"]
    names = {}
    for role, model in (("teacher", teacher), ("student", student)):
        if isinstance(model, nn.Module):
            names[role] = USER + type(model).__name__
        elif model is not None and not isinstance(model, str):
            raise ValueError(f"{role} must be an nn.Module or a fastkd model name, got {type(model).__name__}")
        elif model is not None:
            names[role] = model
    if isinstance(teacher, nn.Module) and method in ("baseline", *SELF_METHODS):
        raise ValueError(f"method {method!r} trains no separate teacher: pass teacher=None"
                         + (" and the multi-exit network as student=" if method in SELF_METHODS else ""))
    if train_data is None or isinstance(train_data, str):
        if test_data is not None:
            raise ValueError("test_data= goes with a Dataset train_data=; "
                             "a fastkd dataset name brings its own test set")
        if train_data is not None:
            if "dataset" in settings and settings["dataset"] != train_data:
                raise ValueError(f"train_data={train_data!r} and dataset={settings['dataset']!r} disagree")
            names["dataset"] = train_data
        return names
    if test_data is None:
        raise ValueError(f"test_data= is required with a Dataset train_data= ({type(train_data).__name__})")
    if "dataset" in settings:
        raise ValueError("dataset= names a fastkd dataset; with train_data= a Dataset, leave it out")
    for role in ("teacher", "student"):
        if role not in names and not (role == "teacher" and method in ("baseline", *SELF_METHODS)):
            raise ValueError(f"{role}= is required with a Dataset train_data= (an nn.Module, or a fastkd model name)")
    names["dataset"] = USER + type(train_data).__name__
    return names


def config_from_settings(settings: dict) -> Config:
    """Defaults, then the preset, then every setting given explicitly; dataset-dependent defaults filled in."""
    values = DEFAULTS.to_dict()
    preset = settings.get("preset")
    if preset is not None:
        values.update(preset_settings(preset, settings.get("method", DEFAULTS.method)))
    values.update(settings)
    return Config(**values).resolve_defaults()


def _check_resumable(cfg: Config, saved: dict) -> None:
    """Every setting but those that may change must equal the saved run's; `feature_loss` auto against a saved
    explicit term waits for the models (_check_resumed_feature_term)."""
    differing = differing_settings(cfg, saved, may_change=RESUME_MAY_CHANGE)
    if differing:
        raise ValueError(f"--resume: these settings differ from the saved run: {', '.join(differing)} "
                         f"(only {', '.join(sorted(RESUME_MAY_CHANGE))} may change)")


def _check_resumed_feature_term(cfg: Config, saved: dict, term: str) -> Config:
    """auto agrees with a saved term that it resolves to here (runs saved before auto was the default say dist or
    none); the resumed run then keeps the saved setting, so its files say what the original run asked."""
    saved_loss = with_legacy_settings(saved)["feature_loss"]
    if cfg.feature_loss != "auto" or saved_loss == "auto":
        return cfg
    if saved_loss != term:
        raise ValueError(f"--resume: these settings differ from the saved run: feature_loss (auto runs {term} "
                         f"here, the saved run ran {saved_loss})")
    return dataclasses.replace(cfg, feature_loss=saved_loss)


def named_feature_term(cfg: Config, info) -> str:
    """The feature term that cfg.feature_loss runs for the models cfg names, on a dataset that `info` describes."""
    names = {"teacher": cfg.teacher, "student": cfg.student}
    return feature_term(cfg.feature_loss, cfg.beta, _models(cfg, None, None, info), names, info.num_classes)[0]


def _batches(cfg: Config, train_data, test_data, device, parallel: DataParallelRanks, num_workers: int):
    """Each rank draws its contiguous share of every global batch of cfg.batch_size samples."""
    shard = dict(shard_id=parallel.rank, num_shards=parallel.size)
    if not cfg.dataset.startswith(USER):
        return make_batches(cfg.dataset, cfg.data_dir, cfg.loader, cfg.batch_size, cfg.seed, device,
                            cfg.train_subset, **shard)
    info = describe_dataset(train_data, "train_data")
    describe_dataset(test_data, "test_data")
    info = dataclasses.replace(info, test_len=len(test_data))
    return DatasetBatches(train_data, test_data, info, cfg.batch_size, cfg.seed, device, cfg.train_subset,
                          num_workers=num_workers, **shard)


def _models(cfg: Config, teacher, student, info) -> dict[str, nn.Module]:
    """The networks, built from the run seed in a fixed order (teacher, then student) where given by name."""
    torch.manual_seed(cfg.seed)
    multi_exit = cfg.method in SELF_METHODS
    wanted = ("student",) if cfg.method == "baseline" or multi_exit else ("teacher", "student")
    models = {}
    for role, given in (("teacher", teacher), ("student", student)):
        if role not in wanted:
            continue
        if isinstance(given, nn.Module):
            models[role] = given
        elif info.num_classes < 1:
            raise ValueError(f"{role}={getattr(cfg, role)!r} needs the class count: give {info.name} a `classes` "
                             f"attribute (as torchvision datasets have), or pass your own nn.Module")
        else:
            models[role] = build_model(getattr(cfg, role), info, multi_exit=multi_exit)
    if cfg.teacher_weights is not None:
        load_teacher_weights(models["teacher"], cfg.teacher_weights, cfg.teacher)
    return models


@torch.no_grad()
def check_models(method: str, models: dict, batches, device, features: str = "none") -> tuple[int, tuple[str, ...]]:
    """Run every model once on the first training batch (eval mode, no grad: nothing changes) and check what it
    returns against the method and the labels; returns the class count and the roles whose last nn.Linear did not
    run. One ValueError per problem. `features`: the --feature-loss asked; an explicit term needs each forward to
    run the classifier whose input it reads (auto notes the roles where it did not)."""
    batch = next(iter(batches.stream([(0, 0)])))
    x, y = batch.x, batch.y
    widths, not_run = {}, []
    for role, model in models.items():
        name = type(model).__name__
        was_training = model.training
        model.to(device).eval()
        explicit = features not in ("none", "auto")
        tapped = explicit or (features == "auto" and any(isinstance(m, nn.Linear) for m in model.modules()))
        tap = FeatureTap(model, role) if tapped else None
        try:
            out = tap(model, x)[0] if tap is not None else model(x)
        except ClassifierNotRun:
            if explicit:
                raise
            not_run.append(role)  # auto runs no feature term; the forward itself ran, and is checked below
            out = model(x)
        except Exception as e:
            raise ValueError(f"{role} {name} failed on a batch of shape {tuple(x.shape)} from the training data: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        finally:
            model.train(was_training)
            if tap is not None:
                tap.remove()
        if method in SELF_METHODS:
            widths[role] = _check_multi_exit(out, name, len(y))
        else:
            if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != len(y):
                raise ValueError(f"{role} {name} returned {_describe(out)} for a batch of {len(y)}; expected logits "
                                 f"of shape ({len(y)}, classes)")
            widths[role] = out.shape[1]
    if len(set(widths.values())) > 1:
        raise ValueError(f"teacher and student disagree on the class count: {widths['teacher']} vs "
                         f"{widths['student']} outputs")
    classes = next(iter(widths.values()))
    declared = batches.info.num_classes
    if declared and declared != classes:
        raise ValueError(f"the models output {classes} classes but {batches.info.name} has {declared} classes")
    if int(y.max()) >= classes or int(y.min()) < 0:
        raise ValueError(f"the models output {classes} classes but the first training batch holds label "
                         f"{int(y.max()) if int(y.max()) >= classes else int(y.min())}; the label count and the "
                         f"models' output width must match")
    return classes, tuple(not_run)


def _check_multi_exit(out, name: str, n: int) -> int:
    expected = ("a multi-exit network for self / spaced-self: forward returns (logits_list, features_list), deepest "
                "last, features mapped to the deepest feature's shape")
    ok = (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(o, (tuple, list)) for o in out)
          and len(out[0]) >= 2 and len(out[0]) == len(out[1])
          and all(isinstance(t, Tensor) for t in (*out[0], *out[1])))
    if not ok:
        raise ValueError(f"student {name} returned {_describe(out)}; expected {expected}")
    logits, features = out
    if any(t.dim() != 2 or t.shape[0] != n or t.shape != logits[-1].shape for t in logits):
        raise ValueError(f"student {name}'s heads returned logits of shapes {[tuple(t.shape) for t in logits]}; "
                         f"every head must give ({n}, classes)")
    if any(f.shape != features[-1].shape or f.shape[0] != n for f in features):
        raise ValueError(f"student {name}'s features have shapes {[tuple(f.shape) for f in features]}; every "
                         f"feature must have the deepest feature's shape")
    return logits[-1].shape[1]


def _describe(out) -> str:
    if isinstance(out, Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} ({', '.join(_describe(o) for o in out[:3])})"
    return f"a {type(out).__name__}"
