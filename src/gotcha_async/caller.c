/*
 * Who asked for this allocation: may a hard scope refuse it?
 *
 * A refused allocation is a NULL returned to whoever called the allocator.
 * CPython's own objects handle that (bytearray(n), [0] * n, bytes(n), str * n,
 * a list or dict growing: each raises MemoryError and unwinds cleanly), but
 * third-party C does not always: orjson does not check a failed
 * _PyBytes_Resize (a SIGSEGV), and pyo3 turns the NULL into PanicException, a
 * BaseException. Anything called through the call protocol, though, may fail
 * with an exception, and every caller of a call handles that.
 *
 * So a refusal is made only when the C stack, read from the hook upwards,
 * reaches a function of the call protocol or the evaluation loop through
 * frames of CPython's own object alone (libpython, or the executable it is
 * linked into, and the standard library's extension modules): the allocation
 * was asked for by CPython's code, for bytecode or for a call, and its failure
 * comes back as an exception from that call. A frame of any other object on
 * the way (orjson's, pydantic-core's, libc's) and nothing is refused: the
 * allocation goes through and the interrupt stops the code at the next
 * bytecode boundary.
 *
 * Which functions are the call protocol and the evaluation loop is not read
 * from symbols (a stripped interpreter has none for its static functions,
 * and 3.15's _PyEval_EvalFrameDefault is a trampoline into a body of another
 * name): install() measures it. It runs a line of Python that calls a
 * function of ours, and every function on the C stack between that function
 * and install() is one through which CPython calls (the loop, the vectorcall
 * of a builtin, the entry into a code object). A function is known by the
 * start the unwinder's tables give it, so a return address anywhere in it
 * matches.
 *
 * The C stack is read with glibc's backtrace() (the unwinder and each object's
 * .eh_frame: no frame pointers needed). Neither it nor dladdr() allocates
 * once backtrace() has run once, and all this runs only for an allocation a
 * hard scope is about to refuse: rare, so its microseconds are on no common
 * path. Wherever the walk is not sure it answers no: a frame it cannot place,
 * an unwinder that stops early, no stop within MAX_DEPTH frames, JIT-compiled
 * code, a platform without glibc's unwinder (there nothing is refused).
 */
#include "_meter.h"

#if defined(__linux__) && defined(__GLIBC__) && !defined(GOTCHA_NO_UNWIND)
#  define HAVE_UNWIND 1
#  include <dlfcn.h>
#  include <execinfo.h>
#endif

#define MAX_DEPTH 48
#define MAX_STOPS 32

#ifdef HAVE_UNWIND
/* libgcc's lookup of a return address's unwind entry: it gives the start of
 * the function, static ones included (unwind-dw2-fde.h, not installed) */
struct dwarf_eh_bases {
    void *tbase, *dbase, *func;
};
typedef const void *(*find_fde_fn)(void *pc, struct dwarf_eh_bases *bases);
static find_fde_fn find_fde;

static void *cpython_base;          /* the object PyObject_Malloc is in */
static void *own_base;              /* ours: the hook's frames */
static void *stops[MAX_STOPS];      /* call protocol and evaluation loop: function starts */
static int n_stops;
#endif
static int ready;                   /* 1: caller_is_cpython() can answer yes */
static char *stdlib_dir;            /* lib-dynload, with its trailing '/' */
static size_t stdlib_len;

/* The standard library's extension modules live here. */
int
caller_trust_dir(const char *dir)
{
    size_t n = strlen(dir);
    char *copy = malloc(n + 2);
    if (copy == NULL) {
        return -1;
    }
    memcpy(copy, dir, n);
    if (n == 0 || copy[n - 1] != '/') {
        copy[n++] = '/';
    }
    copy[n] = '\0';
    free(stdlib_dir);
    stdlib_dir = copy;
    stdlib_len = n;
    return 0;
}

#ifdef HAVE_UNWIND
/* The object addr is in: 0 ours, 1 CPython's, 2 another's, -1 not placed. */
static int
owner_of(void *addr)
{
    Dl_info info;
    if (dladdr(addr, &info) == 0 || info.dli_fbase == NULL) {
        return -1;
    }
    if (info.dli_fbase == own_base) {
        return 0;
    }
    if (info.dli_fbase == cpython_base) {
        return 1;
    }
    const char *f = info.dli_fname;
    if (stdlib_dir != NULL && f != NULL && strncmp(f, stdlib_dir, stdlib_len) == 0 &&
        strchr(f + stdlib_len, '/') == NULL) {
        return 1;
    }
    return 2;
}

