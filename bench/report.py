#!/usr/bin/env python3
"""Helpers for bench/run.sh: parse the load generators' output, count TLS hellos in a capture, and
write the summary table.

  report.py wrk FILE            -> key=value lines: requests rps p50_ms p99_ms errors non2xx
  report.py h2load FILE         -> key=value lines: seconds rps done succeeded failed errored
                                   timeout s2xx s3xx s4xx s5xx protocol cipher tempkey
  report.py openloop FILE       -> key=value lines: rate_target rate_achieved requests errors
                                   p50_ms p90_ms p99_ms p999_ms max_ms (examples/bench_openloop)
  report.py pcap FILE PORT      -> key=value lines: client_hellos offered_psk server_hellos
                                   accepted_psk (TLS 1.3 pre_shared_key offered / accepted)
  report.py summary METRICS.tsv PROXIES HEADER.md  -> Markdown on stdout

METRICS.tsv has one `round<TAB>proxy<TAB>metric<TAB>value` per line. PROXIES is a comma list of the
column order; ratios are taken to the proxy named `nginx`. HEADER.md is printed before the table.
"""
import re
import statistics
import struct
import sys

# ---------------------------------------------------------------------------------------------
# wrk / h2load output


def _to_ms(value, unit):
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]
    return float(value) * scale


def parse_wrk(text):
    out = {"errors": 0, "non2xx": 0}
    m = re.search(r"^\s*(\d+) requests in ([\d.]+)(\w+)", text, re.M)
    if m:
        out["requests"] = int(m.group(1))
    m = re.search(r"^Requests/sec:\s*([\d.]+)", text, re.M)
    if m:
        out["rps"] = float(m.group(1))
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
        if m:
            out[key] = _to_ms(m.group(1), m.group(2))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["errors"] = sum(int(g) for g in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        out["non2xx"] = int(m.group(1))
    return out


def parse_h2load(text):
    out = {}
    m = re.search(r"^finished in ([\d.]+)(us|ms|s|m), ([\d.]+) req/s", text, re.M)
    if m:
        out["seconds"] = _to_ms(m.group(1), m.group(2)) / 1000.0
        out["rps"] = float(m.group(3))
    m = re.search(
        r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        text,
        re.M,
    )
    if m:
        for key, val in zip(("total", "started", "done", "succeeded", "failed", "errored", "timeout"), m.groups()):
            out[key] = int(val)
    m = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text, re.M)
    if m:
        for key, val in zip(("s2xx", "s3xx", "s4xx", "s5xx"), m.groups()):
            out[key] = int(val)
    for label, key in (("Application protocol", "protocol"), ("Cipher", "cipher"), ("Server Temp Key", "tempkey"),
                       ("TLS Protocol", "tls")):
        m = re.search(rf"^{label}: (.+)$", text, re.M)
        if m:
            out[key] = m.group(1).strip().replace(" ", "_")
    return out


OPENLOOP_KEYS = ("rate_target", "rate_achieved", "requests", "errors", "p50_ms", "p90_ms", "p99_ms", "p999_ms",
                 "max_ms")


def parse_openloop(text):
    """bench_openloop prints key=value already; this keeps its keys from the rest of the raw file
    (run.sh's command line, stderr). A percentile with no answered request is left empty."""
    out = {}
    for key, val in re.findall(r"^(\w+)=(.*)$", text, re.M):
        if key in OPENLOOP_KEYS:
            out[key] = val.strip()
    return out


# ---------------------------------------------------------------------------------------------
# pcap: TLS 1.3 hellos

PSK_EXT = 41  # pre_shared_key
HRR_RANDOM = bytes.fromhex("CF21AD74E59A6111BE1D8C021E65B891C2A211167ABB8C5E079E09E2C8A8339C")


def _frames(data):
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise SystemExit("report.py pcap: not a classic pcap file (tcpdump -w writes one)")
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    pos = 24
    while pos + 16 <= len(data):
        incl = struct.unpack(endian + "I", data[pos + 8 : pos + 12])[0]
        yield linktype, data[pos + 16 : pos + 16 + incl]
        pos += 16 + incl


