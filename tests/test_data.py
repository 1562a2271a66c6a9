"""Image-folder datasets through the DALI and torch loaders: exact replay, full evaluation, and bad input."""
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from fastkd.data import loaders as loaders_module
from fastkd.data import make_batches, registry
from fastkd.data.synth import write
from fastkd.schedule import plan_steps
from fastkd.train import main

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    return write(tmp_path_factory.mktemp("data") / "tiny", "tiny-imagenet", num_classes=4, per_class=20,
                 val_per_class=3)


def plan_identities(per_epoch, method="spaced", epochs=3, interval=0.7):
    plan = list(plan_steps(method, epochs, per_epoch, interval))
    return [divmod(s.batch, per_epoch) for i, s in enumerate(plan) if i == 0 or plan[i - 1].batch != s.batch]


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_replayed_batches_equal_the_teachers_pixel_for_pixel(tiny_imagenet, loader):
    batches = make_batches("tiny-imagenet", str(tiny_imagenet), loader, 16, 5, CPU)
    identities = plan_identities(batches.batches_per_epoch)  # I = 5, K = 3: replays start mid-epoch
    first = {}
    replays = 0
    for identity, batch in zip(identities, batches.stream(identities), strict=True):
        assert (batch.epoch, batch.position) == identity
        assert batch.x.shape == (16, 3, 64, 64) and batch.x.dtype == torch.float32
        if identity in first:
            x, idx = first[identity]
            assert torch.equal(batch.x, x) and torch.equal(batch.indices, idx), identity
            replays += 1
        else:
            first[identity] = (batch.x, batch.indices)
    assert replays == len(first) == 3 * 5
    # Augmentation is really random: the same samples in another epoch look different.
    assert not torch.equal(first[(0, 0)][0], first[(1, 0)][0])


def _sources(loader, root, num_shards=1, shard_id=0):
    if loader == "memory":  # the in-memory source (synthetic images: random crops and flips)
        return make_batches("synthetic", None, "auto", 16, 5, CPU, shard_id=shard_id, num_shards=num_shards)
    return make_batches("tiny-imagenet", str(root), loader, 16, 5, CPU, shard_id=shard_id, num_shards=num_shards)


@pytest.mark.parametrize("loader", ["memory", "dali", "torch"])
def test_two_ranks_shares_are_the_one_process_batch_pixel_for_pixel(tiny_imagenet, loader):
    """Two data-parallel ranks' loaders: each reads its contiguous half of the global batch, with the crops and flips
    that the 1-process run gives those samples (replays included)."""
    whole = _sources(loader, tiny_imagenet)
    halves = [_sources(loader, tiny_imagenet, num_shards=2, shard_id=r) for r in range(2)]
    identities = plan_identities(whole.batches_per_epoch)
    streams = [whole.stream(identities)] + [h.stream(identities) for h in halves]
    for identity in identities:
        full, first, second = (next(s) for s in streams)
        assert first.x.shape[0] == second.x.shape[0] == 8
        assert torch.equal(torch.cat([first.indices, second.indices]), full.indices), identity
        assert torch.equal(torch.cat([first.y, second.y]), full.y)
        assert torch.equal(torch.cat([first.x, second.x]), full.x), identity
    with pytest.raises(ValueError, match="does not split evenly across 3 data-parallel ranks"):
        _sources(loader, tiny_imagenet, num_shards=3)


