/*
 * Where the interpreter keeps the calling thread's state, for the hook to read
 * with a load or two instead of a call into libpython. The call costs the hook
 * more than its own work (3.13: 13 instructions an allocation of its 26 or so,
 * with the two registers it saves), and the hook runs on every allocation.
 *
 * CPython 3.11 keeps it in a field of _PyRuntime, a structure the interpreter
 * exports. The field's offset comes from the internal headers of the CPython
 * the extension was built against, and a wheel built on one 3.11 release runs
 * on the others: the layout is checked against the running interpreter before
 * the slot is used.
 *
 * 3.12 and later keep it in a thread-local variable (_Py_tss_tstate) that an
 * extension cannot name: it is not exported, and stripped builds have no
 * symbol for it at all. Where the interpreter's thread-local block sits at the
 * same distance from the thread pointer in every thread (static TLS: libpython
 * or the executable loaded at startup, the usual case), the variable is found
 * in that block by what it does: the one slot that holds the calling thread's
 * state while it is attached, and NULL once PyEval_SaveThread() has detached
 * it. Anything else (a libpython loaded with dlopen(), whose block each thread
 * allocates apart, another platform) keeps the call.
 *
 * Either way the check runs once, at install, and a failed one keeps the call:
 * a wrong guess here would charge allocations to a thread that did not make
 * them, so nothing is assumed that was not seen.
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

#ifdef HAVE_TLS_SLOT
#  include <link.h>
#  include <pthread.h>
#endif

PyThreadState **ts_slot;
intptr_t ts_tls_offset;

#ifdef HAVE_RUNTIME_SLOT
static int
find_runtime_slot(void)
{
    PyThreadState **slot = (PyThreadState **)&_PyRuntime.gilstate.tstate_current._value;
    PyInterpreterState *interp = PyInterpreterState_Main();
    /* three fields the running interpreter must hold where the headers put
     * them: the main interpreter well before the slot and just after it, and
     * the calling thread's state in the slot */
    if (_PyRuntime.interpreters.main == interp &&
        _PyRuntime.gilstate.autoInterpreterState == interp && *slot == PyThreadState_Get()) {
        ts_slot = slot;
        return 1;
    }
    return 0;
}
#endif

#ifdef HAVE_TLS_SLOT
/* The interpreter's module (libpython, or the executable it is linked into),
 * and the calling thread's instance of its thread-local block. */
typedef struct {
    uintptr_t code;   /* an address inside the module: one of its functions */
    char *block;      /* NULL: no block, or none allocated in this thread */
    size_t size;
    char *tp;         /* the thread pointer of the thread that looked */
} TlsBlock;

static int
find_block(struct dl_phdr_info *info, size_t size, void *arg)
{
    TlsBlock *b = arg;
    if (size < offsetof(struct dl_phdr_info, dlpi_tls_data) + sizeof info->dlpi_tls_data) {
        return 1;   /* an old libc: no dlpi_tls_data to go by */
    }
    int holds = 0;
    size_t tls = 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        uintptr_t start = info->dlpi_addr + ph->p_vaddr;
        if (ph->p_type == PT_LOAD && b->code >= start && b->code - start < ph->p_memsz) {
            holds = 1;
        }
        if (ph->p_type == PT_TLS) {
            tls = ph->p_memsz;
        }
    }
    if (!holds) {
        return 0;
    }
    b->block = tls == 0 ? NULL : info->dlpi_tls_data;
    b->size = tls;
    return 1;
}

static void *
look_from_another_thread(void *arg)
{
    TlsBlock *b = arg;
    b->tp = thread_pointer();
    dl_iterate_phdr(find_block, b);
    return NULL;
}

#define MAX_SLOTS 64

static int
find_tls_slot(void)
{
    TlsBlock here = {(uintptr_t)&PyThreadState_Get, NULL, 0, thread_pointer()};
    dl_iterate_phdr(find_block, &here);
    if (here.block == NULL || (uintptr_t)here.block % sizeof(void *) != 0) {
        return 0;
    }
    /* static TLS: the block is as far from the thread pointer in a thread
     * started now, which has run nothing that could allocate it lazily */
    TlsBlock there = {here.code, NULL, 0, NULL};
    pthread_t t;
    if (pthread_create(&t, NULL, look_from_another_thread, &there) != 0) {
        return 0;
    }
    pthread_join(t, NULL);
    intptr_t offset = (intptr_t)here.block - (intptr_t)here.tp;
    if (there.block == NULL || (intptr_t)there.block - (intptr_t)there.tp != offset) {
        return 0;
    }
    PyThreadState **slots = (PyThreadState **)here.block;
    size_t n = here.size / sizeof(void *);
    n = n < MAX_SLOTS ? n : MAX_SLOTS;
    PyThreadState *ts = PyThreadState_Get();
    uint64_t maybe = 0;
    for (size_t i = 0; i < n; i++) {
        if (slots[i] == ts) {
            maybe |= (uint64_t)1 << i;
        }
    }
    /* detached, the variable holds NULL (on 3.15 another word of the block
     * holds the state too while it is attached, and keeps it detached) */
    PyThreadState *saved = PyEval_SaveThread();
    for (size_t i = 0; i < n; i++) {
        if (slots[i] != NULL) {
            maybe &= ~((uint64_t)1 << i);
        }
    }
    PyEval_RestoreThread(saved);
    for (size_t i = 0; i < n; i++) {
        if (slots[i] != ts) {
            maybe &= ~((uint64_t)1 << i);
        }
    }
    if (maybe == 0 || (maybe & (maybe - 1)) != 0) {
        return 0;   /* none, or more than one: no guess */
    }
    ts_tls_offset = offset + (intptr_t)(ctz64(maybe) * sizeof(void *));
    return tstate_direct() == ts && tstate_direct() == tstate_unchecked();
}
#endif

int
find_thread_state(void)
{
#if defined(HAVE_RUNTIME_SLOT)
    return find_runtime_slot();
#elif defined(HAVE_TLS_SLOT)
    return find_tls_slot();
#else
    return 0;
#endif
}
