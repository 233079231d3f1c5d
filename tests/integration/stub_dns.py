"""A stub DNS server for the image tests: answers A queries for the names it is given, NODATA for
other types of those names, NXDOMAIN for anything else, over UDP. Every query is appended to the log
as one line "NAME TYPE". Runs until killed.
  stub_dns.py ADDR LOGFILE NAME=IPV4 [NAME=IPV4 ...]"""
import socket
import struct
import sys

A, AAAA = 1, 28
TYPES = {A: "A", AAAA: "AAAA"}


def parse_question(msg):
    """(id, flags, name, qtype, end offset of the question) of a query with one question."""
    qid, flags, qdcount = struct.unpack("!HHH", msg[:6])
    if qdcount != 1:
        raise ValueError("one question expected")
    labels, i = [], 12
    while msg[i]:
        n = msg[i]
        if n & 0xC0:
            raise ValueError("compressed name in a question")
        labels.append(msg[i + 1:i + 1 + n].decode("ascii").lower())
        i += 1 + n
    qtype, _qclass = struct.unpack("!HH", msg[i + 1:i + 5])
    return qid, flags, ".".join(labels), qtype, i + 5


def answer(msg, records):
    qid, flags, name, qtype, end = parse_question(msg)
    question = msg[12:end]
    rd = flags & 0x0100
    ip = records.get(name.rstrip("."))
    if ip is None:
        return struct.pack("!HHHHHH", qid, 0x8000 | 0x0400 | rd | 0x0080 | 3, 1, 0, 0, 0) + question, name, qtype
    head = 0x8000 | 0x0400 | rd | 0x0080   # response, authoritative, recursion available, NOERROR
    if qtype != A:
        return struct.pack("!HHHHHH", qid, head, 1, 0, 0, 0) + question, name, qtype
    rr = b"\xc0\x0c" + struct.pack("!HHIH", A, 1, 5, 4) + socket.inet_aton(ip)
    return struct.pack("!HHHHHH", qid, head, 1, 1, 0, 0) + question + rr, name, qtype


def main():
    addr, log = sys.argv[1], sys.argv[2]
    records = dict(arg.lower().split("=", 1) for arg in sys.argv[3:])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, 53))
    print("ready", flush=True)
    while True:
        msg, peer = s.recvfrom(512)
        try:
            reply, name, qtype = answer(msg, records)
        except (ValueError, IndexError, struct.error, UnicodeDecodeError):
            continue
        with open(log, "a") as f:
            f.write(f"{name} {TYPES.get(qtype, qtype)}\n")
        s.sendto(reply, peer)


if __name__ == "__main__":
    main()
