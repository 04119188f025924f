/*
 * How a broken limit reaches Python, from inside an allocation that may not
 * call Python.
 *
 * Trips: a scope past a soft limit is queued; the queue is handed to Python
 * (deliver_cb, which cancels the scope) at a safe point. In the main thread
 * that is a pending call, right after the allocation: the cancellation lands
 * at the task's very next checkpoint. Only the main thread runs pending
 * calls, and it may be blocked in C (a loop in a worker thread, join()), so a
 * trip in any other thread also wakes a delivery thread of ours: whichever of
 * the two gets the GIL first delivers. (Waiting for the delivery thread alone,
 * a worker's interrupt lost the GIL to a busy main thread time after time.)
 *
 * Interrupts: a hard scope past its ceiling must stop even if its code never
 * awaits. Its thread gets interrupt_type (a MemoryError) raised at a bytecode
 * boundary, the way Ctrl-C is delivered -- but only if, at that boundary, the
 * scope is still current there and the innermost frame is the very activation
 * of user code whose allocation asked for it (its address, its code, and not
 * a function's entry: the next call at the same depth reuses the address),
 * at an instruction whose exception handler is the one of the code around it
 * (frame_interruptible). Never in the event loop's machinery, ours, a frame
 * that runs no code, or one running on top of it (a signal handler).
 * Otherwise the scope is re-armed and the next allocation past its limit asks
 * again.
 *
 * The main thread raises it from its own pending call. Up to 3.12 another
 * thread gets it through PyThreadState_SetAsyncExc from the main thread's
 * pending call or the delivery thread, whichever runs first: either holds the
 * GIL while it looks, and the target, stopped in its eval breaker, raises it
 * right where it stood when it takes the GIL back. From 3.13 the eval breaker
 * reads its bits before it drops the GIL, so an async exception set meanwhile
 * is raised at the thread's *next* check, in whatever frame runs then (our
 * own __exit__, a loop's callback, the callback that cancels the scope). There
 * the thread raises its interrupt itself, from a pending call of the
 * interpreter's queue (any thread may run those: the first to run it that is
 * not the target re-arms the scope instead), after the same checks, made in
 * the very thread and at the very moment it raises.
 */
#include "_meter.h"

static PyObject *deliver_cb;       /* Python callable taking a tripped scope */
static PyObject *interrupt_type;   /* what an interrupt raises (a MemoryError) */
static unsigned long main_ident;

/* (address of the scope, address of the context): set in the context of the
 * code a scope's stop lands in, as it is raised, so that a task the stopped
 * code starts from then on (its close behind asyncio.shield) is known for its
 * cleanup, while a sibling started before the stop is not, nor the stopped
 * code itself if it swallows the stop and goes on (its context is the one
 * named). Addresses: a context kept after its request keeps nothing alive. */
static PyObject *stopped_var;

int
deliver_setup(PyObject *cb, PyObject *itype, unsigned long ident)
{
    if (stopped_var == NULL) {
        stopped_var = PyContextVar_New("gotcha_async stopped", NULL);
        if (stopped_var == NULL) {
            return -1;
        }
    }
    Py_XSETREF(deliver_cb, Py_NewRef(cb));
    Py_XSETREF(interrupt_type, Py_NewRef(itype));
    main_ident = ident;
    return 0;
}

/* Was m (or a scope inside it) stopped in code that started the running
 * code since? From the hook: a lookup allocates nothing. */
int
started_by_stopped(Meter *m)
{
    PyThreadState *ts = tstate_unchecked();
    PyObject *v = NULL;
    if (stopped_var == NULL || ts == NULL ||
        PyContextVar_Get(stopped_var, NULL, &v) < 0 || v == NULL) {
        return 0;
    }
    Py_DECREF(v);   /* the context holds a reference */
    if (!PyTuple_CheckExact(v) || PyTuple_GET_SIZE(v) != 2 ||
        PyLong_AsVoidPtr(PyTuple_GET_ITEM(v, 1)) == (void *)ts->context) {
        return 0;
    }
    /* the stopped scope is known by its address only: found among the running
     * code's live scopes, at or inside m */
    void *stopped = PyLong_AsVoidPtr(PyTuple_GET_ITEM(v, 0));
    int seen = 0;
    for (Meter *c = current_meter(); c != NULL; c = c->parent) {
        seen |= (void *)c == stopped;
        if (c == m) {
            return seen;
        }
    }
    return 0;
}

/* m's stop is being raised in the running code: say so in its context (with
 * the hook paused; a failure only costs the cleanup its room). */
