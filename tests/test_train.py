"""The training engine end to end on CPU: replay identity, determinism, outputs, accuracy and bad input."""
import json
import subprocess
import sys

import pytest
import torch

from fastkd import engine
from fastkd.config import Config
from fastkd.data import TensorBatches, load_dataset
from fastkd.models import MODELS, build_model
from fastkd.schedule import METHODS
from fastkd.train import main

QUICK = ["--dataset", "synthetic", "--epochs", "2", "--batch-size", "32", "--quiet"]


def run_cli(tmp_path, *args, name="run"):
    out = tmp_path / name
    trace = tmp_path / f"{name}.trace"
    code = main([*QUICK, "--out", str(out), "--trace", str(trace), *args])
    assert code == 0
    return out, [json.loads(line) for line in trace.read_text().splitlines()]


def test_batches_are_regenerated_bit_identically_from_their_identity():
    data = load_dataset("synthetic")
    src = TensorBatches(data, 32, seed=7, device=torch.device("cpu"))
    first = src.batch(1, 3)
    src.batch(0, 0), src.batch(2, 5)  # other identities in between move the cached permutation
    again = src.batch(1, 3)
    assert torch.equal(first.x, again.x) and torch.equal(first.indices, again.indices)
    assert not torch.equal(first.x, src.batch(1, 4).x)
    # Augmentation is really applied: same samples, different epoch draw, different pixels somewhere.
    assert not torch.equal(first.x, data.train_x[first.indices])


