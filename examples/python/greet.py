"""A module for the README's Python example: the server imports it (it is
on the server's PYTHONPATH) and a client runs `py:greet:main` in a fork."""


def main(name="world"):
    print(f"hello, {name}")
