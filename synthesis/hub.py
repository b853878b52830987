"""Talking to the Hugging Face Hub for `uniadc push`: check before uploading, fail in one line.

Everything a user can get wrong — no token, a token the Hub rejects or that may not write to the
namespace, a malformed repo id, no network, `HF_HUB_OFFLINE` set — becomes an `InputError` with
one line saying what to fix, checked (token and repo id first, with one `whoami` call) before a
single byte is uploaded. `huggingface_hub` is imported only inside these functions: it is the
only network-facing dependency.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from core.errors import InputError
from core.hub_ids import first_line

T = TypeVar("T")


def resolve_token(token: str | None) -> str:
    """The token given, else HF_TOKEN or the cached `hf auth login` token; none is an error."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise InputError(
            "no Hugging Face token: set HF_TOKEN to a token with write access, or log in with `hf auth login`"
        )
    return token


def check_write_access(api, repo_id: str) -> str:
    """The token's user name, after checking that the token is valid and that the repo's
    namespace is the user's or one of its organisations'."""
    info = hub_step("check the token", api.whoami)
    user = info.get("name")
    namespaces = {user, *(org.get("name") for org in info.get("orgs") or [])}
    namespace = repo_id.split("/")[0] if "/" in repo_id else user
    if namespace not in namespaces:
        raise InputError(
            f"the token belongs to {user!r}, which cannot create repos under {namespace!r} "
            f"(its namespaces: {', '.join(sorted(n for n in namespaces if n))})"
        )
    return user


def hub_step(what: str, call: Callable[..., T], *args, **kwargs) -> T:
    """Run one Hub request; offline mode, a refusal or an unreachable Hub is a one-line InputError.

    Anything else (a bug) keeps its traceback.
    """
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        return call(*args, **kwargs)
    except OfflineModeIsEnabled:
        raise InputError(f"cannot {what}: HF_HUB_OFFLINE is set (offline mode); unset it to push") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            problem = "the Hub rejected the token (401 Unauthorized); check HF_TOKEN or `hf auth login`"
        elif status == 403:
            problem = "the token may not do this (403 Forbidden); use a token with write access"
        else:
            problem = f"the Hub answered {status or 'an error'}: {first_line(exc)}"
        raise InputError(f"cannot {what}: {problem}") from None
    except _transport_errors() as exc:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise InputError(
            f"cannot {what}: the Hub at {endpoint} is unreachable ({type(exc).__name__}: {first_line(exc)}); "
            "check the network"
        ) from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures: OSError (requests, sockets) and the HTTP client's own base error,
    found through huggingface_hub's HTTP error class whatever client this version uses."""
    from huggingface_hub.errors import HfHubHTTPError

    client = tuple(c for c in HfHubHTTPError.__mro__[1:] if c.__name__ == "HTTPError")
    return (OSError, *client)