def _tcp_payload(linktype, frame):
    if linktype == 1:  # Ethernet (what Linux gives for lo)
        off, ethertype = 14, frame[12:14]
    elif linktype == 113:  # Linux cooked v1
        off, ethertype = 16, frame[14:16]
    elif linktype == 276:  # Linux cooked v2
        off, ethertype = 20, frame[0:2]
    else:
        return None
    ip = frame[off:]
    if ethertype == b"\x08\x00":
        if len(ip) < 20 or ip[9] != 6:
            return None
        tcp = ip[(ip[0] & 0x0F) * 4 :]
    elif ethertype == b"\x86\xdd":
        if len(ip) < 40 or ip[6] != 6:
            return None
        tcp = ip[40:]
    else:
        return None
    if len(tcp) < 20:
        return None
    sport, dport = struct.unpack("!HH", tcp[:4])
    return sport, dport, tcp[(tcp[12] >> 4) * 4 :]


def _hello_extensions(body, is_client):
    """Extension types of a ClientHello/ServerHello body (after the 4-byte handshake header)."""
    p = 2 + 32  # legacy_version, random
    p += 1 + body[p]  # legacy_session_id
    if is_client:
        p += 2 + struct.unpack("!H", body[p : p + 2])[0]  # cipher_suites
        p += 1 + body[p]  # compression methods
    else:
        p += 2 + 1  # cipher suite, compression method
    if p + 2 > len(body):
        return []
    end = min(len(body), p + 2 + struct.unpack("!H", body[p : p + 2])[0])
    p += 2
    types = []
    while p + 4 <= end:
        etype, elen = struct.unpack("!HH", body[p : p + 4])
        types.append(etype)
        p += 4 + elen
    return types


def parse_pcap(path, port):
    with open(path, "rb") as f:
        data = f.read()
    out = {"client_hellos": 0, "offered_psk": 0, "server_hellos": 0, "accepted_psk": 0}
    for linktype, frame in _frames(data):
        seg = _tcp_payload(linktype, frame)
        if seg is None:
            continue
        sport, dport, payload = seg
        if len(payload) < 9 or payload[0] != 0x16:  # handshake record
            continue
        hs_type, body = payload[5], payload[9:]
        try:
            if hs_type == 1 and dport == port:
                out["client_hellos"] += 1
                if PSK_EXT in _hello_extensions(body, True):
                    out["offered_psk"] += 1
            elif hs_type == 2 and sport == port and body[2:34] != HRR_RANDOM:
                out["server_hellos"] += 1
                if PSK_EXT in _hello_extensions(body, False):
                    out["accepted_psk"] += 1
        except (IndexError, struct.error):
            continue
    return out


# ---------------------------------------------------------------------------------------------
# summary

