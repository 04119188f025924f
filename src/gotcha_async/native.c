/*
 * C libraries' malloc, charged to the scope of the thread that calls it
 * (gotcha.install(native=True)).
 *
 * Without LD_PRELOAD: every loaded object's relocations of malloc, calloc,
 * realloc, free, the aligned variants, strdup and strndup (its PLT slots, its
 * GOT entries and absolute data words that hold their address, as libxml2's
 * xmlMalloc = malloc) are pointed at the wrappers below, found through
 * dl_iterate_phdr. Objects loaded later are patched too: a dlopen() made
 * through a patched slot rescans at once, and the delivery thread looks every
 * 20 ms (native_poll) for objects loaded any other way.
 *
 * Never patched (their allocations are counted already, or are not a
 * library's): the python executable and libpython (their dlopen only: the
 * imports), this extension, libc and the loader, libgcc_s (the unwinder that
 * caller.c runs inside the hook), and numpy's _multiarray_umath, whose array
 * data reaches numpy.c's data handler.
 *
 * A wrapper calls the real function first and never fails anything: a scope
 * past its limit is tripped or stopped by the usual machinery (hook.c,
 * deliver.c), at the next bytecode boundary. Then:
 *
 *   - the calling thread holds the GIL: the block is charged at once, to the
 *     scope the PEP 445 hook would charge (hook_data_scope), through the path
 *     numpy.c uses (hook_charge_data: batches, held memory, trips);
 *   - it does not (lxml, Pillow and numpy release it): the block goes to a
 *     log of the thread's own (NLog), no lock and no Python, and is charged,
 *     in order, to the scope the thread last ran in (its target, set under the
 *     GIL wherever the hook finds a thread's scope) the next time that thread
 *     holds the GIL. A log that grows past PENDING_NUDGE bytes makes the hook
 *     look its scope up again at its thread's next allocation, which settles it.
 *
 * Invisible: threads that never ran Python inside a scope (BLAS workers),
 * statically linked or exported allocators (jemalloc built in), libc's own
 * allocations outside these functions (asprintf, getline, fopen's buffer),
 * blocks freed without the GIL by another thread than the one whose log
 * holds their allocation still unsettled, and past MAX_RECORDS records a
 * thread logged without the GIL, their holding (still charged in bytes).
 */
#include "_meter.h"

#if defined(__linux__) && defined(__GLIBC__) && (defined(__x86_64__) || defined(__aarch64__))
#  define NATIVE_SUPPORTED 1
#endif

int native_on;

#ifdef NATIVE_SUPPORTED
#  include <dlfcn.h>
#  include <math.h>
#  include <elf.h>
#  include <link.h>
#  include <malloc.h>
#  include <pthread.h>
#  include <sys/mman.h>
#  include <unistd.h>

/* ------------------------------------------------------------------------ */
/* A thread's log: what it allocated and freed without the GIL              */

/* The log keeps the bytes and calls as two sums, and records only what held
 * memory needs, in order: the blocks it holds and the frees that may give one
 * back. A scope that samples its held memory (the default) has its blocks
 * sampled here as hook.c samples them, at the rate it had when the thread
 * last ran in it: s / (1 - exp(-s/rate)) for a block of s bytes, recorded
 * with probability 1 - exp(-s/rate). An exact scope's blocks are all
 * recorded, up to MAX_EXACT in one stretch without the GIL; past that they
 * are sampled at FALLBACK_RATE (an lxml parse of 20 MB makes ~2 million). */
typedef struct {
    void *p;        /* the block held, or NULL (a free) */
    void *old;      /* the block given back, or NULL */
    uint64_t weight;
} Rec;

#  define MAX_RECORDS ((size_t)1 << 17)
#  define MAX_EXACT ((size_t)1 << 16)
#  define FALLBACK_RATE ((uint64_t)64 * 1024)
#  define PENDING_NUDGE ((uint64_t)64 * 1024)
#  define LOG_BITS 4096

