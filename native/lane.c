/* pilot._launch.Lane: an agent's attempts of plain native tasks, started, watched and reaped in C
 * (see pilot/agent.py, "the lane").
 *
 * Lane(stdin_fd)
 * start(task, attempt, program, argv, env, log, base=None) -> (pid, start)
 *   launch now, as launch() does; `start` is the wall-clock time (time.time()) of the launch.
 *   `base`: an Environ whose entries come before `env`'s (see launch.c).
 * queue(after, task, attempt, program, argv, env, log, base=None)
 *   launch when the attempt of task `after` now in the lane is reaped having exited 0, unless
 *   the lane has stopped by then (else it is dropped: the caller starts it, or not).
 * drop(task) -> bool: forget what was queued for `task`.
 * reap(timeout=0.0, wake_fd=-1, hold=0.0) -> [(task, attempt, pid, status, cpu, start, end, launched), ...]
 *   every attempt whose main process has ended, reaped as reap() does; `launched` holds what was
 *   queued behind it and launched at once, as (task, attempt, pid, start, errno): pid 0 and the
 *   errno when the launch failed (the caller reports that). With a `timeout` it waits for ends up
 *   to that long, gathering plain successes (exit 0, the next attempt launched behind) and
 *   returning early when `wake_fd` is readable, a signal comes, an end needs the caller (any
 *   other), or `hold` s after the first end: see reap_waiting.
 * take(task, attempt) -> (pid, pidfd, start, start_mono) or None
 *   the attempt leaves the lane, its pidfd with it (now the caller's); what was queued behind
 *   it is dropped.
 * running() -> [(task, attempt, start_mono), ...]; stop(); fileno() (readable when reap() has
 *   something); len(lane): attempts in the lane.
 *
 * Why: for a short task the agent's Python around each launch and reap costs more CPU than the
 * launch itself; here the end of one attempt and the start of the one queued behind it are one
 * call, with no Python object per attempt but its result.
 */
#include "launch.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int task, attempt, pidfd;
    pid_t pid;
    double start, start_mono;
} Live;

typedef struct {
    int task, attempt;
    Prepared args;
} Queued;   /* held by a capsule, which releases it */

typedef struct {
    PyObject_HEAD
    int epfd, stdin_fd, stopped;
    Live *live;
    Py_ssize_t nlive, cap_live;
    /* Queued launches by the task they wait for, {after: [capsule, ...]} in queue order, and
     * {task: after}: a lookup each, however many are queued (a node may queue one per core). */
    PyObject *behind, *after_of;
} Lane;

static const char QUEUED[] = "pilot._launch.Queued";

