/*
 * gotcha_async._meter: the allocator hook and the per-scope counters.
 *
 * A PEP 445 hook wraps the object and memory allocator domains. On every
 * allocation it reads the calling task's innermost scope from a ContextVar
 * (handed over by Python at install time) and charges that scope and all its
 * ancestors. Everything else -- units, validation, messages, cancellation --
 * is Python (_context.py); this file is mechanism only.
 *
 * Rules this file lives by:
 *  - the hook never allocates through the hooked domains: bookkeeping that
 *    needs memory (the held-memory table) uses libc directly;
 *  - it never calls Python code: a scope that breaks a limit is queued and a
 *    pending call (Py_AddPendingCall) hands the queue to Python at the next
 *    safe point of the main thread;
 *  - the scope variable is set and reset with the hook paused, because a
 *    lookup during CPython's own reset can re-cache the old value.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NONE UINT64_MAX     /* "no limit" */
enum { R_BYTES, R_OBJECTS, R_CALLS, R_MEMORY, NRES };

/* Allowance past a hard limit once it has refused an allocation, so that
 * except/finally blocks of the refused code can still run. */
static uint64_t grace[NRES] = {64 * 1024, 1000, 1000, 64 * 1024};

/* ------------------------------------------------------------------------ */
/* Held memory: what a scope allocated and nobody has freed yet.            */

/* Blocks outlive their scopes, so held-memory counters live in a small
 * refcounted libc struct that the table entries keep alive on their own. */
typedef struct Held {
    Py_ssize_t refcnt;
    struct Held *parent;
    struct Meter *owner;   /* borrowed; NULL once the scope object is gone */
    uint64_t current, peak;
} Held;

static void
held_decref(Held *h)
{
    while (h != NULL && --h->refcnt == 0) {
        Held *parent = h->parent;
        free(h);
        h = parent;
    }
}

/* Pointer -> (innermost Held, size). Open addressing, linear probing,
 * backward-shift deletion (no tombstones), grown at half load. */
typedef struct { uintptr_t key; Held *held; size_t size; } Entry;
static Entry *table;
static size_t table_cap, table_count;
static int table_shift;    /* 64 - log2(table_cap): the hash keeps the top bits */

/* Fibonacci hashing: one multiply, one shift, and the top bits mix every bit
 * of the address. */
static inline size_t
slot_of(uintptr_t p)
{
    return (size_t)(((uint64_t)p * 0x9E3779B97F4A7C15ull) >> table_shift);
}

static int
table_grow(void)
{
    size_t old_cap = table_cap, cap = old_cap ? old_cap * 2 : 1024;
    Entry *old = table, *fresh = calloc(cap, sizeof(Entry));
    if (fresh == NULL) {
        return -1;
    }
    table = fresh;
    table_cap = cap;
    table_shift = 64 - __builtin_ctzll((unsigned long long)cap);
    for (size_t i = 0; i < old_cap; i++) {
        if (old[i].key) {
            size_t j = slot_of(old[i].key);
            while (table[j].key) {
                j = (j + 1) & (cap - 1);
            }
            table[j] = old[i];
        }
    }
    free(old);
    return 0;
}

static void
held_credit(Held *h, size_t size)
{
    for (; h != NULL; h = h->parent) {
        h->current -= size;
    }
}

/* Forget p if it is a held block, crediting its scopes. */
static inline void
table_remove(uintptr_t p)
{
    size_t mask = table_cap - 1, i = slot_of(p);
    while (table[i].key != p) {
        if (table[i].key == 0) {
            return;
        }
        i = (i + 1) & mask;
    }
    Held *h = table[i].held;
    held_credit(h, table[i].size);
    held_decref(h);
    table_count--;
    /* backward-shift: pull later members of the cluster into the hole */
    size_t hole = i;
    for (size_t j = (i + 1) & mask; table[j].key; j = (j + 1) & mask) {
        size_t home = slot_of(table[j].key);
        if (((j - home) & mask) >= ((j - hole) & mask)) {
            table[hole] = table[j];
            hole = j;
        }
    }
    table[hole].key = 0;
    if (table_count == 0 && table_cap > 65536) {
        /* after a burst the table would stay at its largest: give it back; a
         * small one stays, or scopes used one after another would build it anew */
        free(table);
        table = NULL;
        table_cap = 0;
    }
}

static inline void
table_insert(uintptr_t p, Held *h, size_t size)
{
    if ((table_count + 1) * 2 > table_cap && table_grow() < 0) {
        return;            /* out of libc memory: this block goes untracked */
    }
    /* one probe finds the free slot, or a stale entry for a recycled address
     * (a block freed while the hook was out of the chain) */
    size_t i = slot_of(p);
    while (table[i].key && table[i].key != p) {
        i = (i + 1) & (table_cap - 1);
    }
    if (table[i].key == p) {
        held_credit(table[i].held, table[i].size);
        held_decref(table[i].held);
    }
    else {
        table_count++;
    }
    table[i].key = p;
    table[i].held = h;
    table[i].size = size;
    h->refcnt++;
}

/* Tracking scopes whose Context object still exists. Only those can be asked
 * for their figures: once the last one is gone every entry left in the table
 * (blocks that outlived their scopes: caches, interned strings) credits
 * counters nobody can read, yet would keep a lookup in every free of the
 * process, in a table sized for the busiest moment. */
static Py_ssize_t live_holders;
static void step_aside(void);
static Py_ssize_t active;  /* entered scopes, anywhere */

