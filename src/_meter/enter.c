/*
 * Entering and leaving a scope: __enter__, __exit__ and their async twins,
 * with the cancel scope made without a Python frame in the common case
 * (asyncio through anyio, and trio), or lazily (asyncio: no cancel scope
 * until something asks for a cancellation). See meter.c for why these are C.
 */
#include "meter.h"

static PyObject *str_before_enter, *str_after_exit, *str_enter, *str_exit;

/* ------------------------------------------------------------------------ */
/* Entering and leaving                                                     */

/* Set by Python once the hook is installed and anyio's asyncio scope class is
 * known (never in asyncio's debug mode): asyncio's _get_running_loop, and that
 * class. */
static PyObject *fast_running_loop, *fast_scope_class;
/* For lazy scopes: asyncio's current_task, and the dict under anyio's
 * _task_states (a WeakKeyDictionary: weak references to tasks -> TaskState).
 * NULL: every fast scope makes its cancel scope at entry. On 3.11, where
 * current_task is Python's `_current_tasks.get(loop)`, the dict itself: a
 * lookup instead of a frame at every entry. */
static PyObject *fast_current_task, *fast_task_states;
static PyObject *str_cancelling, *str_cancel_scope;

int
meter_set_fast(PyObject *running_loop, PyObject *scope_class, PyObject *current_task,
               PyObject *task_states)
{
    Py_XSETREF(fast_running_loop, Py_XNewRef(running_loop));
    Py_XSETREF(fast_scope_class, Py_XNewRef(scope_class));
    Py_XSETREF(fast_current_task, Py_XNewRef(current_task));
    Py_XSETREF(fast_task_states, Py_XNewRef(task_states));
    return 0;
}

/* On trio: trio's run context (a thread-local: "task" is set while a task
 * runs, "runner" while trio runs), and trio.CancelScope itself (anyio's trio
 * scope only forwards to one). */
static PyObject *trio_run_context, *trio_scope_class;
static PyObject *str_task, *str_runner, *str_trio_token, *str_current_trio_token;

int
meter_set_fast_trio(PyObject *run_context, PyObject *scope_class)
{
    Py_XSETREF(trio_run_context, Py_XNewRef(run_context));
    Py_XSETREF(trio_scope_class, Py_XNewRef(scope_class));
    return 0;
}

/* The running trio's token if a trio task is running here (new reference),
 * NULL without an error if not, NULL with one on failure. */
static PyObject *
trio_waker(void)
{
    PyObject *task = PyObject_GetAttr(trio_run_context, str_task);
    if (task == NULL) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
        }
        return NULL;
    }
    Py_DECREF(task);
    PyObject *runner = PyObject_GetAttr(trio_run_context, str_runner);
    if (runner == NULL) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
        }
        return NULL;
    }
    PyObject *token = PyObject_GetAttr(runner, str_trio_token);
    if (token == Py_None) {   /* made on first use */
        Py_SETREF(token, PyObject_CallMethodNoArgs(runner, str_current_trio_token));
    }
    Py_DECREF(runner);
    return token;
}

/* Entering lazily: note the host task, the anyio scope innermost in it now,
 * and its cancelling() count; Context._materialize() makes the anyio scope
 * from these, where anyio would have put it, when a cancellation is asked
 * for. 1 done, 0 for the eager path (no task: a loop callback), -1 error. */
