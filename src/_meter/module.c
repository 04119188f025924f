/*
 * gotcha_async._meter: module functions and init.
 *
 * The hook is process-wide and its state is guarded by the main
 * interpreter's GIL, so the module loads in the main interpreter only, and
 * refuses before it touches anything anywhere else: static types readied from
 * a subinterpreter's memory would outlive it. Multi-phase init (PEP 489):
 * PyInit__meter makes nothing, meter_exec checks the interpreter first.
 */
#include "_meter.h"

/* install(var, deliver, exempt_dirs, dispatch, main_thread_ident, interrupt_type) */
static PyObject *
mod_install(PyObject *mod, PyObject *args)
{
    (void)mod;
    PyObject *var, *cb, *dirs, *places, *itype;
    unsigned long ident;
    if (!PyArg_ParseTuple(args, "O!OO!O!kO", &PyContextVar_Type, &var, &cb, &PyTuple_Type, &dirs,
                          &PyTuple_Type, &places, &ident, &itype)) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(places); i++) {
        PyObject *place = PyTuple_GET_ITEM(places, i);
        if (!PyTuple_Check(place) || PyTuple_GET_SIZE(place) != 2 ||
            !PyUnicode_Check(PyTuple_GET_ITEM(place, 0)) ||
            !PyUnicode_Check(PyTuple_GET_ITEM(place, 1))) {
            PyErr_SetString(PyExc_TypeError, "dispatch must be a tuple of (str, str)");
            return NULL;
        }
    }
    if (!PyExceptionClass_Check(itype)) {
        PyErr_SetString(PyExc_TypeError, "interrupt_type must be an exception class");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(dirs); i++) {
        if (!PyUnicode_Check(PyTuple_GET_ITEM(dirs, i))) {
            PyErr_SetString(PyExc_TypeError, "exempt_dirs must be a tuple of str");
            return NULL;
        }
    }
    /* first: it may release the GIL, and nothing is set up before the check */
    hook_find_thread_state();
    if (installed) {
        PyErr_SetString(PyExc_RuntimeError, "the allocator hook is already installed");
        return NULL;
    }
    if (probe_dict_growth() < 0) {
        return NULL;
    }
    caller_init();
    if (deliver_setup(cb, itype, ident) < 0) {
        return NULL;
    }
    if (start_delivery() < 0) {
        PyErr_SetString(PyExc_RuntimeError, "cannot make the delivery thread's lock");
        return NULL;
    }
    frames_setup(dirs, places);
    scope_var = Py_NewRef(var);
    installed = 1;   /* the first enter() puts the hook in the chain */
    Py_RETURN_NONE;
}

/* set_opcodes(RESUME, EXTENDED_ARG, ((backward jump, its inline caches), ...),
 *             ((an await's opcode, 1 yield or 2 resume), ...)) */
static PyObject *
mod_set_opcodes(PyObject *mod, PyObject *args)
{
    (void)mod;
    int resume, extended_arg;
    PyObject *jumps, *awaiting;
    if (!PyArg_ParseTuple(args, "iiO!O!", &resume, &extended_arg, &PyTuple_Type, &jumps,
                          &PyTuple_Type, &awaiting)) {
        return NULL;
    }
    if (frames_set_opcodes(resume, extended_arg, jumps, awaiting) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
mod_delivery_loop(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    return delivery_loop();
}

static PyObject *
mod_installed(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    return PyBool_FromLong(installed);
}

static PyObject *
mod_set_types(PyObject *mod, PyObject *args)
{
    (void)mod;
    PyObject *u, *m;
    if (!PyArg_ParseTuple(args, "OO", &u, &m)) {
        return NULL;
    }
    meter_set_types(u, m);
    Py_RETURN_NONE;
}

static PyObject *
mod_set_fast_trio(PyObject *mod, PyObject *args)
{
    (void)mod;
    PyObject *run_context, *cls;
    if (!PyArg_ParseTuple(args, "OO", &run_context, &cls)) {
        return NULL;
    }
    if (run_context == Py_None) {
        meter_set_fast_trio(NULL, NULL);
    }
    else if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError,
                        "set_fast_trio(run_context, type) or set_fast_trio(None, None)");
        return NULL;
    }
    else {
        meter_set_fast_trio(run_context, cls);
    }
    Py_RETURN_NONE;
}