static void
purge_table(void)
{
    for (size_t i = 0, left = table_count; left > 0; i++) {
        if (table[i].key) {
            held_decref(table[i].held);
            table[i].key = 0;
            left--;
        }
    }
    table_count = 0;
    if (table_cap > 4096) {
        /* a small table is kept for the next burst; a large one goes back */
        free(table);
        table = NULL;
        table_cap = 0;
    }
    if (active == 0) {
        step_aside();
    }
}

/* ------------------------------------------------------------------------ */
/* Meter: the counters of one scope (base class of gotcha_async.Context).   */

typedef struct Meter {
    PyObject_HEAD
    struct Meter *parent;      /* strong */
    PyObject *token;           /* ContextVar token while entered */
    Held *held;                /* held-memory counters, NULL if not tracking */
    struct Meter *next_queued; /* delivery queue link (holds a reference) */
    uint64_t used[3];
    uint64_t limit[NRES];
    uint64_t refused_at[NRES]; /* what the refused allocation would reach */
    int tripped;               /* 1 + first resource that broke, 0 if none */
    char hard, hard_chain, refused, queued;
} Meter;

static PyTypeObject MeterType;
static PyObject *Meter_set_parent(struct Meter *m, PyObject *p);

/* ------------------------------------------------------------------------ */
/* Module state. All of it is guarded by the GIL: the hooked domains are     */
/* only ever called with the GIL held.                                       */

static PyObject *scope_var;    /* the ContextVar holding the innermost scope */
static PyObject *deliver_cb;   /* Python callable taking a tripped scope */
static _Thread_local int paused __attribute__((tls_model("initial-exec")));
static Meter *queue;           /* tripped scopes waiting for delivery */
static int scheduled;          /* a pending call is on its way */
static PyObject *usage_type, *memory_type;  /* the NamedTuples to return */
static char **exempt;          /* path prefixes of loop machinery */
static Py_ssize_t n_exempt;

typedef struct {
    PyMemAllocatorEx prev;
    PyMemAllocatorDomain domain;
    int is_obj;
    int in_chain;
} Domain;

static Domain dom_mem = {.domain = PYMEM_DOMAIN_MEM, .is_obj = 0};
static Domain dom_obj = {.domain = PYMEM_DOMAIN_OBJ, .is_obj = 1};
static int installed;

static int deliver_pending(void *);

/* Two ways to reach Python. A pending call runs at the main thread's next
 * safe point: right after the allocation when the loop runs there, so the
 * cancellation can land at the task's very next checkpoint. Only the main
 * thread runs pending calls, though, and it may be blocked in C (a loop in a
 * worker thread, join()); a trip in any other thread wakes a small delivery
 * thread of ours instead, which takes the GIL and hands the queue to Python. */
static PyThread_type_lock wake;
static unsigned long main_ident;

static void
delivery_main(void *unused)
{
    for (;;) {
        PyThread_acquire_lock(wake, WAIT_LOCK);
        PyGILState_STATE g = PyGILState_Ensure();
        if (queue != NULL) {
            deliver_pending(NULL);
        }
        PyGILState_Release(g);
    }
}

static int
start_delivery(void)
{
    wake = PyThread_allocate_lock();
    if (wake == NULL) {
        return -1;
    }
    PyThread_acquire_lock(wake, WAIT_LOCK);   /* held: the thread waits on it */
    if (PyThread_start_new_thread(delivery_main, NULL) == PYTHREAD_INVALID_THREAD_ID) {
        PyThread_free_lock(wake);
        wake = NULL;
        return -1;
    }
    return 0;
}

static void
schedule(void)
{
    if (PyThread_get_thread_ident() != main_ident && wake != NULL) {
        /* a semaphore post: no allocation, no Python */
        PyThread_release_lock(wake);
    }
    else if (!scheduled && Py_AddPendingCall(deliver_pending, NULL) == 0) {
        scheduled = 1;
    }
}

static void
trip(Meter *m, int resource)
{
    if (m->tripped) {
        return;
    }
    m->tripped = resource + 1;
    if (!m->queued) {
        m->queued = 1;
        Py_INCREF(m);
        m->next_queued = queue;
        queue = m;
    }
    schedule();
}

#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030E0000 && !defined(Py_GIL_DISABLED)
/* The leading fields of CPython's private PyContextVar (3.11 to 3.13, with the
 * GIL): the variable caches its value for one (thread state, context version).
 * Reading that cache here saves a call, a reference count round trip and a
 * type check on most allocations; a miss takes the public path. */
#define VAR_CACHE 1
typedef struct {
    PyObject_HEAD
    PyObject *name, *default_value, *cached;
    uint64_t cached_tsid, cached_tsver;
} VarCache;
#endif

#ifdef VAR_CACHE
/* CPython caches only a variable that is set. In the contexts where ours is
 * not -- the event loop's own callbacks, a server's protocol code, every other
 * task -- each allocation would search the context anew; this remembers the
 * last (thread state, context version) found without a scope. A context
 * version changes whenever a thread switches context, and enter()/exit() set
 * and reset the variable, so they forget it (forget_no_scope). Same versions
 * as the cache itself: both read fields of CPython's thread state. */
static uint64_t no_scope_tsid, no_scope_ver = UINT64_MAX;
#endif

static inline void
forget_no_scope(void)
{
#ifdef VAR_CACHE
    no_scope_ver = UINT64_MAX;
#endif
}