static int
lazy_enter(Meter *m, PyObject *loop)
{
    PyObject *task;
    if (PyDict_CheckExact(fast_current_task)) {
        task = PyDict_GetItemWithError(fast_current_task, loop);   /* borrowed */
        if (task == NULL && PyErr_Occurred()) {
            return -1;
        }
        task = Py_NewRef(task != NULL ? task : Py_None);
    }
    else {
        task = PyObject_CallOneArg(fast_current_task, loop);
        if (task == NULL) {
            return -1;
        }
    }
    if (task == Py_None) {
        Py_DECREF(task);
        return 0;
    }
    PyObject *n = PyObject_CallMethodNoArgs(task, str_cancelling);
    if (n == NULL) {
        Py_DECREF(task);
        return -1;
    }
    Py_ssize_t cancelling = PyLong_AsSsize_t(n);
    Py_DECREF(n);
    if (cancelling == -1 && PyErr_Occurred()) {
        Py_DECREF(task);
        return -1;
    }
    PyObject *outer = Py_NewRef(Py_None);
    if (PyDict_GET_SIZE(fast_task_states) > 0) {
        /* a weak reference hashes and compares as its referent */
        PyObject *ref = PyWeakref_NewRef(task, NULL);
        if (ref == NULL) {
            Py_DECREF(task);
            Py_DECREF(outer);
            return -1;
        }
        PyObject *state = PyDict_GetItemWithError(fast_task_states, ref);   /* borrowed */
        Py_DECREF(ref);
        if (state == NULL && PyErr_Occurred()) {
            Py_DECREF(task);
            Py_DECREF(outer);
            return -1;
        }
        if (state != NULL) {
            Py_INCREF(state);
            PyObject *s = PyObject_GetAttr(state, str_cancel_scope);
            Py_DECREF(state);
            if (s == NULL) {
                Py_DECREF(task);
                Py_DECREF(outer);
                return -1;
            }
            Py_SETREF(outer, s);
        }
    }
    Py_SETREF(m->host, task);
    Py_SETREF(m->anyio_outer, outer);
    m->cancelling0 = cancelling;
    return 1;
}

static void
lazy_clear(Meter *m)
{
    if (m->host != Py_None) {
        Py_SETREF(m->host, Py_NewRef(Py_None));
    }
    if (m->anyio_outer != Py_None) {
        Py_SETREF(m->anyio_outer, Py_NewRef(Py_None));
    }
}

/* Context._before_enter for its commonest case, without a Python frame: in a
 * running asyncio loop, no deadline, no shield, no cancel asked for before
 * entering. Returns 1 with *scope set, 0 for the Python path, -1 on error. */
static int
fast_before_enter(Meter *m, PyObject **scope)
{
    if ((fast_scope_class == NULL && trio_scope_class == NULL) || !installed || m->shield ||
        m->cancel_pending || m->deadline != Py_HUGE_VAL) {
        return 0;
    }
    /* waker: the running asyncio loop, or trio's token */
    PyObject *waker = NULL;
    int on_trio = 0;
    if (fast_scope_class != NULL) {
        waker = PyObject_CallNoArgs(fast_running_loop);
        if (waker == NULL) {
            return -1;
        }
        if (waker == Py_None) {
            Py_CLEAR(waker);
        }
    }
    if (waker == NULL) {
        if (trio_scope_class == NULL) {
            return 0;
        }
        waker = trio_waker();
        if (waker == NULL) {
            return PyErr_Occurred() ? -1 : 0;
        }
        on_trio = 1;
    }
    if (m->parent == NULL) {
        PyObject *outer;
        if (PyContextVar_Get(scope_var, NULL, &outer) < 0) {
            Py_DECREF(waker);
            return -1;
        }
        if (outer != NULL) {
            PyObject *r = Meter_set_parent(m, outer);
            Py_DECREF(outer);
            if (r == NULL) {
                Py_DECREF(waker);
                return -1;
            }
            Py_DECREF(r);
        }
    }
    if (!on_trio && fast_current_task != NULL) {
        int lazy = lazy_enter(m, waker);
        if (lazy < 0) {
            Py_DECREF(waker);
            return -1;
        }
        if (lazy > 0) {
            Py_SETREF(m->waker, waker);
            *scope = Py_NewRef(Py_None);
            return 1;
        }
    }
    PyObject *s = PyObject_CallNoArgs(on_trio ? trio_scope_class : fast_scope_class);
    if (s == NULL) {
        Py_DECREF(waker);
        return -1;
    }
    Py_SETREF(m->waker, waker);
    Py_SETREF(m->scope, Py_NewRef(s));
    *scope = s;
    return 1;
}

