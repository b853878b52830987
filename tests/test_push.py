"""`uniadc push`: the token and the repo id are checked before uploading, and every failure a user
can cause (no token, a rejected token, a foreign namespace, a bad repo id, offline mode, no
network) is one line and exit 2. The Hub is mocked; nothing here touches the network."""

from __future__ import annotations

from unittest import mock

import pytest
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from core.errors import InputError
from synthesis.dataset import push_to_hub, write_card
from tests.test_cli import run_main
from tests.test_dataset import card_info, write_dataset


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """A real request would fail fast instead of reaching the Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "synthetic"
    write_dataset(folder)
    write_card(folder, card_info({"crack": 3, "dent": 3}))
    return folder


@pytest.fixture
def hub():
    with mock.patch("huggingface_hub.HfApi") as api_cls, mock.patch("huggingface_hub.get_token", return_value=None):
        api = api_cls.return_value
        api.whoami.return_value = {"name": "me", "orgs": [{"name": "my-org"}]}
        api.upload_folder.return_value = mock.Mock(commit_url="https://hub/commit/1")
        yield api


def http_error(status: int) -> HfHubHTTPError:
    return HfHubHTTPError(f"{status} Client Error\nmore detail", response=mock.Mock(status_code=status, headers={}))


def transport_error() -> Exception:
    """What the installed huggingface_hub's HTTP client raises when the network is down."""
    client = [c for c in HfHubHTTPError.__mro__[1:] if c.__name__ == "HTTPError"]
    return type("ConnectError", (client[0],), {})("[Errno 111] Connection refused")


def test_push_to_an_organisation_with_the_cached_login_token(dataset, hub):
    with mock.patch("huggingface_hub.get_token", return_value="cached"):
        assert push_to_hub(dataset, "my-org/anomalies") == "https://hub/commit/1"
    hub.create_repo.assert_called_once()
    hub.upload_folder.assert_called_once()


@pytest.mark.parametrize(
    "repo_id, token, whoami, fragment",
    [
        ("bad id", "tok", None, "invalid Hub repo id 'bad id': Repo id must use alphanumeric chars"),
        ("a/b/c", "tok", None, "invalid Hub repo id 'a/b/c'"),
        ("me/x", None, None, "no Hugging Face token: set HF_TOKEN"),
        ("me/x", "tok", http_error(401), "cannot check the token: the Hub rejected the token (401 Unauthorized)"),
        ("other/x", "tok", None, "the token belongs to 'me', which cannot create repos under 'other'"),
        ("me/x", "tok", OfflineModeIsEnabled("offline"), "cannot check the token: HF_HUB_OFFLINE is set"),
        ("me/x", "tok", transport_error(), "cannot check the token: the Hub at https://huggingface.co is unreachable "
                                           "(ConnectError: [Errno 111] Connection refused); check the network"),
    ],
    ids=["bad-id", "too-many-slashes", "no-token", "rejected-token", "foreign-namespace", "offline", "no-network"],
)
def test_checks_fail_in_one_line_before_any_upload(dataset, hub, monkeypatch, repo_id, token, whoami, fragment):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    if whoami is not None:
        hub.whoami.side_effect = whoami
    with pytest.raises(InputError) as err:
        push_to_hub(dataset, repo_id, token=token)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    hub.create_repo.assert_not_called()
    hub.upload_folder.assert_not_called()


def test_a_refused_upload_is_one_line(dataset, hub):
    hub.upload_folder.side_effect = http_error(403)
    with pytest.raises(InputError, match=r"^cannot upload to me/x: the token may not do this \(403 Forbidden\)"):
        push_to_hub(dataset, "me/x", token="tok")


@pytest.mark.parametrize(
    "args, message",
    [
        (["push", "not a repo"], "error: invalid Hub repo id 'not a repo': "),
        (["push", "me/x"], "error: no Hugging Face token: set HF_TOKEN"),
    ],
)
def test_cli_push_failures_are_one_line_and_exit_2(dataset, hub, monkeypatch, capsys, args, message):
    code, stderr, _ = run_main([*args, "--dir", str(dataset)], dataset.parent, monkeypatch, capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message)
