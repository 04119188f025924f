/*
 * Held memory, as the hook records it: blocks sampled (or every block, in
 * the exact mode), each charged to its scope's chain of held counters with
 * the weight it stands for, and the sampling rate tuned to how near the
 * chain is to its memory limits. The table itself is held.c's.
 */
#include "hook.h"

#include <math.h>
#include <time.h>

/* ------------------------------------------------------------------------ */
/* The thread's countdown                                                   */

/* Outside a batch, the countdown to the next sample is the thread's own, in
 * expected samples (see hold()). */
static GOTCHA_TLS double sample_left;
static GOTCHA_TLS uint64_t rng;

static double next_exponential(void);

/* The calling thread's countdown, for a batch that counts it down in bytes
 * (hook.c): what is left of it, in expected samples (a fresh thread draws its
 * first), and what is left once the batch is settled. */
double
sample_owed(void)
{
    if (rng == 0) {
        sample_left = next_exponential();   /* a fresh thread: no sample owed yet */
    }
    return sample_left;
}

void
sample_resume(double left)
{
    sample_left = left;   /* below zero if the batch's last block is the sample */
}

/* Outside a batch (a free-threaded build's): 1 if this block is the sample */
int
sample_countdown(double expected)
{
    sample_left -= expected;
    return sample_left <= 0;
}


/* ------------------------------------------------------------------------ */
/* Sampling                                                                 */

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

Py_NO_INLINE void
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

void
hold(Meter *n, void *p, size_t size)
{
    /* A hard scope's stop put back (rearm: the thread that ran its queued call was
     * another, or it was not where it asked) asks again at the next block of any
     * size, as one past a bytes fence does, not at the next sampled one: from 3.13
     * the call is queued from the block that asks, and a native step (Pillow) that
     * asked just before it released the GIL lost its call to the thread taking the
     * GIL, step after step. A small block made from bytecode asks where the thread's
     * next check comes before any release. */
    for (Meter *m = n; m != NULL; m = m->parent) {
        if (UNLIKELY(m->rearm) && m->hard) {
            stop(m);
        }
    }
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

