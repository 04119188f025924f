/*
 * What the hook's own files share, and no other file sees:
 *
 *   hook.c    the inline path: the hooks of both domains, and the batch
 *   scope.c   finding the calling thread's scope, and the scope last found
 *   sample.c  held memory: sampling, a held block charged to its chain
 *   stop.c    past a threshold: trips, stops of hard scopes, refusals
 *   probe.c   can a dict's growth fail? (asked once, at install)
 *   chain.c   the allocator chain: joining, leaving, the hook's forms
 *   data.c    blocks made beside the hooked domains: numpy's arrays, and C
 *             libraries' under the GIL (native.c)
 *
 * The inline path reads the scope last found and the batch on every
 * allocation: they are one struct (hot), defined in hook.c and used by hook.c,
 * scope.c (which fills the cache) and data.c (which takes the same inline
 * path for numpy's and C libraries' blocks). Everything else of a file is
 * static in it.
 */
#ifndef GOTCHA_HOOK_H
#define GOTCHA_HOOK_H

#include "_meter.h"

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

GOTCHA_HIDDEN_BEGIN

/* paused carries this bit while verify_chain probes the chain (chain.c) */
#define PROBING (1 << 20)

/* One allocator domain: the allocator below the hook (the inline path calls
 * it), and the hook's place in the chain (chain.c). */
typedef struct {
    PyMemAllocatorEx prev;
    PyMemAllocatorDomain domain;
    int is_obj;
    int in_chain;
    int seen;      /* the probe reached this hook */
    int light;     /* ours leaves frees to prev (see chain.c) */
    PyMemAllocatorEx ours;
    /* the free-only link, above whatever wrapped a light hook */
    PyMemAllocatorEx watch_prev;
    int watching;
    int watch_seen;
} Domain;

extern Domain dom_mem, dom_obj;   /* hook.c */

#ifndef Py_GIL_DISABLED
#  define SEEN_CACHE 1
#endif

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

typedef struct {
    /* The scope last found (scope.c), for one (thread state, context
     * version); seen_ts is NO_TS while there is none */
    PyThreadState *seen_ts;
    uint64_t seen_tsid, seen_ver;
    Meter *seen_meter;
    /* the batch (hook.c) */
    Meter *batch_meter;             /* borrowed; freeing it settles */
    uint64_t batch_b0, batch_o0, batch_m0;
    uint64_t batch_b_room;          /* bytes before the threshold, from the start */
    uint64_t batch_sample_at;       /* bytes before the sample, from the start */
    int64_t left_b, left_o, left_m;
    size_t batch_bound;             /* blocks below this size are batched */
    size_t batch_small;             /* batch_bound while the batch is the scope last found, or 0 */
    char batch_sampled;
    /* the thread state: -1 not looked for yet, 1 read where the interpreter
     * keeps it (runtime.c), 0 asked for */
    int ts_found;
} Hot;

extern Hot hot;
#define NO_TS ((PyThreadState *)&hot)   /* no thread state's address */

#ifdef SEEN_CACHE
#  define SEEN(ts)                                                                         \
    LIKELY((ts) == hot.seen_ts && (ts)->context_ver == hot.seen_ver &&                     \
           (ts)->id == hot.seen_tsid && (ts)->interp == main_interp && (ts)->tracing == 0)
#else
#  define SEEN(ts) 0
#endif

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

/* scope.c */
Meter *lookup_meter(PyThreadState *ts);   /* past the cache; fills it */

/* hook.c */
int batch_over(void);
int batch_take(Meter *n, size_t size, int is_obj);
void batch_resample(const Meter *n);
void forget_block(void *ptr);
PyMemAllocatorEx hook_allocator(Domain *d, int light);

/* sample.c */
void hold(Meter *n, void *p, size_t size);
void hold_sampled(Meter *n, void *p, size_t size);
double sample_owed(void);           /* expected samples before the thread's next */
void sample_resume(double left);    /* a batch handed its countdown back */
int sample_countdown(double expected);   /* 1: the sample is due */

/* stop.c */
void over(Meter *m);
int refuse(Meter *n, uint64_t bytes, uint64_t objects, Held *old_h, size_t old_size, int data);

/* probe.c */
int dict_growth_may_fail(size_t size);   /* may a refusal of this size be a dict's resize? */

GOTCHA_HIDDEN_END

#endif
