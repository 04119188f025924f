/*
 * gotcha_async._meter: what the C files share. The sources are src/_meter/
 * (setup.py builds every .c there).
 *
 * What each file does: docs/how-it-works.md, "The pieces" (a test keeps that
 * table in step with the tree). Besides this header, three are shared within a
 * group of files only: hook.h by the hook's seven files (hook, scope, sample,
 * stop, probe, chain, data), meter.h by meter.c, enter.c and ready.c, native.h
 * by native.c and patch.c.
 *
 * Everything here is guarded by the main interpreter's GIL: the hooked domains
 * are only called with a GIL held, and the hooks pass other interpreters'
 * allocations straight through before touching any of this state.
 */
#ifndef GOTCHA_METER_H
#define GOTCHA_METER_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#if PY_VERSION_HEX < 0x030C0000
#  include <structmember.h>
#  define Py_T_OBJECT_EX T_OBJECT_EX
#  define Py_T_DOUBLE T_DOUBLE
#  define Py_T_BOOL T_BOOL
#  define Py_T_PYSSIZET T_PYSSIZET
#  define Py_READONLY READONLY
#endif
#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Every declaration of the extension's files is hidden (only PyInit__meter,
 * PyMODINIT_FUNC, is exported): its data is then read directly, not through
 * the GOT, from any file, as if it were static. */
#if defined(__GNUC__) || defined(__clang__)
#  define GOTCHA_HIDDEN_BEGIN _Pragma("GCC visibility push(hidden)")
#  define GOTCHA_HIDDEN_END _Pragma("GCC visibility pop")
#else
#  define GOTCHA_HIDDEN_BEGIN
#  define GOTCHA_HIDDEN_END
#endif

GOTCHA_HIDDEN_BEGIN

/* Invariants are assert()ed: checked in a build without NDEBUG (a debug
 * CPython's extensions, or CFLAGS=-UNDEBUG), free in a release build.
 * ASSERT_GIL: the calling thread holds the GIL (never in the hooks
 * themselves, which run before a thread state exists). */
#define ASSERT_GIL() assert(PyGILState_Check())

/* ------------------------------------------------------------------------ */
/* Compiler and CPython version shims                                       */

#if defined(_MSC_VER)
#  include <intrin.h>
#  define GOTCHA_TLS __declspec(thread)
static inline int
ctz64(uint64_t x)
{
    unsigned long i;
    _BitScanForward64(&i, x);
    return (int)i;
}
#elif defined(__GNUC__) || defined(__clang__)
/* initial-exec: a load off the thread pointer, no call into the TLS resolver */
#  define GOTCHA_TLS __thread __attribute__((tls_model("initial-exec")))
static inline int
ctz64(uint64_t x)
{
    return __builtin_ctzll(x);
}
#else
#  define GOTCHA_TLS _Thread_local
static inline int
ctz64(uint64_t x)
{
    int n = 0;
    while (!(x & 1)) {
        x >>= 1;
        n++;
    }
    return n;
}
#endif

/* The versions whose private layouts (frames.c's frames) were read and tested: 3.11 to 3.15, with the
 * GIL. On any other, or in a build made to pretend so (GOTCHA_UNCHECKED=1 at
 * build time, which CI runs the suite with), no frame is read: no interrupts,
 * refusals or allocation sites; soft limits and cancellation still work, and
 * Python warns once (_meter.checked()). */
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x03100000 && \
    !defined(Py_GIL_DISABLED) && !defined(GOTCHA_UNCHECKED)
#  define GOTCHA_CHECKED 1
#endif

static inline PyThreadState *
tstate_unchecked(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyThreadState_GetUnchecked();
#else
    return _PyThreadState_UncheckedGet();
#endif
}

/* The thread state read where the interpreter keeps it (runtime.c): on 3.11 a
 * field of _PyRuntime (ts_slot); on 3.12 and later, on Linux, a thread-local
 * variable at ts_tls_offset from the thread pointer. Only once
 * find_thread_state() has said so. */
