"""Counters issue 14 item 4 asks for: PROXY header refusals and lock
takeovers, each in XTND STATS (only while non-zero) and in the metrics scrape, equal."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from conftest import USERS, RawClient
from processes import wait_until
from shared import statsreport
from shared.proxyprotocol import v2_header
from shared.stats import Counter
from supervisor import metrics
from test_metrics import _metrics_server, _scrape
from worker import replies as R

IDLE = "1"  # -takeover-idle, as tests/test_takeover.py


def _scraped(server, name: str) -> float:
    _, text = _scrape(server)
    return {s.name: s.value for f in text_string_to_metric_families(text)
            for s in f.samples}[name]


def _stats(client: RawClient) -> dict[str, str]:
    """XTND STATS' values through a client at the greeting (it logs in as alice)."""
    assert client.line().startswith(b"+OK")
    assert client.command("USER alice").startswith(b"+OK")
    assert client.command(f"PASS {USERS['alice']}").startswith(b"+OK")
    assert client.command("XTND STATS") == statsreport.HEADER.encode()
    values, _ = statsreport.parse([line.decode() for line in client.multiline()])
    client.command("QUIT")
    return values


def test_new_counters_are_exported():
    """PROXY refusals and takeovers have their own metric families, fed by their counters."""
    totals = {c: 0 for c in Counter} | {Counter.PROXY_REFUSED: 4, Counter.TAKEOVERS: 2}
    figures = statsreport.Figures("9.9", "INFO", 0.0, 1700000000.0, 1.5, totals, ())
    found = {f.name: f for f in metrics.families(figures, {})}
    assert found["iupop3_proxy_headers_refused"].type == "counter"
    assert found["iupop3_proxy_headers_refused"].samples[0].value == 4
    assert found["iupop3_takeovers"].type == "counter"
    assert found["iupop3_takeovers"].samples[0].value == 2
    shown = statsreport.render(figures)
    assert statsreport.line("Takeovers", 2) in shown
    quiet = statsreport.Figures("9.9", "INFO", 0.0, 1700000000.0, 1.5,
                                {c: 0 for c in Counter}, ())
    assert not any(text.startswith(("Takeovers", "Proxy Refusals"))
                   for text in statsreport.render(quiet))


def test_proxy_refusals_scrape_equals_xtnd_stats(start_server, tmp_path):
    """Two connections refused for their PROXY header: XTND STATS and the scrape say 2."""
    server = _metrics_server(start_server, tmp_path, "-proxy-protocol",
                             "-trusted-networks", "127.0.0.1")
    assert _scraped(server, "iupop3_proxy_headers_refused_total") == 0
    stranger = RawClient(server.port, 10, source="127.0.0.2")
    stranger.send(v2_header(("192.0.2.7", 1)))
    junk = server.raw()
    junk.send(b"USER alice\r\n")
    for client in (stranger, junk):
        assert wait_until(client.closed, 10)
    checker = server.raw()
    checker.send(v2_header(None))
    assert _stats(checker)["Proxy Refusals"] == "2"
    assert _scraped(server, "iupop3_proxy_headers_refused_total") == 2


def test_takeover_is_counted_once_in_stats_and_metrics(start_server, tmp_path):
    """A silent holder ended by a second login counts one takeover, in XTND STATS (absent
    before) and in the scrape."""
    server = _metrics_server(start_server, tmp_path, "-takeover-idle", IDLE)
    before = server.raw()
    assert "Takeovers" not in _stats(before)
    holder = server.raw()
    holder.line()
    holder.command("USER alice")
    assert holder.command(f"PASS {USERS['alice']}").startswith(b"+OK")
    newcomer = server.raw()
    newcomer.line()
    newcomer.command("USER alice")
    assert newcomer.command(f"PASS {USERS['alice']}") == R.LOGIN_OK.encode()
    assert holder.line() == R.TAKEN_OVER.encode() and holder.closed()
    assert newcomer.command("XTND STATS") == statsreport.HEADER.encode()
    values, _ = statsreport.parse([line.decode() for line in newcomer.multiline()])
    assert values["Takeovers"] == "1"
    assert _scraped(server, "iupop3_takeovers_total") == 1
    newcomer.command("QUIT")


def test_login_delay_refusals_are_counted_in_stats_and_metrics(start_server, tmp_path):
    """A good login refused with [LOGIN-DELAY] counts once: XTND STATS shows it while non-zero
    and the scrape's iupop3_logins_refused{reason="login_delay"} equals it."""
    server = _metrics_server(start_server, tmp_path, "-login-delay", "3600")
    first = server.login("bob")
    first.quit()
    raw = RawClient(server.port, 10)
    assert raw.line().startswith(b"+OK")
    raw.command("USER bob")
    assert raw.command(f"PASS {USERS['bob']}").startswith(b"-ERR [LOGIN-DELAY]")
    raw.close()
    values = _stats(RawClient(server.port, 10))
    assert values["Login Delay Refusals"] == "1"
    _, text = _scrape(server)
    refused = {s.labels.get("reason"): s.value for f in text_string_to_metric_families(text)
               for s in f.samples if s.name == "iupop3_logins_refused_total"}
    assert refused["login_delay"] == 1
