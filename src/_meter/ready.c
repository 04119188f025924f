/*
 * Ready: an awaitable that is already done (what a scope's __aenter__ and
 * __aexit__ return). Awaiting it allocates nothing, so an empty scope stays
 * charged (0, 0, 0).
 */
#include "meter.h"

typedef struct {
    PyObject_HEAD
    PyObject *value;
} Ready;

PyObject *
ready_new(PyObject *value)
{
    Ready *r = PyObject_GC_New(Ready, &ReadyType);
    if (r == NULL) {
        return NULL;
    }
    r->value = Py_NewRef(value);
    PyObject_GC_Track(r);
    return (PyObject *)r;
}

static PyObject *
Ready_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)kwds;
    PyObject *value = Py_None;
    if (!PyArg_UnpackTuple(args, "Ready", 0, 1, &value)) {
        return NULL;
    }
    Ready *r = (Ready *)type->tp_alloc(type, 0);
    if (r != NULL) {
        r->value = Py_NewRef(value);
    }
    return (PyObject *)r;
}

static void
Ready_dealloc(Ready *r)
{
    PyObject_GC_UnTrack(r);
    Py_CLEAR(r->value);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static int
Ready_traverse(Ready *r, visitproc visit, void *arg)
{
    Py_VISIT(r->value);
    return 0;
}

static PyObject *
Ready_await(PyObject *self)
{
    return Py_NewRef(self);
}

static PySendResult
Ready_send(Ready *r, PyObject *arg, PyObject **result)
{
    (void)arg;
    *result = Py_NewRef(r->value);
    return PYGEN_RETURN;
}

/* The path an await takes where the interpreter does not use am_send (3.12 and
 * later call tp_iternext for non-generators): the StopIteration carrying the
 * value is the library's own work, made with the hook paused. */
static PyObject *
Ready_next(Ready *r)
{
    if (r->value == Py_None) {
        return NULL;   /* exhausted without an exception: the result is None */
    }
    pause_hook();
    PyObject *stop_exc = PyObject_CallOneArg(PyExc_StopIteration, r->value);
    if (stop_exc != NULL) {
        PyErr_SetObject(PyExc_StopIteration, stop_exc);
        Py_DECREF(stop_exc);
    }
    resume_hook();
    return NULL;
}

static PyAsyncMethods Ready_async = {
    .am_await = Ready_await,
    .am_send = (sendfunc)Ready_send,
};

PyTypeObject ReadyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gotcha_async._meter.Ready",
    .tp_basicsize = sizeof(Ready),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Ready(value): an awaitable that returns value at once.",
    .tp_new = Ready_new,
    .tp_dealloc = (destructor)Ready_dealloc,
    .tp_traverse = (traverseproc)Ready_traverse,
    .tp_as_async = &Ready_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)Ready_next,
};

static PyObject *ready_true, *ready_none;

/* __aexit__'s result: swallow the exception (True) or not (None) */
PyObject *
ready_result(int swallow)
{
    return Py_NewRef(swallow ? ready_true : ready_none);
}

int
ready_init(void)
{
    if (PyType_Ready(&ReadyType) < 0) {
        return -1;
    }
    ready_true = PyObject_CallOneArg((PyObject *)&ReadyType, Py_True);
    ready_none = PyObject_CallOneArg((PyObject *)&ReadyType, Py_None);
    return ready_true != NULL && ready_none != NULL ? 0 : -1;
}
