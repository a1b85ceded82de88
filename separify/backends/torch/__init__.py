"""The PyTorch backend (torch.fx, with the module tree as fallback)."""

from separify.backends.torch.backend import TorchBackend  # noqa: F401