typedef struct NLog {
    struct NLog *next;   /* the registry, under the GIL */
    Meter *target;       /* borrowed; cleared under the GIL when the scope goes */
    uint64_t rate;       /* the target's: 0 holds nothing, 1 every block, else its rate */
    int plain;           /* a target that holds nothing: the wrappers' inline path */
    /* the rest is written by its thread alone, and read by it (or, once the
     * thread is gone, by anyone) under the GIL */
    Rec *recs;
    size_t n, cap;
    uint64_t bytes, calls;   /* not charged yet */
    uint64_t since_nudge;
    double sample_left;      /* bytes to the next sample */
    uint64_t rng;
    uint64_t bits[LOG_BITS / 64];   /* the addresses of the held records */
    int dead;            /* its thread has exited */
} NLog;

static NLog *registry;
static GOTCHA_TLS NLog *native_log;   /* the calling thread's, or NULL */
static pthread_key_t log_key;
static GOTCHA_TLS int in_native;   /* the wrappers' own work, or a signal in it */

static struct {
    void *(*malloc)(size_t);
    void *(*calloc)(size_t, size_t);
    void *(*realloc)(void *, size_t);
    void (*free)(void *);
    int (*posix_memalign)(void **, size_t, size_t);
    void *(*aligned_alloc)(size_t, size_t);
    void *(*memalign)(size_t, size_t);
    void *(*valloc)(size_t);
    void *(*pvalloc)(size_t);
    char *(*strdup)(const char *);
    char *(*strndup)(const char *, size_t);
    void *(*dlopen)(const char *, int);
    int (*dlclose)(void *);
} real;

void hook_recheck(void);                                 /* hook.c */
void hook_hold_native(Meter *n, void *p, uint64_t weight);   /* hook.c */
void hook_charge_native(Meter *n, void *old, void *p, size_t size, size_t fp);

/* What a block takes in libc's heap: what it can hold and its chunk's header.
 * Held memory counts that, so that it meets the resident set (an lxml tree is
 * made of blocks of 40 to 120 bytes, each with 8 to 24 more); the bytes
 * charged are what was asked, as for Python's own allocations. */
static inline size_t
footprint(void *p, size_t size)
{
    size_t u = malloc_usable_size(p);
    return (u > size ? u : size) + sizeof(size_t);
}

/* The thread state read where the interpreter keeps it (runtime.c), when the
 * hook found where that is: no call. Set at install. */
static int direct_ts;

/* Does the calling thread hold the GIL (of the main interpreter)? Without it,
 * and without touching anything but the thread's own state. */
static inline PyThreadState *
gil_state(void)
{
    PyThreadState *ts = direct_ts ? tstate_direct() : tstate_unchecked();
#  if PY_VERSION_HEX < 0x030C0000
    /* 3.11: the GIL holder's, process-wide (none: the common case in a C
     * library that released it); ours only while we hold it */
    if (ts == NULL || ts != PyGILState_GetThisThreadState()) {
        return NULL;
    }
#  endif
    /* 3.12 on: the attached thread state, a thread-local variable, NULL once
     * detached */
    return ts != NULL && ts->interp == main_interp ? ts : NULL;
}

static inline int
log_bit(const NLog *l, const void *p)
{
    size_t s = filter_slot((uintptr_t)p) & (LOG_BITS - 1);
    return (int)((l->bits[s >> 6] >> (s & 63)) & 1);
}

static double
log_exponential(NLog *l)
{
    if (l->rng == 0) {
        l->rng = (uintptr_t)l * 0x9E3779B97F4A7C15ull | 1;
    }
    l->rng ^= l->rng >> 12;
    l->rng ^= l->rng << 25;
    l->rng ^= l->rng >> 27;
    uint64_t x = l->rng * 0x2545F4914F6CDD1Dull;
    double u = ((double)(x >> 11) + 0.5) * (1.0 / 9007199254740992.0);   /* (0, 1) */
    return -log(u);
}

