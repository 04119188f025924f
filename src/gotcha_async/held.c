/*
 * The held-memory table: pointer -> (innermost Held, weight, site) for every
 * block recorded inside a tracking scope and not freed yet (every block in
 * exact mode, the sampled ones otherwise: their weight is what they stand
 * for). Open addressing, linear probing, backward-shift deletion (no
 * tombstones), grown at half load; the table lives in libc memory, never in
 * the hooked domains.
 *
 * Sites: where a recorded block was allocated, as up to SITE_FRAMES (code
 * object, instruction) pairs of user code, interned in a table of their own.
 * A site keeps its code objects alive until the table is purged, so that a
 * free (which may not run Python) never has to release one.
 */
#include "_meter.h"

typedef struct { uintptr_t key; Held *held; size_t size; uint32_t site; } Entry;

static Entry *table;
static size_t table_cap;
#define TABLE_KEEP 65536   /* slots (2 MiB) of an empty table kept for the next burst */
static int table_shift;    /* 64 - log2(table_cap): the hash keeps the top bits */
size_t table_count;
static uint8_t held_filter[1 << FILTER_BITS];   /* the counts */
uint64_t held_bits[(1 << FILTER_BITS) / 64];

static int filter_saturated;

static inline void
filter_add(uintptr_t p)
{
    size_t s = filter_slot(p);
    uint8_t *c = &held_filter[s];
    if (*c == 0) {
        held_bits[s >> 6] |= (uint64_t)1 << (s & 63);
    }
    if (*c < 255) {
        (*c)++;
    }
    else {
        filter_saturated = 1;
    }
}

/* a saturated slot stays set: its frees keep looking in the table */
static inline void
filter_remove(uintptr_t p)
{
    size_t s = filter_slot(p);
    uint8_t *c = &held_filter[s];
    if (*c < 255 && --*c == 0) {
        held_bits[s >> 6] &= ~((uint64_t)1 << (s & 63));
    }
}

static void
filter_clear(void)
{
    memset(held_filter, 0, sizeof(held_filter));
    memset(held_bits, 0, sizeof(held_bits));
    filter_saturated = 0;
}

/* Tracking scopes whose Context object still exists (see table_purge). */
Py_ssize_t live_holders;

/* Spent counters, kept for the next scopes: a request's scope makes one and
 * its last block's free drops it, and a trip through glibc's calloc and free
 * for each is code and data the handler's own work has pushed out of the
 * caches. Guarded as the table is. */
#define SPARE_HELD 64
static Held *spare_held[SPARE_HELD];
static int n_spare_held;

Held *
held_new(void)
{
    if (n_spare_held == 0) {
        return calloc(1, sizeof(Held));
    }
    Held *h = spare_held[--n_spare_held];
    memset(h, 0, sizeof *h);
    return h;
}

static Py_NO_INLINE void
held_release(Held *h)
{
    do {
        Held *parent = h->parent;
        if (n_spare_held < SPARE_HELD) {
            spare_held[n_spare_held++] = h;
        }
        else {
            free(h);
        }
        h = parent;
    } while (h != NULL && --h->refcnt == 0);
}

