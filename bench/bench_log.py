"""Event log append throughput through the GroupCommitWriter (not a test).

C concurrent callers each submit N/C publications with history (spread over K channels) and
await each result before the next, as API handlers do. Prints one JSON line per back end:

    .venv/bin/python bench/bench_log.py --rows 50000 --callers 200 --channels 10
    .venv/bin/python bench/bench_log.py --backends sqlite --key   # with idempotency keys
    .venv/bin/python bench/bench_log.py --callers 8 --batch 100   # submit_many, 100 per call

SQLite uses a temporary file; PostgreSQL a unique table prefix, dropped afterwards.
`cpu_us_per_row` is this process's CPU (every thread: the loop and SQLite's worker) per row
over the timed part; PostgreSQL's own CPU is not in it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson
from sqlalchemy.ext.asyncio import create_async_engine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from centripy.engine.contracts import AppendRequest, EventLog
from centripy.engine.types import ClientInfo
from centripy.storage.factory import open_event_log
from centripy.storage.sql_schema import make_tables
from centripy.storage.writer import GroupCommitWriter

PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
INFO = ClientInfo("user-42", "2b3c4d5e-client", b'{"name":"bench"}')


async def run_callers(log: EventLog, args: argparse.Namespace) -> dict[str, object]:
    writer = GroupCommitWriter(log, max_batch=args.max_batch, max_delay=args.max_delay)
    await writer.start()
    per_caller = args.rows // args.callers
    batches: list[int] = []
    original = log.append_many

    async def counting(requests):  # type: ignore[no-untyped-def]
        batches.append(len(requests))
        return await original(requests)

    log.append_many = counting  # type: ignore[method-assign]

    def request(c: int, i: int) -> AppendRequest:
        return AppendRequest(
            f"bench:{(c + i) % args.channels}",
            b'{"caller":%d,"i":%d,"text":"hello world, this is a message"}' % (c, i),
            None if args.plain else INFO,
            () if args.plain else (("kind", "bench"),),
            history_size=args.history_size,
            history_ttl=300.0,
            meta_ttl=3600.0,
            idempotency_key=f"{c}-{i}" if args.key else "",
        )

    async def caller(c: int) -> None:
        step = max(1, getattr(args, "batch", 1))  # >1: submit_many, as an API batch does
        for i in range(0, per_caller, step):
            group = [request(c, j) for j in range(i, min(i + step, per_caller))]
            if step == 1:
                await writer.submit(group[0])
            else:
                await writer.submit_many(group)

    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(caller(c) for c in range(args.callers)))
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_started  # this process, all its threads
    await writer.close()
    rows = per_caller * args.callers
    return {
        "rows": rows,
        "callers": args.callers,
        "channels": args.channels,
        "keys": args.key,
        "plain": args.plain,
        "batch": max(1, getattr(args, "batch", 1)),
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds),
        "cpu_us_per_row": round(cpu / rows * 1e6, 1),
        "batches": len(batches),
        "mean_batch": round(sum(batches) / max(len(batches), 1), 1),
    }


async def bench(backend: str, args: argparse.Namespace) -> dict[str, object]:
    prefix = f"bench{uuid.uuid4().hex[:8]}_"
    with tempfile.TemporaryDirectory() as tmp:
        url = {
            "memory": "memory://",
            "sqlite": f"sqlite+aiosqlite:///{tmp}/bench.db",
            "postgres": args.pg_url,
        }[backend]
        log = open_event_log(url, table_prefix=prefix)
        await log.start()
        try:
            result = await run_callers(log, args)
        finally:
            await log.close()
            if backend == "postgres":
                engine = create_async_engine(url)
                async with engine.begin() as conn:
                    await conn.run_sync(make_tables(prefix).metadata.drop_all)
                await engine.dispose()
    return {"backend": backend, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--callers", type=int, default=200)
    parser.add_argument("--channels", type=int, default=10)
    parser.add_argument("--history-size", type=int, default=100)
    parser.add_argument("--max-batch", type=int, default=100)
    parser.add_argument("--max-delay", type=float, default=0.002)
    parser.add_argument("--batch", type=int, default=1, help="requests per submit_many call")
    parser.add_argument("--key", action="store_true", help="give every publish an idempotency key")
    parser.add_argument(
        "--plain", action="store_true", help="no ClientInfo and tags (as server API publishes)"
    )
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--pg-url", default=PG_URL)
    args = parser.parse_args()
    for backend in args.backends.split(","):
        print(orjson.dumps(asyncio.run(bench(backend, args))).decode(), flush=True)


if __name__ == "__main__":
    main()