/* m's parent exited between m's set-up and its entry: m takes the parent's
 * nearest live ancestor instead. */
static int
relink(Meter *m)
{
    Meter *old = m->parent;
    settle();
    if (m->held != NULL && m->held->parent != NULL) {
        held_decref(m->held->parent);
        m->held->parent = NULL;
    }
    m->parent = NULL;
    m->hard_chain = m->hard;
    PyObject *r = Meter_set_parent(m, (PyObject *)old);
    release_parent(old);   /* after: the walk went through it */
    if (r == NULL) {
        return -1;
    }
    Py_DECREF(r);
    if (m->held != NULL) {
        held_retune(m->held);
    }
    return 0;
}

static int
enter(Meter *m)
{
    ASSERT_GIL();
    if (m->state != S_NEW) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this Context has already been entered; a Context can be used only once");
        return -1;
    }
    if (m->parent != NULL && m->parent->state == S_EXITED && relink(m) < 0) {
        return -1;
    }
    /* the cancel scope, made and entered before the scope is current: nothing
     * of it is the body's (and the hook is installed in Python on first use) */
    PyObject *scope = NULL;
    int fast = fast_before_enter(m, &scope);
    if (fast < 0) {
        return -1;
    }
    if (fast == 0) {
        scope = PyObject_CallMethodNoArgs((PyObject *)m, str_before_enter);
    }
    if (scope == NULL) {
        return -1;
    }
    if (!installed) {
        Py_DECREF(scope);
        PyErr_SetString(PyExc_RuntimeError, "gotcha_async._meter.install() has not run");
        return -1;
    }
    if (scope != Py_None) {
        PyObject *r = PyObject_CallMethodNoArgs(scope, str_enter);
        if (r == NULL) {
            Py_DECREF(scope);
            return -1;
        }
        Py_DECREF(r);
    }
    active++;
    verify_chain();
    pause_hook();
    PyObject *token = PyContextVar_Set(scope_var, (PyObject *)m);
    if (token != NULL) {
        numpy_adopt();   /* numpy's arrays made in this context are charged (numpy.c) */
    }
    resume_hook();
    forget_seen();
    if (token != NULL) {
        seen_entered(m);
    }
    if (token == NULL) {
        lazy_clear(m);
        active--;
        step_aside_if_idle();
        if (scope != Py_None) {
            PyObject *t, *v, *tb;
            PyErr_Fetch(&t, &v, &tb);
            PyObject *r = PyObject_CallMethodObjArgs(scope, str_exit, Py_None, Py_None,
                                                     Py_None, NULL);
            if (r == NULL) {
                PyErr_WriteUnraisable(scope);
            }
            Py_XDECREF(r);
            PyErr_Restore(t, v, tb);
        }
        Py_DECREF(scope);
        return -1;
    }
    Py_DECREF(scope);
    m->token = token;
    m->state = S_ENTERED;
    if (m->request) {
        m->entered_in = Py_XNewRef(PyThreadState_Get()->context);
    }
    return 0;
}

static int
leave(Meter *m)
{
    if (m->state != S_ENTERED) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this Context is not active: exit without a matching enter");
        return -1;
    }
    /* what this thread's C libraries logged without the GIL since it last held
     * it is this scope's: charged and held before the scope freezes */
    if (native_on) {
        native_settle();
    }
    pause_hook();
    int r = PyContextVar_Reset(scope_var, m->token);
    resume_hook();
    forget_seen();
    if (r < 0) {
        if (PyErr_ExceptionMatches(PyExc_ValueError)) {
            PyErr_SetString(PyExc_RuntimeError,
                            "a Context must be exited in the task (the contextvars context) "
                            "that entered it");
        }
        return -1;
    }
    Py_CLEAR(m->token);
    Py_CLEAR(m->entered_in);
    m->state = S_EXITED;
    freeze(m);
    assert(active > 0);
    active--;
    step_aside_if_idle();
    if (active > 0) {
        verify_chain();   /* a swapper that ran inside this scope: the outer ones go on */
    }
    return 0;
}