@pytest.mark.parametrize("loader", ["memory", "dali", "torch"])
def test_two_ranks_shares_never_share_their_augmentation_draws(tiny_imagenet, loader):
    """Every sample of a global batch has its own crop and flip: rank 1 does not reuse rank 0's draws."""
    halves = [_sources(loader, tiny_imagenet, num_shards=2, shard_id=r) for r in range(2)]
    whole = _sources(loader, tiny_imagenet)
    for epoch, position in [(0, 0), (0, 1), (2, 3)]:
        draws = [h.augmentation(h.info, epoch, position) for h in halves]
        mine = whole.augmentation(whole.info, epoch, position)
        # Offsets and flips are 2·8 numbers in [0, 2·pad] and 8 coin flips per half, from a fixed seed: the two
        # halves coincide only if the old rank-blind draws came back.
        assert not torch.equal(draws[0].offsets, draws[1].offsets), (epoch, position)
        assert not torch.equal(draws[0].flips, draws[1].flips), (epoch, position)
        assert torch.equal(torch.cat([d.offsets for d in draws], 1), mine.offsets)
        assert torch.equal(torch.cat([d.flips for d in draws]), mine.flips)


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_a_stream_starting_mid_epoch_equals_the_uninterrupted_stream_pixel_for_pixel(tiny_imagenet, loader):
    """What a resumed run's loader does: start at (epoch, position) with no checkpoint taken earlier."""
    per_epoch = make_batches("tiny-imagenet", str(tiny_imagenet), loader, 16, 5, CPU).batches_per_epoch
    everything = [(e, p) for e in range(2) for p in range(per_epoch)]
    full = list(make_batches("tiny-imagenet", str(tiny_imagenet), loader, 16, 5, CPU).stream(everything))
    start = per_epoch + 2  # epoch 1, position 2
    resumed = make_batches("tiny-imagenet", str(tiny_imagenet), loader, 16, 5, CPU).stream(everything[start:])
    for expected, batch in zip(full[start:], resumed, strict=True):
        assert (batch.epoch, batch.position) == (expected.epoch, expected.position)
        assert torch.equal(batch.indices, expected.indices) and torch.equal(batch.y, expected.y)
        assert torch.equal(batch.x, expected.x), (batch.epoch, batch.position)


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_loaders_label_batches_and_evaluate_every_test_image(tiny_imagenet, loader):
    batches = make_batches("tiny-imagenet", str(tiny_imagenet), loader, 16, 0, CPU)
    batch = next(batches.stream([(0, 1)]))
    assert torch.equal(batch.y, batches.labels[batch.indices])
    assert torch.equal(batch.indices, batches.indices(0, 1))
    seen = sum(len(y) for _, y in batches.test_batches(5))
    assert seen == batches.info.test_len == 12


# DALI's CPU decoder and Pillow both decode with libjpeg-turbo's accurate integer IDCT, so their bytes agree: the
# largest difference measured here, over two epochs of batches, is 3e-5 of a unit of 255, the float32 rounding of
# the two normalisations ((x − 255·mean) / (255·std) against (x/255 − mean) / std). The bound allows a libjpeg build
# whose IDCT rounds differently (±1 unit) on top. A crop shifted by one pixel or a flipped image differs by 220 or
# more units of 255 in every sample of these images.
DECODER_BOUND_255 = 2.0


def test_dali_and_torch_loaders_give_the_same_pixels_sample_by_sample(tiny_imagenet):
    dali = make_batches("tiny-imagenet", str(tiny_imagenet), "dali", 16, 2, CPU)
    torch_ = make_batches("tiny-imagenet", str(tiny_imagenet), "torch", 16, 2, CPU)
    identities = [(e, p) for e in range(2) for p in range(dali.batches_per_epoch)]
    for a, b in zip(dali.stream(identities), torch_.stream(identities), strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.y, b.y), (a.epoch, a.position)
        # Back to units of 255 (the decoders' own scale), worst pixel of each sample.
        difference = ((a.x - b.x) * dali.std * 255).abs().flatten(1).max(1).values
        assert (difference <= DECODER_BOUND_255).all(), ((a.epoch, a.position), difference.tolist())


@pytest.mark.parametrize("layout,dataset", [("tiny-imagenet", "tiny-imagenet"), ("cifar100", "cifar100"),
                                            ("imagefolder", "imagefolder")])
def test_training_runs_on_every_layout(tmp_path, layout, dataset):
    size = None if layout == "cifar100" else 16  # CIFAR pickles are 32×32 by format; folders get resized to 64
    root = write(tmp_path / layout, layout, num_classes=3, per_class=12, val_per_class=2, size=size)
    code = main(["--method", "spaced", "--dataset", dataset, "--data-dir", str(root), "--epochs", "2",
                 "--batch-size", "8", "--teacher", "tiny", "--student", "tiny", "--quiet", "--out",
                 str(tmp_path / "run")])
    assert code == 0


def test_asking_for_dali_without_it_names_the_fix(tiny_imagenet, monkeypatch):
    monkeypatch.setattr(registry, "dali_available", lambda: False)
    with pytest.raises(ValueError, match="pip install nvidia-dali"):
        make_batches("tiny-imagenet", str(tiny_imagenet), "dali", 16, 0, CPU)


def _corrupt(tmp_path, tiny_imagenet):
    root = tmp_path / "corrupt"
    shutil.copytree(tiny_imagenet, root)
    victim = sorted((root / "train").glob("*/images/*.JPEG"))[0]
    victim.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root, victim