# metric, label, unit/format, which way is better
ROWS = [
    ("h1_rps", "HTTP/1.1 keep-alive req/s (wrk -t1 -c64)", "int", "higher"),
    ("h1_p50_ms", "HTTP/1.1 p50 latency, ms", "2f", "lower"),
    ("h1_p99_ms", "HTTP/1.1 p99 latency, ms", "2f", "lower"),
    ("h1_cpu_us", "HTTP/1.1 proxy CPU per request, µs", "1f", "lower"),
    ("ol50_p50_ms", "HTTP/1.1 p50 at 50 % of limen's saturation, ms", "2f", "lower"),
    ("ol50_p99_ms", "HTTP/1.1 p99 at 50 % of limen's saturation, ms", "2f", "lower"),
    ("ol90_p50_ms", "HTTP/1.1 p50 at 90 % of limen's saturation, ms", "2f", "lower"),
    ("ol90_p99_ms", "HTTP/1.1 p99 at 90 % of limen's saturation, ms", "2f", "lower"),
    ("ol50_rps", "HTTP/1.1 req/s achieved at 50 % of limen's saturation", "int", "higher"),
    ("ol90_rps", "HTTP/1.1 req/s achieved at 90 % of limen's saturation", "int", "higher"),
    ("h2_rps", "HTTP/2 req/s (h2load -c16 -m16)", "int", "higher"),
    ("h2_cpu_us", "HTTP/2 proxy CPU per request, µs", "1f", "lower"),
    ("h3_rps", "HTTP/3 req/s (bench_h3 -c16 -m16)", "int", "higher"),
    ("h3_cpu_us", "HTTP/3 proxy CPU per request, µs", "1f", "lower"),
    ("h3_full_rate", "Full QUIC handshakes/s (+1 request each, 32 at a time)", "int", "higher"),
    ("h3_full_cpu_us", "Proxy CPU per full QUIC handshake (+1 request), µs", "0f", "lower"),
    ("h3_idle_kib", "Memory per idle QUIC connection (after 1 request), KiB", "1f", "lower"),
    ("h2c_rps", "HTTP/2 -> h2c upstream req/s (h2load -c16 -m16)", "int", "higher"),
    ("h2c_cpu_us", "HTTP/2 -> h2c upstream proxy CPU per request, µs", "1f", "lower"),
    ("h1_sys", "HTTP/1.1: system calls per request (--profile)", "2f", "lower"),
    ("h1_cs", "HTTP/1.1: context switches per request (--profile)", "2f", "lower"),
    ("h1_malloc", "HTTP/1.1: glibc mallocs per request (--profile)", "2f", "lower"),
    ("h2_sys", "HTTP/2: system calls per request (--profile)", "2f", "lower"),
    ("h2_cs", "HTTP/2: context switches per request (--profile)", "2f", "lower"),
    ("h2_malloc", "HTTP/2: glibc mallocs per request (--profile)", "2f", "lower"),
    ("h2c_sys", "HTTP/2 -> h2c: system calls per request (--profile)", "2f", "lower"),
    ("h2c_cs", "HTTP/2 -> h2c: context switches per request (--profile)", "2f", "lower"),
    ("h2c_malloc", "HTTP/2 -> h2c: glibc mallocs per request (--profile)", "2f", "lower"),
    ("h1tls_rps", "HTTP/1.1 -> TLS upstream req/s (wrk -t1 -c64)", "int", "higher"),
    ("h1tls_p50_ms", "HTTP/1.1 -> TLS upstream p50 latency, ms", "2f", "lower"),
    ("h1tls_p99_ms", "HTTP/1.1 -> TLS upstream p99 latency, ms", "2f", "lower"),
    ("h1tls_cpu_us", "HTTP/1.1 -> TLS upstream proxy CPU per request, µs", "1f", "lower"),
    ("pq_x25519_cpu_us", "Proxy CPU per full handshake, X25519, rustls client (--pq), µs", "0f", "lower"),
    ("pq_x25519mlkem768_cpu_us", "Proxy CPU per full handshake, X25519MLKEM768, rustls client (--pq), µs", "0f", "lower"),
    ("full_hs_rate", "Full TLS handshakes/s (h2load --h1 -c32, Connection: close)", "int", "higher"),
    ("full_hs_cpu_us", "Proxy CPU per full handshake (+1 request), µs", "0f", "lower"),
    ("res_hs_rate", "Resumed TLS handshakes/s (same, resumption on)", "int", "higher"),
    ("res_hs_cpu_us", "Proxy CPU per resumed handshake (+1 request), µs", "0f", "lower"),
    ("res_hs_pct", "Handshakes resumed in the resumed run, %", "1f", "higher"),
    ("rss_idle_mib", "RSS at start, idle, MiB", "1f", "lower"),
    ("rss_after_mib", "RSS after the load runs, idle, MiB", "1f", "lower"),
    ("rss_peak_mib", "Peak RSS over the load runs (VmHWM), MiB", "1f", "lower"),
    ("idle_hs_kib", "Memory per idle TLS connection (handshake only), KiB", "1f", "lower"),
    ("idle_req_kib", "Memory per idle TLS connection (after 1 request), KiB", "1f", "lower"),
    ("g_none_cpu_us", "Guard rows: no guard, proxy CPU per request, µs", "1f", "lower"),
    ("g_access_cpu_us", "Guard rows: access, 1,000 CIDRs, µs", "1f", "lower"),
    ("g_rate_cpu_us", "Guard rows: rate limit under its rate, µs", "1f", "lower"),
    ("g_basic_cpu_us", "Guard rows: basic auth, bcrypt cost 10, µs", "1f", "lower"),
    ("g_forward_cpu_us", "Guard rows: forward auth to a local service, µs", "1f", "lower"),
    ("g_none_rps", "Guard rows: no guard, req/s (wrk -t1 -c64)", "int", "higher"),
    ("g_access_rps", "Guard rows: access, req/s", "int", "higher"),
    ("g_rate_rps", "Guard rows: rate limit, req/s", "int", "higher"),
    ("g_basic_rps", "Guard rows: basic auth, req/s", "int", "higher"),
    ("g_forward_rps", "Guard rows: forward auth, req/s", "int", "higher"),
    ("a_none_cpu_us", "Action rows: plain route, proxy CPU per request, µs", "1f", "lower"),
    ("a_match_cpu_us", "Action rows: header match among 1,000 routes of one host, µs", "1f", "lower"),
    ("a_regex_cpu_us", "Action rows: regex rewrite, µs", "1f", "lower"),
    ("a_c_none_cpu_us", "Action rows: 64 KiB JSON, not compressed, µs", "1f", "lower"),
    ("a_c_gzip_cpu_us", "Action rows: 64 KiB JSON, gzip, µs", "1f", "lower"),
    ("a_c_br_cpu_us", "Action rows: 64 KiB JSON, br, µs", "1f", "lower"),
    ("a_c_zstd_cpu_us", "Action rows: 64 KiB JSON, zstd, µs", "1f", "lower"),
    ("a_c_gzip_ms_mib", "Compression CPU per MiB, gzip, ms", "2f", "lower"),
    ("a_c_br_ms_mib", "Compression CPU per MiB, br, ms", "2f", "lower"),
    ("a_c_zstd_ms_mib", "Compression CPU per MiB, zstd, ms", "2f", "lower"),
    ("a_c_none_bytes", "Bytes on the wire per answer, not compressed", "int", "lower"),
    ("a_c_gzip_bytes", "Bytes on the wire per answer, gzip", "int", "lower"),
    ("a_c_br_bytes", "Bytes on the wire per answer, br", "int", "lower"),
    ("a_c_zstd_bytes", "Bytes on the wire per answer, zstd", "int", "lower"),
    ("a_none_rps", "Action rows: plain route, req/s (wrk -t1 -c64)", "int", "higher"),
    ("a_match_rps", "Action rows: header match, req/s", "int", "higher"),
    ("a_regex_rps", "Action rows: regex rewrite, req/s", "int", "higher"),
    ("a_c_none_rps", "Action rows: 64 KiB JSON, req/s", "int", "higher"),
    ("a_c_gzip_rps", "Action rows: gzip, req/s", "int", "higher"),
    ("a_c_br_rps", "Action rows: br, req/s", "int", "higher"),
    ("a_c_zstd_rps", "Action rows: zstd, req/s", "int", "higher"),
    ("errors", "Failed or non-2xx requests, all runs", "int", "lower"),
]


