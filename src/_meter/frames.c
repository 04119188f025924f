/*
 * Reading CPython's frames from inside an allocation: whose code is running,
 * and where. This is the one file that knows the private layout of
 * _PyInterpreterFrame, and only for the versions it was checked on (3.11 to
 * 3.15); 3.13 and later use the public PyUnstable_ API where there is one.
 * Nothing here allocates or takes a reference that outlives the call.
 */
#include "_meter.h"

#if PY_VERSION_HEX >= 0x030E0000
/* 3.14, 3.15: f_executable and the locals are tagged stack references (the
 * low two bits: 3.14 tags one, 3.15 two) */
#  define LOCAL_TAG ((uintptr_t)3)
typedef struct {
    uintptr_t executable;
    void *previous, *funcobj, *globals, *builtins, *locals, *frame_obj;
    uint16_t *instr_ptr;
    void *stackpointer;
#  ifdef Py_GIL_DISABLED
    int32_t tlbc_index;
#  endif
    uint16_t return_offset;
    char owner;
    uint8_t visited;
    uintptr_t localsplus[1];
} Frame;
#elif PY_VERSION_HEX >= 0x030C0000
/* 3.12 (f_code), 3.13 (f_executable) */
#  define LOCAL_TAG ((uintptr_t)0)
typedef struct {
    PyObject *code;
    void *previous, *funcobj, *globals, *builtins, *locals, *frame_obj;
    uint16_t *instr_ptr;
    int stacktop;
    uint16_t return_offset;
    char owner;
    uintptr_t localsplus[1];
} Frame;
#else
/* 3.11 */
#  define LOCAL_TAG ((uintptr_t)0)
typedef struct {
    void *func, *globals, *builtins, *locals;
    PyObject *code;
    void *frame_obj, *previous;
    uint16_t *prev_instr;
    int stacktop;
    char is_entry;   /* a bool: the frame C called into */
    char owner;
    uintptr_t localsplus[1];
} Frame;
#endif

/* Off the checked versions there is no frame to read: everything below that
 * starts from top_frame() sees none, and nothing is refused or interrupted. */
void *
top_frame(PyThreadState *ts)
{
#ifndef GOTCHA_CHECKED
    (void)ts;
    return NULL;
#elif PY_VERSION_HEX >= 0x030D0000
    return ts->current_frame;
#else
    return ts->cframe == NULL ? NULL : ts->cframe->current_frame;
#endif
}

void *
older_frame(void *frame)
{
    return ((Frame *)frame)->previous;
}

/* The code object a frame runs, borrowed, or NULL (3.13's C entry frames run
 * None; 3.12's run a trampoline with no file of its own). */
PyCodeObject *
frame_code(void *frame)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *code = PyUnstable_InterpreterFrame_GetCode(frame);
    if (code == NULL) {
        return NULL;
    }
    Py_DECREF(code);   /* the frame holds it */
#else
    PyObject *code = ((Frame *)frame)->code;
#endif
    if (code == NULL || !PyCode_Check(code) ||
        !PyUnicode_Check(((PyCodeObject *)code)->co_filename)) {
        return NULL;
    }
    return (PyCodeObject *)code;
}

/* The offset, in code units, of the instruction a frame is at. */
int
frame_lasti(void *frame, PyCodeObject *code)
{
#if PY_VERSION_HEX >= 0x030C0000
    (void)code;
    return PyUnstable_InterpreterFrame_GetLasti(frame) / (int)sizeof(uint16_t);
#else
    return (int)(((Frame *)frame)->prev_instr - (uint16_t *)code->co_code_adaptive);
#endif
}

int
code_line(PyCodeObject *code, int lasti)
{
    return PyCode_Addr2Line(code, lasti < 0 ? -1 : lasti * (int)sizeof(uint16_t));
}

/* Can the innermost frame survive a refused allocation right now? From 3.14
 * the interpreter keeps the value stack in registers through the calls it
 * knows cannot fail in ways that run code (a list growing inside
 * CALL_LIST_APPEND), and marks that with a NULL stack pointer in the frame: a
 * refusal there frees objects mid-instruction, which CPython's debug build
 * rejects outright. Later versions never refuse until their layout has been
 * checked (interrupts still stop the code). */
