/* The state of an idle-waiter, kept in C (see idle_waiter.py).

   Core holds the counters of IdleWaiter: running tasks, blocked (pending
   force_idle callers, + 1 while an exclusive section runs), the owner and
   depth of the exclusive section, the FIFO of exclusive callers' tickets,
   and the tasks waiting for an exclusive section to end.

   Every method is one state transition. None of them releases the GIL or
   runs Python code while it reads or changes the state, so each transition
   is atomic: the GIL is the lock of the hot paths, and an uncontended task
   or exclusive section costs two C calls. When a caller must wait, or must
   wake others, a Python method of the subclass is called (_wait_exclusive,
   _enter_task_slow, _notify_tasks, _notify_exclusive). Those sleep and
   notify on conditions of one Python lock, and test their wake-up
   condition with a transition made while holding it: since every notify
   happens under that lock after the change it announces, no wake-up is
   lost. A caller that must wait changes nothing before that Python method
   runs: it queues itself there, inside the try that undoes it, and the
   transition that queues it also records what to undo in a list the
   method holds, so an exception (Ctrl-C) at any point of the wait finds it.

   Without a GIL (a free-threaded build) the transitions would not be
   atomic, so the module refuses to load there and IdleWaiter stays in
   pure Python. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#ifdef Py_GIL_DISABLED
#error "the idle-waiter core relies on the GIL; free-threaded builds use the Python one"
#endif

typedef struct {
    PyObject_HEAD
    Py_ssize_t tasks;         /* running tasks, admitted ones not yet awake included */
    Py_ssize_t blocked;       /* a new task starts at once only when 0 */
    Py_ssize_t depth;         /* nesting depth of the exclusive section */
    Py_ssize_t tasks_waiting; /* tasks waiting for the exclusive section to end */
    uint64_t owner;           /* holder of the exclusive section, when has_owner */
    int has_owner;
    int tasks_in;             /* the exclusive section lets tasks run beside it */
    int draining;             /* its owner waits for the running tasks to end */
    unsigned long long task_gen; /* bumped to admit the waiting tasks */
    uint64_t next_ticket;
    uint64_t *queue;          /* tickets of waiting exclusive callers, oldest first */
    Py_ssize_t queue_head, queue_len, queue_cap;
} Core;

static PyObject *str_wait_exclusive, *str_enter_task_slow, *str_notify_tasks,
    *str_notify_exclusive, *str_drain_tasks;

/* The owner id of the calling thread, or of the given owner (an int). */
static int
owner_id(PyObject *owner, uint64_t *out)
{
    if (owner == NULL || owner == Py_None) {
        *out = (uint64_t)PyThread_get_thread_ident();
        return 0;
    }
    if (!PyLong_Check(owner)) {
        PyErr_Format(PyExc_TypeError, "owner must be an int, not %.100s", Py_TYPE(owner)->tp_name);
        return -1;
    }
    int overflow = 0;
    long long value = PyLong_AsLongLongAndOverflow(owner, &overflow);
    if (overflow > 0) {
        unsigned long long big = PyLong_AsUnsignedLongLong(owner);
        if (big == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
        *out = (uint64_t)big;
        return 0;
    }
    if (overflow < 0 || (value == -1 && PyErr_Occurred())) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_OverflowError, "owner out of range");
        return -1;
    }
    *out = (uint64_t)value;
    return 0;
}

/* The owner id of a call taking ``(owner=None)``, positional or keyword;
   ``usage`` names the method in the error. */
static int
owner_argument(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *usage,
               uint64_t *out)
{
    if (nargs > 1 || (kwnames && (nargs || PyTuple_GET_SIZE(kwnames) != 1 ||
                                  PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0),
                                                                   "owner") != 0))) {
        PyErr_Format(PyExc_TypeError, "%s(owner=None)", usage);
        return -1;
    }
    return owner_id(nargs == 1 || kwnames ? args[0] : NULL, out);
}

static inline int
owned_by(Core *self, uint64_t me)
{
    return self->has_owner && self->owner == me;
}

