/*
 * Meter: the counters of one scope, and the C half of gotcha_async.Context.
 *
 * Entering and leaving are C methods because the interpreter checks for
 * signals and pending calls between a C call and the next bytecode: a
 * KeyboardInterrupt landing after the scope variable was set and before
 * __enter__ returned (or at the start of __exit__) would leave the scope
 * entered for good. Here the variable is set as the very last step of
 * __enter__/__aenter__ and reset as the very first of __exit__/__aexit__, and
 * the Python work (the cancel scope, delivery, exceptions) happens around it.
 */
#include "meter.h"

/* Before a scope's counters are read: what this thread's C libraries logged
 * without the GIL (native.c), then the hook's batch. */
void
settle_reads(void)
{
    if (native_on) {
        native_settle();
    }
    settle();
}


/* ------------------------------------------------------------------------ */
/* Life                                                                     */

static PyObject *
Meter_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)args;
    (void)kwds;
    Meter *m = (Meter *)type->tp_alloc(type, 0);
    if (m != NULL) {
        for (int r = 0; r < NRES; r++) {
            m->limit[r] = m->ceiling[r] = m->fence[r] = NONE;
        }
        m->scope = Py_NewRef(Py_None);
        m->waker = Py_NewRef(Py_None);
        m->done = Py_NewRef(Py_None);
        m->host = Py_NewRef(Py_None);
        m->anyio_outer = Py_NewRef(Py_None);
        m->deadline = Py_HUGE_VAL;
        m->frozen_broken = -1;
    }
    return (PyObject *)m;
}

static int
Meter_traverse(Meter *m, visitproc visit, void *arg)
{
    Py_VISIT(m->parent);
    Py_VISIT(m->token);
    Py_VISIT(m->scope);
    Py_VISIT(m->waker);
    Py_VISIT(m->done);
    Py_VISIT(m->entered_in);
    Py_VISIT(m->host);
    Py_VISIT(m->anyio_outer);
    return 0;
}

static int broken_now(const Meter *m, uint64_t *reached);
static int exceeded_now(const Meter *m);

/* An exited scope is frozen (DESIGN §2): what it reports stays what it was at
 * exit, and it never trips, stops or refuses again. Work still running from it
 * (a task started inside it that outlives it, a server's callback left in its
 * context) still walks through it to its ancestors: its thresholds go to none
 * instead of the hook learning to skip it, so the inline path is unchanged,
 * and its counters move unseen behind the snapshot. Held memory is the
 * exception: a block allocated in its context is held by its nearest live
 * ancestor (hold_block), so that frees keep crediting it exactly. */
void
freeze(Meter *m)
{
    settle_reads();   /* the batch was taken against the thresholds about to go */
    uint64_t v = 0;
    m->frozen_broken = broken_now(m, &v);
    m->frozen_reached = v;
    m->frozen_exceeded = (char)exceeded_now(m);
    memcpy(m->frozen_used, m->used, sizeof(m->used));
    m->frozen_peak = m->held != NULL ? m->held->peak : 0;
    for (int r = 0; r < NRES; r++) {
        m->limit[r] = m->ceiling[r] = m->fence[r] = NONE;
    }
    m->hard = 0;
    m->rearm = 0;
    if (m->held != NULL) {
        held_retune(m->held);
    }
}

/* An entered scope whose context is gone (a thread that ended inside it, an
 * abandoned coroutine): it no longer keeps the hook in the chain. */
static void
abandon(Meter *m)
{
    if (m->state == S_ENTERED) {
        m->state = S_EXITED;
        freeze(m);
        assert(active > 0);
        active--;
        forget_seen();   /* with no scope entered the cache must be empty (malloc_in) */
        step_aside_if_idle();
    }
}

/* Dropping the last reference to a long parent= chain would free it
 * recursively, one C stack frame per scope: parents released while a Meter
 * is being freed are queued here and released one after another instead. */
static Meter **orphans;
static size_t n_orphans, orphans_cap;
static int freeing;

