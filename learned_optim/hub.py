"""Hugging Face Hub: download rules by repo id and publish them.

Only ``config.json`` and ``model.safetensors`` are fetched; nothing downloaded is executed.
``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and the usual huggingface_hub settings apply.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from learned_optim.rules.base import UpdateRule
from learned_optim.weights import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    PretrainedError,
    check_download_flags,
    load_from_files,
    save_pretrained,
)

__all__ = [
    "download_rule",
    "push_to_hub",
]

# A full commit id: a revision that names a commit, not a branch one could create.
_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


def _check_revision(revision: object) -> None:
    """``PretrainedError`` unless ``revision`` is None or could name a git branch, tag or commit:
    the cache keeps a file named after it, so "../" would write outside the cache."""
    if revision is None:
        return
    if not isinstance(revision, str) or not revision:
        raise PretrainedError(f"revision must be a branch, tag or commit (a non-empty string), got {revision!r}")
    parts = revision.split("/")
    if revision.startswith("/") or "\\" in revision or "\0" in revision or ".." in parts or "." in parts:
        raise PretrainedError(f"revision {revision!r} is not a branch, tag or commit name (no '..', '.', leading '/')")


def download_rule(
    repo_id: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> UpdateRule:
    """Fetch ``config.json`` + ``model.safetensors`` of ``repo_id`` and build the rule.

    ``token``: for private repos (default: the logged-in token or ``HF_TOKEN``).
    ``force_download``: fetch the files again even if they are cached (e.g. after a
    corrupted download). ``local_files_only``: use the cache only, never the network (as
    ``HF_HUB_OFFLINE=1`` does for this call alone).
    Every failure (no such repo, revision or file, offline with a cold cache, an invalid
    repo id, a cache folder that cannot be written, malformed files) is a
    :class:`PretrainedError` naming the repo.
    """
    check_download_flags(force_download, local_files_only)
    _check_revision(revision)
    if isinstance(cache_dir, str) and not cache_dir:
        raise PretrainedError("cache_dir is an empty string: pass a folder, or None for the Hugging Face cache")
    where = f"Hub repository {repo_id!r} (revision {revision or constants.DEFAULT_REVISION!r})"
    if force_download and constants.HF_HUB_OFFLINE:  # the same flag hf_hub_download obeys
        raise PretrainedError(
            f"{where}: force_download=True needs the network, but HF_HUB_OFFLINE is set; "
            "unset one of them (without force_download the cached files are used)"
        )
    paths = {}
    pinned = revision
    for filename in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            paths[filename] = hf_hub_download(
                repo_id=repo_id,
                filename=filename,
                revision=pinned,
                cache_dir=cache_dir,
                token=token,
                force_download=force_download,
                local_files_only=local_files_only,
            )
            # The weights come from the commit the config came from (its snapshot folder):
            # a push to the branch between the two downloads must not pair old and new files.
            commit = Path(paths[filename]).parent.name
            if _COMMIT_HASH.fullmatch(commit):
                pinned = commit
        except HFValidationError as err:
            raise PretrainedError(f"{repo_id!r} is not a valid Hub repo id: {err}") from None
        except RepositoryNotFoundError:
            raise PretrainedError(
                f"Hub repository {repo_id!r} does not exist or is not accessible (is it private? "
                "log in with `hf auth login`)"
            ) from None
        except RevisionNotFoundError:
            raise PretrainedError(f"Hub repository {repo_id!r} has no revision {revision!r}") from None
        # LocalEntryNotFoundError subclasses EntryNotFoundError: it must come first, or a cold
        # cache while offline would read as "the repo has no config.json".
        except LocalEntryNotFoundError as err:
            if local_files_only:
                raise PretrainedError(
                    f"{where}: {filename} is not in the local cache and local_files_only=True; "
                    "download it once without local_files_only"
                ) from None
            if constants.HF_HUB_OFFLINE:  # the same flag hf_hub_download obeys
                raise PretrainedError(
                    f"{where}: {filename} is not in the local cache and HF_HUB_OFFLINE is set; "
                    "download it once online (or unset HF_HUB_OFFLINE)"
                ) from None
            raise PretrainedError(
                f"{where}: {filename} is not in the local cache and the Hub cannot be reached: {err}"
            ) from None
        except EntryNotFoundError:
            raise PretrainedError(f"{where} has no {filename}; is it a learned_optim rule?") from None
        except HfHubHTTPError as err:
            raise PretrainedError(f"{where}: downloading {filename} failed: {err}") from None
        except ValueError as err:
            # hf_hub_download's own (force_download with the Hub unreachable: "Force download
            # failed due to the above error"); the error above is the one that says why.
            cause = err.__cause__ or err.__context__
            why = f"{err} ({type(cause).__name__}: {cause})" if cause is not None else str(err)
            raise PretrainedError(f"{where}: downloading {filename} failed: {why}") from None
        # Last: huggingface_hub's HTTP errors are OSErrors too. What is left is mostly the cache
        # (read-only, full, a path under a file), which would otherwise leak a raw traceback.
        except OSError as err:
            if not _is_cache_error(err):
                raise PretrainedError(f"{where}: downloading {filename} failed: {err}") from None
            cache = cache_dir if cache_dir is not None else constants.HF_HUB_CACHE
            raise PretrainedError(
                f"{where}: {filename} cannot be stored in the Hugging Face cache {str(cache)!r} ({err}); "
                "make it writable, or set HF_HOME / HF_HUB_CACHE (or cache_dir=) to a writable folder"
            ) from None
    try:
        return load_from_files(paths[CONFIG_NAME], paths[WEIGHTS_NAME])
    except PretrainedError as err:
        # The cache path in the message hides which repo is at fault.
        raise PretrainedError(f"{where}: {err}") from None


def _is_cache_error(err: OSError) -> bool:
    """An error writing files (the cache), as opposed to one of the network."""
    if isinstance(err, (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)):
        return True
    return err.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT)


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
    """Create ``repo_id`` (and branch ``revision``) if needed and upload the rule's files.

    ``private`` applies when the repo is created; an existing repo keeps its visibility
    (change it on the Hub or with ``HfApi.update_repo_settings``). Returns the URL of the
    new commit.
    """
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        # Written (and checked) first: a rule that cannot be saved leaves no empty repo behind.
        save_pretrained(rule, tmp, model_card=model_card)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and revision != constants.DEFAULT_REVISION and not _COMMIT_HASH.fullmatch(revision):
            # The Hub refuses commits to a branch that does not exist yet.
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(Path(tmp)),
            revision=revision,
            commit_message=commit_message,
        )
    return str(getattr(info, "commit_url", info))
