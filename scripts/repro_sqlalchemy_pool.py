"""A hard or ceiling scope stops SQLAlchemy's session cleanup too: connections leak.

    python scripts/repro_sqlalchemy_pool.py [hard|ceiling|deadline]

Found by scripts/ecosystem_inject.py. Three ORM sessions in a task group on aiosqlite,
inside a scope that their work breaks. After the first stop, the sessions' ``__aexit__``
(rollback, ``_restore_snapshot``, ``close``, ``expunge_all``; the close in a task
SQLAlchemy shields, which inherits the scope) runs inside the breached scope, allocates
more than the 64 KiB grace and is stopped again: a connection stays checked out.
``deadline`` is the same with ``anyio.move_on_after``: none leaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import anyio
from sqlalchemy import Column, Integer, String, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase

import gotcha_async as gotcha


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id = Column(Integer, primary_key=True)
    name = Column(String(50))


async def one(engine: AsyncEngine, n: int = 3000) -> None:
    async with AsyncSession(engine) as s:
        async with s.begin():
            s.add_all(Item(name=f"row {i}") for i in range(n // 2))
        await s.execute(insert(Item), [{"name": f"core {i}"} for i in range(n // 2)])
        await s.commit()
        (await s.scalars(select(Item))).all()


@contextlib.asynccontextmanager
async def scope(kind: str, budget: int) -> AsyncIterator[None]:
    if kind == "deadline":  # about as far into the work as the budget
        with anyio.move_on_after(0.01 * budget / 1_000_000):
            yield
        return
    kw: dict[str, Any] = {"hard": True} if kind == "hard" else {"ceiling": 2}
    async with gotcha.move_on_limit(bytes=budget, **kw):
        yield


async def main(kind: str) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/db.sqlite")
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    await one(engine, 10)  # the mappers are configured outside any scope
    for budget in (300_000, 1_000_000, 3_000_000, 10_000_000, 30_000_000):
        with contextlib.suppress(TimeoutError):
            async with scope(kind, budget):
                async with asyncio.TaskGroup() as tg:
                    for _ in range(3):
                        tg.create_task(one(engine))
        print(f"{kind} {budget}: checked out {engine.pool.checkedout()}",  # type: ignore[attr-defined]
              flush=True)
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "hard"))