#if PY_VERSION_HEX >= 0x030C0000 && defined(__linux__) && \
    (defined(__x86_64__) || defined(__aarch64__)) && (defined(__GNUC__) || defined(__clang__))
#  define HAVE_TLS_SLOT 1
#endif
extern PyThreadState **ts_slot;
extern intptr_t ts_tls_offset;
int find_thread_state(void);   /* 1: tstate_direct() may be used */

#ifdef HAVE_TLS_SLOT
static inline char *
thread_pointer(void)
{
    char *tp;
#  if defined(__x86_64__)
    __asm__ volatile("mov %%fs:0, %0" : "=r"(tp));   /* the TCB's pointer to itself */
#  else
    __asm__ volatile("mrs %0, tpidr_el0" : "=r"(tp));
#  endif
    return tp;
}

static inline PyThreadState *
tstate_direct(void)
{
    PyThreadState *ts;
#  if defined(__x86_64__)
    __asm__ volatile("mov %%fs:(%1), %0" : "=r"(ts) : "r"(ts_tls_offset));
#  else
    ts = *(PyThreadState *const *)(thread_pointer() + ts_tls_offset);
#  endif
    return ts;
}
#else
static inline PyThreadState *
tstate_direct(void)
{
    return *ts_slot;
}
#endif

/* ------------------------------------------------------------------------ */
/* Resources and limits                                                     */

#define NONE UINT64_MAX     /* "no limit" */
enum { R_BYTES, R_OBJECTS, R_CALLS, R_MEMORY, NRES };

/* A hard scope refuses only an allocation at least this large, and on its own
 * larger than the ceiling it would cross: CPython's small allocations
 * (exceptions, tracebacks, frames) must never fail, and only the huge buffer
 * cannot wait for the interrupt that stops growth at a bytecode boundary. */
#define REFUSE_MIN ((size_t)64 * 1024)

/* Allowance past a hard ceiling after each stop, so that the stopped code's
 * except/finally blocks can run; after GRACE_ROUNDS stops there is none. */
extern const uint64_t grace[NRES];
#define GRACE_ROUNDS 4

static inline uint64_t
sat_add(uint64_t a, uint64_t b)
{
    uint64_t s = a + b;
    return s < a ? NONE - 1 : s;
}

/* ------------------------------------------------------------------------ */
/* Held memory (held.c)                                                     */

/* Blocks outlive their scopes, so held-memory counters live in a small
 * refcounted libc struct that the table entries keep alive on their own. */
typedef struct Held {
    Py_ssize_t refcnt;
    struct Held *parent;
    struct Meter *owner;   /* borrowed; NULL once the scope object is gone */
    uint64_t current, peak;
    uint64_t base_rate;    /* the scope's rate (see held_retune); 0: every block, exactly */
    uint64_t rate;         /* mean bytes between samples now */
    double inv_rate;
    uint32_t idx;          /* in held.c's registry, which table entries name */
} Held;

#define SITE_FRAMES 4
typedef struct {
    PyCodeObject *code[SITE_FRAMES];   /* innermost user frame first */
    int lasti[SITE_FRAMES];
    int n;
} Site;

extern size_t table_count;   /* the free hook tests it with one instruction */

/* A counting filter over the recorded addresses: a free whose slot counts 0
 * is certainly not recorded and skips the table (most frees, with sampling).
 * A free reads only a bit per slot, set while its count is not 0: 8 KiB,
 * which the first-level cache keeps far better than the counts' 64 KiB. */
#define FILTER_BITS 16
extern uint64_t held_bits[(1 << FILTER_BITS) / 64];

/* An address's slot: its 16-byte granule in its 1 MiB window, the granule's
 * bits XORed with the window's. Blocks allocated together (and freed together,
 * as a request's are) share a line of the bit map, where a multiplicative hash
 * spread them over all 128 lines: in callgrind's cache simulation of
 * bench_instructions.py's memory=1 MiB requests, 40 first-level misses at the
 * filter a request instead of 215. The XOR keeps page-aligned blocks of
 * different windows out of each other's slots. */
