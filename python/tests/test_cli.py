"""``python -m forkserver_rs status``, ``ps`` and ``kill``: the forkserver
command's inspection commands, for a Python-only install."""

import json
import subprocess
import sys

import forkserver_rs
from conftest import wait_until


def cli(*args):
    return subprocess.run([sys.executable, "-m", "forkserver_rs", *args],
                          capture_output=True, text=True, timeout=60)


def test_status_ps_and_kill_as_the_forkserver_command(server):
    with forkserver_rs.Client(server.socket) as client:
        children = [client.spawn(["sleep", "30"], detach=True) for _ in range(3)]
        status = cli("status", "--socket", server.socket)
        assert status.returncode == 0, status.stderr
        first = status.stdout.splitlines()[0]
        assert first.startswith("forkserver ") and f"(pid {server.pid}) on {server.socket}" in first, first
        assert "children 3 live" in status.stdout
        assert "module workers (Embedded) preloaded" in status.stdout, status.stdout
        report = json.loads(cli("status", "--json", "--socket", server.socket).stdout)
        assert report["pid"] == server.pid and report["children"] == 3

        table = cli("ps", "--socket", server.socket).stdout.splitlines()
        assert table[0].split() == ["PID", "AGE", "OWNER", "UID", "DETACHED", "TARGET"]
        rows = {int(line.split()[0]): line.split() for line in table[1:]}
        assert set(rows) == {c.pid for c in children}
        assert all(row[4] == "yes" and row[5] == "sleep" for row in rows.values())
        listed = json.loads(cli("ps", "--json", "--socket", server.socket).stdout)
        assert sorted(c["pid"] for c in listed) == sorted(rows)

        killed = cli("kill", "-s", "KILL", str(children[0].pid), "--socket", server.socket)
        assert killed.returncode == 0, killed.stderr
        assert children[0].wait(10) == -9
        assert cli("kill", "--all", "--socket", server.socket).returncode == 0
        for child in children[1:]:
            assert child.wait(10) == -15
        nothing = cli("kill", "--all", "--socket", server.socket)
        assert nothing.returncode == 0 and "no children to signal" in nothing.stderr
        assert wait_until(lambda: client.list() == [])


def test_the_commands_say_what_is_wrong(tmp_path):
    gone = cli("status", "--socket", str(tmp_path / "none.sock"))
    assert gone.returncode == 125 and "no forkserver is listening" in gone.stderr, gone.stderr
    assert cli("kill", "--socket", str(tmp_path / "none.sock")).returncode == 2
    bad = cli("kill", "-s", "NOPE", "1", "--socket", str(tmp_path / "none.sock"))
    assert bad.returncode == 2 and "unknown signal 'NOPE'" in bad.stderr