int
stack_spilled(PyThreadState *ts)
{
#ifndef GOTCHA_CHECKED
    (void)ts;
    return 0;
#elif PY_VERSION_HEX >= 0x030E0000
    Frame *f = top_frame(ts);
    return f == NULL || f->stackpointer != NULL;
#else
    (void)ts;
    return 1;
#endif
}

static int
has_prefix(PyObject *s, PyObject *prefix)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(prefix);
    if (PyUnicode_GET_LENGTH(s) < n) {
        return 0;
    }
    int ks = PyUnicode_KIND(s), kp = PyUnicode_KIND(prefix);
    const void *ds = PyUnicode_DATA(s), *dp = PyUnicode_DATA(prefix);
    if (ks == kp) {
        return memcmp(ds, dp, (size_t)n * (size_t)ks) == 0;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyUnicode_READ(ks, ds, i) != PyUnicode_READ(kp, dp, i)) {
            return 0;
        }
    }
    return 1;
}

static PyObject *exempt;     /* tuple of str: path prefixes of loop machinery */
static PyObject *dispatch;   /* tuple of (file, name): where loops run a task's step */

void
frames_setup(PyObject *exempt_dirs, PyObject *places)
{
    Py_XSETREF(exempt, Py_NewRef(exempt_dirs));
    Py_XSETREF(dispatch, Py_NewRef(places));
}

/* Is this the event loop's, anyio's or our own code? (File names are
 * compared as text: a non-ASCII path is as good as any.) */
static int
is_machinery_file(PyObject *filename)
{
    Py_ssize_t n = PyTuple_GET_SIZE(exempt);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (has_prefix(filename, PyTuple_GET_ITEM(exempt, i))) {
            return 1;
        }
    }
    return 0;
}

/* Is this the function a loop runs a task's step from (dispatch's file and
 * name)? Older frames are whoever started the loop, not the task. */
static int
is_dispatch(PyCodeObject *code)
{
    Py_ssize_t n = dispatch == NULL ? 0 : PyTuple_GET_SIZE(dispatch);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *place = PyTuple_GET_ITEM(dispatch, i);
        if (PyUnicode_Compare(code->co_name, PyTuple_GET_ITEM(place, 1)) == 0 &&
            PyUnicode_Compare(code->co_filename, PyTuple_GET_ITEM(place, 0)) == 0) {
            return 1;
        }
    }
    return 0;
}

enum { USER, MACHINERY, DISPATCH };

/* Sites walk several frames per recorded block: the verdict is remembered per
 * (code object, file name object), both of which would have to be freed and
 * their addresses reused together for it to go stale. */
#define VERDICTS 1024
static struct { PyCodeObject *code; PyObject *filename; char verdict; } verdicts[VERDICTS];

static Py_NO_INLINE int
new_verdict(size_t i, PyCodeObject *code)
{
    verdicts[i].code = code;
    verdicts[i].filename = code->co_filename;
    /* 3.12 enters Python from C through a "<shim>" frame of its own code; 3.13+
     * runs a class's __init__ on top of "__init__", its _Py_InitCleanup */
    int shim = PyUnicode_CompareWithASCIIString(code->co_filename, "<shim>") == 0 ||
               PyUnicode_CompareWithASCIIString(code->co_filename, "__init__") == 0;
    verdicts[i].verdict = shim                                    ? MACHINERY
                          : !is_machinery_file(code->co_filename) ? USER
                          : is_dispatch(code)                     ? DISPATCH
                                                                  : MACHINERY;
    return verdicts[i].verdict;
}

static inline int
verdict(PyCodeObject *code)
{
    if (exempt == NULL) {
        return MACHINERY;
    }
    size_t i = ((uintptr_t)code >> 4) & (VERDICTS - 1);
    if (verdicts[i].code != code || verdicts[i].filename != code->co_filename) {
        return new_verdict(i, code);
    }
    return verdicts[i].verdict;
}

int
code_is_machinery(PyCodeObject *code)
{
    return verdict(code) != USER;
}

/* What a frame runs and where it is, as two words read straight off it: a
 * frame's part in a site is a function of these. */
static inline uintptr_t
frame_runs(void *frame)
{
#if PY_VERSION_HEX >= 0x030E0000
    return ((Frame *)frame)->executable;
#else
    return (uintptr_t)((Frame *)frame)->code;
#endif
}