static inline size_t
filter_slot(uintptr_t p)
{
    uintptr_t x = p ^ (p >> 16);
    return (size_t)((x >> 4) & ((1u << FILTER_BITS) - 1));
}

/* No bit is set while the table is empty (its last entry's removal clears a
 * saturated filter), so a free needs no other test; NULL has a slot too. */
static inline int
table_may_hold(void *p)
{
    size_t s = filter_slot((uintptr_t)p);
    return (int)((held_bits[s >> 6] >> (s & 63)) & 1);
}
int held_holder_started(void);   /* a scope holds memory: 1 if the first */
int held_holder_ended(void);     /* one is gone: 1 if the last */
Py_ssize_t held_holders(void);   /* tracking scopes whose Meter exists */

Held *held_new(void);   /* zeroed, or NULL */
void held_decref(Held *h);
int table_insert(uintptr_t p, Held *h, size_t weight, uint32_t site);   /* -1: no memory */
uint32_t site_intern(const Site *s);
void table_remove(uintptr_t p);
Held *table_lookup(uintptr_t p, size_t *size);
void table_purge(void);
PyObject *table_blocks_of(Held *target);   /* [(size, None)] */

/* ------------------------------------------------------------------------ */
/* Meter (meter.c)                                                          */

enum { S_NEW, S_ENTERED, S_EXITED };

typedef struct Meter {
    PyObject_HEAD
    struct Meter *parent;      /* strong */
    PyObject *token;           /* ContextVar token while entered */
    Held *held;                /* held-memory counters, NULL if not tracking */
    struct Meter *next_queued; /* trip queue link (the queue holds a reference) */
    uint64_t used[3];
    uint64_t limit[NRES];      /* soft: past it, cancel at the next checkpoint */
    uint64_t ceiling[NRES];    /* hard: past it, stop the code (NONE: no ceiling) */
    uint64_t fence[NRES];      /* where the next stop happens: the ceiling, then + grace */
    uint64_t reached[NRES];    /* what a refused allocation would have reached */
    Py_ssize_t children;       /* Meters whose parent this is */
    int tripped;               /* 1 + first resource that broke, 0 if none */
    int stops;                 /* refusals and interrupts so far */
    char hard;                 /* has a ceiling */
    char landed;               /* a stop reached its code: an interrupt raised, a refusal */
    uint64_t landed_at[NRES];  /* its counters when the first did: stop_landed() */
    char hard_chain;           /* it or an ancestor has a ceiling */
    char queued, state, rearm, quiet_machinery;
    char path;                 /* which path the hook takes for it: meter_path() */
    /* Context's cancel-scope state, here so that entering and leaving need no
     * Python frame in the common case (strong; None when unset) */
    PyObject *scope;           /* the anyio cancel scope, once entered in a loop */
    PyObject *waker;           /* the asyncio loop or trio token it runs on */
    PyObject *done;            /* (Event, waker) once the scope is awaited */
    double deadline;
    char shield, cancel_pending;
    /* A lazy scope (asyncio, entered by the fast path): no anyio cancel scope
     * until something asks for a cancellation. host is the task it was entered
     * in, anyio_outer the anyio cancel scope that was that task's innermost
     * then (None if none), cancelling0 the task's cancelling() then; all three
     * only while it is entered and not yet made real (strong; None otherwise). */
    PyObject *host;
    PyObject *anyio_outer;
    Py_ssize_t cancelling0;
    /* Context's own fields, set by _apply() in one call (strong) */
    PyObject *limits_obj;      /* the 4-tuple of limits */
    PyObject *cancel_reason;   /* str or None */
    char has_ceiling, fail;
    /* A request's scope (the middlewares' _made): never a descendant of another
     * request's. entered_in is the contextvars context it was entered in, while
     * it is entered (strong): a scope entered there is the same request's (two
     * middlewares stacked), one entered anywhere else is not. */
    char request;
    PyObject *entered_in;
    /* An exited scope is frozen (freeze()): what it reports from then on */
    uint64_t frozen_used[3];
    uint64_t frozen_reached, frozen_peak;
    int frozen_broken;         /* its own broken resource at exit, or -1 */
    char frozen_exceeded;      /* exceeded() at exit */
} Meter;

