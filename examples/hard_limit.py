"""Guard code that never awaits: a hard limit refuses the allocation itself.

    python examples/hard_limit.py
"""

import anyio

import gotcha_async as gotcha


def greedy(buf: list[bytearray]) -> None:
    """Untrusted code with no checkpoint at all, which even swallows MemoryError."""
    for _ in range(1_000_000):
        try:
            buf.append(bytearray(1024))
        except MemoryError:
            pass  # keeps trying: refused again past the grace, until its loop fails


async def bystander(done: anyio.Event) -> None:
    total = 0
    while not done.is_set():
        total += len(bytearray(64 * 1024))  # never refused: not in the hard scope
        await anyio.sleep(0)
    print(f"bystander allocated {total:,} bytes, untouched")


async def main() -> None:
    done = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(bystander, done)
        await anyio.sleep(0)
        kept: list[bytearray] = []
        async with gotcha.move_on_limit(bytes=4 * gotcha.MiB, hard=True) as ctx:
            greedy(kept)
        print(f"greedy was stopped holding {len(kept):,} KiB")
        print(f"exceeded: {ctx.exceeded()}, charged {ctx.used().bytes:,} bytes "
              f"(limit {4 * gotcha.MiB:,} + grace {gotcha.GRACE['bytes']:,})")
        done.set()


if __name__ == "__main__":
    anyio.run(main)
