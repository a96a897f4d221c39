"""adainfer: instance-aware early exit for Hugging Face decoder-only LLMs (AdaInfer)."""

from ._version import __version__
from .engine import AdaptiveEngine, ExitResult, Step
from .persist import load_policy, save_policy
from .policies import POLICIES, make_policy


def load(*args, **kwargs):
    """Load a model and tokenizer by alias, local folder, .gguf file or hub id
    (see adainfer.models)."""
    from .models import load as _load

    return _load(*args, **kwargs)


__all__ = [
    "__version__",
    "AdaptiveEngine",
    "ExitResult",
    "Step",
    "POLICIES",
    "make_policy",
    "load",
    "load_policy",
    "save_policy",
]
