"""``python -m forkserver_rs serve [--preload MODULES] [serve flags]``: the
server, with Python modules preloaded and ``py:MODULE:FUNCTION`` workers.

``python -m forkserver_rs reload [--exec] [--socket PATH]``: the server loads
its preloads afresh from disk (a new generation); no child or connection is
lost. With ``--exec`` it upgrades in place instead: the server runs its
program again (the Python and the package on disk now), same pid, keeping
every connection and child. Exits 0 once the new generation (or image)
serves, 1 (printing why) if it failed.

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


def main(argv):
    if argv[:1] == ["serve"]:
        from . import _native

        return _native.serve(argv[1:])
    if argv[:1] == ["reload"]:
        return reload(argv[1:])
    if argv[:1] == ["install-hook"]:
        return install_hook(argv[1:])
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
