"""pymemcache (text protocol) against an open-tenant guard.

Usage: pymemcache_scenario.py HOST PORT. Prints one `ok <check>` line per
check and `RESULT pymemcache <n> checks passed` at the end; exits 1 with a
`FAIL` line at the first wrong answer.
"""

import sys

from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheClientError

checks = 0


def check(name, got, want):
    global checks
    if got != want:
        print(f"FAIL {name}: got {got!r}, want {want!r}", flush=True)
        sys.exit(1)
    checks += 1
    print(f"ok {name}", flush=True)


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    c = Client((host, port), connect_timeout=5, timeout=5)

    check("version", c.version().startswith(b"guard-"), True)
    check("set", c.set("a", "1", noreply=False), True)
    check("get", c.get("a"), b"1")
    check("get miss", c.get("missing"), None)
    check("set noreply", c.set("b", "2"), True)
    check("get_many", c.get_many(["a", "b", "missing"]), {"a": b"1", "b": b"2"})
    check("set_many", c.set_many({"c": "3", "d": "4"}, noreply=False), [])
    check("get_many after set_many", c.get_many(["c", "d"]), {"c": b"3", "d": b"4"})

    check("set counter", c.set("n", "10", noreply=False), True)
    check("incr", c.incr("n", 5), 15)
    check("decr", c.decr("n", 3), 12)
    check("decr floors at 0", c.decr("n", 100), 0)
    check("incr miss", c.incr("no-counter", 1), None)

    value, cas = c.gets("a")
    check("gets value", value, b"1")
    check("gets cas is a number", cas.isdigit(), True)
    check("cas with the right token", c.cas("a", "2", cas, noreply=False), True)
    check("cas with a stale token", c.cas("a", "3", cas, noreply=False), False)
    check("cas on a miss", c.cas("missing", "x", b"1", noreply=False), None)
    check("get after cas", c.get("a"), b"2")

    check("delete", c.delete("a", noreply=False), True)
    check("delete again", c.delete("a", noreply=False), False)
    check("get after delete", c.get("a"), None)

    check("touch", c.touch("b", 100, noreply=False), True)
    check("touch miss", c.touch("missing", 100, noreply=False), False)

    check("add new", c.add("a", "x", noreply=False), True)
    check("add existing", c.add("a", "y", noreply=False), False)
    check("replace existing", c.replace("a", "y", noreply=False), True)
    check("replace miss", c.replace("missing", "y", noreply=False), False)
    check("append", c.append("a", "z", noreply=False), True)
    check("prepend", c.prepend("a", "w", noreply=False), True)
    check("get after append/prepend", c.get("a"), b"wyz")

    # The open tenant's keys may be 250 - len("_:0000000:") = 240 bytes.
    check("240-byte key", c.set("k" * 240, "long", noreply=False), True)
    check("get 240-byte key", c.get("k" * 240), b"long")
    try:
        c.set("k" * 241, "long", noreply=False)
        check("241-byte key refused", "stored", "CLIENT_ERROR")
    except MemcacheClientError as e:
        check("241-byte key refused", "bad command line format" in str(e), True)
    # That error left the data line to be read as a command, as memcached
    # does; start over on a fresh connection.
    c.close()

    check("set survivor", c.set("survivor", "s", noreply=False), True)
    check("flush_all", c.flush_all(noreply=False), True)
    check("get after flush_all", c.get_many(["a", "b", "survivor"]), {})
    check("set after flush_all", c.set("a", "fresh", noreply=False), True)
    check("get after flush_all and set", c.get("a"), b"fresh")

    stats = c.stats()
    check("stats name the tenant", stats.get(b"tenant"), b"default")
    check("stats count flushes", stats.get(b"cmd_flush"), 1)
    c.close()
    print(f"RESULT pymemcache {checks} checks passed", flush=True)


main()
