/*
 * numpy's array data, charged to the scope whose context allocated it.
 *
 * numpy takes array data from a data-memory handler (NEP 49) that it keeps
 * in a ContextVar, and every array keeps the handler that allocated it and
 * frees through that one. So a handler of ours, set in each scope's context
 * when the scope is entered, sees the allocations of the scope's task (its
 * child tasks and worker threads copy the context) and, later, every free of
 * them, with nothing patched in numpy. It wraps the handler that was current
 * there (numpy's default, with its small-block cache, or a user's own) and
 * charges what passes through as the PEP 445 hook would (hook.c).
 *
 * Nothing here includes numpy's headers: numpy need not be installed to
 * build, and is never imported by us. The two structs below and the slots of
 * numpy's C-API table are ABI-stable since numpy 1.22 (version 1 handlers).
 */
#include "_meter.h"

typedef struct {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, void *ptr, size_t new_size);
    void (*free)(void *ctx, void *ptr, size_t size);
} DataAllocator;   /* numpy's PyDataMemAllocator */

typedef struct {
    char name[127];
    uint8_t version;
    DataAllocator allocator;
} DataHandler;     /* numpy's PyDataMem_Handler */

#define CAPSULE_NAME "mem_handler"
/* numpy_api.py: the slots of the C-API table used here */
#define API_ABI_VERSION 0         /* PyArray_GetNDArrayCVersion: 0x01000009, 0x02000000 */
#define API_FEATURE_VERSION 211
#define API_SET_HANDLER 304
#define API_GET_HANDLER 305
#define API_DEFAULT_HANDLER 306   /* the address of numpy's PyObject *PyDataMem_DefaultHandler */
#define FEATURE_1_22 0x0000000f   /* NPY_1_22_API_VERSION: the handler API */

typedef struct {
    DataHandler ours;         /* what numpy calls; ctx is this Wrap */
    DataAllocator prev;
    PyObject *prev_capsule;   /* strong: its functions must outlive our arrays */
    /* the wrapped handler is not numpy's default, whose memory comes from
     * PyMem_Raw* or malloc (never a hooked domain): a user's may allocate
     * through the hooked domains, which must not count it a second time */
    int foreign;
} Wrap;

static enum { NP_ABSENT, NP_READY, NP_UNUSABLE } np_state;
static PyObject *(*np_get_handler)(void);
static PyObject *(*np_set_handler)(PyObject *);
static PyObject **np_default;   /* numpy's own variable */
static PyObject *str_numpy, *str_umath2, *str_umath1;
static PyObject *last_wrap;   /* strong: the capsule made for the last handler wrapped */

/* ------------------------------------------------------------------------ */
/* The GIL                                                                  */

/* numpy calls its handler with the GIL held (its default handler's cache
 * asserts it), save one place: fromfile/fromstring with a separator grow
 * their array by realloc with the GIL released. */
static int
holds_gil(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return tstate_unchecked() != NULL;   /* this thread's own: NULL while detached */
#else
    PyThreadState *ts = tstate_unchecked();   /* the GIL holder's */
    return ts != NULL && ts == PyGILState_GetThisThreadState();
#endif
}

/* Can a thread that does not hold the GIL take it here? Only one that has a
 * thread state of the main interpreter (a Python thread in numpy's
 * GIL-released section): taking it then makes no thread state. */
static int
can_take_gil(void)
{
    PyThreadState *own = PyGILState_GetThisThreadState();
#if PY_VERSION_HEX >= 0x030D0000
    int finalizing = Py_IsFinalizing();
#else
    int finalizing = _Py_IsFinalizing();
#endif
    return own != NULL && own->interp == main_interp && !finalizing;
}

/* The scope to charge, or NULL. numpy's default handler keeps its cache of
 * small blocks in globals that only the GIL guards, so numpy holds the GIL
 * whenever it allocates or frees through a handler, save the realloc above:
 * only a user's handler, which could be called otherwise, has it checked. */
static Meter *
data_scope(const Wrap *w)
{
    return !w->foreign || holds_gil() ? hook_data_scope() : NULL;
}

/* ------------------------------------------------------------------------ */
/* The handler                                                              */

/* The wrapped handler's allocations. While a scope is charged for it, a
 * user's handler runs with the hook paused, which also keeps the hook from
 * refusing that handler's own small blocks. (Its frees need no pause: a free
 * is never charged.) */
