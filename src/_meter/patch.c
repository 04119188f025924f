/*
 * Pointing each loaded object's relocations of malloc and its family (and of
 * dlopen and dlclose) at native.c's wrappers: the PLT's slots, the GOT's
 * entries and absolute data words that hold a function's address (libxml2's
 * xmlMalloc = malloc), read from each object's dynamic section, found
 * through dl_iterate_phdr. Linux with glibc, x86-64 and aarch64 (RELA
 * relocations). Nothing here takes the GIL or calls Python: the delivery
 * thread runs rescan() without it.
 */
#include "native.h"

#ifdef NATIVE_SUPPORTED
#  include <dlfcn.h>
#  include <elf.h>
#  include <link.h>
#  include <pthread.h>
#  include <sys/mman.h>
#  include <unistd.h>

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
size_t patched_slots, scans;

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
write_slot(const Obj *o, uintptr_t addr, const Target *t)
{
    void **slot = (void **)addr;
    void *now = __atomic_load_n(slot, __ATOMIC_RELAXED);
    if (now != *t->real && (t->global == NULL || now != t->global) &&
        !((uintptr_t)now >= o->lo && (uintptr_t)now < o->hi)) {
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
    __atomic_store_n(slot, t->wrapper, __ATOMIC_RELAXED);
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
        for (size_t t = 0; t < ntargets; t++) {
            if ((far >= 2 || !targets[t].alloc) && *targets[t].real != NULL &&
                strcmp(name, targets[t].name) == 0) {
                if (!targets[t].alloc && far == 3) {
                    break;   /* its dlopen() searches its own RUNPATH: left alone */
                }
                write_slot(o, o->base + rel[i].r_offset, &targets[t]);
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

void
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


const char *
patch_setup(void)
{
    /* libc's own definitions, which a library's slot holds once bound; the
     * global scope's answer can be a PLT entry of the executable instead,
     * kept as the name's other address */
    void *libc = dlopen("libc.so.6", RTLD_LAZY | RTLD_NOLOAD);
    for (size_t t = 0; t < ntargets; t++) {
        void *global = dlsym(RTLD_DEFAULT, targets[t].name);
        void *own = libc != NULL ? dlsym(libc, targets[t].name) : NULL;
        *targets[t].real = own != NULL ? own : global;
        targets[t].global = global != *targets[t].real ? global : NULL;
    }
    if (libc != NULL) {
        dlclose(libc);   /* RTLD_NOLOAD took a reference to what is loaded for good */
    }
    if (!real.malloc || !real.calloc || !real.realloc || !real.free || !real.dlopen ||
        !real.dlclose) {
        return "libc's malloc or dlopen was not found";
    }
    /* each object's dlpi_addr is its load bias: compare the same kind of
     * address, the link map's l_addr */
    Dl_info own;
    struct link_map *lm = NULL;
    if (dladdr1((void *)patch_setup, &own, (void **)&lm, RTLD_DL_LINKMAP) == 0 || lm == NULL) {
        return "this extension's own object was not found";
    }
    own_base = (uintptr_t)lm->l_addr;
    pthread_atfork(NULL, NULL, after_fork_child);
    return NULL;
}

#else   /* NATIVE_SUPPORTED */
void
native_poll(void)
{
}
#endif   /* NATIVE_SUPPORTED */