static Py_NO_INLINE Meter *
lookup_meter(void)
{
    PyObject *v = NULL;
    /* cannot fail for a ContextVar: its hash is precomputed */
    if (PyContextVar_Get(scope_var, NULL, &v) < 0 || v == NULL) {
#ifdef VAR_CACHE
        PyThreadState *ts = _PyThreadState_UncheckedGet();
        no_scope_tsid = ts->id;
        no_scope_ver = ts->context_ver;
#endif
        return NULL;
    }
    /* the context holds a reference: this never drops to zero here */
    Py_DECREF(v);
    /* only enter() sets the variable, and only to a Meter */
    return (Meter *)v;
}

/* The innermost scope of the calling thread's context, borrowed, or NULL. */
static inline Meter *
current_meter(void)
{
#ifdef VAR_CACHE
    PyThreadState *ts = _PyThreadState_UncheckedGet();
    const VarCache *cache = (const VarCache *)scope_var;
    if (cache->cached_tsver == ts->context_ver && cache->cached_tsid == ts->id &&
        cache->cached != NULL) {
        return (Meter *)cache->cached;   /* the current context holds it */
    }
    if (no_scope_ver == ts->context_ver && no_scope_tsid == ts->id) {
        return NULL;
    }
#endif
    return lookup_meter();
}

/* Is the innermost Python frame user code, as opposed to the event loop's,
 * anyio's or our own machinery? Only user code gets a refusal: a MemoryError
 * inside asyncio's task step would break the loop itself. */
static int
in_user_code(void)
{
    PyThreadState *ts = _PyThreadState_UncheckedGet();
    PyObject *filename;
    if (ts == NULL) {
        return 0;
    }
#if PY_VERSION_HEX >= 0x030D0000
    if (ts->current_frame == NULL) {
        return 0;
    }
    PyObject *code = PyUnstable_InterpreterFrame_GetCode(ts->current_frame);
    if (code == NULL) {
        return 0;
    }
    filename = ((PyCodeObject *)code)->co_filename;
    Py_DECREF(code);   /* the frame holds it */
#elif PY_VERSION_HEX >= 0x030B0000
    /* the leading fields of CPython's private _PyInterpreterFrame */
#if PY_VERSION_HEX < 0x030C0000
    typedef struct { void *func, *globals, *builtins, *locals; PyCodeObject *code; } Frame;
#else
    typedef struct { PyCodeObject *code; } Frame;
#endif
    if (ts->cframe == NULL || ts->cframe->current_frame == NULL) {
        return 0;
    }
    filename = ((Frame *)ts->cframe->current_frame)->code->co_filename;
#endif
    if (!PyUnicode_IS_COMPACT_ASCII(filename)) {
        return 1;
    }
    const char *name = (const char *)PyUnicode_DATA(filename);
    for (Py_ssize_t i = 0; i < n_exempt; i++) {
        if (strncmp(name, exempt[i], strlen(exempt[i])) == 0) {
            return 0;
        }
    }
    return 1;
}

static inline uint64_t
with_grace(const Meter *m, int r)
{
    uint64_t lim = m->limit[r];
    if (m->refused && lim != NONE) {
        lim = lim > NONE - grace[r] ? NONE - 1 : lim + grace[r];
    }
    return lim;
}

/* Would this allocation take a hard scope past a limit? Then refuse it. */
static int
refuse(Meter *n, uint64_t bytes, uint64_t objects)
{
    uint64_t delta[3] = {bytes, objects, 1};
    for (Meter *m = n; m != NULL; m = m->parent) {
        if (!m->hard) {
            continue;
        }
        int r = -1;
        uint64_t would = 0;
        for (int k = 0; k < 3 && r < 0; k++) {
            if (m->used[k] + delta[k] > with_grace(m, k)) {
                r = k;
                would = m->used[k] + delta[k];
            }
        }
        if (r < 0 && m->held != NULL && m->held->current + bytes > with_grace(m, R_MEMORY)) {
            r = R_MEMORY;
            would = m->held->current + bytes;
        }
        /* Never while an exception is being raised or handled: the
         * interpreter's own unwinding allocates (3.11 retries a failed
         * allocation of the handler's lasti forever), and those allocations
         * are bounded. */
        if (r >= 0 && !PyErr_Occurred() && in_user_code()) {
            if (!m->refused_at[r]) {
                m->refused_at[r] = would;
            }
            m->refused = 1;
            trip(m, r);
            return 1;
        }
    }
    return 0;
}

/* The common case, inlined: no hard limit in the chain would break. The grace
 * only ever raises a limit, so the slow path can be skipped when this says no. */
static inline int
may_refuse(Meter *n, uint64_t bytes, uint64_t objects)
{
    for (Meter *m = n; m != NULL; m = m->parent) {
        if (m->hard &&
            ((m->used[R_BYTES] + bytes > m->limit[R_BYTES]) |
             (m->used[R_OBJECTS] + objects > m->limit[R_OBJECTS]) |
             (m->used[R_CALLS] + 1 > m->limit[R_CALLS]) |
             (m->held != NULL && m->held->current + bytes > m->limit[R_MEMORY]))) {
            return 1;
        }
    }
    return 0;
}

/* The first limit a scope's counters are past (kept out of the hooks' way). */
static Py_NO_INLINE void
over(Meter *m)
{
    trip(m, m->used[R_BYTES] > m->limit[R_BYTES] ? R_BYTES
            : m->used[R_OBJECTS] > m->limit[R_OBJECTS] ? R_OBJECTS : R_CALLS);
}