void
release_parent(Meter *p)
{
    if (p == NULL) {
        return;
    }
    assert(p->children > 0);
    p->children--;
    if (Py_REFCNT(p) > 1) {
        Py_DECREF(p);   /* not freed now */
        return;
    }
    if (freeing) {
        if (n_orphans == orphans_cap) {
            size_t cap = orphans_cap ? orphans_cap * 2 : 64;
            Meter **more = realloc(orphans, cap * sizeof(Meter *));
            if (more == NULL) {
                Py_DECREF(p);   /* out of libc memory: free it right here */
                return;
            }
            orphans = more;
            orphans_cap = cap;
        }
        orphans[n_orphans++] = p;
        return;
    }
    freeing = 1;
    Py_DECREF(p);
    while (n_orphans > 0) {
        Py_DECREF(orphans[--n_orphans]);
    }
    freeing = 0;
}

static int
Meter_clear(Meter *m)
{
    settle();   /* a batch may be owed to the parent about to go */
    Meter *p = m->parent;
    m->parent = NULL;
    Py_CLEAR(m->scope);
    Py_CLEAR(m->waker);
    Py_CLEAR(m->done);
    Py_CLEAR(m->entered_in);
    Py_CLEAR(m->host);
    Py_CLEAR(m->anyio_outer);
    if (m->token != NULL) {
        Py_CLEAR(m->token);
        abandon(m);
    }
    release_parent(p);
    return 0;
}