static void
mark_stopped(Meter *m)
{
    PyObject *ctx = PyContext_CopyCurrent();   /* the current one made if none */
    PyObject *v = ctx == NULL ? NULL
                              : Py_BuildValue("(NN)", PyLong_FromVoidPtr(m),
                                              PyLong_FromVoidPtr(PyThreadState_Get()->context));
    Py_XDECREF(ctx);
    PyObject *token = v == NULL ? NULL : PyContextVar_Set(stopped_var, v);
    if (token == NULL) {
        PyErr_Clear();
    }
    Py_XDECREF(token);
    Py_XDECREF(v);
}

static Meter *queue;           /* tripped scopes waiting for delivery */
static int scheduled;          /* a pending call is on its way */

/* The delivery thread sleeps on a lock that is released once per wake-up:
 * wake_posted says a release is outstanding. (On 3.13 and later the lock is a
 * mutex; a second release without an acquire is a fatal error.) */
static PyThread_type_lock wake;
static int wake_posted;

/* An interrupt is raised only in the frame whose allocation asked for it:
 * never in a signal handler, finalizer or callback that runs on top of it
 * (there it would replace, say, the KeyboardInterrupt the handler raises). */
typedef struct { unsigned long ident; Meter *m; void *frame; PyCodeObject *code; } Request;
#define MAX_REQUESTS 64
static Request requests[MAX_REQUESTS];
static int n_requests;

/* How often the delivery thread looks at the allocator chains: while scopes
 * are entered (an allocator put back under an open scope goes uncounted for
 * at most this long), and while none is (to see the first one come). */
#define POLL_US 20000
#define IDLE_US 1000000

static int deliver_pending(void *);
static void interrupt_remote(void);

/* Set while a delivery looks at the requests: settling a scope's counters there
 * can ask for another interrupt (past its last grace every allocation does),
 * which would schedule the very call that is running, for ever. */
static int delivering;

#if PY_VERSION_HEX >= 0x030D0000
/* exported (for _testinternalcapi) on 3.13 to 3.15; a call with flags 0 is
 * run by whichever thread of the interpreter checks its eval breaker first */
PyAPI_FUNC(int) _PyEval_AddPendingCall(PyInterpreterState *, int (*)(void *), void *, int);
static int interrupt_pending(void *);
static int any_scheduled;   /* an interrupt_pending call is queued */

static void
schedule_any(void)
{
    if (!any_scheduled && _PyEval_AddPendingCall(main_interp, interrupt_pending, NULL, 0) == 0) {
        any_scheduled = 1;
    }
}
#endif

static void
schedule_main(void)
{
    if (!scheduled && Py_AddPendingCall(deliver_pending, NULL) == 0) {
        scheduled = 1;
    }
}

static void
wake_delivery(void)
{
    if (wake != NULL && !wake_posted) {
        wake_posted = 1;
        PyThread_release_lock(wake);   /* no allocation, no Python */
    }
}

static void
schedule_for(unsigned long ident)
{
    if (ident != main_ident) {
        wake_delivery();
    }
    schedule_main();
}

void
trip(Meter *m, int resource)
{
    ASSERT_GIL();
    assert(resource >= 0 && resource < NRES);
    if (m->tripped) {
        return;
    }
    m->tripped = resource + 1;
    meter_path(m);
    if (!m->queued) {
        m->queued = 1;
        Py_INCREF(m);
        m->next_queued = queue;
        queue = m;
    }
    schedule_for(PyThread_get_thread_ident());
}

static void
schedule_interrupt(unsigned long ident)
{
#if PY_VERSION_HEX >= 0x030D0000
    if (ident != main_ident) {
        schedule_any();
        return;
    }
#endif
    schedule_for(ident);
}

void
request_interrupt(Meter *m)
{
    if (delivering) {
        m->rearm = 1;   /* asked again by its next allocation, once this delivery is over */
        return;
    }
    unsigned long ident = PyThread_get_thread_ident();
    PyThreadState *ts = tstate_unchecked();
    void *frame = ts == NULL ? NULL : top_frame(ts);
    PyCodeObject *code = frame == NULL ? NULL : frame_code(frame);
    m->rearm = 0;
    for (int i = 0; i < n_requests; i++) {
        if (requests[i].ident == ident && requests[i].m == m) {
            requests[i].frame = frame;
            requests[i].code = code;
            schedule_interrupt(ident);
            return;
        }
    }
    if (n_requests == MAX_REQUESTS) {
        settle();   /* a batch would not see the stop owed */
        m->rearm = 1;   /* asked again at its next allocation */
        return;
    }
    Py_INCREF(m);
    requests[n_requests].ident = ident;
    requests[n_requests].m = m;
    requests[n_requests].frame = frame;
    requests[n_requests].code = code;
    n_requests++;
    schedule_interrupt(ident);
}

static Meter *
take_request(int i)
{
    Meter *m = requests[i].m;
    requests[i] = requests[--n_requests];
    return m;
}

