/*
 * The PEP 445 hook's inline path: it wraps the object and memory allocator domains, finds
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
#include "hook.h"

PyObject *scope_var;
PyInterpreterState *main_interp;
GOTCHA_TLS int paused;
Py_ssize_t active;
int installed;

Domain dom_mem = {.domain = PYMEM_DOMAIN_MEM, .is_obj = 0};
Domain dom_obj = {.domain = PYMEM_DOMAIN_OBJ, .is_obj = 1};

Hot hot = {.seen_ts = NO_TS, .ts_found = -1};

/* ------------------------------------------------------------------------ */
/* Charging: the batch                                                      */

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
 * counters (see hot.left_b). The block that takes one below zero is the one that
 * crosses a threshold, or the calls' share of one, and settle() then charges
 * the chain exactly as charging each block would have, at that block. Everything that
 * reads or changes a scope's counters or thresholds settles first (the hook
 * never delays a trip or a stop: a batch cannot cross a threshold unseen).
 * One batch at a time, for the scope last charged, under the GIL. */
void
settle(void)
{
    Meter *n = hot.batch_meter;
    if (n == NULL) {
        return;
    }
    ASSERT_GIL();
    hot.batch_meter = NULL;
    hot.batch_small = hot.batch_bound = 0;
    uint64_t b = hot.batch_b0 - (uint64_t)hot.left_b;
    if (hot.batch_sampled) {
        /* memoryless: whichever thread settles takes the countdown on (below
         * zero if the last block taken is the sample) */
        sample_resume(((double)hot.batch_sample_at - (double)b) * n->held->inv_rate);
        hot.batch_sampled = 0;
    }
    uint64_t o = hot.batch_o0 - (uint64_t)hot.left_o;
    uint64_t c = o + (hot.batch_m0 - (uint64_t)hot.left_m);
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
    hot.batch_o0 = rm[R_OBJECTS] < o_share ? rm[R_OBJECTS] : o_share;
    hot.batch_m0 = m_share;
    hot.left_o = (int64_t)hot.batch_o0;
    hot.left_m = (int64_t)hot.batch_m0;
    hot.batch_sampled = n->path == P_SAMPLED;
    hot.batch_bound = hot.batch_sampled && n->held->rate < REFUSE_MIN ? (size_t)n->held->rate : REFUSE_MIN;
    hot.batch_b_room = rm[R_BYTES];
    hot.batch_sample_at = NO_SAMPLE;
    if (hot.batch_sampled) {
        double at = sample_owed() * (double)n->held->rate;
        hot.batch_sample_at = at <= 0 ? 0 : at >= (double)NO_SAMPLE ? NO_SAMPLE : (uint64_t)at;
    }
    hot.batch_b0 = hot.batch_sample_at < hot.batch_b_room ? hot.batch_sample_at : hot.batch_b_room;
    hot.left_b = (int64_t)hot.batch_b0;
    hot.batch_meter = n;
#ifdef SEEN_CACHE
    /* n is the scope last found (the caller's lookup), and hot.batch_small must be 0
     * while the scope last found is not the batch's (malloc_in) */
    hot.batch_small = n == hot.seen_meter ? hot.batch_bound : 0;
#endif
}

void
charge(Meter *n, uint64_t bytes, uint64_t objects, uint64_t calls)
{
    if (hot.batch_meter != NULL) {
        settle();
    }
    charge_chain(n, bytes, objects, calls);
}