/* small enough to inline into table_remove(), which calls it for every block */
void
held_decref(Held *h)
{
    if (h != NULL && --h->refcnt == 0) {
        held_release(h);
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

/* ------------------------------------------------------------------------ */
/* Sites                                                                    */

static Site *sites;            /* sites[0] is "unknown" */
static uint32_t n_sites = 1, sites_cap;
static uint32_t *site_slots;   /* open addressing over site ids; 0 = empty */
static size_t site_slots_cap;
#define MAX_SITES (1u << 20)

static size_t
site_hash(const Site *s)
{
    uint64_t h = (uint64_t)s->n;
    for (int i = 0; i < s->n; i++) {
        h = (h ^ (uint64_t)(uintptr_t)s->code[i]) * 0x9E3779B97F4A7C15ull;
        h = (h ^ (uint64_t)(uint32_t)s->lasti[i]) * 0x9E3779B97F4A7C15ull;
    }
    return (size_t)(h >> 17);
}

static int
site_equal(const Site *a, const Site *b)
{
    if (a->n != b->n) {
        return 0;
    }
    for (int i = 0; i < a->n; i++) {
        if (a->code[i] != b->code[i] || a->lasti[i] != b->lasti[i]) {
            return 0;
        }
    }
    return 1;
}

static int
site_slots_grow(void)
{
    size_t cap = site_slots_cap ? site_slots_cap * 2 : 1024;
    uint32_t *fresh = calloc(cap, sizeof(uint32_t));
    if (fresh == NULL) {
        return -1;
    }
    for (uint32_t id = 1; id < n_sites; id++) {
        size_t j = site_hash(&sites[id]) & (cap - 1);
        while (fresh[j]) {
            j = (j + 1) & (cap - 1);
        }
        fresh[j] = id;
    }
    free(site_slots);
    site_slots = fresh;
    site_slots_cap = cap;
    return 0;
}

/* The id of a site, made if new (its code objects are kept alive), or 0. */
uint32_t
site_intern(const Site *s)
{
    if (s->n == 0) {
        return 0;
    }
    if ((size_t)n_sites * 2 >= site_slots_cap && site_slots_grow() < 0) {
        return 0;
    }
    size_t mask = site_slots_cap - 1, j = site_hash(s) & mask;
    for (; site_slots[j]; j = (j + 1) & mask) {
        if (site_equal(&sites[site_slots[j]], s)) {
            return site_slots[j];
        }
    }
    if (n_sites >= MAX_SITES) {
        return 0;
    }
    if (n_sites >= sites_cap) {
        uint32_t cap = sites_cap ? sites_cap * 2 : 256;
        Site *more = realloc(sites, cap * sizeof(Site));
        if (more == NULL) {
            return 0;
        }
        sites = more;
        sites_cap = cap;
    }
    uint32_t id = n_sites++;
    sites[id] = *s;
    for (int i = 0; i < s->n; i++) {
        Py_INCREF(s->code[i]);
    }
    site_slots[j] = id;
    return id;
}

static void
sites_clear(void)
{
    for (uint32_t id = 1; id < n_sites; id++) {
        for (int i = 0; i < sites[id].n; i++) {
            Py_DECREF(sites[id].code[i]);
        }
    }
    n_sites = 1;
    frames_forget_site();   /* its id is gone */
    if (site_slots != NULL) {
        memset(site_slots, 0, site_slots_cap * sizeof(uint32_t));
    }
}

/* ((filename, lineno), ...) most recent first, as tracemalloc's traces. */
static PyObject *
site_frames(uint32_t id)
{
    if (id == 0 || id >= n_sites) {
        return Py_NewRef(Py_None);
    }
    const Site *s = &sites[id];
    PyObject *out = PyTuple_New(s->n);
    for (int i = 0; out != NULL && i < s->n; i++) {
        PyObject *frame = Py_BuildValue("(Oi)", s->code[i]->co_filename,
                                        code_line(s->code[i], s->lasti[i]));
        if (frame == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyTuple_SET_ITEM(out, i, frame);
    }
    return out;
}

/* ------------------------------------------------------------------------ */
/* The table                                                                */

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
    filter_remove(p);
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
    if (table_count == 0 && filter_saturated) {
        filter_clear();
    }
    if (table_count == 0 && table_cap > TABLE_KEEP) {
        /* after a burst the table would stay at its largest: give it back; a
         * small one stays, or scopes used one after another would build it anew */
        free(table);
        table = NULL;
        table_cap = 0;
    }
}

int
table_insert(uintptr_t p, Held *h, size_t size, uint32_t site)
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
        filter_add(p);
    }
    table[i].key = p;
    table[i].held = h;
    table[i].size = size;
    table[i].site = site;
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
    filter_clear();
    sites_clear();
    if (table_cap > TABLE_KEEP) {
        /* a table up to TABLE_KEEP is kept for the next burst, emptied already (the
         * loop above cleared each entry): built anew, it would grow through every
         * size again, each growth a rehash (at 500 requests in flight, 3,000
         * instructions a request); a larger one goes back */
        free(table);
        table = NULL;
        table_cap = 0;
    }
    step_aside_if_idle();
}

/* [(weight, frames or None)] of the blocks held by target and the scopes
 * inside it. */
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
        PyObject *tb = site_frames(found[i].site);
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