static PyObject *
after_exit(Meter *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "__exit__ takes 3 arguments");
        return NULL;
    }
    uint64_t reached;
    if ((fast_scope_class != NULL || trio_scope_class != NULL) && m->done == Py_None &&
        m->scope != NULL &&
        broken_resource(m, &reached) < 0) {
        /* Context._after_exit when no limit of this scope broke and nobody
         * awaits it: the cancel scope's exit is all there is */
        if (m->scope == Py_None) {
            Py_RETURN_FALSE;
        }
        PyObject *call[4] = {m->scope, args[0], args[1], args[2]};
        PyObject *r = PyObject_VectorcallMethod(str_exit, call,
                                                4 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        if (r == NULL) {
            return NULL;
        }
        int swallowed = PyObject_IsTrue(r);
        Py_DECREF(r);
        if (swallowed < 0) {
            return NULL;
        }
        if (m->done != Py_None) {   /* awaited from a callback the exit ran */
            PyObject *d = PyObject_CallMethod((PyObject *)m, "_signal_done", NULL);
            if (d == NULL) {
                return NULL;
            }
            Py_DECREF(d);
        }
        return PyBool_FromLong(swallowed);
    }
    PyObject *call[4] = {(PyObject *)m, args[0], args[1], args[2]};
    return PyObject_VectorcallMethod(str_after_exit, call, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                     NULL);
}

PyObject *
Meter_enter(Meter *m, PyObject *unused)
{
    (void)unused;
    return enter(m) < 0 ? NULL : Py_NewRef(m);
}

PyObject *
Meter_exit(Meter *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs == 3 && leave(m) < 0) {
        return NULL;
    }
    PyObject *r = after_exit(m, args, nargs);
    lazy_clear(m);
    return r;
}

/* The awaitable is made before the scope is current: awaiting it allocates
 * nothing, so an empty scope stays charged (0, 0, 0). */
PyObject *
Meter_aenter(Meter *m, PyObject *unused)
{
    (void)unused;
    PyObject *ready = ready_new((PyObject *)m);
    if (ready == NULL) {
        return NULL;
    }
    if (enter(m) < 0) {
        Py_DECREF(ready);
        return NULL;
    }
    return ready;
}

PyObject *
Meter_aexit(Meter *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs == 3 && leave(m) < 0) {
        return NULL;
    }
    PyObject *r = after_exit(m, args, nargs);
    lazy_clear(m);
    if (r == NULL) {
        return NULL;
    }
    int swallow = PyObject_IsTrue(r);
    Py_DECREF(r);
    if (swallow < 0) {
        return NULL;
    }
    return ready_result(swallow);
}


int
enter_init(void)
{
    str_before_enter = PyUnicode_InternFromString("_before_enter");
    str_after_exit = PyUnicode_InternFromString("_after_exit");
    str_enter = PyUnicode_InternFromString("__enter__");
    str_exit = PyUnicode_InternFromString("__exit__");
    str_cancelling = PyUnicode_InternFromString("cancelling");
    str_cancel_scope = PyUnicode_InternFromString("cancel_scope");
    str_task = PyUnicode_InternFromString("task");
    str_runner = PyUnicode_InternFromString("runner");
    str_trio_token = PyUnicode_InternFromString("trio_token");
    str_current_trio_token = PyUnicode_InternFromString("current_trio_token");
    if (!str_before_enter || !str_after_exit || !str_enter || !str_exit || !str_cancelling ||
        !str_cancel_scope || !str_task || !str_runner || !str_trio_token ||
        !str_current_trio_token) {
        return -1;
    }
    return 0;
}
