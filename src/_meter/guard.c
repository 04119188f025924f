/*
 * The ASGI middleware's send and receive, in C: the send runs for every
 * message of every response, and as Python closures the two were a tenth of
 * the middleware's own cost on a small request. They do what those closures
 * did: once the request's scope (or an ancestor) is over its limit, nothing
 * more reaches the client and nothing more is read from it (the call is
 * answered by stop, a cancellation at a checkpoint of the request's own task);
 * before that, the send notes how far the response has gone, and each hands
 * the call to the server's, returning the server's own awaitable (no
 * coroutine of its own).
 */
#include "_meter.h"

/* Both guards: SendGuard(ctx, send, stop) and ReceiveGuard(ctx, receive, stop).
 * The receive's uses no more than ctx, inner and stop. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *ctx;      /* a Meter */
    PyObject *inner;    /* the server's send or receive */
    PyObject *stop;     /* called past the limit: stop(ctx), or stop(ctx, receive) */
    PyObject *status;   /* the response's status, None before its start */
    char started, complete, trailers;
} Guard;

static PyObject *str_type, *str_status, *str_trailers, *str_more_body, *str_more_trailers;
static PyObject *kind_start, *kind_body, *kind_zerocopy, *kind_trailers, *kind_pathsend;

/* message.get(key, default), as the closure read it: any mapping with get() */
static PyObject *
get_or(PyObject *message, PyObject *key, PyObject *default_)
{
    if (PyDict_CheckExact(message)) {
        PyObject *v = PyDict_GetItemWithError(message, key);
        if (v != NULL) {
            return Py_NewRef(v);
        }
        return PyErr_Occurred() ? NULL : Py_NewRef(default_);
    }
    return PyObject_CallMethod(message, "get", "OO", key, default_);
}

/* 1 if message.get(key, False) is true, 0 if not, -1 on error */
static int
flag_of(PyObject *message, PyObject *key)
{
    PyObject *v = get_or(message, key, Py_False);
    if (v == NULL) {
        return -1;
    }
    int t = PyObject_IsTrue(v);
    Py_DECREF(v);
    return t;
}

static int
is_kind(PyObject *kind, PyObject *name)
{
    if (kind == name) {
        return 1;   /* the server's and our interned literal, the common case */
    }
    return PyUnicode_Check(kind) && PyUnicode_Compare(kind, name) == 0;
}

/* How far the response has gone, from one message it is about to send. */
static int
note(Guard *g, PyObject *message)
{
    PyObject *kind = PyObject_GetItem(message, str_type);   /* KeyError as message["type"] */
    if (kind == NULL) {
        return -1;
    }
    int r = 0, t;
    if (is_kind(kind, kind_body) || is_kind(kind, kind_zerocopy)) {
        if (!g->trailers) {
            t = flag_of(message, str_more_body);
            if (t < 0) {
                r = -1;
            }
            else if (!t) {
                g->complete = 1;
            }
        }
    }
    else if (is_kind(kind, kind_start)) {
        g->started = 1;
        PyObject *status = get_or(message, str_status, Py_None);
        if (status == NULL) {
            r = -1;
        }
        else {
            Py_SETREF(g->status, status);
            t = flag_of(message, str_trailers);
            if (t < 0) {
                r = -1;
            }
            else {
                g->trailers = (char)t;
            }
        }
    }
    else if (is_kind(kind, kind_trailers)) {
        t = flag_of(message, str_more_trailers);
        if (t < 0) {
            r = -1;
        }
        else {
            g->complete = !t;
        }
    }
    else if (is_kind(kind, kind_pathsend)) {
        g->complete = 1;
    }
    Py_DECREF(kind);
    return r;
}

static PyObject *
Guard_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Guard *g = (Guard *)self;
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "send(message) takes one positional argument");
        return NULL;
    }
    if (meter_exceeded((Meter *)g->ctx)) {
        /* before the start the status will be the middleware's, after it the
         * response will be aborted */
        return PyObject_CallOneArg(g->stop, g->ctx);
    }
    if (note(g, args[0]) < 0) {
        return NULL;
    }
    return PyObject_CallOneArg(g->inner, args[0]);
}