static inline void
charge(Meter *n, uint64_t bytes, uint64_t objects, uint64_t calls)
{
    for (Meter *m = n; m != NULL; m = m->parent) {
        uint64_t b = m->used[R_BYTES] += bytes;
        uint64_t o = m->used[R_OBJECTS] += objects;
        uint64_t c = m->used[R_CALLS] += calls;
        if ((b > m->limit[R_BYTES]) | (o > m->limit[R_OBJECTS]) | (c > m->limit[R_CALLS])) {
            over(m);
        }
    }
}

static inline void
hold(Meter *n, void *p, size_t size)
{
    for (Held *h = n->held; h != NULL; h = h->parent) {
        h->current += size;
        if (h->current > h->peak) {
            h->peak = h->current;
        }
        if (h->owner != NULL && h->current > h->owner->limit[R_MEMORY]) {
            trip(h->owner, R_MEMORY);
        }
    }
    table_insert((uintptr_t)p, n->held, size);
}

/* ------------------------------------------------------------------------ */
/* The hook                                                                 */

/* The hooks. While no scope is entered anywhere they cost a load of a global
 * and of a thread-local, and go straight on to the next allocator. Charging
 * and the hard-limit pre-check are inline; held memory takes a slow path of
 * its own, so that the common case keeps few registers and frees stay a jump. */

#define IDLE() (active == 0 || paused)

static Py_NO_INLINE void *
slow_alloc(Domain *d, Meter *n, size_t nelem, size_t elsize, int zeroed)
{
    size_t size = nelem * elsize;   /* on overflow the allocator refuses anyway */
    if (n->hard_chain && may_refuse(n, size, d->is_obj) && refuse(n, size, d->is_obj)) {
        return NULL;
    }
    void *p = zeroed ? d->prev.calloc(d->prev.ctx, nelem, elsize)
                     : d->prev.malloc(d->prev.ctx, size);
    if (p != NULL) {
        charge(n, size, d->is_obj, 1);
        if (n->held != NULL) {
            hold(n, p, size);
        }
    }
    return p;
}

/* The metered paths live apart from the hooks so that an idle call does not
 * pay for their registers: the hooks below are a test and a jump. */
static Py_NO_INLINE void *
metered_malloc(Domain *d, size_t size)
{
    Meter *n = current_meter();
    if (n == NULL) {
        return d->prev.malloc(d->prev.ctx, size);
    }
    if (n->held != NULL) {
        return slow_alloc(d, n, 1, size, 0);
    }
    if (n->hard_chain && may_refuse(n, size, d->is_obj) && refuse(n, size, d->is_obj)) {
        return NULL;
    }
    void *p = d->prev.malloc(d->prev.ctx, size);
    if (p != NULL) {
        charge(n, size, d->is_obj, 1);
    }
    return p;
}

static Py_NO_INLINE void *
metered_calloc(Domain *d, size_t nelem, size_t elsize)
{
    Meter *n = current_meter();
    if (n == NULL) {
        return d->prev.calloc(d->prev.ctx, nelem, elsize);
    }
    return slow_alloc(d, n, nelem, elsize, 1);
}

static void *
hook_malloc(void *ctx, size_t size)
{
    Domain *d = ctx;
    if (IDLE()) {
        return d->prev.malloc(d->prev.ctx, size);
    }
    return metered_malloc(d, size);
}

static void *
hook_calloc(void *ctx, size_t nelem, size_t elsize)
{
    Domain *d = ctx;
    if (IDLE()) {
        return d->prev.calloc(d->prev.ctx, nelem, elsize);
    }
    return metered_calloc(d, nelem, elsize);
}

/* A realloc is one call, charges its new size as a fresh allocation would, and
 * no object. For held memory the old block is forgotten and the new one held. */
static void *
hook_realloc(void *ctx, void *ptr, size_t size)
{
    Domain *d = ctx;
    Meter *n = IDLE() ? NULL : current_meter();
    if (n != NULL && n->hard_chain && may_refuse(n, size, 0) && refuse(n, size, 0)) {
        return NULL;
    }
    void *p = d->prev.realloc(d->prev.ctx, ptr, size);
    if (p == NULL) {
        return NULL;
    }
    if (ptr != NULL && table_count) {
        table_remove((uintptr_t)ptr);
    }
    if (n != NULL) {
        charge(n, size, 0, 1);
        if (n->held != NULL) {
            hold(n, p, size);
        }
    }
    return p;
}

static Py_NO_INLINE void
free_held(Domain *d, void *ptr)
{
    table_remove((uintptr_t)ptr);
    if (table_count == 0 && active == 0) {
        step_aside();
    }
    d->prev.free(d->prev.ctx, ptr);
}

static void
hook_free(void *ctx, void *ptr)
{
    Domain *d = ctx;
    /* frees are credited even while paused: a stale entry would credit the
     * wrong scope when the address comes back */
    if (table_count != 0 && ptr != NULL) {
        free_held(d, ptr);
        return;
    }
    d->prev.free(d->prev.ctx, ptr);
}

/* Where the hook stands. The allocator chain cannot be read back beyond its
 * top, so each domain remembers whether the hook is in it: on top, or wrapped
 * by something started later (tracemalloc). */

static int
on_top(Domain *d)
{
    PyMemAllocatorEx now;
    PyMem_GetAllocator(d->domain, &now);
    return now.malloc == hook_malloc && now.ctx == d;
}