static int
queue_push(Core *self, uint64_t ticket)
{
    if (self->queue_head + self->queue_len == self->queue_cap) {
        if (self->queue_head > 0) {
            memmove(self->queue, self->queue + self->queue_head,
                    (size_t)self->queue_len * sizeof(uint64_t));
            self->queue_head = 0;
        }
        else {
            Py_ssize_t cap = self->queue_cap ? 2 * self->queue_cap : 8;
            uint64_t *grown = PyMem_Realloc(self->queue, (size_t)cap * sizeof(uint64_t));
            if (grown == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            self->queue = grown;
            self->queue_cap = cap;
        }
    }
    self->queue[self->queue_head + self->queue_len++] = ticket;
    return 0;
}

static void
queue_pop_front(Core *self)
{
    self->queue_head++;
    if (--self->queue_len == 0)
        self->queue_head = 0;
}

/* Remove ``ticket`` from the line; 0 if it was not in it. */
static int
queue_remove(Core *self, uint64_t ticket)
{
    uint64_t *q = self->queue + self->queue_head;
    for (Py_ssize_t i = 0; i < self->queue_len; i++) {
        if (q[i] == ticket) {
            memmove(q + i, q + i + 1, (size_t)(self->queue_len - i - 1) * sizeof(uint64_t));
            if (--self->queue_len == 0)
                self->queue_head = 0;
            return 1;
        }
    }
    return 0;
}

/* Admit every waiting task (no exclusive section runs); 1 if any. */
static int
admit_waiting_tasks(Core *self)
{
    if (!self->tasks_waiting)
        return 0;
    self->tasks += self->tasks_waiting;
    self->tasks_waiting = 0;
    self->task_gen++;
    return 1;
}

static PyObject *
call_slow(PyObject *self, PyObject *name)
{
    return PyObject_CallMethodNoArgs(self, name);
}

/* -- tasks */

static PyObject *
core_enter_task(Core *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->blocked) {
        self->tasks++;
        Py_RETURN_NONE;
    }
    return call_slow((PyObject *)self, str_enter_task_slow);
}

static PyObject *
exit_task(Core *self)
{
    if (--self->tasks == 0 && (self->queue_len || self->draining)) {
        self->draining = 0; /* (the owner waits for no task any more: none will start) */
        return call_slow((PyObject *)self, str_notify_exclusive);
    }
    Py_RETURN_NONE;
}

static PyObject *
core_exit_task(Core *self, PyObject *Py_UNUSED(ignored))
{
    return exit_task(self);
}

static PyObject *
core_exit(Core *self, PyObject *const *Py_UNUSED(args), Py_ssize_t Py_UNUSED(nargs))
{
    return exit_task(self);
}

static PyObject *
core_try_enter_task(Core *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    uint64_t me;
    if (owner_argument(args, nargs, kwnames, "try_enter_task", &me) < 0)
        return NULL;
    if (self->blocked && !owned_by(self, me))
        Py_RETURN_FALSE;
    self->tasks++;
    Py_RETURN_TRUE;
}

/* The generation just before ``gen``: recorded for a task that started at
   once, it reads as "admitted" to _abandon_task_wait. */
#define GENERATION_PAST(gen) ((gen) - 1)

/* Under the Python lock: _register_task(pending) starts the task now (True),
   or counts it as waiting for the bump of the current generation (False).
   Either way the generation goes into the list ``pending`` as part of the
   transition, so that an exception raised any time after it finds what to
   give back with _abandon_task_wait. */
static PyObject *
core_register_task(Core *self, PyObject *pending)
{
    if (!PyList_Check(pending)) {
        PyErr_SetString(PyExc_TypeError, "_register_task(pending): a list");
        return NULL;
    }
    int at_once = !self->blocked || owned_by(self, (uint64_t)PyThread_get_thread_ident());
    PyObject *gen = PyLong_FromUnsignedLongLong(
        at_once ? GENERATION_PAST(self->task_gen) : self->task_gen);
    if (gen == NULL || PyList_Append(pending, gen) < 0) {
        Py_XDECREF(gen);
        return NULL;
    }
    Py_DECREF(gen);
    if (at_once)
        self->tasks++;
    else
        self->tasks_waiting++;
    return PyBool_FromLong(at_once);
}

/* Under the Python lock, when a waiting task is interrupted: give up its
   place (or its slot, if it was admitted meanwhile). True when exclusive
   callers must be notified. */
static PyObject *
core_abandon_task_wait(Core *self, PyObject *arg)
{
    unsigned long long gen = PyLong_AsUnsignedLongLong(arg);
    if (gen == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (self->task_gen == gen) {
        self->tasks_waiting--;
        Py_RETURN_FALSE;
    }
    self->tasks--;
    return PyBool_FromLong(self->tasks == 0 && (self->queue_len || self->draining));
}

/* -- exclusive sections */

static int
parse_exclusive(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, int *force,
                PyObject **owner)
{
    if (nargs) {
        PyErr_SetString(PyExc_TypeError, "enter_exclusive() takes keyword arguments only");
        return -1;
    }
    Py_ssize_t n = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        if (PyUnicode_CompareWithASCIIString(name, "force") == 0) {
            int truth = PyObject_IsTrue(args[i]);
            if (truth < 0)
                return -1;
            *force = truth;
        }
        else if (PyUnicode_CompareWithASCIIString(name, "owner") == 0)
            *owner = args[i];
        else {
            PyErr_Format(PyExc_TypeError, "enter_exclusive() got an unexpected keyword %R", name);
            return -1;
        }
    }
    return 0;
}

/* RuntimeError when the owner enters again while tasks run beside it. */
static int
refuse_nesting(Core *self)
{
    if (!self->tasks_in)
        return 0;
    PyErr_SetString(PyExc_RuntimeError,
                    "the exclusive section lets tasks in: it cannot be nested now");
    return -1;
}

