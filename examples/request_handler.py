"""Every request in its own budget: one bad request can't take the others down.

    python examples/request_handler.py
"""

import json

import anyio

import gotcha_async as gotcha


async def handle(body: str) -> dict[str, object]:
    items = json.loads(body)
    if items.get("explode"):
        # a request that builds a huge answer
        return {"rows": [str(i) * 10 for i in range(1_000_000)]}
    await anyio.sleep(0)
    return {"total": sum(items["values"])}


async def serve(name: str, body: str) -> None:
    try:
        # hard: the hog builds its answer without a single await, a soft limit would let
        # it finish; a hard one refuses the allocation that would go over
        async with gotcha.limit(bytes=4 * gotcha.MiB, hard=True) as ctx:
            answer = await handle(body)
        print(f"{name}: 200 {json.dumps(answer)[:40]} ({ctx.used().bytes:,} bytes)")
    except gotcha.LimitExceeded as exc:
        print(f"{name}: 503 {exc}")


async def main() -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(serve, "small", json.dumps({"values": [1, 2, 3]}))
        tg.start_soon(serve, "hog", json.dumps({"explode": True}))
        tg.start_soon(serve, "another", json.dumps({"values": list(range(100))}))


if __name__ == "__main__":
    anyio.run(main)