static void
log_record(NLog *l, void *p, void *old, uint64_t weight)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 256;
        Rec *r = cap <= MAX_RECORDS ? real.realloc(l->recs, cap * sizeof(Rec)) : NULL;
        if (r == NULL) {
            return;   /* a block not held, or a free lost (the block stays held) */
        }
        l->recs = r;
        l->cap = cap;
    }
    l->recs[l->n++] = (Rec){p, old, weight};
    if (p != NULL) {
        size_t s = filter_slot((uintptr_t)p) & (LOG_BITS - 1);
        l->bits[s >> 6] |= (uint64_t)1 << (s & 63);
    }
}

/* Without the GIL: a block made (p, size), given back (old), or both. */
static void
log_note(NLog *l, void *p, void *old, size_t size)
{
    if (old != NULL && ((table_count != 0 && table_may_hold(old)) || log_bit(l, old))) {
        log_record(l, NULL, old, 0);
    }
    uint64_t rate = __atomic_load_n(&l->rate, __ATOMIC_RELAXED);
    if (p == NULL || __atomic_load_n(&l->target, __ATOMIC_RELAXED) == NULL) {
        return;
    }
    l->bytes += size;
    l->calls += 1;
    if ((l->since_nudge += size) >= PENDING_NUDGE) {
        l->since_nudge = 0;
        hook_recheck();
    }
    if (rate == 0) {
        return;
    }
    size_t fp = footprint(p, size);
    if (rate == 1) {
        if (l->n < MAX_EXACT) {
            log_record(l, p, NULL, fp);
            return;
        }
        rate = FALLBACK_RATE;
    }
    if (fp >= rate) {
        log_record(l, p, NULL, fp);
        return;
    }
    if ((l->sample_left -= (double)fp) > 0) {
        return;
    }
    l->sample_left = log_exponential(l) * (double)rate;
    double x = (double)fp / (double)rate;
    log_record(l, p, NULL, (uint64_t)((double)fp / -expm1(-x) + 0.5));
}

/* Under the GIL: charge what the log holds, in order, and empty it. */
static void
log_settle(NLog *l)
{
    Meter *n = l->target;
    if (n != NULL && (l->bytes | l->calls)) {
        charge(n, l->bytes, 0, l->calls);
    }
    l->bytes = l->calls = l->since_nudge = 0;
    for (size_t i = 0; i < l->n; i++) {
        Rec r = l->recs[i];
        if (r.p != NULL) {
            if (n != NULL) {
                hook_hold_native(n, r.p, r.weight);
            }
        }
        else if (table_count != 0 && table_may_hold(r.old)) {
            hook_forget_data(r.old);
        }
    }
    l->n = 0;
    memset(l->bits, 0, sizeof l->bits);
}

static inline int
log_pending(const NLog *l)
{
    return l != NULL && (l->n | l->calls) != 0;
}

/* The rate a thread logs at for m: see Rec. */
static uint64_t
rate_of(const Meter *m)
{
    if (m == NULL || m->held == NULL) {
        return 0;
    }
    return m->held->rate == 0 ? 1 : m->held->rate;
}

/* A thread's log is handed back when it exits: settled by whoever looks next. */
static void
log_orphan(void *v)
{
    NLog *l = v;
    native_log = NULL;   /* other destructors may still free through the wrappers */
    __atomic_store_n(&l->dead, 1, __ATOMIC_RELEASE);
}

/* Under the GIL: settle and free the logs of threads that have exited. */
static void
reap(void)
{
    for (NLog **pp = &registry; *pp != NULL;) {
        NLog *l = *pp;
        if (__atomic_load_n(&l->dead, __ATOMIC_ACQUIRE)) {
            log_settle(l);
            *pp = l->next;
            real.free(l->recs);
            real.free(l);
        }
        else {
            pp = &l->next;
        }
    }
}

/* ------------------------------------------------------------------------ */
/* What the engine tells us (under the GIL, from hook.c and meter.c)        */

/* The calling thread's log, charged now (its scope is being looked up). */
void
native_settle(void)
{
    NLog *l = native_log;
    if (log_pending(l) && !in_native) {
        in_native++;
        log_settle(l);
        in_native--;
    }
}

