"""adainfer: instance-aware early exit for Hugging Face decoder-only LLMs (AdaInfer)."""

__version__ = "0.1.0"

from .checks import PlannedPolicy  # noqa: E402
from .engine import AdaptiveEngine, ExitResult, Step  # noqa: E402
from .persist import load_policy, save_policy  # noqa: E402
from .policies import POLICIES, make_policy  # noqa: E402


def load(*args, **kwargs):
    """Load a model and tokenizer by alias, local folder, .gguf file or hub id (see adainfer.models)."""
    from .models import load as _load

    return _load(*args, **kwargs)


__all__ = [
    "AdaptiveEngine",
    "ExitResult",
    "Step",
    "POLICIES",
    "PlannedPolicy",
    "make_policy",
    "load",
    "load_policy",
    "save_policy",
]