static PyObject *
Receive_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    (void)args;
    Guard *g = (Guard *)self;
    if (PyVectorcall_NARGS(nargsf) != 0 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "receive() takes no arguments");
        return NULL;
    }
    if (meter_exceeded((Meter *)g->ctx)) {
        return PyObject_CallFunctionObjArgs(g->stop, g->ctx, g->inner, NULL);
    }
    return PyObject_CallNoArgs(g->inner);
}

/* Guard(ctx, inner, stop) of either type: its name in errors is the type's */
static PyObject *
Guard_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    const char *name = type == &GuardType ? "SendGuard" : "ReceiveGuard";
    PyObject *ctx, *inner, *stop;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_Format(PyExc_TypeError, "%s(ctx, %s, stop) takes no keywords", name,
                     type == &GuardType ? "send" : "receive");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, name, 3, 3, &ctx, &inner, &stop)) {
        return NULL;
    }
    if (!PyObject_TypeCheck(ctx, &MeterType)) {
        PyErr_Format(PyExc_TypeError, "%s: ctx must be a Context, not %.100s", name,
                     Py_TYPE(ctx)->tp_name);
        return NULL;
    }
    Guard *g = (Guard *)type->tp_alloc(type, 0);
    if (g == NULL) {
        return NULL;
    }
    g->vectorcall = type == &GuardType ? Guard_vectorcall : Receive_vectorcall;
    g->ctx = Py_NewRef(ctx);
    g->inner = Py_NewRef(inner);
    g->stop = Py_NewRef(stop);
    g->status = Py_NewRef(Py_None);
    return (PyObject *)g;
}

static int
Guard_traverse(Guard *g, visitproc visit, void *arg)
{
    Py_VISIT(g->ctx);
    Py_VISIT(g->inner);
    Py_VISIT(g->stop);
    Py_VISIT(g->status);
    return 0;
}

static int
Guard_clear(Guard *g)
{
    Py_CLEAR(g->ctx);
    Py_CLEAR(g->inner);
    Py_CLEAR(g->stop);
    Py_CLEAR(g->status);
    return 0;
}

static void
Guard_dealloc(Guard *g)
{
    PyObject_GC_UnTrack(g);
    Guard_clear(g);
    Py_TYPE(g)->tp_free((PyObject *)g);
}

static PyMemberDef Guard_members[] = {
    {"status", Py_T_OBJECT_EX, offsetof(Guard, status), Py_READONLY,
     "The response's status, None before its start."},
    {"started", Py_T_BOOL, offsetof(Guard, started), Py_READONLY,
     "Whether the response has started."},
    {"complete", Py_T_BOOL, offsetof(Guard, complete), Py_READONLY,
     "Whether the response's last message has been handed on."},
    {NULL},
};

PyTypeObject GuardType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gotcha_async._meter.SendGuard",
    .tp_basicsize = sizeof(Guard),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "SendGuard(ctx, send, stop): the ASGI middleware's send (see guard.c).",
    .tp_new = Guard_new,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Guard, vectorcall),
    .tp_traverse = (traverseproc)Guard_traverse,
    .tp_clear = (inquiry)Guard_clear,
    .tp_dealloc = (destructor)Guard_dealloc,
    .tp_members = Guard_members,
};

PyTypeObject ReceiveGuardType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gotcha_async._meter.ReceiveGuard",
    .tp_basicsize = sizeof(Guard),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "ReceiveGuard(ctx, receive, stop): the ASGI middleware's receive (see guard.c).",
    .tp_new = Guard_new,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Guard, vectorcall),
    .tp_traverse = (traverseproc)Guard_traverse,
    .tp_clear = (inquiry)Guard_clear,
    .tp_dealloc = (destructor)Guard_dealloc,
};

int
guard_init(void)
{
    struct {
        PyObject **slot;
        const char *text;
    } names[] = {
        {&str_type, "type"}, {&str_status, "status"}, {&str_trailers, "trailers"},
        {&str_more_body, "more_body"}, {&str_more_trailers, "more_trailers"},
        {&kind_start, "http.response.start"}, {&kind_body, "http.response.body"},
        {&kind_zerocopy, "http.response.zerocopysend"},
        {&kind_trailers, "http.response.trailers"},
        {&kind_pathsend, "http.response.pathsend"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (*names[i].slot == NULL &&
            (*names[i].slot = PyUnicode_InternFromString(names[i].text)) == NULL) {
            return -1;
        }
    }
    return PyType_Ready(&GuardType) < 0 ? -1 : PyType_Ready(&ReceiveGuardType);
}