/* The calling thread now runs in scope m (or none): what it allocates
 * without the GIL from now on is m's. */
void
native_target(Meter *m)
{
    NLog *l = native_log;
    if (l == NULL) {
        if (m == NULL || in_native) {
            return;   /* a thread that was never in a scope needs no log */
        }
        l = real.calloc(1, sizeof(NLog));
        if (l == NULL) {
            return;
        }
        if (pthread_setspecific(log_key, l) != 0) {
            real.free(l);
            return;
        }
        l->next = registry;
        registry = l;
        native_log = l;
    }
    uint64_t rate = rate_of(m);
    if (l->target != m || l->rate != rate) {
        native_settle();
        __atomic_store_n(&l->target, m, __ATOMIC_RELAXED);
        __atomic_store_n(&l->plain, m != NULL && rate == 0, __ATOMIC_RELAXED);
        if (l->rate != rate) {
            __atomic_store_n(&l->rate, rate, __ATOMIC_RELAXED);
            l->sample_left = rate > 1 ? log_exponential(l) * (double)rate : 0;
        }
    }
}

/* Scope m is going away: no log may name it. */
void
native_forget(Meter *m)
{
    for (NLog *l = registry; l != NULL; l = l->next) {
        if (l->target == m) {
            if (l == native_log) {
                native_settle();
            }
            __atomic_store_n(&l->plain, 0, __ATOMIC_RELAXED);
            __atomic_store_n(&l->target, NULL, __ATOMIC_RELAXED);
        }
    }
    reap();
}

/* ------------------------------------------------------------------------ */
/* The wrappers                                                             */

static Py_NO_INLINE void
note(void *p, void *old, size_t size)
{
    in_native++;
    if (gil_state() != NULL) {
        NLog *l = native_log;
        if (log_pending(l)) {
            log_settle(l);   /* older: first */
        }
        Meter *n = p != NULL ? hook_data_scope() : NULL;
        if (n != NULL) {
            hook_charge_native(n, old, p, size, n->held != NULL ? footprint(p, size) : size);
        }
        else if (old != NULL && table_count != 0 && table_may_hold(old)) {
            hook_forget_data(old);
        }
    }
    else if (native_log != NULL) {
        log_note(native_log, p, old, size);
    }
    in_native--;
}

/* Nothing to do: the wrappers' own work, or no scope entered and no block
 * held anywhere */
static inline int
quiet(void)
{
    return in_native || (active == 0 && table_count == 0);
}

/* The common case inline, before any register is saved for note(): a C
 * library that released the GIL, in a scope that holds no memory. */
static inline void
note_alloc(void *p, size_t size)
{
    NLog *l = native_log;
    if (l != NULL && __atomic_load_n(&l->plain, __ATOMIC_RELAXED) &&
        (direct_ts ? tstate_direct() : tstate_unchecked()) == NULL) {
        /* 3.12 on: this thread is detached; 3.11: nobody holds the GIL */
        l->bytes += size;
        l->calls += 1;
        if ((l->since_nudge += size) >= PENDING_NUDGE) {
            l->since_nudge = 0;
            hook_recheck();
        }
        return;
    }
    note(p, NULL, size);
}

/* A free with no block held anywhere, and none in this thread's log, has
 * nothing to give back. */
static inline int
free_is_quiet(void)
{
    NLog *l = native_log;
    return quiet() || (table_count == 0 && (l == NULL || l->n == 0));
}

static void *
w_malloc(size_t size)
{
    void *p = real.malloc(size);
    if (p != NULL && !quiet()) {
        note_alloc(p, size);
    }
    return p;
}

static void *
w_calloc(size_t nelem, size_t elsize)
{
    void *p = real.calloc(nelem, elsize);
    if (p != NULL && !quiet()) {
        note_alloc(p, nelem * elsize);   /* no overflow: it was allocated */
    }
    return p;
}

static void *
w_realloc(void *old, size_t size)
{
    void *p = real.realloc(old, size);
    if (p != NULL) {
        if (!quiet()) {
            note(p, old, size);
        }
    }
    else if (old != NULL && size == 0 && !free_is_quiet()) {
        note(NULL, old, 0);   /* glibc's realloc(p, 0) frees p */
    }
    return p;
}

