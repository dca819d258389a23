"""Shared test data for the method tests."""
import torch

from sparselm.capture import LinearStats


def correlated(seed: int = 0, tokens: int = 256, in_f: int = 32, out_f: int = 16):
    """Inputs driven by a few latent factors (strongly correlated, as real activations are), a weight and the
    inputs' statistics: where a Hessian-aware method must beat a magnitude one."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(tokens, 8, generator=g)  # (tokens, 8) a few latent factors: strongly correlated inputs
    X = Z @ torch.randn(8, in_f, generator=g) + 0.1 * torch.randn(tokens, in_f, generator=g)  # (tokens, in)
    W = torch.randn(out_f, in_f, generator=g)  # (out, in)
    return X, W, LinearStats.from_inputs(X)