static PyObject *
enter_exclusive(Core *self, uint64_t me, PyObject *owner, int force)
{
    if (owned_by(self, me)) {
        if (refuse_nesting(self) < 0)
            return NULL;
        self->depth++;
        Py_RETURN_NONE;
    }
    if (self->has_owner || self->tasks || self->queue_len) {
        /* Contended: the Python side takes a ticket under its lock, inside
           the try that gives it back if the wait is interrupted. */
        PyObject *py_owner = owner && owner != Py_None ? (Py_INCREF(owner), owner)
                                                       : PyLong_FromUnsignedLongLong(me);
        if (py_owner == NULL)
            return NULL;
        /* call[0] is the scratch slot PY_VECTORCALL_ARGUMENTS_OFFSET allows. */
        PyObject *call[4] = {NULL, (PyObject *)self, force ? Py_True : Py_False, py_owner};
        PyObject *result = PyObject_VectorcallMethod(str_wait_exclusive, call + 1,
                                                     3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(py_owner);
        return result;
    }
    self->blocked++;
    self->owner = me;
    self->has_owner = 1;
    self->depth = 1;
    Py_RETURN_NONE;
}

static PyObject *
core_enter_exclusive(Core *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    int force = 1;
    PyObject *owner = NULL;
    uint64_t me;
    if (parse_exclusive(args, nargs, kwnames, &force, &owner) < 0 || owner_id(owner, &me) < 0)
        return NULL;
    return enter_exclusive(self, me, owner, force);
}

static PyObject *
exit_exclusive(Core *self, uint64_t me)
{
    if (!owned_by(self, me)) {
        PyErr_SetString(PyExc_RuntimeError,
                        "exit_exclusive() by a thread not holding the exclusive section");
        return NULL;
    }
    if (--self->depth)
        Py_RETURN_NONE;
    self->has_owner = 0;
    self->draining = 0;
    if (self->tasks_in)
        self->tasks_in = 0; /* (tasks were let in: they were not held back) */
    else
        self->blocked--;
    if (admit_waiting_tasks(self))
        return call_slow((PyObject *)self, str_notify_tasks);
    if (self->queue_len && !self->tasks)
        return call_slow((PyObject *)self, str_notify_exclusive);
    Py_RETURN_NONE;
}

static PyObject *
core_exit_exclusive(Core *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    uint64_t me;
    if (owner_argument(args, nargs, kwnames, "exit_exclusive", &me) < 0)
        return NULL;
    return exit_exclusive(self, me);
}

static PyObject *
core_try_enter_exclusive(Core *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    uint64_t me;
    if (owner_argument(args, nargs, kwnames, "try_enter_exclusive", &me) < 0)
        return NULL;
    if (owned_by(self, me)) {
        if (refuse_nesting(self) < 0)
            return NULL;
        self->depth++;
        Py_RETURN_TRUE;
    }
    if (self->has_owner || self->tasks || self->queue_len || self->blocked)
        Py_RETURN_FALSE;
    self->blocked++;
    self->owner = me;
    self->has_owner = 1;
    self->depth = 1;
    Py_RETURN_TRUE;
}

/* The owner argument of a call only the section's holder may make: 0, or -1
   with TypeError (the arguments) or RuntimeError (not the holder). */
static int
holder_argument(Core *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                const char *what)
{
    uint64_t me;
    if (owner_argument(args, nargs, kwnames, what, &me) < 0)
        return -1;
    if (!owned_by(self, me)) {
        PyErr_Format(PyExc_RuntimeError, "%s() by a thread not holding the exclusive section",
                     what);
        return -1;
    }
    return 0;
}

/* let_tasks_in(owner=None), by the owner of the section: tasks run beside it
   from now on (blocked no longer counts it); exclusive callers still wait.
   False, nothing changed, when the section is nested. */
static PyObject *
core_let_tasks_in(Core *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (holder_argument(self, args, nargs, kwnames, "let_tasks_in") < 0)
        return NULL;
    if (self->tasks_in) {
        PyErr_SetString(PyExc_RuntimeError, "let_tasks_in() twice");
        return NULL;
    }
    if (self->depth != 1)
        Py_RETURN_FALSE; /* nested: an outer level counts on running alone */
    self->tasks_in = 1;
    self->blocked--;
    if (admit_waiting_tasks(self)) {
        PyObject *notified = call_slow((PyObject *)self, str_notify_tasks);
        if (notified == NULL)
            return NULL;
        Py_DECREF(notified);
    }
    Py_RETURN_TRUE;
}

/* keep_tasks_out(owner=None), after let_tasks_in: new tasks are held back
   again; while tasks still run, _drain_tasks() waits for them (the last
   one's exit notifies the exclusive callers' condition, draining being set). */
static PyObject *
core_keep_tasks_out(Core *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (holder_argument(self, args, nargs, kwnames, "keep_tasks_out") < 0)
        return NULL;
    if (!self->tasks_in) {
        PyErr_SetString(PyExc_RuntimeError, "keep_tasks_out() without let_tasks_in()");
        return NULL;
    }
    self->tasks_in = 0;
    self->blocked++;
    if (!self->tasks)
        Py_RETURN_NONE;
    self->draining = 1;
    return call_slow((PyObject *)self, str_drain_tasks);
}

/* Under the Python lock, when _drain_tasks is interrupted: tasks in again
   (the caller leaves the section); True when waiting tasks were admitted. */
static PyObject *
core_undo_keep_out(Core *self, PyObject *Py_UNUSED(ignored))
{
    self->draining = 0;
    if (!self->tasks_in) {
        self->tasks_in = 1;
        self->blocked--;
    }
    return PyBool_FromLong(admit_waiting_tasks(self));
}

/* Under the Python lock: _enqueue_exclusive(force, owner, pending) takes a
   ticket and either the section at once (True) or a place in line (False).
   The ticket goes into the list ``pending`` as part of the transition, so
   that an exception raised any time after it finds what to give back with
   _cancel_exclusive (a ticket no longer in line is a section taken). */
static PyObject *
core_enqueue_exclusive(Core *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "_enqueue_exclusive(force, owner, pending)");
        return NULL;
    }
    int force = PyObject_IsTrue(args[0]);
    uint64_t me;
    if (force < 0 || owner_id(args[1], &me) < 0)
        return NULL;
    uint64_t ticket = self->next_ticket;
    PyObject *py_ticket = PyLong_FromUnsignedLongLong(ticket);
    if (py_ticket == NULL)
        return NULL;
    int at_once = !self->has_owner && !self->tasks && !self->queue_len;
    if ((!at_once && queue_push(self, ticket) < 0) || PyList_Append(args[2], py_ticket) < 0) {
        if (!at_once)
            queue_remove(self, ticket);
        Py_DECREF(py_ticket);
        return NULL;
    }
    Py_DECREF(py_ticket);
    self->next_ticket = ticket + 1;
    if (at_once || force)
        self->blocked++;
    if (at_once) {
        self->owner = me;
        self->has_owner = 1;
        self->depth = 1;
    }
    return PyBool_FromLong(at_once);
}

