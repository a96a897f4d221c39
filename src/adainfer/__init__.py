"""adainfer: instance-aware early exit for Hugging Face decoder-only LLMs (AdaInfer)."""

__version__ = "0.1.0"

from .persist import load_policy, save_policy  # noqa: E402
from .policies import POLICIES, Step, make_policy  # noqa: E402
from .prefill import AdaptiveEngine, ExitResult  # noqa: E402


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