def _broken_layouts(tmp_path, tiny_imagenet):
    def copy(name):
        root = tmp_path / name
        shutil.copytree(tiny_imagenet, root)
        return root

    cases = []
    cases.append((tmp_path / "nowhere", "nowhere"))
    root = copy("no-wnids")
    (root / "wnids.txt").unlink()
    cases.append((root, "wnids.txt"))
    root = copy("empty-class")
    victim = sorted((root / "train").iterdir())[0]
    for f in (victim / "images").iterdir():
        f.unlink()
    cases.append((root, victim.name))
    root = copy("unannotated")
    Image.new("RGB", (64, 64)).save(root / "val" / "images" / "stray.JPEG")
    cases.append((root, "stray.JPEG"))
    root = copy("extra-class")
    (root / "wnids.txt").write_text((root / "wnids.txt").read_text() + "n99999999\n")
    cases.append((root, "classes"))
    return cases


def test_bad_folders_give_one_clear_error_naming_the_path(tmp_path, tiny_imagenet):
    for root, fragment in _broken_layouts(tmp_path, tiny_imagenet):
        with pytest.raises(ValueError, match=fragment):
            make_batches("tiny-imagenet", str(root), "torch", 16, 0, CPU)


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_a_corrupt_jpeg_is_reported_when_first_read(tmp_path, tiny_imagenet, loader):
    root, victim = _corrupt(tmp_path, tiny_imagenet)
    with pytest.raises(ValueError) as err:  # DALI decodes every file up front, torch when it reads it
        batches = make_batches("tiny-imagenet", str(root), loader, 80, 0, CPU)  # one batch holds every image
        next(batches.stream([(0, 0)]))
    assert len(str(err.value).splitlines()) == 1
    assert str(victim) in str(err.value)


def _garbage_entropy_coded_data(path):
    """Keep the JPEG's headers, its start-of-scan segment and its end marker; replace the compressed data between
    them with random bytes (DALI's CPU decoder turns such a file into garbage pixels with a warning)."""
    data = bytearray(path.read_bytes())
    sos = data.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    data[start:-2] = torch.randint(0, 256, (len(data) - 2 - start,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes()
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
    path.write_bytes(bytes(data))


def test_dali_run_on_a_jpeg_with_garbage_data_exits_2_naming_it_and_writes_nothing(tmp_path, tiny_imagenet):
    root = tmp_path / "garbage"
    shutil.copytree(tiny_imagenet, root)
    victim = sorted((root / "train").glob("*/images/*.JPEG"))[7]
    _garbage_entropy_coded_data(victim)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fastkd.train", "--dataset", "tiny-imagenet", "--data-dir", str(root),
                           "--loader", "dali", "--teacher", "tiny", "--student", "tiny", "--epochs", "1",
                           "--batch-size", "16", "--quiet",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])  # an error exit, not a signal from DALI
    assert proc.stderr.strip().splitlines() == [f"fastkd.train: error: cannot decode image {victim}: "
                                                f"broken data stream when reading image file"], proc.stderr
    assert not out.exists()


def test_truncated_cifar_pickle_is_one_error_naming_the_file(tmp_path):
    root = write(tmp_path / "cifar", "cifar100", num_classes=3, per_class=4)
    train = root / "cifar-100-python" / "train"
    train.write_bytes(train.read_bytes()[:100])
    with pytest.raises(ValueError, match="cifar-100-python/train"):
        make_batches("cifar100", str(root), "auto", 4, 0, CPU)


def test_cli_bad_data_dir_exits_2_with_one_line_and_no_traceback(tmp_path, tiny_imagenet):
    root, _ = _corrupt(tmp_path, tiny_imagenet)
    for args in (["--data-dir", str(tmp_path / "missing")], ["--data-dir", str(root), "--batch-size", "80"]):
        proc = subprocess.run([sys.executable, "-m", "fastkd.train", "--dataset", "tiny-imagenet", "--teacher",
                               "tiny", "--student", "tiny", "--epochs", "1", "--quiet", "--loader", "torch",
                               "--out", str(tmp_path / "out"), *args], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_synth_writes_real_formats(tmp_path):
    root = write(tmp_path / "c", "cifar100", num_classes=2, per_class=3)
    with open(root / "cifar-100-python" / "train", "rb") as f:
        record = pickle.load(f, encoding="bytes")
    assert record[b"data"].shape == (6, 3072) and record[b"fine_labels"] == [0, 0, 0, 1, 1, 1]
    root = write(tmp_path / "t", "tiny-imagenet", num_classes=2, per_class=2)
    with Image.open(next((root / "train").glob("*/images/*.JPEG"))) as image:
        assert image.format == "JPEG" and image.size == (64, 64)
    assert loaders_module.dali_available()
