"""Hub repo ids and Hub error text: one definition for `push` (synthesis) and `train --dataset`
(pipelines). `huggingface_hub`'s own validator decides what a repo id is, without network."""

from __future__ import annotations

from core.errors import InputError


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty): Hub errors are long."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def repo_id_problem(repo_id: str) -> str | None:
    """Why `repo_id` is not a valid `name` / `namespace/name` Hub id, or None when it is."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        return first_line(exc)
    return None


def check_repo_id(repo_id: str) -> None:
    """InputError (one line) unless `repo_id` is a valid Hub id."""
    problem = repo_id_problem(repo_id)
    if problem is not None:
        raise InputError(f"invalid Hub repo id {repo_id!r}: {problem}")
