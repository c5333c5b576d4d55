"""Triton kernels (hand-written and generated) with their ``torch.library`` registrations and CPU paths."""
