"""DICOM TLS in and out (PS3.15 BCP 195), with dcmtk on the other side and certificates made by the test
(openssl CLI): a TLS listener that requires a client certificate from our CA, sending to a dcmtk storescp
+tls as the PACS, refusals of a wrong CA and of a missing client certificate, and start-up errors naming the
key."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import rawdicom as raw
from conftest import (
    DCMTK,
    ENV,
    ROOT,
    NodeProcess,
    PacsSCP,
    free_port,
    need_dcmtk,
    wait_for,
    write_series,
)

from dicom_node.config import ConfigError, Destination, load_settings
from dicom_node.deliver.dimse import send_items
from dicom_node.receive.scp import StorageSCP
from dicom_node.service import open_storage
from dicom_node.tls import client_context, server_name


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """Our CA with certificates for the node, the PACS and a client; a rogue CA with a certificate of its own."""
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue"):
        _openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                 "-days", "2", "-subj", f"/CN=Test {ca} CA")
    for name, ca, san in (("node", "ca", "DNS:localhost,IP:127.0.0.1"), ("pacs", "ca", "DNS:localhost,IP:127.0.0.1"),
                          ("client", "ca", "DNS:client.example"), ("intruder", "rogue", "DNS:intruder.example")):
        _openssl(d, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n")
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return d


def tls_scp(tmp: Path, pki: Path, extra: str = "") -> StorageSCP:
    (tmp / "node.toml").write_text(
        f'[node]\ndata_dir = "{tmp / "var"}"\n[scp]\nbind_address = "127.0.0.1"\nport = {free_port()}\nfsync = false\n'
        f'min_free_disk_mb = 1\nnetwork_timeout = 5\nassociation_request_timeout = 3\n'
        f'[scp.tls]\nenabled = true\nport = {free_port()}\ncertificate = "{pki / "node.crt"}"\n'
        f'private_key = "{pki / "node.key"}"\nca_certificates = "{pki / "ca.crt"}"\n{extra}\n')
    settings = load_settings(tmp / "node.toml")
    db, store = open_storage(settings)
    scp = StorageSCP(settings, db, store)
    scp.start()
    return scp


@pytest.fixture
def scp(tmp_path, pki):
    need_dcmtk()
    s = tls_scp(tmp_path, pki)
    yield s
    s.stop()
    s.db.dispose()


def dcmtk(tool: str, port: int, *flags: str, paths: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([DCMTK[tool], "-to", "20", "-aet", "GOODSCU", "-aec", "SEGNODE", *flags, "127.0.0.1",
                           str(port), *map(str, paths)], env=ENV, capture_output=True, text=True, timeout=120)


def client_tls(pki: Path, key: str = "client", ca: str = "ca") -> tuple[str, ...]:
    return ("+tls", str(pki / f"{key}.key"), str(pki / f"{key}.crt"), "+cf", str(pki / f"{ca}.crt"))


def tls_port(scp: StorageSCP) -> int:
    return next(port for _, port, tls in scp.server.addresses() if tls)


def test_dcmtk_echo_and_store_over_tls(scp, pki, tmp_path):
    port = tls_port(scp)
    r = dcmtk("echoscu", port, *client_tls(pki))
    assert r.returncode == 0, r.stdout + r.stderr
    _, paths = write_series(tmp_path / "s", seed=71, n_slices=5, size=32)
    r = dcmtk("storescu", port, *client_tls(pki), "+sd", paths=(tmp_path / "s",))
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(list((scp.store.root / "incoming").rglob("*.dcm"))) == 5
    assert dcmtk("echoscu", scp.port).returncode == 0  # the plain listener still serves beside it


def test_wrong_ca_missing_client_certificate_and_plain_dicom_are_refused(scp, pki, caplog):
    port = tls_port(scp)
    r = dcmtk("echoscu", port, *client_tls(pki, key="intruder"))  # client certificate from another CA
    assert r.returncode != 0
    r = dcmtk("echoscu", port, *client_tls(pki, ca="rogue"))  # the client does not trust our certificate
    assert r.returncode != 0
    assert dcmtk("echoscu", port).returncode != 0  # plain DICOM on the TLS port
    # No client certificate at all: the handshake (or, in TLS 1.3, the first read) fails; no association.
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            with ctx.wrap_socket(s, server_hostname="localhost") as t:
                t.sendall(raw.associate_rq())
                answer = t.recv(6)
        except (ssl.SSLError, OSError):
            answer = b""
    assert not answer.startswith(b"\x02")
    wait_for(lambda: caplog.text.count("TLS refused") >= 2, 10, 0.1, "the refusals to be logged")
    r = dcmtk("echoscu", scp.port, *client_tls(pki))  # TLS to the plain port: aborted, with a hint in the log
    assert r.returncode != 0
    wait_for(lambda: "TLS handshake on the plain port" in caplog.text, 10, 0.1, "the hint")
    assert dcmtk("echoscu", port, *client_tls(pki)).returncode == 0


def test_tls_only_listener(tmp_path, pki):
    s = tls_scp(tmp_path, pki, "plain_listener = false\nrequire_client_certificate = false")
    try:
        assert [tls for _, _, tls in s.server.addresses()] == [True]
        port = tls_port(s)
        # without a client certificate (not required here); the node's certificate is checked against our CA
        r = subprocess.run([DCMTK["echoscu"], "-to", "20", "-aec", "SEGNODE", "+tla", "+cf", str(pki / "ca.crt"),
                            "127.0.0.1", str(port)], env=ENV, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        s.stop()
        s.db.dispose()


def send_to(settings, dest, files) -> tuple[bool, str]:
    """One C-STORE association to ``dest`` with the TLS context and server name the outbox uses for it."""
    res = send_items(dest.host, dest.port, dest.ae_title, files, calling=settings.scp.ae_title,
                     tls=(client_context(dest), server_name(dest)))
    return res.ok, "; ".join(f for _, f in res.failed)


def test_sending_to_a_dcmtk_pacs_over_tls(tmp_path, pki):
    need_dcmtk()
    pacs = PacsSCP(tmp_path / "pacs", flags=("+tls", str(pki / "pacs.key"), str(pki / "pacs.crt"), "+cf",
                                             str(pki / "ca.crt")))
    try:
        _, paths = write_series(tmp_path / "s", seed=72, n_slices=2, size=32)
        (tmp_path / "node.toml").write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n')
        settings = load_settings(tmp_path / "node.toml")
        files = [str(p) for p in paths]
        good = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs.port, tls=True,
                           tls_ca=str(pki / "ca.crt"), tls_certificate=str(pki / "client.crt"),
                           tls_private_key=str(pki / "client.key"))
        ok, why = send_to(settings, good, files)
        assert ok, why
        wait_for(lambda: len(pacs.files()) == 2, 20, 0.2, "the PACS to receive both files")
        wrong_ca = Destination(**{**good.__dict__, "tls_ca": str(pki / "rogue.crt")})
        ok, why = send_to(settings, wrong_ca, files)
        assert not ok and "TLS" in why
        no_client_cert = Destination(**{**good.__dict__, "tls_certificate": "", "tls_private_key": ""})
        ok, _ = send_to(settings, no_client_cert, files)
        assert not ok
        wrong_name = Destination(**{**good.__dict__, "tls_server_name": "pacs.elsewhere.example"})
        assert not send_to(settings, wrong_name, files)[0]
        assert len(pacs.files()) == 2
        # an admin checks the configured destination, TLS included, from the command line
        (tmp_path / "node.toml").write_text(
            f'[node]\ndata_dir = "{tmp_path / "var"}"\n[[destinations]]\nname = "pacs"\nae_title = "PACS"\n'
            f'host = "127.0.0.1"\nport = {pacs.port}\ntls = true\ntls_ca = "{pki / "ca.crt"}"\n'
            f'tls_certificate = "{pki / "client.crt"}"\ntls_private_key = "{pki / "client.key"}"\n')
        r = subprocess.run([sys.executable, "-m", "dicom_node", "-c", str(tmp_path / "node.toml"), "echo",
                            "--destination", "pacs"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
        assert r.returncode == 0 and "(DICOM TLS): ok" in r.stdout, r.stdout + r.stderr
    finally:
        pacs.stop(validate=False)


def test_round_trip_over_tls_through_the_node(tmp_path, pki):
    """The bar: a series sent by dcmtk storescu +tls is segmented and its SEG and SR reach a dcmtk storescp +tls."""
    pacs = PacsSCP(tmp_path / "pacs", flags=("+tls", str(pki / "pacs.key"), str(pki / "pacs.crt"), "+cf",
                                             str(pki / "ca.crt")))
    tls_port_ = free_port()
    node = NodeProcess(
        tmp_path,
        pacs,
        extra=(
            f'[scp.tls]\nenabled = true\nport = {tls_port_}\ncertificate = "{pki / "node.crt"}"\n'
            f'private_key = "{pki / "node.key"}"\nca_certificates = "{pki / "ca.crt"}"\n'
        ),
        dest_extra=(
            f'tls = true\ntls_ca = "{pki / "ca.crt"}"\ntls_certificate = "{pki / "client.crt"}"\n'
            f'tls_private_key = "{pki / "client.key"}"\n'
        ),
    )
    try:
        _, paths = write_series(tmp_path / "s", seed=73)
        r = dcmtk("storescu", tls_port_, *client_tls(pki), "+sd", paths=(tmp_path / "s",))
        assert r.returncode == 0, r.stdout + r.stderr
        job = node.wait_job(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
        assert job["state"] == "done", job
        mods = {pydicom.dcmread(p, stop_before_pixels=True).Modality for p in pacs.files()}
        assert {"SEG", "SR"} <= mods
        assert "(DICOM TLS, client certificate required)" in node.log.read_text()
    finally:
        node.stop()
        pacs.stop()


def test_start_up_errors_name_the_key(tmp_path, pki):
    base = (f'[node]\ndata_dir = "{tmp_path / "var"}"\n[scp]\nport = {free_port()}\n[scp.tls]\nenabled = true\n'
            f'port = {free_port()}\nca_certificates = "{pki / "ca.crt"}"\n')
    cfg = tmp_path / "node.toml"
    cfg.write_text(base + f'certificate = "{pki / "node.crt"}"\nprivate_key = "{tmp_path / "missing.key"}"\n')
    with pytest.raises(ConfigError, match=r"scp\.tls\.private_key: cannot read"):
        load_settings(cfg)
    r = subprocess.run([sys.executable, "-m", "dicom_node", "-c", str(cfg), "serve"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=ENV)
    assert r.returncode == 2 and "scp.tls.private_key" in r.stderr
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    cfg.write_text(base + f'certificate = "{tmp_path / "garbage.pem"}"\nprivate_key = "{pki / "node.key"}"\n')
    settings = load_settings(cfg)
    db, store = open_storage(settings)
    try:
        with pytest.raises(ConfigError, match=r"scp\.tls\.certificate / scp\.tls\.private_key"):
            StorageSCP(settings, db, store)
        cfg.write_text(
            base + f'certificate = "{pki / "node.crt"}"\nprivate_key = "{pki / "pacs.key"}"\n'
        )  # not its key
        with pytest.raises(ConfigError, match=r"matching"):
            StorageSCP(load_settings(cfg), db, store)
    finally:
        db.dispose()
    with pytest.raises(ConfigError, match=r"destinations\[0\]\.tls_certificate and"):
        load_settings(None, environ={
            "DICOM_NODE_DESTINATIONS": f'[{{"name": "p", "tls": true, "tls_certificate": "{pki / "client.crt"}"}}]'})
