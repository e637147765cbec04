"""PIE-G (pre-trained image encoder for generalizable visual RL) as a PyTorch Lightning package."""
# Import order matters: torchvision.models pulls in triton (through torch._dynamo), and importing triton after
# dm_control's EGL renderer has been loaded kills the process with SIGSEGV. Importing torch's side first, here,
# makes every entry point safe whatever the user imports next.
import torch  # noqa: F401
import torch._dynamo  # noqa: F401
import torchvision.models  # noqa: F401

__version__ = "0.1.0"


def load_policy(checkpoint: str, device: str = "cpu"):
    """A callable ``act(observation) -> action`` (mean action) from a training checkpoint; see ``policy.py``."""
    from lightning_pieg.policy import load_policy as _load

    return _load(checkpoint, device=device)