static void
w_free(void *ptr)
{
    if (ptr != NULL && !free_is_quiet()) {
        note(NULL, ptr, 0);   /* first: once freed, another thread may get the address */
    }
    real.free(ptr);
}

static int
w_posix_memalign(void **out, size_t alignment, size_t size)
{
    int rc = real.posix_memalign(out, alignment, size);
    if (rc == 0 && *out != NULL && !quiet()) {
        note_alloc(*out, size);
    }
    return rc;
}

#  define ALIGNED(name)                                  \
    static void *w_##name(size_t alignment, size_t size) \
    {                                                    \
        void *p = real.name(alignment, size);            \
        if (p != NULL && !quiet()) {                     \
            note_alloc(p, size);                         \
        }                                                \
        return p;                                        \
    }
ALIGNED(aligned_alloc)
ALIGNED(memalign)
#  undef ALIGNED

static void *
w_valloc(size_t size)
{
    void *p = real.valloc(size);
    if (p != NULL && !quiet()) {
        note_alloc(p, size);
    }
    return p;
}

static void *
w_pvalloc(size_t size)
{
    void *p = real.pvalloc(size);
    if (p != NULL && !quiet()) {
        long page = sysconf(_SC_PAGESIZE);
        size_t pg = page > 0 ? (size_t)page : 4096;
        note_alloc(p, (size + pg - 1) / pg * pg);
    }
    return p;
}

static char *
w_strdup(const char *s)
{
    char *p = real.strdup(s);
    if (p != NULL && !quiet()) {
        note_alloc(p, strlen(p) + 1);
    }
    return p;
}

static char *
w_strndup(const char *s, size_t n)
{
    char *p = real.strndup(s, n);
    if (p != NULL && !quiet()) {
        note_alloc(p, strlen(p) + 1);
    }
    return p;
}

static void rescan(void);

static void *
w_dlopen(const char *file, int flags)
{
    void *h = real.dlopen(file, flags);
    if (h != NULL) {
        rescan();
    }
    return h;
}

