"""A fixed non-zero adapter to step from: with lora_B = 0, A's gradients would be trivially zero."""

import torch


def nonzero_lora_b(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Fill every lora_B with fixed N(0, 0.02) values; return (trainable parameters, a copy of them)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    return params, [p.detach().clone() for p in params]
