"""What `divergence = "auto"` resolves to: training (train/student.py, check_inputs) and the model card (card.py) both
say it, and the card must not import the training phase."""

from __future__ import annotations


def default_divergence(codec: str, on_policy: bool) -> str:
    """What divergence = "auto" means: reverse KL for on-policy topk stores, forward KL otherwise
    (a sampled store supports only the forward KL, see check_supported)."""
    return "reverse_kl" if on_policy and codec == "topk" else "forward_kl"
