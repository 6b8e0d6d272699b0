"""Functions the tests start as py:workers:NAME workers."""

import os
import signal
import sys
import time

LOADED_IN = os.getpid()


def add(a, b):
    print(a + b)


def exit_with(code):
    return code


def sys_exit(code):
    sys.exit(code)


def fail(message):
    raise ValueError(message)


def say(message):
    return message  # a non-int result: printed to stderr, status 1


def sleep(seconds):
    time.sleep(seconds)


def environment(name):
    print(os.environ.get(name), os.getcwd(), os.getppid() != 1)


def echo_stdin():
    data = sys.stdin.read()
    sys.stdout.write(data.upper())


def write_fd(fd, text):
    os.write(fd, text.encode())


def sigint_is_keyboard_interrupt():
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    except KeyboardInterrupt:
        return 42
    return 0


def args_and_kwargs(*args, **kwargs):
    print(repr(args), repr(sorted(kwargs.items())))


def where_loaded():
    print(LOADED_IN, os.getppid())


def numpy_dot(a, b):
    import numpy

    return int(numpy.dot(a, b))