/* Hand the queue to Python. A callback that fails with an Exception is
 * reported and the next one runs; one that fails with anything else (Ctrl-C,
 * SystemExit, raised into the callback by a signal handler) puts its scope
 * back and, where can_raise, is passed on to the interrupted code: -1. */
static int
run_queue(int can_raise)
{
    int status = 0;
    pause_hook();
    while (queue != NULL) {
        Meter *m = queue;
        queue = m->next_queued;
        m->next_queued = NULL;
        m->queued = 0;
        PyObject *r = PyObject_CallOneArg(deliver_cb, (PyObject *)m);
        if (r != NULL) {
            Py_DECREF(r);
            Py_DECREF(m);
            continue;
        }
        if (can_raise && !PyErr_ExceptionMatches(PyExc_Exception)) {
            m->queued = 1;        /* the queue's reference, handed back */
            m->next_queued = queue;
            queue = m;
            status = -1;
            break;
        }
        PyErr_WriteUnraisable(deliver_cb);
        Py_DECREF(m);
    }
    resume_hook();
    if (status < 0) {
        schedule_main();
    }
    return status;
}

/* Is the request's frame the innermost one of thread t, still at a point
 * where its own code would catch what is raised there? (With the hook paused:
 * reading the bytecode may allocate.) */
static int
aimed_here(PyThreadState *t, const Request *r)
{
    void *f = r->frame, *top = top_frame(t);
    if (f == NULL || r->code == NULL || top == NULL) {
        return 0;
    }
    /* f is read only once it is known to be live: the top frame or its caller */
    if (top == f) {
        return frame_code(f) == r->code && frame_is_user(t) && frame_interruptible(f, r->code);
    }
#if PY_VERSION_HEX >= 0x030D0000
    /* a function it calls, at its entry: raised there, it is raised at f's call
     * (a loop whose only other check is a closing jump the handler does not cover).
     * Not up to 3.12, where that jump is judged by the offset unwound from, and where
     * a worker's exception, made in the worker with the hook running, can ask for
     * the next interrupt: a stale request then landed in the except block of the
     * first, at the entry of the first function it called (2 runs in 20 of
     * interrupt_aim.py threads 8 40 while, 3.11) */
    return older_frame(top) == f && frame_code(f) == r->code && frame_is_user_code(f) &&
           frames_stoppable(t) && frame_entered_from(top, f) &&
           frame_interruptible(f, r->code);
#else
    return 0;
#endif
}

/* The calling thread's interrupts, from a pending call it runs: raised here
 * and now, or the scope re-armed. */
static int
interrupt_here(void)
{
    unsigned long me = PyThread_get_thread_ident();
    PyThreadState *ts = PyThreadState_Get();
    int raised = 0;
    pause_hook();
    delivering++;
    for (int i = 0; i < n_requests;) {
        if (requests[i].ident != me) {
            i++;
            continue;
        }
        Request r = requests[i];
        Meter *m = take_request(i);
        int go = !raised && m->state == S_ENTERED && interrupt_type != NULL &&
                 !PyErr_Occurred() && aimed_here(ts, &r) &&
                 !frames_importing(ts) && in_scope_of(current_meter(), m);
        if (!go && m->state == S_ENTERED) {
            settle();
            m->rearm = 1;
        }
        if (go) {
            stop_landed(m);
            mark_stopped(m);
        }
        Py_DECREF(m);
        if (go) {
            /* made with the hook paused: the exception is not the scope's work, and
             * charging it would ask for the next interrupt */
            PyErr_SetNone(interrupt_type);
            raised = 1;
        }
    }
    delivering--;
    resume_hook();
    return raised ? -1 : 0;
}

static int
deliver_pending(void *unused)
{
    (void)unused;
    scheduled = 0;
    if (deliver_cb == NULL) {
        return 0;
    }
    if (run_queue(1) < 0) {
        return -1;
    }
    pause_hook();
    interrupt_remote();
    resume_hook();
    return interrupt_here();
}

int
deliver_now(void)
{
    return deliver_cb == NULL ? 0 : run_queue(1);
}

#if PY_VERSION_HEX < 0x030D0000
static PyThreadState *
find_thread(unsigned long ident)
{
    for (PyThreadState *t = PyInterpreterState_ThreadHead(main_interp); t != NULL;
         t = PyThreadState_Next(t)) {
        if (t->thread_id == ident) {
            return t;
        }
    }
    return NULL;
}

/* Is m, or a scope inside it, current in that thread's context? */
static int
context_in_scope(PyObject *context, Meter *m)
{
    if (context == NULL || !PyContext_CheckExact(context)) {
        return 0;
    }
    PyObject *v = PyObject_GetItem(context, scope_var);
    if (v == NULL) {
        PyErr_Clear();
        return 0;
    }
    int r = PyObject_TypeCheck(v, &MeterType) && in_scope_of((Meter *)v, m);
    Py_DECREF(v);
    return r;
}

