/*
 * Blocks made beside the hooked domains on a scope's behalf, under the GIL:
 * numpy's array data (numpy.c) and C libraries' blocks (native.c), found and
 * charged as the hooks find and charge a block of the memory domain.
 */
#include "hook.h"

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
    PyThreadState *ts = hot.ts_found == 1 ? tstate_direct() : tstate_unchecked();
    if (SEEN(ts)) {
        return hot.seen_meter;
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
     * hot.batch_small is 0 unless the batch is the scope last found, n */
    if (LIKELY(size < hot.batch_small && n == hot.seen_meter)) {
        hot.left_b -= (int64_t)size;
        hot.left_m -= 1;
        if (UNLIKELY((hot.left_b | hot.left_m) < 0) && batch_over()) {
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
    PyThreadState *ts = hot.ts_found == 1 ? tstate_direct() : tstate_unchecked();
    if (!SEEN(ts)) {
        Meter *n = lookup_meter(ts);
        if (n != NULL) {
            hook_charge_data(n, NULL, p, size);
        }
        return;
    }
    /* hot.batch_small is 0 unless hot.seen_meter is the batch's scope */
    if (LIKELY(size < hot.batch_small)) {
        hot.left_b -= (int64_t)size;
        hot.left_m -= 1;
        if (UNLIKELY((hot.left_b | hot.left_m) < 0) && batch_over()) {
            hold_sampled(hot.seen_meter, p, size);
        }
        return;
    }
    if (hot.seen_meter != NULL) {
        hook_charge_data(hot.seen_meter, NULL, p, size);
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