/* The sample was taken inside n's batch: count down to the next from here. */
void
batch_resample(const Meter *n)
{
    if (hot.batch_meter != n || !hot.batch_sampled) {
        return;   /* no batch, or another scope's: the countdown is the thread's (sample.c) */
    }
    uint64_t taken = hot.batch_b0 - (uint64_t)hot.left_b;   /* never past hot.batch_b_room here */
    double at = sample_owed() * (double)n->held->rate;
    hot.batch_sample_at = taken + (at >= (double)NO_SAMPLE ? NO_SAMPLE : (uint64_t)at);
    hot.batch_b0 = hot.batch_sample_at < hot.batch_b_room ? hot.batch_sample_at : hot.batch_b_room;
    hot.left_b = (int64_t)(hot.batch_b0 - taken);
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

/* The block just taken took a counter of the batch below zero: settle if it
 * crossed the bytes' threshold or used up its share of the calls (which is
 * also what crossing a threshold of objects or calls does). 1 if the block is
 * the sample (then the batch, if it stands, counts on from it: hold_sampled). */
Py_NO_INLINE int
batch_over(void)
{
    uint64_t taken = hot.batch_b0 - (uint64_t)hot.left_b;
    int sample = hot.batch_sampled && taken > hot.batch_sample_at;
    if (taken > hot.batch_b_room || (hot.left_o | hot.left_m) < 0) {
        settle();   /* the countdown goes on past this block */
    }
    return sample;
}

/* Take a block from the batch, starting one for n if it is not n's; 1 if the
 * block is the sample. */
Py_NO_INLINE int
batch_take(Meter *n, size_t size, int is_obj)
{
#ifdef Py_GIL_DISABLED
    charge(n, size, (uint64_t)is_obj, 1);
    if (n->path != P_SAMPLED) {
        return 0;
    }
    return sample_countdown((double)size * n->held->inv_rate);
#else
    if (n != hot.batch_meter) {
        settle();
        start_batch(n);
    }
    hot.left_b -= (int64_t)size;
    if (is_obj) {
        hot.left_o -= 1;
    }
    else {
        hot.left_m -= 1;
    }
    return (hot.left_b | hot.left_o | hot.left_m) < 0 ? batch_over() : 0;
#endif
}

/* Everything else: machinery left out, large blocks that a hard scope may
 * refuse, held memory. */
static Py_NO_INLINE void *
metered_alloc(Domain *d, Meter *n, size_t nelem, size_t elsize, int zeroed)
{
    size_t size = nelem * elsize;   /* on overflow the allocator refuses anyway */
    if (UNLIKELY(meter_quiet(n)) && machinery_now(tstate_unchecked())) {
        n = NULL;   /* the machinery's work, not the task's: meter_quiet() */
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
        if (hot.left_b < 0) {   /* the object's or the call's counter is still to take */
            if (d->is_obj) {
                hot.left_o -= 1;
            }
            else {
                hot.left_m -= 1;
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
        if (UNLIKELY((size) >= hot.batch_small)) {                                 \
            return (n)->path == P_GENERAL ? (general) : slow(SLOW_MISS);       \
        }                                                                      \
        if (UNLIKELY((hot.left_b -= (int64_t)(size)) < 0)) {                       \
            return slow(SLOW_OVER);                                          \
        }                                                                      \
        if (UNLIKELY(--*((is_obj) ? &hot.left_o : &hot.left_m) < 0)) {                \
            return slow(SLOW_OVER);                                          \
        }                                                                      \
    } while (0)

/* The thread state: read where the interpreter keeps it, once runtime.c has
 * found where that is, else asked for. direct is a constant: each way has
 * hooks of its own. */

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
    /* the batch's own test first: hot.batch_small is 0 unless the scope found is the
     * batch's, so that a block under it needs no test of the scope */
    if (LIKELY(size < hot.batch_small)) {
        if (UNLIKELY((hot.left_b -= (int64_t)size) < 0 ||
                     --*(is_obj ? &hot.left_o : &hot.left_m) < 0)) {
            return hook_slow(d, hot.seen_meter, 1, size, 0, SLOW_OVER);
        }
        return d->prev.malloc(d->prev.ctx, size);
    }
    return malloc_take(d, hot.seen_meter, size, is_obj);
}

static ALWAYS_INLINE void *
calloc_in(Domain *d, size_t nelem, size_t elsize, const int is_obj, const int direct)
{
    PyThreadState *ts = tstate_in(direct);
    if (!SEEN(ts)) {
        return calloc_lookup(d, nelem, elsize, ts);
    }
    return calloc_take(d, hot.seen_meter, nelem, elsize, is_obj);
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

Py_NO_INLINE void
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
    if (n != NULL && UNLIKELY(meter_quiet(n)) && machinery_now(tstate_unchecked())) {
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
    if (n == hot.batch_meter) {   /* batch_take's common case, without its call */
        hot.left_b -= (int64_t)size;
        hot.left_m -= 1;
        sample = (hot.left_b | hot.left_m) < 0 ? batch_over() : 0;
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
        /* below hot.batch_small: the batch's scope, and a block that can take it. An
         * old block the filter says is not held (any block while the table is
         * empty, most of them while scopes sample) leaves nothing to forget after
         * the call, so a block that leaves the batch above zero (short of the next
         * sample) is charged before it, as a malloc is, and the call is the
         * hook's last */
        if (size < hot.batch_small && hot.left_b >= (int64_t)size && hot.left_m > 0 &&
            (table_count == 0 || !table_may_hold(ptr))) {
            hot.left_b -= (int64_t)size;
            hot.left_m -= 1;
            return d->prev.realloc(d->prev.ctx, ptr, size);
        }
        n = hot.seen_meter;
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
    /* below hot.batch_small: n is the batch's scope, and the block can take it */
    if (size < hot.batch_small || batchable(n, size)) {
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

/* The hooks of domain d, in the form the thread state is read in; light:
 * its frees left to the allocator below (chain.c). */
PyMemAllocatorEx
hook_allocator(Domain *d, int light)
{
    PyMemAllocatorEx a;
    if (hot.ts_found == 1) {
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

/* Once, at install (it may release the GIL: before anything is set up). */
void
hook_find_thread_state(void)
{
    if (hot.ts_found < 0) {
        hot.ts_found = find_thread_state();
    }
}

/* 1 if the thread state can be read directly, 0 if not, -1 before install */
int
hook_found_thread_state(void)
{
    return hot.ts_found;
}

/* 1 where the hooks in the chain read the thread state where the interpreter
 * keeps it */
int
hook_reads_thread_state(void)
{
    return dom_obj.in_chain && dom_obj.ours.malloc == hook_malloc_obj_direct;
}