/* Under the Python lock: take the section if ``ticket`` is first in line
   and nothing runs; True when taken. Args: ticket, force, owner. */
static PyObject *
core_take_exclusive(Core *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "_take_exclusive(ticket, force, owner)");
        return NULL;
    }
    unsigned long long ticket = PyLong_AsUnsignedLongLong(args[0]);
    if (ticket == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    int force = PyObject_IsTrue(args[1]);
    uint64_t me;
    if (force < 0 || owner_id(args[2], &me) < 0)
        return NULL;
    if (!self->queue_len || self->queue[self->queue_head] != ticket || self->has_owner ||
        self->tasks)
        Py_RETURN_FALSE;
    queue_pop_front(self);
    if (!force)
        self->blocked++;
    self->owner = me;
    self->has_owner = 1;
    self->depth = 1;
    Py_RETURN_TRUE;
}

/* Under the Python lock, when a waiting exclusive caller is interrupted:
   leave the line, or give back the section if the ticket was served. True
   when waiting tasks were admitted (to be notified); exclusive callers are
   to be notified in any case. Args: ticket, force, owner. */
static PyObject *
core_cancel_exclusive(Core *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "_cancel_exclusive(ticket, force, owner)");
        return NULL;
    }
    unsigned long long ticket = PyLong_AsUnsignedLongLong(args[0]);
    if (ticket == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    int force = PyObject_IsTrue(args[1]);
    uint64_t me;
    if (force < 0 || owner_id(args[2], &me) < 0)
        return NULL;
    if (queue_remove(self, ticket)) {
        if (force)
            self->blocked--;
        return PyBool_FromLong(!self->has_owner && admit_waiting_tasks(self));
    }
    if (owned_by(self, me) && self->depth == 1) {
        self->has_owner = 0;
        self->depth = 0;
        self->blocked--;
        return PyBool_FromLong(admit_waiting_tasks(self));
    }
    Py_RETURN_FALSE;
}

/* -- introspection */

static PyObject *
core_is_idle(Core *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(!self->tasks && !self->has_owner && !self->queue_len &&
                           !self->tasks_waiting);
}

static PyObject *
core_get_exclusive_running(Core *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->has_owner);
}

