"""The layer stepper: the model's own forward, run only for the rows still going.

Every engine client (prefill scoring, token-by-token generation) runs a batch through the
Hugging Face forward itself, so masks, rotary tables and every architecture detail are the
model's own, computed once. The stepper hooks the decoder layers:
- after each layer the client sees the active rows' hidden states and says which rows keep
  going; the others are *removed* from the hidden state the next layer receives, so later
  layers really compute less;
- before each layer the per-row arguments (attention mask, position ids, rotary tables, a KV
  cache) are cut to the rows still going, by argument name; an argument the stepper does not
  know that looks per-row is an error, not a guess;
- once no row is left, or after the last layer asked for, the forward ends: the remaining
  layers and the full-sequence final norm never run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .arch import ModelParts, context_length

# Arguments a decoder layer receives, by the name its forward gives them.
CACHE_ARGS = frozenset({"cache", "past_key_values", "past_key_value", "layer_past"})
ROW_ARGS = frozenset(
    {
        "attention_mask",
        "position_ids",
        "position_embeddings",  # (cos, sin), each [B, S, D] or [1, S, D]
        "position_embeddings_global",
        "position_embeddings_local",
        "encoder_hidden_states",
        "encoder_attention_mask",
        "token_type_ids",
    }
)
SHARED_ARGS = frozenset(
    {
        "cache_position",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "head_mask",
        "layer_head_mask",
    }
)


class UnknownRowArgument(ValueError):
    """A decoder layer got a per-row argument the stepper cannot cut to the active rows."""


@dataclass
class LayerOutput:
    """What a client sees after one decoder layer, for the rows still active."""

    layer: int  # 1-based
    hidden: torch.Tensor  # [A, S, H] the layer's output
    before: torch.Tensor  # [A, H] the layer's input at the last position
    taps: dict[str, torch.Tensor]  # [A, H] last-position outputs of the tapped sub-modules
    rows: torch.Tensor  # [A] (cpu) index of each active row in the batch


# keep mask over the active rows (True: runs the next layer), or None: all keep going
Client = Callable[[LayerOutput], "torch.Tensor | None"]


class _End(Exception):
    """Raised from a hook to end the forward pass early."""


@dataclass
class _Rows:
    """The rows of one forward still running, and their arguments cut to them."""

    size: int
    active: torch.Tensor
    cut: dict = field(default_factory=dict)  # (name, id) -> (full value, cut value)

    @property
    def all(self) -> bool:
        return len(self.active) == self.size

    def keep(self, mask: torch.Tensor) -> None:
        self.active = self.active[mask.cpu()]
        self.cut.clear()


class LayerStepper:
    """Runs `parts.base`'s forward with per-row early exit.

    `taps`: sub-module roles of each decoder layer ("attn", "mlp": names in `ArchSpec`) whose
    last-position output the client receives in `LayerOutput.taps`."""

    def __init__(self, parts: ModelParts, taps: Iterable[str] = ()):
        self.parts = parts
        self.taps = tuple(taps)
        self._names = _positional_names(parts.layers[0]) if len(parts.layers) else ()
        self._seen: dict[str, bool] = {}  # what the layers' outputs looked like, across runs

    @property
    def num_layers(self) -> int:
        return self.parts.num_layers

    def run(
        self,
        inputs: dict,
        client: Client,
        *,
        until: int | None = None,
        start: int = 1,
        start_hidden: torch.Tensor | None = None,
        watch: Iterable[int] | None = None,
        **forward_kw,
    ):
        """One forward of `inputs` (input_ids, attention_mask, position_ids, ...), calling
        `client` after every layer from `start` up to `until` (default: the last), where it
        ends. With `start` > 1, the layers before it are skipped (their cache untouched) and
        `start_hidden` [B, S, H] enters layer `start`: a self-speculative draft computed those
        layers already. `watch`: only these layers (and `until`) call the client, and no
        layer below the first of them is hooked: a decode step's hooks cost time per layer."""
        until = self.num_layers if until is None else until
        watched = set(range(start, until + 1)) if watch is None else {*watch, until}
        if start > 1 and start_hidden is None:
            raise ValueError("start_hidden is needed to start past layer 1")
        batch = next(v for v in inputs.values() if torch.is_tensor(v)).shape[0]
        rows = _Rows(batch, torch.arange(batch))
        state = {"before": None, "shape": None, "taps": {}, "enter": {start: start_hidden}}
        state["seen"] = self._seen
        handles = []
        try:
            for layer in self.parts.layers[: start - 1]:
                layer.forward = _skipped(self._tuple_output)
            first = start if start > 1 else min(watched)  # a start layer takes start_hidden
            for i, layer in enumerate(self.parts.layers[first - 1 : until], start=first - 1):
                handles.append(
                    layer.register_forward_pre_hook(
                        self._pre_hook(i + 1, rows, state), with_kwargs=True
                    )
                )
                if i + 1 in watched:
                    post = _post_hook(i + 1, rows, state, client, until)
                    handles.append(layer.register_forward_hook(post))
                for tap in self.taps:
                    sub = getattr(layer, getattr(self.parts.spec, tap))
                    handles.append(sub.register_forward_hook(_tap_hook(tap, state)))
            self.parts.base(**inputs, **forward_kw)
        except _End:
            pass
        finally:
            for h in handles:
                h.remove()
            for layer in self.parts.layers[: start - 1]:
                del layer.forward  # the class's own forward again

    def _pre_hook(self, layer: int, rows: _Rows, state: dict):
        def hook(module, args, kwargs):
            entering = state["enter"].get(layer)
            if entering is not None:
                args, kwargs = _with_hidden(args, kwargs, entering)
            hidden = args[0] if args else kwargs["hidden_states"]
            state["shape"], state["before"] = hidden.shape[:2], hidden[:, -1]
            if rows.all:
                return None if entering is None else (args, kwargs)
            cut = tuple(self._cut(rows, name, v) for name, v in zip(self._names, args[1:]))
            return (args[:1] + cut, {k: self._cut(rows, k, v) for k, v in kwargs.items()})

        return hook

    @property
    def _tuple_output(self) -> bool:
        """Whether decoder layers return (hidden, ...) rather than the hidden state alone
        (older transformers; what a skipped layer must return too)."""
        return self._seen.get("tuple_output", False)

    # ------------------------------------------------------------- per-row arguments
    def _cut(self, rows: _Rows, name: str | None, value):
        if value is None or name in SHARED_ARGS:
            return value
        if name in CACHE_ARGS:
            return _RowCache(value, rows.active.clone(), rows.size)
        if name in ROW_ARGS:
            return _map_tensors(value, lambda t: _rows_of(rows, name, t))
        if _has_rows(value, rows.size):
            raise UnknownRowArgument(
                f"{type(self.parts.layers[0]).__name__} got an argument {name!r} with one entry "
                f"per row; adainfer does not know how to cut it to the rows still running. "
                f"Known per-row arguments: {', '.join(sorted(ROW_ARGS | CACHE_ARGS))}."
            )
        return value