static inline uintptr_t
frame_at(void *frame)
{
#if PY_VERSION_HEX >= 0x030C0000
    return (uintptr_t)((Frame *)frame)->instr_ptr;
#else
    return (uintptr_t)((Frame *)frame)->prev_instr;
#endif
}

/* The frames the last walk read, innermost first, and whether it ran out of
 * frames: a site is a function of what each frame runs and where, so a walk
 * past the same frames finds the same site. A C call that allocates many
 * blocks (json.loads, a list growing) is then read once. */
#define WALK_MAX 64
static struct {
    int depth, ended, known;
    uintptr_t runs[WALK_MAX], at[WALK_MAX];
    uint32_t site;
} walk;

int
frames_same_site(PyThreadState *ts, uint32_t *site)
{
    if (!walk.known || ts == NULL) {
        return 0;
    }
    void *f = top_frame(ts);
    for (int i = 0; i < walk.depth; i++, f = older_frame(f)) {
        if (f == NULL || frame_runs(f) != walk.runs[i] || frame_at(f) != walk.at[i]) {
            return 0;
        }
    }
    if (walk.ended && f != NULL) {
        return 0;
    }
    *site = walk.site;
    return 1;
}

void
frames_remember_site(uint32_t site)
{
    walk.site = site;
    walk.known = 1;
}

void
frames_forget_site(void)
{
    walk.known = 0;
}

/* The innermost SITE_FRAMES frames of user code, the event loops' and ours
 * left out, and none older than the loop's dispatch of the task: here, so
 * that the steps of the walk inline (one is taken for every block held
 * memory records). The frames it reads are remembered for
 * frames_same_site(); past a dispatch frame none can change the site. */
void
frames_site(PyThreadState *ts, Site *s)
{
    s->n = 0;
    walk.known = 0;
    walk.depth = 0;
    void *f = ts == NULL ? NULL : top_frame(ts);
    for (; f != NULL && s->n < SITE_FRAMES && walk.depth < WALK_MAX; f = older_frame(f)) {
        walk.runs[walk.depth] = frame_runs(f);
        walk.at[walk.depth] = frame_at(f);
        walk.depth++;
        PyCodeObject *code = frame_code(f);
        int v = code == NULL ? MACHINERY : verdict(code);
        if (v == DISPATCH) {
            walk.ended = 0;
            return;
        }
        if (v == MACHINERY) {
            continue;
        }
        s->code[s->n] = code;
        s->lasti[s->n] = frame_lasti(f, code);
        s->n++;
    }
    walk.ended = f == NULL;
}

/* Is a thread's innermost Python frame user code, as opposed to the event
 * loop's, anyio's or our own machinery, or no Python code at all? Only user
 * code is ever refused or interrupted: a MemoryError inside asyncio's task
 * step would break the loop for every task. */
static PyObject *frozen_prefix;   /* "<frozen ", made at init: the hook may not allocate */
static PyObject *attrs_prefix;    /* "<attrs generated", the file of attrs' methods */
static PyObject *import_prefix;   /* "<frozen importlib._bootstrap", both of its files */

int
frames_init(void)
{
    frozen_prefix = PyUnicode_InternFromString("<frozen ");
    attrs_prefix = PyUnicode_InternFromString("<attrs generated");
    import_prefix = PyUnicode_InternFromString("<frozen importlib._bootstrap");
    return frozen_prefix == NULL || attrs_prefix == NULL || import_prefix == NULL ? -1 : 0;
}

/* Is the thread importing a module? A module's body runs under the import
 * system, which may have been called by an extension's init (orjson imports
 * uuid and never checks the result: a SIGSEGV when a hard scope's interrupt
 * stopped uuid's body). Nothing is refused or interrupted until the import is
 * over; the first boundary after it stops the code. Walks the whole stack:
 * call it only where a stop is about to be made. */
int
frames_importing(PyThreadState *ts)
{
    if (import_prefix == NULL || ts == NULL) {
        return 1;
    }
    int n = 0;
    for (void *f = top_frame(ts); f != NULL && n < 4096; f = older_frame(f), n++) {
        PyCodeObject *c = frame_code(f);
        if (c != NULL && PyUnicode_Tailmatch(c->co_filename, import_prefix, 0,
                                             PY_SSIZE_T_MAX, -1) == 1) {
            return 1;
        }
    }
    return 0;
}

