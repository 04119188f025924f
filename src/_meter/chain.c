/*
 * The allocator chain: the hook joins it above whatever is there, leaves it
 * when idle, changes form (light or full) as scopes start or stop holding
 * memory, and finds out when something that saved the chain below it put
 * the chain back (tracemalloc.stop(), memray).
 */
#include "hook.h"

/* The foreign tops of both chains as the delivery thread last looked
 * (chain_moved); forgotten whenever the hook joins, so that whatever is put
 * on top of it next is looked at, even the allocator seen there before. */
static PyMemAllocatorEx polled[2];

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
    return held_holders() > 0 || table_count > 0;
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
        d->ours = hook_allocator(d, d->light);
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
            d->ours = hook_allocator(d, d->light);
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
