/*
 * The PEP 445 hook: it wraps the object and memory allocator domains, finds
 * the calling task's innermost scope through a ContextVar, and charges that
 * scope and its ancestors.
 *
 * Rules this file lives by:
 *  - the hook never allocates through the hooked domains (held.c uses libc)
 *    and never calls Python: a broken limit is queued (deliver.c);
 *  - other interpreters' allocations pass straight through: the state here is
 *    guarded by the main interpreter's GIL only, and thread-state ids restart
 *    in every interpreter;
 *  - a hard scope refuses only an allocation of at least REFUSE_MIN bytes, and
 *    only while its own Python code runs with no exception in flight. Every
 *    other way past a ceiling is stopped by an interrupt at the next bytecode
 *    boundary of that code (deliver.c): CPython survives a failed large
 *    allocation anywhere, but not a failed small one in its own machinery.
 */
#include "_meter.h"

#include <math.h>
#include <time.h>

#if defined(__GNUC__) || defined(__clang__)
#  define ALWAYS_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#  define ALWAYS_INLINE __forceinline
#else
#  define ALWAYS_INLINE inline
#endif

#if defined(__GNUC__) || defined(__clang__)
#  define LIKELY(x) __builtin_expect(!!(x), 1)
#  define UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#  define LIKELY(x) (x)
#  define UNLIKELY(x) (x)
#endif

const uint64_t grace[NRES] = {64 * 1024, 1000, 1000, 64 * 1024};

PyObject *scope_var;
PyInterpreterState *main_interp;
GOTCHA_TLS int paused;
Py_ssize_t active;
int installed;
PyObject *exempt;
PyObject *dispatch;

/* paused carries this bit while verify_chain probes the chain */
#define PROBING (1 << 20)

typedef struct {
    PyMemAllocatorEx prev;
    PyMemAllocatorDomain domain;
    int is_obj;
    int in_chain;
    int seen;      /* the probe reached this hook */
    int light;     /* ours leaves frees to prev (see "The allocator chain") */
    PyMemAllocatorEx ours;
    /* the free-only link, above whatever wrapped a light hook */
    PyMemAllocatorEx watch_prev;
    int watching;
    int watch_seen;
} Domain;

static Domain dom_mem = {.domain = PYMEM_DOMAIN_MEM, .is_obj = 0};
static Domain dom_obj = {.domain = PYMEM_DOMAIN_OBJ, .is_obj = 1};

/* The foreign tops of both chains as the delivery thread last looked
 * (chain_moved); forgotten whenever the hook joins, so that whatever is put
 * on top of it next is looked at, even the allocator seen there before. */
static PyMemAllocatorEx polled[2];

/* The batch (see settle()): what the scope batch_meter and its ancestors have
 * left before a threshold, and what they had when it began: bytes (left_b),
 * allocations that are an object and a call (left_o: the object domain's) and
 * calls that are not an object (left_m: the memory domain's, reallocs). Calls
 * are split between the two in advance, so that an object's allocation counts
 * down one counter, not two. A sampling batch's countdown to its next sample
 * is in bytes too, and left_b counts down to whichever comes first, the bytes'
 * threshold or the sample: one subtraction on the inline path for both. */
#define ROOM_CAP ((uint64_t)1 << 62)   /* "no threshold": far, and no overflow */
#define NO_SAMPLE ROOM_CAP             /* a plain batch's sample: never reached */
static Meter *batch_meter;             /* borrowed; freeing it settles */
static uint64_t batch_b0, batch_o0, batch_m0;
static uint64_t batch_b_room;          /* bytes before the threshold, from the start */
static uint64_t batch_sample_at;       /* bytes before the sample, from the start */
static int64_t left_b, left_o, left_m;
static size_t batch_bound;             /* blocks below this size are batched */
static size_t batch_small;             /* batch_bound while the batch is the scope last found, or 0 */
static char batch_sampled;

/* Outside a batch, the countdown to the next sample is the thread's own, in
 * expected samples (see hold()). */
static GOTCHA_TLS double sample_left;
static GOTCHA_TLS uint64_t rng;
static double next_exponential(void);

/* ------------------------------------------------------------------------ */
/* Finding the scope                                                        */

#ifndef Py_GIL_DISABLED
/* The scope last found, for one (thread state, context version): most
 * allocations are answered from it. CPython bumps a thread state's context
 * version whenever the thread enters or leaves a context (each step of a
 * task), and only enter() and exit() set our variable, which they follow with
 * forget_seen(). The thread state's id is compared as well as its address,
 * for a state freed and another made at the same address; its interpreter
 * too, as ids restart in every interpreter and another interpreter's thread
 * may run beside ours under a GIL of its own. The context found
 * holds a reference to the scope for as long as the version stands. Kept for
 * contexts without a scope too (a server's protocol code, other tasks, the
 * loop's callbacks), where there is nothing to find. */
#define SEEN_CACHE 1
static PyThreadState *seen_ts = (PyThreadState *)&seen_ts;   /* no state's address */
static uint64_t seen_tsid, seen_ver;
static Meter *seen_meter;
#endif

void
forget_seen(void)
{
    settle();
#ifdef SEEN_CACHE
    seen_ts = (PyThreadState *)&seen_ts;
#endif
}

/* enter() has just set the variable to m in this thread's context, which
 * changes no version: the next allocation would look m up, and need not. */
void
seen_entered(Meter *m)
{
#ifdef SEEN_CACHE
    PyThreadState *ts = tstate_unchecked();
    if (paused || active == 0 || ts == NULL || ts->interp != main_interp) {
        return;   /* never in the cache (lookup_meter) */
    }
    if (UNLIKELY(native_on)) {
        native_target(m);
    }
    seen_ts = ts;
    seen_tsid = ts->id;
    seen_ver = ts->context_ver;
    seen_meter = m;
    batch_small = m == batch_meter ? batch_bound : 0;
#else
    (void)m;
#endif
}

/* A scope is going away: it must not be found in the cache (a context can lose
 * its last reference to it without a version change: PyThreadState_Clear). */
void
forget_meter(Meter *m)
{
    if (UNLIKELY(native_on)) {
        native_forget(m);   /* first: it may charge m what a thread logged for it */
    }
    if (batch_meter == m) {
        settle();
    }
#ifdef SEEN_CACHE
    if (seen_meter == m) {
        forget_seen();
    }
#else
    (void)m;
#endif
}

/* Any thread, without the GIL (native.c): a thread's C libraries logged
 * enough to be charged, and its next allocation must look its scope up, which
 * settles the log. Only the one word is written: a lookup that overwrites it
 * fills the cache for its own thread, which is not the one waiting. */
void
hook_recheck(void)
{
#ifdef SEEN_CACHE
    __atomic_store_n(&seen_ts, (PyThreadState *)&seen_ts, __ATOMIC_RELAXED);
#endif
}

void
pause_hook(void)
{
    paused++;
#ifdef SEEN_CACHE
    seen_ts = (PyThreadState *)&seen_ts;
#endif
}

/* While a tracer, a profiler or a sys.monitoring callback runs (coverage's,
 * a debugger's), the thread's allocations are the tool's, not the scope's:
 * a scope's figures do not depend on whether a tool watches it, and nothing
 * of the tool's can trip a limit. Never cached: the thread's context version
 * does not change when the tool is called. */
