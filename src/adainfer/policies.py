"""Exit policies: scikit-learn style estimators that decide, per row and layer, to stop.

Contract (like scikit-learn): parameters in `__init__`, `fit(X, y, groups=None)` on plain
arrays (X: [n, F] features of one layer of one example, y: 1 if that layer's top-1 token is
the gold token, groups: which example each row belongs to, rows of one example in layer
order), `predict(X)` -> 0/1, `decision_function(X)`. The engine calls `decide(step)` once per
checked layer for all active rows at once; stateless policies just `predict` the current
layer, the CRF reads the whole layer history.

Trained policies keep their learned parameters as plain arrays (`_arrays`) and run their
decision in numpy, so saving needs no pickle and a loaded policy is just numbers.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from .features import DEFAULT_FEATURES, PAPER_FEATURES, check_names


@dataclass
class Step:
    """What an exit policy sees at one checked layer, for the rows still active: built by the
    engine clients from live logits and by the offline replay from traces."""

    layer: int  # 1-based decoder layer just computed
    num_layers: int
    feature_names: tuple[str, ...]
    features: np.ndarray  # [A, F] at this layer
    history: np.ndarray  # [A, T, F] at every layer checked so far (this one last)
    top1: np.ndarray  # [A] top-1 token id at this layer
    rows: np.ndarray  # [A] index of each active row in the batch
    gold: np.ndarray | None = None  # [A] gold answer token ids, when known (oracle only)


class ExitPolicy(ClassifierMixin, BaseEstimator):
    """Base class. Subclasses set `features` and implement `decision_function`."""

    features: tuple[str, ...] = PAPER_FEATURES
    trainable = True

    def fit(self, X, y, groups=None):
        return self

    def decision_function(self, X) -> np.ndarray:
        raise NotImplementedError

    def predict(self, X) -> np.ndarray:
        return (self.decision_function(_as_2d(X, self.features)) > 0).astype(int)

    def decide(self, step) -> np.ndarray:
        return self.predict(step.features).astype(bool)

    def planned_checks(self, batch_size: int | None = None) -> tuple[int, ...] | None:
        """The check schedule for batches of `batch_size`; None: no plan, the engine checks at
        its own layers (every layer by default). `checks.PlannedPolicy` learns plans."""
        return None

    def cost_flops(self) -> float:
        """Approximate FLOPs of one decision for one row (charged by the true FLOPs ratio)."""
        return 0.0

    # serialisation hooks: learned state as arrays, rebuilt by `_load_arrays`. `_shapes`: the
    # arrays a fitted policy holds and their shapes, letters for lengths ("F": one per feature)
    _shapes: dict[str, str] = {}

    def _arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in self._shapes}

    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for k, v in checked_arrays(arrays, self._shapes, len(self.features)).items():
            setattr(self, k, v)


def checked_arrays(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, str], num_features: int):
    """`arrays` as a policy reads them back: exactly the names in `shapes`, each of its shape
    ("F": one per feature, a digit: that length, another letter: one length wherever it
    appears), numbers finite. A ValueError naming the first that is not: numpy would broadcast
    a wrong shape silently, and a byte array goes to native code."""
    if set(arrays) != set(shapes):
        raise ValueError(
            f"holds arrays {sorted(arrays) or 'none'}; this policy needs {sorted(shapes) or 'none'}"
        )
    sizes = {"F": num_features}
    for name, dims in shapes.items():
        a = np.asarray(arrays[name])
        want = [int(d) if d.isdigit() else sizes.setdefault(d, n) for d, n in zip(dims, a.shape)]
        if a.ndim != len(dims) or list(a.shape) != want:
            raise ValueError(
                f"array {name} has shape {list(a.shape)}, expected {dims} with F = {num_features} "
                "features (the header's feature list and the arrays do not belong together)"
            )
        kind, what = ("u", "bytes") if name.endswith("bytes_") else ("f", "floats")
        if a.dtype.kind != kind:
            raise ValueError(f"array {name} holds {a.dtype} values, expected {what}")
        if kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"array {name} holds values that are not finite numbers")
    return dict(arrays)


def planned_checks(policy, batch_size: int | None = None) -> tuple[int, ...] | None:
    """The check schedule `policy` runs with at this batch size (None: not planned, check
    everywhere): what its `planned_checks(batch_size)` method says, or, for an object without
    one (not an ExitPolicy), its `check_plans_` / `check_layers_` attributes. The one lookup of
    the engine and the offline replay."""
    method = getattr(policy, "planned_checks", None)
    if callable(method):
        return method(batch_size)
    plans = getattr(policy, "check_plans_", None)
    if plans and batch_size is not None:
        return schedule_for(plans, batch_size)
    learned = getattr(policy, "check_layers_", None)
    return None if learned is None else tuple(learned)


def schedule_for(
    plans: Mapping[int, Sequence[int]], batch_size: int | None = None
) -> tuple[int, ...] | None:
    """Of plans per batch size, the one for `batch_size`: the plan of the largest planned size
    not above it (or of the smallest planned size); without a batch size, the smallest size's
    (what offline replays use). None without plans."""
    if not plans:
        return None
    sizes = sorted(plans)
    if batch_size is None:
        return tuple(plans[sizes[0]])
    return tuple(plans[max((s for s in sizes if s <= batch_size), default=sizes[0])])


def _as_2d(X, features) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != len(features):
        raise ValueError(
            f"expected features of shape [n, {len(features)}] ({', '.join(features)}), "
            f"got {X.shape}"
        )
    return X


def _finite(name: str, value) -> float:
    """A parameter that must be a finite number (a NaN threshold never stops, nor errs)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_labels(y) -> np.ndarray:
    y = np.asarray(y).astype(int).ravel()
    classes = np.unique(y)
    if not set(classes) <= {0, 1}:
        raise ValueError(
            f"labels must be 0/1 (is this layer's top-1 the gold token?), got {classes}"
        )
    if len(classes) < 2:
        raise ValueError(
            f"every training label is {classes[0] if len(classes) else 'missing'}: the model is "
            + ("never" if len(classes) == 0 or classes[0] == 0 else "always")
            + " right at any layer on this data, so there is nothing to learn. Use more or "
            "other examples (few-shot prompts help), or a task the model can answer."
        )
    return y


