"""slimta.util.dns against real name servers: dnsmasq, and scripted ones for SERVFAIL and SOAs."""

from __future__ import annotations

import asyncio
import time

import dns.rcode
import pytest

from dnsmasq import ScriptedDnsServer, silent_udp_port, zone
from slimta.util import dns as sdns
from slimta.util.dns import (
    Answer,
    DnsCache,
    DnsError,
    DnsNotFound,
    MxRecord,
    Resolver,
    parse_host_port,
)

RECORDS = [
    "--mx-host=example.test,mx2.example.test,20",
    "--mx-host=example.test,mx1.example.test,10",
    "--host-record=mx1.example.test,127.0.0.2,::2",
    "--host-record=mx2.example.test,127.0.0.3",
    "--txt-record=example.test,v=spf1 ip4:127.0.0.0/8 -all",
    "--txt-record=long.example.test,part one ,part two",
    "--ptr-record=2.0.0.127.in-addr.arpa,mx1.example.test",
    "--cname=alias.example.test,mx2.example.test",
]


class FakeClock:
    """A monotonic clock that tests move by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- configuration ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5354", ("127.0.0.1", 5354)),
        ("::1", ("::1", 53)),
        ("[::1]:5354", ("::1", 5354)),
        ("[::1]", ("::1", 53)),
        ("mx.example.test:2525", ("mx.example.test", 2525)),
        (" [mx.example.test]:26 ", ("mx.example.test", 26)),
    ],
)
def test_parse_host_port(text, expected):
    assert parse_host_port(text, 53) == expected


@pytest.mark.parametrize("text", ["", ":53", "127.0.0.1:0", "127.0.0.1:65536", "h:x", "[::1]:"])
def test_parse_host_port_rejects(text):
    with pytest.raises(ValueError):
        parse_host_port(text, 53)


def test_nameservers_from_arguments():
    r = Resolver("127.0.0.1:5354, 127.0.0.2 [::1]:54", port=5300)
    assert r.nameservers == [("127.0.0.1", 5354), ("127.0.0.2", 5300), ("::1", 54)]
    assert r.source == "arguments"
    assert Resolver([("127.0.0.9", 99), "::1"]).nameservers == [("127.0.0.9", 99), ("::1", 53)]


def test_nameserver_must_be_an_address():
    with pytest.raises(ValueError, match="IP address"):
        Resolver(["ns.example.test"])


def test_nameservers_from_environment(monkeypatch):
    monkeypatch.setenv("SLIMTA_NAMESERVERS", "127.0.0.1:5354,127.0.0.2:53")
    r = Resolver()
    assert r.nameservers == [("127.0.0.1", 5354), ("127.0.0.2", 53)]
    assert r.source == "SLIMTA_NAMESERVERS"
    # arguments win over the environment
    assert Resolver(["127.0.0.3"]).nameservers == [("127.0.0.3", 53)]


def test_nameservers_from_resolv_conf(monkeypatch, tmp_path):
    monkeypatch.delenv("SLIMTA_NAMESERVERS", raising=False)
    conf = tmp_path / "resolv.conf"
    conf.write_text("search example.test\nnameserver 127.0.0.4\nnameserver ::1\n")
    r = Resolver(resolv_conf=str(conf))
    assert r.nameservers == [("127.0.0.4", 53), ("::1", 53)]
    assert r.source == str(conf)
    monkeypatch.setenv("SLIMTA_NAMESERVERS", "  ")  # blank counts as unset
    assert Resolver(resolv_conf=str(conf)).nameservers == [("127.0.0.4", 53), ("::1", 53)]


async def test_no_nameservers_is_a_temporary_error(monkeypatch, tmp_path):
    monkeypatch.delenv("SLIMTA_NAMESERVERS", raising=False)
    r = Resolver(resolv_conf=str(tmp_path / "missing"))
    assert r.nameservers == []
    with pytest.raises(DnsError, match="no name servers"):
        await r.query_a("example.test")
    with pytest.raises(DnsError):
        await Resolver([]).query_mx("example.test")


# --- queries against dnsmasq ----------------------------------------------------


async def test_query_mx(dnsmasq):
    r = dnsmasq(RECORDS).resolver()
    answer = await r.query_mx("Example.TEST.")
    assert answer == Answer(
        "example.test",
        (MxRecord(10, "mx1.example.test"), MxRecord(20, "mx2.example.test")),
        0,
    )
    assert [mx.exchange for mx in answer] == ["mx1.example.test", "mx2.example.test"]
    assert len(answer) == 2


async def test_query_a_aaaa_txt_ptr(dnsmasq):
    r = dnsmasq(["--local-ttl=300", *RECORDS]).resolver()
    assert (await r.query_a("mx1.example.test")).records == ("127.0.0.2",)
    aaaa = await r.query_aaaa("mx1.example.test")
    assert aaaa.records == ("::2",)
    assert aaaa.ttl == 300
    assert (await r.query_txt("example.test")).records == ("v=spf1 ip4:127.0.0.0/8 -all",)
    # several character-strings in one record are joined without separators
    assert (await r.query_txt("long.example.test")).records == ("part one part two",)
    ptr = await r.query_ptr("127.0.0.2")
    assert ptr.records == ("mx1.example.test",)
    assert ptr.name == "2.0.0.127.in-addr.arpa"


async def test_cname_is_followed(dnsmasq):
    r = dnsmasq(RECORDS).resolver()
    answer = await r.query_a("alias.example.test")
    assert answer.name == "alias.example.test"
    assert answer.records == ("127.0.0.3",)


async def test_null_mx(dnsmasq):
    r = dnsmasq(["--mx-host=null.test,.,0"]).resolver()
    answer = await r.query_mx("null.test")
    assert answer.records == (MxRecord(0, "."),)
    assert answer.records[0].is_null


async def test_nxdomain_and_no_answer(dnsmasq):
    r = dnsmasq(RECORDS).resolver()
    with pytest.raises(DnsNotFound) as info:
        await r.query_mx("nothing.example.test")
    assert info.value.nxdomain
    assert info.value.rdtype == "MX"
    assert str(info.value) == "nothing.example.test does not exist"
    with pytest.raises(DnsNotFound) as info:
        await r.query_mx("mx1.example.test")
    assert not info.value.nxdomain
    assert str(info.value) == "mx1.example.test has no MX record"
    with pytest.raises(DnsNotFound):
        await r.query_aaaa("mx2.example.test")
    with pytest.raises(DnsNotFound):
        await r.query_ptr("127.0.0.9")


async def test_malformed_names(dnsmasq):
    r = dnsmasq(RECORDS).resolver()
    with pytest.raises(DnsNotFound, match="invalid name"):
        await r.query_mx("a..example.test")
    with pytest.raises(DnsNotFound, match="invalid name"):
        await r.query_a("x" * 64 + ".test")
    with pytest.raises(ValueError, match="not an IP address"):
        await r.query_ptr("example.test")


async def test_sync_resolver_has_the_same_servers(dnsmasq):
    server = dnsmasq(RECORDS)
    sync = server.resolver(timeout=0.5).make_sync_resolver()
    answer = await asyncio.to_thread(sync.resolve, "mx2.example.test", "A")
    assert [r.address for r in answer] == ["127.0.0.3"]
    assert sync.timeout == 0.5


# --- failures -----------------------------------------------------------------


async def test_closed_port_is_a_temporary_error(dnsmasq):
    server = dnsmasq(RECORDS)
    r = server.resolver(timeout=0.2, lifetime=0.5)
    server.stop()
    with pytest.raises(DnsError) as info:
        await r.query_mx("example.test")
    assert info.value.rdtype == "MX"


async def test_silent_server_times_out():
    with silent_udp_port() as port:
        r = Resolver([f"127.0.0.1:{port}"], timeout=0.1, lifetime=0.3)
        started = time.monotonic()
        with pytest.raises(DnsError, match="timed out"):
            await r.query_a("example.test")
        assert 0.25 < time.monotonic() - started < 2


async def test_servfail_is_a_temporary_error():
    handler = zone({("ok.test", "A"): ["127.0.0.1"]}, rcodes={"broken.test": dns.rcode.SERVFAIL})
    with ScriptedDnsServer(handler) as server:
        r = Resolver([server.nameserver], timeout=0.2, lifetime=0.5)
        with pytest.raises(DnsError, match="SERVFAIL"):
            await r.query_mx("broken.test")
        assert (await r.query_a("ok.test")).records == ("127.0.0.1",)


async def test_second_nameserver_answers_when_the_first_is_down(dnsmasq):
    server = dnsmasq(RECORDS)
    with silent_udp_port() as port:
        r = Resolver([f"127.0.0.1:{port}", server.nameserver], timeout=0.2, lifetime=2)
        assert (await r.query_a("mx2.example.test")).records == ("127.0.0.3",)


# --- the cache ----------------------------------------------------------------


async def test_answers_are_cached_for_their_ttl(dnsmasq):
    server = dnsmasq(["--local-ttl=300", *RECORDS])
    clock = FakeClock()
    r = server.resolver(cache=DnsCache(clock=clock), timeout=0.2, lifetime=0.5)
    first = await r.query_mx("example.test")
    assert first.ttl == 300
    server.stop()
    clock.now += 100
    again = await r.query_mx("EXAMPLE.test")  # served from the cache: the server is gone
    assert again.records == first.records
    assert again.ttl == 200
    clock.now += 200
    with pytest.raises(DnsError):
        await r.query_mx("example.test")


async def test_cache_caps_the_ttl(dnsmasq):
    server = dnsmasq(["--local-ttl=300", *RECORDS])
    clock = FakeClock()
    r = server.resolver(cache=DnsCache(clock=clock, max_ttl=10), timeout=0.2, lifetime=0.5)
    assert (await r.query_a("mx2.example.test")).ttl == 300
    server.stop()
    clock.now += 9
    assert (await r.query_a("mx2.example.test")).ttl == 1
    clock.now += 1
    with pytest.raises(DnsError):
        await r.query_a("mx2.example.test")


async def test_ttl_zero_is_not_cached(dnsmasq):
    server = dnsmasq(RECORDS)  # dnsmasq's local records have TTL 0 by default
    r = server.resolver(timeout=0.2, lifetime=0.5)
    assert (await r.query_a("mx2.example.test")).ttl == 0
    server.stop()
    with pytest.raises(DnsError):
        await r.query_a("mx2.example.test")


async def test_no_cache(dnsmasq):
    server = dnsmasq(["--local-ttl=300", *RECORDS])
    r = server.resolver(cache=False, timeout=0.2, lifetime=0.5)
    assert r.cache is None
    await r.query_a("mx2.example.test")
    server.stop()
    with pytest.raises(DnsError):
        await r.query_a("mx2.example.test")


async def test_negative_answers_are_cached_with_the_soa_ttl():
    clock = FakeClock()
    handler = zone({("a.test", "A"): ["127.0.0.1"]}, soa_minimum=30)
    with ScriptedDnsServer(handler) as server:
        r = Resolver([server.nameserver], cache=DnsCache(clock=clock), timeout=0.2, lifetime=0.5)
        for _ in range(2):
            with pytest.raises(DnsNotFound) as info:
                await r.query_a("nx.test")
            assert info.value.nxdomain
            with pytest.raises(DnsNotFound) as info:
                await r.query_mx("a.test")
            assert not info.value.nxdomain
        assert len(server.queries) == 2
        clock.now += 30
        with pytest.raises(DnsNotFound):
            await r.query_a("nx.test")
        assert len(server.queries) == 3


async def test_negative_caching_is_short():
    clock = FakeClock()
    handler = zone({}, soa_minimum=86400)
    with ScriptedDnsServer(handler) as server:
        cache = DnsCache(clock=clock, max_negative_ttl=60)
        r = Resolver([server.nameserver], cache=cache, timeout=0.2, lifetime=0.5)
        with pytest.raises(DnsNotFound):
            await r.query_a("nx.test")
        clock.now += 59
        with pytest.raises(DnsNotFound):
            await r.query_a("nx.test")
        assert len(server.queries) == 1
        clock.now += 1
        with pytest.raises(DnsNotFound):
            await r.query_a("nx.test")
        assert len(server.queries) == 2


async def test_negative_answer_without_soa_is_not_cached():
    with ScriptedDnsServer(zone({})) as server:
        r = Resolver([server.nameserver], timeout=0.2, lifetime=0.5)
        for _ in range(2):
            with pytest.raises(DnsNotFound):
                await r.query_a("nx.test")
        assert len(server.queries) == 2


async def test_failures_are_not_cached():
    rcodes = {"flaky.test": dns.rcode.SERVFAIL}
    with ScriptedDnsServer(zone({("flaky.test", "A"): ["127.0.0.1"]}, rcodes=rcodes)) as server:
        r = Resolver([server.nameserver], timeout=0.2, lifetime=0.5)
        with pytest.raises(DnsError):
            await r.query_a("flaky.test")
        rcodes.clear()
        assert (await r.query_a("flaky.test")).records == ("127.0.0.1",)


async def test_concurrent_identical_queries_share_one_request():
    records = {("a.test", "A"): ["127.0.0.1"], ("b.test", "A"): ["127.0.0.2"]}
    with ScriptedDnsServer(zone(records)) as server:
        r = Resolver([server.nameserver], cache=False, timeout=0.5, lifetime=1)
        answers = await asyncio.gather(*(r.query_a(n) for n in ["a.test"] * 5 + ["b.test"] * 3))
        assert [a.records for a in answers] == [("127.0.0.1",)] * 5 + [("127.0.0.2",)] * 3
        assert len(server.queries) == 2


async def test_one_cancelled_caller_does_not_cancel_the_others():
    def slow(query):
        time.sleep(0.2)
        return zone({("a.test", "A"): ["127.0.0.1"]})(query)

    with ScriptedDnsServer(slow) as server:
        r = Resolver([server.nameserver], timeout=1, lifetime=2)
        first = asyncio.ensure_future(r.query_a("a.test"))
        second = asyncio.ensure_future(r.query_a("a.test"))
        await asyncio.sleep(0.05)
        first.cancel()
        assert (await second).records == ("127.0.0.1",)
        assert first.cancelled()


def test_cache_evicts_the_oldest_entries():
    cache = DnsCache(max_entries=2)
    answers = [Answer(f"{n}.test", ("127.0.0.1",), 60) for n in "abc"]
    for n, answer in enumerate(answers):
        cache.put((answer.name, 1), answer, 60)
        assert len(cache) == min(n + 1, 2)
    assert cache.get(("a.test", 1)) is None
    assert cache.get(("c.test", 1)).name == "c.test"
    cache.clear()
    assert len(cache) == 0


# --- the shared resolver ----------------------------------------------------------


async def test_shared_resolver(dnsmasq):
    server = dnsmasq(RECORDS)
    before = sdns.set_resolver(None)
    try:
        mine = server.resolver()
        assert sdns.set_resolver(mine) is None
        assert sdns.get_resolver() is mine
        assert (await sdns.query_mx("example.test")).records[0].exchange == "mx1.example.test"
        assert (await sdns.query_a("mx2.example.test")).records == ("127.0.0.3",)
        assert (await sdns.query_aaaa("mx1.example.test")).records == ("::2",)
        assert (await sdns.query_txt("example.test")).records[0].startswith("v=spf1")
        assert (await sdns.query_ptr("127.0.0.2")).records == ("mx1.example.test",)
    finally:
        sdns.set_resolver(before)


def test_shared_resolver_is_built_from_the_environment(monkeypatch):
    monkeypatch.setenv("SLIMTA_NAMESERVERS", "127.0.0.1:5399")
    before = sdns.set_resolver(None)
    try:
        assert sdns.get_resolver().nameservers == [("127.0.0.1", 5399)]
        assert sdns.get_resolver() is sdns.get_resolver()
    finally:
        sdns.set_resolver(before)


def test_fixture_install_is_undone(dnsmasq):
    before = sdns.set_resolver(None)
    sdns.set_resolver(before)
    server = dnsmasq(RECORDS)
    installed = server.install()
    assert sdns.get_resolver() is installed
    assert installed.nameservers == [("127.0.0.1", server.port)]
    dnsmasq.close()
    assert sdns.set_resolver(before) is before
    assert server.process.poll() is not None
