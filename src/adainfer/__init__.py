"""adainfer: instance-aware early exit for Hugging Face decoder-only LLMs (AdaInfer).

The modules stand on floors; each imports only from its own floor or below:
- ground: _version, files (atomic result files), timing (timers, check cost, memory), taskdata;
- models and data: models (loading), arch (where a model's parts live), tasks, benchmarks;
- stepper and lens: stepper (the model's own forward, layer by layer, rows leaving early),
  lens (the one logit lens);
- features and policies: features, policies (exit policies, Step), flops, offline (replay on
  traces), checks (PlannedPolicy: where to check), persist (policy files);
- engine clients: prefill (AdaptiveEngine), generation (token by token, lossless drafting),
  lossy (token by token, every token leaving at its own layer; TokenExitPolicy);
  drafting (DraftPlanner, ExitDraftPlanner: whether and how to draft, measured);
- evaluate, bench, reproduce: collect, summary, evaluate, bench, reproduce, report,
  pipeline, demo, headroom, lmeval (the lm-evaluation-harness model; imports lm_eval, so
  nothing here imports it);
- the command line: cli.
"""

from ._version import __version__
from .checks import PlannedPolicy
from .persist import load_policy, save_policy
from .policies import POLICIES, Step, make_policy
from .prefill import AdaptiveEngine, ExitResult


def __getattr__(name):
    if name == "TokenExitPolicy":  # imported on first use: it brings in torch and sklearn
        from .lossy import TokenExitPolicy

        return TokenExitPolicy
    raise AttributeError(f"module 'adainfer' has no attribute {name!r}")


def generate(*args, **kwargs):
    """Generate text: lossless (plain, or drafts from an early layer), or lossy with a
    `TokenExitPolicy` (see adainfer.generation and adainfer.lossy)."""
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
    "PlannedPolicy",
    "TokenExitPolicy",
    "make_policy",
    "generate",
    "load",
    "load_policy",
    "save_policy",
]
