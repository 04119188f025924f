/*
 * C libraries' malloc, charged to the scope of the thread that calls it
 * (gotcha.install(native=True)).
 *
 * Without LD_PRELOAD: every loaded object's relocations of malloc, calloc,
 * realloc, free, the aligned variants, strdup and strndup (its PLT slots, its
 * GOT entries and absolute data words that hold their address, as libxml2's
 * xmlMalloc = malloc) are pointed at the wrappers below, found through
 * dl_iterate_phdr (patch.c). Objects loaded later are patched too: a dlopen() made
 * through a patched slot rescans at once, and the delivery thread looks every
 * 20 ms (native_poll) for objects loaded any other way.
 *
 * Never patched (their allocations are counted already, or are not a
 * library's): the python executable and libpython (their dlopen only: the
 * imports), this extension, libc and the loader, libgcc_s (the unwinder that
 * caller.c runs inside the hook), and numpy's _multiarray_umath, whose array
 * data reaches numpy.c's data handler.
 *
 * A wrapper calls the real function first and never fails anything: a scope
 * past its limit is tripped or stopped by the usual machinery (hook.c,
 * deliver.c), at the next bytecode boundary. Then:
 *
 *   - the calling thread holds the GIL: the block is charged at once, to the
 *     scope the PEP 445 hook would charge (hook_data_scope), through the path
 *     numpy.c uses (hook_charge_data: batches, trips), held at what the block
 *     takes in libc's heap (footprint);
 *   - it does not (lxml, Pillow and numpy release it): the block goes to a
 *     log of the thread's own (NLog), no lock and no Python, and is charged,
 *     in order, to the scope the thread last ran in (its target, set under the
 *     GIL wherever the hook finds a thread's scope) the next time that thread
 *     holds the GIL. A log that grows past PENDING_NUDGE bytes makes the hook
 *     look its scope up again at its thread's next allocation, which settles it.
 *
 * Invisible: threads that never ran Python inside a scope (BLAS workers),
 * statically linked or exported allocators (jemalloc built in), libc's own
 * allocations outside these functions (asprintf, getline, fopen's buffer),
 * blocks freed without the GIL by another thread than the one whose log
 * holds their allocation still unsettled, and past MAX_RECORDS records one
 * thread logged without the GIL, the frees that follow (their blocks stay
 * held). A free made with nothing held anywhere costs one test.
 */
#include "native.h"

int native_on;

#ifdef NATIVE_SUPPORTED
#  include <dlfcn.h>
#  include <math.h>
#  include <malloc.h>
#  include <pthread.h>
#  include <unistd.h>

/* ------------------------------------------------------------------------ */
/* A thread's log: what it allocated and freed without the GIL              */

/* The log keeps the bytes and calls as two sums, and records only what held
 * memory needs, in order: the blocks it holds and the frees that may give one
 * back. A scope that samples its held memory (the default) has its blocks
 * sampled here as hook.c samples them, at the rate it had when the thread
 * last ran in it: s / (1 - exp(-s/rate)) for a block of s bytes, recorded
 * with probability 1 - exp(-s/rate). An exact scope's blocks are all
 * recorded, up to MAX_EXACT in one stretch without the GIL; past that they
 * are sampled at FALLBACK_RATE (an lxml parse of 20 MB makes ~2 million). */
typedef struct {
    void *p;        /* the block held, or NULL (a free) */
    void *old;      /* the block given back, or NULL */
    uint64_t weight;
} Rec;

#  define MAX_RECORDS ((size_t)1 << 17)
#  define MAX_EXACT ((size_t)1 << 16)
#  define FALLBACK_RATE ((uint64_t)64 * 1024)
#  define PENDING_NUDGE ((uint64_t)64 * 1024)
#  define LOG_BITS 4096

typedef struct NLog {
    struct NLog *next;   /* the registry, under the GIL */
    Meter *target;       /* borrowed; cleared under the GIL when the scope goes */
    uint64_t rate;       /* the target's: 0 holds nothing, 1 every block, else its rate */
    int plain;           /* a target that holds nothing: the wrappers' inline path */
    /* the rest is written by its thread alone, and read by it (or, once the
     * thread is gone, by anyone) under the GIL */
    Rec *recs;
    size_t n, cap;
    uint64_t bytes, calls;   /* not charged yet */
    uint64_t since_nudge;
    double sample_left;      /* bytes to the next sample */
    uint64_t rng;
    uint64_t bits[LOG_BITS / 64];   /* the addresses of the held records */
    int dead;            /* its thread has exited */
} NLog;

