"""Save and load exit policies without pickle: one safetensors file, arrays + JSON metadata.

Loading reads numbers and a JSON header only (no code runs), and the header records which
model the policy was trained for, so using it with another model is a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ._version import __version__
from .files import write_atomic
from .policies import POLICIES, ExitPolicy

FORMAT = "adainfer-policy/1"


def model_signature(model) -> dict:
    """What must match between the model a policy was trained on and the one it runs on."""
    from .arch import find_parts

    parts = find_parts(model)
    config = model.config
    return {
        "model_id": getattr(model, "adainfer_id", None)
        or getattr(config, "_name_or_path", "")
        or "",
        "model_type": config.model_type,
        "num_layers": parts.num_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": parts.head.weight.shape[0],
    }


def save_policy(policy: ExitPolicy, path, model=None, **extra) -> Path:
    name = next((k for k, cls in POLICIES.items() if type(policy) is cls), None)
    if name is None:
        raise TypeError(f"cannot save {type(policy).__name__}: not one of {', '.join(POLICIES)}")
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in policy.get_params().items()}
    meta = {
        "format": FORMAT,
        "policy": name,
        "params": params,
        "features": list(policy.features),
        "check_layers": getattr(policy, "check_layers_", None),
        "check_plans": {str(b): list(l) for b, l in getattr(policy, "check_plans_", {}).items()}
        or None,
        "target": getattr(policy, "target_", None),
        "adainfer_version": __version__,
        "model": model_signature(model)
        if model is not None
        else getattr(policy, "model_meta_", None),
        **extra,
    }
    arrays = {k: np.ascontiguousarray(v) for k, v in policy._arrays().items()}
    if not arrays:  # safetensors wants at least one tensor
        arrays = {"_empty": np.zeros(0, dtype=np.float32)}
    write_atomic(path, lambda tmp: save_file(arrays, tmp, metadata={"adainfer": json.dumps(meta)}))
    return Path(path)


def load_policy(path, model=None, allow_other_model: bool = False) -> ExitPolicy:
    """A saved policy; with `model`, one trained for another model is refused unless allowed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no policy file at {path}")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = json.loads((f.metadata() or {}).get("adainfer", "null"))
            arrays = {k: f.get_tensor(k) for k in f.keys() if k != "_empty"}
    except Exception as e:
        raise ValueError(f"{path} is not an adainfer policy file ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an adainfer policy file (format {FORMAT} expected)")
    params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["params"].items()}
    if meta.get("policy") not in POLICIES:
        raise ValueError(
            f"{path} holds a {meta.get('policy')!r} policy, which this adainfer ({__version__}) does not know; "
            f"known: {', '.join(POLICIES)}"
        )
    policy = POLICIES[meta["policy"]](**params)
    policy.features = tuple(meta["features"])
    policy._load_arrays(arrays)
    if meta.get("check_layers") is not None:
        policy.check_layers_ = tuple(meta["check_layers"])
    if meta.get("check_plans"):
        policy.check_plans_ = {int(b): tuple(l) for b, l in meta["check_plans"].items()}
    if meta.get("target"):
        policy.target_ = meta["target"]
    policy.model_meta_ = meta.get("model")
    policy.metadata_ = meta
    if model is not None:
        check_compatible(policy, model, allow_other_model)
    return policy


class IncompatiblePolicy(ValueError):
    pass


def check_compatible(policy: ExitPolicy, model, allow_other_model: bool = False) -> None:
    """Refuse a policy trained for another model (other id, depth, width or vocabulary), unless
    `allow_other_model`: its features are model-agnostic, so transfer is a deliberate experiment."""
    trained = getattr(policy, "model_meta_", None)
    if not trained or allow_other_model:  # inter-model transfer is a deliberate experiment
        return
    here = model_signature(model)
    diffs = [
        f"{k}: policy {trained.get(k)!r} vs model {here[k]!r}"
        for k in ("model_id", "num_layers", "hidden_size", "vocab_size")
        if trained.get(k) is not None and trained.get(k) != here[k]
    ]
    if diffs:
        raise IncompatiblePolicy(
            "this policy was trained for another model (" + "; ".join(diffs) + "). "
            "Train one for this model with `adainfer collect` + `adainfer fit`"
            + ", or pass allow_other_model=True (--allow-other-model) to use it anyway."
        )