def _fmt(value, kind):
    if value is None:
        return "–"
    if kind == "int":
        return f"{value:,.0f}"
    return f"{value:.{kind[0]}f}"


def summary(metrics_path, proxies, header_path):
    proxies = proxies.split(",")
    data = {}  # (proxy, metric) -> [values by round]
    with open(metrics_path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 4:
                continue
            _round, proxy, metric, value = parts
            try:
                data.setdefault((proxy, metric), []).append(float(value))
            except ValueError:
                continue
    with open(header_path) as f:
        sys.stdout.write(f.read())
    others = [p for p in proxies if p != "nginx"]
    cols = ["figure"] + proxies + [f"{p}/nginx" for p in others if "nginx" in proxies] + ["better"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(cols) - 2) + [":---:"]) + "|")
    for metric, label, kind, better in ROWS:
        cells, medians = [label], {}
        if not any((p, metric) in data for p in proxies):
            continue
        for p in proxies:
            vals = data.get((p, metric))
            if not vals:
                cells.append("–")
                continue
            if metric == "errors":
                med = sum(vals)
                cells.append(_fmt(med, kind))
            else:
                med = statistics.median(vals)
                cell = _fmt(med, kind)
                if len(vals) > 1:
                    cell += f" ({_fmt(min(vals), kind)}–{_fmt(max(vals), kind)})"
                cells.append(cell)
            medians[p] = med
        if "nginx" in proxies:
            for p in others:
                a, b = medians.get(p), medians.get("nginx")
                if a is None or b is None or b == 0 or metric in ("errors", "res_hs_pct"):
                    cells.append("–")
                else:
                    cells.append(f"{a / b:.2f}")
        cells.append("↑" if better == "higher" else "↓")
        print("| " + " | ".join(cells) + " |")
    print()
    print("Each cell: median over rounds, (min–max) over rounds; ratios are of the medians. "
          "`errors` is the sum over all rounds.")
    if any(m.startswith("ol") for _p, m in data):
        print()
        print("\"At N % of limen's saturation\": open loop (examples/bench_openloop), a fixed rate of N % of "
              "limen's HTTP/1.1 keep-alive req/s in the same round, the same rate for every proxy; latency is "
              "counted from when each request was due, so queueing behind a slow answer counts.")


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    cmd = sys.argv[1]
    if cmd in ("wrk", "h2load", "openloop"):
        with open(sys.argv[2], errors="replace") as f:
            text = f.read()
        out = {"wrk": parse_wrk, "h2load": parse_h2load, "openloop": parse_openloop}[cmd](text)
    elif cmd == "pcap":
        out = parse_pcap(sys.argv[2], int(sys.argv[3]))
    elif cmd == "summary":
        summary(sys.argv[2], sys.argv[3], sys.argv[4])
        return
    else:
        raise SystemExit(__doc__)
    for key, val in out.items():
        print(f"{key}={val}")


if __name__ == "__main__":
    main()