static NLog *registry;
static GOTCHA_TLS NLog *native_log;   /* the calling thread's, or NULL */
static pthread_key_t log_key;
static GOTCHA_TLS int in_native;   /* the wrappers' own work, or a signal in it */

RealFns real;

void hook_recheck(void);                                 /* scope.c */
void hook_hold_native(Meter *n, void *p, uint64_t weight);   /* sample.c */
void hook_charge_native(Meter *n, void *old, void *p, size_t size, size_t fp);   /* data.c */

/* What a block takes in libc's heap: what it can hold and its chunk's header.
 * Held memory counts that, so that it meets the resident set (an lxml tree is
 * made of blocks of 40 to 120 bytes, each with 8 to 24 more); the bytes
 * charged are what was asked, as for Python's own allocations. */
static inline size_t
footprint(void *p, size_t size)
{
    size_t u = malloc_usable_size(p);
    return (u > size ? u : size) + sizeof(size_t);
}

/* The thread state read where the interpreter keeps it (runtime.c), when the
 * hook found where that is: no call. Set at install. */
static int direct_ts;

/* Does the calling thread hold the GIL (of the main interpreter)? Without it,
 * and without touching anything but the thread's own state. */
static inline PyThreadState *
gil_state(void)
{
    PyThreadState *ts = direct_ts ? tstate_direct() : tstate_unchecked();
#  if PY_VERSION_HEX < 0x030C0000
    /* 3.11: the GIL holder's, process-wide (none: the common case in a C
     * library that released it); ours only while we hold it */
    if (ts == NULL || ts != PyGILState_GetThisThreadState()) {
        return NULL;
    }
#  endif
    /* 3.12 on: the attached thread state, a thread-local variable, NULL once
     * detached */
    return ts != NULL && ts->interp == main_interp ? ts : NULL;
}

static inline int
log_bit(const NLog *l, const void *p)
{
    size_t s = filter_slot((uintptr_t)p) & (LOG_BITS - 1);
    return (int)((l->bits[s >> 6] >> (s & 63)) & 1);
}

static double
log_exponential(NLog *l)
{
    if (l->rng == 0) {
        l->rng = (uintptr_t)l * 0x9E3779B97F4A7C15ull | 1;
    }
    l->rng ^= l->rng >> 12;
    l->rng ^= l->rng << 25;
    l->rng ^= l->rng >> 27;
    uint64_t x = l->rng * 0x2545F4914F6CDD1Dull;
    double u = ((double)(x >> 11) + 0.5) * (1.0 / 9007199254740992.0);   /* (0, 1) */
    return -log(u);
}

static void
log_record(NLog *l, void *p, void *old, uint64_t weight)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 256;
        Rec *r = cap <= MAX_RECORDS ? real.realloc(l->recs, cap * sizeof(Rec)) : NULL;
        if (r == NULL) {
            return;   /* a block not held, or a free lost (the block stays held) */
        }
        l->recs = r;
        l->cap = cap;
    }
    l->recs[l->n++] = (Rec){p, old, weight};
    if (p != NULL) {
        size_t s = filter_slot((uintptr_t)p) & (LOG_BITS - 1);
        l->bits[s >> 6] |= (uint64_t)1 << (s & 63);
    }
}

/* Without the GIL: a block made (p, size), given back (old), or both. */
static void
log_note(NLog *l, void *p, void *old, size_t size)
{
    if (old != NULL && ((table_count != 0 && table_may_hold(old)) || log_bit(l, old))) {
        log_record(l, NULL, old, 0);
    }
    uint64_t rate = __atomic_load_n(&l->rate, __ATOMIC_RELAXED);
    if (p == NULL || __atomic_load_n(&l->target, __ATOMIC_RELAXED) == NULL) {
        return;
    }
    l->bytes += size;
    l->calls += 1;
    if ((l->since_nudge += size) >= PENDING_NUDGE) {
        l->since_nudge = 0;
        hook_recheck();
    }
    if (rate == 0) {
        return;
    }
    size_t fp = footprint(p, size);
    if (rate == 1) {
        if (l->n < MAX_EXACT) {
            log_record(l, p, NULL, fp);
            return;
        }
        rate = FALLBACK_RATE;
    }
    if (fp >= rate) {
        log_record(l, p, NULL, fp);
        return;
    }
    if ((l->sample_left -= (double)fp) > 0) {
        return;
    }
    l->sample_left = log_exponential(l) * (double)rate;
    double x = (double)fp / (double)rate;
    log_record(l, p, NULL, (uint64_t)((double)fp / -expm1(-x) + 0.5));
}

