"""Configuration: the shipped node.toml loads, environment overrides apply, and errors name the key."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_node_toml_loads_and_every_key_is_commented():
    s = load_settings(ROOT / "node.toml", environ={})
    assert s.scp.ae_title == "SEGNODE" and s.scp.port == 11112
    assert s.rules[0].modalities == ["MR"] and "THIGH" in s.rules[0].terms
    assert s.database_url.startswith("sqlite:///")
    lines = (ROOT / "node.toml").read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith("#") and not line.startswith(" "):
            j = i - 1  # walk up over the keys grouped under one comment
            while j >= 0 and lines[j].strip() and not lines[j].startswith("#") and not lines[j].startswith("["):
                j -= 1
            assert j >= 0 and lines[j].startswith("#"), f"node.toml key without a comment: {line}"


def test_environment_overrides_each_key(tmp_path):
    env = {"DICOM_NODE_SCP_PORT": "11999", "DICOM_NODE_SCP_FSYNC": "false",
           "DICOM_NODE_SCP_ALLOWED_CALLING_AETS": "A,B",
           "DICOM_NODE_DESTINATIONS": '[{"name": "x", "ae_title": "X", "host": "10.0.0.1", "port": 104}]',
           "DICOM_NODE_NODE_DATA_DIR": str(tmp_path)}
    s = load_settings(ROOT / "node.toml", environ=env)
    assert s.scp.port == 11999 and s.scp.fsync is False and s.scp.allowed_calling_aets == ["A", "B"]
    assert [d.name for d in s.destinations] == ["x"] and s.destinations[0].port == 104
    assert s.data_dir == tmp_path


@pytest.mark.parametrize("text,key", [
    ("[scp]\nport = 70000\n", "scp.port"),
    ("[scp]\nport = \"abc\"\n", "scp.port"),
    ("[scp]\nae_title = \"THIS_AE_TITLE_IS_TOO_LONG\"\n", "scp.ae_title"),
    ("[scp]\nallowed_peers = [\"not-an-ip\"]\n", "scp.allowed_peers"),
    ("[scp]\nprot = 104\n", "scp.prot"),
    ("[series]\nstable_seconds = -1\n", "series.stable_seconds"),
    ("[[destinations]]\nname = \"p\"\nport = \"x\"\n", "destinations[0].port"),
    ("[inference]\ndevice = \"tpu\"\n", "inference.device"),
    ("[inference]\nprecision = \"int8\"\n", "inference.precision"),
    ("[inference]\ndevice = \"cpu\"\nprecision = \"fp16\"\n", "inference.precision"),
    ("[[destinations]]\nname = \"p\"\nquality_policy = \"ignore\"\n", "destinations[0].quality_policy"),
    ("[quality]\ntta = \"sometimes\"\n", "quality.tta"),
])
def test_invalid_file_fails_naming_the_key(tmp_path, text, key):
    p = tmp_path / "node.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_settings(p, environ={})


def test_bad_environment_variable_is_named():
    with pytest.raises(ConfigError, match="DICOM_NODE_SCP_PROT"):
        load_settings(ROOT / "node.toml", environ={"DICOM_NODE_SCP_PROT": "1"})


def test_serve_refuses_bad_config_with_a_clear_message(tmp_path):
    p = tmp_path / "node.toml"
    p.write_text("[scp]\nport = 99999\n")
    r = subprocess.run([sys.executable, "-m", "dicom_node", "-c", str(p), "serve"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "configuration error" in r.stderr and "scp.port" in r.stderr


@pytest.mark.parametrize("held", ["scp.port", "web.port"])
def test_serve_names_a_port_another_program_holds(tmp_path, held):
    """A port in use is found only at start: the node says which key, exits 2 and has not announced a dashboard
    or a listener it does not have (uvicorn alone would log the bind error and leave the node running without one)."""
    import socket

    from conftest import free_port

    ports = {"scp.port": free_port(), "web.port": free_port()}
    (tmp_path / "node.toml").write_text(
        f'[node]\ndata_dir = "var"\n[scp]\nbind_address = "127.0.0.1"\nport = {ports["scp.port"]}\n'
        f'[web]\nport = {ports["web.port"]}\n')
    with socket.socket() as other:
        other.bind(("127.0.0.1", ports[held]))
        other.listen()
        r = subprocess.run([sys.executable, "-m", "dicom_node", "-c", str(tmp_path / "node.toml"), "serve"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"configuration error: {held} = {ports[held]}: " in r.stderr, r.stderr
    assert "dashboard on" not in r.stdout and "listening as" not in r.stdout, r.stdout


def test_serve_names_a_data_folder_or_database_it_cannot_open(tmp_path):
    """What storage refuses at start is told with its key, the database's password not shown."""
    from conftest import free_port

    (tmp_path / "a-file").write_text("")
    cases = {"node.data_dir = ": f'data_dir = "{tmp_path / "a-file" / "var"}"',
             "node.database_url = postgresql+psycopg://postgres:***@": 'data_dir = "var"\ndatabase_url = '
             f'"postgresql+psycopg://postgres:s3cret@127.0.0.1:{free_port()}/test"'}
    for expected, node in cases.items():
        (tmp_path / "node.toml").write_text(f"[node]\n{node}\n")
        r = subprocess.run([sys.executable, "-m", "dicom_node", "-c", str(tmp_path / "node.toml"), "serve"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stderr.startswith(f"configuration error: {expected}"), r.stderr
        assert "Traceback" not in r.stderr and "s3cret" not in r.stdout + r.stderr


def test_delivery_keys_are_checked_and_errors_name_them(tmp_path):
    p = tmp_path / "node.toml"
    cases = {
        'retry_initial_seconds = 60\nretry_max_seconds = 10': "destinations[0].retry_max_seconds",
        'give_up_after_hours = 0': "destinations[0].give_up_after_hours",
        'protocol = "stow"\nurl = "http://x/dicom-web"\nstorage_commitment = true':
            "destinations[0].storage_commitment",
        'commitment_max_requests = 0': "destinations[0].commitment_max_requests",
        'probe_seconds = 0': "destinations[0].probe_seconds",
    }
    for extra, key in cases.items():
        p.write_text(f'[[destinations]]\nname = "pacs"\n{extra}\n')
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_settings(p, environ={})
    p.write_text('[notifications]\nwebhooks = ["ftp://x"]\n')
    with pytest.raises(ConfigError, match=re.escape("notifications.webhooks[0]")):
        load_settings(p, environ={})
    p.write_text('[notifications]\nwebhooks = ["http://hooks.example/x"]\ndestination_down_minutes = 5\n'
                 '[sender]\npoll_seconds = 0.5\n[[destinations]]\nname = "pacs"\nstorage_commitment = true\n')
    s = load_settings(p, environ={})
    assert s.notifications.webhooks == ["http://hooks.example/x"] and s.sender.poll_seconds == 0.5
    assert s.destinations[0].storage_commitment and s.destinations[0].retry_max_seconds == 300.0
    assert s.destinations[0].probe_seconds == 15.0


@pytest.mark.parametrize("text, key", [
    ("[scp]\nassociation_request_timeout = 0\n", "scp.association_request_timeout"),
    ("[scp]\nnetwork_timeout = -1\n", "scp.network_timeout"),
    ("[scp]\nmax_associations_per_peer = 0\n", "scp.max_associations_per_peer"),
    ("[scp]\nrequire_called_ae = \"maybe\"\n", "scp.require_called_ae"),
    ("[scp]\nmax_instance_mb = 0\n", "scp.max_instance_mb"),
    ("[scp]\nquarantine_max_mb = -1\n", "scp.quarantine_max_mb"),
    ("[worker]\nmax_megavoxels = -5\n", "worker.max_megavoxels"),
    ('[scp]\nport = 2762\n[scp.tls]\nenabled = true\nport = 2762\ncertificate = "node.toml"\n'
     'private_key = "node.toml"\nca_certificates = "node.toml"\n', "scp.tls.port"),
    ("[scp.tls]\nenabled = true\n", "scp.tls.certificate"),
    ("[scp.tls]\nenabled = true\nsecret = 1\n", "scp.tls.secret"),
    ('[[destinations]]\nname = "p"\ntls = true\nprotocol = "stow"\nurl = "http://x"\n', "destinations[0].tls"),
    ('[[destinations]]\nname = "p"\ntls = true\ntls_ca = "missing-ca.pem"\n', "destinations[0].tls_ca"),
])
def test_hardening_keys_are_validated_by_name(tmp_path, text, key):
    cfg = tmp_path / "node.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_settings(cfg, environ={})


def test_tls_paths_are_relative_to_the_config_file(tmp_path):
    for name in ("node.crt", "node.key", "ca.pem"):
        (tmp_path / name).write_text("x")
    cfg = tmp_path / "node.toml"
    cfg.write_text('[scp.tls]\nenabled = true\ncertificate = "node.crt"\nprivate_key = "node.key"\n'
                   'ca_certificates = "ca.pem"\n')
    s = load_settings(cfg, environ={})
    assert s.scp.tls.certificate == str(tmp_path / "node.crt") and s.scp.tls.ca_certificates == str(tmp_path / "ca.pem")
