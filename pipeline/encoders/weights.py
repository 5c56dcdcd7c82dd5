"""Where a zoo model's weights are found: offline first, never a silent download.

In this order:

1. the file given with ``--encoder-weights``;
2. the user's weights map: a YAML file of ``key: path`` lines (zoo keys or aliases; a
   relative path is read from the map's folder), given with ``--weights-map`` (the
   ``weights_map`` argument of :func:`pipeline.encoders.load_encoder`) or named by the
   ``CPATH_WEIGHTS`` environment variable, so that one map serves every command;
3. the Hugging Face cache (``HF_HUB_CACHE`` or ``HF_HOME``, as ``huggingface_hub`` reads
   them), for models published on the Hub: ``model.safetensors`` or ``pytorch_model.bin``
   of the repo's cached snapshot, looked up without any network access (for
   ``transformers`` models the snapshot folder is read, with its ``config.json``);
4. only when the user allows it with ``CPATH_ALLOW_DOWNLOAD=1`` and ``HF_HUB_OFFLINE`` is
   not set: a download from the Hub into that cache (with the user's Hub login, for gated
   repos).

Nothing is downloaded otherwise: where no place has the file, the error names the repo,
whether it is gated, the file to fetch and where to put it.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from pipeline.encoders.zoo import ModelSpec
from pipeline.encoders.zoo import spec as zoo_spec
from pipeline.errors import ConfigError

WEIGHTS_ENV = "CPATH_WEIGHTS"
DOWNLOAD_ENV = "CPATH_ALLOW_DOWNLOAD"
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def read_weights_map(path: str | os.PathLike) -> dict[str, Path]:
    """``{zoo key: weights file}`` of a YAML weights map (aliases resolved to keys)."""
    path = Path(path)
    try:
        entries = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"weights map {path}: cannot read it ({exc})") from exc
    if not isinstance(entries, dict):
        raise ConfigError(f"weights map {path}: expected 'key: path' lines")
    out = {}
    for name, file in entries.items():
        model = zoo_spec(str(name))
        if model is None:
            raise ConfigError(
                f"weights map {path}: '{name}' is no zoo key (`cpath encoders` lists them)"
            )
        file = Path(os.path.expanduser(str(file)))
        out[model.key] = file if file.is_absolute() else path.parent / file
    return out


def hub_repo(model: ModelSpec) -> str | None:
    """The Hugging Face repo id of a spec's hub id, None for weights published elsewhere."""
    hub = model.hub_id
    if hub.startswith("hf-hub:"):
        return hub[len("hf-hub:") :]
    if "/" in hub and " " not in hub and not hub.startswith(("http", "/")):
        return hub
    return None


def cached_hub_file(repo: str, revision: str | None = None) -> Path | None:
    """The first of :data:`HUB_FILES` in the Hugging Face cache's snapshot of ``repo`` at
    ``revision`` (default: main)."""
    from huggingface_hub import try_to_load_from_cache

    cache = os.environ.get("HF_HUB_CACHE")  # read now: huggingface_hub reads it at import
    for name in HUB_FILES:
        found = try_to_load_from_cache(repo, name, cache_dir=cache, revision=revision)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def download_hub_file(repo: str, folder: bool = False, revision: str | None = None) -> Path:
    """The first of :data:`HUB_FILES` that ``repo`` has, downloaded into the Hugging Face
    cache (with ``folder``, for ``transformers`` models: the repo's config, code and weights
    files too, and the path is that folder); a :class:`ConfigError` saying why when the Hub
    refuses or cannot be reached."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HfHubHTTPError

    try:
        if folder:
            patterns = ["*.json", "*.py", "*.safetensors", "*.bin"]
            return Path(snapshot_download(repo, allow_patterns=patterns, revision=revision))
        for name in HUB_FILES:
            try:
                return Path(hf_hub_download(repo, name, revision=revision))
            except EntryNotFoundError:
                continue
    except GatedRepoError as exc:
        raise ConfigError(
            f"{repo} is gated: request access on its Hub page, then log in "
            f"(`huggingface-cli login`) and run again ({type(exc).__name__})"
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ConfigError(f"cannot download {repo} from the Hub: {exc}") from exc
    raise ConfigError(f"{repo} has neither {' nor '.join(HUB_FILES)} on the Hub")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def local_weights(
    model: ModelSpec, weights_map: str | os.PathLike | None = None
) -> tuple[Path | None, list[str]]:
    """``(path, where it looked)``: the weights of ``model`` in the weights map or the
    Hugging Face cache, without any network access (path None where neither has them)."""
    looked = []
    map_path = weights_map or os.environ.get(WEIGHTS_ENV)
    if map_path:
        entries = read_weights_map(map_path)
        if model.key in entries:
            file = entries[model.key]
            if not file.exists():
                raise ConfigError(
                    f"weights map {map_path}: {model.key} -> {file}, which does not exist; "
                    "fix the path (no other place is tried for a mapped key)"
                )
            return file, looked
        looked.append(f"weights map {map_path}: no '{model.key}' line")
    else:
        looked.append(f"weights map: none (neither --weights-map nor ${WEIGHTS_ENV})")
    repo = hub_repo(model)
    if repo is not None:
        file = cached_hub_file(repo, model.revision)
        if file is not None:
            return file, looked
        looked.append(f"Hugging Face cache: no {' or '.join(HUB_FILES)} of {repo}")
    return None, looked


def find_weights(
    model: ModelSpec,
    weights: str | os.PathLike | None = None,
    weights_map: str | os.PathLike | None = None,
) -> Path:
    """The local weights of ``model`` (a file, or a ``transformers`` folder; see the module
    docstring for the order), or a :class:`ConfigError` saying where each place was looked
    and what to do."""
    if weights:
        return Path(weights)
    found, looked = local_weights(model, weights_map)
    if found is not None:
        return found
    looked.insert(0, "--encoder-weights: not given")
    repo = hub_repo(model)
    if repo is not None:
        if os.environ.get(DOWNLOAD_ENV, "").strip() != "1":
            looked.append(f"download: not allowed (${DOWNLOAD_ENV}=1 allows it)")
        elif _offline():
            looked.append("download: not tried, HF_HUB_OFFLINE is set")
        else:
            transformers = model.loader == "transformers"
            return download_hub_file(repo, folder=transformers, revision=model.revision)
    gated = {
        True: "gated: request access on its page first",
        False: "not gated",
        None: "gating not confirmed: see the model card",
    }[model.gated]
    fetch = (
        f"`huggingface-cli download {repo} {HUB_FILES[0]}` (or {HUB_FILES[1]}) fills the cache"
        if repo
        else f"download its weights from {model.hub_id}"
    )
    raise ConfigError(
        f"{model.key} needs its weights ({model.hub_id}; {gated}; licence: {model.licence}). "
        f"Looked in: {'; '.join(looked)}. {fetch[0].upper()}{fetch[1:]}, or pass "
        f"--encoder-weights FILE, or add '{model.key}: /path/to/file' to a weights map. "
        "Nothing is downloaded, and there is no random-init fallback for a zoo encoder."
    )
