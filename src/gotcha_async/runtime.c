/*
 * Where CPython 3.11 keeps the calling thread's state: a field of _PyRuntime,
 * a structure the interpreter exports. Read there, the hook finds the thread
 * state with one load instead of a call into libpython, and saves no register
 * for that call (with the rest of its common path, hook.c: from about 46
 * instructions an allocation in a scope to 33).
 * 3.12 and later keep it in a thread-local variable of their own that an
 * extension cannot name, and the hook calls PyThreadState_GetUnchecked().
 *
 * The field's offset comes from the internal headers of the CPython the
 * extension was built against, and a wheel built on one 3.11 release runs on
 * the others: the layout is checked against the running interpreter before the
 * slot is used, and the call stays wherever it does not match.
 */
#include <patchlevel.h>

/* The internal headers need Py_BUILD_CORE from the start. Py_BUILD_CORE_MODULE
 * implies it, as for the standard library's own extension modules, and keeps
 * the interpreter's data imported, not exported, on Windows. */
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030C0000
#  define Py_BUILD_CORE_MODULE 1
#  define HAVE_RUNTIME_SLOT 1
#endif

#include "_meter.h"

#ifdef HAVE_RUNTIME_SLOT
#  include "internal/pycore_runtime.h"
#endif

PyThreadState **
runtime_ts_slot(void)
{
#ifdef HAVE_RUNTIME_SLOT
    PyThreadState **slot = (PyThreadState **)&_PyRuntime.gilstate.tstate_current._value;
    PyInterpreterState *interp = PyInterpreterState_Main();
    /* three fields the running interpreter must hold where the headers put
     * them: the main interpreter well before the slot and just after it, and
     * the calling thread's state in the slot */
    if (_PyRuntime.interpreters.main == interp &&
        _PyRuntime.gilstate.autoInterpreterState == interp && *slot == PyThreadState_Get()) {
        return slot;
    }
#endif
    return NULL;
}
