"""Replay regenerates batches instead of buffering them: the memory held in images does not grow with s."""
import gc

import torch

from fastkd import engine
from fastkd.config import Config


def live_image_bytes(shape):
    """Bytes of every live tensor shaped like a training batch of images (a buffer of any kind would show)."""
    return sum(o.numel() * o.element_size() for o in gc.get_objects()
               if issubclass(type(o), torch.Tensor) and tuple(o.shape) == shape)


def peak_image_bytes(tmp_path, interval, monkeypatch):
    peak, last_role = 0, None
    real_run_step = engine._run_step

    def measuring_run_step(step, role, roles, fns, batch, live_logits, cfg):
        # A buffer would be fullest when the roles switch (just before a replay starts): measure there.
        nonlocal peak, last_role
        if step.role != last_role:
            peak = max(peak, live_image_bytes(tuple(batch.x.shape)))
        last_role = step.role
        return real_run_step(step, role, roles, fns, batch, live_logits, cfg)

    monkeypatch.setattr(engine, "_run_step", measuring_run_step)
    gc.collect()
    already_live = live_image_bytes((64, 3, 8, 8))  # left over by earlier tests in this process
    cfg = Config(method="spaced", interval=interval, dataset="synthetic", epochs=5, batch_size=64, teacher="tiny",
                 student="tiny", device="cpu")
    summary = engine.train(cfg, tmp_path / f"s{interval}", quiet=True)
    assert summary["steps"] == 2 * 5 * 4
    return peak - already_live


def test_peak_image_memory_is_flat_from_s_half_to_s_four(tmp_path, monkeypatch):
    short = peak_image_bytes(tmp_path, 0.5, monkeypatch)
    long = peak_image_bytes(tmp_path, 4.0, monkeypatch)
    one_batch = 64 * 3 * 8 * 8 * 4
    assert short == long, (short, long)
    assert long <= 2 * one_batch  # the current batch (and at most one transient copy), whatever s is