static void *
prev_alloc(Wrap *w, size_t nelem, size_t elsize, int zeroed, int pause)
{
    if (pause) {
        pause_hook();
    }
    void *p = zeroed ? w->prev.calloc(w->prev.ctx, nelem, elsize)
                     : w->prev.malloc(w->prev.ctx, nelem * elsize);
    if (pause) {
        resume_hook();
    }
    return p;
}

static void *
prev_realloc(Wrap *w, void *ptr, size_t size, int pause)
{
    if (pause) {
        pause_hook();
    }
    void *p = w->prev.realloc(w->prev.ctx, ptr, size);
    if (pause) {
        resume_hook();
    }
    return p;
}

static void *
data_alloc(Wrap *w, size_t nelem, size_t elsize, int zeroed)
{
    size_t size = nelem * elsize;
    if (size < REFUSE_MIN && !w->foreign) {
        /* the common case: never refused, nothing to pause, found after */
        void *p = zeroed ? w->prev.calloc(w->prev.ctx, nelem, elsize)
                         : w->prev.malloc(w->prev.ctx, size);
        if (p != NULL) {
            hook_data_small(p, size);
        }
        return p;
    }
    Meter *n = data_scope(w);
    /* Not the small ones, as the hooks do not: a structured dtype's comparison
     * takes a field's temporary copy and reads a NULL as "equal" (VOID_compare),
     * while every array of REFUSE_MIN or more comes from a caller that raises
     * numpy's MemoryError ("Unable to allocate ..."). Smaller arrays past a
     * ceiling are stopped at the next bytecode boundary instead (hook.c). */
    if (n != NULL && size >= REFUSE_MIN && n->hard_chain && hook_refuse_data(n, NULL, size)) {
        return NULL;
    }
    void *p = prev_alloc(w, nelem, elsize, zeroed, n != NULL && w->foreign);
    if (p != NULL && n != NULL) {
        hook_charge_data(n, NULL, p, size);
    }
    return p;
}

static void *
wrap_malloc(void *ctx, size_t size)
{
    return data_alloc(ctx, 1, size, 0);
}

static void *
wrap_calloc(void *ctx, size_t nelem, size_t elsize)
{
    return data_alloc(ctx, nelem, elsize, 1);
}

/* Under the GIL; refuse: 0 where numpy does not hold it (nothing is refused
 * in a section that runs without it). */
static void *
realloc_gil(Wrap *w, void *ptr, size_t size, int refuse)
{
    Meter *n = hook_data_scope();
    if (n != NULL && refuse && size >= REFUSE_MIN && n->hard_chain &&
        hook_refuse_data(n, ptr, size)) {
        return NULL;
    }
    void *p = prev_realloc(w, ptr, size, n != NULL && w->foreign);
    if (p != NULL) {
        hook_charge_data(n, ptr, p, size);   /* n NULL: the old block forgotten only */
    }
    return p;
}

static void *
wrap_realloc(void *ctx, void *ptr, size_t size)
{
    Wrap *w = ctx;
    if (holds_gil()) {
        return realloc_gil(w, ptr, size, 1);
    }
    /* fromfile/fromstring's growth, when a scope could be charged or the old
     * block may be held (its entry must go before the address is reused) */
    if ((active != 0 || (table_count != 0 && table_may_hold(ptr))) && can_take_gil()) {
        PyGILState_STATE g = PyGILState_Ensure();
        void *p = realloc_gil(w, ptr, size, 0);
        PyGILState_Release(g);
        return p;
    }
    return w->prev.realloc(w->prev.ctx, ptr, size);
}

static void
wrap_free(void *ctx, void *ptr, size_t size)
{
    Wrap *w = ctx;
    if (table_count != 0 && ptr != NULL && table_may_hold(ptr) && (!w->foreign || holds_gil())) {
        /* with the GIL, as above; a user's handler freeing without it (numpy
         * does not) would leave the entry, to be credited when the address
         * comes back: never a crash */
        hook_forget_data(ptr);
    }
    w->prev.free(w->prev.ctx, ptr, size);
}

/* ------------------------------------------------------------------------ */
/* Wrapping the current handler                                             */

static void
wrap_destroy(PyObject *capsule)
{
    Wrap *w = PyCapsule_GetContext(capsule);
    if (w != NULL) {   /* NULL: wrap_new failed before it was set, and freed it */
        Py_XDECREF(w->prev_capsule);
        PyMem_RawFree(w);
    }
}

static int
is_ours(PyObject *capsule)
{
    return PyCapsule_GetDestructor(capsule) == wrap_destroy;
}

