"""Hugging Face Hub: download rules by repo id and publish them.

Only ``config.json`` and ``model.safetensors`` are fetched; nothing downloaded is executed.
``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and the usual huggingface_hub settings apply.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from learned_optim.rules.base import UpdateRule
from learned_optim.weights import CONFIG_NAME, WEIGHTS_NAME, PretrainedError, load_from_files, save_pretrained


def download_rule(
    repo_id: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> UpdateRule:
    """Fetch ``config.json`` + ``model.safetensors`` of ``repo_id`` and build the rule."""
    paths = {}
    for filename in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            paths[filename] = hf_hub_download(
                repo_id=repo_id, filename=filename, revision=revision, cache_dir=cache_dir
            )
        except RepositoryNotFoundError:
            raise PretrainedError(
                f"Hub repository {repo_id!r} does not exist or is not accessible (is it private? "
                "log in with `hf auth login`)"
            ) from None
        except RevisionNotFoundError:
            raise PretrainedError(f"Hub repository {repo_id!r} has no revision {revision!r}") from None
        except EntryNotFoundError:
            raise PretrainedError(
                f"Hub repository {repo_id!r} (revision {revision or 'main'}) has no {filename}; "
                "is it a learned_optim rule?"
            ) from None
        except LocalEntryNotFoundError as err:
            raise PretrainedError(
                f"{filename} of Hub repository {repo_id!r} is not in the local cache and cannot be "
                f"downloaded (offline mode or no network): {err}"
            ) from None
        except HfHubHTTPError as err:
            raise PretrainedError(f"downloading {filename} of {repo_id!r} failed: {err}") from None
    return load_from_files(paths[CONFIG_NAME], paths[WEIGHTS_NAME])


def push_to_hub(
    rule: UpdateRule,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload learned_optim update rule",
    model_card: str | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload the rule's files; returns the commit URL."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(rule, tmp, model_card=model_card)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(Path(tmp)),
            revision=revision,
            commit_message=commit_message,
        )
    return str(getattr(info, "commit_url", info))
