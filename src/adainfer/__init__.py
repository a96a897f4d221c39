"""adainfer: instance-aware early exit for Hugging Face decoder-only LLMs (AdaInfer)."""

from ._version import __version__
from .persist import load_policy, save_policy
from .policies import POLICIES, Step, make_policy
from .prefill import AdaptiveEngine, ExitResult


def generate(*args, **kwargs):
    """Generate text, lossless, with drafts from an early layer (see adainfer.generation)."""
    from .generation import generate as _generate

    return _generate(*args, **kwargs)


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
    "generate",
    "load",
    "load_policy",
    "save_policy",
]