static Py_NO_INLINE Meter *
lookup_meter(PyThreadState *ts)
{
    if (ts == NULL || ts->interp != main_interp || ts->tracing != 0) {
        return NULL;
    }
    /* what the thread's C libraries logged without the GIL is its last scope's */
    if (UNLIKELY(native_on) && !paused) {
        native_settle();
    }
    PyObject *v = NULL;
    /* cannot fail for a ContextVar: its hash is precomputed */
    if (PyContextVar_Get(scope_var, NULL, &v) < 0) {
        v = NULL;
    }
    /* the context holds a reference: this never drops to zero here */
    Py_XDECREF(v);
    if (UNLIKELY(native_on) && !paused && active != 0) {
        native_target((Meter *)v);
    }
#ifdef SEEN_CACHE
    if (paused || active == 0) {
        return (Meter *)v;   /* a paused thread or an idle hook is never in the cache */
    }
    seen_ts = ts;
    seen_tsid = ts->id;
    seen_ver = ts->context_ver;
    seen_meter = (Meter *)v;
    /* the inline path needs no comparison with batch_meter */
    batch_small = seen_meter == batch_meter ? batch_bound : 0;
#endif
    /* only enter() sets the variable, and only to a Meter */
    return (Meter *)v;
}

#ifdef SEEN_CACHE
#  define SEEN(ts)                                                                     \
    LIKELY((ts) == seen_ts && (ts)->context_ver == seen_ver && (ts)->id == seen_tsid && \
           (ts)->interp == main_interp && (ts)->tracing == 0)
#else
#  define SEEN(ts) 0
#endif

/* The innermost scope of the calling thread's context, borrowed, or NULL
 * (also for every thread of another interpreter). */
static inline Meter *
meter_now(void)
{
    PyThreadState *ts = tstate_unchecked();
#ifdef SEEN_CACHE
    if (SEEN(ts)) {
        return seen_meter;
    }
#endif
    return lookup_meter(ts);
}

Meter *
current_meter(void)
{
    return meter_now();
}