static int
is_dunder(PyObject *name)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(name);
    return n > 4 && PyUnicode_READ_CHAR(name, 0) == '_' && PyUnicode_READ_CHAR(name, 1) == '_' &&
           PyUnicode_READ_CHAR(name, n - 1) == '_' && PyUnicode_READ_CHAR(name, n - 2) == '_';
}

/* Code made at run time for a class: a namedtuple's __new__ (a "<string>"
 * lambda), a dataclass's __init__ or __eq__ ("<string>" dunders), attrs'
 * methods (trio's classes are attrs classes). It belongs to whoever calls it. */
static int
is_generated_method(PyCodeObject *code)
{
    PyObject *file = code->co_filename;
    if (PyUnicode_GET_LENGTH(file) == 0 || PyUnicode_READ_CHAR(file, 0) != '<') {
        return 0;
    }
    if (PyUnicode_CompareWithASCIIString(file, "<string>") == 0) {
        return PyUnicode_CompareWithASCIIString(code->co_name, "<lambda>") == 0 ||
               is_dunder(code->co_name);
    }
    return PyUnicode_Tailmatch(file, attrs_prefix, 0, PY_SSIZE_T_MAX, -1) == 1;
}

/* The frames CPython runs between a caller and what it calls: 3.12's "<shim>",
 * and from 3.13 the one that checks what __init__ returned, when a class is
 * called from Python (_Py_InitCleanup, whose file name is "__init__", like no
 * real file). Frozen modules' "<frozen ...>" are real callers. */
static int
is_shim(PyCodeObject *c)
{
    PyObject *file = c->co_filename;
    if (PyUnicode_GET_LENGTH(file) > 0 && PyUnicode_READ_CHAR(file, 0) == '<') {
        return PyUnicode_Tailmatch(file, frozen_prefix, 0, 8, -1) != 1;
    }
    return PyUnicode_CompareWithASCIIString(file, "__init__") == 0;
}

static int
frame_user(void *f)
{
    if (frozen_prefix == NULL || f == NULL) {
        return 0;
    }
    PyCodeObject *code = frame_code(f);
    if (code == NULL || code_is_machinery(code)) {
        return 0;
    }
    /* A method generated for a class belongs to whoever calls it: called by the
     * loop's machinery (selectors' SelectorKey while asyncio builds a loop, an
     * attrs __init__ inside trio), it is machinery. Other "<string>" code (a
     * thread target written in 'python -c' code) is user code. */
    if (is_generated_method(code)) {
        /* the caller: past the C entry frames of a call made from C (no code on
         * 3.13+, 3.12's shim code, named "<...>" like no real file) */
        PyCodeObject *outer = NULL;
        for (void *caller = older_frame(f); caller != NULL && outer == NULL;
             caller = older_frame(caller)) {
            PyCodeObject *c = frame_code(caller);
            if (c != NULL && is_shim(c)) {
                continue;   /* a shim, not a caller */
            }
            outer = c;
        }
        if (outer != NULL && code_is_machinery(outer)) {
            return 0;
        }
    }
    return 1;
}

int
frame_runs_user_code(PyThreadState *ts)
{
    return ts == NULL ? 0 : frame_user(top_frame(ts));
}

/* what a coroutine's frame is at while it is suspended in an await: 1 for a
 * YIELD_VALUE, 2 for a RESUME, which is one only with a non-zero oparg (3.13
 * points after the yield); each with its specialized and instrumented forms */
static unsigned char awaiting_op[256];

/* Is the frame suspended in an await (or a yield)? It is on top while a
 * cancellation is thrown into the coroutines it awaits, before theirs are:
 * what is made then is the thrower's. Reads the frame's own bytecode, where
 * these instructions keep their oparg. */
