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
 * linked into): the allocation
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
 * The C stack is read with libgcc's unwinder (each object's .eh_frame: no
 * frame pointers needed), one frame at a time, and the walk stops at the first
 * frame that settles the answer: past it the stack may not be this thread's
 * to read (a greenlet's frames sit on a stack its parent has reused since:
 * glibc's backtrace(), which unwinds every frame first, faulted there under
 * SQLAlchemy's asyncio layer). Neither the unwinder nor dladdr() allocates
 * once loaded, and all this runs only for an allocation a hard scope is about
 * to refuse: rare, so its microseconds are on no common path. Wherever the
 * walk is not sure it answers no: a frame it cannot place, an unwinder that
 * stops early, no stop within MAX_DEPTH frames, JIT-compiled code, a platform
 * without glibc and libgcc's unwinder (there nothing is refused).
 */
#include "_meter.h"

#if defined(__linux__) && defined(__GLIBC__) && !defined(GOTCHA_NO_UNWIND) && \
    defined(GOTCHA_CHECKED)
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

/* libgcc's walk, a frame at a time (unwind.h's, taken from the library glibc's
 * backtrace() loads, so that nothing here links against it) */
struct _Unwind_Context;
typedef int (*walk_cb)(struct _Unwind_Context *, void *);
typedef int (*walk_fn)(walk_cb, void *);
typedef uintptr_t (*get_ip_fn)(struct _Unwind_Context *);
static walk_fn unwind_walk;
static get_ip_fn unwind_ip;
#define WALK_GO 0       /* _URC_NO_REASON: go on */
#define WALK_STOP 5     /* _URC_END_OF_STACK: stop here */

static void *cpython_base;          /* the object PyObject_Malloc is in */
static void *own_base;              /* ours: the hook's frames */
static void *stops[MAX_STOPS];      /* call protocol and evaluation loop: function starts */
static int n_stops;
#endif
static int ready;                   /* 1: caller_is_cpython() can answer yes */
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
    /* The standard library's extension modules (lib-dynload) are not taken on
     * faith: 3.12 and 3.13's json encoder passes a failed _PyUnicodeWriter_Finish
     * on to PyTuple_SetItem (a SystemError, found by scripts/ecosystem_inject.py) */
    return info.dli_fbase == cpython_base ? 1 : 2;
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

/* One walk: from the first frame not ours (the hook's, calibrate()'s) up. */
typedef struct {
    int depth;       /* frames looked at */
    int started;     /* past our own frames */
    int answer;      /* caller_is_cpython()'s, once known */
    int measuring;   /* calibrate(): collect the functions instead */
} Walk;

static int
measure_frame(Walk *w, void *pc)
{
    int owner = owner_of(pc);
    if (owner == 0) {
        w->answer = n_stops > 0;   /* back in install(): done */
        return WALK_STOP;
    }
    void *func = function_of(pc);
    if (owner != 1 || func == NULL || n_stops == MAX_STOPS) {
        w->answer = 0;
        return WALK_STOP;
    }
    if (!is_stop(func)) {
        stops[n_stops++] = func;
    }
    return WALK_GO;
}

static int
walk_frame(struct _Unwind_Context *ctx, void *arg)
{
    Walk *w = arg;
    if (++w->depth > MAX_DEPTH) {
        w->answer = 0;
        return WALK_STOP;
    }
    uintptr_t ip = unwind_ip(ctx);
    if (ip == 0) {
        w->answer = 0;
        return WALK_STOP;
    }
    /* a return address: the call before it is what ran (a call can be a
     * function's last instruction, and its return address the next one's) */
    void *pc = (void *)(ip - 1);
    if (!w->started) {
        if (owner_of(pc) == 0) {
            return WALK_GO;   /* our own frames: the walk's, the hook's */
        }
        w->started = 1;
    }
    if (w->measuring) {
        return measure_frame(w, pc);
    }
    if (owner_of(pc) != 1) {
        w->answer = 0;   /* an extension's C, libc's, ours called back, or not placed */
        return WALK_STOP;
    }
    if (is_stop(function_of(pc))) {
        w->answer = 1;
        return WALK_STOP;
    }
    return WALK_GO;
}

static int
walk(int measuring)
{
    Walk w = {0, 0, 0, measuring};
    unwind_walk(walk_frame, &w);
    return w.answer;
}

/* The measurement: called from a line of Python that install() runs. */
static int measured;

static PyObject *
calibrate(PyObject *self, PyObject *unused)
{
    measured = walk(1);
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
    measured = 0;
    PyObject *r = code == NULL ? NULL : PyEval_EvalCode(code, globals, globals);
    Py_XDECREF(fn);
    Py_XDECREF(globals);
    Py_XDECREF(code);
    if (r == NULL) {
        PyErr_Clear();
        return -1;
    }
    Py_DECREF(r);
    return measured ? 0 : -1;
}
#endif

/* Under the GIL, outside the hook, with no exception set: find the objects,
 * load the unwinder (backtrace()'s first call does, with malloc) and measure
 * where CPython's calls go. */
void
caller_init(void)
{
#ifdef HAVE_UNWIND
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
        return;   /* its first call loads libgcc's unwinder, with malloc: here, not in the hook */
    }
    void *gcc = dlopen("libgcc_s.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (gcc == NULL) {
        return;
    }
    find_fde = (find_fde_fn)dlsym(gcc, "_Unwind_Find_FDE");
    unwind_walk = (walk_fn)dlsym(gcc, "_Unwind_Backtrace");
    unwind_ip = (get_ip_fn)dlsym(gcc, "_Unwind_GetIP");
    if (find_fde == NULL || unwind_walk == NULL || unwind_ip == NULL) {
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
    return ready && walk(0);
#else
    return 0;
#endif
}

int
caller_ready(void)
{
    return ready;
}