/* What the hook does for a small block (hook.c): charge it (the common case),
 * charge it and count down to the next sample, or take the general path. */
enum { P_PLAIN, P_SAMPLED, P_GENERAL };

/* Is the machinery's work left out of the scope? In a loop's debug mode (its
 * bookkeeping), and once the scope broke a limit or was stopped: cancelling
 * it, anyio re-cancels its task at every turn of the loop until the task is
 * done, and the task's TaskGroup, waiting for its children's cleanup, wakes
 * and waits again each time (about 180 MB a second when it was charged). */
static inline int
meter_quiet(const struct Meter *m)
{
    return m->quiet_machinery || m->landed || m->tripped;
}

static inline void
meter_path(struct Meter *m)
{
    m->path = meter_quiet(m) ? P_GENERAL
              : m->held == NULL  ? P_PLAIN
              : m->held->rate    ? P_SAMPLED
                                 : P_GENERAL;
}

extern PyTypeObject MeterType;
extern PyTypeObject GuardType, ReceiveGuardType;
int meter_exceeded(struct Meter *m);   /* its own limit or a live ancestor's broken */
int guard_init(void);                  /* guard.c: SendGuard's and ReceiveGuard's types */
extern PyTypeObject ReadyType;
int meter_init_types(void);
int meter_set_types(PyObject *u, PyObject *m);
int meter_set_fast_trio(PyObject *run_context, PyObject *scope_class);
int meter_set_fast(PyObject *running_loop, PyObject *scope_class, PyObject *current_task,
                   PyObject *task_states);

/* ------------------------------------------------------------------------ */
/* The hook (hook.c)                                                        */

extern PyObject *scope_var;        /* the ContextVar holding the innermost scope */
extern PyInterpreterState *main_interp;
extern GOTCHA_TLS int paused;      /* our own work: not charged, never refused */
extern Py_ssize_t active;          /* entered scopes, anywhere */
extern int installed;

Meter *current_meter(void);
/* Our own work is not charged. Pausing also forgets the scope last found, so
 * that the hook's fast path need not test paused: a paused thread's state is
 * never in the cache (hook.c). */
void pause_hook(void);
static inline void
resume_hook(void)
{
    assert(paused > 0);
    paused--;
}
int in_scope_of(Meter *inner, Meter *m);
void charge(Meter *n, uint64_t bytes, uint64_t objects, uint64_t calls);
void settle(void);   /* before reading or changing any scope's counters or thresholds */
void held_retune(Held *inner);
void ensure_hooked(void);
int probe_dict_growth(void);   /* probe.c, at install */
int dict_fragile_state(void);   /* what it found: 0, 1 or 2 */
int verify_chain(void);        /* 1 if the hook had been dropped */
int chain_moved(void);         /* without the GIL: has a chain's top changed? */
void chain_look(void);         /* GIL held: verify_chain() if scopes are entered */
void step_aside_if_idle(void);
int hook_on_top(void);
const char *hook_form(void);
int hook_leave(void);
void hook_join(void);
void hook_fit_frees(void);     /* after live_holders or table_count left or reached 0 */
void hook_find_thread_state(void);
int hook_found_thread_state(void);
int hook_reads_thread_state(void);
void forget_seen(void);
void forget_meter(Meter *m);
void seen_entered(Meter *m);   /* after enter() set the variable to m */
void stop(Meter *m);
Meter *hook_data_scope(void);   /* under the GIL */
int hook_refuse_data(Meter *n, void *old, size_t size);   /* 1: refuse it */
void hook_charge_data(Meter *n, void *old, void *p, size_t size);
void hook_data_small(void *p, size_t size);   /* found and charged, under the GIL */
void hook_forget_data(void *ptr);

