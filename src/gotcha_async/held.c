/*
 * The held-memory table: pointer -> (innermost Held, size) for every block
 * allocated inside a tracking scope and not freed yet. Open addressing, linear
 * probing, backward-shift deletion (no tombstones), grown at half load; the
 * table itself lives in libc memory, never in the hooked domains.
 */
#include "_meter.h"

typedef struct { uintptr_t key; Held *held; size_t size; } Entry;

static Entry *table;
static size_t table_cap;
static int table_shift;    /* 64 - log2(table_cap): the hash keeps the top bits */
size_t table_count;
/* Tracking scopes whose Context object still exists (see table_purge). */
Py_ssize_t live_holders;

void
held_decref(Held *h)
{
    while (h != NULL && --h->refcnt == 0) {
        Held *parent = h->parent;
        free(h);
        h = parent;
    }
}

/* Fibonacci hashing: one multiply, one shift, and the top bits mix every bit
 * of the address. */
static inline size_t
slot_of(uintptr_t p)
{
    return (size_t)(((uint64_t)p * 0x9E3779B97F4A7C15ull) >> table_shift);
}

static int
table_grow(void)
{
    size_t old_cap = table_cap, cap = old_cap ? old_cap * 2 : 1024;
    Entry *old = table, *fresh = calloc(cap, sizeof(Entry));
    if (fresh == NULL) {
        return -1;
    }
    table = fresh;
    table_cap = cap;
    table_shift = 64 - ctz64((uint64_t)cap);
    for (size_t i = 0; i < old_cap; i++) {
        if (old[i].key) {
            size_t j = slot_of(old[i].key);
            while (table[j].key) {
                j = (j + 1) & (cap - 1);
            }
            table[j] = old[i];
        }
    }
    free(old);
    return 0;
}

static void
held_credit(Held *h, size_t size)
{
    for (; h != NULL; h = h->parent) {
        h->current -= size;
    }
}

static inline size_t
find(uintptr_t p)
{
    size_t mask = table_cap - 1, i = slot_of(p);
    while (table[i].key != p) {
        if (table[i].key == 0) {
            return SIZE_MAX;
        }
        i = (i + 1) & mask;
    }
    return i;
}

Held *
table_lookup(uintptr_t p, size_t *size)
{
    if (table_count == 0) {
        return NULL;
    }
    size_t i = find(p);
    if (i == SIZE_MAX) {
        return NULL;
    }
    *size = table[i].size;
    return table[i].held;
}

/* Forget p if it is a held block, crediting its scopes. */
void
table_remove(uintptr_t p)
{
    size_t mask = table_cap - 1, i = find(p);
    if (i == SIZE_MAX) {
        return;
    }
    Held *h = table[i].held;
    held_credit(h, table[i].size);
    held_decref(h);
    table_count--;
    /* backward-shift: pull later members of the cluster into the hole */
    size_t hole = i;
    for (size_t j = (i + 1) & mask; table[j].key; j = (j + 1) & mask) {
        size_t home = slot_of(table[j].key);
        if (((j - home) & mask) >= ((j - hole) & mask)) {
            table[hole] = table[j];
            hole = j;
        }
    }
    table[hole].key = 0;
    if (table_count == 0 && table_cap > 65536) {
        /* after a burst the table would stay at its largest: give it back; a
         * small one stays, or scopes used one after another would build it anew */
        free(table);
        table = NULL;
        table_cap = 0;
    }
}

int
table_insert(uintptr_t p, Held *h, size_t size)
{
    if ((table_count + 1) * 2 > table_cap && table_grow() < 0) {
        return -1;
    }
    /* one probe finds the free slot, or a stale entry for a recycled address
     * (a block freed while the hook was out of the chain) */
    size_t i = slot_of(p);
    while (table[i].key && table[i].key != p) {
        i = (i + 1) & (table_cap - 1);
    }
    if (table[i].key == p) {
        held_credit(table[i].held, table[i].size);
        held_decref(table[i].held);
    }
    else {
        table_count++;
    }
    table[i].key = p;
    table[i].held = h;
    table[i].size = size;
    h->refcnt++;
    return 0;
}

/* Once the last tracking Context is gone, every entry left in the table
 * (blocks that outlived their scopes: caches, interned strings) credits
 * counters nobody can read, yet would keep a lookup in every free of the
 * process, in a table sized for the busiest moment. */
void
table_purge(void)
{
    for (size_t i = 0, left = table_count; left > 0; i++) {
        if (table[i].key) {
            held_decref(table[i].held);
            table[i].key = 0;
            left--;
        }
    }
    table_count = 0;
    if (table_cap > 4096) {
        /* a small table is kept for the next burst; a large one goes back */
        free(table);
        table = NULL;
        table_cap = 0;
    }
    step_aside_if_idle();
}

/* [(size, traceback or None)] of the blocks held by target and the scopes
 * inside it; tracebacks come from tracemalloc when it traces (3.11, 3.12). */
PyObject *
table_blocks_of(Held *target)
{
    size_t n = 0, cap = 64;
    Entry *found = malloc(cap * sizeof(Entry));
    if (found == NULL) {
        return PyErr_NoMemory();
    }
    for (size_t i = 0; i < table_cap; i++) {
        if (!table[i].key) {
            continue;
        }
        for (Held *h = table[i].held; h != NULL; h = h->parent) {
            if (h != target) {
                continue;
            }
            if (n == cap) {
                Entry *more = realloc(found, 2 * cap * sizeof(Entry));
                if (more == NULL) {
                    free(found);
                    return PyErr_NoMemory();
                }
                found = more;
                cap *= 2;
            }
            found[n++] = table[i];
            break;
        }
    }
    /* building the list frees and allocates: work from the copy */
    PyObject *out = PyList_New(0);
    for (size_t i = 0; out != NULL && i < n; i++) {
#if PY_VERSION_HEX < 0x030D0000
        PyObject *tb = _PyTraceMalloc_GetTraceback(0, found[i].key);
#else
        PyObject *tb = Py_NewRef(Py_None);   /* no longer exported: no sites */
#endif
        if (tb == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyObject *item = Py_BuildValue("(nN)", (Py_ssize_t)found[i].size, tb);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_CLEAR(out);
            break;
        }
        Py_DECREF(item);
    }
    free(found);
    return out;
}
