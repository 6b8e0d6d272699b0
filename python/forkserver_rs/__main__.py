"""``python -m forkserver_rs serve [--preload MODULES] [serve flags]``: the
server, with Python modules preloaded and ``py:MODULE:FUNCTION`` workers.

``python -m forkserver_rs reload [--exec] [--socket PATH]``: the server loads
its preloads afresh from disk (a new generation); no child or connection is
lost. With ``--exec`` it upgrades in place instead: the server runs its
program again (the Python and the package on disk now), same pid, keeping
every connection and child. Exits 0 once the new generation (or image)
serves, 1 (printing why) if it failed.

``python -m forkserver_rs status [--json] [--socket PATH]``, ``ps [--json]
[--socket PATH]``, ``kill [-s SIGNAL] PID|--all [--socket PATH]``: as the
``forkserver`` command's, with the same output.

``python -m forkserver_rs install-hook [--site-dir DIR] [--remove]``: the
opt-in start-up hook (a ``.pth`` file in site-packages) with which an
interpreter that never imports forkserver_rs still knows the start methods
registered by the process that started it (see ``forkserver_rs.register``).
"""

import os
import sys
import sysconfig

USAGE = (
    "usage: python -m forkserver_rs serve [--preload MODULE,...] [--socket PATH] [...]\n"
    "       python -m forkserver_rs serve --help   (every flag)\n"
    "       python -m forkserver_rs reload [--exec] [--socket PATH]\n"
    "       python -m forkserver_rs status|ps [--json] [--socket PATH]\n"
    "       python -m forkserver_rs kill [-s SIGNAL] PID|--all [--socket PATH]\n"
    "       python -m forkserver_rs install-hook [--site-dir DIR] [--remove]"
)

HOOK_FILE = "forkserver_rs-hook.pth"

# One line, run by the site module at every start of an interpreter that
# has this site-packages: with FORKSERVER_RS_CONTEXTS unset (the usual case)
# it costs one dictionary lookup; set, it imports forkserver_rs.context,
# which registers the names.
HOOK_LINE = (
    "import os; os.environ.get('FORKSERVER_RS_CONTEXTS') "
    "and __import__('forkserver_rs.context')\n"
)


def install_hook(argv):
    site_dir = sysconfig.get_paths()["purelib"]
    remove = False
    args = iter(argv)
    for arg in args:
        if arg == "--site-dir":
            site_dir = next(args, None)
            if site_dir is None:
                print("install-hook: --site-dir needs a directory", file=sys.stderr)
                return 2
        elif arg == "--remove":
            remove = True
        else:
            print(f"install-hook: unknown argument {arg!r}\n{USAGE}", file=sys.stderr)
            return 2
    path = os.path.join(site_dir, HOOK_FILE)
    if remove:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        print(f"removed {path}")
        return 0
    try:
        with open(path, "w") as hook:
            hook.write(HOOK_LINE)
    except OSError as exc:
        print(f"install-hook: cannot write {path}: {exc}", file=sys.stderr)
        return 1
    print(f"installed {path}")
    return 0