/* Under the GIL: charge what the log holds, in order, and empty it. */
static void
log_settle(NLog *l)
{
    Meter *n = l->target;
    if (n != NULL && (l->bytes | l->calls)) {
        charge(n, l->bytes, 0, l->calls);
    }
    l->bytes = l->calls = l->since_nudge = 0;
    for (size_t i = 0; i < l->n; i++) {
        Rec r = l->recs[i];
        if (r.p != NULL) {
            if (n != NULL) {
                hook_hold_native(n, r.p, r.weight);
            }
        }
        else if (table_count != 0 && table_may_hold(r.old)) {
            hook_forget_data(r.old);
        }
    }
    l->n = 0;
    memset(l->bits, 0, sizeof l->bits);
}

static inline int
log_pending(const NLog *l)
{
    return l != NULL && (l->n | l->calls) != 0;
}

/* The rate a thread logs at for m: see Rec. */
static uint64_t
rate_of(const Meter *m)
{
    if (m == NULL || m->held == NULL) {
        return 0;
    }
    return m->held->rate == 0 ? 1 : m->held->rate;
}

/* A thread's log is handed back when it exits: settled by whoever looks next. */
static void
log_orphan(void *v)
{
    NLog *l = v;
    native_log = NULL;   /* other destructors may still free through the wrappers */
    __atomic_store_n(&l->dead, 1, __ATOMIC_RELEASE);
}

/* Under the GIL: settle and free the logs of threads that have exited. */
static void
reap(void)
{
    for (NLog **pp = &registry; *pp != NULL;) {
        NLog *l = *pp;
        if (__atomic_load_n(&l->dead, __ATOMIC_ACQUIRE)) {
            log_settle(l);
            *pp = l->next;
            real.free(l->recs);
            real.free(l);
        }
        else {
            pp = &l->next;
        }
    }
}

/* ------------------------------------------------------------------------ */
/* What the engine tells us (under the GIL, from hook.c and meter.c)        */

/* The calling thread's log, charged now (its scope is being looked up). */
void
native_settle(void)
{
    NLog *l = native_log;
    if (log_pending(l) && !in_native) {
        in_native++;
        log_settle(l);
        in_native--;
    }
}

/* The calling thread now runs in scope m (or none): what it allocates
 * without the GIL from now on is m's. */
void
native_target(Meter *m)
{
    NLog *l = native_log;
    if (l == NULL) {
        if (m == NULL || in_native) {
            return;   /* a thread that was never in a scope needs no log */
        }
        l = real.calloc(1, sizeof(NLog));
        if (l == NULL) {
            return;
        }
        if (pthread_setspecific(log_key, l) != 0) {
            real.free(l);
            return;
        }
        l->next = registry;
        registry = l;
        native_log = l;
    }
    uint64_t rate = rate_of(m);
    if (l->target != m || l->rate != rate) {
        native_settle();
        __atomic_store_n(&l->target, m, __ATOMIC_RELAXED);
        __atomic_store_n(&l->plain, m != NULL && rate == 0, __ATOMIC_RELAXED);
        if (l->rate != rate) {
            __atomic_store_n(&l->rate, rate, __ATOMIC_RELAXED);
            l->sample_left = rate > 1 ? log_exponential(l) * (double)rate : 0;
        }
    }
}

/* Scope m is going away: no log may name it. */
void
native_forget(Meter *m)
{
    for (NLog *l = registry; l != NULL; l = l->next) {
        if (l->target == m) {
            if (l == native_log) {
                native_settle();
            }
            __atomic_store_n(&l->plain, 0, __ATOMIC_RELAXED);
            __atomic_store_n(&l->target, NULL, __ATOMIC_RELAXED);
        }
    }
    reap();
}

