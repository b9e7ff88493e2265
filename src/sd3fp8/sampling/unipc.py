"""UniPC (Zhao et al. 2023, arXiv:2302.04867), multistep B(h) predictor-corrector, as ComfyUI
v0.8.0 runs it (comfy/extra_samplers/uni_pc.py).

ComfyUI treats the sigmas as VE sigmas and solves in VP coordinates: x_vp = x / sqrt(1 + sigma^2),
alpha = 1 / sqrt(1 + sigma^2). That is the same ODE dx/dsigma = (x - D) / sigma the other samplers
solve, so it is exact for flow models too. A final sigma of 0 is replaced by 0.001.
Same signature as `ode`; the callback's "x" is the solver's VP-scaled state, as ComfyUI passes it.
"""

from __future__ import annotations

import torch
from tqdm.auto import trange

from sd3fp8.sampling.model_sampling import FlowSampling
from sd3fp8.sampling.noise import NoiseSource
from sd3fp8.sampling.ode import Denoiser, report

LAST_SIGMA = 0.001  # stands in for sigma = 0, where lambda is infinite


class _VP:
    """VP coordinates of a VE sigma (ComfyUI's SigmaConvert)."""

    @staticmethod
    def log_alpha(sigma):
        return 0.5 * torch.log(1 / ((sigma * sigma) + 1))

    @classmethod
    def alpha(cls, sigma):
        return torch.exp(cls.log_alpha(sigma))

    @classmethod
    def std(cls, sigma):
        return torch.sqrt(1.0 - torch.exp(2.0 * cls.log_alpha(sigma)))

    @classmethod
    def lam(cls, sigma):
        log_alpha = cls.log_alpha(sigma)
        return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))


def _expand(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v[(...,) + (None,) * (ndim - 1)]


def _data_prediction(model: Denoiser, x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 from the VP state, through the eps the denoiser implies (ComfyUI's round trip, kept for parity)."""
    sigma = t.view(t.shape[:1] + (1,) * (x_vp.ndim - 1))
    x_ve = x_vp * ((sigma**2 + 1.0) ** 0.5)
    eps = (x_ve - model(x_ve, t)) / sigma
    return (x_vp - _expand(_VP.std(t), x_vp.ndim) * eps) / _expand(_VP.alpha(t), x_vp.ndim)


def _coefficients(hh: torch.Tensor, order: int, bh2: bool):
    """B(h) and the b vector of the UniPC linear system; b cancels badly for small h, so float64."""
    hh64 = hh.detach().cpu().double()
    h_phi_k = torch.expm1(hh64) / hh64 - 1
    b_h64 = torch.expm1(hh64) if bh2 else hh64
    b, factorial = [], 1
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h64)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh64 - 1 / factorial
    return (torch.expm1(hh) if bh2 else hh), torch.tensor(b, device=hh.device, dtype=hh.dtype)


def _update(model, x, model_prev, t_prev, t, order: int, use_corrector: bool, bh2: bool):
    """One multistep UniPC-B(h) step from t_prev[-1] to t (data prediction, ComfyUI's arithmetic)."""
    ndim = x.dim()
    lambda_prev_0, lambda_t = _VP.lam(t_prev[-1]), _VP.lam(t)
    model_prev_0 = model_prev[-1]
    alpha_t = torch.exp(_VP.log_alpha(t))
    h = lambda_t - lambda_prev_0
    rk_list, d1_list = [], []
    for i in range(1, order):
        rk = ((_VP.lam(t_prev[-(i + 1)]) - lambda_prev_0) / h)[0]
        rk_list.append(rk)
        d1_list.append((model_prev[-(i + 1)] - model_prev_0) / rk)
    rk_list.append(1.0)
    rks = torch.tensor(rk_list, device=x.device)
    hh = -h[0]
    b_h, b = _coefficients(hh, order, bh2)
    r_mat = torch.stack([torch.pow(rks, i - 1) for i in range(1, order + 1)])
    d1s = torch.stack(d1_list, dim=1) if d1_list else None  # [B, K, C, H, W]

    x_t_ = _expand(_VP.std(t) / _VP.std(t_prev[-1]), ndim) * x - _expand(alpha_t * torch.expm1(hh), ndim) * model_prev_0
    pred_res = 0
    if d1s is not None:
        rhos_p = torch.tensor([0.5], device=b.device) if order == 2 else torch.linalg.solve(r_mat[:-1, :-1], b[:-1])
        pred_res = torch.tensordot(d1s, rhos_p, dims=([1], [0]))
    x_t = x_t_ - _expand(alpha_t * b_h, ndim) * pred_res
    if not use_corrector:
        return x_t, None
    rhos_c = torch.tensor([0.5], device=b.device) if order == 1 else torch.linalg.solve(r_mat, b)
    model_t = _data_prediction(model, x_t, t)
    corr_res = torch.tensordot(d1s, rhos_c[:-1], dims=([1], [0])) if d1s is not None else 0
    x_t = x_t_ - _expand(alpha_t * b_h, ndim) * (corr_res + rhos_c[-1] * (model_t - model_prev_0))
    return x_t, model_t


def _solve(model, x, timesteps, order, bh2, callback, disable):
    n = len(timesteps) - 1
    batch = x.shape[0]
    model_prev, t_prev = [], []
    for step_index in trange(n, disable=disable):
        if step_index == 0:
            t = timesteps[0].expand(batch)
            model_prev, t_prev = [_data_prediction(model, x, t)], [t]
        elif step_index < order:  # warm-up at increasing order
            t = timesteps[step_index].expand(batch)
            x, model_x = _update(model, x, model_prev, t_prev, t, step_index, True, bh2)
            model_prev.append(model_x)
            t_prev.append(t)
        else:  # the last step also takes the final (corrector-free) step to timesteps[n]
            for step in range(step_index, step_index + 1 + (step_index == n - 1)):
                t = timesteps[step].expand(batch)
                x, model_x = _update(model, x, model_prev, t_prev, t, min(order, n + 1 - step), step != n, bh2)
                model_prev, t_prev = model_prev[1:] + model_prev[-1:], t_prev[1:] + [t]
                if step < n:
                    model_prev[-1] = model_x if model_x is not None else _data_prediction(model, x, t)
        report(callback, step_index, x, timesteps[step_index], model_prev[-1])
    return x


def _uni_pc(model, x, sigmas, disable, callback, bh2: bool):
    timesteps = sigmas.clone()
    if sigmas[-1] == 0:
        timesteps[-1] = LAST_SIGMA
    x = x / torch.sqrt(1.0 + timesteps[0] ** 2.0)
    order = min(3, len(timesteps) - 2)
    x = _solve(model, x, timesteps, order, bh2, callback, disable)
    return x / _VP.alpha(timesteps[-1])


def uni_pc(model: Denoiser, x, sigmas, *, sampling: FlowSampling, noise: NoiseSource, callback=None, disable=None):
    """UniPC, B(h) = h (bh1), order min(3, steps - 1), lower order for the final steps."""
    return _uni_pc(model, x, sigmas, disable, callback, bh2=False)


def uni_pc_bh2(model: Denoiser, x, sigmas, *, sampling: FlowSampling, noise: NoiseSource, callback=None, disable=None):
    """UniPC with B(h) = expm1(h) (bh2)."""
    return _uni_pc(model, x, sigmas, disable, callback, bh2=True)