static void
core_dealloc(Core *self)
{
    PyMem_Free(self->queue);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef core_methods[] = {
    {"enter_task", (PyCFunction)core_enter_task, METH_NOARGS,
     "Low-level: start a task; pair with exit_task in try/finally."},
    {"exit_task", (PyCFunction)core_exit_task, METH_NOARGS,
     "Low-level: end a task started by enter_task."},
    {"__enter__", (PyCFunction)core_enter_task, METH_NOARGS, "Start a task."},
    {"__exit__", (PyCFunction)(void (*)(void))core_exit, METH_FASTCALL, "End a task."},
    {"try_enter_task", (PyCFunction)(void (*)(void))core_try_enter_task,
     METH_FASTCALL | METH_KEYWORDS, "Low-level: start a task if that needs no wait."},
    {"enter_exclusive", (PyCFunction)(void (*)(void))core_enter_exclusive,
     METH_FASTCALL | METH_KEYWORDS,
     "Low-level: enter the exclusive section; pair with exit_exclusive."},
    {"exit_exclusive", (PyCFunction)(void (*)(void))core_exit_exclusive,
     METH_FASTCALL | METH_KEYWORDS, "Low-level: leave the exclusive section."},
    {"try_enter_exclusive", (PyCFunction)(void (*)(void))core_try_enter_exclusive,
     METH_FASTCALL | METH_KEYWORDS,
     "Low-level: enter the exclusive section if that needs no wait."},
    {"let_tasks_in", (PyCFunction)(void (*)(void))core_let_tasks_in,
     METH_FASTCALL | METH_KEYWORDS,
     "Low-level, by the exclusive section's holder: let tasks run beside it."},
    {"keep_tasks_out", (PyCFunction)(void (*)(void))core_keep_tasks_out,
     METH_FASTCALL | METH_KEYWORDS,
     "Low-level, after let_tasks_in: hold tasks back again, wait for the running ones."},
    {"_undo_keep_out", (PyCFunction)core_undo_keep_out, METH_NOARGS, NULL},
    {"is_idle", (PyCFunction)core_is_idle, METH_NOARGS,
     "Whether nothing runs or waits: no task, no exclusive section."},
    {"_register_task", (PyCFunction)core_register_task, METH_O, NULL},
    {"_abandon_task_wait", (PyCFunction)core_abandon_task_wait, METH_O, NULL},
    {"_enqueue_exclusive", (PyCFunction)(void (*)(void))core_enqueue_exclusive, METH_FASTCALL,
     NULL},
    {"_take_exclusive", (PyCFunction)(void (*)(void))core_take_exclusive, METH_FASTCALL, NULL},
    {"_cancel_exclusive", (PyCFunction)(void (*)(void))core_cancel_exclusive, METH_FASTCALL,
     NULL},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef core_members[] = {
    {"running_tasks", T_PYSSIZET, offsetof(Core, tasks), READONLY,
     "Number of tasks currently running."},
    {"waiting_tasks", T_PYSSIZET, offsetof(Core, tasks_waiting), READONLY,
     "Number of tasks waiting for an exclusive section to end."},
    {"pending_exclusive", T_PYSSIZET, offsetof(Core, queue_len), READONLY,
     "Number of force_idle/when_idle callers waiting for their turn."},
    {"_task_gen", T_ULONGLONG, offsetof(Core, task_gen), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef core_getset[] = {
    {"exclusive_running", (getter)core_get_exclusive_running, NULL,
     "Whether an exclusive section is running.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "l2_stores._idle_core.Core",
    .tp_doc = "The state of an idle-waiter; subclassed by idle_waiter.CIdleWaiter.",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_methods = core_methods,
    .tp_members = core_members,
    .tp_getset = core_getset,
};

/* -- the reusable context manager of force_idle() */

typedef struct {
    PyObject_HEAD
    Core *core;
} Section;

static int
section_init(Section *self, PyObject *args, PyObject *kwargs)
{
    PyObject *core;
    if (kwargs != NULL || !PyArg_ParseTuple(args, "O!", &CoreType, &core))
        return -1;
    Py_INCREF(core);
    Py_XSETREF(self->core, (Core *)core);
    return 0;
}

static int
section_traverse(Section *self, visitproc visit, void *arg)
{
    Py_VISIT(self->core);
    return 0;
}

static int
section_clear(Section *self)
{
    Py_CLEAR(self->core);
    return 0;
}

static void
section_dealloc(Section *self)
{
    PyObject_GC_UnTrack(self);
    section_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
section_enter(Section *self, PyObject *Py_UNUSED(ignored))
{
    if (self->core == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "section of no idle-waiter");
        return NULL;
    }
    return enter_exclusive(self->core, (uint64_t)PyThread_get_thread_ident(), NULL, 1);
}

static PyObject *
section_exit(Section *self, PyObject *const *Py_UNUSED(args), Py_ssize_t Py_UNUSED(nargs))
{
    if (self->core == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "section of no idle-waiter");
        return NULL;
    }
    return exit_exclusive(self->core, (uint64_t)PyThread_get_thread_ident());
}

static PyMethodDef section_methods[] = {
    {"__enter__", (PyCFunction)section_enter, METH_NOARGS, "Enter the exclusive section."},
    {"__exit__", (PyCFunction)(void (*)(void))section_exit, METH_FASTCALL,
     "Leave the exclusive section."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SectionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "l2_stores._idle_core.Section",
    .tp_doc = "Section(core): the exclusive section of core, as a context manager.",
    .tp_basicsize = sizeof(Section),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)section_init,
    .tp_dealloc = (destructor)section_dealloc,
    .tp_traverse = (traverseproc)section_traverse,
    .tp_clear = (inquiry)section_clear,
    .tp_methods = section_methods,
};

/* -- a one-key read run as a task: a store's find, in one call */

typedef struct {
    PyObject_HEAD
    Core *core;
    PyObject *lifetime; /* its ``closed`` is read inside the task */
    PyObject *read;     /* read(key) -> bytes | None */
    PyObject *decode;   /* decode(raw) -> value, or None for the raw bytes */
    PyObject *fallback; /* the full method: every other case, and every error path */
    Py_ssize_t key_size;
    vectorcallfunc vectorcall;
} TaskRead;

static PyObject *str_closed, *str_wrapped, *str_doc;

static PyObject *
task_read_call(TaskRead *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (self->fallback == NULL) {
        PyErr_SetString(PyExc_TypeError, "TaskRead: not initialized");
        return NULL;
    }
    Core *core = self->core;
    PyObject *key = PyVectorcall_NARGS(nargsf) == 1 && kwnames == NULL ? args[0] : NULL;
    if (core == NULL || key == NULL || !PyBytes_CheckExact(key) ||
        PyBytes_GET_SIZE(key) != self->key_size || core->blocked)
        goto fallback;
    core->tasks++;
    PyObject *closed = PyObject_GetAttr(self->lifetime, str_closed);
    int is_closed = closed == NULL ? -1 : PyObject_IsTrue(closed);
    Py_XDECREF(closed);
    PyObject *raw = NULL;
    if (is_closed == 0)
        raw = PyObject_Vectorcall(self->read, &key, 1, NULL);
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyObject *exited = exit_task(core);
    if (exited == NULL) {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
        Py_XDECREF(raw);
        return NULL;
    }
    Py_DECREF(exited);
    PyErr_Restore(type, value, traceback);
    if (is_closed != 0 || raw == NULL) {
        if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_Exception))
            return NULL;
        PyErr_Clear();
        goto fallback; /* raises the store's own error */
    }
    if (raw == Py_None || self->decode == Py_None)
        return raw;
    PyObject *decoded = PyObject_Vectorcall(self->decode, &raw, 1, NULL);
    Py_DECREF(raw);
    if (decoded != NULL || !PyErr_ExceptionMatches(PyExc_Exception))
        return decoded;
    PyErr_Clear();
fallback:
    return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

static int
task_read_init(TaskRead *self, PyObject *args, PyObject *kwargs)
{
    PyObject *core, *lifetime, *read, *decode, *fallback;
    Py_ssize_t key_size;
    if (kwargs != NULL || !PyArg_ParseTuple(args, "O!OOnOO", &CoreType, &core, &lifetime, &read,
                                            &key_size, &decode, &fallback))
        return -1;
    if (self->fallback != NULL) { /* a call in flight relies on what it holds */
        PyErr_SetString(PyExc_TypeError, "TaskRead: already initialized");
        return -1;
    }
    if (!PyCallable_Check(read) || !PyCallable_Check(fallback) ||
        (decode != Py_None && !PyCallable_Check(decode))) {
        PyErr_SetString(PyExc_TypeError, "TaskRead: read, decode and fallback must be callable");
        return -1;
    }
    Py_INCREF(core);
    Py_XSETREF(self->core, (Core *)core);
    Py_INCREF(lifetime);
    Py_XSETREF(self->lifetime, lifetime);
    Py_INCREF(read);
    Py_XSETREF(self->read, read);
    Py_INCREF(decode);
    Py_XSETREF(self->decode, decode);
    Py_INCREF(fallback);
    Py_XSETREF(self->fallback, fallback);
    self->key_size = key_size;
    self->vectorcall = (vectorcallfunc)task_read_call;
    return 0;
}

static int
task_read_traverse(TaskRead *self, visitproc visit, void *arg)
{
    Py_VISIT(self->core);
    Py_VISIT(self->lifetime);
    Py_VISIT(self->read);
    Py_VISIT(self->decode);
    Py_VISIT(self->fallback);
    return 0;
}

static int
task_read_clear(TaskRead *self)
{
    Py_CLEAR(self->core);
    Py_CLEAR(self->lifetime);
    Py_CLEAR(self->read);
    Py_CLEAR(self->decode);
    Py_CLEAR(self->fallback);
    return 0;
}

static void
task_read_dealloc(TaskRead *self)
{
    PyObject_GC_UnTrack(self);
    task_read_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A fast path's doc, and the attributes it lacks (name, __self__), are its
   fallback's; __wrapped__ is the fallback itself, for inspect.signature and
   help(). */
static PyObject *
delegate_getattro(PyObject *self, PyObject *fallback, PyObject *name)
{
    if (fallback != NULL && PyUnicode_Check(name) && PyUnicode_Compare(name, str_doc) == 0)
        return PyObject_GetAttr(fallback, name);
    PyObject *found = PyObject_GenericGetAttr(self, name);
    if (found != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError) || fallback == NULL)
        return found;
    PyErr_Clear();
    if (PyUnicode_Check(name) && PyUnicode_Compare(name, str_wrapped) == 0) {
        Py_INCREF(fallback);
        return fallback;
    }
    return PyObject_GetAttr(fallback, name);
}

static PyObject *
task_read_getattro(TaskRead *self, PyObject *name)
{
    return delegate_getattro((PyObject *)self, self->fallback, name);
}

static PyObject *
task_read_repr(TaskRead *self)
{
    return PyUnicode_FromFormat("<fast path of %R>", self->fallback);
}

static PyTypeObject TaskReadType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "l2_stores._idle_core.TaskRead",
    .tp_doc = "TaskRead(core, lifetime, read, key_size, decode, fallback): read(key) run as a\n"
              "task of core, for a bytes key of key_size while lifetime is not closed, then\n"
              "decode(raw) unless decode is None; every other call, and every error, goes to\n"
              "fallback(*args, **kwargs), which does the same the long way.",
    .tp_basicsize = sizeof(TaskRead),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)task_read_init,
    .tp_dealloc = (destructor)task_read_dealloc,
    .tp_traverse = (traverseproc)task_read_traverse,
    .tp_clear = (inquiry)task_read_clear,
    .tp_vectorcall_offset = offsetof(TaskRead, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_getattro = (getattrofunc)task_read_getattro,
    .tp_repr = (reprfunc)task_read_repr,
};

/* -- a write run as the exclusive section: an indexed file's append, in one call */

#define EXCLUSIVE_WRITE_MAX_ARGS 4

typedef struct {
    PyObject_HEAD
    Core *core;
    PyObject *lifetime; /* its ``closed`` is read inside the section */
    PyObject *pacer;    /* its ``pacing`` true: the long way (it waits before the section) */
    PyObject *write;    /* write(*args): the body */
    PyObject *fallback; /* the full method: every other case */
    Py_ssize_t nargs;
    Py_ssize_t sizes[EXCLUSIVE_WRITE_MAX_ARGS]; /* each argument's length, -1 for any */
    vectorcallfunc vectorcall;
} ExclusiveWrite;

static PyObject *str_pacing, *str_flush;

/* Whether obj's attribute ``name`` is true: 1, 0, or -1 with an error. */
static int
attribute_is_true(PyObject *obj, PyObject *name)
{
    PyObject *found = PyObject_GetAttr(obj, name);
    if (found == NULL)
        return -1;
    int truth = PyObject_IsTrue(found);
    Py_DECREF(found);
    return truth;
}

static PyObject *
exclusive_write_call(ExclusiveWrite *self, PyObject *const *args, size_t nargsf,
                     PyObject *kwnames)
{
    if (self->fallback == NULL) {
        PyErr_SetString(PyExc_TypeError, "ExclusiveWrite: not initialized");
        return NULL;
    }
    Core *core = self->core;
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    if (n != self->nargs)
        goto fallback;
    if (kwnames != NULL && (PyTuple_GET_SIZE(kwnames) != 1 ||
                            PyUnicode_Compare(PyTuple_GET_ITEM(kwnames, 0), str_flush) != 0 ||
                            args[n] != Py_True))
        goto fallback; /* only flush=True, the default */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyBytes_CheckExact(args[i]) ||
            (self->sizes[i] >= 0 && PyBytes_GET_SIZE(args[i]) != self->sizes[i]))
            goto fallback;
    }
    /* pacing first: reading it may run Python code, the state check after
       it must not be separated from the transition. */
    int pacing = attribute_is_true(self->pacer, str_pacing);
    if (pacing != 0) {
        if (pacing < 0 && !PyErr_ExceptionMatches(PyExc_Exception))
            return NULL;
        PyErr_Clear();
        goto fallback;
    }
    if (core->has_owner || core->tasks || core->queue_len || core->blocked)
        goto fallback; /* contended: the long way waits */
    /* Uncontended: enter_exclusive's own transition, then the body. */
    uint64_t me = (uint64_t)PyThread_get_thread_ident();
    core->blocked++;
    core->owner = me;
    core->has_owner = 1;
    core->depth = 1;
    int is_closed = attribute_is_true(self->lifetime, str_closed);
    PyObject *result = NULL;
    if (is_closed == 0)
        result = PyObject_Vectorcall(self->write, args, (size_t)n, NULL);
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyObject *exited = exit_exclusive(core, me);
    if (exited == NULL) {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
        Py_XDECREF(result);
        return NULL;
    }
    Py_DECREF(exited);
    PyErr_Restore(type, value, traceback);
    if (is_closed == 0)
        return result; /* the body's result, or its error */
    if (is_closed < 0 && !PyErr_ExceptionMatches(PyExc_Exception))
        return NULL;
    PyErr_Clear();
fallback:
    return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames); /* the store's error */
}