static int
w_dlclose(void *h)
{
    int rc = real.dlclose(h);
    rescan();   /* an object gone: its place may be taken by one never patched */
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Patching the objects                                                     */

typedef struct {
    const char *name;
    void *wrapper;
    void **real;
    char alloc;   /* 0: dlopen/dlclose, patched in the interpreter too */
} Target;

static Target targets[] = {
    {"malloc", (void *)w_malloc, (void **)&real.malloc, 1},
    {"calloc", (void *)w_calloc, (void **)&real.calloc, 1},
    {"realloc", (void *)w_realloc, (void **)&real.realloc, 1},
    {"free", (void *)w_free, (void **)&real.free, 1},
    {"posix_memalign", (void *)w_posix_memalign, (void **)&real.posix_memalign, 1},
    {"aligned_alloc", (void *)w_aligned_alloc, (void **)&real.aligned_alloc, 1},
    {"memalign", (void *)w_memalign, (void **)&real.memalign, 1},
    {"valloc", (void *)w_valloc, (void **)&real.valloc, 1},
    {"pvalloc", (void *)w_pvalloc, (void **)&real.pvalloc, 1},
    {"strdup", (void *)w_strdup, (void **)&real.strdup, 1},
    {"strndup", (void *)w_strndup, (void **)&real.strndup, 1},
    {"dlopen", (void *)w_dlopen, (void **)&real.dlopen, 0},
    {"dlclose", (void *)w_dlclose, (void **)&real.dlclose, 0},
};
#  define NTARGETS (sizeof targets / sizeof targets[0])

#  if defined(__x86_64__)
#    define R_SLOT R_X86_64_JUMP_SLOT
#    define R_GLOB R_X86_64_GLOB_DAT
#    define R_ABS R_X86_64_64
#  else
#    define R_SLOT R_AARCH64_JUMP_SLOT
#    define R_GLOB R_AARCH64_GLOB_DAT
#    define R_ABS R_AARCH64_ABS64
#  endif

static uintptr_t own_base;      /* this extension's */
static int scan_lock;            /* a spin lock: never taken inside a wrapper's charge */
static unsigned long long last_adds = (unsigned long long)-1, last_subs;
static size_t patched_slots, scans;

/* 0: patch nothing, 1: dlopen and dlclose only, 2: everything (3, below: all
 * but dlopen and dlclose) */
static int
how_far(const struct dl_phdr_info *info)
{
    const char *name = info->dlpi_name;
    if ((uintptr_t)info->dlpi_addr == own_base) {
        return 0;
    }
    if (name == NULL || name[0] == '\0' || strstr(name, "libpython") != NULL) {
        return 1;   /* the executable (the interpreter, or what embeds it), libpython */
    }
    const char *base = strrchr(name, '/');
    base = base ? base + 1 : name;
    static const char *const never[] = {"libc.so", "ld-linux", "ld64.so", "linux-vdso",
                                        "linux-gate", "libpthread.so", "libdl.so",
                                        "libgcc_s.so"};
    for (size_t i = 0; i < sizeof never / sizeof never[0]; i++) {
        if (strncmp(base, never[i], strlen(never[i])) == 0) {
            return 0;
        }
    }
    if (strncmp(base, "_multiarray_umath", 17) == 0) {
        return 1;   /* numpy's data reaches numpy.c's handler */
    }
    return 2;
}

/* A slot is written only once the loader has relocated it (it holds libc's
 * function, or a lazy binding's stub inside the object: not the link-time
 * value that a dlopen() in another thread, relocating this object right now,
 * is about to replace or add the object's base to), and a
 * read-only page (RELRO) made writable is left so: the loader, relocating
 * the rest of that object meanwhile, must not fault on it. */
typedef struct {
    uintptr_t base, lo, hi;          /* load bias, mapped span */
    uintptr_t relro_lo, relro_hi;
} Obj;

static void
write_slot(const Obj *o, uintptr_t addr, void *real_fn, void *value)
{
    void **slot = (void **)addr;
    void *now = __atomic_load_n(slot, __ATOMIC_RELAXED);
    if (now != real_fn && !((uintptr_t)now >= o->lo && (uintptr_t)now < o->hi)) {
        return;   /* ours already, not relocated yet, or not libc's */
    }
    uintptr_t relro_lo = o->relro_lo, relro_hi = o->relro_hi;
    if (addr >= relro_lo && addr < relro_hi) {
        long page = sysconf(_SC_PAGESIZE);
        uintptr_t pg = (uintptr_t)(page > 0 ? page : 4096);
        if (mprotect((void *)(addr & ~(pg - 1)), pg, PROT_READ | PROT_WRITE) != 0) {
            return;
        }
    }
    __atomic_store_n(slot, value, __ATOMIC_RELAXED);
    patched_slots++;
}

static void
patch_relas(const Obj *o, const ElfW(Rela) *rel, size_t count, const ElfW(Sym) *symtab,
            const char *strtab, int far)
{
    for (size_t i = 0; i < count; i++) {
        unsigned type = (unsigned)ELF64_R_TYPE(rel[i].r_info);
        if (type != R_SLOT && type != R_GLOB && !(type == R_ABS && rel[i].r_addend == 0)) {
            continue;
        }
        const ElfW(Sym) *sym = &symtab[ELF64_R_SYM(rel[i].r_info)];
        if (sym->st_name == 0 || sym->st_shndx != SHN_UNDEF) {
            continue;   /* the object's own definition: not libc's */
        }
        const char *name = strtab + sym->st_name;
        for (size_t t = 0; t < NTARGETS; t++) {
            if ((far >= 2 || !targets[t].alloc) && *targets[t].real != NULL &&
                strcmp(name, targets[t].name) == 0) {
                if (!targets[t].alloc && far == 3) {
                    break;   /* its dlopen() searches its own RUNPATH: left alone */
                }
                write_slot(o, o->base + rel[i].r_offset, *targets[t].real, targets[t].wrapper);
                break;
            }
        }
    }
}

static uintptr_t
dyn_addr(uintptr_t base, ElfW(Addr) v)
{
    /* glibc relocates the dynamic section's addresses on these platforms; not all do */
    return v < base ? base + v : v;
}

static int
patch_object(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)size;
    (void)data;
    int far = how_far(info);
    if (far == 0) {
        return 0;
    }
    uintptr_t base = info->dlpi_addr;
    const ElfW(Dyn) *dyn = NULL;
    Obj o = {base, UINTPTR_MAX, 0, 0, 0};
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type == PT_DYNAMIC) {
            dyn = (const ElfW(Dyn) *)(base + ph->p_vaddr);
        }
        else if (ph->p_type == PT_GNU_RELRO) {
            o.relro_lo = base + ph->p_vaddr;
            o.relro_hi = o.relro_lo + ph->p_memsz;
        }
        else if (ph->p_type == PT_LOAD) {
            o.lo = base + ph->p_vaddr < o.lo ? base + ph->p_vaddr : o.lo;
            o.hi = base + ph->p_vaddr + ph->p_memsz > o.hi ? base + ph->p_vaddr + ph->p_memsz
                                                           : o.hi;
        }
    }
    if (dyn == NULL) {
        return 0;
    }
    const ElfW(Sym) *symtab = NULL;
    const char *strtab = NULL;
    const ElfW(Rela) *jmprel = NULL, *rela = NULL;
    size_t jmprel_size = 0, rela_size = 0;
    int pltrel_rela = 1;
    for (; dyn->d_tag != DT_NULL; dyn++) {
        switch (dyn->d_tag) {
        case DT_SYMTAB: symtab = (const ElfW(Sym) *)dyn_addr(base, dyn->d_un.d_ptr); break;
        case DT_STRTAB: strtab = (const char *)dyn_addr(base, dyn->d_un.d_ptr); break;
        case DT_JMPREL: jmprel = (const ElfW(Rela) *)dyn_addr(base, dyn->d_un.d_ptr); break;
        case DT_PLTRELSZ: jmprel_size = dyn->d_un.d_val; break;
        case DT_PLTREL: pltrel_rela = dyn->d_un.d_val == DT_RELA; break;
        case DT_RELA: rela = (const ElfW(Rela) *)dyn_addr(base, dyn->d_un.d_ptr); break;
        case DT_RELASZ: rela_size = dyn->d_un.d_val; break;
        /* glibc's dlopen() searches its caller's RUNPATH: called from our
         * wrapper, it would search ours. Such an object's loads are found by
         * the delivery thread's look instead. */
        case DT_RPATH:
        case DT_RUNPATH: far = far == 2 ? 3 : far; break;
        default: break;
        }
    }
    if (symtab == NULL || strtab == NULL) {
        return 0;
    }
    if (jmprel != NULL && pltrel_rela) {
        patch_relas(&o, jmprel, jmprel_size / sizeof(ElfW(Rela)), symtab, strtab, far);
    }
    if (rela != NULL) {
        patch_relas(&o, rela, rela_size / sizeof(ElfW(Rela)), symtab, strtab, far);
    }
    return 0;
}