static void
join_chain(Domain *d)
{
    if (!d->in_chain) {
        PyMemAllocatorEx ours = {d, hook_malloc, hook_calloc, hook_realloc, hook_free};
        /* wrap whatever is there now: pymalloc, tracemalloc, a debug hook */
        PyMem_GetAllocator(d->domain, &d->prev);
        PyMem_SetAllocator(d->domain, &ours);
        d->in_chain = 1;
    }
}

/* Leave the chain, which only the top of it can do. */
static int
leave_chain(Domain *d)
{
    if (d->in_chain && on_top(d)) {
        PyMem_SetAllocator(d->domain, &d->prev);
        d->in_chain = 0;
    }
    return !d->in_chain;
}

static int
needed(void)
{
    return installed && (active > 0 || table_count > 0);
}

static void
ensure_hooked(void)
{
    if (needed()) {
        join_chain(&dom_mem);
        join_chain(&dom_obj);
    }
}

/* With no scope entered and no held block to credit, the hook has nothing to
 * do: it leaves the allocator chain (if it is on top) so that an idle process
 * pays nothing, and enter() puts it back. */
static void
step_aside(void)
{
    leave_chain(&dom_mem);
    leave_chain(&dom_obj);
}

/* ------------------------------------------------------------------------ */
/* Delivery: tripped scopes reach Python at a safe point.                   */

static int
deliver_pending(void *unused)
{
    scheduled = 0;
    Meter *m = queue;
    queue = NULL;
    /* the callback runs in whatever task the main thread happens to be in:
     * none of its work is that task's */
    paused++;
    while (m != NULL) {
        Meter *next = m->next_queued;
        m->next_queued = NULL;
        m->queued = 0;
        if (deliver_cb != NULL) {
            PyObject *r = PyObject_CallOneArg(deliver_cb, (PyObject *)m);
            if (r == NULL) {
                PyErr_WriteUnraisable(deliver_cb);
            }
            Py_XDECREF(r);
        }
        Py_DECREF(m);
        m = next;
    }
    paused--;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Meter methods                                                            */

static PyObject *
Meter_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Meter *m = (Meter *)type->tp_alloc(type, 0);
    if (m != NULL) {
        for (int r = 0; r < NRES; r++) {
            m->limit[r] = NONE;
        }
    }
    return (PyObject *)m;
}

static int
Meter_traverse(Meter *m, visitproc visit, void *arg)
{
    Py_VISIT(m->parent);
    Py_VISIT(m->token);
    return 0;
}

static int
Meter_clear(Meter *m)
{
    Py_CLEAR(m->parent);
    Py_CLEAR(m->token);
    return 0;
}

static void
Meter_dealloc(Meter *m)
{
    PyObject_GC_UnTrack(m);
    Meter_clear(m);
    if (m->held != NULL) {
        m->held->owner = NULL;   /* its blocks may live on; the scope does not */
        held_decref(m->held);
        if (--live_holders == 0 && table_count > 0) {
            purge_table();
        }
    }
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static int
start_holding(Meter *m)
{
    if (m->held == NULL) {
        m->held = calloc(1, sizeof(Held));
        if (m->held == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        m->held->refcnt = 1;
        m->held->owner = m;
        live_holders++;
    }
    return 0;
}

static uint64_t
limit_arg(PyObject *v)
{
    return v == Py_None ? NONE : PyLong_AsUnsignedLongLong(v);
}

/* _setup(parent, bytes, objects, calls, memory, hard, track): limits are
 * already validated ints or None. */
static PyObject *
Meter_setup(Meter *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "_setup takes 7 arguments");
        return NULL;
    }
    for (int r = 0; r < NRES; r++) {
        m->limit[r] = limit_arg(args[1 + r]);
        if (m->limit[r] == (uint64_t)-1 && PyErr_Occurred()) {
            return NULL;
        }
    }
    m->hard = (char)PyObject_IsTrue(args[5]);
    m->hard_chain = m->hard;
    if ((PyObject_IsTrue(args[6]) || m->limit[R_MEMORY] != NONE) && start_holding(m) < 0) {
        return NULL;
    }
    if (args[0] != Py_None) {
        return Meter_set_parent(m, args[0]);
    }
    Py_RETURN_NONE;
}

static PyObject *
Meter_set_parent(Meter *m, PyObject *p)
{
    if (!PyObject_TypeCheck(p, &MeterType)) {
        PyErr_Format(PyExc_TypeError, "parent must be a Context, not %.100s",
                     Py_TYPE(p)->tp_name);
        return NULL;
    }
    if (m->parent != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this Context already has a parent");
        return NULL;
    }
    for (Meter *a = (Meter *)p; a != NULL; a = a->parent) {
        if (a == m) {
            PyErr_SetString(PyExc_ValueError,
                            "parent would make this Context its own ancestor");
            return NULL;
        }
    }
    Meter *parent = (Meter *)p;
    Py_INCREF(parent);
    m->parent = parent;
    m->hard_chain = m->hard || parent->hard_chain;
    /* inside a scope that tracks held memory, every scope does */
    if (parent->held != NULL) {
        if (start_holding(m) < 0) {
            return NULL;
        }
        m->held->parent = parent->held;
        parent->held->refcnt++;
    }
    Py_RETURN_NONE;
}

/* Built with the hook paused: reading the counters must not move them. */
static PyObject *
Meter_counts(Meter *m, PyObject *unused)
{
    paused++;
    PyObject *r = PyObject_CallFunction(usage_type ? usage_type : (PyObject *)&PyTuple_Type,
                                        "KKK", m->used[0], m->used[1], m->used[2]);
    paused--;
    return r;
}

