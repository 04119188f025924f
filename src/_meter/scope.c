/*
 * Finding the calling thread's scope: the ContextVar read past the cache of
 * the scope last found (hot, hook.h), and what keeps that cache true.
 */
#include "hook.h"

/* ------------------------------------------------------------------------ */
/* Finding the scope                                                        */

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
 * loop's callbacks), where there is nothing to find. With the GIL only
 * (SEEN_CACHE): a free-threaded build looks the scope up every time. */

void
forget_seen(void)
{
    settle();
#ifdef SEEN_CACHE
    hot.seen_ts = NO_TS;
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
    hot.seen_ts = ts;
    hot.seen_tsid = ts->id;
    hot.seen_ver = ts->context_ver;
    hot.seen_meter = m;
    hot.batch_small = m == hot.batch_meter ? hot.batch_bound : 0;
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
    if (hot.batch_meter == m) {
        settle();
    }
#ifdef SEEN_CACHE
    if (hot.seen_meter == m) {
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
    __atomic_store_n(&hot.seen_ts, NO_TS, __ATOMIC_RELAXED);
#endif
}

void
pause_hook(void)
{
    paused++;
#ifdef SEEN_CACHE
    hot.seen_ts = NO_TS;
#endif
}

/* While a tracer, a profiler or a sys.monitoring callback runs (coverage's,
 * a debugger's), the thread's allocations are the tool's, not the scope's:
 * a scope's figures do not depend on whether a tool watches it, and nothing
 * of the tool's can trip a limit. Never cached: the thread's context version
 * does not change when the tool is called. */
Py_NO_INLINE Meter *
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
    hot.seen_ts = ts;
    hot.seen_tsid = ts->id;
    hot.seen_ver = ts->context_ver;
    hot.seen_meter = (Meter *)v;
    /* the inline path needs no comparison with hot.batch_meter */
    hot.batch_small = hot.seen_meter == hot.batch_meter ? hot.batch_bound : 0;
#endif
    /* only enter() sets the variable, and only to a Meter */
    return (Meter *)v;
}

/* The innermost scope of the calling thread's context, borrowed, or NULL
 * (also for every thread of another interpreter). */
static inline Meter *
meter_now(void)
{
    PyThreadState *ts = tstate_unchecked();
#ifdef SEEN_CACHE
    if (SEEN(ts)) {
        return hot.seen_meter;
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