@pytest.mark.parametrize("method", ["spaced", "spaced-self"])
def test_replayed_batches_equal_teacher_batches_pixel_for_pixel(tmp_path, monkeypatch, method):
    seen = {}
    real_run_step = engine.run_step

    def recording_run_step(step, role, roles, fns, batch, *rest):
        seen.setdefault(step.batch, {})[step.role] = (batch.x.clone(), batch.y.clone())
        return real_run_step(step, role, roles, fns, batch, *rest)

    monkeypatch.setattr(engine, "run_step", recording_run_step)
    run_cli(tmp_path, "--method", method, "--interval", "0.7")
    replay_role = "student" if method == "spaced" else "self"
    assert len(seen) == 2 * (256 // 32)
    for g, by_role in seen.items():
        (tx, ty), (sx, sy) = by_role["teacher"], by_role[replay_role]
        assert torch.equal(tx, sx) and torch.equal(ty, sy), f"batch {g} differs on replay"


def test_trace_lines_follow_the_spaced_schedule(tmp_path):
    _, trace = run_cli(tmp_path, "--method", "spaced", "--interval", "1.5")  # I = 8, K = 12, 16 batches
    assert set(trace[0]) == {"role", "epoch", "position", "samples", "teacher_version"}
    teacher = [(r["epoch"], r["position"], tuple(r["samples"])) for r in trace if r["role"] == "teacher"]
    student = [(r["epoch"], r["position"], tuple(r["samples"])) for r in trace if r["role"] == "student"]
    assert student == teacher and len(teacher) == 16
    versions = [r["teacher_version"] for r in trace if r["role"] == "student"]
    assert versions == [12] * 12 + [16] * 4
    assert all(r["teacher_version"] is None for r in trace if r["role"] == "teacher")


def test_same_seed_gives_the_same_weights_and_another_seed_does_not(tmp_path):
    a, _ = run_cli(tmp_path, "--method", "spaced", "--interval", "0.5", name="a")
    b, _ = run_cli(tmp_path, "--method", "spaced", "--interval", "0.5", name="b")
    c, _ = run_cli(tmp_path, "--method", "spaced", "--interval", "0.5", "--seed", "1", name="c")
    wa, wb, wc = (torch.load(p / "student.pt", weights_only=True) for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_outputs_reload_into_the_model_built_from_config_json(tmp_path):
    out, _ = run_cli(tmp_path, "--method", "online")
    cfg = json.loads((out / "config.json").read_text())
    info = load_dataset(cfg["dataset"]).info
    for role in ("teacher", "student"):
        model = build_model(cfg[role], info)
        model.load_state_dict(torch.load(out / f"{role}.pt", weights_only=True))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "role" in r]
    assert {(r["role"], r["epoch"]) for r in epochs} == {(role, e) for role in ("teacher", "student") for e in (0, 1)}
    assert {"train_loss", "lr", "images_per_s", "student_top1", "student_top5"} <= set(epochs[-1])
    assert "summary" in records[-1]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_beats_chance_on_the_embedded_digits(tmp_path, method, capsys):
    out = tmp_path / method
    code = main(["--method", method, "--student", "tiny", "--teacher", "tiny", "--epochs", "4", "--batch-size", "64",
                 "--lr", "0.1", "--quiet", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["summary"]
    assert summary["student_top1"] > 60.0, summary  # chance is 10%
    assert f"fastkd {method}:" in capsys.readouterr().out


def test_official_preset_sets_its_values_and_an_explicit_flag_wins():
    from fastkd.api import config_from_settings
    from fastkd.train import explicit_settings

    def config_from_args(argv):
        return config_from_settings(explicit_settings(argv))

    cfg = config_from_args(["--preset", "official", "--epochs", "3"])
    assert (cfg.lr, cfg.lr_schedule, cfg.epochs) == (0.01, "constant", 3)
    assert (cfg.feature_loss, cfg.beta) == ("dist", 0.03)
    assert config_from_args(["--preset", "official", "--feature-loss", "l1"]).feature_loss == "l1"
    assert cfg.kl_on_probabilities and cfg.teacher_train_mode_replay and cfg.no_final_replay
    plain = config_from_args([])
    assert plain == Config().resolve_defaults()
    assert not (plain.kl_on_probabilities or plain.teacher_train_mode_replay or plain.no_final_replay)


def test_official_quirks_run(tmp_path):
    run_cli(tmp_path, "--method", "spaced", "--kl-on-probabilities", "--teacher-train-mode-replay",
            "--no-final-replay", "--lr-schedule", "constant")


def test_every_model_builds_and_runs_for_the_dataset_shape():
    info = load_dataset("synthetic").info
    x = torch.randn(2, info.channels, info.size, info.size)
    for name in MODELS:
        assert build_model(name, info)(x).shape == (2, info.num_classes)


BAD = [
    (["--method", "distill"], "--method"),
    (["--teacher", "resnet99"], "--teacher"),
    (["--student", "vit-tiny", "--method", "self"], "--student"),
    (["--dataset", "imagenet22k"], "--dataset"),
    (["--method", "spaced", "--interval", "0"], "--interval"),
    (["--method", "spaced", "--interval", "-1"], "--interval"),
    (["--method", "online", "--interval", "2"], "--interval"),
    (["--temperature", "0"], "--temperature"),
    (["--alpha", "1.5"], "--alpha"),
    (["--batch-size", "5000"], "--batch-size"),
    (["--train-subset", "0"], "--train-subset"),
    (["--epochs", "0"], "--epochs"),
    (["--precision", "fp8"], "--precision"),
    (["--teacher", "torchvision:fasterrcnn_resnet50_fpn"], "--teacher"),
    (["--student", "timm:no-such-model"], "--student"),
    (["--teacher", "torchvision:vit_b_16"], "torchvision:vit_b_16"),  # 16-px patches do not tile 8×8 images
    (["--precision", "fp16"], "--precision"),
    (["--method", "baseline", "--feature-loss", "dist"], "--feature-loss"),
    (["--method", "spaced-self", "--feature-loss", "l2"], "--feature-loss"),
    (["--feature-loss", "cosine"], "--feature-loss"),
    (["--teacher", "resnet18", "--student", "resnet20", "--feature-loss", "dist"], "--feature-loss"),  # widths 512, 64
    (["--method", "online", "--teacher", "mobilenetv2", "--student", "vit-tiny", "--feature-loss", "dist"],
     "--feature-loss"),  # 1280, 192
]


@pytest.mark.parametrize("args,flag", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_naming_the_flag_and_stops_before_anything_runs(tmp_path, capsys, monkeypatch, args,
                                                                               flag):
    steps = []  # every training step the engine would run
    monkeypatch.setattr(engine, "run_step", lambda *a, **k: steps.append(a))
    try:
        code = main([*args, "--out", str(tmp_path / "out"), "--quiet"])
    except SystemExit as e:  # argparse rejects unknown choices itself
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fastkd.train: error: ") and flag in err, err
    # Refused up front: no step ran and the run folder was never made (not merely that no weights were saved).
    assert steps == [] and list(tmp_path.iterdir()) == [], (steps, list(tmp_path.iterdir()))


def test_unwritable_out_and_cli_errors_have_no_traceback(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = subprocess.run([sys.executable, "-m", "fastkd.train", "--out", str(blocker / "run"), *QUICK],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--out" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert blocker.read_text() == "not a directory"


def test_a_runs_config_json_as_config_reproduces_it(tmp_path):
    first, first_trace = run_cli(tmp_path, "--method", "spaced", "--interval", "0.5", "--seed", "3", name="first")
    # The file alone sets the run (QUICK's flags are the file's values too); flags given would override it.
    again, again_trace = run_cli(tmp_path, "--config", str(first / "config.json"), name="again")
    assert again_trace == first_trace
    assert json.loads((again / "config.json").read_text()) == json.loads((first / "config.json").read_text())
    for name in ("teacher", "student"):
        a, b = torch.load(first / f"{name}.pt"), torch.load(again / f"{name}.pt")
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_a_yaml_config_sets_flags_and_a_flag_given_overrides_it(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("method: online\nepochs: 1\ntemperature: 2.0\nalpha: 0.5\n")
    out, _ = run_cli(tmp_path, "--config", str(config), "--alpha", "0.7", name="yaml")
    saved = json.loads((out / "config.json").read_text())
    assert (saved["method"], saved["temperature"], saved["alpha"]) == ("online", 2.0, 0.7)


@pytest.mark.parametrize("content,message", [("{\"epochs\": 2, \"lerning_rate\": 0.1}", "unknown setting lerning_rate"),
                                             ("{\"epochs\": ", "not valid JSON"), ("[1, 2]", "mapping"),
                                             ("{\"epochs\": \"two\"}", "epochs must be a number")])
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, capsys, content, message):
    config = tmp_path / "bad.json"
    config.write_text(content)
    assert main(["--config", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()
    assert main(["--config", str(tmp_path / "missing.json"), "--quiet"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_tensorboard_scalars_are_the_metrics_records(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = run_cli(tmp_path, "--method", "spaced", "--tensorboard", name="board")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    written = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    expected = {}
    for r in records[:-1]:
        for key, value in r.items():
            if key not in ("role", "epoch") and isinstance(value, (int, float)):
                expected.setdefault(f"{r['role']}/{key}", {})[r["epoch"]] = value
    expected.update({f"summary/{k}": {0: v} for k, v in records[-1]["summary"].items() if isinstance(v, (int, float))})
    assert written.keys() == expected.keys()
    for tag, by_step in expected.items():  # stored as float32
        assert written[tag] == pytest.approx(by_step, rel=1e-6), tag


def test_tensorboard_without_its_package_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    assert main([*QUICK, "--tensorboard", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tensorboard" in err and "pip install" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dataset", ["synthetic", "digits"])  # 3 and 1 input channels
def test_torchvision_models_by_name_train_and_reload(tmp_path, dataset):
    out, _ = run_cli(tmp_path, "--dataset", dataset, "--epochs", "1", "--teacher", "torchvision:resnet18",
                     "--student", "torchvision:mobilenet_v3_small", "--feature-loss", "none", name=dataset)
    saved = json.loads((out / "config.json").read_text())
    info = load_dataset(dataset).info
    for role in ("teacher", "student"):
        model = build_model(saved[role], info)
        model.load_state_dict(torch.load(out / f"{role}.pt", weights_only=True))
        x = torch.randn(2, info.channels, info.size, info.size)
        assert model.eval()(x).shape == (2, info.num_classes)


def test_offline_from_teacher_weights_distils_without_training_the_teacher(tmp_path):
    source, _ = run_cli(tmp_path, "--method", "offline", "--epochs", "1", name="source")
    given = source / "teacher.pt"
    out, trace = run_cli(tmp_path, "--method", "offline", "--teacher-weights", str(given), name="frozen")
    assert trace and {step["role"] for step in trace} == {"student"}
    assert {step["teacher_version"] for step in trace} == {0}
    before, after = torch.load(given), torch.load(out / "teacher.pt")
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics included
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    teacher_top1 = {r["teacher_top1"] for r in records[:-1]}
    assert teacher_top1 == {records[-1]["summary"]["teacher_top1"]}  # evaluated once, reported throughout
    # With spaced KD the same weights only initialise the teacher, which then trains.
    out, trace = run_cli(tmp_path, "--method", "spaced", "--teacher-weights", str(given), name="init")
    assert any(step["role"] == "teacher" for step in trace)
    after = torch.load(out / "teacher.pt")
    assert not all(torch.equal(before[k], after[k]) for k in before)


def test_torchvision_weights_by_name_come_from_the_local_hub_cache_only(tmp_path, capsys, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    args = [*QUICK, "--method", "offline", "--teacher", "torchvision:resnet18", "--teacher-weights", "IMAGENET1K_V1",
            "--feature-loss", "none"]  # its width 512 is not the tiny student's 64
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not in the local cache" in err and str(tmp_path / "torch-home") in err, err
    # Put a file of that name in the cache (weights for this dataset's 4 classes): it is what gets loaded.
    weights = torchvision.models.get_model_weights("resnet18")["IMAGENET1K_V1"]
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.manual_seed(7)
    state = torchvision.models.resnet18(num_classes=4).state_dict()
    torch.save(state, cached)
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    kept = torch.load(tmp_path / "run" / "teacher.pt")
    assert all(torch.equal(kept[k], state[k]) for k in state)


def test_teacher_weights_that_do_not_fit_are_one_line_naming_the_key(tmp_path, capsys):
    source, _ = run_cli(tmp_path, "--method", "offline", "--epochs", "1", name="source")
    cases = [(["--teacher", "tiny-gn", "--teacher-weights", str(source / "teacher.pt")], "first mismatch at"),
             (["--teacher-weights", str(tmp_path / "missing.pt")], "no such file"),
             (["--teacher", "torchvision:resnet18", "--teacher-weights", "NO_SUCH_WEIGHTS"], "IMAGENET1K_V1"),
             (["--method", "baseline", "--teacher-weights", str(source / "teacher.pt")], "--method baseline")]
    for args, message in cases:
        assert main([*QUICK, "--method", "offline", *args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--teacher-weights" in err and message in err, err
        assert not (tmp_path / "out").exists()


def test_timm_weights_by_name_come_from_the_local_hugging_face_cache_only(tmp_path, capsys, monkeypatch):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    args = [*QUICK, "--method", "offline", "--teacher", "timm:resnet18", "--teacher-weights", "a1_in1k",
            "--feature-loss", "none"]  # its width 512 is not the tiny student's 64
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not in the local cache" in err and "timm/resnet18.a1_in1k" in err, err
    # Hugging Face's cache layout: refs/main names the snapshot that holds the file.
    repo = cache / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    torch.manual_seed(7)
    state = timm.create_model("resnet18", num_classes=4).state_dict()
    save_file(state, repo / "snapshots" / "0123abcd" / "model.safetensors")
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    kept = torch.load(tmp_path / "run" / "teacher.pt")
    assert all(torch.equal(kept[k], state[k]) for k in state)