static int
frame_awaiting(void *frame)
{
    PyCodeObject *code = frame_code(frame);
    if (code == NULL) {
        return 0;
    }
    int lasti = frame_lasti(frame, code);
    if (lasti < 0 || lasti >= (int)(Py_SIZE(code))) {
        return 0;
    }
    const unsigned char *unit = (const unsigned char *)code->co_code_adaptive + 2 * lasti;
    int kind = awaiting_op[unit[0]];
    return kind == 1 || (kind == 2 && (unit[1] & 3) != 0);
}

/* Is the thread running something other than user code's own bytecode: the
 * machinery (a loop, anyio) or a throw into an awaiting coroutine? No when
 * that cannot be told (no frame to read: an unchecked CPython), so that
 * everything is charged. */
int
machinery_now(PyThreadState *ts)
{
    void *top = ts == NULL ? NULL : top_frame(ts);
    return top != NULL && (!frame_user(top) || frame_awaiting(top));
}

int
frame_is_user_code(void *frame)
{
    return frame_user(frame);
}

/* Was this frame called by C rather than by the bytecode of an older frame?
 * 3.11 marks it; from 3.12 C calls in through an entry frame of its own below
 * it (3.12's "<shim>" code, None from 3.13). */
static int
entered_from_c(void *frame)
{
#if PY_VERSION_HEX >= 0x030C0000
    void *caller = older_frame(frame);
    if (caller == NULL) {
        return 1;
    }
    PyCodeObject *c = frame_code(caller);
    return c == NULL || PyUnicode_CompareWithASCIIString(c->co_filename, "<shim>") == 0;
#else
    return ((Frame *)frame)->is_entry != 0;
#endif
}

/* Argument i of a frame's code, borrowed (a cell's content for an argument a
 * closure captured), or NULL. */
static PyObject *
frame_arg(void *frame, PyCodeObject *code, int i)
{
    if (i >= code->co_argcount) {
        return NULL;
    }
    PyObject *o = (PyObject *)(((Frame *)frame)->localsplus[i] & ~LOCAL_TAG);
    if (o != NULL && PyCell_Check(o)) {
        o = PyCell_GET(o);
    }
    return o;
}

static int
is_dead_weakref(PyObject *o)
{
    return o != NULL && PyWeakref_Check(o) && ((PyWeakReference *)o)->wr_object == Py_None;
}

/* A gc.callbacks callback's arguments: the phase ("start" or "stop", a str
 * of the collector's) and the info dict. */
static int
is_gc_phase(PyObject *phase, PyObject *info)
{
    return phase != NULL && info != NULL && PyUnicode_CheckExact(phase) &&
           PyDict_CheckExact(info) &&
           (PyUnicode_CompareWithASCIIString(phase, "start") == 0 ||
            PyUnicode_CompareWithASCIIString(phase, "stop") == 0);
}

/* Is this frame a finalizer that C called: a __del__ (an object's last
 * reference going, or the gc), a weakref callback, called with its dead
 * weakref (a function's first argument, a bound method's second), a
 * gc.callbacks callback, called with (phase, info), or a loop's
 * call_exception_handler (asyncio's C futures and tasks call it from their
 * finalizer: "exception was never retrieved")? An exception raised in any is
 * printed as "Exception ignored" and lost, and the finalizer's work is left
 * half done. */
static int
is_finalizer_call(void *frame, PyCodeObject *code)
{
    if (!entered_from_c(frame)) {
        return 0;
    }
    if (PyUnicode_CompareWithASCIIString(code->co_name, "__del__") == 0 ||
        PyUnicode_CompareWithASCIIString(code->co_name, "call_exception_handler") == 0) {
        return 1;
    }
    PyObject *a0 = frame_arg(frame, code, 0), *a1 = frame_arg(frame, code, 1);
    return is_dead_weakref(a0) || is_dead_weakref(a1) || is_gc_phase(a0, a1) ||
           is_gc_phase(a1, frame_arg(frame, code, 2));
}

/* Code that runs as a task: a coroutine's, a generator's (a generator-based
 * coroutine, what a loop drives through one) or an async generator's frame. */
static int
runs_as_task(PyCodeObject *code)
{
    return (code->co_flags & (CO_COROUTINE | CO_ITERABLE_COROUTINE | CO_GENERATOR |
                              CO_ASYNC_GENERATOR)) != 0;
}