static int
exclusive_write_init(ExclusiveWrite *self, PyObject *args, PyObject *kwargs)
{
    PyObject *core, *lifetime, *pacer, *write, *sizes, *fallback;
    if (kwargs != NULL || !PyArg_ParseTuple(args, "O!OOOO!O", &CoreType, &core, &lifetime, &pacer,
                                            &write, &PyTuple_Type, &sizes, &fallback))
        return -1;
    if (self->fallback != NULL) {
        PyErr_SetString(PyExc_TypeError, "ExclusiveWrite: already initialized");
        return -1;
    }
    if (!PyCallable_Check(write) || !PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "ExclusiveWrite: write and fallback must be callable");
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(sizes);
    if (n > EXCLUSIVE_WRITE_MAX_ARGS) {
        PyErr_SetString(PyExc_ValueError, "ExclusiveWrite: too many arguments");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t size = PyLong_AsSsize_t(PyTuple_GET_ITEM(sizes, i));
        if (size == -1 && PyErr_Occurred())
            return -1;
        self->sizes[i] = size;
    }
    self->nargs = n;
    self->core = (Core *)Py_NewRef(core);
    self->lifetime = Py_NewRef(lifetime);
    self->pacer = Py_NewRef(pacer);
    self->write = Py_NewRef(write);
    self->fallback = Py_NewRef(fallback);
    self->vectorcall = (vectorcallfunc)exclusive_write_call;
    return 0;
}

