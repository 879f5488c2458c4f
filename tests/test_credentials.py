"""Credentials on disk: private keys are owner-only from their first byte, never overwritten, never
written through a symlink; a deployment folder used before keeps its certificates and keys."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from flowertune_finance.dev import credentials
from flowertune_finance.dev.credentials import CredentialError, generate_certificates, generate_node_keys
from flowertune_finance.dev.deployment import LocalDeployment


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """Every os.open the credentials module makes: (path, flags, mode)."""
    calls: list[tuple[str, int, int]] = []
    real_open = os.open

    def recording_open(path, flags, mode=0o777, *args, **kwargs):
        calls.append((str(path), flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(credentials.os, "open", recording_open)
    return calls


def test_private_keys_are_created_0600_exclusively(tmp_path, open_calls):
    previous_umask = os.umask(0)  # a permissive umask must not widen a key file
    try:
        private, public = generate_node_keys(tmp_path / "keys", "alice")
        certificates = generate_certificates(tmp_path / "certs")
    finally:
        os.umask(previous_umask)
    assert _mode(private) == 0o600
    assert _mode(certificates.server_key) == 0o600
    assert _mode(public) == 0o644 and _mode(certificates.ca_cert) == 0o644
    by_path = {path: (flags, mode) for path, flags, mode in open_calls}
    for key in (private, certificates.server_key):
        flags, mode = by_path[str(key)]
        # created with its final mode in the same call (no window with wider permissions), never
        # replacing an existing file, never following a symlink
        assert mode == 0o600
        assert flags & os.O_CREAT and flags & os.O_EXCL and flags & os.O_NOFOLLOW and flags & os.O_WRONLY
    assert private.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert certificates.server_key.read_bytes().startswith(b"-----BEGIN EC PRIVATE KEY-----")


def test_an_existing_key_is_never_overwritten(tmp_path):
    folder = tmp_path / "keys"
    folder.mkdir()
    (folder / "alice").write_bytes(b"the old key")
    with pytest.raises(CredentialError, match=r"keys/alice already exists; refusing to overwrite it"):
        generate_node_keys(folder, "alice")
    assert (folder / "alice").read_bytes() == b"the old key"
    assert not (folder / "alice.pub").exists()  # nothing half-written either


def test_existing_certificate_files_are_left_alone(tmp_path):
    folder = tmp_path / "certs"
    folder.mkdir()
    (folder / "server.key").write_bytes(b"old server key")
    with pytest.raises(CredentialError, match=r"server.key already exists"):
        generate_certificates(folder)
    assert (folder / "server.key").read_bytes() == b"old server key"
    assert not (folder / "ca.crt").exists() and not (folder / "server.pem").exists()


@pytest.mark.parametrize("dangling", [False, True])
def test_a_symlink_in_place_of_a_key_is_refused(tmp_path, dangling):
    folder = tmp_path / "keys"
    folder.mkdir()
    target = tmp_path / "elsewhere" / "victim"
    target.parent.mkdir()
    if not dangling:
        target.write_bytes(b"not yours to overwrite")
    (folder / "alice").symlink_to(target)
    with pytest.raises(CredentialError, match=r"keys/alice is a symlink"):
        generate_node_keys(folder, "alice")
    if dangling:
        assert not target.exists()
    else:
        assert target.read_bytes() == b"not yours to overwrite"


def test_write_refuses_a_symlink_that_appears_after_the_check(tmp_path, monkeypatch):
    """The O_NOFOLLOW/O_EXCL open itself refuses, not only the check before it."""
    target = tmp_path / "victim"
    target.write_bytes(b"untouched")
    key_path = tmp_path / "alice"
    key_path.symlink_to(target)
    monkeypatch.setattr(credentials, "_refuse_existing", lambda paths: None)  # skip the early check
    with pytest.raises(CredentialError, match="is a symlink"):
        generate_node_keys(tmp_path, "alice")
    assert target.read_bytes() == b"untouched"


def test_a_deployment_folder_used_again_keeps_its_certificates(tmp_path):
    first = LocalDeployment(tmp_path / "deployment")
    before = {path: path.read_bytes() for path in vars(first.certificates).values()}
    second = LocalDeployment(tmp_path / "deployment")  # e.g. `deploy-local --folder` run twice
    assert second.certificates == first.certificates
    assert {path: path.read_bytes() for path in before} == before
    (tmp_path / "deployment" / "certificates" / "ca.crt").unlink()
    with pytest.raises(CredentialError, match="incomplete or symlinked certificate set"):
        LocalDeployment(tmp_path / "deployment")
