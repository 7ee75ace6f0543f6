"""The ``[signing]`` config section: keys load once at start, and a bad key stops the service there."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.signing import Signer, UnsignedError, generate_private_key, private_pem, public_pem
from broker.wire import Kind, encode_envelope
from megace_common.trust import SigningConfig, SigningConfigError


def _write_pair(tmp_path: Path, name: str) -> tuple[Path, Path]:
    key = generate_private_key()
    (tmp_path / f"{name}.key").write_bytes(private_pem(key))
    (tmp_path / f"{name}.pub").write_bytes(public_pem(key.public_key()))
    return tmp_path / f"{name}.key", tmp_path / f"{name}.pub"


def test_an_empty_section_signs_nothing_and_checks_nothing() -> None:
    config = SigningConfig()
    assert config.signer() is None and config.verifier() is None


def test_a_configured_pair_signs_and_verifies(tmp_path: Path) -> None:
    key, pub = _write_pair(tmp_path, "cloud")
    signer = SigningConfig(key_file=str(key)).signer()
    verifier = SigningConfig(trusted_keys=[str(pub)]).verifier()
    assert signer is not None and verifier is not None
    env = encode_envelope(Kind.GLOBAL, "cloud", 1, {}, ts_ms=1)
    assert verifier.open(signer.sign(env)) == env
    with pytest.raises(UnsignedError):  # trusting a key makes signatures required
        verifier.open(env)


def test_require_without_keys_refuses_everything_unsigned(tmp_path: Path) -> None:
    verifier = SigningConfig(require=True).verifier()
    assert verifier is not None and verifier.kids == frozenset()
    with pytest.raises(UnsignedError):
        verifier.open(encode_envelope(Kind.GLOBAL, "cloud", 1, {}, ts_ms=1))


@pytest.mark.parametrize("which", ["missing", "public-as-private", "garbage"])
def test_an_unreadable_key_is_a_config_error_naming_the_file(tmp_path: Path, which: str) -> None:
    key, pub = _write_pair(tmp_path, "edge")
    bad = {"missing": tmp_path / "nope.key", "public-as-private": pub, "garbage": tmp_path / "g.key"}[which]
    (tmp_path / "g.key").write_text("not a key")
    with pytest.raises(SigningConfigError, match=str(bad.name)):
        SigningConfig(key_file=str(bad)).signer()
    bad_pub = {"missing": tmp_path / "nope.pub", "public-as-private": key, "garbage": tmp_path / "g.key"}[which]
    with pytest.raises(SigningConfigError, match=str(bad_pub.name)):
        SigningConfig(trusted_keys=[str(bad_pub)]).verifier()
    assert isinstance(SigningConfig(key_file=str(key)).signer(), Signer)