static int
read_counts(struct dl_phdr_info *info, size_t size, void *data)
{
    unsigned long long *out = data;
    if (size < offsetof(struct dl_phdr_info, dlpi_subs) + sizeof info->dlpi_subs) {
        out[0] = out[1] = (unsigned long long)-2;   /* no counts: always rescan */
    }
    else {
        out[0] = info->dlpi_adds;
        out[1] = info->dlpi_subs;
    }
    return 1;   /* the first object says it for all */
}

/* Patch whatever was loaded or unloaded since the last look. No GIL needed.
 * Never waits: a scan under way in another thread (or in this one, from a
 * library's constructor that calls dlopen) is asked to look once more. */
static int scan_again;

static void
rescan(void)
{
    __atomic_store_n(&scan_again, 1, __ATOMIC_RELEASE);
    if (__atomic_exchange_n(&scan_lock, 1, __ATOMIC_ACQUIRE)) {
        return;
    }
    while (__atomic_exchange_n(&scan_again, 0, __ATOMIC_ACQ_REL)) {
        unsigned long long counts[2] = {0, 0};
        dl_iterate_phdr(read_counts, counts);
        if (counts[0] != last_adds || counts[1] != last_subs ||
            counts[0] == (unsigned long long)-2) {
            dl_iterate_phdr(patch_object, NULL);
            scans++;
            last_adds = counts[0];
            last_subs = counts[1];
        }
    }
    __atomic_store_n(&scan_lock, 0, __ATOMIC_RELEASE);
}

