#!/usr/bin/python3
"""capture.py - a packet capture of one TCP port on one interface (stdlib only; needs root).

  capture.py --port 80 --out FILE --ready FILE [--iface lo]

Reads every IPv4 TCP segment to or from --port on --iface with an AF_PACKET socket and a kernel filter (like
tcpdump) and appends one JSON line per segment that carries data or SYN/FIN/RST to --out:
{"t": kernel timestamp, "src", "sport", "dst", "dport", "seq", "flags", "data": base64}.
Run it inside a network namespace with `ip netns exec NS`. SIGTERM: drain what the kernel
queued, write FILE.stats ({"packets", "drops"}), then exit. tests/compat/sdk_clients.py turns the
segments back into HTTP exchanges.
"""
import argparse, base64, ctypes, json, os, select, signal, socket, struct, sys

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35
SO_ATTACH_FILTER = 26
SOL_PACKET, PACKET_STATISTICS = 263, 6
STOP = False


def bpf_tcp_port(port):
    """Classic BPF for "ip and tcp port PORT" on Ethernet frames (tcpdump -dd): the kernel then queues
    only this port's segments, so other loopback traffic cannot overflow the socket (drops)."""
    ins = [(0x28, 0, 0, 12),            # ldh [12]            ethertype
           (0x15, 0, 10, 0x0800),       # jeq IPv4 ? next : drop
           (0x30, 0, 0, 23),            # ldb [23]            IP protocol
           (0x15, 0, 8, 6),             # jeq TCP
           (0x28, 0, 0, 20),            # ldh [20]            fragment offset
           (0x45, 6, 0, 0x1FFF),        # jset -> drop (not the first fragment)
           (0xB1, 0, 0, 14),            # ldxb 4*([14]&0xf)   IP header length
           (0x48, 0, 0, 14),            # ldh [x+14]          source port
           (0x15, 2, 0, port),          # jeq port -> accept
           (0x48, 0, 0, 16),            # ldh [x+16]          destination port
           (0x15, 0, 1, port),          # jeq port -> accept : drop
           (0x06, 0, 0, 262144),        # ret accept
           (0x06, 0, 0, 0)]             # ret drop
    return b"".join(struct.pack("HBBI", *i) for i in ins), len(ins)


def on_term(signum, frame):
    global STOP
    STOP = True


def parse(frame, port):
    """-> dict for a TCP segment to/from port, else None. frame starts with an Ethernet header."""
    if len(frame) < 14:
        return None
    etype = struct.unpack("!H", frame[12:14])[0]
    p = frame[14:]
    if etype == 0x0800 and len(p) >= 20:
        ihl = (p[0] & 0x0F) * 4
        if p[9] != 6:
            return None
        total = struct.unpack("!H", p[2:4])[0]
        src, dst = socket.inet_ntop(socket.AF_INET, p[12:16]), socket.inet_ntop(socket.AF_INET, p[16:20])
        seg = p[ihl:total]
    elif etype == 0x86DD and len(p) >= 40:
        if p[6] != 6:   # no extension headers on loopback TCP
            return None
        plen = struct.unpack("!H", p[4:6])[0]
        src, dst = socket.inet_ntop(socket.AF_INET6, p[8:24]), socket.inet_ntop(socket.AF_INET6, p[24:40])
        seg = p[40:40 + plen]
    else:
        return None
    if len(seg) < 20:
        return None
    sport, dport, seq = struct.unpack("!HHI", seg[:8])
    if port not in (sport, dport):
        return None
    off = (seg[12] >> 4) * 4
    flags = seg[13]
    data = seg[off:]
    if not data and not flags & 0x07:   # pure ACKs are of no interest
        return None
    names = "".join(n for bit, n in ((0x02, "S"), (0x01, "F"), (0x04, "R"), (0x08, "P")) if flags & bit)
    return {"src": src, "sport": sport, "dst": dst, "dport": dport, "seq": seq, "flags": names,
            "data": base64.b64encode(data).decode()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ready", required=True)
    ap.add_argument("--iface", default="lo")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, on_term)
    # Protocol 0: nothing is received until bind() names one, so the filter and the buffer size are in
    # place before the first packet (other loopback traffic must not fill the buffer and count as drops).
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    prog, n = bpf_tcp_port(a.port)
    buf = ctypes.create_string_buffer(prog)
    s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HL", n, ctypes.addressof(buf)))
    s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)   # SO_RCVBUFFORCE (root)
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.bind((a.iface, ETH_P_ALL))
    s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)  # reading the statistics resets them
    s.setblocking(False)
    out = open(a.out, "a")
    with open(a.ready + ".tmp", "w") as f:
        f.write(f"{os.getpid()}\n")
    os.rename(a.ready + ".tmp", a.ready)
    while True:
        if not STOP:
            try:
                select.select([s], [], [], 0.05)
            except InterruptedError:
                pass
        got = 0
        while True:
            try:
                data, anc, _flags, addr = s.recvmsg(262144, 64)
            except (BlockingIOError, InterruptedError):
                break
            got += 1
            if addr[2] == PACKET_OUTGOING:   # loopback shows every packet twice; keep the received copy
                continue
            rec = parse(data, a.port)
            if rec is None:
                continue
            t = None
            for level, kind, val in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", val[:16])
                    t = sec + nsec / 1e9
            rec["t"] = t
            out.write(json.dumps(rec) + "\n")
        out.flush()
        if STOP and got == 0:
            break
    out.close()
    # packets the kernel had to drop (socket buffer full): a capture with drops cannot be trusted
    packets, drops = struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    with open(a.out + ".stats", "w") as f:
        json.dump({"packets": packets, "drops": drops}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
