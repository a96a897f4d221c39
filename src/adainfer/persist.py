"""Save and load exit policies without pickle: one safetensors file, arrays + JSON metadata.

Loading reads numbers and a JSON header only (no code runs), and the header records which
model the policy was trained for, so using it with another model is a clear error.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ._version import __version__
from .checks import CheckPlan, PlannedPolicy, known_plan
from .files import write_atomic
from .policies import POLICIES, ExitPolicy

# 2: a PlannedPolicy's plans, threshold and target apart from the policy it wraps
FORMAT = "adainfer-policy/2"
FORMAT_1 = "adainfer-policy/1"  # plans as lists of layers at the top of the header; still read


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
    """One file: the policy's arrays, and a JSON header with its kind, parameters and features;
    for a `PlannedPolicy`, its plans, stop threshold, training target and model. `model` (a
    loaded model) records that model instead of the one the policy was fitted on."""
    planned = isinstance(policy, PlannedPolicy)
    inner = policy.policy_ if planned else policy
    name = next((k for k, cls in POLICIES.items() if type(inner) is cls), None)
    if name is None:
        raise TypeError(f"cannot save {type(inner).__name__}: not one of {', '.join(POLICIES)}")
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in inner.get_params().items()}
    meta = {
        "format": FORMAT,
        "policy": name,
        "params": params,
        "features": list(inner.features),
        "planned": planned,
        "plans": {str(b): _plan_header(p) for b, p in policy.plans_.items()} if planned else None,
        "threshold": policy.threshold_ if planned else None,
        "target": policy.target_ if planned else None,
        "adainfer_version": __version__,
        "model": model_signature(model) if model is not None else getattr(policy, "model_", None),
        **extra,
    }
    arrays = {k: np.ascontiguousarray(v) for k, v in inner._arrays().items()}
    if not arrays:  # safetensors wants at least one tensor
        arrays = {"_empty": np.zeros(0, dtype=np.float32)}
    write_atomic(path, lambda tmp: save_file(arrays, tmp, metadata={"adainfer": json.dumps(meta)}))
    return Path(path)


def _plan_header(plan: CheckPlan) -> dict:
    return {**dataclasses.asdict(plan), "check_layers": [int(l) for l in plan.check_layers]}


def policy_header(path) -> dict:
    """The JSON header of a saved policy (kind, parameters, plans, model, and what the writer
    added, such as the bench's `shortlist`)."""
    return _read(Path(path))[0]


def load_policy(path, model=None, allow_other_model: bool = False) -> ExitPolicy:
    """A saved policy; with `model`, one trained for another model is refused unless allowed.

    A file that records plans, a training target or a model reads back as a `PlannedPolicy`
    (which carries them), any other as the bare policy. Files of format 1 (plans as
    `check_plans` / `check_layers` lists) read as they ran: their plans keep only the layers."""
    path = Path(path)
    meta, arrays = _read(path)
    inner = _inner_policy(meta, arrays, path)
    plans = _plans(meta)
    policy = inner
    if plans or meta.get("planned") or meta.get("target") or meta.get("model"):
        policy = PlannedPolicy.from_plans(
            inner, plans, target=meta.get("target"), model=meta.get("model")
        )
    if model is not None:
        check_compatible(policy, model, allow_other_model)
    return policy


def _read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    if not path.is_file():
        raise FileNotFoundError(f"no policy file at {path}")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = json.loads((f.metadata() or {}).get("adainfer", "null"))
            arrays = {k: f.get_tensor(k) for k in f.keys() if k != "_empty"}
    except Exception as e:
        raise ValueError(f"{path} is not an adainfer policy file ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, FORMAT_1):
        raise ValueError(f"{path} is not an adainfer policy file (format {FORMAT} expected)")
    return meta, arrays


def _inner_policy(meta: dict, arrays: dict, path: Path) -> ExitPolicy:
    params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["params"].items()}
    if meta.get("policy") not in POLICIES:
        raise ValueError(
            f"{path} holds a {meta.get('policy')!r} policy, which this adainfer ({__version__}) "
            f"does not know; known: {', '.join(POLICIES)}"
        )
    policy = POLICIES[meta["policy"]](**params)
    if tuple(policy.features) != tuple(meta["features"]):
        raise ValueError(
            f"{path}: the header's features {meta['features']} are not those its parameters "
            f"give ({list(policy.features)})"
        )
    policy._load_arrays(arrays)
    return policy


def _plans(meta: dict) -> dict[int, CheckPlan]:
    """{batch size: CheckPlan} of a header; format 1 kept the layers only: `check_plans`, and
    `check_layers` for a batch of any size when it had no plan per size."""
    if meta["format"] == FORMAT_1:
        if meta.get("check_plans"):
            return {int(b): known_plan(l) for b, l in meta["check_plans"].items()}
        layers = meta.get("check_layers")
        return {} if layers is None else {1: known_plan(layers)}
    return {
        int(b): CheckPlan(**{**p, "check_layers": tuple(p["check_layers"])})
        for b, p in (meta.get("plans") or {}).items()
    }


class IncompatiblePolicy(ValueError):
    pass


def check_compatible(policy: ExitPolicy, model, allow_other_model: bool = False) -> None:
    """Refuse a policy trained for another model (other id, depth, width or vocabulary), unless
    `allow_other_model`: its features are model-agnostic, so transfer is a deliberate experiment."""
    trained = getattr(policy, "model_", None)
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