static PyObject *
Meter_memory(Meter *m, PyObject *unused)
{
    Held *h = m->held;
    if (h == NULL) {
        Py_RETURN_NONE;
    }
    paused++;
    PyObject *r = PyObject_CallFunction(memory_type ? memory_type : (PyObject *)&PyTuple_Type,
                                        "KK", h->current, h->peak);
    paused--;
    return r;
}

static PyObject *
Meter_add(Meter *m, PyObject *args)
{
    unsigned long long b, o, c;
    if (!PyArg_ParseTuple(args, "KKK", &b, &o, &c)) {
        return NULL;
    }
    charge(m, b, o, c);
    Py_RETURN_NONE;
}

static PyObject *
Meter_reset(Meter *m, PyObject *unused)
{
    memset(m->used, 0, sizeof(m->used));
    memset(m->refused_at, 0, sizeof(m->refused_at));
    m->tripped = 0;
    m->refused = 0;
    if (m->held != NULL) {
        m->held->peak = m->held->current;
    }
    Py_RETURN_NONE;
}

/* This scope's own broken limit: its resource (the first to break, then in
 * order) and what it reached, or -1. */
static int
broken_resource(const Meter *m, uint64_t *reached)
{
    uint64_t now[NRES] = {m->used[0], m->used[1], m->used[2],
                          m->held ? m->held->peak : 0};
    int first = m->tripped - 1;
    for (int r = -1; r < NRES; r++) {
        int k = r < 0 ? first : r;
        if (k < 0) {
            continue;
        }
        /* a refused allocation reports what it would have reached */
        uint64_t v = m->refused_at[k] ? m->refused_at[k] : now[k];
        if (v > m->limit[k]) {
            *reached = v;
            return k;
        }
    }
    return -1;
}

/* (resource, used) of this scope's own broken limit, or None. */
static PyObject *
Meter_broken(Meter *m, PyObject *unused)
{
    uint64_t v;
    int k = broken_resource(m, &v);
    if (k < 0) {
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(iK)", k, v);
}

/* In C because the ASGI middleware asks before every message it passes on. */
static PyObject *
Meter_exceeded(Meter *m, PyObject *unused)
{
    uint64_t v;
    for (const Meter *a = m; a != NULL; a = a->parent) {
        if (broken_resource(a, &v) >= 0) {
            Py_RETURN_TRUE;
        }
    }
    Py_RETURN_FALSE;
}

/* [(size, traceback or None)] of the blocks held by this scope and the
 * scopes inside it; tracebacks come from tracemalloc when it traces. */
static PyObject *
Meter_held_blocks(Meter *m, PyObject *unused)
{
    Held *target = m->held;
    if (target == NULL) {
        return PyList_New(0);
    }
    size_t n = 0, cap = 64;
    Entry *found = malloc(cap * sizeof(Entry));
    if (found == NULL) {
        return PyErr_NoMemory();
    }
    for (size_t i = 0; i < table_cap; i++) {
        if (!table[i].key) {
            continue;
        }
        for (Held *h = table[i].held; h != NULL; h = h->parent) {
            if (h == target) {
                if (n == cap) {
                    Entry *more = realloc(found, 2 * cap * sizeof(Entry));
                    if (more == NULL) {
                        free(found);
                        return PyErr_NoMemory();
                    }
                    found = more;
                    cap *= 2;
                }
                found[n++] = table[i];
                break;
            }
        }
    }
    /* building the list frees and allocates: work from the copy */
    PyObject *out = PyList_New(0);
    for (size_t i = 0; out != NULL && i < n; i++) {
#if PY_VERSION_HEX < 0x030D0000
        PyObject *tb = _PyTraceMalloc_GetTraceback(0, found[i].key);
#else
        PyObject *tb = Py_NewRef(Py_None);   /* no longer exported: no sites */
#endif
        if (tb == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyObject *item = Py_BuildValue("(nN)", (Py_ssize_t)found[i].size, tb);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_CLEAR(out);
            break;
        }
        Py_DECREF(item);
    }
    free(found);
    return out;
}

static PyObject *
Meter_get_parent(Meter *m, void *unused)
{
    return Py_NewRef(m->parent ? (PyObject *)m->parent : Py_None);
}

static PyObject *
Meter_get_active(Meter *m, void *unused)
{
    return PyBool_FromLong(m->token != NULL);
}

static PyMethodDef Meter_methods[] = {
    {"_setup", (PyCFunction)(void (*)(void))Meter_setup, METH_FASTCALL,
     "_setup(parent, bytes, objects, calls, memory, hard, track)"},
    {"_set_parent", (PyCFunction)Meter_set_parent, METH_O,
     "Link to a parent scope; refuses cycles."},
    {"_counts", (PyCFunction)Meter_counts, METH_NOARGS, "(bytes, objects, calls) charged."},
    {"_memory", (PyCFunction)Meter_memory, METH_NOARGS, "(current, peak) held, or None."},
    {"_add", (PyCFunction)Meter_add, METH_VARARGS, "Charge this scope and its ancestors."},
    {"_reset", (PyCFunction)Meter_reset, METH_NOARGS, "Zero this scope's own counters."},
    {"exceeded", (PyCFunction)Meter_exceeded, METH_NOARGS,
     "exceeded($self, /)\n--\n\n"
     "Whether this scope's own limit or any ancestor's has been exceeded."},
    {"_broken", (PyCFunction)Meter_broken, METH_NOARGS,
     "(resource, used) of this scope's own broken limit, or None."},
    {"_held_blocks", (PyCFunction)Meter_held_blocks, METH_NOARGS,
     "[(size, traceback)] of the blocks this scope holds."},
    {NULL},
};

static PyGetSetDef Meter_getset[] = {
    {"parent", (getter)Meter_get_parent, NULL, "The enclosing Context, or None (read-only).", NULL},
    {"_active", (getter)Meter_get_active, NULL, "Entered and not yet exited.", NULL},
    {NULL},
};

static PyTypeObject MeterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gotcha_async._meter.Meter",
    .tp_basicsize = sizeof(Meter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C counters of one scope.",
    .tp_new = Meter_new,
    .tp_dealloc = (destructor)Meter_dealloc,
    .tp_traverse = (traverseproc)Meter_traverse,
    .tp_clear = (inquiry)Meter_clear,
    .tp_methods = Meter_methods,
    .tp_getset = Meter_getset,
};

/* ------------------------------------------------------------------------ */
/* Ready: an awaitable that is already done. Awaiting it allocates nothing,  */
/* so an empty scope stays charged (0, 0, 0).                                */

typedef struct {
    PyObject_HEAD
    PyObject *value;
} Ready;

static PyObject *
Ready_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *value = Py_None;
    if (!PyArg_UnpackTuple(args, "Ready", 0, 1, &value)) {
        return NULL;
    }
    Ready *r = (Ready *)type->tp_alloc(type, 0);
    if (r != NULL) {
        r->value = Py_NewRef(value);
    }
    return (PyObject *)r;
}

