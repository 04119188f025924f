"""CPython's own bug, shown without gotcha (gh-115874; the fault-injection harness hit it).

No gotcha. CPython 3.12.1's test_generators doctests under unittest; a KeyboardInterrupt is
injected (from a profile hook, i.e. at a bytecode/call boundary, as a signal handler would
raise it) in doctest.DocTestRunner.run's finally block, right after sys.settrace(save_trace):
the same point where the HardLimitError landed. The finally's remaining restores are skipped,
so linecache.getlines stays patched to the runner, which keeps the refleaks doctest's globs
(and its deliberate tee cycle) alive until shutdown. 3.12.1 then segfaults in
teedataobject_clear during finalize_modules (CPython gh-115874);
3.11 and 3.13 exit cleanly.

    python scripts/repro_cpython_gh115874.py    # 3.12.1: exit -11
"""
import doctest, sys, unittest
import test.test_generators as tg

target = sys.argv[1] if len(sys.argv) > 1 else "refleaks"
def prof(frame, event, arg):
    if (event == "c_return" and arg is sys.settrace and frame.f_code.co_name == "run"
            and frame.f_code.co_filename == doctest.__file__ and target in frame.f_locals["test"].name):
        sys.setprofile(None)
        raise KeyboardInterrupt
suite = unittest.TestSuite(t for t in doctest.DocTestSuite(tg) if target in t.id())
sys.setprofile(prof)
try:
    unittest.TextTestRunner(verbosity=0).run(suite)
except KeyboardInterrupt:
    print("interrupted in DocTestRunner.run's finally", flush=True)
import linecache
print("linecache.getlines patched:", getattr(linecache.getlines, "__self__", None) is not None, flush=True)