static int
exclusive_write_traverse(ExclusiveWrite *self, visitproc visit, void *arg)
{
    Py_VISIT(self->core);
    Py_VISIT(self->lifetime);
    Py_VISIT(self->pacer);
    Py_VISIT(self->write);
    Py_VISIT(self->fallback);
    return 0;
}

static int
exclusive_write_clear(ExclusiveWrite *self)
{
    Py_CLEAR(self->core);
    Py_CLEAR(self->lifetime);
    Py_CLEAR(self->pacer);
    Py_CLEAR(self->write);
    Py_CLEAR(self->fallback);
    return 0;
}

static void
exclusive_write_dealloc(ExclusiveWrite *self)
{
    PyObject_GC_UnTrack(self);
    exclusive_write_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
exclusive_write_getattro(ExclusiveWrite *self, PyObject *name)
{
    return delegate_getattro((PyObject *)self, self->fallback, name);
}

static PyObject *
exclusive_write_repr(ExclusiveWrite *self)
{
    return PyUnicode_FromFormat("<fast path of %R>", self->fallback);
}

static PyTypeObject ExclusiveWriteType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "l2_stores._idle_core.ExclusiveWrite",
    .tp_doc = "ExclusiveWrite(core, lifetime, pacer, write, sizes, fallback): write(*args) run\n"
              "as core's exclusive section, for bytes arguments of the given sizes (-1: any),\n"
              "when the section is free at once, pacer.pacing is false and lifetime is not\n"
              "closed; every other call goes to fallback(*args, **kwargs), the long way.",
    .tp_basicsize = sizeof(ExclusiveWrite),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)exclusive_write_init,
    .tp_dealloc = (destructor)exclusive_write_dealloc,
    .tp_traverse = (traverseproc)exclusive_write_traverse,
    .tp_clear = (inquiry)exclusive_write_clear,
    .tp_vectorcall_offset = offsetof(ExclusiveWrite, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_getattro = (getattrofunc)exclusive_write_getattro,
    .tp_repr = (reprfunc)exclusive_write_repr,
};

