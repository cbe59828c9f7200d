"""Connection slots under a flood of half-open connections, counted per peer address from TCP accept: one
address that connects, sends the first bytes of an A-ASSOCIATE-RQ and reconnects at each drop holds only its
share of the slots; many such addresses leave the slots kept for the configured peers (the PACS) free.

The listener runs in this process as in tests/test_hostile.py; the flood runs in a separate process (its own
interpreter, as another host would be), from 127.0.0.2 and up; ordinary callers are dcmtk's echoscu from
127.0.0.1, the configured destination's address.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rawdicom as raw
from conftest import DCMTK, ENV, wait_for

from dicom_node.config import ConfigError, load_settings
from dicom_node.receive.connections import (
    LOG_INTERVAL_S,
    ConnectionLedger,
    ConnectionLimits,
    RefusalLog,
)
from dicom_node.receive.scp import StorageSCP
from dicom_node.service import open_storage

ARTIM = 3.0  # scp.association_request_timeout here (the hostile re-run met the default 10 s)

#: Each thread: connect from its address, send the first 10 bytes of an A-ASSOCIATE-RQ, wait to be dropped,
#: reconnect at once; until the deadline or until its stdin is closed. Prints what it saw as JSON.
FLOOD = r"""
import json, socket, sys, threading, time
port, sources, per_source, seconds, partial = int(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3]), \
    float(sys.argv[4]), bytes.fromhex(sys.argv[5])
end = time.monotonic() + seconds
def until_stdin_closes():
    global end
    sys.stdin.read()
    end = time.monotonic()
threading.Thread(target=until_stdin_closes, daemon=True).start()
seen = {"connects": 0, "closed_at_once": 0, "held_to_deadline": 0, "errors": 0}
lock = threading.Lock()
def count(k):
    with lock:
        seen[k] += 1
def run(src):
    while time.monotonic() < end:
        s = socket.socket()
        try:
            s.bind((src, 0))
            s.settimeout(max(0.1, end - time.monotonic()))
            s.connect(("127.0.0.1", port))
            count("connects")
            s.sendall(partial)
            t0 = time.monotonic()
            while s.recv(4096):
                pass
            count("closed_at_once" if time.monotonic() - t0 < 0.5 else "held_to_deadline")
        except socket.timeout:
            pass
        except OSError:
            count("errors")
            time.sleep(0.01)
        finally:
            s.close()