/* ------------------------------------------------------------------------ */
/* The wrappers                                                             */

static Py_NO_INLINE void
note(void *p, void *old, size_t size)
{
    in_native++;
    if (gil_state() != NULL) {
        NLog *l = native_log;
        if (log_pending(l)) {
            log_settle(l);   /* older: first */
        }
        Meter *n = p != NULL ? hook_data_scope() : NULL;
        if (n != NULL) {
            hook_charge_native(n, old, p, size, n->held != NULL ? footprint(p, size) : size);
        }
        else if (old != NULL && table_count != 0 && table_may_hold(old)) {
            hook_forget_data(old);
        }
    }
    else if (native_log != NULL) {
        log_note(native_log, p, old, size);
    }
    in_native--;
}

/* Nothing to do: the wrappers' own work, or no scope entered and no block
 * held anywhere */
static inline int
quiet(void)
{
    return in_native || (active == 0 && table_count == 0);
}

/* The common case inline, before any register is saved for note(): a C
 * library that released the GIL, in a scope that holds no memory. */
static inline void
note_alloc(void *p, size_t size)
{
    NLog *l = native_log;
    if (l != NULL && __atomic_load_n(&l->plain, __ATOMIC_RELAXED) &&
        (direct_ts ? tstate_direct() : tstate_unchecked()) == NULL) {
        /* 3.12 on: this thread is detached; 3.11: nobody holds the GIL */
        l->bytes += size;
        l->calls += 1;
        if ((l->since_nudge += size) >= PENDING_NUDGE) {
            l->since_nudge = 0;
            hook_recheck();
        }
        return;
    }
    note(p, NULL, size);
}

/* A free with no block held anywhere, and none in this thread's log, has
 * nothing to give back. */
static inline int
free_is_quiet(void)
{
    NLog *l = native_log;
    return quiet() || (table_count == 0 && (l == NULL || l->n == 0));
}

static void *
w_malloc(size_t size)
{
    void *p = real.malloc(size);
    if (p != NULL && !quiet()) {
        note_alloc(p, size);
    }
    return p;
}

static void *
w_calloc(size_t nelem, size_t elsize)
{
    void *p = real.calloc(nelem, elsize);
    if (p != NULL && !quiet()) {
        note_alloc(p, nelem * elsize);   /* no overflow: it was allocated */
    }
    return p;
}

static void *
w_realloc(void *old, size_t size)
{
    void *p = real.realloc(old, size);
    if (p != NULL) {
        if (!quiet()) {
            note(p, old, size);
        }
    }
    else if (old != NULL && size == 0 && !free_is_quiet()) {
        note(NULL, old, 0);   /* glibc's realloc(p, 0) frees p */
    }
    return p;
}

static void
w_free(void *ptr)
{
    if (ptr != NULL && !free_is_quiet()) {
        note(NULL, ptr, 0);   /* first: once freed, another thread may get the address */
    }
    real.free(ptr);
}

static int
w_posix_memalign(void **out, size_t alignment, size_t size)
{
    int rc = real.posix_memalign(out, alignment, size);
    if (rc == 0 && *out != NULL && !quiet()) {
        note_alloc(*out, size);
    }
    return rc;
}

#  define ALIGNED(name)                                  \
    static void *w_##name(size_t alignment, size_t size) \
    {                                                    \
        void *p = real.name(alignment, size);            \
        if (p != NULL && !quiet()) {                     \
            note_alloc(p, size);                         \
        }                                                \
        return p;                                        \
    }
ALIGNED(aligned_alloc)
ALIGNED(memalign)
#  undef ALIGNED

static void *
w_valloc(size_t size)
{
    void *p = real.valloc(size);
    if (p != NULL && !quiet()) {
        note_alloc(p, size);
    }
    return p;
}

static void *
w_pvalloc(size_t size)
{
    void *p = real.pvalloc(size);
    if (p != NULL && !quiet()) {
        long page = sysconf(_SC_PAGESIZE);
        size_t pg = page > 0 ? (size_t)page : 4096;
        note_alloc(p, (size + pg - 1) / pg * pg);
    }
    return p;
}

