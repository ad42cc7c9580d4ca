"""The Hub's answers: each way it says no as one ExpoError line, which failures may pass, and the one retry policy
for every Hub request (downloads on the workers, header range requests on the driver).
"""

from __future__ import annotations

import logging
import time

from ..errors import ExpoError
from ..settings import HUB_ATTEMPTS

log = logging.getLogger("expo_dist")


# ---- errors -------------------------------------------------------------------------------------------------


def hub_error(e: Exception, repo: str, revision: str | None, what: str | None = None) -> ExpoError:
    """One line for each way the Hub can say no."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        RevisionResolutionError,
    )

    rev = revision or "main"
    name = f"{repo}@{rev}"
    on = f"{what} of {name}" if what else name
    status = getattr(getattr(e, "response", None), "status_code", None)
    offline = constants.is_offline_mode()
    if isinstance(e, GatedRepoError):
        return ExpoError(f"{repo} is a gated model: accept its terms at {constants.ENDPOINT}/{repo} with your account, "
                         "then set HF_TOKEN to a token of that account (or run `hf auth login`)")
    if isinstance(e, RepositoryNotFoundError):
        if status == 401 and ("Invalid credentials" in str(e) or "Invalid username or password" in str(e)):
            return ExpoError(f"{repo}: the Hub rejected the token (401 invalid credentials); fix or unset HF_TOKEN")
        return ExpoError(f"{repo}: no such model on {constants.ENDPOINT}, or it is private: check the repo id; for a "
                         "private or gated repo set HF_TOKEN (or run `hf auth login`)")
    if isinstance(e, RevisionNotFoundError):
        return ExpoError(f"{repo}: revision {rev!r} does not exist; give an existing branch, tag or commit sha "
                         f"(see {constants.ENDPOINT}/{repo}/tree/main)")
    if isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError):
        return ExpoError(f"{on}: no such file in the repo at this revision")
    if isinstance(e, (RevisionResolutionError, LocalEntryNotFoundError, OfflineModeIsEnabled)):
        why = "HF_HUB_OFFLINE is set" if offline else f"the Hub ({constants.ENDPOINT}) cannot be reached"
        return ExpoError(f"{on}: not in the Hugging Face cache and {why}; download it once online "
                         f"(`hf download {repo}" + (f" --revision {revision}" if revision else "") + "`) or point "
                         "--cache-dir / HF_HOME at a cache that holds it")
    if isinstance(e, HfHubHTTPError):
        if status == 401:
            return ExpoError(f"{on}: the Hub answered 401 (unauthorized); set HF_TOKEN to a token with read access")
        if status == 403:
            return ExpoError(f"{on}: the Hub answered 403 (forbidden); your token lacks access to this repo")
        return ExpoError(f"{on}: the Hub answered {status}: {str(e).strip().splitlines()[0]}")
    return ExpoError(f"{on}: cannot reach the Hub at {constants.ENDPOINT} ({e.__class__.__name__}: "
                     f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}); check the network, or set "
                     "HF_HUB_OFFLINE=1 to use only the cache")


_HUB_ERRORS: tuple = ()


def hub_exceptions() -> tuple:
    """Exceptions huggingface_hub raises for the Hub saying no or being unreachable."""
    global _HUB_ERRORS
    if not _HUB_ERRORS:
        from huggingface_hub import errors

        names = ("HfHubHTTPError", "EntryNotFoundError", "OfflineModeIsEnabled", "RevisionResolutionError",
                 "FileMetadataError", "LocalEntryNotFoundError")
        found = [getattr(errors, n) for n in names if hasattr(errors, n)]
        for mod in ("httpx2", "httpx", "requests"):  # the HTTP client of this huggingface_hub version
            try:
                m = __import__(mod)
            except ImportError:
                continue
            found.append(m.HTTPError if mod != "requests" else m.RequestException)
        found.append(ConnectionError)
        _HUB_ERRORS = tuple(found)
    return _HUB_ERRORS


TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)

# The one retry policy for the Hub: a request that fails for a reason that may pass (see transient) is tried again
# after 1, 2, 4, ... s (at most BACKOFF_MAX_S apart), up to Settings.hub_attempts tries in all (EXPO_HUB_ATTEMPTS;
# default 6: about a minute of waiting), before it fails with the Hub's error. Range requests go through
# huggingface_hub's own http_backoff with this policy; downloads (hf_hub_download, which does not retry 5xx)
# through retry_transient.
BACKOFF_S = 1.0
BACKOFF_MAX_S = 30.0


def retry_transient(call, repo: str, revision: str | None, what: str, attempts: int = HUB_ATTEMPTS):
    """call(), tried again with backoff while the Hub's failure is transient, up to `attempts` tries in all.
    Returns (its result, tries); raises the Hub's error as one ExpoError line, saying how many tries it took
    when there were several."""
    limit = max(1, attempts)
    delay, attempt = BACKOFF_S, 1
    while True:
        try:
            return call(), attempt
        except hub_exceptions() as e:
            if attempt == limit or not transient(e):
                err = hub_error(e, repo, revision, what)
                if attempt > 1:
                    err = type(err)(f"{err} (after {attempt} tries)")
                raise err from None
            log.warning("%s/%s: %s; trying again in %.0f s (%d of %d)", repo, what,
                        str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__, delay,
                        attempt + 1, limit)
        time.sleep(delay)
        delay, attempt = min(delay * 2, BACKOFF_MAX_S), attempt + 1


def transient(e: Exception) -> bool:
    """Whether the Hub failing like this may go away on its own: a timeout, a dropped connection, a 408/429/5xx
    answer, or a download that could not check the Hub while online. Not: 401/403/404, gated repos, offline mode."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError, OfflineModeIsEnabled)):
        return False
    if isinstance(e, LocalEntryNotFoundError):  # the Hub could not be reached for a file not yet cached
        return not constants.is_offline_mode()
    if isinstance(e, EntryNotFoundError):
        return False
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status is not None:
        return status in TRANSIENT_STATUS
    return isinstance(e, hub_exceptions())  # no answer at all: connection refused or reset, timeout