#endif

/* Other threads' interrupts, from the delivery thread or the main thread's
 * pending call (GIL held, hook paused). From 3.13 each thread raises its own
 * (interrupt_pending). */
static void
interrupt_remote(void)
{
#if PY_VERSION_HEX < 0x030D0000
    delivering++;
    for (int i = 0; i < n_requests;) {
        unsigned long ident = requests[i].ident;
        if (ident == main_ident) {
            i++;
            continue;
        }
        Request r = requests[i];
        Meter *m = take_request(i);
        PyThreadState *t = find_thread(ident);
        int go = t != NULL && m->state == S_ENTERED && interrupt_type != NULL &&
                 t->async_exc == NULL && aimed_here(t, &r) &&
                 !frames_importing(t) && context_in_scope(t->context, m);
        if (go) {
            stop_landed(m);
            PyThreadState_SetAsyncExc(ident, interrupt_type);
        }
        else if (m->state == S_ENTERED) {
            settle();
            m->rearm = 1;
        }
        Py_DECREF(m);
    }
    delivering--;
#endif
}

#if PY_VERSION_HEX >= 0x030D0000
/* Run by the first thread of the interpreter that checks its eval breaker:
 * usually the one that asked (the call is flagged on the thread that queues
 * it, from its own allocation), which raises its interrupt if it is still
 * where it asked. The requests of other threads it finds are re-armed: each
 * of those asks again, and queues a call again, at its next allocation. */
static int
interrupt_pending(void *unused)
{
    (void)unused;
    any_scheduled = 0;
    unsigned long me = PyThread_get_thread_ident();
    pause_hook();
    delivering++;
    for (int i = 0; i < n_requests;) {
        unsigned long ident = requests[i].ident;
        if (ident == me || ident == main_ident) {
            i++;
            continue;
        }
        Meter *m = take_request(i);
        if (m->state == S_ENTERED) {
            settle();
            m->rearm = 1;
        }
        Py_DECREF(m);
    }
    delivering--;
    resume_hook();
    return me == main_ident ? 0 : interrupt_here();
}
#endif

/* The delivery thread's body, called from Python in a thread started with
 * _thread.start_new_thread: CPython makes that thread's state in the starting
 * thread, under the GIL, and it keeps it for its whole life. A thread state
 * made here instead (PyGILState_Ensure) would be allocated without the GIL,
 * racing tracemalloc.stop() in another thread (CPython gh-128679). Never
 * returns while the process lives. */
PyObject *
delivery_loop(void)
{
    PyThread_type_lock lock = wake;
    if (lock == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the delivery lock is not set up");
        return NULL;
    }
    for (;;) {
        PyLockStatus got;
        Py_BEGIN_ALLOW_THREADS
        /* between wake-ups, a look at the allocator chains (chain_look) */
        do {
            got = PyThread_acquire_lock_timed(lock, active > 0 ? POLL_US : IDLE_US, 0);
            native_poll();   /* objects loaded since: patched (native.c) */
        } while (got != PY_LOCK_ACQUIRED && !(active > 0 && chain_moved()));
        Py_END_ALLOW_THREADS
        if (lock != wake) {
            Py_RETURN_NONE;   /* replaced after a fork: a new thread serves the new lock */
        }
        if (got != PY_LOCK_ACQUIRED) {
            chain_look();
            continue;
        }
        wake_posted = 0;
        pause_hook();
        if (deliver_cb != NULL) {
            run_queue(0);
        }
        interrupt_remote();
        resume_hook();
    }
}

/* The lock the delivery thread waits on, held: each wake-up releases it once. */
int
start_delivery(void)
{
    PyThread_type_lock lock = PyThread_allocate_lock();
    if (lock == NULL) {
        return -1;
    }
    PyThread_acquire_lock(lock, WAIT_LOCK);
    wake = lock;
    wake_posted = 0;
    return 0;
}

/* In a forked child only the forking thread survives, and it is the child's
 * main thread: requests of the others are void, the old lock may be in any
 * state (it is left, not freed), and a pending call of the parent's may or
 * may not have come along. */
void
delivery_after_fork(void)
{
    main_ident = PyThread_get_thread_ident();
    for (int i = 0; i < n_requests;) {
        if (requests[i].ident != main_ident) {
            Py_DECREF(take_request(i));
        }
        else {
            i++;
        }
    }
    scheduled = 0;
#if PY_VERSION_HEX >= 0x030D0000
    any_scheduled = 0;
#endif
    wake = NULL;   /* the old lock may be in any state: it is left, not freed */
    if (queue != NULL || n_requests > 0) {
        schedule_main();
    }
}