threads = [threading.Thread(target=run, args=(src,)) for src in sources for _ in range(per_source)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(seen))
"""


def make_scp(tmp: Path, extra: str = "") -> StorageSCP:
    """A listener as ``serve`` builds it, with scp.max_associations at its default (64 connection slots) and
    the PACS (a destination) at 127.0.0.1."""
    (tmp / "node.toml").write_text(
        f'[node]\ndata_dir = "{tmp / "var"}"\n[scp]\nbind_address = "127.0.0.1"\nport = 0\nfsync = false\n'
        f'min_free_disk_mb = 1\nnetwork_timeout = 10\nassociation_request_timeout = {ARTIM}\n{extra}\n'
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 4242\n')
    settings = load_settings(tmp / "node.toml")
    db, store = open_storage(settings)
    scp = StorageSCP(settings, db, store)
    scp.start()
    return scp


@pytest.fixture
def scp(tmp_path):
    s = make_scp(tmp_path)
    yield s
    s.stop()
    s.db.dispose()


def flood(port: int, sources: list[str], per_source: int, seconds: float) -> subprocess.Popen:
    partial = raw.associate_rq(abstract_syntaxes=(raw.VERIFICATION,))[:10]
    return subprocess.Popen([sys.executable, "-c", FLOOD, str(port), ",".join(sources), str(per_source),
                             str(seconds), partial.hex()], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def echo_ok(port: int) -> bool:
    r = subprocess.run([DCMTK["echoscu"], "-to", "5", "-aet", "GOODSCU", "-aec", "SEGNODE", "127.0.0.1", str(port)],
                       env=ENV, capture_output=True, text=True, timeout=30)
    return r.returncode == 0


def test_one_address_of_half_open_connections_cannot_fill_the_slots(scp, caplog):
    """70 half-open connections from 127.0.0.2 that reconnect when dropped: that address holds at most its
    share (scp.max_connections_per_peer), C-ECHO from 127.0.0.1 succeeds at least 55 of 60 times, and the
    refusals are logged once per interval, not once per connection."""
    caplog.set_level(logging.WARNING, "dicom_node.receive.acceptor")
    limits = scp.server.limits
    assert (limits.max_connections, limits.per_peer, limits.reserved) == (64, 16, 8)
    attacker = flood(scp.port, ["127.0.0.2"], 70, seconds=50)
    flood_started = time.monotonic()
    try:
        wait_for(lambda: scp.server.ledger.connections_from("127.0.0.2") >= limits.per_peer, 20, 0.1,
                 "the flood to take its share of the slots")
        t0 = time.monotonic()
        held, ok = [], 0
        for _ in range(60):
            ok += echo_ok(scp.port)
            held.append(scp.server.ledger.connections_from("127.0.0.2"))
        elapsed = time.monotonic() - t0
        assert time.monotonic() - t0 < 45
        if elapsed < ARTIM + 1:  # the flood must have been dropped at its deadline and come back meanwhile
            time.sleep(ARTIM + 1 - elapsed)
        # ... and outlast one refusal-log interval, so the next line carries the count of those not logged
        time.sleep(max(0.0, flood_started + LOG_INTERVAL_S + 1 - time.monotonic()))
        assert attacker.poll() is None, "the flood ended before the echoes"
    finally:
        out, _ = attacker.communicate("", timeout=60)
    seen = json.loads(out)
    assert ok >= 55, f"C-ECHO from another address succeeded {ok} of 60 times (flood: {seen})"
    assert max(held) <= limits.per_peer
    assert seen["held_to_deadline"] >= limits.per_peer  # dropped at the ARTIM deadline, and came back
    assert seen["closed_at_once"] > 100  # ... while the connections beyond its share were closed at connect
    refusals = [r.getMessage() for r in caplog.records if "127.0.0.2" in r.getMessage()]
    at_connect = [m for m in refusals if "scp.max_connections_per_peer" in m]
    dropped = [m for m in refusals if "no complete A-ASSOCIATE-RQ" in m]
    # one line per 10 s per address and reason, with the count of those not logged
    assert 1 <= len(at_connect) <= 5 and 1 <= len(dropped) <= 5, refusals
    assert any("more like it in the last 10 s" in m for m in at_connect + dropped), refusals
    wait_for(lambda: scp.server.open_connections == 0, ARTIM + 10, 0.2, "every connection to be closed")


def test_many_flooding_addresses_leave_the_configured_peers_their_slots(scp, caplog):
    """Eight addresses of 16 half-open connections each (128 for 64 slots) fill every slot but those kept for
    the configured peers: the PACS's address (a destination) still gets in, another address does not."""
    sources = [f"127.0.0.{i}" for i in range(2, 10)]
    limits = scp.server.limits
    attacker = flood(scp.port, sources, 16, seconds=20)
    try:
        unreserved = limits.max_connections - limits.reserved
        wait_for(lambda: scp.server.open_connections >= unreserved, 15, 0.1, "the flood to fill the slots")
        stranger = raw.connect(scp.port, "127.0.0.10")
        assert raw.closed_within(stranger, 2.0) is not None  # closed at connect: only reserved slots are free
        stranger.close()
        ok = sum(echo_ok(scp.port) for _ in range(10))
        assert scp.server.open_connections <= limits.max_connections
    finally:
        attacker.communicate("", timeout=60)
    assert ok == 10
    assert "only the 8 connection slots kept for configured peers are free (scp.reserved_connections)" in caplog.text


# ------------------------------------------------------------------------------------------- accounting
def test_limits_derive_from_max_associations_and_keep_room_for_associations():
    assert ConnectionLimits.resolve(16, 8) == ConnectionLimits(64, 16, 8, 16, 8, 2)
    assert ConnectionLimits.resolve(4, 4) == ConnectionLimits(32, 8, 4, 4, 4, 1)  # at least 32 connections
    assert ConnectionLimits.resolve(16, 8, 40, 10, 5, 3) == ConnectionLimits(40, 10, 5, 16, 8, 3)
    assert ConnectionLimits.resolve(1).reserved_associations == 0  # one slot: nothing to keep back
    assert ConnectionLimits.resolve(16, 8, 20).per_peer == 8  # never below max_associations_per_peer


