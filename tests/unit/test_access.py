"""Who may spend the pool's keys: the pure decisions of `core.access`, table by table."""

from __future__ import annotations

import hmac

import pytest

from kmi_rotor.core import access

# -- is_loopback ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),  # the whole 127/8 is loopback
        ("::1", True),
        ("[::1]", True),
        ("::1%lo", True),
        ("::ffff:127.0.0.1", True),  # IPv4-mapped, as a dual-stack socket reports it
        ("::ffff:7f00:2", True),
        ("localhost", True),
        ("LocalHost", True),
        ("10.231.0.2", False),
        ("192.0.2.1", False),
        ("::ffff:10.0.0.1", False),
        ("fe80::1%eth0", False),
        ("2001:db8::1", False),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("garbage", False),
        ("127.0.0.1:8080", False),
        ("localhost.example.org", False),
        ("999.0.0.1", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert access.is_loopback(host) is expected


# -- exposure ------------------------------------------------------------------------------------

LOOPBACK_HOSTS = ("127.0.0.1", "::1")
OUTSIDE_HOSTS = ("0.0.0.0", "::", "10.200.0.1")


def _expected_state(host: str, allow_remote: bool, authenticated: bool) -> str:
    """The table the module must follow, written out by case rather than derived from it."""
    if host in LOOPBACK_HOSTS:
        return "local"
    if allow_remote and authenticated:
        return "remote_ok"
    return "open" if host == "" else "exposed"


@pytest.mark.parametrize("authenticated", [False, True])
@pytest.mark.parametrize("allow_remote", [False, True])
@pytest.mark.parametrize("host", ["", *LOOPBACK_HOSTS, *OUTSIDE_HOSTS])
def test_exposure_table(host: str, allow_remote: bool, authenticated: bool) -> None:
    exp = access.exposure([host], allow_remote, authenticated)
    state = _expected_state(host, allow_remote, authenticated)
    assert exp.state == state
    if state in ("local", "remote_ok"):
        assert exp.message is None
        return
    assert exp.message is not None
    assert "\n" not in exp.message and exp.message.startswith("kmi-rotor: ")
    assert "--listen-host 127.0.0.1" in exp.message
    if state == "open":
        assert "all interfaces" in exp.message
        assert "only loopback clients get pool keys" in exp.message
        return
    assert f"listening on {host} " in exp.message
    assert "every request for a pool key is refused (403)" in exp.message
    # The fix names both ways out: loopback only, or remote with authentication.
    assert access.FIX in exp.message
    assert "rotor_allow_remote=true" in exp.message and "proxyauth" in exp.message
    assert "[[clients]]" in exp.message
    missing = "without rotor_allow_remote" if authenticated else "without client authentication"
    assert missing in exp.message


@pytest.mark.parametrize(
    ("hosts", "state"),
    [
        ([], "local"),
        (["127.0.0.1", "::1"], "local"),
        (["127.0.0.1", "10.200.0.1"], "exposed"),  # one outside address is enough
        (["", "10.200.0.1"], "exposed"),  # an explicit outside address wins over "everywhere"
        (["127.0.0.1", ""], "open"),
    ],
)
def test_exposure_of_several_listen_hosts(hosts: list[str], state: str) -> None:
    assert access.exposure(hosts, False, False).state == state


def test_exposed_message_names_every_outside_address_but_no_loopback() -> None:
    exp = access.exposure(["127.0.0.1", "10.200.0.1", "::"], False, False)
    assert exp.message is not None
    assert "listening on 10.200.0.1, :: without" in exp.message
    assert "127.0.0.1 " not in exp.message.split("refused")[0]


def test_exposure_accepts_any_iterable() -> None:
    assert access.exposure(iter(["0.0.0.0"]), True, True).state == "remote_ok"


# -- match_token ---------------------------------------------------------------------------------

TOKENS = [("laptop", "tok-laptop-1111"), ("ci", "tok-ci-2222"), ("phone", "tok-phone-3333")]


@pytest.mark.parametrize(
    ("presented", "label"),
    [
        (["tok-ci-2222"], "ci"),
        (["nope", "tok-phone-3333"], "phone"),  # any slot may carry it
        (["tok-laptop-1111", "tok-ci-2222"], "laptop"),  # the first match wins
        (["tok-ci-222"], None),  # a prefix is not the token
        (["tok-ci-22222"], None),
        (["TOK-CI-2222"], None),
        (["nope", "also nope"], None),
        ([], None),
        (["tok-ci-2222 "], None),  # callers strip; the comparison itself is exact
    ],
)
def test_match_token(presented: list[str], label: str | None) -> None:
    assert access.match_token(presented, TOKENS) == label


def test_match_token_without_tokens_matches_nothing() -> None:
    assert access.match_token(["anything", ""], []) is None


def test_match_token_compares_every_pair_with_hmac(monkeypatch: pytest.MonkeyPatch) -> None:
    """Constant time: hmac.compare_digest for each comparison, and all of them, match or not."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(access.hmac, "compare_digest", counting)
    presented = ["tok-laptop-1111", "x", "y"]
    assert access.match_token(presented, TOKENS) == "laptop"
    assert len(calls) == len(presented) * len(TOKENS)
    assert {(a.decode(), b.decode()) for a, b in calls} == {
        (p, t) for p in presented for _, t in TOKENS
    }
    calls.clear()
    assert access.match_token(["x"], TOKENS) is None
    assert len(calls) == len(TOKENS)


def test_match_token_handles_non_ascii() -> None:
    assert access.match_token(["jeton-été"], [("fr", "jeton-été")]) == "fr"
    assert access.match_token(["jeton-ete"], [("fr", "jeton-été")]) is None


# -- presented_credentials -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ({"authorization": "Bearer tok"}, {}, ["tok"]),
        ({"authorization": "bearer   tok  "}, {}, ["tok"]),
        ({"authorization": "BEARER tok"}, {}, ["tok"]),
        ({"authorization": "Basic dXNlcjpwYXNz"}, {}, []),  # proxyauth's business, not ours
        ({"authorization": "Bearer "}, {}, []),
        ({"authorization": "Bearer"}, {}, []),
        ({"authorization": "tok"}, {}, []),
        ({"x-api-key": " tok "}, {}, ["tok"]),
        ({"x-goog-api-key": "tok"}, {}, ["tok"]),
        ({"x-api-key": ""}, {}, []),
        ({}, {"key": "tok"}, ["tok"]),
        ({}, {"api_key": "tok"}, []),
        ({"x-other": "tok"}, {}, []),
        (
            {"authorization": "Bearer a", "x-api-key": "b", "x-goog-api-key": "c"},
            {"key": "d"},
            ["a", "b", "c", "d"],
        ),
        ({}, {}, []),
    ],
)
def test_presented_credentials(
    headers: dict[str, str], query: dict[str, str], expected: list[str]
) -> None:
    assert access.presented_credentials(headers, query) == expected


# -- OwnAddresses: one system call per address a while, not per connection ---------------------


class _Probe:
    def __init__(self, own: set[str]) -> None:
        self.own, self.asked = own, []  # type: set[str], list[str]

    def __call__(self, ip: access.IP) -> bool:
        self.asked.append(str(ip))
        return str(ip) in self.own


def _ip(text: str) -> access.IP:
    ip = access.parse_address(text)
    assert ip is not None
    return ip


@pytest.mark.parametrize(
    ("address", "own", "ttl"), [("192.0.2.7", True, 60.0), ("198.51.100.9", False, 1.0)]
)
def test_own_addresses_remember_a_yes_longer_than_a_no(address: str, own: bool, ttl: float) -> None:
    probe, now = _Probe({"192.0.2.7"}), [1000.0]
    cache = access.OwnAddresses(probe, lambda: now[0], yes_ttl=60.0, no_ttl=1.0)
    assert [cache(_ip(address)) for _ in range(3)] == [own] * 3
    assert probe.asked == [address]
    now[0] += ttl - 0.01
    cache(_ip(address))
    assert probe.asked == [address]
    now[0] += 0.02  # expired: asked again
    cache(_ip(address))
    assert probe.asked == [address, address]


def test_an_address_that_became_ours_is_seen_within_the_short_wait() -> None:
    probe, now = _Probe(set()), [0.0]
    cache = access.OwnAddresses(probe, lambda: now[0], no_ttl=1.0)
    assert cache(_ip("192.0.2.7")) is False
    probe.own.add("192.0.2.7")  # an interface came up
    now[0] += 1.5
    assert cache(_ip("192.0.2.7")) is True


@pytest.mark.parametrize("alias", ["127.0.0.2", "127.1.2.3", "::1", "0.0.0.0"])
def test_loopback_aliases_are_this_machine_whatever_the_cache_says(alias: str) -> None:
    probe = _Probe(set())  # the probe would say "not ours" for anything
    cache = access.OwnAddresses(probe, lambda: 0.0)
    why = access.destination_verdict(
        [_ip(alias)], 8080, client_loopback=True, pool_host=False, listen_ports={8080}, own=cache
    )
    assert why is not None and "this proxy itself" in why
    why = access.destination_verdict(
        [_ip(alias)], 22, client_loopback=False, pool_host=False, listen_ports={8080}, own=cache
    )
    assert why is not None and "this machine" in why


def test_own_addresses_stay_bounded() -> None:
    probe = _Probe(set())
    cache = access.OwnAddresses(probe, lambda: 0.0, limit=4)
    for i in range(10):
        cache(_ip(f"192.0.2.{i}"))
    assert len(cache._known) <= 4
