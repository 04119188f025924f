/*
 * Can a dict's growth fail here? Asked once, at install, by failing the one
 * allocation of a dict's resize: refusals (stop.c) must never be one where
 * CPython does not report the failure.
 */
#include "hook.h"

/* ------------------------------------------------------------------------ */
/* Can a dict's growth fail?                                                */

/* 3.13.0's dict.setdefault() and PyDict_SetDefault[Ref]() -- through which
 * every string is interned, so every setattr() and getattr() of a new name --
 * do not report a failed resize: they return success with the MemoryError
 * set, and count the entry they did not insert. The next resize of that dict
 * reads one entry past the end (a SIGSEGV), and the exception left set is
 * found by whatever runs next (SystemError: "returned a result with an
 * exception set"). A refusal must never be such a resize there. install()
 * asks the running CPython, by failing the one allocation of a resize:
 * dict_fragile is 0 if it reports the failure, 1 if it does not and the size
 * of a dict's table is known (those sizes are never refused), 2 if not even
 * that (nothing is refused; the interrupt stops the code). */
static int dict_fragile;

static PyMemAllocatorEx probe_prev[2];
/* the probing thread: other threads allocate all the while (other
 * interpreters' without our GIL), and only this one's allocation may fail */
static PyThreadState *probe_ts;
static int probe_armed;
static size_t probe_size;

static int
probe_fail(size_t size)
{
    if (probe_armed && tstate_unchecked() == probe_ts) {
        probe_armed = 0;
        probe_size = size;
        return 1;
    }
    return 0;
}

/* Each domain's wrapper names its allocator below itself and ignores ctx,
 * which is that allocator's own: a thread of another interpreter reads the
 * table without our GIL, and may pair an old function with a new ctx. */
#define PROBES(name, i)                                                             \
    static void *probe_malloc_##name(void *ctx, size_t size)                        \
    {                                                                               \
        (void)ctx;                                                                  \
        PyMemAllocatorEx *p = &probe_prev[i];                                       \
        return probe_fail(size) ? NULL : p->malloc(p->ctx, size);                   \
    }                                                                               \
    static void *probe_calloc_##name(void *ctx, size_t nelem, size_t elsize)        \
    {                                                                               \
        (void)ctx;                                                                  \
        PyMemAllocatorEx *p = &probe_prev[i];                                       \
        return probe_fail(nelem * elsize) ? NULL : p->calloc(p->ctx, nelem, elsize); \
    }                                                                               \
    static void *probe_realloc_##name(void *ctx, void *ptr, size_t size)            \
    {                                                                               \
        (void)ctx;                                                                  \
        PyMemAllocatorEx *p = &probe_prev[i];                                       \
        return probe_fail(size) ? NULL : p->realloc(p->ctx, ptr, size);             \
    }                                                                               \
    static void probe_free_##name(void *ctx, void *ptr)                             \
    {                                                                               \
        (void)ctx;                                                                  \
        probe_prev[i].free(probe_prev[i].ctx, ptr);                                 \
    }
PROBES(mem, 0)
PROBES(obj, 1)
#undef PROBES

/* The size of a dict's table of 2**log2 slots, as 3.13 lays it out:
 * header, indices of 1 to 8 bytes, two thirds of the slots as entries (16
 * bytes with str keys only, 24 with any). */
static size_t
dict_table_size(int log2, int unicode)
{
    size_t n = (size_t)1 << log2;
    size_t index = log2 < 8 ? 1 : log2 < 16 ? 2 : log2 < 32 ? 4 : 8;
    size_t entry = unicode ? 2 * sizeof(void *) : 3 * sizeof(void *);
    return 4 * sizeof(void *) + index * n + entry * ((n << 1) / 3);
}

static int
is_dict_table_size(size_t size)
{
    for (int log2 = 3; log2 < 8 * (int)sizeof(size_t) - 8; log2++) {
        size_t u = dict_table_size(log2, 1);
        if (u > size) {
            return 0;
        }
        if (u == size || dict_table_size(log2, 0) == size) {
            return 1;
        }
    }
    return 0;
}

/* Under the GIL, with no exception set. A dict of 5 int keys fills its first
 * table: the 6th key makes it grow, and that allocation is the one that fails
 * (both domains are wrapped for the call, then put back as they were). */
int
probe_dict_growth(void)
{
    PyMemAllocatorDomain doms[2] = {PYMEM_DOMAIN_MEM, PYMEM_DOMAIN_OBJ};
    PyObject *d = PyDict_New(), *key = PyLong_FromLong(5);
    for (long i = 0; d != NULL && key != NULL && i < 5; i++) {
        PyObject *k = PyLong_FromLong(i);
        int r = k == NULL ? -1 : PyDict_SetItem(d, k, Py_None);
        Py_XDECREF(k);
        if (r < 0) {
            Py_CLEAR(d);
        }
    }
    if (d == NULL || key == NULL) {
        Py_XDECREF(d);
        Py_XDECREF(key);
        return -1;
    }
    for (int i = 0; i < 2; i++) {
        PyMem_GetAllocator(doms[i], &probe_prev[i]);
        PyMemAllocatorEx wrap =
            i == 0 ? (PyMemAllocatorEx){probe_prev[i].ctx, probe_malloc_mem, probe_calloc_mem,
                                        probe_realloc_mem, probe_free_mem}
                   : (PyMemAllocatorEx){probe_prev[i].ctx, probe_malloc_obj, probe_calloc_obj,
                                        probe_realloc_obj, probe_free_obj};
        PyMem_SetAllocator(doms[i], &wrap);
    }
    probe_ts = tstate_unchecked();
    probe_size = 0;
    probe_armed = 1;
    PyObject *r = PyDict_SetDefault(d, key, Py_None);   /* borrowed */
    probe_armed = 0;
    for (int i = 0; i < 2; i++) {
        PyMem_SetAllocator(doms[i], &probe_prev[i]);
    }
    int failed_quietly = r != NULL && PyErr_Occurred();
    int miscounted = PyDict_GET_SIZE(d) != (r == NULL || failed_quietly ? 5 : 6);
    PyErr_Clear();
    Py_DECREF(d);   /* its entries, not its count, say what it holds */
    Py_DECREF(key);
    if (!failed_quietly && !miscounted) {
        dict_fragile = 0;
    }
    else {
        dict_fragile = probe_size != 0 && is_dict_table_size(probe_size) ? 1 : 2;
    }
    return 0;
}

int
dict_growth_may_fail(size_t size)
{
    return dict_fragile && (dict_fragile == 2 || is_dict_table_size(size));
}

int
dict_fragile_state(void)
{
    return dict_fragile;
}
