"""Save and load exit policies without pickle: one safetensors file, arrays + JSON metadata.

Loading reads numbers and a JSON header only (no code runs), and the header records which
model the policy was trained for, so using it with another model is a clear error. The header
is checked against a schema, and (format 3) carries a sha256 of every array and a `binding`
digest of the policy type, features, model and array digests, verified before any array is
used: a CRF's model bytes go to crfsuite's C code, which trusts them (a flipped byte crashed
the process), and features reordered in the header would silently run wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ._version import __version__
from .checks import TARGETS, CheckPlan, PlannedPolicy, known_plan
from .features import check_names
from .files import write_atomic
from .policies import POLICIES, ExitPolicy
from .schema import Check, DictOf, Int, ListOf, Number, OneOf, Optional, Record, check

# 3: a sha256 per array and a digest binding type, features, model and arrays (verified on load)
FORMAT = "adainfer-policy/3"
# 2: a PlannedPolicy's plans, threshold and target apart from the policy it wraps; no checksums.
# Still read (schema and shapes checked); a CRF among them is refused, as nothing vouches for
# the bytes crfsuite would read: load it with `unverified_ok=True` and save it again.
FORMAT_2 = "adainfer-policy/2"
FORMAT_1 = "adainfer-policy/1"  # plans as lists of layers at the top of the header; still read


class PolicyFileError(ValueError):
    """A policy file that is damaged, edited or not a policy file; the message names it."""


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


def parameter_count(model) -> int:
    """The model's parameters, a tied embedding and head counted once (Table 1's size)."""
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared one once


def save_policy(policy: ExitPolicy, path, model=None, **extra) -> Path:
    """One file: the policy's arrays, and a JSON header with its kind, parameters and features;
    for a `PlannedPolicy`, its plans, stop threshold, training target and model. `model` (a
    loaded model) records that model instead of the one the policy was fitted on. The header
    holds a sha256 of every array and binds them to the kind, features and model."""
    planned = isinstance(policy, PlannedPolicy)
    inner = policy.policy_ if planned else policy
    name = next((k for k, cls in POLICIES.items() if type(inner) is cls), None)
    if name is None:
        raise TypeError(f"cannot save {type(inner).__name__}: not one of {', '.join(POLICIES)}")
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in inner.get_params().items()}
    arrays = {k: np.ascontiguousarray(v) for k, v in inner._arrays().items()}
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
        "arrays": {k: _digest(v) for k, v in arrays.items()},
    }
    meta["binding"] = _binding(meta)
    if not arrays:  # safetensors wants at least one tensor
        arrays = {"_empty": np.zeros(0, dtype=np.float32)}
    write_atomic(path, lambda tmp: save_file(arrays, tmp, metadata={"adainfer": json.dumps(meta)}))
    return Path(path)


def _plan_header(plan: CheckPlan) -> dict:
    return {**dataclasses.asdict(plan), "check_layers": [int(l) for l in plan.check_layers]}


def _digest(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    return {"dtype": str(a.dtype), "shape": list(a.shape), "sha256": _sha256(a.tobytes())}


def _binding(meta: dict) -> str:
    """What must not change apart: the policy kind, its features (in order), the model and the
    arrays (their digests). A threshold or a plan may be edited; these may not."""
    bound = {k: meta.get(k) for k in ("policy", "features", "model", "arrays")}
    return _sha256(json.dumps(bound, sort_keys=True).encode())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def policy_header(path) -> dict:
    """The JSON header of a saved policy (kind, parameters, plans, model, and what the writer
    added, such as the bench's `shortlist`), checked against the schema."""
    path = Path(path)
    meta, _ = _read(path)
    _guarded(path, _check_header, meta)
    return meta


def load_policy(
    path, model=None, allow_other_model: bool = False, *, unverified_ok: bool = False
) -> ExitPolicy:
    """A saved policy; with `model`, one trained for another model is refused unless allowed.

    A file that records plans, a training target or a model reads back as a `PlannedPolicy`
    (which carries them), any other as the bare policy. Files of format 1 (plans as
    `check_plans` / `check_layers` lists) read as they ran: their plans keep only the layers.
    Every array is verified against its checksum before use; a damaged or edited file is a
    `PolicyFileError` naming it. Files of formats 1 and 2 carry no checksums: they are read
    after the schema and shape checks, except a CRF, whose bytes native code would read
    unverified (`unverified_ok=True` reads it anyway, to save it again in today's format)."""
    path = Path(path)
    meta, arrays = _read(path)
    inner = _guarded(path, _inner_policy, meta, arrays, unverified_ok)
    plans = _guarded(path, _plans, meta)
    policy = inner
    if plans or meta.get("planned") or meta.get("target") or meta.get("model"):
        policy = PlannedPolicy.from_plans(
            inner, plans, target=meta.get("target"), model=meta.get("model")
        )
    if model is not None:
        check_compatible(policy, model, allow_other_model)
    return policy


def _guarded(path: Path, fn, *args):
    """fn(*args), a ValueError from it (header, checksums, arrays) named after the file."""
    try:
        return fn(*args)
    except ValueError as e:
        raise PolicyFileError(
            f"{path}: {e}. Re-fit the policy (`adainfer fit`) or restore the file"
        ) from None


def _read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    if not path.is_file():
        raise FileNotFoundError(f"no policy file at {path}")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = json.loads((f.metadata() or {}).get("adainfer", "null"))
            arrays = {k: f.get_tensor(k) for k in f.keys() if k != "_empty"}
    except Exception as e:
        raise PolicyFileError(f"{path} is not an adainfer policy file ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, FORMAT_2, FORMAT_1):
        raise PolicyFileError(f"{path} is not an adainfer policy file (format {FORMAT} expected)")
    return meta, arrays


def _inner_policy(meta: dict, arrays: dict, unverified_ok: bool) -> ExitPolicy:
    _check_header(meta)
    cls = POLICIES[meta["policy"]]
    if meta["format"] == FORMAT:
        _verify(meta, arrays)
    elif meta["policy"] == "crf" and not unverified_ok:
        raise ValueError(
            f"a CRF policy of format {meta['format']} carries no checksums, so nothing vouches "
            "for the model bytes crfsuite would read; if you trust the file, load it with "
            "load_policy(path, unverified_ok=True) and save_policy it again"
        )
    params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["params"].items()}
    policy = cls(**params)
    if tuple(policy.features) != tuple(meta["features"]):
        raise ValueError(
            f"the header's features {meta['features']} are not those its parameters "
            f"give ({list(policy.features)})"
        )
    policy._load_arrays(arrays)
    return policy


def _verify(meta: dict, arrays: dict) -> None:
    """Every array as the header's checksums say, and the header's kind, features and model
    those it was saved with."""
    listed = meta["arrays"]
    if set(listed) != set(arrays):
        raise ValueError(
            f"holds arrays {sorted(arrays) or 'none'} but its header lists "
            f"{sorted(listed) or 'none'}: the file is damaged"
        )
    for name, a in arrays.items():
        if _digest(a) != listed[name]:
            raise ValueError(f"array {name} does not match its checksum: the file is damaged")
    if _binding(meta) != meta["binding"]:
        raise ValueError(
            "the header's policy kind, features or model are not those the arrays were saved "
            "with (edited?)"
        )


# ----------------------------------------------------------------------------- header schema
def _param_value(value) -> bool:
    if isinstance(value, list):  # features
        return all(isinstance(v, str) for v in value)
    return value is None or isinstance(value, (str, bool)) or _finite(value)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


_PARAM = Check(_param_value, "a finite number, a string, true/false, null or a list of names")
_MODEL = Record(
    {
        "model_id": str,
        "model_type": str,
        "num_layers": Int(1),
        "hidden_size": Int(1),
        "vocab_size": Int(1),
    }
)
_PLAN = Record(
    {
        "check_layers": ListOf(Int(1)),
        "expected_cost": Number(finite=False, nan=True),  # NaN: a plan known by its layers only
        "expected_accuracy": Number(finite=False, nan=True),
        "full_accuracy": Number(finite=False, nan=True),
        "check_cost": Number(finite=False, nan=True),
        "candidates": Int(0),
        "held_out": bool,
        "expected_agreement": Number(finite=False, nan=True),
        "threshold": Optional(float),
        # the risk the plan controls (checks.CheckPlan; absent in files from before it)
        "risk": Optional(OneOf("consistency", "accuracy")),
        "epsilon": Optional(Number(low=0, high=1)),
        "delta": Optional(Number(low=0, high=1)),
        "tested_on": Int(0),
        "p_value": Optional(Number(low=0, high=1)),
    },
    optional=(
        "expected_agreement",
        "threshold",
        "risk",
        "epsilon",
        "delta",
        "tested_on",
        "p_value",
    ),
    extra=False,
)
_DIGEST = Record(
    {
        "dtype": str,
        "shape": ListOf(Int(0)),
        "sha256": Check(lambda v: isinstance(v, str) and len(v) == 64, "a sha256 hex digest"),
    },
    extra=False,
)
_COMMON = {
    "format": str,
    "policy": str,
    "params": DictOf(_PARAM),
    "features": ListOf(str),
    "target": Optional(OneOf(*TARGETS)),
    "model": Optional(_MODEL),
    "adainfer_version": str,
}
_HEADERS = {
    FORMAT_1: Record(
        {
            **_COMMON,
            "check_layers": Optional(ListOf(Int(1))),
            "check_plans": Optional(DictOf(ListOf(Int(1)), key=int)),
        },
        optional=("check_layers", "check_plans", "target", "model", "adainfer_version"),
    ),
    FORMAT_2: Record(
        {
            **_COMMON,
            "planned": bool,
            "plans": Optional(DictOf(_PLAN, key=int)),
            "threshold": Optional(float),
        },
        optional=("planned", "plans", "threshold", "target", "model", "adainfer_version"),
    ),
}
_HEADERS[FORMAT] = Record(
    {**_HEADERS[FORMAT_2].fields, "arrays": DictOf(_DIGEST), "binding": str},
    optional=_HEADERS[FORMAT_2].optional,
)


def _check_header(meta: dict) -> None:
    """The header as its format says: fields of the right types, a known policy kind taking
    these parameters, known feature names. A ValueError naming the first field that is not."""
    if meta.get("policy") not in POLICIES:
        raise ValueError(
            f"holds a {meta.get('policy')!r} policy, which this adainfer ({__version__}) "
            f"does not know; known: {', '.join(POLICIES)}"
        )
    check(meta, _HEADERS[meta["format"]], "the header")
    known = POLICIES[meta["policy"]]._get_param_names()
    unknown = [k for k in meta["params"] if k not in known]
    if unknown:
        raise ValueError(
            f"the header gives a {meta['policy']} policy the unknown parameter(s) "
            f"{', '.join(unknown)}; it takes {', '.join(known) or 'none'}"
        )
    for names in (meta["features"], meta["params"].get("features")):
        if names:  # never and oracle read no feature
            check_names(names)


def _plans(meta: dict) -> dict[int, CheckPlan]:
    """{batch size: CheckPlan} of a header; format 1 kept the layers only: `check_plans`, and
    `check_layers` for a batch of any size when it had no plan per size."""
    if meta["format"] == FORMAT_1:
        if meta.get("check_plans"):
            return {int(b): known_plan(l) for b, l in meta["check_plans"].items()}
        layers = meta.get("check_layers")
        return {} if layers is None else {1: known_plan(layers)}
    plans = {
        int(b): CheckPlan(**{**p, "check_layers": tuple(p["check_layers"])})
        for b, p in (meta.get("plans") or {}).items()
    }
    if any(b < 1 for b in plans):
        raise ValueError(f"the header plans for batch sizes {sorted(plans)}; sizes start at 1")
    return plans


class IncompatiblePolicy(ValueError):
    pass


def check_compatible(policy: ExitPolicy, model, allow_other_model: bool = False) -> None:
    """Refuse a policy trained for another model (other id, depth, width or vocabulary), unless
    `allow_other_model`: its features are model-agnostic, so transfer is a deliberate experiment."""
    trained = getattr(policy, "model_", None)
    if not trained or allow_other_model:  # inter-model transfer is a deliberate experiment
        return
    here = model_signature(model)
    # every field the policy records: a null one is a mismatch, not a pass
    diffs = [
        f"{k}: policy {trained[k]!r} vs model {here[k]!r}"
        for k in ("model_id", "num_layers", "hidden_size", "vocab_size")
        if k in trained and trained[k] != here[k]
    ]
    if diffs:
        raise IncompatiblePolicy(
            "this policy was trained for another model (" + "; ".join(diffs) + "). "
            "Train one for this model with `adainfer collect` + `adainfer fit`"
            + ", or pass allow_other_model=True (--allow-other-model) to use it anyway."
        )