def _post_hook(layer: int, rows: _Rows, state: dict, client: Client, until: int):
    def hook(module, args, output):
        state["seen"]["tuple_output"] = not torch.is_tensor(output)
        hidden = output if torch.is_tensor(output) else output[0]
        seen = LayerOutput(layer, hidden, state["before"], dict(state["taps"]), rows.active)
        keep = client(seen)
        if keep is None or bool(keep.all()):
            if layer == until:
                raise _End
            return None
        rows.keep(keep)
        if len(rows.active) == 0 or layer == until:
            raise _End
        hidden = hidden[keep.to(hidden.device)]
        return hidden if torch.is_tensor(output) else (hidden, *output[1:])

    return hook


def _skipped(tuple_output: bool):
    """A decoder layer's forward that passes the hidden state through: the layer is not run."""

    def forward(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if tuple_output else hidden

    return forward


def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _rows_of(rows: _Rows, name: str, t: torch.Tensor) -> torch.Tensor:
    """The active rows of a per-row tensor (dim 0 == batch; a dim 0 of 1 broadcasts), cut once
    per set of rows. The full tensor stays in the entry, so its id is not reused meanwhile."""
    if t.ndim == 0 or t.shape[0] != rows.size or rows.size == 1:
        return t
    key = (name, id(t))
    if key not in rows.cut:
        rows.cut[key] = (t, t.index_select(0, rows.active.to(t.device)))
    return rows.cut[key][1]


def _map_tensors(value, fn):
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _has_rows(value, size: int) -> bool:
    if torch.is_tensor(value):
        return value.ndim >= 1 and value.shape[0] == size
    if isinstance(value, (tuple, list)):
        return any(_has_rows(v, size) for v in value)
    if isinstance(value, dict):
        return any(_has_rows(v, size) for v in value.values())
    return False


def _positional_names(layer) -> tuple[str, ...]:
    """Names of a decoder layer's positional parameters after the hidden state (GPT-2's block
    takes the cache and the mask positionally)."""
    params = list(inspect.signature(layer.forward).parameters.values())
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params[1:] if p.kind in kinds)