static PyObject *
mod_set_fast(PyObject *mod, PyObject *args)
{
    (void)mod;
    PyObject *loop_fn, *cls, *task_fn = Py_None, *states = Py_None;
    if (!PyArg_ParseTuple(args, "OO|OO", &loop_fn, &cls, &task_fn, &states)) {
        return NULL;
    }
    if (loop_fn == Py_None || cls == Py_None) {
        meter_set_fast(NULL, NULL, NULL, NULL);
    }
    else if (!PyCallable_Check(loop_fn) || !PyType_Check(cls) ||
             (task_fn != Py_None && !PyCallable_Check(task_fn) && !PyDict_CheckExact(task_fn)) ||
             (states != Py_None && !PyDict_Check(states))) {
        PyErr_SetString(PyExc_TypeError,
                        "set_fast(callable, type[, current_task or its dict, dict]) or "
                        "set_fast(None, None)");
        return NULL;
    }
    else {
        meter_set_fast(loop_fn, cls, task_fn == Py_None ? NULL : task_fn,
                       states == Py_None ? NULL : states);
    }
    Py_RETURN_NONE;
}

static PyObject *
mod_tracemalloc_stopped(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    return PyBool_FromLong(installed && verify_chain());
}

static PyObject *
mod_after_fork(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    if (!installed) {
        Py_RETURN_NONE;
    }
    delivery_after_fork();
    if (start_delivery() < 0) {
        PyErr_SetString(PyExc_RuntimeError, "cannot make the delivery thread's lock");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
mod_hooked(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    return PyBool_FromLong(hook_on_top());
}

static PyObject *
mod_hook_form(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    return PyUnicode_FromString(hook_form());
}

static PyObject *
mod_reads_thread_state(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    return PyBool_FromLong(hook_reads_thread_state());
}

/* For tests: does the direct read give this thread's state? None where the
 * hook asks for it instead. */
static PyObject *
mod_thread_state_agrees(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    int found = hook_found_thread_state();
    if (found < 0) {
        PyErr_SetString(PyExc_RuntimeError, "the hook is not installed");
        return NULL;
    }
    if (!found) {
        Py_RETURN_NONE;
    }
    return PyBool_FromLong(tstate_direct() == PyThreadState_Get());
}

/* For benchmarks and tests: take the hook out of the chain (it must be on
 * top), or force it in while no scope needs it. */
static PyObject *
mod_set_hooked(PyObject *mod, PyObject *flag)
{
    (void)mod;
    int on = PyObject_IsTrue(flag);
    if (on < 0) {
        return NULL;
    }
    if (!installed) {
        PyErr_SetString(PyExc_RuntimeError, "install() first");
        return NULL;
    }
    if (on) {
        hook_join();
    }
    else if (!hook_leave()) {
        PyErr_SetString(PyExc_RuntimeError, "another allocator hook sits on top of ours");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
mod_active(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    return PyLong_FromSsize_t(active);
}

static PyObject *
mod_held_blocks(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    return PyLong_FromSize_t(table_count);
}

static PyObject *
mod_grace(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    return Py_BuildValue("(KKKK)", (unsigned long long)grace[0], (unsigned long long)grace[1],
                         (unsigned long long)grace[2], (unsigned long long)grace[3]);
}

static PyObject *
mod_refuse_min(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    return PyLong_FromSize_t(REFUSE_MIN);
}

static PyObject *
mod_dict_fragile(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    return PyLong_FromLong(dict_fragile_state());
}

static PyObject *
mod_checked(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
#ifdef GOTCHA_CHECKED
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *
mod_refusals(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    return PyBool_FromLong(caller_ready());
}

static PyObject *
mod_numpy_state(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    return PyLong_FromLong(numpy_state());
}

static PyObject *
mod_numpy_adopt(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    if (installed) {
        pause_hook();   /* the handler's setting is not the scope's work */
        numpy_adopt();
        resume_hook();
        forget_seen();
    }
    Py_RETURN_NONE;
}

static PyMethodDef mod_methods[] = {
    {"install", mod_install, METH_VARARGS,
     "install(var, deliver, exempt_dirs, dispatch, main_thread_ident, interrupt_type): set the "
     "hook up and the delivery thread's lock; once per process."},
    {"set_opcodes", mod_set_opcodes, METH_VARARGS,
     "set_opcodes(RESUME, EXTENDED_ARG, ((jump, caches), ...)): the running interpreter's "
     "opcodes that decide where an interrupt may land; until then none does."},
    {"installed", mod_installed, METH_NOARGS, "Has install() run?"},
    {"delivery_loop", mod_delivery_loop, METH_NOARGS,
     "The delivery thread's body: run it in a thread of its own, once after install() "
     "and once after each fork; it never returns."},
    {"set_fast", mod_set_fast, METH_VARARGS,
     "set_fast(get_running_loop, scope_class[, current_task, task_states]): enter and "
     "leave without Python in the common case (None, None: never). With current_task "
     "(or the dict it reads: d.get(loop)) and anyio's task-state dict (the "
     "WeakKeyDictionary's data), a plain scope makes no cancel scope until something "
     "asks for a cancellation (a lazy scope)."},
    {"set_fast_trio", mod_set_fast_trio, METH_VARARGS,
     "set_fast_trio(run_context, CancelScope): on trio, enter and leave plain scopes "
     "without Python, around trio's own cancel scope (run_context: trio's thread-local "
     "GLOBAL_RUN_CONTEXT; None, None: never)."},
    {"set_types", mod_set_types, METH_VARARGS,
     "set_types(Usage, Memory): the NamedTuples the module returns."},
    {"tracemalloc_stopped", mod_tracemalloc_stopped, METH_NOARGS,
     "Call after tracemalloc.stop(): rejoin the chain if it dropped the hook; "
     "True if it had."},
    {"after_fork", mod_after_fork, METH_NOARGS, "Restart delivery in a forked child."},
    {"grace", mod_grace, METH_NOARGS, "Allowance past a hard ceiling after each stop."},
    {"refuse_min", mod_refuse_min, METH_NOARGS,
     "The smallest allocation a hard scope refuses outright."},
    {"checked", mod_checked, METH_NOARGS,
     "Was this build made for a CPython whose private layouts were checked (3.11 to "
     "3.15)? If not, no frame is read: no interrupts, refusals or allocation sites."},
    {"numpy_adopt", mod_numpy_adopt, METH_NOARGS,
     "Make numpy's data handler ours in the calling context, as a scope's entry does "
     "(after numpy was imported inside a scope)."},
    {"native_supported", mod_native_supported, METH_NOARGS,
     "Can C libraries' allocations be counted on this platform?"},
    {"native_install", mod_native_install, METH_NOARGS,
     "Count C libraries' allocations from now on (after install()); idempotent."},
    {NULL},
};

/* What tests and benchmarks ask, and the package never does: _meter._debug,
 * a namespace of its own, so that the module's surface is what the package
 * uses. */
static PyMethodDef debug_methods[] = {
    {"set_hooked", mod_set_hooked, METH_O,
     "set_hooked(flag): take the hook out or put it back (benchmarks, tests)."},
    {"hooked", mod_hooked, METH_NOARGS, "Is the hook in place on both domains?"},
    {"reads_thread_state", mod_reads_thread_state, METH_NOARGS,
     "Do the hooks in the chain read the thread state where the interpreter keeps it?"},
    {"thread_state_agrees", mod_thread_state_agrees, METH_NOARGS,
     "Does the hook's direct read give the calling thread's state? None if it asks."},
    {"hook_form", mod_hook_form, METH_NOARGS,
     "How the object domain's frees reach the hook: 'out' of the chain, 'full', 'light' "
     "(left to the allocator below), 'light, watched' (a link above a wrapper sees them)."},
    {"active", mod_active, METH_NOARGS, "Number of entered scopes in the process."},
    {"held_blocks", mod_held_blocks, METH_NOARGS, "Number of blocks in the held-memory table."},
    {"dict_fragile", mod_dict_fragile, METH_NOARGS,
     "After install(): 0 if a dict survives a failed resize here; 1 if not, and the sizes "
     "of its tables are never refused; 2 if not, and nothing is refused."},
    {"refusals", mod_refusals, METH_NOARGS,
     "After install(): can a hard scope refuse an allocation here (can it tell that "
     "CPython's own C asked for it)? If not, growth is only ever interrupted."},
    {"numpy_state", mod_numpy_state, METH_NOARGS,
     "0 until a scope is entered after numpy was imported; 1 once numpy's arrays are "
     "counted (their data handler is ours in each scope's context); 2 if this numpy "
     "cannot be (older than 1.22)."},
    {"native_state", mod_native_state, METH_NOARGS,
     "{'on': bool, 'slots': relocations patched, 'scans': patching passes, 'logs': threads "
     "with a log}."},
    {NULL},
};

/* The hook is process-wide and its state global, guarded by the main
 * interpreter's GIL: the module says so (PEP 489 slots), and refuses any
 * other interpreter before it touches anything. A module object made for a
 * subinterpreter is that interpreter's own, and goes with the failed import;
 * nothing is readied in its memory. */
static int
meter_exec(PyObject *m)
{
    if (PyInterpreterState_Get() != PyInterpreterState_Main()) {
        PyErr_SetString(PyExc_ImportError,
                        "gotcha_async can only be imported in the main interpreter: its "
                        "allocator hook is process-wide");
        return -1;
    }
    /* once per process: the module can be executed again (a second import
     * after it was dropped from sys.modules), and the types are static */
    static int ready;
    if (!ready) {
        main_interp = PyInterpreterState_Main();
        if (meter_init_types() < 0 || frames_init() < 0 || guard_init() < 0 ||
            numpy_init() < 0) {
            return -1;
        }
        ready = 1;
    }
    if (PyModule_AddObjectRef(m, "Meter", (PyObject *)&MeterType) < 0 ||
        PyModule_AddObjectRef(m, "Ready", (PyObject *)&ReadyType) < 0 ||
        PyModule_AddObjectRef(m, "SendGuard", (PyObject *)&GuardType) < 0 ||
        PyModule_AddObjectRef(m, "ReceiveGuard", (PyObject *)&ReceiveGuardType) < 0) {
        return -1;
    }
    PyObject *debug = PyModule_New("gotcha_async._meter._debug");
    if (debug == NULL) {
        return -1;
    }
    int r = PyModule_AddFunctions(debug, debug_methods) < 0 ||
                    PyModule_SetDocString(debug, "The hook's state, for tests and benchmarks.") < 0
                ? -1
                : PyModule_AddObjectRef(m, "_debug", debug);
    Py_DECREF(debug);
    return r;
}

static PyModuleDef_Slot meter_slots[] = {
    {Py_mod_exec, meter_exec},
#ifdef Py_mod_multiple_interpreters
    /* 3.12+: an isolated subinterpreter is refused by CPython itself, before
     * meter_exec (a legacy one, sharing the main GIL, by meter_exec) */
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
#ifdef Py_mod_gil
    /* 3.13+: the counters and the hook rely on the GIL */
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef meter_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "gotcha_async._meter",
    .m_doc = "The allocator hook and per-scope counters of gotcha_async.",
    .m_size = 0,   /* no per-module state: the hook's is the process's */
    .m_methods = mod_methods,
    .m_slots = meter_slots,
};

PyMODINIT_FUNC
PyInit__meter(void)
{
#ifdef Py_GIL_DISABLED
    PyErr_SetString(PyExc_ImportError,
                    "gotcha_async does not support free-threaded CPython builds: its counters "
                    "and allocator hook rely on the GIL");
    return NULL;
#else
    /* multi-phase: nothing is made here, in whichever interpreter imports */
    return PyModuleDef_Init(&meter_module);
#endif
}