static PyObject *
wrap_new(PyObject *prev_capsule)
{
    DataHandler *prev = PyCapsule_GetPointer(prev_capsule, CAPSULE_NAME);
    if (prev == NULL) {
        return NULL;
    }
    Wrap *w = PyMem_RawCalloc(1, sizeof(Wrap));
    if (w == NULL) {
        return PyErr_NoMemory();
    }
    /* "gotcha_async(default_allocator)": numpy._core.multiarray.get_handler_name() */
    snprintf(w->ours.name, sizeof w->ours.name, "gotcha_async(%.100s)", prev->name);
    w->ours.version = 1;
    w->ours.allocator = (DataAllocator){w, wrap_malloc, wrap_calloc, wrap_realloc, wrap_free};
    w->prev = prev->allocator;
    w->foreign = prev_capsule != *np_default;
    PyObject *cap = PyCapsule_New(&w->ours, CAPSULE_NAME, wrap_destroy);
    if (cap == NULL || PyCapsule_SetContext(cap, w) < 0) {
        Py_XDECREF(cap);
        PyMem_RawFree(w);
        return NULL;
    }
    w->prev_capsule = Py_NewRef(prev_capsule);
    return cap;
}

/* numpy's C-API table, once its extension module is in sys.modules */
static int
find_numpy(void)
{
    PyObject *mods = PyImport_GetModuleDict();
    if (PyDict_GetItemWithError(mods, str_numpy) == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    PyObject *umath = PyDict_GetItemWithError(mods, str_umath2);
    if (umath == NULL && !PyErr_Occurred()) {
        umath = PyDict_GetItemWithError(mods, str_umath1);
    }
    if (umath == NULL) {
        return PyErr_Occurred() ? -1 : 0;   /* numpy is still being imported */
    }
    np_state = NP_UNUSABLE;
    PyObject *api_capsule = PyObject_GetAttrString(umath, "_ARRAY_API");
    if (api_capsule == NULL) {
        return -1;
    }
    void **api = PyCapsule_GetPointer(api_capsule, NULL);
    Py_DECREF(api_capsule);   /* the module keeps the table */
    if (api == NULL) {
        return -1;
    }
    /* numpy 1.x and 2.x lay the table out alike; a later ABI is left alone */
    unsigned int abi = ((unsigned int (*)(void))api[API_ABI_VERSION])();
    if ((abi >> 24 != 1 && abi >> 24 != 2) ||
        ((unsigned int (*)(void))api[API_FEATURE_VERSION])() < FEATURE_1_22) {
        return 0;
    }
    np_get_handler = (PyObject * (*)(void)) api[API_GET_HANDLER];
    np_set_handler = (PyObject * (*)(PyObject *)) api[API_SET_HANDLER];
    np_default = (PyObject **)api[API_DEFAULT_HANDLER];
    np_state = NP_READY;
    return 0;
}

static int
adopt(void)
{
    if (np_state == NP_ABSENT && find_numpy() < 0) {
        return -1;
    }
    if (np_state != NP_READY) {
        return 0;
    }
    PyObject *h = np_get_handler();
    if (h == NULL) {
        return -1;
    }
    if (is_ours(h)) {
        Py_DECREF(h);
        return 0;
    }
    if (last_wrap == NULL || ((Wrap *)PyCapsule_GetContext(last_wrap))->prev_capsule != h) {
        PyObject *w = wrap_new(h);
        if (w == NULL) {
            Py_DECREF(h);
            return -1;
        }
        Py_XSETREF(last_wrap, w);
    }
    Py_DECREF(h);
    PyObject *old = np_set_handler(last_wrap);
    Py_XDECREF(old);
    return old == NULL ? -1 : 0;
}

/* At every scope's entry, in the scope's context, with the hook paused: make
 * numpy's handler there ours, if numpy has been imported. Never fails: a numpy
 * that cannot be used is left alone (its arrays are not counted). */
void
numpy_adopt(void)
{
    if (np_state == NP_UNUSABLE) {
        return;
    }
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    if (adopt() < 0) {
        PyErr_Clear();
    }
    PyErr_Restore(t, v, tb);
}

int
numpy_init(void)
{
    str_numpy = PyUnicode_InternFromString("numpy");
    str_umath2 = PyUnicode_InternFromString("numpy._core._multiarray_umath");
    str_umath1 = PyUnicode_InternFromString("numpy.core._multiarray_umath");
    return str_numpy && str_umath2 && str_umath1 ? 0 : -1;
}

/* For tests: 0 before numpy was found, 1 when its arrays are counted, 2 if not */
int
numpy_state(void)
{
    return (int)np_state;
}
