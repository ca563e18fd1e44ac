"""deploy/nginx-cluster.conf and deploy/haproxy.cfg in front of three real ``serve
--cluster`` nodes on one PostgreSQL schema, with the real npm client (issue 15).

Each config is run as installed, with only its addresses and certificate paths changed
(tests/test_deploy.py's ``installed``). Through either balancer the npm clients of several
rooms converge and no node forwards a connection: each room's clients all reach the node
the balancer hashes the room to, which owns it. For nginx the test computes that node
itself, as nginx's ``hash ... consistent`` does. Through nginx, a node killed mid-edit
has its rooms served by the next node on the ring within the lease TTL plus a second or
two, nothing acked lost; and a paused node (SIGSTOP: its kernel still accepts
connections) costs a new client about a second (the readiness check's timeout), not the
75 s of ``proxy_read_timeout``; once it wakes it serves nothing it lost. HAProxy's
health checks take a paused node out as well, and a node killed behind it has its room
served again within the TTL plus a second or two.
"""

from __future__ import annotations

import bisect
import itertools
import signal
import subprocess
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from .conftest import node_modules
from .processes import (
    EditorLog,
    Server,
    cluster_nodes,
    editor_processes,
    npm_peer,
    npm_until,
)
from .test_cluster import url
from .test_cluster_failures import check_nothing_lost, one_server_per_timestamp
from .test_cluster_forwarding import metric, owners
from .test_deploy import (
    DEPLOY,
    free_port,
    installed,
    nginx_command,
    nginx_setup,
    nginx_test,
    proxy_process,
    require_tool,
    self_signed_cert,
)

__all__ = ["url"]  # the fixture

pytestmark = [pytest.mark.processes, pytest.mark.node]

NGINX_CLUSTER = DEPLOY / "nginx-cluster.conf"
HAPROXY = DEPLOY / "haproxy.cfg"
EXAMPLE_NODES = ["10.0.0.5:8087", "10.0.0.6:8087", "10.0.0.7:8087"]
TTL = 2.0


# --- the configs, as installed ----------------------------------------------------------


def nginx_cluster_setup(tmp_path: Path, https: int, nodes: list[str]) -> Path:
    return nginx_setup(tmp_path, NGINX_CLUSTER, https=https, http=free_port(), upstreams={
        f"server {example} ": f"server {node} " for example, node in zip(
            EXAMPLE_NODES, nodes, strict=True)})


def haproxy_setup(tmp_path: Path, https: int, nodes: list[str]) -> Path:
    cert, key = self_signed_cert(tmp_path)
    pem = tmp_path / "haproxy.pem"  # HAProxy takes the certificate and its key in one file
    pem.write_text(cert.read_text() + key.read_text())
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(installed(HAPROXY, {
        "bind :443 ssl crt /etc/haproxy/certs/sync.example.com.pem":
            f"bind 127.0.0.1:{https} ssl crt {pem}",
        "bind :80\n": f"bind 127.0.0.1:{free_port()}\n",
        **{f" {example}\n": f" {node}\n" for example, node in zip(
            EXAMPLE_NODES, nodes, strict=True)},
    }))
    return conf