static void
Meter_dealloc(Meter *m)
{
    PyObject_GC_UnTrack(m);
    assert(m->children == 0);   /* each child keeps its parent alive */
    forget_meter(m);   /* first: clearing can run code that allocates */
    Meter_clear(m);
    if (m->held != NULL) {
        m->held->owner = NULL;   /* its blocks may live on; the scope does not */
        held_decref(m->held);
        m->held = NULL;
        if (held_holder_ended()) {
            if (table_count > 0) {
                table_purge();
            }
            hook_fit_frees();
        }
    }
    /* a tuple of ints and a str: never in a cycle, so not tp_clear's */
    Py_CLEAR(m->limits_obj);
    Py_CLEAR(m->cancel_reason);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

/* rate: mean bytes between samples, 0 for every block exactly. A scope inside
 * another samples at least as often as its parent, and exactly if it does. */
static int
start_holding(Meter *m, uint64_t rate)
{
    if (m->held == NULL) {
        m->held = held_new();
        if (m->held == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        m->held->refcnt = 1;
        m->held->owner = m;
        m->held->base_rate = rate;
        if (held_holder_started()) {
            hook_fit_frees();   /* before this scope can hold a block */
        }
    }
    else if (rate < m->held->base_rate) {
        m->held->base_rate = rate;
    }
    settle();   /* a batch of the old path */
    held_retune(m->held);
    meter_path(m);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Setting up                                                               */

static int
limit_arg(PyObject *v, uint64_t *out)
{
    if (v == Py_None) {
        *out = NONE;
        return 0;
    }
    *out = PyLong_AsUnsignedLongLong(v);
    return *out == (uint64_t)-1 && PyErr_Occurred() ? -1 : 0;
}


/* _setup(parent, limits, ceilings, track, rate): limits and ceilings are
 * tuples of NRES validated ints or None, the sampling rate an int (Python's
 * work). */
static PyObject *
Meter_setup(Meter *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyTuple_Check(args[1]) || PyTuple_GET_SIZE(args[1]) != NRES ||
        !PyTuple_Check(args[2]) || PyTuple_GET_SIZE(args[2]) != NRES) {
        PyErr_SetString(PyExc_TypeError,
                        "_setup(parent, limits, ceilings, track, rate): two 4-tuples");
        return NULL;
    }
    settle();
    m->hard = 0;
    for (int r = 0; r < NRES; r++) {
        if (limit_arg(PyTuple_GET_ITEM(args[1], r), &m->limit[r]) < 0 ||
            limit_arg(PyTuple_GET_ITEM(args[2], r), &m->ceiling[r]) < 0) {
            return NULL;
        }
        if (m->ceiling[r] < m->limit[r]) {
            m->ceiling[r] = m->limit[r];
        }
        m->fence[r] = m->ceiling[r];
        m->hard |= m->ceiling[r] != NONE;
    }
    m->hard_chain = m->hard || (m->parent != NULL && m->parent->hard_chain);
    int track = PyObject_IsTrue(args[3]);
    if (track < 0) {
        return NULL;
    }
    unsigned long long rate = PyLong_AsUnsignedLongLong(args[4]);
    if (rate == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if ((track || m->limit[R_MEMORY] != NONE) && start_holding(m, rate) < 0) {
        return NULL;
    }
    if (args[0] != Py_None) {
        return Meter_set_parent(m, args[0]);
    }
    Py_RETURN_NONE;
}

/* _apply(recipe, parent, shield, fail): what Context's constructors and the
 * middlewares' scopes do once their arguments are checked, in one call. The
 * recipe is _context._recipe()'s tuple: (limits, has_ceiling, ceilings,
 * track_memory, rate, whether _setup is needed). */
static PyObject *
Meter_apply(Meter *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyTuple_Check(args[0]) || PyTuple_GET_SIZE(args[0]) != 6) {
        PyErr_SetString(PyExc_TypeError, "_apply(recipe, parent, shield, fail): a 6-tuple");
        return NULL;
    }
    PyObject *const *r = &PyTuple_GET_ITEM(args[0], 0);
    int shield = PyObject_IsTrue(args[2]), fail = PyObject_IsTrue(args[3]);
    int has_ceiling = PyObject_IsTrue(r[1]), setup = PyObject_IsTrue(r[5]);
    if (shield < 0 || fail < 0 || has_ceiling < 0 || setup < 0) {
        return NULL;
    }
    Py_XSETREF(m->limits_obj, Py_NewRef(r[0]));
    Py_XSETREF(m->cancel_reason, Py_NewRef(Py_None));
    m->has_ceiling = (char)has_ceiling;
    m->shield = (char)shield;
    m->fail = (char)fail;
    if (setup || args[1] != Py_None) {
        PyObject *setup_args[5] = {args[1], r[0], r[2], r[3], r[4]};
        return Meter_setup(m, setup_args, 5);
    }
    Py_RETURN_NONE;
}

/* Context._made(recipe, fail): a new scope of the class, with no parent and no
 * shield, set up from a checked recipe: the middlewares make every request's
 * scope this way, in one call. */
static PyObject *
Meter_made(PyTypeObject *cls, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_made(recipe, fail)");
        return NULL;
    }
    PyObject *m = Meter_new(cls, NULL, NULL);
    if (m == NULL) {
        return NULL;
    }
    ((Meter *)m)->request = 1;
    PyObject *apply_args[4] = {args[0], Py_None, Py_False, args[1]};
    PyObject *r = Meter_apply((Meter *)m, apply_args, 4);
    if (r == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    Py_DECREF(r);
    return m;
}

/* The parent m takes when it is set up or entered under outer: outer or its
 * nearest ancestor that has not exited (an exited scope is never a parent),
 * and for a request's scope, the nearest such scope outside every other
 * request's scope: a server may run the next request in a context an earlier
 * request left behind (uvicorn's keep-alive on asyncio's own loop, where
 * resume_reading() copies the request task's context into the reader), or
 * start it from inside a request still running (pipelining). A request scope
 * entered in this very context is the same request, one middleware inside
 * another. NULL: no parent. */
static Meter *
parent_for(const Meter *m, Meter *outer)
{
    if (!m->request) {
        while (outer != NULL && outer->state == S_EXITED) {
            outer = outer->parent;
        }
        return outer;
    }
    PyThreadState *ts = PyThreadState_Get();
    PyObject *here = ts->context;
    Meter *found = NULL;
    for (Meter *a = outer; a != NULL; a = a->parent) {
        if (a->request && (a->state != S_ENTERED || a->entered_in != here)) {
            found = NULL;   /* everything so far is inside another request */
        }
        else if (found == NULL && a->state != S_EXITED) {
            found = a;
        }
    }
    return found;
}

PyObject *
Meter_set_parent(Meter *m, PyObject *p)
{
    if (!PyObject_TypeCheck(p, &MeterType)) {
        PyErr_Format(PyExc_TypeError, "parent must be a Context, not %.100s",
                     Py_TYPE(p)->tp_name);
        return NULL;
    }
    if (m->parent != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this Context already has a parent");
        return NULL;
    }
    p = (PyObject *)parent_for(m, (Meter *)p);
    if (p == NULL) {
        Py_RETURN_NONE;
    }
    /* only a scope with children can be made its own ancestor: the walk is
     * skipped for the common case, so a long chain is built in linear time */
    for (Meter *a = (Meter *)p; m->children > 0 && a != NULL; a = a->parent) {
        if (a == m) {
            PyErr_SetString(PyExc_ValueError,
                            "parent would make this Context its own ancestor");
            return NULL;
        }
    }
    if (p == (PyObject *)m) {
        PyErr_SetString(PyExc_ValueError, "parent would make this Context its own ancestor");
        return NULL;
    }
    Meter *parent = (Meter *)p;
    settle();   /* charged to the chain as it was */
    /* inside a scope that tracks held memory, every scope does */
    if (parent->held != NULL) {
        if (start_holding(m, parent->held->base_rate) < 0) {
            return NULL;
        }
        m->held->parent = parent->held;
        parent->held->refcnt++;
        held_retune(m->held);   /* near an ancestor's limit, the finer rate */
    }
    Py_INCREF(parent);
    parent->children++;
    m->parent = parent;
    m->hard_chain = m->hard || parent->hard_chain;
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------ */
/* Reading and charging                                                     */

static PyObject *usage_type, *memory_type;

int
meter_set_types(PyObject *u, PyObject *m)
{
    Py_XSETREF(usage_type, Py_NewRef(u));
    Py_XSETREF(memory_type, Py_NewRef(m));
    return 0;
}

/* Built with the hook paused: reading the counters must not move them. */
static PyObject *
Meter_counts(Meter *m, PyObject *unused)
{
    (void)unused;
    if (usage_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "set_types() has not run");
        return NULL;
    }
    settle_reads();
    const uint64_t *u = m->state == S_EXITED ? m->frozen_used : m->used;
    pause_hook();
    PyObject *r = PyObject_CallFunction(usage_type, "KKK", (unsigned long long)u[0],
                                        (unsigned long long)u[1], (unsigned long long)u[2]);
    resume_hook();
    return r;
}

static PyObject *
Meter_memory(Meter *m, PyObject *unused)
{
    (void)unused;
    Held *h = m->held;
    if (h == NULL) {
        Py_RETURN_NONE;
    }
    if (native_on) {
        native_settle();   /* frees this thread's C libraries logged without the GIL */
    }
    if (memory_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "set_types() has not run");
        return NULL;
    }
    uint64_t current = h->current, peak = h->peak;
    if (m->state == S_EXITED) {
        /* frees still credit it; a scope nested in it that outlives it may still
         * charge its held counters (a block's credit must walk the chain its
         * charge did), never past what it reported at exit */
        peak = m->frozen_peak;
        current = current < peak ? current : peak;
    }
    pause_hook();
    PyObject *r = PyObject_CallFunction(memory_type, "KK", (unsigned long long)current,
                                        (unsigned long long)peak);
    resume_hook();
    return r;
}

static PyObject *
Meter_add(Meter *m, PyObject *args)
{
    unsigned long long b, o, c;
    if (!PyArg_ParseTuple(args, "KKK", &b, &o, &c)) {
        return NULL;
    }
    charge(m, b, o, c);
    Py_RETURN_NONE;
}

static PyObject *
Meter_reset(Meter *m, PyObject *unused)
{
    (void)unused;
    settle();
    memset(m->used, 0, sizeof(m->used));
    memset(m->reached, 0, sizeof(m->reached));
    for (int r = 0; r < NRES; r++) {
        m->fence[r] = m->ceiling[r];
    }
    m->tripped = 0;
    m->stops = 0;
    m->landed = 0;
    meter_path(m);
    m->rearm = 0;
    if (m->held != NULL) {
        m->held->peak = m->held->current;
    }
    memset(m->frozen_used, 0, sizeof(m->frozen_used));
    m->frozen_broken = -1;
    m->frozen_reached = 0;
    m->frozen_exceeded = 0;
    m->frozen_peak = m->held != NULL ? m->held->current : 0;
    Py_RETURN_NONE;
}

/* This scope's own broken limit: its resource (the first to break, then in
 * order) and what it reached, or -1; for an exited scope, as it was at exit. */
int
broken_resource(const Meter *m, uint64_t *reached)
{
    if (m->state == S_EXITED) {
        *reached = m->frozen_reached;
        return m->frozen_broken;
    }
    return broken_now(m, reached);
}

static int
broken_now(const Meter *m, uint64_t *reached)
{
    uint64_t now[NRES] = {m->used[0], m->used[1], m->used[2], m->held ? m->held->peak : 0};
    int first = m->tripped - 1;
    for (int r = -1; r < NRES; r++) {
        int k = r < 0 ? first : r;
        if (k < 0) {
            continue;
        }
        /* a refused allocation reports what it would have reached */
        uint64_t v = m->reached[k] > now[k] ? m->reached[k] : now[k];
        if (v > m->limit[k]) {
            *reached = v;
            return k;
        }
    }
    return -1;
}

static PyObject *
Meter_broken(Meter *m, PyObject *unused)
{
    (void)unused;
    uint64_t v;
    settle_reads();
    int k = broken_resource(m, &v);
    if (k < 0) {
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(iK)", k, (unsigned long long)v);
}

/* Whether this scope's code was stopped (refused or interrupted) */
static PyObject *
Meter_stopped(Meter *m, PyObject *unused)
{
    (void)unused;
    return PyBool_FromLong(m->stops > 0);
}

/* Its own limit or a live ancestor's broken, now */
static int
exceeded_now(const Meter *m)
{
    uint64_t v;
    for (const Meter *a = m; a != NULL; a = a->parent) {
        /* an exited ancestor's breach is not this scope's (it outlived it) */
        if ((a == m || a->state != S_EXITED) && broken_resource(a, &v) >= 0) {
            return 1;
        }
    }
    return 0;
}

/* In C because the ASGI middleware asks before every message it passes on. */
int
meter_exceeded(Meter *m)
{
    settle_reads();
    return m->state == S_EXITED ? m->frozen_exceeded : exceeded_now(m);
}

static PyObject *
Meter_exceeded(Meter *m, PyObject *unused)
{
    (void)unused;
    return PyBool_FromLong(meter_exceeded(m));
}

static PyObject *
Meter_held_blocks(Meter *m, PyObject *unused)
{
    (void)unused;
    return m->held == NULL ? PyList_New(0) : table_blocks_of(m->held);
}

static PyObject *
Meter_get_parent(Meter *m, void *unused)
{
    (void)unused;
    return Py_NewRef(m->parent ? (PyObject *)m->parent : Py_None);
}

static PyObject *
Meter_get_state(Meter *m, void *unused)
{
    (void)unused;
    return PyLong_FromLong(m->state);
}

static PyObject *
Meter_get_bytes(Meter *m, void *unused)
{
    (void)unused;
    settle_reads();
    return PyLong_FromUnsignedLongLong(
        (unsigned long long)(m->state == S_EXITED ? m->frozen_used : m->used)[R_BYTES]);
}

static PyObject *
Meter_get_quiet(Meter *m, void *unused)
{
    (void)unused;
    return PyBool_FromLong(m->quiet_machinery);
}

static int
Meter_set_quiet(Meter *m, PyObject *v, void *unused)
{
    (void)unused;
    int on = v == NULL ? 0 : PyObject_IsTrue(v);
    if (on < 0) {
        return -1;
    }
    settle();
    m->quiet_machinery = (char)on;
    meter_path(m);
    return 0;
}

static PyMethodDef Meter_methods[] = {
    {"_setup", (PyCFunction)(void (*)(void))Meter_setup, METH_FASTCALL,
     "_setup(parent, limits, ceilings, track, rate)"},
    {"_apply", (PyCFunction)(void (*)(void))Meter_apply, METH_FASTCALL,
     "_apply(recipe, parent, shield, fail)"},
    {"_made", (PyCFunction)(void (*)(void))Meter_made, METH_FASTCALL | METH_CLASS,
     "_made(recipe, fail): a new scope of this class set up from a checked recipe."},
    {"_set_parent", (PyCFunction)Meter_set_parent, METH_O,
     "Link to a parent scope; refuses cycles."},
    {"__enter__", (PyCFunction)Meter_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))Meter_exit, METH_FASTCALL, NULL},
    {"__aenter__", (PyCFunction)Meter_aenter, METH_NOARGS, NULL},
    {"__aexit__", (PyCFunction)(void (*)(void))Meter_aexit, METH_FASTCALL, NULL},
    {"_counts", (PyCFunction)Meter_counts, METH_NOARGS, "(bytes, objects, calls) charged."},
    {"_memory", (PyCFunction)Meter_memory, METH_NOARGS, "(current, peak) held, or None."},
    {"_add", (PyCFunction)Meter_add, METH_VARARGS, "Charge this scope and its ancestors."},
    {"_reset", (PyCFunction)Meter_reset, METH_NOARGS, "Zero this scope's own counters."},
    {"exceeded", (PyCFunction)Meter_exceeded, METH_NOARGS,
     "exceeded($self, /)\n--\n\n"
     "Whether this scope's own limit or any ancestor's has been exceeded."},
    {"_broken", (PyCFunction)Meter_broken, METH_NOARGS,
     "(resource, used) of this scope's own broken limit, or None."},
    {"_stopped", (PyCFunction)Meter_stopped, METH_NOARGS,
     "Whether this scope's code was refused or interrupted."},
    {"_held_blocks", (PyCFunction)Meter_held_blocks, METH_NOARGS,
     "[(size, traceback)] of the blocks this scope holds."},
    {NULL},
};