static double clock_now(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Room for one more element in a growing array; -1 (MemoryError) if none can be had. */
static int grow(void **items, Py_ssize_t *cap, Py_ssize_t count, size_t size)
{
    if (count < *cap)
        return 0;
    Py_ssize_t more = *cap ? 2 * *cap : 16;
    void *bigger = PyMem_Realloc(*items, (size_t)more * size);
    if (bigger == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *items = bigger, *cap = more;
    return 0;
}

static PyObject *Lane_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    int stdin_fd;
    static char *names[] = {"stdin_fd", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i:Lane", names, &stdin_fd))
        return NULL;
    Lane *self = (Lane *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->stdin_fd = stdin_fd;
    self->epfd = -1;   /* closed by dealloc only once opened */
    self->behind = PyDict_New();
    self->after_of = PyDict_New();
    if (self->behind == NULL || self->after_of == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    if ((self->epfd = epoll_create1(EPOLL_CLOEXEC)) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void Lane_dealloc(Lane *self)
{
    /* Attempts still here are the caller's to have taken; their processes are not ours to wait
     * for any more, but their descriptors must not leak. */
    for (Py_ssize_t i = 0; i < self->nlive; i++)
        close(self->live[i].pidfd);
    Py_CLEAR(self->behind);
    Py_CLEAR(self->after_of);
    PyMem_Free(self->live);
    if (self->epfd >= 0)
        close(self->epfd);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Watch a launched attempt; on failure it is killed and waited for, and -1 returned with an
 * exception set. */
static int add_live(Lane *self, int task, int attempt, pid_t pid, int pidfd, double start, double mono)
{
    struct epoll_event event = {.events = EPOLLIN, .data.fd = pidfd};
    int failed = grow((void **)&self->live, &self->cap_live, self->nlive, sizeof(Live)) < 0;
    if (!failed && epoll_ctl(self->epfd, EPOLL_CTL_ADD, pidfd, &event) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        failed = 1;
    }
    if (failed) {
        int status;
        long long usec;
        kill(pid, SIGKILL);
        reap_task(pid, pidfd, &status, &usec);
        return -1;
    }
    self->live[self->nlive++] = (Live){task, attempt, pidfd, pid, start, mono};
    return 0;
}

/* Take live[i] out of the lane (its pidfd out of the epoll, not closed). */
static Live remove_live(Lane *self, Py_ssize_t i)
{
    Live gone = self->live[i];
    epoll_ctl(self->epfd, EPOLL_CTL_DEL, gone.pidfd, NULL);
    self->live[i] = self->live[--self->nlive];
    return gone;
}

static void free_queued(PyObject *capsule)
{
    Queued *q = PyCapsule_GetPointer(capsule, QUEUED);
    release(&q->args);
    PyMem_Free(q);
}

/* Launch `p` as attempt (task, attempt) and watch it: NONE, a spawn_task failure (its errno in
 * *error, no exception set), or -1 when it could not be watched (it was killed and waited for;
 * an exception is set). *start is the wall-clock time of the launch. */
static int launch_live(Lane *self, int task, int attempt, const Prepared *p, pid_t *pid, double *start,
                       int *error)
{
    int pidfd = -1;
    enum failure failed;
    *start = clock_now(CLOCK_REALTIME);
    double mono = clock_now(CLOCK_MONOTONIC);
    Py_BEGIN_ALLOW_THREADS
    failed = spawn_task(p->program, p->argv, p->env, p->log, self->stdin_fd, pid, &pidfd, error);
    Py_END_ALLOW_THREADS
    if (failed != NONE)
        return failed;
    return add_live(self, task, attempt, *pid, pidfd, *start, mono);
}

static PyObject *Lane_start(Lane *self, PyObject *args)
{
    PyObject *program, *argv, *env, *log, *base = NULL;
    int task, attempt, error = 0;
    pid_t pid = 0;
    double start;
    Prepared p;
    if (!PyArg_ParseTuple(args, "iiOOOO|O:start", &task, &attempt, &program, &argv, &env, &log, &base))
        return NULL;
    if (prepare(program, argv, env, log, base, &p) < 0)
        return NULL;
    int status = launch_live(self, task, attempt, &p, &pid, &start, &error);
    release(&p);
    if (status < 0)
        return NULL;
    if (status != NONE)
        return spawn_error((enum failure)status, error, program, log);
    return Py_BuildValue("(id)", (int)pid, start);
}

static PyObject *Lane_queue(Lane *self, PyObject *args)
{
    PyObject *program, *argv, *env, *log, *base = NULL, *after_obj, *task_obj, *capsule, *list;
    int after, task, attempt;
    if (!PyArg_ParseTuple(args, "iiiOOOO|O:queue", &after, &task, &attempt, &program, &argv, &env, &log, &base))
        return NULL;
    Queued *q = PyMem_Malloc(sizeof(Queued));
    if (q == NULL)
        return PyErr_NoMemory();
    if (prepare(program, argv, env, log, base, &q->args) < 0) {
        PyMem_Free(q);
        return NULL;
    }
    q->task = task, q->attempt = attempt;
    if ((capsule = PyCapsule_New(q, QUEUED, free_queued)) == NULL) {
        release(&q->args);
        PyMem_Free(q);
        return NULL;
    }
    after_obj = PyLong_FromLong(after);
    task_obj = PyLong_FromLong(task);
    int failed = after_obj == NULL || task_obj == NULL;
    if (!failed && (list = PyDict_GetItemWithError(self->behind, after_obj)) == NULL) {
        failed = PyErr_Occurred() || (list = PyList_New(0)) == NULL ||
                 PyDict_SetItem(self->behind, after_obj, list) < 0;
        Py_XDECREF(list);   /* the dict holds it */
    }
    failed = failed || PyList_Append(list, capsule) < 0 || PyDict_SetItem(self->after_of, task_obj, after_obj) < 0;
    Py_XDECREF(after_obj);
    Py_XDECREF(task_obj);
    Py_DECREF(capsule);
    if (failed)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Lane_drop(Lane *self, PyObject *args)
{
    int task;
    if (!PyArg_ParseTuple(args, "i:drop", &task))
        return NULL;
    PyObject *task_obj = PyLong_FromLong(task);
    if (task_obj == NULL)
        return NULL;
    PyObject *after_obj = PyDict_GetItemWithError(self->after_of, task_obj);   /* borrowed */
    PyObject *list = after_obj ? PyDict_GetItemWithError(self->behind, after_obj) : NULL;
    if (list == NULL) {
        Py_DECREF(task_obj);
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_FALSE;
    }
    Py_INCREF(after_obj);
    int failed = PyDict_DelItem(self->after_of, task_obj) < 0;
    for (Py_ssize_t i = 0; !failed && i < PyList_GET_SIZE(list); i++)
        if (((Queued *)PyCapsule_GetPointer(PyList_GET_ITEM(list, i), QUEUED))->task == task) {
            failed = PySequence_DelItem(list, i) < 0;
            break;
        }
    if (!failed && PyList_GET_SIZE(list) == 0)
        failed = PyDict_DelItem(self->behind, after_obj) < 0;
    Py_DECREF(after_obj);
    Py_DECREF(task_obj);
    if (failed)
        return NULL;
    Py_RETURN_TRUE;
}

/* Launch one queued attempt (as start() does); what reap() says of it, or NULL. *failed is set
 * when the launch failed. */
static PyObject *launch_queued(Lane *self, Queued *q, int *failed)
{
    int error = 0;
    pid_t pid = 0;
    double start;
    int status = launch_live(self, q->task, q->attempt, &q->args, &pid, &start, &error);
    if (status < 0) {
        /* killed and waited for: said as a failed launch (the exception is not raised) */
        PyErr_Clear();
        error = ENOMEM;
    }
    *failed |= status != NONE;
    return Py_BuildValue("(iiidi)", q->task, q->attempt, status == NONE ? (int)pid : 0, start,
                         status == NONE ? 0 : error);
}

/* Launch (if `go`) or drop, in the order they were queued, what waited for task `after`: a
 * tuple of what was launched or failed to, or NULL with an exception set; *failed is set when a
 * launch failed (`failed` may be NULL when not `go`). */
static PyObject *launch_behind(Lane *self, int after, int go, int *failed)
{
    PyObject *after_obj = PyLong_FromLong(after), *list = NULL, *out = NULL;
    if (after_obj == NULL)
        return NULL;
    list = PyDict_GetItemWithError(self->behind, after_obj);
    if (list == NULL) {
        Py_DECREF(after_obj);
        return PyErr_Occurred() ? NULL : PyTuple_New(0);
    }
    Py_INCREF(list);
    if (PyDict_DelItem(self->behind, after_obj) < 0)
        goto done;
    Py_ssize_t n = PyList_GET_SIZE(list);
    if ((out = PyTuple_New(go ? n : 0)) == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        Queued *q = PyCapsule_GetPointer(PyList_GET_ITEM(list, i), QUEUED);
        PyObject *task_obj = PyLong_FromLong(q->task);
        if (task_obj == NULL || PyDict_DelItem(self->after_of, task_obj) < 0) {
            Py_XDECREF(task_obj);
            Py_CLEAR(out);
            goto done;
        }
        Py_DECREF(task_obj);
        if (go) {
            PyObject *item = launch_queued(self, q, failed);
            if (item == NULL) {
                Py_CLEAR(out);
                goto done;
            }
            PyTuple_SET_ITEM(out, i, item);
        }
    }
done:
    Py_DECREF(after_obj);
    Py_DECREF(list);   /* the capsules go with it, and release what they held */
    return out;
}

/* Reap every attempt of the lane whose main process has ended (never blocks), appending what
 * reap() says of each to `out`; *needs_python is set when one of them calls for the caller: it
 * did not exit 0, or nothing was launched behind it (its slot is idle), or a launch behind it
 * failed, or the lane has stopped. 0, or -1 with an exception set. */
static int reap_ready(Lane *self, PyObject *out, int *needs_python)
{
    struct epoll_event events[64];
    int n = epoll_wait(self->epfd, events, 64, 0);
    if (n < 0 && errno != EINTR) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    for (int e = 0; e < n; e++) {
        Py_ssize_t i = 0;
        while (i < self->nlive && self->live[i].pidfd != events[e].data.fd)
            i++;
        if (i == self->nlive)
            continue;   /* taken since: not ours */
        Live gone = remove_live(self, i);
        int status = 0;
        long long usec = 0;
        pid_t got;
        Py_BEGIN_ALLOW_THREADS
        got = reap_task(gone.pid, gone.pidfd, &status, &usec);
        Py_END_ALLOW_THREADS
        if (got < 0) {
            PyErr_SetFromErrno(PyExc_ChildProcessError);
            return -1;
        }
        double end = clock_now(CLOCK_REALTIME);
        int go = !self->stopped && WIFEXITED(status) && WEXITSTATUS(status) == 0;
        int failed_launch = 0;
        PyObject *launched = launch_behind(self, gone.task, go, &failed_launch);
        if (launched == NULL)
            return -1;
        if (!go || PyTuple_GET_SIZE(launched) == 0 || failed_launch)
            *needs_python = 1;
        PyObject *item = Py_BuildValue("(iiiidddN)", gone.task, gone.attempt, (int)gone.pid, status,
                                       (double)usec / 1e6, gone.start, end, launched);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            return -1;
        }
        Py_DECREF(item);
    }
    return 0;
}

/* reap() with a wait: until `timeout` s have passed, `wake_fd` is readable, a signal came, an
 * end calls for the caller (see reap_ready) or `hold` s after the first end, whichever is first.
 * Plain successes with the next attempt launched behind them are gathered meanwhile: a node of
 * short tasks costs the caller one turn per `hold`, not one per task. */
static int reap_waiting(Lane *self, PyObject *out, double timeout, int wake_fd, double hold)
{
    double began = clock_now(CLOCK_MONOTONIC), first = -1.0;
    int needs_python = 0;
    for (;;) {
        double now = clock_now(CLOCK_MONOTONIC), left = began + timeout - now;
        if (first >= 0 && first + hold - now < left)
            left = first + hold - now;
        if (left <= 0)
            return 0;
        struct pollfd fds[2] = {{.fd = self->epfd, .events = POLLIN}, {.fd = wake_fd, .events = POLLIN}};
        struct timespec wait = {.tv_sec = (time_t)left, .tv_nsec = (long)((left - (double)(time_t)left) * 1e9)};
        int ready;
        Py_BEGIN_ALLOW_THREADS
        ready = ppoll(fds, wake_fd >= 0 ? 2 : 1, &wait, NULL);
        Py_END_ALLOW_THREADS
        if (ready < 0 && errno == EINTR)
            return 0;   /* a signal: the caller's handler runs as this returns */
        if (ready < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (ready == 0)
            return 0;
        if (fds[0].revents) {
            Py_ssize_t before = PyList_GET_SIZE(out);
            if (reap_ready(self, out, &needs_python) < 0)
                return -1;
            if (first < 0 && PyList_GET_SIZE(out) > before)
                first = clock_now(CLOCK_MONOTONIC);
            if (needs_python || self->nlive == 0 || PyList_GET_SIZE(out) >= 256)
                return 0;
        }
        if (wake_fd >= 0 && fds[1].revents)
            return 0;
    }
}

static PyObject *Lane_reap(Lane *self, PyObject *args)
{
    double timeout = 0.0, hold = 0.0;
    int wake_fd = -1;
    if (!PyArg_ParseTuple(args, "|did:reap", &timeout, &wake_fd, &hold))
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    int needs_python = 0;
    int failed = timeout > 0 ? reap_waiting(self, out, timeout, wake_fd, hold) : reap_ready(self, out, &needs_python);
    if (failed < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

static PyObject *Lane_take(Lane *self, PyObject *args)
{
    int task, attempt;
    if (!PyArg_ParseTuple(args, "ii:take", &task, &attempt))
        return NULL;
    for (Py_ssize_t i = 0; i < self->nlive; i++)
        if (self->live[i].task == task && self->live[i].attempt == attempt) {
            Live gone = remove_live(self, i);
            PyObject *dropped = launch_behind(self, task, 0, NULL);   /* drops: launches nothing */
            if (dropped == NULL)
                return NULL;
            Py_DECREF(dropped);
            return Py_BuildValue("(iidd)", (int)gone.pid, gone.pidfd, gone.start, gone.start_mono);
        }
    Py_RETURN_NONE;
}

static PyObject *Lane_running(Lane *self, PyObject *unused)
{
    (void)unused;
    PyObject *out = PyList_New(self->nlive);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < self->nlive; i++) {
        PyObject *item = Py_BuildValue("(iid)", self->live[i].task, self->live[i].attempt, self->live[i].start_mono);
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, item);
    }
    return out;
}

static PyObject *Lane_stop(Lane *self, PyObject *unused)
{
    (void)unused;
    self->stopped = 1;
    Py_RETURN_NONE;
}

static PyObject *Lane_fileno(Lane *self, PyObject *unused)
{
    (void)unused;
    return PyLong_FromLong(self->epfd);
}

static Py_ssize_t Lane_len(Lane *self)
{
    return self->nlive;
}

static PyMethodDef Lane_methods[] = {
    {"start", (PyCFunction)Lane_start, METH_VARARGS, "start(task, attempt, program, argv, env, log, base=None) -> (pid, start)"},
    {"queue", (PyCFunction)Lane_queue, METH_VARARGS, "queue(after, task, attempt, program, argv, env, log, base=None)"},
    {"drop", (PyCFunction)Lane_drop, METH_VARARGS, "drop(task) -> bool"},
    {"reap", (PyCFunction)Lane_reap, METH_VARARGS,
     "reap(timeout=0.0, wake_fd=-1, hold=0.0) -> [(task, attempt, pid, status, cpu, start, end, launched)]"},
    {"take", (PyCFunction)Lane_take, METH_VARARGS, "take(task, attempt) -> (pid, pidfd, start, start_mono) or None"},
    {"running", (PyCFunction)Lane_running, METH_NOARGS, "running() -> [(task, attempt, start_mono)]"},
    {"stop", (PyCFunction)Lane_stop, METH_NOARGS, "stop(): nothing queued is launched any more"},
    {"fileno", (PyCFunction)Lane_fileno, METH_NOARGS, "fileno() -> the epoll descriptor"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods Lane_sequence = {.sq_length = (lenfunc)Lane_len};

PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pilot._launch.Lane",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Lane(stdin_fd): attempts started, watched and reaped in C (see native/lane.c).",
    .tp_new = Lane_new,
    .tp_dealloc = (destructor)Lane_dealloc,
    .tp_methods = Lane_methods,
    .tp_as_sequence = &Lane_sequence,
};
