"""run_sample in process: shapes, PNGs and pixels, progress per step, steps and seed, cancel."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from adjointdpm_server.errors import Cancelled, InvalidArgument
from adjointdpm_server.tasks import GenerationSpec, LocalJob, run_sample

from .conftest import engine_calls, finite, gen, is_png, noise, opts, progress


def test_shapes_images_and_one_progress_event_per_step(ctx):
    spec = gen(2, labels=(1, 7))
    job = LocalJob()
    result = run_sample(ctx, spec, job, opts("Sample"))
    assert result.x0.shape == result.x_T.shape == (2, 1, 8, 8)
    assert torch.equal(result.x_T, spec.x_T) and finite(result.x0)
    assert not torch.allclose(result.x0, result.x_T)
    assert len(result.images) == 2 and all(is_png(p) for p in result.images)
    assert result.pixels is None  # off by default
    events = progress(job.events)
    assert len(events) == len(job.events) == 3  # a sample emits progress only
    assert [(e.phase, e.step, e.total, e.iteration) for e in events] == [
        ("forward", 1, 3, 0), ("forward", 2, 3, 0), ("forward", 3, 3, 0)]
    # dpm3 is multistep: one network call a step, CFG's halves in one call
    assert [e.nfe for e in events] == [1, 2, 3]
    assert events[0].t > events[1].t > events[2].t >= 0  # toward the clean end


def test_pixels_on_images_off_and_pngs_are_the_pixels(ctx, runtime):
    spec = gen(2, labels=(1, 7))
    both = run_sample(ctx, spec, LocalJob(), opts("Sample", pixels=True))
    only_pixels = run_sample(ctx, spec, LocalJob(), opts("Sample", images=False, pixels=True))
    assert only_pixels.images == [] and len(both.images) == 2
    pixels = only_pixels.pixels
    assert pixels.shape == (2, 1, 8, 8) and pixels.dtype == torch.float32
    assert float(pixels.min()) >= 0 and float(pixels.max()) <= 1
    torch.testing.assert_close(pixels, runtime.models["digits"].decode(only_pixels.x0))
    torch.testing.assert_close(both.x0, only_pixels.x0)  # the same x_T: the same sample
    for png, img in zip(both.images, pixels):
        decoded = np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32)
        np.testing.assert_array_equal(decoded, np.round(img[0].numpy() * 255))


@pytest.mark.parametrize("steps", [2, 4])
def test_steps_option_sets_the_steps_and_network_calls(ctx, runtime, steps):
    job = LocalJob()
    before = engine_calls(runtime)
    run_sample(ctx, gen(1, steps=steps), job, opts("Sample", images=False))
    assert [e.step for e in progress(job.events)] == list(range(1, steps + 1))
    assert progress(job.events)[-1].nfe == steps
    assert engine_calls(runtime) - before == steps


def test_seed_draws_the_models_noise_reproducibly(ctx, runtime):
    spec = GenerationSpec(labels=[2], seed=11, steps=2)
    a = run_sample(ctx, spec, LocalJob(), opts("Sample", images=False))
    b = run_sample(ctx, spec, LocalJob(), opts("Sample", images=False))
    assert torch.equal(a.x_T, runtime.models["digits"].noise(1, 11))
    assert torch.equal(a.x0, b.x0)


def test_bad_x_T_is_invalid_argument_before_any_call(ctx, runtime):
    before = engine_calls(runtime)
    with pytest.raises(InvalidArgument, match="shape"):
        run_sample(ctx, GenerationSpec(x_T=noise(1)[:, :, :4], steps=2), LocalJob(), opts("Sample"))
    bad = noise(1)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidArgument, match="NaN"):
        run_sample(ctx, GenerationSpec(x_T=bad, steps=2), LocalJob(), opts("Sample"))
    assert engine_calls(runtime) == before


class CancelAfterFirstStep(LocalJob):
    def emit(self, event):
        super().emit(event)
        self.cancelled.set()


def test_cancel_stops_within_one_network_call(ctx, runtime):
    job = CancelAfterFirstStep()
    before = engine_calls(runtime)
    with pytest.raises(Cancelled):
        run_sample(ctx, gen(1, steps=4), job, opts("Sample"))
    assert len(progress(job.events)) == 1
    assert engine_calls(runtime) - before <= 2  # the step that emitted, then at most one more