/* Does the thread run a finalizer, anywhere below its innermost frame (a
 * __del__ that calls a helper), or a loop's callout: user code that the loop
 * called outside any task's coroutine, whose exception goes back to the loop?
 * The oldest user frame above the loop's dispatch tells: a task's coroutine, or
 * a function. A function there is a call_soon callback, a protocol's
 * data_received, or a Future subclass's add_done_callback or cancel called by a
 * task's step after its coroutine yielded: asyncio hands what they raise to its
 * exception handler, and a task whose add_done_callback failed is never woken
 * (a hang); trio crashes on a run_sync_soon callback's exception. The walk stops
 * at the dispatch: a finalizer is never older than that, and older frames are
 * whoever started the loop. Without a dispatch (a thread's target, code that
 * runs no loop) the exception goes back up to the code that called it. */
static int
in_finalizer_or_callout(PyThreadState *ts)
{
    int depth = 0;
    PyCodeObject *oldest_user = NULL;
    for (void *f = top_frame(ts); f != NULL && depth < 4096; f = older_frame(f), depth++) {
        PyCodeObject *code = frame_code(f);
        if (code == NULL) {
            continue;
        }
        int v = verdict(code);
        if (v == DISPATCH) {
            return oldest_user != NULL && !runs_as_task(oldest_user);
        }
        if (is_finalizer_call(f, code)) {
            return 1;
        }
        if (v == USER) {
            oldest_user = code;
        }
    }
    return 0;
}

/* May the thread's code be stopped now, whatever frame it is in? Never while a
 * tracer, profiler or sys.monitoring callback runs (CPython unsets a tracer
 * that raises, and passes a callback's exception to the instruction that
 * fired it: both are the tool's machinery, whoever called it), nor in a
 * finalizer (see is_finalizer_call) or a loop's callout (see
 * in_finalizer_or_callout). */
int
frames_stoppable(PyThreadState *ts)
{
    return ts != NULL && ts->tracing == 0 && !in_finalizer_or_callout(ts);
}

/* May the thread's code be stopped here, by an interrupt or a refusal? Only
 * user code, when the thread is stoppable at all. */
int
frame_is_user(PyThreadState *ts)
{
    return frame_runs_user_code(ts) && frames_stoppable(ts);
}

/* Where an exception raised at the instruction a frame is at would be caught.
 *
 * An interrupt is raised at an eval-breaker check and unwound from the offset
 * the interpreter reports there; where that offset's exception-table entry is
 * not the one of the code around it, the exception skips the body's
 * try/except and the scope's own `with`:
 *  - 3.12 and 3.13 put the closing jump of a `while cond:` loop outside the
 *    table, though the whole loop is inside a try;
 *  - 3.11 and 3.12 check after a backward jump has jumped, and unwind from the
 *    instruction before its target: a jump out of an except block back to the
 *    end of its try is then caught by that try's own handler again (a loop:
 *    the handler swallows it, jumps, and is interrupted again);
 *  - a function's entry (RESUME 0) is the start of a new activation, never the
 *    one whose allocation asked, though it may sit at the same address.
 * So an interrupt lands only where the instruction, its jump target and the
 * offset unwound from agree on one handler (or on none). The opcodes are the
 * running interpreter's, handed over by set_opcodes() from dis. */
static int op_resume = -1, op_extended_arg = -1;
static unsigned char jump_back[256];   /* backward jumps: 1 + their inline caches */

/* table[op] = value + add for each (op, value) pair, value in [lo, hi] */
static int
read_pairs(PyObject *pairs, unsigned char *table, int lo, int hi, int add, const char *what)
{
    memset(table, 0, 256);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(pairs); i++) {
        PyObject *pair = PyTuple_GET_ITEM(pairs, i);
        int op, value;
        if (!PyTuple_Check(pair) || !PyArg_ParseTuple(pair, "ii", &op, &value) || op < 0 ||
            op > 255 || value < lo || value > hi) {
            if (!PyErr_Occurred()) {
                PyErr_Format(PyExc_ValueError, "%s must be (opcode, %d to %d) pairs", what, lo,
                             hi);
            }
            return -1;
        }
        table[op] = (unsigned char)(value + add);
    }
    return 0;
}