static PyMemberDef Meter_members[] = {
    {"_scope", Py_T_OBJECT_EX, offsetof(Meter, scope), 0, "The anyio cancel scope, or None."},
    {"_waker", Py_T_OBJECT_EX, offsetof(Meter, waker), 0, "Its loop or trio token, or None."},
    {"_done", Py_T_OBJECT_EX, offsetof(Meter, done), 0, "(Event, waker) once awaited, or None."},
    {"_deadline", Py_T_DOUBLE, offsetof(Meter, deadline), 0, "The deadline before entering."},
    {"_shield", Py_T_BOOL, offsetof(Meter, shield), 0, "The shield before entering."},
    {"_cancel_pending", Py_T_BOOL, offsetof(Meter, cancel_pending), 0,
     "Whether cancel() came before entering."},
    {"_host", Py_T_OBJECT_EX, offsetof(Meter, host), 0,
     "A lazy scope's task, while it is entered and has no cancel scope yet; else None."},
    {"_anyio_outer", Py_T_OBJECT_EX, offsetof(Meter, anyio_outer), 0,
     "A lazy scope's enclosing anyio cancel scope in its task at entry, or None."},
    {"_cancelling0", Py_T_PYSSIZET, offsetof(Meter, cancelling0), 0,
     "A lazy scope's task's cancelling() at entry."},
    {"_limits", Py_T_OBJECT_EX, offsetof(Meter, limits_obj), 0,
     "The (bytes, objects, calls, memory) limits."},
    {"_cancel_reason", Py_T_OBJECT_EX, offsetof(Meter, cancel_reason), 0,
     "The reason given to cancel(), or None."},
    {"_hard", Py_T_BOOL, offsetof(Meter, has_ceiling), 0, "Whether it has a ceiling."},
    {"_fail", Py_T_BOOL, offsetof(Meter, fail), 0,
     "Whether leaving it raises LimitExceeded (limit())."},
    {"_request", Py_T_BOOL, offsetof(Meter, request), Py_READONLY,
     "Whether it is a request's scope (made by _made)."},
    {NULL},
};