void
native_poll(void)
{
    if (__atomic_load_n(&native_on, __ATOMIC_ACQUIRE)) {
        rescan();
    }
}

static void
after_fork_child(void)
{
    scan_lock = 0;
    scan_again = 0;
}

static const char *
native_setup(void)
{
    for (size_t t = 0; t < NTARGETS; t++) {
        *targets[t].real = dlsym(RTLD_DEFAULT, targets[t].name);
    }
    if (!real.malloc || !real.calloc || !real.realloc || !real.free || !real.dlopen ||
        !real.dlclose) {
        return "libc's malloc or dlopen was not found";
    }
    Dl_info own;
    if (dladdr((void *)native_setup, &own) == 0) {
        return "this extension's own object was not found";
    }
    own_base = (uintptr_t)own.dli_fbase;
    /* each object's dlpi_addr is its load bias, not its first mapping: compare
     * the same kind of address (the link map's l_addr) */
    struct link_map *lm = NULL;
    if (dladdr1((void *)native_setup, &own, (void **)&lm, RTLD_DL_LINKMAP) != 0 && lm != NULL) {
        own_base = (uintptr_t)lm->l_addr;
    }
    if (pthread_key_create(&log_key, log_orphan) != 0) {
        return "no thread-specific key is left";
    }
    pthread_atfork(NULL, NULL, after_fork_child);
    return NULL;
}
#else   /* NATIVE_SUPPORTED */
void
native_settle(void)
{
}

void
native_target(Meter *m)
{
    (void)m;
}

void
native_forget(Meter *m)
{
    (void)m;
}

void
native_poll(void)
{
}
#endif   /* NATIVE_SUPPORTED */

/* ------------------------------------------------------------------------ */
/* Module functions                                                         */

PyObject *
mod_native_supported(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
#ifdef NATIVE_SUPPORTED
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

PyObject *
mod_native_install(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
#ifdef NATIVE_SUPPORTED
    if (!installed) {
        PyErr_SetString(PyExc_RuntimeError, "install() first");
        return NULL;
    }
    if (!native_on) {
        const char *why = native_setup();
        if (why != NULL) {
            PyErr_Format(PyExc_RuntimeError, "native counting cannot start: %s", why);
            return NULL;
        }
        direct_ts = hook_found_thread_state() == 1;
        __atomic_store_n(&native_on, 1, __ATOMIC_RELEASE);
    }
    Py_BEGIN_ALLOW_THREADS
    rescan();
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
#else
    PyErr_SetString(PyExc_NotImplementedError,
                    "native counting needs Linux with glibc on x86-64 or aarch64");
    return NULL;
#endif
}

PyObject *
mod_native_state(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
#ifdef NATIVE_SUPPORTED
    Py_ssize_t logs = 0;
    for (NLog *l = registry; l != NULL; l = l->next) {
        logs++;
    }
    return Py_BuildValue("{s:O,s:n,s:n,s:n}", "on", native_on ? Py_True : Py_False, "slots",
                         (Py_ssize_t)patched_slots, "scans", (Py_ssize_t)scans, "logs", logs);
#else
    return Py_BuildValue("{s:O,s:n,s:n,s:n}", "on", Py_False, "slots", (Py_ssize_t)0, "scans",
                         (Py_ssize_t)0, "logs", (Py_ssize_t)0);
#endif
}
