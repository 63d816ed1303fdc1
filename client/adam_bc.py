"""DP-Adam with the noise taken out of its second moment (DP-AdamBC: Tang, Panda, Sitawarin, Mittal and
Feizi, "DP-AdamBC: Your DP-Adam Is Actually DP-SGD (Unless You Apply Bias Correction)", AAAI 2024,
arXiv:2312.14334).

Why: each coordinate of a DP-SGD step's gradient carries Gaussian noise of variance
Phi = (sigma * C / B)^2 (noise multiplier sigma, clip norm C, expected batch B: Opacus adds
N(0, sigma^2 C^2) to the clipped sum and divides by B). Adam's second moment estimates
E[g^2] = E[g]^2 + Var[g] + Phi, and at a small site's sigma and batch Phi dominates it: every
coordinate's denominator is about sigma * C / B, and Adam is SGD with a fixed step size. Its
estimate minus Phi, floored at ``floor``, is the second moment of the gradient itself:

    m_t = b1 m_{t-1} + (1 - b1) g_t          v_t = b2 v_{t-1} + (1 - b2) g_t^2
    m^ = m_t / (1 - b1^t)                    v^ = max(v_t / (1 - b2^t) - Phi, floor)
    theta_t = theta_{t-1} - lr * m^ / (sqrt(v^) + eps)

Phi is exact, not estimated: sigma, C and B are the round's own. Only the noised gradient
is read, so this is post-processing and costs no privacy. Without noise (Phi = 0) and with
v^ above the floor it is Adam, step for step (tests/client/test_adam_bc.py).
"""

from __future__ import annotations

import torch

FLOOR = 5e-8  # gamma of Tang et al.: a corrected second moment below it is taken as it (their default)


def noise_variance(noise_multiplier: float, clip_norm: float, expected_batch: float) -> float:
    """Phi: the variance of the Gaussian noise in each coordinate of a DP-SGD step's averaged gradient."""
    return (noise_multiplier * clip_norm / expected_batch) ** 2


class AdamBC(torch.optim.Optimizer):
    """Adam whose bias-corrected second moment has the DP noise variance ``noise_variance`` removed."""

    def __init__(self, params, lr: float, noise_variance: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, floor: float = FLOOR):
        if noise_variance < 0 or floor <= 0:
            raise ValueError("AdamBC: the noise variance must be >= 0 and the floor > 0")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "noise_variance": noise_variance,
                                  "floor": floor})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                second = (v / (1 - beta2 ** t) - group["noise_variance"]).clamp_(min=group["floor"])
                p.addcdiv_(m, second.sqrt_().add_(group["eps"]), value=-group["lr"] / (1 - beta1 ** t))
        return loss


def optimizer_for(name: str, lr: float, noise_multiplier: float | None, clip_norm: float, expected_batch: float):
    """train_adapter's ``make_optimizer`` for ``train.optimizer``: None (Adam) or AdamBC with this round's Phi."""
    if name == "adam":
        return None
    variance = noise_variance(noise_multiplier, clip_norm, expected_batch) if noise_multiplier else 0.0
    return lambda params: AdamBC(params, lr=lr, noise_variance=variance)
