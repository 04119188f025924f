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

/* 16 bytes a block: at 500 requests in flight the table holds 130,000 of
 * them, and every insert and removal is a cache miss into it; at 32 (a
 * pointer for the scope, a size_t for the weight) the exact mode took 1.15
 * times as long. The scope is an index into held_reg, the weight past
 * WEIGHT_BIG lives in a second table of its own (blocks of 4 MiB and more are
 * few). */
typedef struct { uintptr_t key; uint64_t info; } Entry;
#define HELD_BITS 22
#define SITE_BITS 20
#define WEIGHT_BITS 22
#define WEIGHT_BIG ((1ull << WEIGHT_BITS) - 1)
#define MAX_HELD (1u << HELD_BITS)

typedef struct {
    Entry *slot;
    size_t cap, count;
    int shift;      /* 64 - log2(cap): the hash keeps the top bits */
} Table;

static Table blocks;   /* every recorded block: info packs its Held, site and weight */
static Table big;      /* the weights of blocks of WEIGHT_BIG and more: info is the weight */
#define TABLE_KEEP 65536   /* slots (1 MiB) of an empty table kept for the next burst */
size_t table_count;        /* blocks.count, for the free hook */
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
    assert(*c > 0);   /* the filter counts every recorded address */
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
static Py_ssize_t live_holders;

/* A scope starts holding memory: 1 if it is the only one */
int
held_holder_started(void)
{
    return live_holders++ == 0;
}

/* A scope that held memory is gone: 1 if it was the last */
int
held_holder_ended(void)
{
    assert(live_holders > 0);
    return --live_holders == 0;
}

Py_ssize_t
held_holders(void)
{
    return live_holders;
}

/* Spent counters, kept for the next scopes: a request's scope makes one and
 * its last block's free drops it, and a trip through glibc's calloc and free
 * for each is code and data the handler's own work has pushed out of the
 * caches. Guarded as the table is. */
#define SPARE_HELD 64
static Held *spare_held[SPARE_HELD];
static int n_spare_held;

/* index -> counters, so that an entry names its scope in 22 bits; 0 is none */
static Held **held_reg;
static uint32_t held_reg_cap, held_reg_used = 1;
static uint32_t *free_idx;      /* indices given back, reused first */
static uint32_t n_free_idx;

static int
held_register(Held *h)
{
    if (n_free_idx > 0) {
        h->idx = free_idx[--n_free_idx];
    }
    else {
        if (held_reg_used == MAX_HELD) {
            return -1;
        }
        if (held_reg_used >= held_reg_cap) {
            uint32_t cap = held_reg_cap ? held_reg_cap * 2 : 256;
            Held **reg = realloc(held_reg, cap * sizeof(Held *));
            if (reg == NULL) {
                return -1;
            }
            held_reg = reg;
            uint32_t *fi = realloc(free_idx, cap * sizeof(uint32_t));
            if (fi == NULL) {
                return -1;   /* the larger registry is kept: fine, cap is not raised */
            }
            free_idx = fi;
            held_reg_cap = cap;
        }
        h->idx = held_reg_used++;
    }
    held_reg[h->idx] = h;
    return 0;
}

Held *
held_new(void)
{
    if (n_spare_held == 0) {
        Held *h = calloc(1, sizeof(Held));
        if (h != NULL && held_register(h) < 0) {
            free(h);
            return NULL;
        }
        return h;
    }
    Held *h = spare_held[--n_spare_held];
    uint32_t idx = h->idx;   /* a spare keeps its index */
    memset(h, 0, sizeof *h);
    h->idx = idx;
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
            held_reg[h->idx] = NULL;
            free_idx[n_free_idx++] = h->idx;
            free(h);
        }
        h = parent;
    } while (h != NULL && (assert(h->refcnt > 0), --h->refcnt == 0));
}

/* small enough to inline into table_remove(), which calls it for every block */
void
held_decref(Held *h)
{
    assert(h == NULL || h->refcnt > 0);
    if (h != NULL && --h->refcnt == 0) {
        held_release(h);
    }
}

