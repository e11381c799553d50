"""MODEL as a local folder or a Hugging Face Hub id (`OpenGVLab/InternVL3-1B`): a Hub id becomes a snapshot in the
standard Hub cache, downloaded by `huggingface_hub` (only weights, config and tokenizer files, with a progress bar)
and honouring HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE / HF_TOKEN as every Hugging Face tool does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError

# What loading needs: safetensors weights (single, sharded, LoRA adapters), configs, tokenizer files. Remote code,
# pickle weights and other formats (.bin, .pt, .gguf) are never fetched.
ALLOW_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "config.json", "adapter_config.json", "generation_config.json",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja",
]  # fmt: skip
# owner/name as the Hub spells repository ids (huggingface_hub's validate_repo_id, one slash)
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
_TRUE = {"1", "true", "yes", "on"}


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether `name` can only mean a Hub repository: of the form owner/name and not an existing path."""
    text = os.fspath(name)
    return (isinstance(name, str) and _REPO_ID.fullmatch(text) is not None and ".." not in text
            and not text.endswith(".") and not os.path.exists(text))  # fmt: skip


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, also when it was set after huggingface_hub was imported."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_cache(cache_dir: str | os.PathLike | None = None) -> str:
    from huggingface_hub import constants

    return str(cache_dir or os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def resolve_model(model: str | os.PathLike, revision: str | None = None,
                  cache_dir: str | os.PathLike | None = None) -> Path:  # fmt: skip
    """The local folder MODEL names: the folder itself, or the cached (downloaded if needed) snapshot of a Hub
    id at `revision` (a branch, tag or commit; default: main). Every failure is one `CheckpointError` line that
    names MODEL and says what to do."""
    path = Path(model)
    if path.is_dir():
        if revision is not None:
            raise CheckpointError(f"{model}: a local folder has no revisions; --revision is for Hub model ids")
        return path
    if not is_hub_id(model):
        what = "not a folder" if path.exists() else "no such model folder"
        raise CheckpointError(f"{model}: {what}")
    return _snapshot(str(model), revision, cache_dir)


def _snapshot(repo_id: str, revision: str | None, cache_dir) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (  # where 0.x and later versions alike export them
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = hub_offline()
    at = f" at revision {revision!r}" if revision else ""
    where = f"{repo_id}: no such model folder, and the Hub model {repo_id}{at}"
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS,
                                   local_files_only=offline)  # fmt: skip
    except LocalEntryNotFoundError:
        cache = hub_cache(cache_dir)
        if offline:
            raise CheckpointError(f"{where} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: "
                                  f"download it once with network access, or give a local folder") from None
        raise CheckpointError(f"{where} is not in the Hugging Face cache ({cache}) and the Hub cannot be reached: "
                              f"check the network (or HF_ENDPOINT), or give a local folder") from None
    except GatedRepoError:
        raise CheckpointError(f"{where} is gated: accept its terms on huggingface.co, then log in "
                              f"(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{where} does not exist (or is private: log in with `hf auth login` or set "
                              f"HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo_id}: the Hub model has no revision {revision!r}") from None
    except (HfHubHTTPError, OSError) as e:  # HTTP errors, a full disk, an unwritable cache
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{repo_id}: download from the Hugging Face Hub failed ({first})") from None
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{repo_id}: the Hub model{at} has no safetensors weights (only those are read; "
                              f"convert .bin weights to safetensors first)")  # fmt: skip
    return folder
