#!/usr/bin/env python3
"""A forkserver client in 60 lines of Python, written from protocol/README.md.

Usage: spawn.py SOCKET PROGRAM [ARGS...]

Runs PROGRAM through the server with its stdout piped back here, prints what
it wrote, and exits with its status (128+N if signal N killed it). Needs the
`msgpack` package (pip install msgpack) and Python 3.9+ for socket.send_fds.
"""
import os
import socket
import sys

import msgpack

MAX_MESSAGE = 65536


def send(sock, message, fds=()):
    socket.send_fds(sock, [msgpack.packb(message)], list(fds))


def recv(sock):
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, 16)
    if not data:
        raise EOFError("the server closed the connection")
    return msgpack.unpackb(data), fds


def main():
    path, program, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    send(sock, {"type": "hello", "protocol": 1, "client": "spawn.py"})
    welcome, _ = recv(sock)
    assert welcome["type"] == "welcome", welcome

    # Our own stderr goes to the child as passed fd 0; stdout comes back as a pipe.
    send(sock, {
        "type": "spawn", "id": 1,
        "target": {"kind": "exec", "program": program, "args": args},
        "stdout": {"kind": "pipe"},
        "stderr": {"kind": "fd", "index": 0},
    }, [sys.stderr.fileno()])
    reply, fds = recv(sock)
    if reply["type"] != "spawned":
        print(f"spawn.py: {reply['kind']}: {reply['message']}", file=sys.stderr)
        return 127 if reply.get("errno") == 2 else 126
    pidfd, stdout = fds[reply["pidfd"]], fds[reply["stdout"]]
    with os.fdopen(stdout, "rb") as pipe:
        sys.stdout.buffer.write(pipe.read())
    os.close(pidfd)

    event, _ = recv(sock)
    assert event["type"] == "exited" and event["id"] == 1, event
    status = event["status"]
    return status["code"] if "code" in status else 128 + status["signal"]


if __name__ == "__main__":
    sys.exit(main())