/* Fibonacci hashing: one multiply, one shift, and the top bits mix every bit
 * of the address. */
static inline size_t
slot_of(const Table *t, uintptr_t p)
{
    return (size_t)(((uint64_t)p * 0x9E3779B97F4A7C15ull) >> t->shift);
}

static int
t_grow(Table *t)
{
    size_t old_cap = t->cap, cap = old_cap ? old_cap * 2 : 1024;
    Entry *old = t->slot, *fresh = calloc(cap, sizeof(Entry));
    if (fresh == NULL) {
        return -1;
    }
    t->slot = fresh;
    t->cap = cap;
    t->shift = 64 - ctz64((uint64_t)cap);
    for (size_t i = 0; i < old_cap; i++) {
        if (old[i].key) {
            size_t j = slot_of(t, old[i].key);
            while (fresh[j].key) {
                j = (j + 1) & (cap - 1);
            }
            fresh[j] = old[i];
        }
    }
    free(old);
    return 0;
}

static inline size_t
t_find(const Table *t, uintptr_t p)
{
    if (t->count == 0) {
        return SIZE_MAX;
    }
    size_t mask = t->cap - 1, i = slot_of(t, p);
    while (t->slot[i].key != p) {
        if (t->slot[i].key == 0) {
            return SIZE_MAX;
        }
        i = (i + 1) & mask;
    }
    return i;
}

/* The slot of p, or the free one it would take (the table grown first). */
static inline size_t
t_place(Table *t, uintptr_t p)
{
    if ((t->count + 1) * 2 > t->cap && t_grow(t) < 0) {
        return SIZE_MAX;
    }
    size_t i = slot_of(t, p);
    while (t->slot[i].key && t->slot[i].key != p) {
        i = (i + 1) & (t->cap - 1);
    }
    return i;
}

/* Empty slot i: backward-shift pulls later members of its cluster into the
 * hole (no tombstones). An emptied table larger than TABLE_KEEP goes back:
 * after a burst it would stay at its largest, while a small one stays, or
 * scopes used one after another would build it anew. */
static void
t_delete(Table *t, size_t i)
{
    size_t mask = t->cap - 1, hole = i;
    assert(t->count > 0 && t->slot[i].key != 0);
    t->count--;
    for (size_t j = (i + 1) & mask; t->slot[j].key; j = (j + 1) & mask) {
        size_t home = slot_of(t, t->slot[j].key);
        if (((j - home) & mask) >= ((j - hole) & mask)) {
            t->slot[hole] = t->slot[j];
            hole = j;
        }
    }
    t->slot[hole].key = 0;
    if (t->count == 0 && t->cap > TABLE_KEEP) {
        free(t->slot);
        *t = (Table){0};
    }
}

/* Every entry gone; the slots of a table up to TABLE_KEEP are kept. */
static void
t_clear(Table *t)
{
    if (t->cap > TABLE_KEEP) {
        free(t->slot);
        *t = (Table){0};
    }
    else if (t->slot != NULL) {
        memset(t->slot, 0, t->cap * sizeof(Entry));
        t->count = 0;
    }
}

static void
held_credit(Held *h, size_t size)
{
    for (; h != NULL; h = h->parent) {
        assert(h->current >= size);   /* what a block credits, it was charged */
        h->current -= size;
    }
}

static inline Held *
entry_held(const Entry *e)
{
    return held_reg[e->info & (MAX_HELD - 1)];
}

static inline uint32_t
entry_site(const Entry *e)
{
    return (uint32_t)(e->info >> HELD_BITS) & ((1u << SITE_BITS) - 1);
}

