"""External reference: Euler in ρ on DDIM's own timesteps is diffusers' DDIM sampling loop.

DDIM steps from ``t`` to ``t − 1000/n``; with "leading" spacing (SD's) those are exactly the next
timesteps, so the loop is one grid. diffusers keeps ᾱ in float32, hence 1e-7 even in float64.
"""

import pytest
import torch
from diffusers import DDIMScheduler

from adjointdpm_server.core import VPSchedule, sample

from .test_unet_gradients import UNetEps, tiny_unet


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-7), (torch.float32, 2e-5)])
@pytest.mark.parametrize("offset", [1, 0])
def test_euler_reproduces_diffusers_ddim_loop(dtype, tol, offset):
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, set_alpha_to_one=False, steps_offset=offset,
                          timestep_spacing="leading", clip_sample=False)
    sched.set_timesteps(12)
    model = UNetEps(tiny_unet()).to(dtype)
    cond = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)).to(dtype)

    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            eps = model(x, t.expand(2).to(dtype), cond)
            x = sched.step(eps, t, x, eta=0.0).prev_sample
        # the last step lands on ᾱ_0 (set_alpha_to_one=False), i.e. our t = 0; with steps_offset=0
        # the last timestep already is 0 and DDIM's step from it is the identity
        sch = VPSchedule.from_alphas_cumprod(sched.alphas_cumprod)
        ts = [float(t) for t in sched.timesteps]
        ts += [0.0] if ts[-1] > 0 else []
        ours = sample(model, x_T, cond, schedule=sch, steps=None, timesteps=ts, solver="euler",
                      grad_mode="none")
    assert float((ours - x).norm() / x.norm()) < tol
