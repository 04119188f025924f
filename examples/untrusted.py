"""Run a coroutine you don't trust with gotcha.run: its result, or LimitExceeded.

    python examples/untrusted.py
"""

import anyio

import gotcha_async as gotcha


async def plugin(n: int) -> int:
    """Third-party code: fine for small n, greedy for large n."""
    cache = []
    for i in range(n):
        cache.append(bytes(1024))
        if i % 100 == 0:
            await anyio.sleep(0)
    return len(cache)


async def main() -> None:
    print("small:", await gotcha.run(plugin, 100, bytes="1 MiB"))
    try:
        await gotcha.run(plugin, 100_000, bytes="1 MiB")
    except gotcha.LimitExceeded as exc:
        print("large:", exc)


if __name__ == "__main__":
    anyio.run(main)