static inline size_t
entry_weight(const Entry *e)
{
    uint64_t w = e->info >> (HELD_BITS + SITE_BITS);
    if (w == WEIGHT_BIG) {
        size_t i = t_find(&big, e->key);
        return i == SIZE_MAX ? 0 : (size_t)big.slot[i].info;
    }
    return (size_t)w;
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
    size_t i = t_find(&blocks, p);
    if (i == SIZE_MAX) {
        return NULL;
    }
    *size = entry_weight(&blocks.slot[i]);
    return entry_held(&blocks.slot[i]);
}

static void
remove_at(size_t i)
{
    Entry *e = &blocks.slot[i];
    Held *h = entry_held(e);
    if (e->info >> (HELD_BITS + SITE_BITS) == WEIGHT_BIG) {
        size_t j = t_find(&big, e->key);
        if (j != SIZE_MAX) {
            held_credit(h, (size_t)big.slot[j].info);
            t_delete(&big, j);
        }
    }
    else {
        held_credit(h, (size_t)(e->info >> (HELD_BITS + SITE_BITS)));
    }
    held_decref(h);
    filter_remove(e->key);
    t_delete(&blocks, i);
    table_count = blocks.count;
    if (table_count == 0 && filter_saturated) {
        filter_clear();
    }
}

/* Forget p if it is a held block, crediting its scopes. */
void
table_remove(uintptr_t p)
{
    size_t i = t_find(&blocks, p);
    if (i != SIZE_MAX) {
        remove_at(i);
    }
}

int
table_insert(uintptr_t p, Held *h, size_t weight, uint32_t site)
{
    size_t i = t_place(&blocks, p);
    if (i == SIZE_MAX) {
        return -1;
    }
    if (blocks.slot[i].key == p) {
        /* a stale entry for a recycled address (a block freed while the hook
         * was out of the chain): rare, so the plain way */
        remove_at(i);
        i = t_place(&blocks, p);
        if (i == SIZE_MAX) {
            return -1;
        }
    }
    uint64_t w = weight;
    if (weight >= WEIGHT_BIG) {
        size_t j = t_place(&big, p);
        if (j == SIZE_MAX) {
            return -1;
        }
        if (big.slot[j].key == 0) {
            big.count++;
        }
        big.slot[j] = (Entry){p, (uint64_t)weight};
        w = WEIGHT_BIG;
    }
    blocks.slot[i] = (Entry){p, (uint64_t)h->idx | (uint64_t)site << HELD_BITS
                                    | w << (HELD_BITS + SITE_BITS)};
    table_count = ++blocks.count;
    filter_add(p);
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
    for (size_t i = 0, left = blocks.count; left > 0; i++) {
        if (blocks.slot[i].key) {
            held_decref(entry_held(&blocks.slot[i]));
            left--;
        }
    }
    /* a table up to TABLE_KEEP is kept for the next burst: built anew, it
     * would grow through every size again, each growth a rehash (at 500
     * requests in flight, 3,000 instructions a request); a larger one goes back */
    t_clear(&blocks);
    t_clear(&big);
    table_count = 0;
    filter_clear();
    sites_clear();
    step_aside_if_idle();
}

/* [(weight, frames or None)] of the blocks held by target and the scopes
 * inside it. */
PyObject *
table_blocks_of(Held *target)
{
    typedef struct { size_t weight; uint32_t site; } Found;
    size_t n = 0, cap = 64;
    Found *found = malloc(cap * sizeof(Found));
    if (found == NULL) {
        return PyErr_NoMemory();
    }
    for (size_t i = 0; i < blocks.cap; i++) {
        const Entry *e = &blocks.slot[i];
        if (!e->key) {
            continue;
        }
        for (Held *h = entry_held(e); h != NULL; h = h->parent) {
            if (h != target) {
                continue;
            }
            if (n == cap) {
                Found *more = realloc(found, 2 * cap * sizeof(Found));
                if (more == NULL) {
                    free(found);
                    return PyErr_NoMemory();
                }
                found = more;
                cap *= 2;
            }
            found[n++] = (Found){entry_weight(e), entry_site(e)};
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
        PyObject *item = Py_BuildValue("(nN)", (Py_ssize_t)found[i].weight, tb);
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
