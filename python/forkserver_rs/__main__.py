"""``python -m forkserver_rs serve [--preload MODULES] [serve flags]``: the
server, with Python modules preloaded and ``py:MODULE:FUNCTION`` workers."""

import sys


def main(argv):
    if len(argv) < 1 or argv[0] != "serve":
        print(
            "usage: python -m forkserver_rs serve [--preload MODULE,...] [--socket PATH] [...]\n"
            "       python -m forkserver_rs serve --help   (every flag)",
            file=sys.stderr,
        )
        return 2
    from . import _native

    return _native.serve(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
