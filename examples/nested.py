"""The Go library's nested example, in Python.

    python examples/nested.py
"""

import anyio

import gotcha_async as gotcha


async def main() -> None:
    v: list[int] = []
    async with gotcha.move_on_limit(bytes=gotcha.KiB) as ctx:  # a one-kibibyte budget
        v = [0] * 100
        b, o, c = ctx.used()
        print("initial allocation", b, o, c)
        async with gotcha.limit() as child:  # nested: charged to ctx as well
            v = [0] * 5000
            b, o, c = child.used()
            print("derived allocation", b, o, c)
        await ctx  # like <-ctx.Done(): returns at once, the budget is gone
        b, o, c = ctx.used()
        print("total allocations", b, o, c)
    print(len(v), ctx.exceeded())


if __name__ == "__main__":
    anyio.run(main)