# ----------------------------------------------------------------------------- reference policies
class NeverExit(ExitPolicy):
    """Full depth: the plain model's answer (and the engine's overhead baseline)."""

    trainable = False

    def __init__(self, features=()):
        self.features = features

    def planned_checks(self, batch_size=None):
        return ()  # it never stops, so it never pays for a check

    def decision_function(self, X):
        return -np.ones(len(X))

    def decide(self, step):
        return np.zeros(len(step.rows), dtype=bool)


class OracleExit(ExitPolicy):
    """Exit at the earliest checked layer whose top-1 is the gold token: a bound, needs labels."""

    trainable = False

    def __init__(self, features=()):
        self.features = features

    def decide(self, step):
        if step.gold is None:
            raise ValueError("the oracle policy needs the gold answer tokens (gold=...)")
        return step.top1 == step.gold


class GapThreshold(ExitPolicy):
    """The paper's GAP baseline: stop at the first layer whose gap >= threshold. No training."""

    trainable = False

    def __init__(self, threshold: float = 0.8):
        self.threshold = threshold
        self.features = ("gap",)

    def decision_function(self, X):
        return _as_2d(X, self.features)[:, 0] - _finite("threshold", self.threshold) + 1e-12

    def cost_flops(self):
        return 1.0


# ----------------------------------------------------------------------------- trained classifiers
def _mean_scale(X) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations, a constant column scaled by 1 (it stays 0)."""
    std = X.std(0)
    return X.mean(0), np.where(std > 1e-12, std, 1.0)


class _Standardized(ExitPolicy):
    """Trained policies standardise features with training mean / std (kept as arrays)."""

    def _set_scaler(self, X):
        self.mean_, self.scale_ = _mean_scale(X)

    def _scale(self, X):
        return (_as_2d(X, self.features) - self.mean_) / self.scale_


class SVMExit(_Standardized):
    """The paper's recommended classifier: `sklearn.svm.SVC` with default settings (RBF kernel).

    `max_train_rows` subsamples the (layer x example) rows: SVC training is quadratic in them.
    """

    def __init__(
        self,
        features=PAPER_FEATURES,
        C: float = 1.0,
        gamma="scale",
        max_train_rows: int = 6000,
        random_state: int = 0,
    ):
        self.features = features
        self.C = C
        self.gamma = gamma
        self.max_train_rows = max_train_rows
        self.random_state = random_state

    def fit(self, X, y, groups=None):
        from sklearn.svm import SVC

        if not isinstance(self.max_train_rows, (int, np.integer)) or self.max_train_rows < 2:
            raise ValueError(
                "max_train_rows must be a whole number of at least 2 (rows SVC trains on), "
                f"got {self.max_train_rows!r}"
            )
        X, y = _as_2d(X, check_names(self.features)), _check_labels(y)
        if len(X) > self.max_train_rows:
            keep = np.random.default_rng(self.random_state).choice(
                len(X), self.max_train_rows, replace=False
            )
            X, y = X[keep], y[keep]
            y = _check_labels(y)
        self._set_scaler(X)
        svc = SVC(C=self.C, gamma=self.gamma).fit(self._scale(X), y)
        self.support_vectors_ = svc.support_vectors_
        self.dual_coef_ = svc.dual_coef_[0]
        self.intercept_ = np.asarray(svc.intercept_, dtype=np.float64)
        self.gamma_ = np.asarray([svc._gamma])
        return self

    def decision_function(self, X):
        Z, sv = self._scale(X), self.support_vectors_
        # |z - s|^2 = |z|^2 - 2 z.s + |s|^2: an [n, n_SV] matrix, never the [n, n_SV, F] of
        # differences
        sq = (Z**2).sum(1)[:, None] - 2 * Z @ sv.T + (sv**2).sum(1)[None]
        return np.exp(-self.gamma_[0] * np.maximum(sq, 0.0)) @ self.dual_coef_ + self.intercept_[0]

    def cost_flops(self):
        return 4.0 * self.support_vectors_.size

    _shapes = {
        "mean_": "F",
        "scale_": "F",
        "support_vectors_": "NF",
        "dual_coef_": "N",
        "intercept_": "1",
        "gamma_": "1",
    }


class LogisticExit(_Standardized):
    """Logistic regression with a probability threshold: a knob that trades accuracy for layers.

    Cheap (one dot product per row) and calibrated, so `threshold` means "stop when P(the
    current top-1 is already the answer) >= threshold".
    """

    def __init__(self, features=PAPER_FEATURES, C: float = 1.0, threshold: float = 0.5):
        self.features = features
        self.C = C
        self.threshold = threshold

    def fit(self, X, y, groups=None):
        from sklearn.linear_model import LogisticRegression

        _finite("threshold", self.threshold)
        X, y = _as_2d(X, check_names(self.features)), _check_labels(y)
        self._set_scaler(X)
        lr = LogisticRegression(C=self.C, max_iter=1000).fit(self._scale(X), y)
        self.coef_, self.intercept_ = lr.coef_[0], np.asarray(lr.intercept_, dtype=np.float64)
        return self

    def predict_proba(self, X):
        p = 1.0 / (1.0 + np.exp(-(self._scale(X) @ self.coef_ + self.intercept_[0])))
        return np.stack([1 - p, p], axis=1)

    def decision_function(self, X):
        return self.predict_proba(X)[:, 1] - _finite("threshold", self.threshold) + 1e-12

    def cost_flops(self):
        return 2.0 * len(self.features) + 10

    _shapes = {"mean_": "F", "scale_": "F", "coef_": "F", "intercept_": "1"}


class LayerLogisticExit(LogisticExit):
    """One logistic regression per layer, with a probability threshold like `LogisticExit`.

    What a settled answer looks like changes with depth (gap and entropy drift layer by layer),
    which one linear model with depth as a feature cannot follow. On 872 Qwen2.5 SST-2 5-shot
    queries, checking every layer from 12 at threshold 0.9, per-layer models lose 0.5 points
    and get 70% of the oracle's layer saving, one shared model loses 2.6 points for 58%
    (bench/plan_quality.py).
    Needs `layer_frac` among its features to tell the layers apart; a layer whose labels are
    all equal gets that constant probability. Still one dot product per row."""

    _shapes = {"depths_": "K", "mean_": "KF", "scale_": "KF", "coef_": "KF", "intercept_": "K"}

    def __init__(self, features=DEFAULT_FEATURES, C: float = 1.0, threshold: float = 0.5):
        super().__init__(features, C, threshold)

    def fit(self, X, y, groups=None):
        from sklearn.linear_model import LogisticRegression

        features = check_names(self.features)
        _finite("threshold", self.threshold)
        if "layer_frac" not in features:
            raise ValueError(
                "LayerLogisticExit needs 'layer_frac' among its features to tell layers apart; "
                f"got {features}"
            )
        X, y = _as_2d(X, features), _check_labels(y)
        depth = np.round(X[:, features.index("layer_frac")], 6)
        self.depths_ = np.unique(depth)
        K, F = len(self.depths_), len(features)
        self.mean_, self.scale_, self.coef_, self.intercept_ = (
            np.zeros((K, F)),
            np.ones((K, F)),
            np.zeros((K, F)),
            np.zeros(K),
        )
        for k, d in enumerate(self.depths_):
            Xk, yk = X[depth == d], y[depth == d]
            self.mean_[k], self.scale_[k] = _mean_scale(Xk)
            if 0 < yk.sum() < len(yk):
                lr = LogisticRegression(C=self.C, max_iter=1000).fit(
                    (Xk - self.mean_[k]) / self.scale_[k], yk
                )
                self.coef_[k], self.intercept_[k] = lr.coef_[0], lr.intercept_[0]
            else:  # nothing to separate at this depth: its base rate, kept off 0 and 1
                rate = np.clip(yk.mean(), 1e-4, 1 - 1e-4)
                self.intercept_[k] = np.log(rate / (1 - rate))
        return self

    def predict_proba(self, X):
        X = _as_2d(X, self.features)
        depth = X[:, self.features.index("layer_frac")]
        k = np.abs(depth[:, None] - self.depths_[None]).argmin(1)  # the nearest fitted layer
        z = (((X - self.mean_[k]) / self.scale_[k]) * self.coef_[k]).sum(1) + self.intercept_[k]
        p = 1.0 / (1.0 + np.exp(-z))
        return np.stack([1 - p, p], axis=1)


class CRFExit(ExitPolicy):
    """Linear-chain CRF over the layer sequence of one example (sklearn-crfsuite, defaults).

    At inference the CRF labels the prefix of layers seen so far and the row stops when the
    label of the current layer is 1.
    """

    def __init__(self, features=PAPER_FEATURES):
        self.features = features

    @staticmethod
    def _items(seq, names):
        return [{"bias": 1.0, **{n: float(v) for n, v in zip(names, row)}} for row in seq]

    def fit(self, X, y, groups=None):
        import sklearn_crfsuite

        features = check_names(self.features)
        X, y = _as_2d(X, features), _check_labels(y)
        if groups is None:
            raise ValueError(
                "CRFExit.fit needs groups= (the example id of each row, layers in order)"
            )
        groups = np.asarray(groups)
        seqs, labels = [], []
        for g in dict.fromkeys(groups.tolist()):
            idx = np.flatnonzero(groups == g)
            seqs.append(self._items(X[idx], features))
            labels.append([str(v) for v in y[idx]])
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.crfsuite")
            sklearn_crfsuite.CRF(model_filename=path).fit(seqs, labels)
            with open(path, "rb") as f:
                self.model_bytes_ = np.frombuffer(f.read(), dtype=np.uint8).copy()
        self._tagger = None
        return self

    def __getstate__(self):  # copy / pickle the model bytes, not the open C tagger
        return {k: v for k, v in self.__dict__.items() if k not in ("_tagger", "_buffer")}

    @property
    def tagger(self):
        import pycrfsuite

        if getattr(self, "_tagger", None) is None:
            # crfsuite reads the model in place, without a copy: the buffer must outlive the tagger
            self._buffer = self.model_bytes_.tobytes()
            self._tagger = pycrfsuite.Tagger()
            self._tagger.open_inmemory(self._buffer)
        return self._tagger

    def predict_sequence(self, seq) -> np.ndarray:
        """Labels for one example's layer sequence [T, F]."""
        return np.asarray([int(t) for t in self.tagger.tag(self._items(seq, self.features))])

    def decision_function(self, X):
        # Without a history each row is a sequence of one: the best a stateless call can do.
        X = _as_2d(X, self.features)
        return np.array([self.predict_sequence(row[None])[0] for row in X]) - 0.5

    def decide(self, step):
        return np.array([self.predict_sequence(h)[-1] == 1 for h in step.history], dtype=bool)

    def cost_flops(self):
        return 20.0 * (len(self.features) + 1)

    _shapes = {"model_bytes_": "N"}

    def _load_arrays(self, arrays):
        super()._load_arrays(arrays)
        check_crf_model(self.model_bytes_)
        self._tagger = None