def test_ledger_counts_connections_per_address_from_accept():
    ledger = ConnectionLedger(ConnectionLimits(10, 4, 3, 6, 2), peer_hosts={"10.0.0.1"})
    assert all(ledger.admit("10.0.0.9") == "" for _ in range(4))
    assert "scp.max_connections_per_peer" in ledger.admit("10.0.0.9")
    assert ledger.admit("10.0.0.8") == "" and ledger.admit("10.0.0.8") == "" and ledger.admit("10.0.0.7") == ""
    assert "scp.reserved_connections" in ledger.admit("10.0.0.7")  # 7 of 10 open: the last 3 are reserved
    assert ledger.admit("10.0.0.1") == "" and ledger.admit("10.0.0.1") == "" and ledger.admit("10.0.0.1") == ""
    assert "scp.max_connections" in ledger.admit("10.0.0.1")
    ledger.release("10.0.0.9")
    assert ledger.connections_from("10.0.0.9") == 3 and ledger.connections == 9
    assert "scp.reserved_connections" in ledger.admit("10.0.0.9")
    assert ledger.enter("10.0.0.1") == "" and ledger.enter("10.0.0.1") == ""
    assert "scp.max_associations_per_peer" in ledger.enter("10.0.0.1")


def test_without_configured_peers_no_slot_is_reserved():
    ledger = ConnectionLedger(ConnectionLimits(4, 4, 2, 4, 4, 2))
    assert all(ledger.admit("10.0.0.9") == "" for _ in range(4))
    assert all(ledger.enter("10.0.0.9") == "" for _ in range(4))


def test_the_last_association_slots_are_the_configured_peers(tmp_path, caplog):
    """scp.reserved_associations (here the derived 1 of 4): associations that stay open (a C-ECHO within
    every network_timeout is no flood the deadlines can drop) from two addresses take only the unreserved
    slots; the PACS's address still associates, a third address is rejected with the reason. Before, two such
    addresses held every slot and the PACS was rejected ("local limit exceeded") for as long as they liked."""
    scp = make_scp(tmp_path, "max_associations = 4\nmax_associations_per_peer = 2")
    held = []
    try:
        assert scp.server.limits.reserved_associations == 1
        held += [raw.associate(scp.port, (raw.VERIFICATION,), source="127.0.0.2")[0] for _ in range(2)]
        held.append(raw.associate(scp.port, (raw.VERIFICATION,), source="127.0.0.3")[0])

        def rejected(source: str) -> bool:
            s = raw.connect(scp.port, source)
            try:
                s.sendall(raw.associate_rq(abstract_syntaxes=(raw.VERIFICATION,)))
                pdu = raw.read_pdu(s)
                return pdu is not None and pdu[0] == 0x03
            finally:
                s.close()

        assert rejected("127.0.0.3") and rejected("127.0.0.4")  # the last slot is kept
        assert echo_ok(scp.port)  # the PACS (a destination at 127.0.0.1) gets it
        assert "only the 1 association slots kept for configured peers are free (scp.reserved_associations)" \
            in caplog.text
    finally:
        for s in held:
            raw.release(s)
        scp.stop()
        scp.db.dispose()


def test_refusals_are_logged_once_per_interval_with_the_count(caplog):
    refusals = RefusalLog(interval=0.3)
    for _ in range(50):
        refusals.refused("10.0.0.9", "closed at connect: full")
    refusals.refused("10.0.0.8", "closed at connect: full")
    time.sleep(0.35)
    refusals.refused("10.0.0.9", "closed at connect: full")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["connection from 10.0.0.9 closed at connect: full",
                     "connection from 10.0.0.8 closed at connect: full",
                     "connection from 10.0.0.9 closed at connect: full (and 49 more like it in the last 0.3 s)"]


@pytest.mark.parametrize("text, key", [
    ("max_connections = -1", "scp.max_connections"),
    ("max_associations = 16\nmax_connections = 10", "scp.max_connections"),
    ("max_connections_per_peer = 4", "scp.max_connections_per_peer"),
    ("max_connections = 40\nmax_connections_per_peer = 50", "scp.max_connections_per_peer"),
    ("reserved_connections = 64", "scp.reserved_connections"),
    ("reserved_associations = 16", "scp.reserved_associations"),
    ("reserved_associations = -1", "scp.reserved_associations"),
    ("release_wait_seconds = 0", "scp.release_wait_seconds"),
])
def test_connection_settings_are_checked_naming_the_key(tmp_path, text, key):
    (tmp_path / "node.toml").write_text(f"[scp]\n{text}\n")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(tmp_path / "node.toml")
