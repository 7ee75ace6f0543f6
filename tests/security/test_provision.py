"""Provisioning without a broker: addresses, secrets, hashes, generated files, the CLI."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.address import BrokerAddress
from megace.cli import app
from megace.provision import Identity, Role
from megace.provision.static import hash_password, render_acl_file, verify_password
from megace.provision.store import Store


def test_url_carries_tls_files_and_password_file(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    url = f"mqtts://megace-dev-gw7@broker:8883?ca=/p/ca.crt&cert=/p/c.crt&key=/p/c.key&password_file={pw}"
    a = BrokerAddress.from_url(url, env={})
    assert (a.host, a.port, a.tls, a.username, a.password) == ("broker", 8883, True, "megace-dev-gw7", "s3cret")
    assert (a.ca_file, a.cert_file, a.key_file) == ("/p/ca.crt", "/p/c.crt", "/p/c.key")
    assert "s3cret" not in str(a) + repr(a) + a.url()
    assert BrokerAddress.from_url(a.url(), env={}) == a


def test_environment_fills_what_the_url_leaves_out(tmp_path: Path) -> None:
    env = {"MEGACE_BROKER_USERNAME": "megace-edge-e0", "MEGACE_BROKER_PASSWORD": "from-env",
           "MEGACE_BROKER_CA": "/etc/megace/ca.crt"}
    a = BrokerAddress.from_url("mqtts://broker:8884", env=env)
    assert (a.username, a.password, a.ca_file) == ("megace-edge-e0", "from-env", "/etc/megace/ca.crt")
    assert BrokerAddress.from_url("mqtts://other@broker:8884", env=env).username == "other"
    (tmp_path / "pw").write_text("from-file")
    env_file = {"MEGACE_BROKER_PASSWORD_FILE": str(tmp_path / "pw"), "MEGACE_BROKER_PASSWORD": "ignored"}
    assert BrokerAddress.from_url("mqtts://u@broker", env=env_file).password == "from-file"
    assert BrokerAddress.from_url("mqtt://broker", env={"MEGACE_BROKER_PASSWORD": "x"}).password is None


@pytest.mark.parametrize("url, error", [
    ("mqtts://h?cafile=/x&bogus=1", "unknown broker URL parameter"),
    ("mqtt://h?ca=/x", "need a TLS URL"),
    ("mqtts://h?key=/x", "needs its certificate"),
    ("mqtts://u@h?password_file=/does/not/exist", "cannot read password file"),
])
def test_bad_urls_are_refused(url: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        BrokerAddress.from_url(url, env={})


def test_password_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        a = BrokerAddress.from_url("mqtt://u:hunter2@example.org:1883", env={})
    assert a.password == "hunter2"
    assert "hunter2" not in repr(a) + str(a) + a.url() + caplog.text
    assert "clear text" in caplog.text  # a password over plain TCP to a remote host is called out
    assert "hunter2" in a.url(with_password=True)


def test_hashes_match_mosquitto_passwd(tmp_path: Path) -> None:
    assert verify_password("pw", hash_password("pw")) and not verify_password("px", hash_password("pw"))
    tool = shutil.which("mosquitto_passwd")
    assert tool is not None, "mosquitto_passwd comes with Debian's mosquitto, which ./dev.sh installs"
    f = tmp_path / "passwd"
    f.touch()
    subprocess.run([tool, "-b", str(f), "alice", "open sesame"], check=True)
    assert verify_password("open sesame", f.read_text().strip().split(":", 1)[1])


def test_acl_file_is_per_identity_without_patterns() -> None:
    text = render_acl_file([Identity(Role.DEVICE, "d0a", "site-0"), Identity(Role.EDGE, "e1", "site-1")])
    assert not [line for line in text.splitlines() if line.startswith("pattern")]
    device_block = text.split("user megace-dev-d0a")[1].split("\n\n")[0]
    assert "site-1" not in device_block and "site/site-0/device/d0a/up/#" in device_block
    edge_block = text.split("user megace-edge-e1")[1]
    assert "status/edge/site-1/e1\n" in edge_block and "status/edge/#" not in edge_block


def test_identity_naming_convention() -> None:
    assert Identity(Role.DEVICE, "gw7", "site-a").username == "megace-dev-gw7"
    assert Identity(Role.EDGE, "e0", "s").client_id == "megace-edge-e0"
    assert Identity(Role.CLOUD, "cloud").username == "megace-cloud-cloud"
    assert Identity.from_username("megace-dev-gw7", "site-a") == Identity(Role.DEVICE, "gw7", "site-a")
    with pytest.raises(ValueError):
        Identity(Role.DEVICE, "gw7")  # a device needs its site
    with pytest.raises(ValueError):
        Identity(Role.CLOUD, "c", "site-a")


def test_cli_provisions_a_site(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    run = CliRunner()
    for args in (["init", str(root), "--host", "mqtt.example.org"],
                 ["site", str(root), "site-0", "--edge-id", "e0", "--devices", "gw1,gw2"],
                 ["cloud", str(root)], ["dashboard", str(root), "ops", "--no-cert"],
                 ["revoke", str(root), "megace-dev-gw2"]):
        result = run.invoke(app, ["provision", *args])
        assert result.exit_code == 0, result.output
    listing = run.invoke(app, ["provision", "list", str(root)]).output
    assert "megace-dev-gw2" in listing and "REVOKED" in listing and "megace-edge-e0" in listing
    store = Store.open(root)
    assert "megace-dev-gw2" not in (root / "broker" / "megace.passwd").read_text()
    assert store.entries["megace-dev-gw2"].serial in store.revoked_serials()
    edge = root / "identities" / "megace-edge-e0"
    assert (edge / "signing.ed25519").stat().st_mode & 0o077 == 0
    assert (edge / "client.key").stat().st_mode & 0o077 == 0
    assert "MEGACE_EDGE__BROKER=mqtts://megace-edge-e0@mqtt.example.org:8883?ca=" in (edge / "broker.env").read_text()
    assert not (root / "identities" / "megace-dash-ops" / "client.crt").exists()