static void *
function_of(void *pc)
{
    struct dwarf_eh_bases bases = {NULL, NULL, NULL};
    return find_fde(pc, &bases) == NULL ? NULL : bases.func;
}

static int
is_stop(void *func)
{
    for (int i = 0; i < n_stops; i++) {
        if (stops[i] == func) {
            return 1;
        }
    }
    return 0;
}

/* The measurement: called from a line of Python that install() runs. */
static void *seen[MAX_DEPTH];
static int n_seen;

static PyObject *
calibrate(PyObject *self, PyObject *unused)
{
    n_seen = backtrace(seen, MAX_DEPTH);
    Py_RETURN_NONE;
}

static PyMethodDef calibrate_def = {"calibrate", calibrate, METH_NOARGS, NULL};

/* Every function between calibrate() and our own caller: 0, or -1 if the
 * stack could not be read that far (then nothing is refused). */
static int
measure_stops(void)
{
    PyObject *fn = PyCFunction_New(&calibrate_def, NULL);
    PyObject *globals = fn == NULL ? NULL : Py_BuildValue("{sOsO}", "calibrate", fn,
                                                          "__builtins__", PyEval_GetBuiltins());
    PyObject *code = globals == NULL ? NULL
                                     : Py_CompileString("calibrate()", "<gotcha>", Py_eval_input);
    PyObject *r = code == NULL ? NULL : PyEval_EvalCode(code, globals, globals);
    Py_XDECREF(fn);
    Py_XDECREF(globals);
    Py_XDECREF(code);
    if (r == NULL) {
        PyErr_Clear();
        return -1;
    }
    Py_DECREF(r);
    int i = 0;
    while (i < n_seen && owner_of((char *)seen[i] - 1) == 0) {
        i++;   /* calibrate() itself */
    }
    for (; i < n_seen; i++) {
        void *pc = (char *)seen[i] - 1;
        int owner = owner_of(pc);
        if (owner == 0) {
            return n_stops > 0 ? 0 : -1;   /* back in install(): done */
        }
        void *func = function_of(pc);
        if (owner != 1 || func == NULL || n_stops == MAX_STOPS) {
            return -1;
        }
        if (!is_stop(func)) {
            stops[n_stops++] = func;
        }
    }
    return -1;
}
#endif

/* Under the GIL, outside the hook, with no exception set: find the objects,
 * load the unwinder (backtrace()'s first call does, with malloc) and measure
 * where CPython's calls go. */
void
caller_init(void)
{
#if defined(HAVE_UNWIND) && defined(GOTCHA_CHECKED)
    if (ready) {
        return;
    }
    Dl_info info;
    if (dladdr((void *)&PyObject_Malloc, &info) == 0 || info.dli_fbase == NULL) {
        return;
    }
    cpython_base = info.dli_fbase;
    if (dladdr((void *)&caller_init, &info) == 0 || info.dli_fbase == NULL ||
        info.dli_fbase == cpython_base) {
        return;
    }
    own_base = info.dli_fbase;
    void *pcs[4];
    if (backtrace(pcs, 4) <= 0) {
        return;
    }
    void *gcc = dlopen("libgcc_s.so.1", RTLD_NOW | RTLD_NOLOAD);
    find_fde = gcc == NULL ? NULL : (find_fde_fn)dlsym(gcc, "_Unwind_Find_FDE");
    if (find_fde == NULL) {
        return;
    }
    n_stops = 0;
    if (measure_stops() < 0) {
        n_stops = 0;
        return;
    }
    ready = 1;
#endif
}

/* 1 if the allocation being made was asked for by CPython's own code, for the
 * evaluation loop or a call; 0 if not, or not sure. */
int
caller_is_cpython(void)
{
#ifdef HAVE_UNWIND
    if (!ready) {
        return 0;
    }
    void *pcs[MAX_DEPTH];
    int n = backtrace(pcs, MAX_DEPTH);
    int i = 0;
    /* a return address: the call before it is what ran (a call can be a
     * function's last instruction, and its return address the next one's) */
    while (i < n && owner_of((char *)pcs[i] - 1) == 0) {
        i++;   /* the hook's own frames */
    }
    for (; i < n; i++) {
        void *pc = (char *)pcs[i] - 1;
        if (owner_of(pc) != 1) {
            return 0;   /* an extension's C, libc's, ours called back, or not placed */
        }
        if (is_stop(function_of(pc))) {
            return 1;
        }
    }
    return 0;
#else
    return 0;
#endif
}

int
caller_ready(void)
{
    return ready;
}
