"""python-binary-memcached (binary protocol, SASL PLAIN) against a guard
with tenants.

Usage: bmemcached_scenario.py HOST PORT USER PASSWORD RO_USER RO_PASSWORD.
Prints one `ok <check>` line per check and `RESULT bmemcached <n> checks
passed` at the end; exits 1 with a `FAIL` line at the first wrong answer.
"""

import sys

import bmemcached
from bmemcached.exceptions import InvalidCredentials, MemcachedException

checks = 0


def check(name, got, want):
    global checks
    if got != want:
        print(f"FAIL {name}: got {got!r}, want {want!r}", flush=True)
        sys.exit(1)
    checks += 1
    print(f"ok {name}", flush=True)


def main():
    host, port, user, password, ro_user, ro_password = sys.argv[1:7]
    server = f"{host}:{port}"

    c = bmemcached.Client([server], user, password, socket_timeout=5)
    check("set", c.set("k", "v"), True)
    check("get", c.get("k"), "v")
    check("get miss", c.get("missing"), None)
    check("set bytes", c.set("b", b"\x00\x01binary"), True)
    check("get bytes", c.get("b"), b"\x00\x01binary")
    check("set int", c.set("i", 42), True)
    check("get int", c.get("i"), 42)
    check("get_multi", c.get_multi(["k", "b", "missing"]), {"k": "v", "b": b"\x00\x01binary"})
    check("incr creates at the default", c.incr("n", 5, default=10), 10)
    check("incr", c.incr("n", 5), 15)
    check("decr", c.decr("n", 3), 12)
    check("delete", c.delete("k"), True)
    check("get after delete", c.get("k"), None)
    check("add", c.add("k", "again"), True)
    check("add existing", c.add("k", "x"), False)
    check("replace", c.replace("k", "replaced"), True)
    check("get after replace", c.get("k"), "replaced")

    # A read-only credential of the same tenant reads the same keys and is
    # refused every write with status 0x24.
    ro = bmemcached.Client([server], ro_user, ro_password, socket_timeout=5)
    check("read-only get", ro.get("k"), "replaced")
    for name, write in [
        ("set", lambda: ro.set("k", "nope")),
        ("delete", lambda: ro.delete("k")),
        ("incr", lambda: ro.incr("n", 1)),
    ]:
        try:
            got = write()
        except MemcachedException as e:
            got = e.code
        check(f"read-only {name} refused with 0x24", got, 0x24)
    check("read-only writes changed nothing", (c.get("k"), c.get("n")), ("replaced", "12"))

    bad = bmemcached.Client([server], user, password + "-wrong", socket_timeout=5)
    # memcached answers a failed SASL_AUTH with 0x20, as guard does; this
    # library only maps 0x08 to InvalidCredentials, so 0x20 arrives as a
    # MemcachedException with that code.
    try:
        bad.set("k", "bad")
        check("wrong password refused", "accepted", "refused")
    except InvalidCredentials:
        check("wrong password refused", True, True)
    except MemcachedException as e:
        check("wrong password refused with 0x20", e.code, 0x20)
    check("value untouched by the refused client", c.get("k"), "replaced")

    c.disconnect_all()
    ro.disconnect_all()
    print(f"RESULT bmemcached {checks} checks passed", flush=True)


main()
