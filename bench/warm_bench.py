"""Cache warming after a hard site purge (issue 10), against real nginx and a 50 ms origin.

Debian's nginx caches one site (``levels=1:2``, ``use_temp_path=off``) in front of a FastCGI origin
(harness/fastcgi.py) that takes ``--delay`` per page; ``twistd cachesvc`` runs with
``purge.warm.enabled`` and ``concurrency: --concurrency``, its origin nginx's listen address.
``--pages`` pages are cached with visitor GETs (the origin fast while filling), then the origin is
slowed to ``--delay`` and the zone is purged hard (``/cache/<zone>``). From the reply on, only the
cache files are watched, every 0.2 s (fresh, with a newer answer of the origin in the body = nginx
cached a warm response), so the benchmark itself warms nothing; once they are back (or after 3 x
the ideal), every page is requested once and its ``X-Cache-Status`` counted.

Reference: the ideal warm-up, pages x delay / concurrency (1,000 x 50 ms / 4 = 12.5 s). Targets:
99 % of the pages HITs again within 1.3 x the ideal; the origin never sees more than
``--concurrency`` requests at once.

    .venv/bin/python bench/warm_bench.py [--pages 1000] [--delay 0.05] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))

from harness.fastcgi import overlap  # noqa: E402
from harness.nginx import OK, Site, Stack, page_on_disk  # noqa: E402

HOST = "warm.example"


def warm_yaml(concurrency: int, pages: int) -> str:
    return f"""
        warm:
          enabled: true
          origins: {{http: "{{origin}}"}}
          concurrency: {concurrency}
          max_entries: {max(pages, 10000)}
          slow_response: 2s
          timeout: 10s
    """


def back(pending: set[Path], before: dict[Path, int]) -> None:
    """Drop from *pending* the entries nginx has cached anew (fresh, a newer answer of the origin)."""
    for path in list(pending):
        number = page_on_disk(path)
        if number is not None and number > before[path]:
            pending.discard(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=1000)
    parser.add_argument("--delay", type=float, default=0.05, help="the origin's seconds per page while warming")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    ideal = args.pages * args.delay / args.concurrency
    site = Site(HOST, use_temp_path=False, keys_zone="16m")
    print(f"warm-up benchmark on {sys.platform}, {len(os.sched_getaffinity(0))} cores")
    with Stack([site], purge_yaml=warm_yaml(args.concurrency, args.pages)) as stack:
        urls = [f"/post/{i}/" for i in range(args.pages)]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda u: stack.until_hit(HOST, u), urls))
        paths = [stack.file(HOST, u) for u in urls]
        before = {p: page_on_disk(p) or 0 for p in paths}
        print(f"{args.pages} pages cached; the origin now takes {args.delay * 1000:.0f} ms a page")

        stack.fcgi.delay = args.delay
        mark = stack.fcgi.mark()
        stack.fcgi.reset_peak()
        started = time.perf_counter()
        assert stack.purge(f"{stack.zone(HOST)}") == OK
        reply = time.perf_counter() - started
        need = -(-args.pages * 99 // 100)
        t99 = t100 = None
        pending = set(paths)
        while time.perf_counter() - started < 3 * ideal + 10:
            back(pending, before)
            done = args.pages - len(pending)
            now = time.perf_counter() - started
            if t99 is None and done >= need:
                t99 = now
            if done == args.pages:
                t100 = now
                break
            time.sleep(0.2)
        on_disk = args.pages - len(pending)
        stack.fcgi.delay = 0.0
        stack.wait(lambda: all(r.ended is not None for r in stack.fcgi.seen(mark)), 30, "warm requests answered")
        requests = stack.fcgi.seen(mark)
        statuses = Counter(stack.status(HOST, u) for u in urls)
        warm = [r for r in requests if r.user_agent.startswith("cachesvc-warm/")]
        log_line = next((line for line in reversed(stack.log.splitlines()) if re.search(r"warm", line, re.I)), "")

    print(f"\nhard site purge of {args.pages} pages, warming concurrency {args.concurrency}")
    print(f"purge reply: {reply * 1000:.1f} ms")
    print(f"{'figure':<44}{'value':>10}  reference")
    print(f"{'ideal warm-up (pages x delay / concurrency)':<44}{ideal:>9.2f}s")
    if t99 is not None:
        ratio = t99 / ideal
        verdict = "MET" if ratio <= 1.3 else "MISSED"
        print(f"{'99 % back in the cache':<44}{t99:>9.2f}s  ratio {ratio:.2f} to the ideal (target <= 1.3: {verdict})")
    else:
        print(f"{'99 % back in the cache':<44}{'never':>10}  ({on_disk} of {args.pages} within {3 * ideal + 10:.0f} s)")
    print(f"{'100 % back in the cache':<44}{(f'{t100:.2f}s' if t100 else 'never'):>10}")
    peak_verdict = "MET" if stack.fcgi.peak <= args.concurrency else "MISSED"
    print(f"{'peak origin concurrency':<44}{stack.fcgi.peak:>10}  limit {args.concurrency} ({peak_verdict})")
    print(f"{'max overlap of warm requests':<44}{overlap(warm):>10}")
    print(f"{'origin requests: warm / other':<44}{f'{len(warm)} / {len(requests) - len(warm)}':>10}")
    after = ", ".join(f"{k} {v}" for k, v in statuses.most_common())
    print(f"{'X-Cache-Status of one GET each afterwards':<44}{after:>10}")
    if log_line:
        print(f"daemon: {log_line.strip()[:300]}")


if __name__ == "__main__":
    main()