static PyGetSetDef Meter_getset[] = {
    {"parent", (getter)Meter_get_parent, NULL, "The enclosing Context, or None (read-only).", NULL},
    {"_state", (getter)Meter_get_state, NULL, "0 new, 1 entered, 2 exited.", NULL},
    {"_bytes", (getter)Meter_get_bytes, NULL,
     "Bytes charged so far: used()[0] without the tuple (a middleware's summary).", NULL},
    {"_quiet_machinery", (getter)Meter_get_quiet, (setter)Meter_set_quiet,
     "Charge nothing the event loop's own code allocates (its debug mode).", NULL},
    {NULL},
};

PyTypeObject MeterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gotcha_async._meter.Meter",
    .tp_basicsize = sizeof(Meter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C counters of one scope.",
    .tp_new = Meter_new,
    .tp_dealloc = (destructor)Meter_dealloc,
    .tp_traverse = (traverseproc)Meter_traverse,
    .tp_clear = (inquiry)Meter_clear,
    .tp_methods = Meter_methods,
    .tp_members = Meter_members,
    .tp_getset = Meter_getset,
};


int
meter_init_types(void)
{
    if (PyType_Ready(&MeterType) < 0 || ready_init() < 0 || enter_init() < 0) {
        return -1;
    }
    return 0;
}
