/*
 * Past a threshold: a soft limit trips (deliver.c takes it to Python), a hard
 * scope past its fence is stopped by an interrupt, and a large allocation
 * that would take a hard scope past one is refused, where that is safe.
 */
#include "hook.h"

const uint64_t grace[NRES] = {64 * 1024, 1000, 1000, 64 * 1024};
/* the least room a stopped scope's cleanup gets past its first stop: three
 * SQLAlchemy sessions closing in a TaskGroup take about a megabyte */
static const uint64_t cleanup_floor[NRES] = {4 * 1024 * 1024, 50000, 50000, 4 * 1024 * 1024};

/* ------------------------------------------------------------------------ */
/* Stopping                                                                 */

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
        assert(m->fence[r] >= m->ceiling[r]);   /* a stop only ever moves it on */
    }
}

static uint64_t
now_of(Meter *m, int r)
{
    return r == R_MEMORY ? (m->held ? m->held->current : 0) : m->used[r];
}

/* A stop reached m's code (an interrupt raised, a refusal made): from here on
 * its cleanup may take a ceiling's worth more (unwinding()), and its batch ends
 * (the general path leaves the machinery out: meter_quiet()). */
void
stop_landed(Meter *m)
{
    settle();
    if (!m->landed) {
        for (int r = 0; r < NRES; r++) {
            m->landed_at[r] = now_of(m, r);
        }
    }
    m->landed = 1;
    meter_path(m);
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
 * end, or what they hand back (a pooled connection) is lost. Cleanup is not
 * always code handling an exception of the thread's: a library may run it in
 * another greenlet (each keeps exception state of its own) or in a task of its
 * own (a close behind asyncio.shield). So until a stopped scope is a ceiling's
 * worth (at least cleanup_floor) past where its first stop landed, it is not
 * stopped again in code that handles an exception or
 * that the stopped code started since (started_by_stopped()); code that
 * swallows its stop and goes on, and a sibling task the stop has not reached
 * yet, are stopped as the first was. 1 if the stop is put off (the fences
 * moved). */
static int
unwinding(Meter *m)
{
    if (!m->landed) {
        return 0;   /* the first stop is still on its way: asked for again */
    }
    if (!handling_exception() && !started_by_stopped(m)) {
        return 0;   /* code the stop has not reached yet (a sibling task) */
    }
    settle();
    uint64_t now[NRES];
    for (int r = 0; r < NRES; r++) {
        now[r] = now_of(m, r);
        /* a ceiling's worth (at least cleanup_floor) past where the first stop
         * landed: from the ceiling, or from further when it landed late (the
         * frame it was aimed at had returned before the interpreter's next
         * check) */
        uint64_t from = m->landed_at[r] > m->ceiling[r] ? m->landed_at[r] : m->ceiling[r];
        uint64_t room = m->ceiling[r] > cleanup_floor[r] ? m->ceiling[r] : cleanup_floor[r];
        if (m->ceiling[r] != NONE && now[r] > sat_add(from, room)) {
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
Py_NO_INLINE void
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


/* Would this large allocation take a hard scope past a fence? Then refuse it,
 * if the scope's own code is running with no exception in flight. For held
 * memory a realloc weighs only its growth over the block it replaces (old_h
 * and old_size, when that block is held inside the scope). data: an array's
 * data (numpy.c), whose callers turn NULL into numpy's MemoryError: refused
 * whenever it crosses a fence, whoever's C asked. */
Py_NO_INLINE int
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
            (!data && dict_growth_may_fail((size_t)bytes)) ||
            frames_importing(ts) || (!data && !caller_is_cpython())) {
            return 0;   /* only counted; the interrupt stops the code later */
        }
        if (m->reached[r] < would) {
            m->reached[r] = would;
        }
        if (!m->tripped) {
            trip(m, r);
        }
        stop_landed(m);
        raise_fences(m);   /* the refusal is the stop: no interrupt as well */
        return 1;
    }
    return 0;
}