int
frames_set_opcodes(int resume, int extended_arg, PyObject *jumps, PyObject *awaiting)
{
    if (read_pairs(awaiting, awaiting_op, 1, 2, 0, "awaiting") < 0 ||
        read_pairs(jumps, jump_back, 0, 100, 1, "jumps") < 0) {
        return -1;
    }
    op_resume = resume;
    op_extended_arg = extended_arg;
    return 0;
}

static int
read_varint(const unsigned char **p, const unsigned char *end)
{
    int v = 0, b;
    do {
        if (*p >= end) {
            return -1;
        }
        b = *(*p)++;
        v = (v << 6) | (b & 63);
    } while (b & 64);
    return v;
}

/* The handler covering a code-unit offset, as target and depth in one number;
 * 0 for none, -1 if the table cannot be read. */
static long
handler_at(PyCodeObject *code, int offset)
{
    PyObject *table = code->co_exceptiontable;
    if (table == NULL || !PyBytes_Check(table)) {
        return -1;
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(table);
    const unsigned char *end = p + PyBytes_GET_SIZE(table);
    while (p < end) {
        int start = read_varint(&p, end), size = read_varint(&p, end);
        int target = read_varint(&p, end), depth = read_varint(&p, end);
        if (start < 0 || size < 0 || target < 0 || depth < 0) {
            return -1;
        }
        if (offset < start) {
            return 0;   /* entries are sorted by start */
        }
        if (offset < start + size) {
            return ((long)target << 16 | (depth & 0xFFFF)) + 1;
        }
    }
    return 0;
}

/* The opcode and argument of the instruction at a code-unit offset, from the
 * bytecode as compiled (the frame's own is specialized or instrumented); -1 if
 * it cannot be read. May allocate. */
static int
instruction_at(PyCodeObject *code, int lasti, unsigned int *oparg)
{
    PyObject *bytes = PyCode_GetCode(code);
    if (bytes == NULL) {
        PyErr_Clear();
        return -1;
    }
    int op = -1;
    const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(bytes);
    int n = (int)(PyBytes_GET_SIZE(bytes) / 2);
    if (lasti >= 0 && lasti < n) {
        op = b[2 * lasti];
        *oparg = b[2 * lasti + 1];
        for (int j = lasti - 1, shift = 8; j >= 0 && b[2 * j] == op_extended_arg && shift < 32;
             j--, shift += 8) {
            *oparg |= (unsigned int)b[2 * j + 1] << shift;
        }
    }
    Py_DECREF(bytes);
    return op;
}

int
frame_interruptible(void *frame, PyCodeObject *code)
{
    if (op_resume < 0) {
        return 0;
    }
    int lasti = frame_lasti(frame, code);
    unsigned int oparg = 0;
    int op = instruction_at(code, lasti, &oparg);
    if (op < 0 || (op == op_resume && (oparg & 3) == 0)) {
        return 0;
    }
    long here = handler_at(code, lasti);
    if (here < 0) {
        return 0;
    }
    if (jump_back[op]) {
        int target = lasti + jump_back[op] - (int)oparg;
#if PY_VERSION_HEX < 0x030D0000
        /* checked after the jump: unwound from the instruction before its target,
         * whatever covers the jump itself (3.12's while-loop jump is uncovered, and
         * there the loop's own handler catches it) */
        return target > 0 && handler_at(code, target) == handler_at(code, target - 1);
#else
        return handler_at(code, target) == here;
#endif
    }
    return 1;
}

/* Is a frame at the entry of its function, called straight from the bytecode
 * of its previous frame? An exception raised there leaves it before any of its
 * code ran, and is raised in the caller at its call: as if raised there. */
int
frame_entered_from(void *callee, void *caller)
{
    if (op_resume < 0 || callee == NULL || older_frame(callee) != caller) {
        return 0;
    }
#if PY_VERSION_HEX < 0x030C0000
    if (((Frame *)callee)->is_entry) {
        return 0;   /* called from C (a signal handler, a finalizer) */
    }
#endif
    /* 3.12 and later put a frame of no code or of a shim's between C and Python */
    PyCodeObject *code = frame_code(callee);
    if (code == NULL || is_shim(code)) {
        return 0;
    }
    unsigned int oparg = 0;
    int op = instruction_at(code, frame_lasti(callee, code), &oparg);
    return op == op_resume && (oparg & 3) == 0;
}