int
in_scope_of(Meter *inner, Meter *m)
{
    for (; inner != NULL; inner = inner->parent) {
        if (inner == m) {
            return 1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Charging and stopping                                                    */

/* A hard scope's code was stopped: move its fences one grace further (none
 * after GRACE_ROUNDS stops), so that its except/finally blocks can run. */
static void
raise_fences(Meter *m)
{
    settle();   /* its counters, and thresholds that are about to move */
    int rounds = ++m->stops;
    for (int r = 0; r < NRES; r++) {
        if (m->ceiling[r] == NONE) {
            continue;
        }
        uint64_t now = r == R_MEMORY ? (m->held ? m->held->current : 0) : m->used[r];
        uint64_t base = now > m->ceiling[r] ? now : m->ceiling[r];
        m->fence[r] = rounds <= GRACE_ROUNDS ? sat_add(base, grace[r]) : base;
    }
}

/* Is the calling thread handling an exception: in an except or finally block,
 * or an __exit__ called for one, here or in a coroutine that awaits this one? */
static int
handling_exception(void)
{
    PyThreadState *ts = tstate_unchecked();
    for (_PyErr_StackItem *e = ts == NULL ? NULL : ts->exc_info; e != NULL;
         e = e->previous_item) {
        if (e->exc_value != NULL && e->exc_value != Py_None) {
            return 1;
        }
    }
    return 0;
}

/* Once stopped, the scope's code unwinds: its except and finally blocks and
 * the __exit__s on the way (a session's rollback and close) must run to their
 * end, or what they hand back (a pooled connection) is lost. While the thread
 * handles an exception, a stopped scope is not stopped again until it reaches
 * twice its ceiling: code that swallows its stop and goes on is stopped as
 * soon as it leaves the handler. 1 if the stop is put off (the fences moved). */
static int
unwinding(Meter *m)
{
    if (m->stops == 0 || !handling_exception()) {
        return 0;
    }
    settle();
    uint64_t now[NRES];
    for (int r = 0; r < NRES; r++) {
        now[r] = r == R_MEMORY ? (m->held ? m->held->current : 0) : m->used[r];
        if (m->ceiling[r] != NONE && now[r] > sat_add(m->ceiling[r], m->ceiling[r])) {
            return 0;
        }
    }
    for (int r = 0; r < NRES; r++) {
        if (m->ceiling[r] != NONE && m->fence[r] < sat_add(now[r], grace[r])) {
            m->fence[r] = sat_add(now[r], grace[r]);
        }
    }
    m->rearm = 0;
    return 1;
}

/* Stop a hard scope's code that went past a fence in small steps: interrupt
 * the thread that was running it. */
void
stop(Meter *m)
{
    if (unwinding(m)) {
        return;
    }
    raise_fences(m);
    request_interrupt(m);
}

/* Past a soft limit: trip (once), and stop a hard scope past its fence. */
static Py_NO_INLINE void
over(Meter *m)
{
    if (!m->tripped) {
        trip(m, m->used[R_BYTES] > m->limit[R_BYTES] ? R_BYTES
                : m->used[R_OBJECTS] > m->limit[R_OBJECTS] ? R_OBJECTS : R_CALLS);
    }
    if (m->hard && (m->rearm || m->used[R_BYTES] > m->fence[R_BYTES] ||
                    m->used[R_OBJECTS] > m->fence[R_OBJECTS] ||
                    m->used[R_CALLS] > m->fence[R_CALLS])) {
        stop(m);
    }
}

static void
charge_chain(Meter *n, uint64_t bytes, uint64_t objects, uint64_t calls)
{
    for (Meter *m = n; m != NULL; m = m->parent) {
        uint64_t b = m->used[R_BYTES] = sat_add(m->used[R_BYTES], bytes);
        uint64_t o = m->used[R_OBJECTS] = sat_add(m->used[R_OBJECTS], objects);
        uint64_t c = m->used[R_CALLS] = sat_add(m->used[R_CALLS], calls);
        if ((b > m->limit[R_BYTES]) | (o > m->limit[R_OBJECTS]) | (c > m->limit[R_CALLS])) {
            over(m);
        }
    }
}

/* Batched charges. A scope's small blocks are not added to its counters and
 * its ancestors' one by one: they are taken from what the chain has left
 * before any of its thresholds (a limit, a fence, a stop owed), in signed
 * counters (see left_b). The block that takes one below zero is the one that
 * crosses a threshold, or the calls' share of one, and settle() then charges
 * the chain exactly as charging each block would have, at that block. Everything that
 * reads or changes a scope's counters or thresholds settles first (the hook
 * never delays a trip or a stop: a batch cannot cross a threshold unseen).
 * One batch at a time, for the scope last charged, under the GIL. */
void
settle(void)
{
    Meter *n = batch_meter;
    if (n == NULL) {
        return;
    }
    batch_meter = NULL;
    batch_small = batch_bound = 0;
    uint64_t b = batch_b0 - (uint64_t)left_b;
    if (batch_sampled) {
        /* memoryless: whichever thread settles takes the countdown on (below
         * zero if the last block taken is the sample) */
        sample_left = ((double)batch_sample_at - (double)b) * n->held->inv_rate;
        batch_sampled = 0;
    }
    uint64_t o = batch_o0 - (uint64_t)left_o;
    uint64_t c = o + (batch_m0 - (uint64_t)left_m);
    if (b | c) {
        charge_chain(n, b, o, c);
    }
}

/* How much more of resource r this scope can take before the hook must act:
 * reach its limit (a trip), a hard scope's fence or an owed stop (a stop). */
static uint64_t
room(const Meter *m, int r)
{
    uint64_t u = m->used[r];
    if (u <= m->limit[r]) {
        return m->limit[r] - u;
    }
    if (m->hard) {
        return m->rearm || u > m->fence[r] ? 0 : m->fence[r] - u;
    }
    return m->tripped ? ROOM_CAP : 0;   /* past a soft limit: nothing more to do */
}

/* n: a scope whose small blocks take the plain or the sampled path */
static void
start_batch(Meter *n)
{
    uint64_t rm[3] = {ROOM_CAP, ROOM_CAP, ROOM_CAP};
    for (const Meter *m = n; m != NULL; m = m->parent) {
        for (int r = 0; r < 3; r++) {
            uint64_t t = room(m, r);
            rm[r] = t < rm[r] ? t : rm[r];
        }
    }
    /* a quarter of the calls for those that are not objects: the memory
     * domain's allocations are a few in a hundred */
    uint64_t m_share = rm[R_CALLS] / 4, o_share = rm[R_CALLS] - m_share;
    batch_o0 = rm[R_OBJECTS] < o_share ? rm[R_OBJECTS] : o_share;
    batch_m0 = m_share;
    left_o = (int64_t)batch_o0;
    left_m = (int64_t)batch_m0;
    batch_sampled = n->path == P_SAMPLED;
    batch_bound = batch_sampled && n->held->rate < REFUSE_MIN ? (size_t)n->held->rate : REFUSE_MIN;
    batch_b_room = rm[R_BYTES];
    batch_sample_at = NO_SAMPLE;
    if (batch_sampled) {
        if (rng == 0) {
            sample_left = next_exponential();   /* a fresh thread: no sample owed yet */
        }
        double at = sample_left * (double)n->held->rate;
        batch_sample_at = at <= 0 ? 0 : at >= (double)NO_SAMPLE ? NO_SAMPLE : (uint64_t)at;
    }
    batch_b0 = batch_sample_at < batch_b_room ? batch_sample_at : batch_b_room;
    left_b = (int64_t)batch_b0;
    batch_meter = n;
#ifdef SEEN_CACHE
    /* n is the scope last found (the caller's lookup), and batch_small must be 0
     * while the scope last found is not the batch's (malloc_in) */
    batch_small = n == seen_meter ? batch_bound : 0;
#endif
}

void
charge(Meter *n, uint64_t bytes, uint64_t objects, uint64_t calls)
{
    if (batch_meter != NULL) {
        settle();
    }
    charge_chain(n, bytes, objects, calls);
}

/* ------------------------------------------------------------------------ */
/* Held memory                                                              */

/* log(u) for u in (0, 1] without libm's: glibc's log reads a table whose
 * lines, and its code's, miss the caches at almost every sample (callgrind's
 * model of bench_instructions.py, memory=1 MiB: 30 instruction and 23 data
 * misses a request). u = 2^e m with m in [sqrt(1/2), sqrt(2)), and
 * log(m) = 2 atanh(t), t = (m - 1) / (m + 1), |t| < 0.1716: the series to
 * t^11 leaves an error under 2e-11, far below what sampling can see. */
static inline double
log_unit(double u)
{
    uint64_t bits;
    memcpy(&bits, &u, sizeof bits);
    int e = (int)(bits >> 52) - 1023;   /* u is normal: at least 2^-53 */
    bits = (bits & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull;
    double m;
    memcpy(&m, &bits, sizeof m);   /* [1, 2) */
    if (m > 1.4142135623730951) {
        m *= 0.5;
        e++;
    }
    double t = (m - 1.0) / (m + 1.0), t2 = t * t;
    double series =
        1.0 + t2 * (1.0 / 3 + t2 * (1.0 / 5 + t2 * (1.0 / 7 + t2 * (1.0 / 9 + t2 * (1.0 / 11)))));
    return (double)e * 0.6931471805599453 + 2.0 * t * series;
}

/* Sampling, as the production heap profilers do: the bytes a thread allocates
 * are a Poisson process with one sample every `rate` bytes on average (the
 * countdown is in expected samples, so scopes of different rates can share a
 * thread). A block of size s is then recorded with probability
 * 1 - exp(-s/rate), and stands for s / (1 - exp(-s/rate)) bytes: the sum over
 * recorded blocks is an unbiased estimate of what is held. Blocks of `rate`
 * bytes or more are always recorded, at their size. */
static double
next_exponential(void)
{
    if (rng == 0) {
        /* a different stream per thread, per process */
        rng = (uint64_t)(uintptr_t)&rng * 0x9E3779B97F4A7C15ull ^ (uint64_t)PyThread_get_thread_ident() ^
              (uint64_t)time(NULL) << 32;
        rng |= 1;
    }
    /* xorshift64* */
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    uint64_t x = rng * 0x2545F4914F6CDD1Dull;
    double u = ((double)(x >> 11) + 1.0) / 9007199254740993.0;   /* (0, 1] */
    return -log_unit(u);
}

/* Where the innermost user code is: up to SITE_FRAMES frames of it, the
 * event loops' and ours left out. */
static uint32_t
capture_site(void)
{
    PyThreadState *ts = tstate_unchecked();
    uint32_t id;
    if (frames_same_site(ts, &id)) {
        return id;
    }
    Site s;
    frames_site(ts, &s);
    id = site_intern(&s);
    if (id != 0 || s.n == 0) {   /* not a site the table had no room for */
        frames_remember_site(id);
    }
    return id;
}

/* The rate follows how near the chain is to its memory limits. What the
 * estimate's error is at a limit is the sum, over the blocks held then, of
 * size x the rate each was sampled at: a scope that grows to its limit
 * sampled at 4 x the base rate (limit / 1024) while under a 16th of every
 * limit in its chain, and at 4/5 of it after, ends with the same variance as
 * at the base rate throughout (1/16 x 4 + 15/16 x 4/5 = 1): the same 3.1%
 * there, for a quarter of the samples in the scopes that stay far below,
 * which are most. Any rate fixed before a block is allocated leaves the
 * estimate unbiased. Scopes with no memory limit in their chain keep theirs. */
#define FAR_SHIFT 4

static inline uint64_t
rate_for(uint64_t base, int limited, int near)
{
    return base == 0 || !limited ? base : near ? base - base / 5 : base * 4;
}

static void
set_rate(Held *inner, uint64_t rate)
{
    settle();   /* the batch's countdown is in bytes of the old rate */
    inner->rate = rate;
    inner->inv_rate = rate ? 1.0 / (double)rate : 0.0;
}

void
held_retune(Held *inner)
{
    int limited = 0, near = 0;
    for (const Held *h = inner; h != NULL; h = h->parent) {
        const Meter *m = h->owner;
        if (m != NULL && m->limit[R_MEMORY] != NONE) {
            limited = 1;
            near |= h->current >= m->limit[R_MEMORY] >> FAR_SHIFT;
        }
    }
    uint64_t rate = rate_for(inner->base_rate, limited, near);
    if (rate != inner->rate) {
        set_rate(inner, rate);
    }
}

/* Charge a recorded block to its chain. The walk also finds the rate the
 * chain now wants (held_retune's, without a second walk), where there is one
 * to tune: tune is a constant, and the exact mode's copy has no such work. */
static ALWAYS_INLINE void
charge_held(Held *inner, uint64_t weight, const int tune)
{
    int limited = 0, near = 0;
    for (Held *h = inner; h != NULL; h = h->parent) {
        h->current += weight;
        if (h->current > h->peak) {
            h->peak = h->current;
        }
        Meter *m = h->owner;
        if (m == NULL) {
            continue;
        }
        if (tune && m->limit[R_MEMORY] != NONE) {
            limited = 1;
            near |= h->current >= m->limit[R_MEMORY] >> FAR_SHIFT;
        }
        if (h->current > m->limit[R_MEMORY]) {
            if (!m->tripped) {
                trip(m, R_MEMORY);
            }
            if (m->hard && (m->rearm || h->current > m->fence[R_MEMORY])) {
                stop(m);
            }
        }
    }
    if (tune) {
        uint64_t rate = rate_for(inner->base_rate, limited, near);
        if (rate != inner->rate) {
            set_rate(inner, rate);
        }
    }
}

static Py_NO_INLINE void
hold_block(Meter *n, void *p, uint64_t weight)
{
    Held *h = n->held;
    if (n->state == S_EXITED) {
        /* work left running in a frozen scope's context: its nearest live
         * ancestor holds the block, or nobody */
        while (h != NULL && (h->owner == NULL || h->owner->state == S_EXITED)) {
            h = h->parent;
        }
        if (h == NULL) {
            return;
        }
    }
    /* a block the table cannot record would stay held for ever: not held at all */
    if (table_insert((uintptr_t)p, h, (size_t)weight, capture_site()) < 0) {
        return;
    }
    if (h->base_rate == 0) {
        charge_held(h, weight, 0);
    }
    else {
        charge_held(h, weight, 1);
    }
}

/* A block a C library made without the GIL, charged already and chosen to be
 * held with this weight by its thread's log (native.c) */
void
hook_hold_native(Meter *n, void *p, uint64_t weight)
{
    if (n->held != NULL) {
        hold_block(n, p, weight);
    }
}

/* What a sampled block of size s stands for: s / (1 - exp(-s/rate)), the
 * inverse of its chance of being sampled. Blocks below the rate (every block
 * sampled, the larger ones are held exactly) take the series of x/(1-e^-x) in
 * x = s/rate, whose next term is x^6/30240 (under 0.004% at x = 1): a few
 * multiplications instead of expm1 and a division. */
static inline double
sample_weight(size_t size, const Held *h)
{
    double s = (double)size, x = s * h->inv_rate;
    if (x >= 1.0) {
        return s / -expm1(-x);
    }
    return (double)h->rate * (1.0 + x * (0.5 + x * (1.0 / 12.0 - x * x * (1.0 / 720.0))));
}

/* The sample was taken inside n's batch: count down to the next from here. */
static void
batch_resample(const Meter *n)
{
    if (batch_meter != n || !batch_sampled) {
        return;   /* no batch, or another scope's: the countdown is sample_left */
    }
    uint64_t taken = batch_b0 - (uint64_t)left_b;   /* never past batch_b_room here */
    double at = sample_left * (double)n->held->rate;
    batch_sample_at = taken + (at >= (double)NO_SAMPLE ? NO_SAMPLE : (uint64_t)at);
    batch_b0 = batch_sample_at < batch_b_room ? batch_sample_at : batch_b_room;
    left_b = (int64_t)(batch_b0 - taken);
}

static Py_NO_INLINE void
hold_sampled(Meter *n, void *p, size_t size)
{
    if (rng == 0) {
        sample_left = next_exponential();   /* a fresh thread: no sample owed yet */
        sample_left -= (double)size * n->held->inv_rate;
        if (sample_left > 0) {
            batch_resample(n);
            return;
        }
    }
    sample_left = next_exponential();
    batch_resample(n);   /* before hold_block(), which may settle the batch */
    hold_block(n, p, (uint64_t)(sample_weight(size, n->held) + 0.5));
}

static inline void
hold(Meter *n, void *p, size_t size)
{
    const Held *inner = n->held;
    if (inner->rate == 0 || size >= inner->rate) {
        hold_block(n, p, size);
        return;
    }
    sample_left -= (double)size * inner->inv_rate;
    if (sample_left <= 0) {
        hold_sampled(n, p, size);
    }
}

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
int dict_fragile;

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

/* Would this large allocation take a hard scope past a fence? Then refuse it,
 * if the scope's own code is running with no exception in flight. For held
 * memory a realloc weighs only its growth over the block it replaces (old_h
 * and old_size, when that block is held inside the scope). data: an array's
 * data (numpy.c), whose callers turn NULL into numpy's MemoryError: refused
 * whenever it crosses a fence, whoever's C asked. */
static Py_NO_INLINE int
refuse(Meter *n, uint64_t bytes, uint64_t objects, Held *old_h, size_t old_size, int data)
{
    settle();
    uint64_t delta[3] = {bytes, objects, 1};
    for (Meter *m = n; m != NULL; m = m->parent) {
        if (!m->hard) {
            continue;
        }
        int r = -1;
        uint64_t would = 0;
        for (int k = 0; k < 3 && r < 0; k++) {
            if (sat_add(m->used[k], delta[k]) > m->fence[k]) {
                r = k;
                would = sat_add(m->used[k], delta[k]);
            }
        }
        if (r < 0 && m->held != NULL) {
            uint64_t cur = m->held->current;
            for (Held *h = old_h; h != NULL; h = h->parent) {
                if (h == m->held) {
                    cur -= old_size;   /* freed by this realloc */
                    break;
                }
            }
            if (sat_add(cur, bytes) > m->fence[R_MEMORY]) {
                r = R_MEMORY;
                would = sat_add(cur, bytes);
            }
        }
        if (r < 0) {
            continue;
        }
        /* Refused only if it is on its own larger than the ceiling it would cross (the
         * bytearray(2 GiB) in a 1 GiB scope), or the scope's code is overdue: asked to
         * stop and still growing (a worker thread's interrupt waits for the GIL). A
         * large allocation can be one of CPython's own that it does not expect to fail
         * (3.13's interned-strings dict growing inside marshal, 3.12's tee): every
         * other way past a ceiling is left to the interrupt. Nothing short of the
         * ceiling is refused while a stopped scope's code unwinds (unwinding()). */
        int left_to_interrupt =
            (r != R_BYTES && r != R_MEMORY) || (bytes <= m->ceiling[r] && m->stops == 0);
        if ((!data && left_to_interrupt) || (bytes <= m->ceiling[r] && unwinding(m))) {
            return 0;
        }
        PyThreadState *ts = tstate_unchecked();
        if (PyErr_Occurred() || !frame_is_user(ts) || !stack_spilled(ts) ||
            (!data && dict_fragile && (dict_fragile == 2 || is_dict_table_size((size_t)bytes))) ||
            frames_importing(ts) || (!data && !caller_is_cpython())) {
            return 0;   /* only counted; the interrupt stops the code later */
        }
        if (m->reached[r] < would) {
            m->reached[r] = would;
        }
        if (!m->tripped) {
            trip(m, r);
        }
        raise_fences(m);   /* the refusal is the stop: no interrupt as well */
        return 1;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* The hooks                                                                */

/* While no scope is entered anywhere the hooks cost a load of a global and go
 * straight on to the next allocator; the metered paths live in functions of
 * their own so that the inline path saves no registers. */

static inline void
idle_seen(Domain *d)
{
    if (paused & PROBING) {
        d->seen = 1;
    }
}

/* A small block for a scope that holds no memory and measures all code. */
static inline int
plain(const Meter *n, size_t size)
{
    return n->path == P_PLAIN && size < REFUSE_MIN;
}

/* Can this block take the batch? A plain one, or one below the sampling rate
 * of a scope that samples held memory. */
static inline int
batchable(const Meter *n, size_t size)
{
    return plain(n, size) ||
           (n->path == P_SAMPLED && size < REFUSE_MIN && size < n->held->rate);
}

/* The block just taken took a counter of the batch below zero: settle if it
 * crossed the bytes' threshold or used up its share of the calls (which is
 * also what crossing a threshold of objects or calls does). 1 if the block is
 * the sample (then the batch, if it stands, counts on from it: hold_sampled). */
static Py_NO_INLINE int
batch_over(void)
{
    uint64_t taken = batch_b0 - (uint64_t)left_b;
    int sample = batch_sampled && taken > batch_sample_at;
    if (taken > batch_b_room || (left_o | left_m) < 0) {
        settle();   /* the countdown goes on past this block */
    }
    return sample;
}

/* Take a block from the batch, starting one for n if it is not n's; 1 if the
 * block is the sample. */
static Py_NO_INLINE int
batch_take(Meter *n, size_t size, int is_obj)
{
#ifdef Py_GIL_DISABLED
    charge(n, size, (uint64_t)is_obj, 1);
    if (n->path != P_SAMPLED) {
        return 0;
    }
    sample_left -= (double)size * n->held->inv_rate;
    return sample_left <= 0;
#else
    if (n != batch_meter) {
        settle();
        start_batch(n);
    }
    left_b -= (int64_t)size;
    if (is_obj) {
        left_o -= 1;
    }
    else {
        left_m -= 1;
    }
    return (left_b | left_o | left_m) < 0 ? batch_over() : 0;
#endif
}

/* Everything else: machinery left out, large blocks that a hard scope may
 * refuse, held memory. */
static Py_NO_INLINE void *
metered_alloc(Domain *d, Meter *n, size_t nelem, size_t elsize, int zeroed)
{
    size_t size = nelem * elsize;   /* on overflow the allocator refuses anyway */
    if (n->quiet_machinery && !frame_runs_user_code(tstate_unchecked())) {
        n = NULL;   /* the loop's debug bookkeeping is not the task's work */
    }
    if (n != NULL && size >= REFUSE_MIN && n->hard_chain &&
        refuse(n, size, (uint64_t)d->is_obj, NULL, 0, 0)) {
        return NULL;
    }
    void *p = zeroed ? d->prev.calloc(d->prev.ctx, nelem, elsize)
                     : d->prev.malloc(d->prev.ctx, size);
    if (p != NULL && n != NULL) {
        charge(n, size, (uint64_t)d->is_obj, 1);
        if (n->held != NULL) {
            hold(n, p, size);
        }
    }
    return p;
}

static inline int
mul_overflows(size_t a, size_t b, size_t *product)
{
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_mul_overflow(a, b, product);
#else
    *product = a * b;
    return b != 0 && *product / b != a;
#endif
}

/* The allocation that a sampling scope's countdown reached: charged already. */
static Py_NO_INLINE void *
sampled_alloc(Domain *d, Meter *n, size_t nelem, size_t elsize, int zeroed)
{
    size_t size = nelem * elsize;
    void *p = zeroed ? d->prev.calloc(d->prev.ctx, nelem, elsize)
                     : d->prev.malloc(d->prev.ctx, size);
    if (p != NULL) {
        hold_sampled(n, p, size);   /* else the next block is the sample */
    }
    return p;
}

/* A block the inline path did not finish: n's first since another scope's
 * (start a batch) or one for the general path (SLOW_MISS), or one that took a
 * counter of the batch below zero (SLOW_OVER): a threshold or a share of the
 * calls crossed at this block (the rest of the block is taken, and the batch
 * settled), or the sample. The inline path takes the bytes first and stops at
 * the first counter below zero. */
enum { SLOW_MISS, SLOW_OVER };

static Py_NO_INLINE void *
hook_slow(Domain *d, Meter *n, size_t nelem, size_t elsize, int zeroed, int why)
{
    size_t size = nelem * elsize;
    int sample;
    if (why == SLOW_OVER) {
        if (left_b < 0) {   /* the object's or the call's counter is still to take */
            if (d->is_obj) {
                left_o -= 1;
            }
            else {
                left_m -= 1;
            }
        }
        sample = batch_over();
    }
    else if (batchable(n, size)) {
        sample = batch_take(n, size, d->is_obj);
    }
    else {
        return metered_alloc(d, n, nelem, elsize, zeroed);
    }
    if (sample) {
        return sampled_alloc(d, n, nelem, elsize, zeroed);
    }
    return zeroed ? d->prev.calloc(d->prev.ctx, nelem, elsize)
                  : d->prev.malloc(d->prev.ctx, size);
}

/* The inline path: the scope's lookup, and a block taken from its batch, a
 * subtraction and a sign test per counter. A small block is charged before
 * it is allocated, so that the allocation is the hook's last call: the
 * allocator fails a small block only when the process is out of memory, and
 * then the scope has counted one block too many. is_obj is a constant: each
 * domain has hooks of its own, and the memory domain never counts an object. */
#define TAKE(n, size, is_obj, slow, general)                                   \
    do {                                                                       \
        if (UNLIKELY((size) >= batch_small)) {                                 \
            return (n)->path == P_GENERAL ? (general) : slow(SLOW_MISS);       \
        }                                                                      \
        if (UNLIKELY((left_b -= (int64_t)(size)) < 0)) {                       \
            return slow(SLOW_OVER);                                          \
        }                                                                      \
        if (UNLIKELY(--*((is_obj) ? &left_o : &left_m) < 0)) {                \
            return slow(SLOW_OVER);                                          \
        }                                                                      \
    } while (0)

/* The thread state: read where the interpreter keeps it, once runtime.c has
 * found where that is, else asked for. direct is a constant: each way has
 * hooks of its own. */
static int ts_found = -1;   /* not looked for yet */

static ALWAYS_INLINE PyThreadState *
tstate_in(const int direct)
{
    return direct ? tstate_direct() : tstate_unchecked();
}

/* A small block in the scope found, from its batch; anything else past it. */
static ALWAYS_INLINE void *
malloc_take(Domain *d, Meter *n, size_t size, const int is_obj)
{
    if (n != NULL) {
#define SLOW_MALLOC(why) hook_slow(d, n, 1, size, 0, (why))
        TAKE(n, size, is_obj, SLOW_MALLOC, metered_alloc(d, n, 1, size, 0));
#undef SLOW_MALLOC
    }
    return d->prev.malloc(d->prev.ctx, size);
}

static ALWAYS_INLINE void *
calloc_take(Domain *d, Meter *n, size_t nelem, size_t elsize, const int is_obj)
{
    size_t size;   /* an overflow, which the allocator refuses, is not charged */
    if (n != NULL) {
        if (mul_overflows(nelem, elsize, &size)) {
            return metered_alloc(d, n, nelem, elsize, 1);
        }
#define SLOW_CALLOC(why) hook_slow(d, n, nelem, elsize, 1, (why))
        TAKE(n, size, is_obj, SLOW_CALLOC, metered_alloc(d, n, nelem, elsize, 1));
#undef SLOW_CALLOC
    }
    return d->prev.calloc(d->prev.ctx, nelem, elsize);
}

/* Past the cache: a paused thread, another scope, another thread. A tail call
 * from the inline path, which then saves no register for a call of its own;
 * the thread state comes last, so that the size stays where the next
 * allocator takes it. */
static Py_NO_INLINE void *
malloc_lookup(Domain *d, size_t size, PyThreadState *ts)
{
    if (paused || active == 0) {
        idle_seen(d);
        return d->prev.malloc(d->prev.ctx, size);
    }
    return malloc_take(d, lookup_meter(ts), size, d->is_obj);
}

static Py_NO_INLINE void *
calloc_lookup(Domain *d, size_t nelem, size_t elsize, PyThreadState *ts)
{
    if (paused || active == 0) {
        idle_seen(d);
        return d->prev.calloc(d->prev.ctx, nelem, elsize);
    }
    return calloc_take(d, lookup_meter(ts), nelem, elsize, d->is_obj);
}

/* Neither paused nor an idle hook (no scope entered anywhere) is tested here:
 * pause_hook() and the last scope's exit empty the cache, and it is filled
 * again only while the thread is not paused and some scope is entered, so
 * both always take the lookup. */
static ALWAYS_INLINE void *
malloc_in(Domain *d, size_t size, const int is_obj, const int direct)
{
    PyThreadState *ts = tstate_in(direct);
    if (!SEEN(ts)) {
        return malloc_lookup(d, size, ts);
    }
    /* the batch's own test first: batch_small is 0 unless the scope found is the
     * batch's, so that a block under it needs no test of the scope */
    if (LIKELY(size < batch_small)) {
        if (UNLIKELY((left_b -= (int64_t)size) < 0 ||
                     --*(is_obj ? &left_o : &left_m) < 0)) {
            return hook_slow(d, seen_meter, 1, size, 0, SLOW_OVER);
        }
        return d->prev.malloc(d->prev.ctx, size);
    }
    return malloc_take(d, seen_meter, size, is_obj);
}

static ALWAYS_INLINE void *
calloc_in(Domain *d, size_t nelem, size_t elsize, const int is_obj, const int direct)
{
    PyThreadState *ts = tstate_in(direct);
    if (!SEEN(ts)) {
        return calloc_lookup(d, nelem, elsize, ts);
    }
    return calloc_take(d, seen_meter, nelem, elsize, is_obj);
}

/* the hooks of one domain (mem, obj) and one way to the thread state; each
 * names its domain itself, so that reaching the next allocator costs no load
 * through ctx (which is that domain all the same) */
#define HOOKS(name, dom, is_obj, direct)                                   \
    static void *hook_malloc_##name(void *ctx, size_t size)                \
    {                                                                      \
        (void)ctx;                                                         \
        return malloc_in(&dom, size, is_obj, direct);                      \
    }                                                                      \
    static void *hook_calloc_##name(void *ctx, size_t nelem, size_t elsize) \
    {                                                                      \
        (void)ctx;                                                         \
        return calloc_in(&dom, nelem, elsize, is_obj, direct);             \
    }
HOOKS(mem, dom_mem, 0, 0)
HOOKS(obj, dom_obj, 1, 0)
HOOKS(mem_direct, dom_mem, 0, 1)
HOOKS(obj_direct, dom_obj, 1, 1)
#undef HOOKS

static Py_NO_INLINE void
forget_block(void *ptr)
{
    PyThreadState *ts = tstate_unchecked();
    if (ts != NULL && ts->interp == main_interp) {
        table_remove((uintptr_t)ptr);
    }
}

/* A realloc is one call, charges its new size as a fresh allocation would, and
 * no object. For held memory the old block is forgotten and the new one held. */
static Py_NO_INLINE void *
metered_realloc(Domain *d, Meter *n, void *ptr, size_t size)
{
    if (n != NULL && n->quiet_machinery && !frame_runs_user_code(tstate_unchecked())) {
        n = NULL;
    }
    if (n != NULL && size >= REFUSE_MIN && n->hard_chain) {
        size_t old_size = 0;
        Held *old_h = ptr != NULL && n->held != NULL ? table_lookup((uintptr_t)ptr, &old_size)
                                                     : NULL;
        if (refuse(n, size, 0, old_h, old_size, 0)) {
            return NULL;
        }
    }
    void *p = d->prev.realloc(d->prev.ctx, ptr, size);
    if (p == NULL) {
        return NULL;
    }
    if (ptr != NULL && table_count && table_may_hold(ptr)) {
        forget_block(ptr);
    }
    if (n != NULL) {
        charge(n, size, 0, 1);
        if (n->held != NULL) {
            hold(n, p, size);
        }
    }
    return p;
}

/* A block that could take the batch, as a malloc of its size would: the old
 * block forgotten if it was held, the new one charged from the batch, and in a
 * sampling scope counted down to the next sample. */
static Py_NO_INLINE void *
batched_realloc(Domain *d, Meter *n, void *ptr, size_t size)
{
    void *p = d->prev.realloc(d->prev.ctx, ptr, size);
    if (p == NULL) {
        return NULL;
    }
    if (ptr != NULL && table_count && table_may_hold(ptr)) {
        forget_block(ptr);
    }
    int sample;
    if (n == batch_meter) {   /* batch_take's common case, without its call */
        left_b -= (int64_t)size;
        left_m -= 1;
        sample = (left_b | left_m) < 0 ? batch_over() : 0;
    }
    else {
        sample = batch_take(n, size, 0);
    }
    if (sample) {
        hold_sampled(n, p, size);
    }
    return p;
}

/* Outside any scope, while some scope holds memory: the old block forgotten. */
static Py_NO_INLINE void *
unmetered_realloc(Domain *d, void *ptr, size_t size)
{
    void *p = d->prev.realloc(d->prev.ctx, ptr, size);
    if (p != NULL) {
        forget_block(ptr);
    }
    return p;
}

static ALWAYS_INLINE void *
realloc_in(Domain *d, void *ptr, size_t size, const int direct)
{
    Meter *n = NULL;
    PyThreadState *ts = tstate_in(direct);
    if (SEEN(ts)) {
        /* below batch_small: the batch's scope, and a block that can take it. An
         * old block the filter says is not held (any block while the table is
         * empty, most of them while scopes sample) leaves nothing to forget after
         * the call, so a block that leaves the batch above zero (short of the next
         * sample) is charged before it, as a malloc is, and the call is the
         * hook's last */
        if (size < batch_small && left_b >= (int64_t)size && left_m > 0 &&
            (table_count == 0 || !table_may_hold(ptr))) {
            left_b -= (int64_t)size;
            left_m -= 1;
            return d->prev.realloc(d->prev.ctx, ptr, size);
        }
        n = seen_meter;
    }
    else if (!paused && active != 0) {   /* as in malloc_in */
        n = lookup_meter(ts);
    }
    if (n == NULL) {
        if (table_count != 0 && ptr != NULL && table_may_hold(ptr)) {
            return unmetered_realloc(d, ptr, size);
        }
        return d->prev.realloc(d->prev.ctx, ptr, size);
    }
    /* below batch_small: n is the batch's scope, and the block can take it */
    if (size < batch_small || batchable(n, size)) {
        return batched_realloc(d, n, ptr, size);
    }
    return metered_realloc(d, n, ptr, size);
}

static Py_NO_INLINE void
free_held(Domain *d, void *ptr)
{
    if (ptr == NULL) {   /* its slot was set by some block; the table has no NULL */
        d->prev.free(d->prev.ctx, ptr);
        return;
    }
    forget_block(ptr);
    /* never from another interpreter's thread: it runs without our GIL, and
     * the chain is changed only under it */
    PyThreadState *ts = tstate_unchecked();
    if (table_count == 0 && ts != NULL && ts->interp == main_interp) {
        step_aside_if_idle();
    }
    d->prev.free(d->prev.ctx, ptr);
}

static ALWAYS_INLINE void
free_in(Domain *d, void *ptr)
{
    /* frees are credited even while paused: a stale entry would credit the
     * wrong scope when the address comes back */
    if (UNLIKELY(table_may_hold(ptr))) {
        free_held(d, ptr);
        return;
    }
    d->prev.free(d->prev.ctx, ptr);
}

/* Array data, allocated beside the hooked domains on a scope's behalf
 * (numpy.c), under the GIL: charged and held as a block of the memory domain
 * would be, with a realloc's old block (old) forgotten. */

/* The scope to charge, found as the hooks find it, or NULL: none entered
 * anywhere, our own work, or another interpreter's thread. */
Meter *
hook_data_scope(void)
{
    if (paused || active == 0) {
        return NULL;
    }
    PyThreadState *ts = ts_found == 1 ? tstate_direct() : tstate_unchecked();
    if (SEEN(ts)) {
        return seen_meter;
    }
    return lookup_meter(ts);
}

int
hook_refuse_data(Meter *n, void *old, size_t size)
{
    size_t old_size = 0;
    Held *old_h = old != NULL && n->held != NULL && table_count != 0
                      ? table_lookup((uintptr_t)old, &old_size)
                      : NULL;
    return refuse(n, size, 0, old_h, old_size, 1);
}

void
hook_charge_data(Meter *n, void *old, void *p, size_t size)
{
    if (old != NULL && table_count != 0 && table_may_hold(old)) {
        forget_block(old);
    }
    if (n == NULL) {
        return;
    }
    /* a small block, from the batch, as the memory domain's are (charging the
     * chain would settle it, and the hook's next block start another):
     * batch_small is 0 unless the batch is the scope last found, n */
    if (LIKELY(size < batch_small && n == seen_meter)) {
        left_b -= (int64_t)size;
        left_m -= 1;
        if (UNLIKELY((left_b | left_m) < 0) && batch_over()) {
            hold_sampled(n, p, size);
        }
        return;
    }
    if (batchable(n, size)) {
        if (batch_take(n, size, 0)) {
            hold_sampled(n, p, size);
        }
        return;
    }
    charge(n, size, 0, 1);
    if (n->held != NULL) {
        hold(n, p, size);
    }
}

/* A block under REFUSE_MIN that numpy's default handler just allocated (it
 * is never refused): the lookup and the charge in one call, the common case
 * taken from the batch as malloc_in takes it. */
void
hook_data_small(void *p, size_t size)
{
    if (paused || active == 0) {
        return;
    }
    PyThreadState *ts = ts_found == 1 ? tstate_direct() : tstate_unchecked();
    if (!SEEN(ts)) {
        Meter *n = lookup_meter(ts);
        if (n != NULL) {
            hook_charge_data(n, NULL, p, size);
        }
        return;
    }
    /* batch_small is 0 unless seen_meter is the batch's scope */
    if (LIKELY(size < batch_small)) {
        left_b -= (int64_t)size;
        left_m -= 1;
        if (UNLIKELY((left_b | left_m) < 0) && batch_over()) {
            hold_sampled(seen_meter, p, size);
        }
        return;
    }
    if (seen_meter != NULL) {
        hook_charge_data(seen_meter, NULL, p, size);
    }
}

void
hook_forget_data(void *ptr)
{
    forget_block(ptr);
    if (table_count == 0) {
        step_aside_if_idle();
    }
}

/* realloc and free of one domain and one way to the thread state, as HOOKS */
#define MORE_HOOKS(name, dom, direct)                                       \
    static void *hook_realloc_##name(void *ctx, void *ptr, size_t size)     \
    {                                                                       \
        (void)ctx;                                                          \
        return realloc_in(&dom, ptr, size, direct);                         \
    }                                                                       \
    static void hook_free_##name(void *ctx, void *ptr)                      \
    {                                                                       \
        (void)ctx;                                                          \
        free_in(&dom, ptr);                                                 \
    }
MORE_HOOKS(mem, dom_mem, 0)
MORE_HOOKS(obj, dom_obj, 0)
MORE_HOOKS(mem_direct, dom_mem, 1)
MORE_HOOKS(obj_direct, dom_obj, 1)
#undef MORE_HOOKS

/* ------------------------------------------------------------------------ */
/* The allocator chain                                                      */

/* The chain cannot be read back beyond its top, so each domain remembers
 * whether the hook is in it: on top, or wrapped by something started later
 * (tracemalloc). verify_chain checks that memory by probing.
 *
 * A free has nothing to do for the hook while no scope holds memory: the hook
 * then goes in light, its free and ctx those of the allocator below (the hooks
 * ignore ctx), so that a free costs no call of ours. Builds with
 * profile-guided optimization (Debian's, the python.org images') go further:
 * they inline pymalloc's free behind a test that the chain's free is pymalloc's
 * own, which any hook of free defeats (3.15: 6,000 instructions a request of
 * the handler benchmark). Before a scope can hold a block, the hook on top
 * takes its frees back; a light hook that something has wrapped cannot, and a
 * link of its own that only sees frees goes on top of the wrapper instead. */

static int
frees_wanted(void)
{
    return live_holders > 0 || table_count > 0;
}

static PyMemAllocatorEx
hooks_of(Domain *d, int light)
{
    PyMemAllocatorEx a;
    if (ts_found == 1) {
        a = d->is_obj ? (PyMemAllocatorEx){d, hook_malloc_obj_direct, hook_calloc_obj_direct,
                                           hook_realloc_obj_direct, hook_free_obj_direct}
                      : (PyMemAllocatorEx){d, hook_malloc_mem_direct, hook_calloc_mem_direct,
                                           hook_realloc_mem_direct, hook_free_mem_direct};
    }
    else {
        a = d->is_obj ? (PyMemAllocatorEx){d, hook_malloc_obj, hook_calloc_obj,
                                           hook_realloc_obj, hook_free_obj}
                      : (PyMemAllocatorEx){d, hook_malloc_mem, hook_calloc_mem,
                                           hook_realloc_mem, hook_free_mem};
    }
    /* ctx is the allocator below's in every form (the hooks ignore it): another
     * interpreter reads the table without our GIL, and any mix of an old and a
     * new function with that ctx is a call that works */
    a.ctx = d->prev.ctx;
    if (light) {
        a.free = d->prev.free;
    }
    return a;
}

/* Is the hook on top? A wrapper that saved the hook in one form may put it
 * back after the hook changed form (tracemalloc.stop()): then the form of
 * now goes back in its place. */
static int
on_top(Domain *d)
{
    PyMemAllocatorEx now;
    PyMem_GetAllocator(d->domain, &now);
    if (now.malloc != d->ours.malloc) {
        return 0;
    }
    if (now.free != d->ours.free || now.ctx != d->ours.ctx) {
        PyMem_SetAllocator(d->domain, &d->ours);
    }
    return 1;
}

static void
join_chain(Domain *d)
{
    if (!d->in_chain) {
        /* wrap whatever is there now: pymalloc, tracemalloc, a debug hook */
        PyMem_GetAllocator(d->domain, &d->prev);
        d->light = !frees_wanted();
        d->ours = hooks_of(d, d->light);
        PyMem_SetAllocator(d->domain, &d->ours);
        d->in_chain = 1;
        d->watching = 0;   /* anything above the hook before is gone */
        memset(polled, 0, sizeof(polled));
    }
}

/* Leave the chain, which only the top of it can do. */
static int
leave_chain(Domain *d)
{
    if (d->in_chain && on_top(d)) {
        PyMem_SetAllocator(d->domain, &d->prev);
        d->in_chain = 0;
        d->watching = 0;
    }
    return !d->in_chain;
}

/* The free-only link: the next allocator's for everything, and a held block
 * forgotten on its way to be freed. A realloc passes through the light hook
 * below, which forgets the old block itself. Each domain's link names its
 * domain itself and its ctx is the allocator below's, as the hooks' is. */
static void
watch_forget(void *ptr)
{
    if (table_count != 0 && ptr != NULL && table_may_hold(ptr)) {
        forget_block(ptr);
    }
}

#define WATCH(name, dom)                                                          \
    static void *watch_malloc_##name(void *ctx, size_t size)                      \
    {                                                                             \
        (void)ctx;                                                                \
        if (paused & PROBING) {                                                   \
            dom.watch_seen = 1;                                                   \
        }                                                                         \
        return dom.watch_prev.malloc(dom.watch_prev.ctx, size);                   \
    }                                                                             \
    static void *watch_calloc_##name(void *ctx, size_t nelem, size_t elsize)      \
    {                                                                             \
        (void)ctx;                                                                \
        return dom.watch_prev.calloc(dom.watch_prev.ctx, nelem, elsize);          \
    }                                                                             \
    static void *watch_realloc_##name(void *ctx, void *ptr, size_t size)          \
    {                                                                             \
        (void)ctx;                                                                \
        return dom.watch_prev.realloc(dom.watch_prev.ctx, ptr, size);             \
    }                                                                             \
    static void watch_free_##name(void *ctx, void *ptr)                           \
    {                                                                             \
        (void)ctx;                                                                \
        watch_forget(ptr);                                                        \
        dom.watch_prev.free(dom.watch_prev.ctx, ptr);                             \
    }
WATCH(mem, dom_mem)
WATCH(obj, dom_obj)
#undef WATCH

static PyMemAllocatorEx
watch_link(Domain *d)
{
    return d->is_obj ? (PyMemAllocatorEx){d->watch_prev.ctx, watch_malloc_obj,
                                          watch_calloc_obj, watch_realloc_obj, watch_free_obj}
                     : (PyMemAllocatorEx){d->watch_prev.ctx, watch_malloc_mem,
                                          watch_calloc_mem, watch_realloc_mem, watch_free_mem};
}

static int
watch_on_top(Domain *d)
{
    PyMemAllocatorEx now;
    PyMem_GetAllocator(d->domain, &now);
    return now.malloc == watch_link(d).malloc;
}

/* Make the hook in d's chain see frees exactly when a scope can hold a block
 * (frees_wanted): from its own struct if it is on top, else from the link. */
static void
fit_frees(Domain *d)
{
    if (!d->in_chain) {
        return;   /* join_chain() fits it */
    }
    int want = frees_wanted();
    if (on_top(d)) {
        d->watching = 0;   /* on top: whatever was above, the link too, is gone */
        if (d->light == want) {
            d->light = !want;
            d->ours = hooks_of(d, d->light);
            PyMem_SetAllocator(d->domain, &d->ours);
        }
    }
    else if (want && d->light && !d->watching) {
        PyMem_GetAllocator(d->domain, &d->watch_prev);
        PyMemAllocatorEx link = watch_link(d);
        PyMem_SetAllocator(d->domain, &link);
        d->watching = 1;
    }
    else if (!want && d->watching && watch_on_top(d)) {
        PyMem_SetAllocator(d->domain, &d->watch_prev);
        d->watching = 0;
    }
}

void
hook_fit_frees(void)
{
    int want = frees_wanted();
    /* at every enter(): nothing to look up while each hook has the form wanted */
    if (dom_mem.light == want || dom_obj.light == want || dom_mem.watching || dom_obj.watching) {
        fit_frees(&dom_mem);
        fit_frees(&dom_obj);
    }
}

void
hook_join(void)
{
    join_chain(&dom_mem);
    join_chain(&dom_obj);
}

int
hook_leave(void)
{
    int a = leave_chain(&dom_mem), b = leave_chain(&dom_obj);
    return a && b;
}

/* Once, at install (it may release the GIL: before anything is set up). */
void
hook_find_thread_state(void)
{
    if (ts_found < 0) {
        ts_found = find_thread_state();
    }
}

/* 1 if the thread state can be read directly, 0 if not, -1 before install */
int
hook_found_thread_state(void)
{
    return ts_found;
}

/* 1 where the hooks in the chain read the thread state where the interpreter
 * keeps it */
int
hook_reads_thread_state(void)
{
    return dom_obj.in_chain && dom_obj.ours.malloc == hook_malloc_obj_direct;
}

/* For tests: how the object domain's frees reach the hook */
const char *
hook_form(void)
{
    const Domain *d = &dom_obj;
    return !d->in_chain ? "out" : !d->light ? "full" : d->watching ? "light, watched" : "light";
}

int
hook_on_top(void)
{
    return dom_mem.in_chain && dom_obj.in_chain;
}

void
ensure_hooked(void)
{
    if (installed && (active > 0 || table_count > 0)) {
        hook_join();
    }
}

/* With no scope entered and no held block to credit, the hook has nothing to
 * do: it leaves the chain (if it is on top) so that an idle process pays
 * nothing, and the next enter() puts it back. */
void
step_aside_if_idle(void)
{
    if (active == 0 && table_count == 0) {
        hook_leave();
    }
}

/* Has anything changed the top of either chain since the delivery thread last
 * looked? Asked without the GIL: PyMem_GetAllocator takes the allocators' own
 * lock from 3.12; 3.11 copies a few words, and a torn copy only says yes,
 * which the look under the GIL (chain_look) then corrects. */
static int
top_moved(Domain *d, const PyMemAllocatorEx *last)
{
    PyMemAllocatorEx now;
    PyMem_GetAllocator(d->domain, &now);
    /* the hook on top is in the chain whatever form it took since (each scope
     * can change it): only something else on top is worth a look */
    return now.malloc != d->ours.malloc && (now.malloc != last->malloc || now.ctx != last->ctx);
}

int
chain_moved(void)
{
    return top_moved(&dom_mem, &polled[0]) || top_moved(&dom_obj, &polled[1]);
}

/* Any allocator swapper (memray's Tracker, tracemalloc.stop() reached by any
 * path, a profiler's) that puts back what it saved before the hook joined
 * drops the hook from the chain, and nothing then reaches it to say so: the
 * delivery thread looks while scopes are entered (GIL held). */
void
chain_look(void)
{
    if (installed && active > 0) {
        verify_chain();
    }
    PyMem_GetAllocator(PYMEM_DOMAIN_MEM, &polled[0]);
    PyMem_GetAllocator(PYMEM_DOMAIN_OBJ, &polled[1]);
}

/* Something that saved the chain below us may have put it back since
 * (tracemalloc.stop, however it was reached): the hook would then think it is
 * in the chain while no allocation reaches it. One allocation per domain, with
 * the hook told to expect it, says for sure; join again where it did not
 * arrive. */
int
verify_chain(void)
{
    Domain *doms[2] = {&dom_mem, &dom_obj};
    int dropped = 0;
    if (dom_mem.in_chain && dom_obj.in_chain && on_top(&dom_mem) && on_top(&dom_obj)) {
        hook_fit_frees();   /* tracemalloc.stop() may have put back a light hook */
        return 0;   /* on top: certainly in the chain, no probe needed */
    }
    dom_mem.seen = dom_obj.seen = 0;
    dom_mem.watch_seen = dom_obj.watch_seen = 0;
    paused += PROBING;
    forget_seen();   /* as pause_hook() */
    PyMem_Free(PyMem_Malloc(1));
    PyObject_Free(PyObject_Malloc(1));
    paused -= PROBING;
    for (int i = 0; i < 2; i++) {
        if (doms[i]->in_chain && !doms[i]->seen) {
            doms[i]->in_chain = 0;
            dropped = 1;
        }
        if (doms[i]->watching && !doms[i]->watch_seen) {
            doms[i]->watching = 0;
        }
    }
    ensure_hooked();
    hook_fit_frees();
    return dropped;
}

/* A block a C library made under the GIL (native.c): charged its size, held
 * at fp, what it takes in libc's heap */
void
hook_charge_native(Meter *n, void *old, void *p, size_t size, size_t fp)
{
    if (n == NULL || n->held == NULL) {
        hook_charge_data(n, old, p, size);   /* batched, nothing held */
        return;
    }
    if (old != NULL && table_count != 0 && table_may_hold(old)) {
        forget_block(old);
    }
    charge(n, size, 0, 1);
    hold(n, p, fp);
}
