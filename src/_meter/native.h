/*
 * What native.c (the wrappers, the threads' logs) and patch.c (pointing the
 * loaded objects' relocations at the wrappers) share.
 */
#ifndef GOTCHA_NATIVE_H
#define GOTCHA_NATIVE_H

#include "_meter.h"

GOTCHA_HIDDEN_BEGIN

#if defined(__linux__) && defined(__GLIBC__) && (defined(__x86_64__) || defined(__aarch64__))
#  define NATIVE_SUPPORTED 1
#endif

#ifdef NATIVE_SUPPORTED
/* libc's functions (or an interposer's: whatever the objects' slots held) */
typedef struct {
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
} RealFns;
extern RealFns real;

/* A function whose relocations are pointed at a wrapper */
typedef struct {
    const char *name;
    void *wrapper;
    void **real;
    char alloc;   /* 0: dlopen/dlclose, patched in the interpreter too */
    void *global; /* what the global scope resolves the name to, where that is not
                   * libc's own definition: a non-PIE executable that takes the
                   * function's address defines it at a PLT entry of its own
                   * (Debian's python3.15) */
} Target;
extern Target targets[];
extern const size_t ntargets;

const char *patch_setup(void);   /* real's functions found, this extension's place */
void rescan(void);               /* patch what was loaded since; any thread, no GIL */
extern size_t patched_slots, scans;
#endif

GOTCHA_HIDDEN_END

#endif