static struct PyModuleDef idle_core_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "l2_stores._idle_core",
    .m_doc = "The state of an idle-waiter, with transitions made atomic by the GIL.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__idle_core(void)
{
    if (PyType_Ready(&CoreType) < 0 || PyType_Ready(&SectionType) < 0 ||
        PyType_Ready(&TaskReadType) < 0 || PyType_Ready(&ExclusiveWriteType) < 0)
        return NULL;
    str_pacing = PyUnicode_InternFromString("pacing");
    str_flush = PyUnicode_InternFromString("flush");
    if (!str_pacing || !str_flush)
        return NULL;
    str_closed = PyUnicode_InternFromString("closed");
    str_wrapped = PyUnicode_InternFromString("__wrapped__");
    str_doc = PyUnicode_InternFromString("__doc__");
    if (!str_closed || !str_wrapped || !str_doc)
        return NULL;
    str_wait_exclusive = PyUnicode_InternFromString("_wait_exclusive");
    str_enter_task_slow = PyUnicode_InternFromString("_enter_task_slow");
    str_notify_tasks = PyUnicode_InternFromString("_notify_tasks");
    str_notify_exclusive = PyUnicode_InternFromString("_notify_exclusive");
    str_drain_tasks = PyUnicode_InternFromString("_drain_tasks");
    if (!str_wait_exclusive || !str_enter_task_slow || !str_notify_tasks ||
        !str_notify_exclusive || !str_drain_tasks)
        return NULL;
    PyObject *module = PyModule_Create(&idle_core_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(module, "Core", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&SectionType);
    if (PyModule_AddObject(module, "Section", (PyObject *)&SectionType) < 0) {
        Py_DECREF(&SectionType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&TaskReadType);
    if (PyModule_AddObject(module, "TaskRead", (PyObject *)&TaskReadType) < 0) {
        Py_DECREF(&TaskReadType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&ExclusiveWriteType);
    if (PyModule_AddObject(module, "ExclusiveWrite", (PyObject *)&ExclusiveWriteType) < 0) {
        Py_DECREF(&ExclusiveWriteType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