static void
Ready_dealloc(Ready *r)
{
    PyObject_GC_UnTrack(r);
    Py_CLEAR(r->value);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static int
Ready_traverse(Ready *r, visitproc visit, void *arg)
{
    Py_VISIT(r->value);
    return 0;
}

static PyObject *
Ready_await(PyObject *self)
{
    return Py_NewRef(self);
}

static PySendResult
Ready_send(Ready *r, PyObject *arg, PyObject **result)
{
    *result = Py_NewRef(r->value);
    return PYGEN_RETURN;
}

/* The path an await takes where the interpreter does not use am_send (3.12 and
 * later call tp_iternext for non-generators): the StopIteration carrying the
 * value is the library's own work, made with the hook paused. */
static PyObject *
Ready_next(Ready *r)
{
    if (r->value == Py_None) {
        return NULL;   /* exhausted without an exception: the result is None */
    }
    paused++;
    PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, r->value);
    if (stop != NULL) {
        PyErr_SetObject(PyExc_StopIteration, stop);
        Py_DECREF(stop);
    }
    paused--;
    return NULL;
}

static PyAsyncMethods Ready_async = {
    .am_await = Ready_await,
    .am_send = (sendfunc)Ready_send,
};

static PyTypeObject ReadyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gotcha_async._meter.Ready",
    .tp_basicsize = sizeof(Ready),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Ready(value): an awaitable that returns value at once.",
    .tp_new = Ready_new,
    .tp_dealloc = (destructor)Ready_dealloc,
    .tp_traverse = (traverseproc)Ready_traverse,
    .tp_as_async = &Ready_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)Ready_next,
};

/* ------------------------------------------------------------------------ */
/* Module functions                                                         */