/* ------------------------------------------------------------------------ */
/* numpy's arrays (numpy.c)                                                 */

int numpy_init(void);
void numpy_adopt(void);   /* at a scope's entry, with the hook paused */
int numpy_state(void);

/* ------------------------------------------------------------------------ */
/* C libraries' malloc (native.c, patch.c): under the GIL but native_poll   */

extern int native_on;           /* install(native=True) has run */
void native_settle(void);       /* charge what the calling thread logged */
void native_target(Meter *m);   /* the calling thread now runs in m (or none) */
void native_forget(Meter *m);   /* m is going away */
void native_poll(void);         /* without the GIL: patch objects loaded since */
void hook_recheck(void);        /* any thread: the next allocation looks up its scope */
PyObject *mod_native_supported(PyObject *mod, PyObject *unused);
PyObject *mod_native_install(PyObject *mod, PyObject *unused);
PyObject *mod_native_state(PyObject *mod, PyObject *unused);

/* ------------------------------------------------------------------------ */
/* Frames (frames.c): the private layouts, checked on 3.11 to 3.15          */

void *top_frame(PyThreadState *ts);
void *older_frame(void *frame);
PyCodeObject *frame_code(void *frame);   /* borrowed; NULL if it runs no code */
int frame_lasti(void *frame, PyCodeObject *code);
int code_line(PyCodeObject *code, int lasti);
int stack_spilled(PyThreadState *ts);
int code_is_machinery(PyCodeObject *code);
int frame_runs_user_code(PyThreadState *ts);   /* the innermost frame is user code */
/* machinery, or a throw passing through a coroutine that awaits: not its code's work */
int machinery_now(PyThreadState *ts);
int frames_stoppable(PyThreadState *ts);   /* no tracer, no finalizer running */
int frame_is_user(PyThreadState *ts);   /* both: it may be stopped here */
int frames_importing(PyThreadState *ts);   /* walks the whole stack: stops only */
int frames_set_opcodes(int resume, int extended_arg, PyObject *jumps, PyObject *awaiting);
/* Would an exception raised in this frame now be caught where its code says?
 * May allocate (the bytecode as compiled): call with the hook paused. */
int frame_interruptible(void *frame, PyCodeObject *code);
int frame_is_user_code(void *frame);
int frame_entered_from(void *callee, void *caller);   /* may allocate too */
void frames_site(PyThreadState *ts, Site *s);
int frames_same_site(PyThreadState *ts, uint32_t *site);
void frames_remember_site(uint32_t site);
void frames_forget_site(void);
int frames_init(void);
/* at install: exempt, a tuple of str (path prefixes of loop machinery), and
 * dispatch, a tuple of (file, name) (where loops run a task's step) */
void frames_setup(PyObject *exempt, PyObject *dispatch);

/* ------------------------------------------------------------------------ */
/* The caller of an allocation (caller.c)                                   */

void caller_init(void);        /* under the GIL, outside the hook */
int caller_is_cpython(void);   /* 1: CPython's own C asked, from the innermost eval loop */
int caller_ready(void);        /* 0: refusals are off on this build or platform */

/* ------------------------------------------------------------------------ */
/* Delivery (deliver.c)                                                     */

/* at install: the Python callable taking a tripped scope, what an interrupt
 * raises (a MemoryError), the main thread's ident */
int deliver_setup(PyObject *cb, PyObject *itype, unsigned long ident);
/* was m, or a scope inside it, stopped in code that started the running code since? */
int started_by_stopped(Meter *m);
/* stop.c: a stop reached m's code (an interrupt raised, a refusal made) */
void stop_landed(Meter *m);

void trip(Meter *m, int resource);
void request_interrupt(Meter *m);
int start_delivery(void);
PyObject *delivery_loop(void);
void delivery_after_fork(void);
int deliver_now(void);

GOTCHA_HIDDEN_END

#endif