def check_crf_model(data: np.ndarray) -> None:
    """Refuse bytes that are not a whole crfsuite model: crfsuite reads them in place and
    trusts their offsets (a damaged model crashes the process). The header is magic "lCRF",
    the model's size, type "FOMC", then counts and offsets, all little-endian uint32. A model
    whose checksum was verified passes; this catches what a checksum cannot, bytes that were
    never a model."""
    raw = np.asarray(data, dtype=np.uint8).tobytes()
    if len(raw) < 48 or raw[:4] != b"lCRF" or raw[8:12] != b"FOMC":
        raise ValueError("array model_bytes_ is not a crfsuite model (no lCRF / FOMC header)")
    size, *offsets = np.frombuffer(raw[4:8] + raw[28:48], dtype="<u4").tolist()
    if size != len(raw) or not all(48 <= o < size for o in offsets):
        raise ValueError(
            f"array model_bytes_ is a damaged crfsuite model (it says {size} bytes, holds "
            f"{len(raw)}, or points outside itself)"
        )


def standard_policies() -> dict[str, ExitPolicy]:
    """The paper's three (GAP 0.8, CRF, SVM on gap + top_prob), our logistic, and the SVM that
    also knows its depth (l/L): on models whose early layers are confidently wrong it can learn
    "not this early", which the paper's features cannot express."""
    base = PAPER_FEATURES
    return {
        "gap": GapThreshold(0.8),
        "crf": CRFExit(features=base),
        "svm": SVMExit(features=base),
        "logistic": LogisticExit(features=base),
        "svm+layer": SVMExit(features=base + ("layer_frac",)),
    }


POLICIES: dict[str, type[ExitPolicy]] = {
    "never": NeverExit,
    "oracle": OracleExit,
    "gap": GapThreshold,
    "svm": SVMExit,
    "crf": CRFExit,
    "logistic": LogisticExit,
    "layer-logistic": LayerLogisticExit,
}


def make_policy(name: str, **params) -> ExitPolicy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown policy {name!r}; choose from {', '.join(POLICIES)} or a saved policy file"
        ) from None
    return cls(**params)
