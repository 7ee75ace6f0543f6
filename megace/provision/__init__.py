"""Trust on the bus: identities, certificates, passwords and per-identity ACLs for Mosquitto.

:mod:`~megace.provision.identity` says who may do what, :mod:`~megace.provision.pki` issues
certificates, :mod:`~megace.provision.static` and :mod:`~megace.provision.dynsec` turn the
identities into broker configuration, and :class:`~megace.provision.store.Store` keeps a
provisioning folder consistent. ``megace provision --help`` drives it all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from megace.provision.identity import Access, Identity, Role, Rule

if TYPE_CHECKING:
    from megace.provision.store import Store

__all__ = ["Access", "Identity", "Role", "Rule", "Store"]


def __getattr__(name: str) -> Any:
    """``Store`` loads ``cryptography`` on first use, not when the CLI imports this package."""
    if name == "Store":
        from megace.provision.store import Store

        return Store
    raise AttributeError(name)