static char *
w_strdup(const char *s)
{
    char *p = real.strdup(s);
    if (p != NULL && !quiet()) {
        note_alloc(p, strlen(p) + 1);
    }
    return p;
}

static char *
w_strndup(const char *s, size_t n)
{
    char *p = real.strndup(s, n);
    if (p != NULL && !quiet()) {
        note_alloc(p, strlen(p) + 1);
    }
    return p;
}

static void *
w_dlopen(const char *file, int flags)
{
    void *h = real.dlopen(file, flags);
    if (h != NULL) {
        rescan();
    }
    return h;
}

static int
w_dlclose(void *h)
{
    int rc = real.dlclose(h);
    rescan();   /* an object gone: its place may be taken by one never patched */
    return rc;
}

/* ------------------------------------------------------------------------ */
/* The functions patch.c points the objects at                             */

Target targets[] = {
    {"malloc", (void *)w_malloc, (void **)&real.malloc, 1, NULL},
    {"calloc", (void *)w_calloc, (void **)&real.calloc, 1, NULL},
    {"realloc", (void *)w_realloc, (void **)&real.realloc, 1, NULL},
    {"free", (void *)w_free, (void **)&real.free, 1, NULL},
    {"posix_memalign", (void *)w_posix_memalign, (void **)&real.posix_memalign, 1, NULL},
    {"aligned_alloc", (void *)w_aligned_alloc, (void **)&real.aligned_alloc, 1, NULL},
    {"memalign", (void *)w_memalign, (void **)&real.memalign, 1, NULL},
    {"valloc", (void *)w_valloc, (void **)&real.valloc, 1, NULL},
    {"pvalloc", (void *)w_pvalloc, (void **)&real.pvalloc, 1, NULL},
    {"strdup", (void *)w_strdup, (void **)&real.strdup, 1, NULL},
    {"strndup", (void *)w_strndup, (void **)&real.strndup, 1, NULL},
    {"dlopen", (void *)w_dlopen, (void **)&real.dlopen, 0, NULL},
    {"dlclose", (void *)w_dlclose, (void **)&real.dlclose, 0, NULL},
};
const size_t ntargets = sizeof targets / sizeof targets[0];

static const char *
native_setup(void)
{
    const char *why = patch_setup();
    if (why != NULL) {
        return why;
    }
    if (pthread_key_create(&log_key, log_orphan) != 0) {
        return "no thread-specific key is left";
    }
    return NULL;
}
#else   /* NATIVE_SUPPORTED */
void
native_settle(void)
{
}

void
native_target(Meter *m)
{
    (void)m;
}

void
native_forget(Meter *m)
{
    (void)m;
}

#endif   /* NATIVE_SUPPORTED */

/* ------------------------------------------------------------------------ */
/* Module functions                                                         */

PyObject *
mod_native_supported(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
#ifdef NATIVE_SUPPORTED
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

PyObject *
mod_native_install(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
#ifdef NATIVE_SUPPORTED
    if (!installed) {
        PyErr_SetString(PyExc_RuntimeError, "install() first");
        return NULL;
    }
    if (!native_on) {
        const char *why = native_setup();
        if (why != NULL) {
            PyErr_Format(PyExc_RuntimeError, "native counting cannot start: %s", why);
            return NULL;
        }
        direct_ts = hook_found_thread_state() == 1;
        __atomic_store_n(&native_on, 1, __ATOMIC_RELEASE);
    }
    Py_BEGIN_ALLOW_THREADS
    rescan();
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
#else
    PyErr_SetString(PyExc_NotImplementedError,
                    "native counting needs Linux with glibc on x86-64 or aarch64");
    return NULL;
#endif
}

PyObject *
mod_native_state(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
#ifdef NATIVE_SUPPORTED
    Py_ssize_t logs = 0;
    for (NLog *l = registry; l != NULL; l = l->next) {
        logs++;
    }
    return Py_BuildValue("{s:O,s:n,s:n,s:n}", "on", native_on ? Py_True : Py_False, "slots",
                         (Py_ssize_t)patched_slots, "scans", (Py_ssize_t)scans, "logs", logs);
#else
    return Py_BuildValue("{s:O,s:n,s:n,s:n}", "on", Py_False, "slots", (Py_ssize_t)0, "scans",
                         (Py_ssize_t)0, "logs", (Py_ssize_t)0);
#endif
}