def haproxy_check(conf: Path) -> None:
    """``haproxy -c`` on ``conf`` passes."""
    done = subprocess.run([require_tool("haproxy"), "-c", "-f", str(conf)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Configuration file is valid" in done.stdout + done.stderr


def test_nginx_cluster_config_is_valid(tmp_path: Path) -> None:
    nginx_test(tmp_path, nginx_cluster_setup(tmp_path, free_port(), EXAMPLE_NODES))


def test_haproxy_config_is_valid(tmp_path: Path) -> None:
    haproxy_check(haproxy_setup(tmp_path, free_port(), EXAMPLE_NODES))


# --- nginx's consistent hash ------------------------------------------------------------


def nginx_ring(servers: list[str]) -> list[tuple[int, str]]:
    """The points of ``hash KEY consistent`` over these ``server`` addresses, sorted:
    160 per server (weight 1), each the CRC32 of ``HOST \\0 PORT`` and the previous
    point's hash (little-endian), as nginx's ngx_http_upstream_hash_module builds them."""
    points = []
    for server in servers:
        host, _, port = server.rpartition(":")
        base = zlib.crc32(host.encode() + b"\0" + port.encode())
        previous = 0
        for _ in range(160):
            previous = zlib.crc32(previous.to_bytes(4, "little"), base)
            points.append((previous, server))
    return sorted(points)


def nginx_pick(ring: list[tuple[int, str]], key: str, skip: tuple[str, ...] = ()) -> str:
    """The server nginx sends ``key`` to: the first point at or after CRC32(key), walking
    on past the servers in ``skip`` (failed)."""
    start = bisect.bisect_left(ring, (zlib.crc32(key.encode()), ""))
    for n in range(len(ring)):
        server = ring[(start + n) % len(ring)][1]
        if server not in skip:
            return server
    raise AssertionError("every server skipped")


def rooms_for(ring: list[tuple[int, str]], server: str, count: int, prefix: str) -> list[str]:
    """``count`` room ids that nginx hashes to ``server``."""
    rooms = (f"{prefix}{n}" for n in itertools.count())
    return list(itertools.islice((r for r in rooms if nginx_pick(ring, r) == server), count))


# --- three nodes behind a balancer -------------------------------------------------------


@asynccontextmanager
async def behind(balancer: str, tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch
                 ) -> AsyncIterator[tuple[list[Server], str]]:
    """Three cluster nodes (``n0``..``n2``, lease TTL ``TTL``) behind the running
    ``balancer`` ("nginx" or "haproxy"): (the nodes, the wss:// URL clients are given)."""
    monkeypatch.setenv("NODE_TLS_REJECT_UNAUTHORIZED", "0")  # the test's own certificate
    https = free_port()
    async with cluster_nodes(url, 3, TTL) as nodes:
        addresses = [node.address for node in nodes]
        if balancer == "nginx":
            command = nginx_command(tmp_path, nginx_cluster_setup(tmp_path, https, addresses))
        else:
            conf = haproxy_setup(tmp_path, https, addresses)
            command = [require_tool("haproxy"), "-db", "-f", str(conf)]
        async with proxy_process(command, https):
            if balancer == "haproxy":  # the first health checks pass
                await trio.sleep(0.5)
            yield nodes, f"wss://127.0.0.1:{https}/"


async def forwarded(nodes: list[Server]) -> list[float]:
    """Each node's count of connections it tried to forward (failures included)."""
    return [await metric(node, "canvas_store_forwarded_connections_total") for node in nodes]


@asynccontextmanager
async def editing(base: str, rooms: list[str], url: str) -> AsyncIterator[EditorLog]:
    """Two npm clients per room edit through ``base`` while the block runs (its
    value: their log). Leaving it, they settle, every value a client saw acked is
    stored, and no room timestamp came from two servers."""
    async with editor_processes([base], rooms, 2, node_modules()) as editors:
        yield editors.log
        states = await editors.settle(10)
    await check_nothing_lost(url, editors.log, states)
    one_server_per_timestamp(editors.log)


async def converge(base: str, nodes: list[Server], rooms: list[str], url: str
                   ) -> dict[str, str]:
    """Two npm clients per room edit through ``base`` until every room has acks; then
    they settle, lose nothing, and no node forwarded any of them. The rooms' owners."""
    async with editing(base, rooms, url) as log:
        await log.wait_for("acks in every room", lambda: all(
            len(log.acks_since(0, room)) >= 5 for room in rooms), 20)
        owner = await owners(url)
        sessions = [await metric(node, "canvas_store_sessions") for node in nodes]
    assert set(owner) == set(rooms), owner
    # Every client reached its room's owner directly.
    assert sessions == [2 * list(owner.values()).count(f"n{i}") for i in range(3)], (
        sessions, owner)
    assert await forwarded(nodes) == [0, 0, 0]
    return owner


async def test_npm_clients_through_nginx_reach_the_owner_nginx_hashes_the_room_to(
        tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(40):
        async with behind("nginx", tmp_path, url, monkeypatch) as (nodes, base):
            ring = nginx_ring([node.address for node in nodes])
            rooms = [room for node in nodes for room in rooms_for(ring, node.address, 2, "r")]
            owner = await converge(base, nodes, rooms, url)
            by_address = {node.address: f"n{i}" for i, node in enumerate(nodes)}
            assert owner == {room: by_address[nginx_pick(ring, room)] for room in rooms}


async def test_npm_clients_through_haproxy_reach_one_owner_per_room(
        tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(40):
        async with behind("haproxy", tmp_path, url, monkeypatch) as (nodes, base):
            rooms = [f"r{n}" for n in range(8)]
            owner = await converge(base, nodes, rooms, url)
            assert len(set(owner.values())) >= 2, owner  # the rooms are spread


# --- failures, through nginx -------------------------------------------------------------


async def test_kill_9_a_node_and_nginx_sends_its_rooms_to_the_next_node_within_the_ttl(
        tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(45):
        async with behind("nginx", tmp_path, url, monkeypatch) as (nodes, base):
            addresses = [node.address for node in nodes]
            ring = nginx_ring(addresses)
            victim = nodes[0]
            rooms = [*rooms_for(ring, victim.address, 1, "k"),
                     *rooms_for(ring, nodes[1].address, 1, "k")]
            async with editing(base, rooms, url) as log:
                await log.wait_for("acks in every room", lambda: all(
                    len(log.acks_since(0, room)) >= 10 for room in rooms), 20)
                victim.process.kill()
                killed = trio.current_time()
                await log.wait_for("an ack in the victim's room", lambda: bool(
                    log.acks_since(killed, rooms[0])), TTL + 5)
                served_after = log.acks_since(killed, rooms[0])[0].at - killed
                print(f"kill -9 to the first ack through nginx (ttl {TTL:g} s): "
                      f"{served_after:.2f} s")
                assert served_after < TTL + 2
                # The next node on the ring took the room; the other room never moved.
                heir = nginx_pick(ring, rooms[0], skip=(victim.address,))
                assert (await owners(url)) == {
                    rooms[0]: f"n{addresses.index(heir)}", rooms[1]: "n1"}
                await trio.sleep(0.5)
            # While the victim's lease lived, the heir tried to forward the room's
            # clients to it, and failed (the client got 1013 and retried): nothing was
            # spliced.
            heir_node = nodes[addresses.index(heir)]
            failures = await metric(heir_node, "canvas_store_forward_failures_total")
            assert failures >= 1 and await forwarded([heir_node]) == [failures]


async def synced_in(base: str, room: str, client: str) -> float:
    """Seconds until a new npm client of ``room`` through ``base`` is synced."""
    began = trio.current_time()
    async with npm_peer(base, room, client) as peer:
        await npm_until(peer, lambda report: report["synced"] > 0, timeout=15)
        return trio.current_time() - began


async def test_a_paused_node_costs_a_new_nginx_client_a_second_and_serves_nothing_after(
        tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(60):
        async with behind("nginx", tmp_path, url, monkeypatch) as (nodes, base):
            addresses = [node.address for node in nodes]
            ring = nginx_ring(addresses)
            paused = nodes[0]
            held, fresh, other = rooms_for(ring, paused.address, 3, "p")
            heir = nodes[addresses.index(nginx_pick(ring, held, skip=(paused.address,)))]
            async with editing(base, [held], url) as log:
                await log.wait_for("acks", lambda: len(log.acks_since(0, held)) >= 10, 20)
                assert (await owners(url)) == {held: "n0"}
                paused.process.send_signal(signal.SIGSTOP)
                stopped = trio.current_time()
                times: dict[str, float] = {}

                async def measure(room: str) -> None:
                    times[room] = await synced_in(base, room, f"{room}-new")

                try:
                    async with trio.open_nursery() as nursery:
                        # A room nobody holds: the next node takes it at once. The
                        # paused node's own room: served once its lease lapses.
                        nursery.start_soon(measure, fresh)
                        nursery.start_soon(measure, held)
                    times[other] = await synced_in(base, other, f"{other}-new")
                    print(f"a new client through nginx, one node of three paused "
                          f"(ttl {TTL:g} s): synced after {times}")
                    # Its room: the readiness check's 1 s timeout, and the handshake.
                    assert times[fresh] < 2.5, times
                    # The node is marked failed now: no wait at all.
                    assert times[other] < 1, times
                    # Its room held: the lease lapses, forwarding to it times out (2 s)
                    # meanwhile, and the client retries after 0.5 s.
                    assert times[held] < TTL + 3.5, times
                    assert (await owners(url))[held] == f"n{nodes.index(heir)}"
                    await trio.sleep(max(0.0, TTL + 0.5 - (trio.current_time() - stopped)))
                finally:
                    paused.process.send_signal(signal.SIGCONT)
                woke = trio.current_time()
                # It lost the room while paused: it closes the sessions it still had, its
                # clients reconnect through nginx to the heir, and it acks nothing more.
                await log.wait_for("acks again after SIGCONT", lambda: len(
                    log.acks_since(woke + 0.5, held)) >= 5, 10)
                assert await metric(paused, "canvas_store_sessions") == 0
                assert await metric(heir, "canvas_store_sessions") >= 2
                assert (await owners(url))[held] == f"n{nodes.index(heir)}"
                closes = [code for at, _, _, code in log.closes if at >= stopped]
                print(f"the held room's closes once the node woke: {closes}")
                assert closes.count(1012) == 2, closes  # it closed both of its sessions


async def test_haproxy_takes_a_paused_node_out_and_its_room_is_served_by_another(
        tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(50):
        async with (
            behind("haproxy", tmp_path, url, monkeypatch) as (nodes, base),
            editing(base, ["h"], url) as log,
        ):
            await log.wait_for("acks", lambda: len(log.acks_since(0, "h")) >= 10, 20)
            owner_id = (await owners(url))["h"]
            paused = nodes[int(owner_id[1:])]
            paused.process.send_signal(signal.SIGSTOP)
            try:
                took = await synced_in(base, "h", "h-new")
                print(f"a new client through HAProxy of a paused node's room "
                      f"(ttl {TTL:g} s): synced after {took:.2f} s")
                # Health checks take the node out (2 x 1 s, 1 s timeout) while the
                # lease lapses; a handshake sent to it meanwhile fails after
                # `timeout server` (5 s), and the client retries.
                assert took < 8, took
                assert (await owners(url))["h"] != owner_id
            finally:
                paused.process.send_signal(signal.SIGCONT)
            woke = trio.current_time()
            await log.wait_for("acks again after SIGCONT", lambda: len(
                log.acks_since(woke + 0.5, "h")) >= 5, 10)
            assert await metric(paused, "canvas_store_sessions") == 0


async def test_kill_9_a_node_behind_haproxy_and_its_room_is_served_within_the_ttl(
        tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(45):
        async with (
            behind("haproxy", tmp_path, url, monkeypatch) as (nodes, base),
            editing(base, ["k"], url) as log,
        ):
            await log.wait_for("acks", lambda: len(log.acks_since(0, "k")) >= 10, 20)
            owner_id = (await owners(url))["k"]
            nodes[int(owner_id[1:])].process.kill()
            killed = trio.current_time()
            # The clients reconnect; HAProxy's connection to the dead node is refused
            # and it redispatches to another, which takes the room once its lease
            # lapses (1013 to the clients until then).
            await log.wait_for("an ack after the kill", lambda: bool(
                log.acks_since(killed, "k")), TTL + 5)
            served_after = log.acks_since(killed, "k")[0].at - killed
            print(f"kill -9 to the first ack through HAProxy (ttl {TTL:g} s): "
                  f"{served_after:.2f} s")
            assert served_after < TTL + 2
            assert (await owners(url))["k"] != owner_id
            await trio.sleep(0.5)
