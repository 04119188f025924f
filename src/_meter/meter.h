/*
 * What the Meter type's files share, and no other file sees:
 *
 *   meter.c   the type: life, setting up, reading and charging
 *   enter.c   entering and leaving (the fast paths, lazy scopes, trio)
 *   ready.c   Ready, the awaitable a scope's __aenter__ and __aexit__ return
 */
#ifndef GOTCHA_METER_ROOM_H
#define GOTCHA_METER_ROOM_H

#include "_meter.h"

GOTCHA_HIDDEN_BEGIN

/* meter.c */
void settle_reads(void);   /* before a scope's counters are read */
void freeze(Meter *m);     /* at exit: what it reports from then on */
void release_parent(Meter *p);   /* a reference to a parent dropped */
PyObject *Meter_set_parent(Meter *m, PyObject *p);
int broken_resource(const Meter *m, uint64_t *reached);

/* enter.c */
PyObject *Meter_enter(Meter *m, PyObject *unused);
PyObject *Meter_exit(Meter *m, PyObject *const *args, Py_ssize_t nargs);
PyObject *Meter_aenter(Meter *m, PyObject *unused);
PyObject *Meter_aexit(Meter *m, PyObject *const *args, Py_ssize_t nargs);
int enter_init(void);

/* ready.c */
PyObject *ready_new(PyObject *value);
PyObject *ready_result(int swallow);   /* new reference */
int ready_init(void);

GOTCHA_HIDDEN_END

#endif