def _tap_hook(name: str, state: dict):
    def hook(module, args, output):
        out = output if torch.is_tensor(output) else output[0]
        if out.ndim == 2:  # OPT runs its MLP on flattened [B*S, H] tokens
            out = out.view(*state["shape"], -1)
        state["taps"][name] = out[:, -1]

    return hook


class _RowCache:
    """A KV cache as the active rows see it.

    A layer's `update` gets keys and values for the active rows only; they are written into
    the full cache's rows, the rows that left get zeros at those positions (a hole that the
    client fills, e.g. by state propagation, or crops), and the active rows' keys and values
    are returned. Everything else is the wrapped cache's own."""

    def __init__(self, cache, active: torch.Tensor, size: int):
        self._cache, self._active, self._size = cache, active, size

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        rows = self._active.to(key_states.device)
        full = [s.new_zeros((self._size, *s.shape[1:])) for s in (key_states, value_states)]
        full[0][rows], full[1][rows] = key_states, value_states
        keys, values = self._cache.update(full[0], full[1], layer_idx, *args, **kwargs)
        return keys[rows], values[rows]

    def __getattr__(self, name):
        return getattr(self._cache, name)


def encode(model, tokenizer, prompts) -> dict[str, torch.Tensor]:
    """A batch of prompts as every engine client feeds it: left-padded, on the model's device,
    with position ids from the mask as `generate` computes them (left padding must not shift
    absolute positions, GPT-2 and OPT, and each row then equals itself run alone). Prompts are
    strings, or token-id lists already tokenized."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    if not len(prompts):
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if not (p.strip() if isinstance(p, str) else len(p)):
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    if all(isinstance(p, str) for p in prompts):
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
    else:
        enc = _left_padded(prompts, tokenizer.pad_token_id)
    lengths = enc["attention_mask"].sum(-1)
    limit = context_length(model.config)
    if limit is not None and int(lengths.max()) > limit:
        i = int(lengths.argmax())
        raise ValueError(
            f"prompt {i} has {int(lengths[i])} tokens but the model's context is {limit}; "
            "shorten it or use fewer demonstrations"
        )
    device = model.get_input_embeddings().weight.device
    mask = enc["attention_mask"].to(device)
    return {
        "input_ids": enc["input_ids"].to(device),
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
    }


def teacher_forced(model, tokenizer, prompts: Sequence[str], generated: Sequence[Sequence[int]]):
    """Model inputs that read each row's generated tokens after its prompt, in one forward,
    and the number of positions, at the end, that predict them: generated token t is
    predicted at input position P - 1 + t. What follows a shorter row's end is padding that no
    earlier position sees."""
    width = max(len(g) for g in generated)
    if width == 0:
        raise ValueError("no generated token to read")
    enc = encode(model, tokenizer, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    gen = torch.full((len(prompts), width - 1), pad, dtype=torch.long)
    for b, g in enumerate(generated):
        fed = list(g)[:-1]  # a row's last token is only predicted, never read
        gen[b, : len(fed)] = torch.as_tensor(fed, dtype=torch.long)
    gen = gen.to(enc["input_ids"].device)
    ids = torch.cat([enc["input_ids"], gen], dim=1)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(gen)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}, width


def _left_padded(ids, pad_id: int) -> dict[str, torch.Tensor]:
    """Token-id rows padded on the left, as the tokenizer pads text."""
    if any(isinstance(p, str) for p in ids):
        raise TypeError("prompts must be all strings or all token-id lists, not a mix")
    width = max(len(p) for p in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, p in enumerate(ids):
        input_ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return {"input_ids": input_ids, "attention_mask": mask}