def reload(argv):
    from .client import Client, ServerError

    upgrade = "--exec" in argv
    argv = [arg for arg in argv if arg != "--exec"]
    if len(argv) not in (0, 2) or argv[:1] not in ([], ["--socket"]):
        print(f"reload: unknown arguments {argv!r}\n{USAGE}", file=sys.stderr)
        return 2
    socket = argv[1] if argv else None
    what = "upgrade" if upgrade else "reload"
    try:
        with Client(socket) as client:
            done = client.upgrade() if upgrade else client.reload()
    except ServerError as exc:
        print(f"forkserver: {what} failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"forkserver: {exc}", file=sys.stderr)
        return 125
    if upgrade:
        print(f"upgraded in place: forkserver {done[0]} serves (was {done[1]})")
    else:
        print(f"generation {done} serves")
    return 0


def _inspect_parser(command):
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m forkserver_rs {command}")
    parser.add_argument("--socket", help="the server's socket (default: as the forkserver command's)")
    if command == "kill":
        parser.add_argument("-s", "--signal", default="TERM", help="a name like TERM or a number")
        parser.add_argument("pid", nargs="?", type=int)
        parser.add_argument("--all", action="store_true", help="every child you may touch")
    else:
        parser.add_argument("--json", action="store_true", help="the server's answer as JSON")
    return parser


def _duration(ms):
    """As the forkserver command prints an age or uptime."""
    secs = ms / 1000
    if secs < 60:
        return f"{secs:.1f}s"
    secs = int(secs)
    if secs < 3600:
        return f"{secs // 60}m{secs % 60:02}s"
    return f"{secs // 3600}h{secs % 3600 // 60:02}m"


def _status_text(r):
    mib = 1 << 20
    lines = [
        f"forkserver {r['server_version']} (pid {r['pid']}) on {r['socket']}",
        f"  up {_duration(r['uptime_ms'])}, RSS {r['rss_bytes'] / mib:.1f} MiB",
        f"  children {r['children']} live, {r['spawns']} started, {r['failures']} failed; "
        f"connections {r['connections']}",
    ]
    for module in r.get("modules", []):
        lines.append(f"  module {module['name']} ({module['kind'].capitalize()}) preloaded in "
                     f"{module['preload_ms']:.1f} ms")
    if r.get("workers"):
        lines.append(f"  workers: {', '.join(r['workers'])}")
    for pool in r.get("pools", []):
        lines.append(f"  pool {pool['worker']}: {pool['idle']} of {pool['size']} idle ({pool['ready']} "
                     f"ready), {pool['hits']} hits, {pool['misses']} misses")
    zygote, generation = r.get("zygote_pid"), r.get("generation", 0)
    if zygote is not None and generation:
        lines.append(f"  zygote: pid {zygote}, generation {generation}, rss "
                     f"{r.get('zygote_rss_bytes', 0) / mib:.1f} MiB (preloads, forks the workers)")
    elif zygote is None and generation:
        lines.append("  zygote: none serving (the next is starting)")
    if r.get("reload_failure"):
        lines.append(f"  the latest reload failed: {r['reload_failure']}")
    stale, count = r.get("stale", []), r.get("stale_count", 0)
    if count:
        lines.append(f"  stale: {count} preloaded file(s) changed on disk since they were loaded "
                     "(workers run the older version; `forkserver reload` loads them):")
        lines += [f"    {path}" for path in stale]
        if count > len(stale):
            lines.append(f"    ... and {count - len(stale)} more")
    return "\n".join(lines) + "\n"


def _ps_table(children):
    lines = [f"{'PID':>8} {'AGE':>10} {'OWNER':>8} {'UID':>6} {'DETACHED':>9}  TARGET"]
    for c in children:
        owner = str(c["owner_pid"]) if c.get("owner_connected") else f"({c['owner_pid']})"
        lines.append(f"{c['pid']:>8} {_duration(c['age_ms']):>10} {owner:>8} {c['owner_uid']:>6} "
                     f"{'yes' if c.get('detached') else 'no':>9}  {c['target']}")
    return "\n".join(lines) + "\n"


def inspect(command, argv):
    """`status`, `ps` and `kill`, as the forkserver command's."""
    import json
    import signal

    from .client import Client, ServerError

    args = _inspect_parser(command).parse_args(argv)
    if command == "kill":
        if (args.pid is None) == (not args.all):
            print("kill: give a PID or --all", file=sys.stderr)
            return 2
        try:
            sig = int(args.signal) if args.signal.isdigit() else getattr(
                signal, "SIG" + args.signal.upper().removeprefix("SIG"))
        except AttributeError:
            print(f"kill: unknown signal '{args.signal}'; use a name like TERM or a number", file=sys.stderr)
            return 2
    try:
        with Client(args.socket) as client:
            if command == "status":
                report = client.status()
                print(json.dumps(report, indent=2) if args.json else _status_text(report), end="\n" if args.json else "")
            elif command == "ps":
                children = client.list()
                print(json.dumps(children, indent=2) if args.json else _ps_table(children), end="\n" if args.json else "")
            else:
                pids = client.kill(args.pid, sig)
                if not pids and args.pid is None:
                    print("forkserver: no children to signal", file=sys.stderr)
    except ServerError as exc:
        print(f"forkserver: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"forkserver: {exc}", file=sys.stderr)
        return 125
    return 0


def main(argv):
    if argv[:1] == ["serve"]:
        from . import _native

        return _native.serve(argv[1:])
    if argv[:1] == ["reload"]:
        return reload(argv[1:])
    if argv[:1] in (["status"], ["ps"], ["kill"]):
        return inspect(argv[0], argv[1:])
    if argv[:1] == ["install-hook"]:
        return install_hook(argv[1:])
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
