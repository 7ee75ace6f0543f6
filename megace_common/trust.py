"""Which signatures a service makes and which it accepts: the ``[signing]`` section of edge and cloud configs.

Why one section for both services: the edge signs uploads and device downlinks and trusts the
cloud's key; the cloud signs globals and site feedback and trusts each edge's key. Both load keys
the same way (PEM files written by ``megace provision``) and both must refuse to start with a key
that cannot be read, rather than run unsigned by accident.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from broker.signing import Signer, Verifier, load_private_key, load_public_key


class SigningConfigError(ValueError):
    """A configured key file is missing or is not an Ed25519 key (raised at start, never at run time)."""


def load_signer(key_file: str) -> Signer | None:
    """The signer for ``key_file`` (a PEM Ed25519 private key), None for ""; unreadable: SigningConfigError."""
    if not key_file:
        return None
    try:
        return Signer(load_private_key(key_file))
    except (OSError, ValueError) as exc:
        raise SigningConfigError(f"signing.key_file {key_file}: {exc}") from None


@dataclass
class SigningConfig:
    """Ed25519 keys of one service.

    Empty by default: the anonymous loopback demo signs nothing. ``megace provision`` writes the
    files; ``megace run --secure`` sets them all.
    """

    key_file: str = ""
    """This service's private key (PEM, PKCS#8); empty: send unsigned messages."""
    trusted_keys: list[str] = field(default_factory=list)
    """Public keys (PEM) whose signatures this service accepts: the cloud's, for an edge."""
    require: bool = False
    """Refuse unsigned messages where this service checks signatures (on as soon as keys are trusted)."""

    def signer(self) -> Signer | None:
        """The signer for this service's outgoing messages, or None when no key is configured."""
        return load_signer(self.key_file)

    def verifier(self) -> Verifier | None:
        """The verifier for incoming messages, or None when nothing is trusted and nothing required."""
        if not self.trusted_keys and not self.require:
            return None
        keys = []
        for path in self.trusted_keys:
            try:
                keys.append(load_public_key(Path(path)))
            except (OSError, ValueError) as exc:
                raise SigningConfigError(f"signing.trusted_keys {path}: {exc}") from None
        return Verifier(keys, required=self.require or bool(keys))