static PyObject *
mod_install(PyObject *mod, PyObject *args)
{
    PyObject *var, *cb, *dirs;
    if (!PyArg_ParseTuple(args, "O!OO!k", &PyContextVar_Type, &var, &cb, &PyTuple_Type, &dirs,
                          &main_ident)) {
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(dirs);
    char **prefixes = calloc(n ? n : 1, sizeof(char *));
    if (prefixes == NULL) {
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *s = PyUnicode_AsUTF8(PyTuple_GET_ITEM(dirs, i));
        if (s == NULL || (prefixes[i] = strdup(s)) == NULL) {
            for (Py_ssize_t j = 0; j < i; j++) {
                free(prefixes[j]);
            }
            free(prefixes);
            return s == NULL ? NULL : PyErr_NoMemory();
        }
    }
    if (installed) {
        PyErr_SetString(PyExc_RuntimeError, "the allocator hook is already installed");
        for (Py_ssize_t j = 0; j < n; j++) {
            free(prefixes[j]);
        }
        free(prefixes);
        return NULL;
    }
    exempt = prefixes;
    n_exempt = n;
    scope_var = Py_NewRef(var);
    deliver_cb = Py_NewRef(cb);
    if (start_delivery() < 0) {
        PyErr_SetString(PyExc_RuntimeError, "cannot start the delivery thread");
        return NULL;
    }
    installed = 1;   /* the first enter() puts the hook in the chain */
    Py_RETURN_NONE;
}

static PyObject *
mod_set_types(PyObject *mod, PyObject *args)
{
    PyObject *u, *m;
    if (!PyArg_ParseTuple(args, "OO", &u, &m)) {
        return NULL;
    }
    Py_XSETREF(usage_type, Py_NewRef(u));
    Py_XSETREF(memory_type, Py_NewRef(m));
    Py_RETURN_NONE;
}

/* tracemalloc.stop() puts back the allocator it found at start(). If the hook
 * joined the chain after that, it is gone now: take note, and join again if a
 * scope needs it. Returns True if the hook had been dropped. */
static PyObject *
mod_tracemalloc_stopped(PyObject *mod, PyObject *unused)
{
    int dropped = 0;
    Domain *doms[2] = {&dom_mem, &dom_obj};
    for (int i = 0; i < 2; i++) {
        if (doms[i]->in_chain && !on_top(doms[i])) {
            doms[i]->in_chain = 0;
            dropped = 1;
        }
    }
    ensure_hooked();
    return PyBool_FromLong(dropped);
}

/* In a forked child only the forking thread survives: the delivery thread must
 * be started again, and the forking thread is the child's main thread. */
static PyObject *
mod_after_fork(PyObject *mod, PyObject *unused)
{
    main_ident = PyThread_get_thread_ident();
    if (start_delivery() < 0) {
        PyErr_SetString(PyExc_RuntimeError, "cannot start the delivery thread");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
mod_hooked(PyObject *mod, PyObject *unused)
{
    return PyBool_FromLong(dom_mem.in_chain && dom_obj.in_chain);
}

/* For benchmarks: take the hook out of the chain (it must be on top), or force
 * it in while no scope needs it. */
static PyObject *
mod_set_hooked(PyObject *mod, PyObject *flag)
{
    int on = PyObject_IsTrue(flag);
    if (on < 0) {
        return NULL;
    }
    if (!installed) {
        PyErr_SetString(PyExc_RuntimeError, "install() first");
        return NULL;
    }
    if (on) {
        join_chain(&dom_mem);
        join_chain(&dom_obj);
    }
    else if (!leave_chain(&dom_mem) || !leave_chain(&dom_obj)) {
        PyErr_SetString(PyExc_RuntimeError, "another allocator hook sits on top of ours");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
mod_enter(PyObject *mod, PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, &MeterType)) {
        PyErr_SetString(PyExc_TypeError, "enter() takes a Context");
        return NULL;
    }
    Meter *m = (Meter *)arg;
    if (m->token != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this Context is already active");
        return NULL;
    }
    active++;
    ensure_hooked();
    paused++;
    PyObject *token = PyContextVar_Set(scope_var, arg);
    paused--;
    forget_no_scope();
    if (token == NULL) {
        if (--active == 0 && table_count == 0) {
            step_aside();
        }
        return NULL;
    }
    m->token = token;
    Py_RETURN_NONE;
}

static PyObject *
mod_exit(PyObject *mod, PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, &MeterType)) {
        PyErr_SetString(PyExc_TypeError, "exit() takes a Context");
        return NULL;
    }
    Meter *m = (Meter *)arg;
    if (m->token == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this Context is not active");
        return NULL;
    }
    paused++;
    int r = PyContextVar_Reset(scope_var, m->token);
    paused--;
    forget_no_scope();
    if (r < 0) {
        return NULL;
    }
    Py_CLEAR(m->token);
    if (--active == 0 && table_count == 0) {
        step_aside();
    }
    Py_RETURN_NONE;
}

static PyObject *
mod_active(PyObject *mod, PyObject *unused)
{
    return PyLong_FromSsize_t(active);
}

static PyObject *
mod_held_blocks(PyObject *mod, PyObject *unused)
{
    return PyLong_FromSize_t(table_count);
}

static PyObject *
mod_grace(PyObject *mod, PyObject *unused)
{
    return Py_BuildValue("(KKKK)", grace[0], grace[1], grace[2], grace[3]);
}

static PyObject *
mod_deliver(PyObject *mod, PyObject *unused)
{
    deliver_pending(NULL);
    Py_RETURN_NONE;
}

static PyMethodDef mod_methods[] = {
    {"install", mod_install, METH_VARARGS,
     "install(var, deliver, exempt_dirs, main_thread_ident): set the hook up; once per process."},
    {"set_types", mod_set_types, METH_VARARGS,
     "set_types(Usage, Memory): the NamedTuples the module returns."},
    {"set_hooked", mod_set_hooked, METH_O,
     "set_hooked(flag): take the hook out or put it back (benchmarks, tests)."},
    {"tracemalloc_stopped", mod_tracemalloc_stopped, METH_NOARGS,
     "Call after tracemalloc.stop(): rejoin the chain if it dropped the hook."},
    {"hooked", mod_hooked, METH_NOARGS, "Is the hook in place on both domains?"},
    {"after_fork", mod_after_fork, METH_NOARGS, "Restart delivery in a forked child."},
    {"enter", mod_enter, METH_O, "Make a Context the current scope (hook paused)."},
    {"exit", mod_exit, METH_O, "Restore the scope that was current before enter()."},
    {"active", mod_active, METH_NOARGS, "Number of entered scopes in the process."},
    {"held_blocks", mod_held_blocks, METH_NOARGS, "Number of blocks in the held-memory table."},
    {"grace", mod_grace, METH_NOARGS, "Allowance past a hard limit after a refusal."},
    {"deliver", mod_deliver, METH_NOARGS, "Deliver tripped scopes now (tests, exits)."},
    {NULL},
};

static struct PyModuleDef meter_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "gotcha_async._meter",
    .m_doc = "The allocator hook and per-scope counters of gotcha_async.",
    .m_size = -1,
    .m_methods = mod_methods,
};

PyMODINIT_FUNC
PyInit__meter(void)
{
    if (PyType_Ready(&MeterType) < 0 || PyType_Ready(&ReadyType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&meter_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Meter", (PyObject *)&MeterType) < 0 ||
        PyModule_AddObjectRef(m, "Ready", (PyObject *)&ReadyType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
