/* pilot._launch: start and reap a task's process in one call each (see pilot/spawn.py).
 *
 * launch(program, argv, env, log, stdin_fd) -> (pid, pidfd)
 *   vfork and exec `program` with `argv` and `env` (sequences of str or bytes, env entries as
 *   "NAME=value") in a session of its own; stdin is a copy of `stdin_fd`, stdout and stderr
 *   are appended to `log` (created 0644). It gets SIGKILL if the calling thread ends first
 *   (the agent's main thread: the agent died). The child inherits no descriptor but 0-2, gets SIGPIPE
 *   and SIGXFSZ at their defaults (Python ignores them) and an empty signal mask. An exec that
 *   fails is reported by the child through memory it shares with the parent until exec (vfork):
 *   no error pipe. Raises OSError (the log cannot be opened, the program cannot be run).
 *
 * Environ(entries): environment entries converted once for many launches (those of one label
 *   on one node share all their variables but the task's id and attempt). Lane.start and
 *   Lane.queue take one as `base`: the child's environment is its entries, then `env`'s. Each
 *   launch then converts only its own few entries, not the agent's whole environment.
 *
 * reap(pid, pidfd) -> (status, cpu_seconds)
 *   for a child whose main process has ended (its pidfd is readable): kill what is left of its
 *   process group while the leader is a zombie (its pid cannot have been reused), wait for it,
 *   close the pidfd. cpu_seconds is user + system time from wait4, to the microsecond.
 *
 * close_range_usable() -> bool: whether the kernel has close_range(CLOSE_RANGE_CLOEXEC)
 *   (Linux >= 5.11), which the child needs to keep descriptors from the task.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "launch.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#define PILOT_CLOSE_RANGE_CLOEXEC (1U << 2)

/* A NULL-terminated array of the `nfirst` strings of `first` (owned elsewhere), then the C
 * strings of `seq` (str encoded as os.fsencode does); `owned` keeps the encoded objects alive.
 * NULL with an exception set on error. */
static char **c_strings(PyObject *seq, PyObject **owned, const char *what, char **first, Py_ssize_t nfirst)
{
    PyObject *fast = PySequence_Fast(seq, what);
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject *keep = PyList_New(n);
    char **out = PyMem_Calloc((size_t)(nfirst + n) + 1, sizeof(char *));
    if (keep == NULL || out == NULL) {
        Py_DECREF(fast);
        Py_XDECREF(keep);
        PyMem_Free(out);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *encoded = NULL;
        if (!PyUnicode_FSConverter(PySequence_Fast_GET_ITEM(fast, i), &encoded)) {
            Py_DECREF(fast);
            Py_DECREF(keep);
            PyMem_Free(out);
            return NULL;   /* TypeError, or ValueError for an embedded NUL */
        }
        out[nfirst + i] = PyBytes_AS_STRING(encoded);
        PyList_SET_ITEM(keep, i, encoded);
    }
    if (nfirst > 0)
        memcpy(out, first, (size_t)nfirst * sizeof(char *));
    Py_DECREF(fast);
    *owned = keep;
    return out;
}

typedef struct {
    PyObject_HEAD
    Py_ssize_t n;
    char **entries;   /* NULL-terminated; the strings belong to `owned` */
    PyObject *owned;
} Environ;

static PyObject *Environ_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *entries;
    static char *names[] = {"entries", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:Environ", names, &entries))
        return NULL;
    Environ *self = (Environ *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->entries = c_strings(entries, &self->owned, "entries must be a sequence", NULL, 0);
    if (self->entries == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->n = PyList_GET_SIZE(self->owned);
    return (PyObject *)self;
}

static void Environ_dealloc(Environ *self)
{
    PyMem_Free(self->entries);
    Py_XDECREF(self->owned);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t Environ_len(Environ *self)
{
    return self->n;
}

static PySequenceMethods Environ_sequence = {.sq_length = (lenfunc)Environ_len};

static PyTypeObject EnvironType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pilot._launch.Environ",
    .tp_doc = "Environ(entries): environment entries converted once, for Lane.start/queue's base",
    .tp_basicsize = sizeof(Environ),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Environ_new,
    .tp_dealloc = (destructor)Environ_dealloc,
    .tp_as_sequence = &Environ_sequence,
};

/* The child, between vfork and exec: only async-signal-safe calls, no allocation, nothing
 * written to the parent's memory but *exec_errno. Every signal is blocked on entry. */
static void child(const char *program, char **argv, char **env, int stdin_fd, int log_fd,
                  pid_t agent, volatile int *exec_errno)
{
    struct sigaction dfl;
    sigset_t pending, none;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    if (setsid() < 0)
        goto fail;
    /* Killed if the agent dies (kill -9, a crash): outside a Slurm step, whose cgroup ends what
     * is left, nothing else would stop it. Only this process: its own children outlive it. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0 || getppid() != agent)
        goto fail;
    /* A signal sent to the agent's group before setsid is pending here; unblocked, it would run
     * the agent's handler in memory shared with the agent. Such signals get their default
     * action instead (after setsid no group signal of the agent reaches this process). */
    if (sigpending(&pending) == 0)
        for (int sig = 1; sig < NSIG; sig++)
            if (sig != SIGKILL && sig != SIGSTOP && sigismember(&pending, sig) == 1)
                sigaction(sig, &dfl, NULL);
    sigaction(SIGPIPE, &dfl, NULL);
    sigaction(SIGXFSZ, &dfl, NULL);
    /* A process started without its stdio may get 0-2 for these: moved up first, so that the
     * dup2 calls below neither overwrite one with the other nor leave one close-on-exec. */
    if ((stdin_fd < 3 && (stdin_fd = fcntl(stdin_fd, F_DUPFD, 3)) < 0) ||
        (log_fd < 3 && (log_fd = fcntl(log_fd, F_DUPFD, 3)) < 0))
        goto fail;
    if (dup2(stdin_fd, 0) < 0 || dup2(log_fd, 1) < 0 || dup2(log_fd, 2) < 0)
        goto fail;
    if (syscall(SYS_close_range, 3U, ~0U, PILOT_CLOSE_RANGE_CLOEXEC) < 0)
        goto fail;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    execve(program, argv, env);
fail:
    *exec_errno = errno ? errno : ENOEXEC;
    _exit(127);
}

/* vfork and run `child`; the parent goes on once the child has exec'd or exited. Kept apart
 * from launch so that no local of launch lives across the vfork. */
static __attribute__((noinline)) pid_t vfork_exec(const char *program, char **argv, char **env,
                                                  int stdin_fd, int log_fd, volatile int *exec_errno)
{
    /* Blocked in the child until just before exec: no signal runs a handler of this process
     * in the memory it shares with the child. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid_t agent = getpid(), pid = vfork();
    if (pid == 0)
        child(program, argv, env, stdin_fd, log_fd, agent, exec_errno);
    int error = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    errno = error;
    return pid;
}

/* Open the log, vfork and exec, open the pidfd; called without the GIL. On failure nothing is
 * left running or open, and *error holds the errno. */
enum failure spawn_task(const char *program, char **argv, char **env, const char *log,
                               int stdin_fd, pid_t *pid_out, int *pidfd_out, int *error)
{
    volatile int exec_errno = 0;
    enum failure failed = NONE;
    int pidfd = -1;
    pid_t pid = -1;
    *error = 0;
    int log_fd = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log_fd < 0) {
        *error = errno;
        return OPEN_LOG;
    }
    pid = vfork_exec(program, argv, env, stdin_fd, log_fd, &exec_errno);
    *error = errno;
    close(log_fd);
    if (pid < 0) {
        failed = VFORK;
    } else if (exec_errno) {
        failed = EXEC, *error = exec_errno;
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
    } else if ((pidfd = (int)syscall(SYS_pidfd_open, pid, 0)) < 0) {
        failed = PIDFD, *error = errno;   /* it could not be watched: not left running */
        kill(pid, SIGKILL);
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
    }
    *pid_out = pid, *pidfd_out = pidfd;
    return failed;
}

/* The OSError of a failed spawn_task (NULL returned for the caller to pass on). */
PyObject *spawn_error(enum failure failed, int error, PyObject *program, PyObject *log)
{
    errno = error;
    if (failed == OPEN_LOG)
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, log);
    if (failed == EXEC)
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, program);
    return PyErr_SetFromErrno(PyExc_OSError);
}

void release(Prepared *p)
{
    Py_CLEAR(p->keep);
    PyMem_Free(p->argv);
    PyMem_Free(p->env);
    p->argv = p->env = NULL;
}

/* 0, or -1 with an exception set (TypeError, or ValueError for an empty argv or an embedded NUL).
 * `base` (NULL or None: none) is an Environ whose entries come before `env`'s; `p` keeps it. */
int prepare(PyObject *program_obj, PyObject *argv_obj, PyObject *env_obj, PyObject *log_obj,
            PyObject *base_obj, Prepared *p)
{
    PyObject *program = NULL, *log = NULL, *argv_keep = NULL, *env_keep = NULL;
    Environ *base = NULL;
    memset(p, 0, sizeof *p);
    if (base_obj != NULL && base_obj != Py_None) {
        if (!PyObject_TypeCheck(base_obj, &EnvironType)) {
            PyErr_SetString(PyExc_TypeError, "base must be an Environ");
            return -1;
        }
        base = (Environ *)base_obj;
    }
    if (!PyUnicode_FSConverter(program_obj, &program) || !PyUnicode_FSConverter(log_obj, &log))
        goto fail;
    if ((p->argv = c_strings(argv_obj, &argv_keep, "argv must be a sequence", NULL, 0)) == NULL)
        goto fail;
    if (p->argv[0] == NULL) {
        PyErr_SetString(PyExc_ValueError, "empty command");
        goto fail;
    }
    p->env = c_strings(env_obj, &env_keep, "env must be a sequence", base ? base->entries : NULL, base ? base->n : 0);
    if (p->env == NULL)
        goto fail;
    if ((p->keep = PyTuple_Pack(5, program, log, argv_keep, env_keep, base ? base_obj : Py_None)) == NULL)
        goto fail;
    p->program = PyBytes_AS_STRING(program), p->log = PyBytes_AS_STRING(log);
    Py_DECREF(program), Py_DECREF(log), Py_DECREF(argv_keep), Py_DECREF(env_keep);
    return 0;
fail:
    Py_XDECREF(program), Py_XDECREF(log), Py_XDECREF(argv_keep), Py_XDECREF(env_keep);
    release(p);
    return -1;
}

static PyObject *launch(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *program_obj, *argv_obj, *env_obj, *log_obj;
    Prepared p;
    int stdin_fd, pidfd, error;
    pid_t pid;
    enum failure failed;
    if (!PyArg_ParseTuple(args, "OOOOi:launch", &program_obj, &argv_obj, &env_obj, &log_obj, &stdin_fd))
        return NULL;
    if (prepare(program_obj, argv_obj, env_obj, log_obj, NULL, &p) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    failed = spawn_task(p.program, p.argv, p.env, p.log, stdin_fd, &pid, &pidfd, &error);
    Py_END_ALLOW_THREADS
    release(&p);
    if (failed != NONE)
        return spawn_error(failed, error, program_obj, log_obj);
    return Py_BuildValue("(ii)", (int)pid, pidfd);
}

/* Kill what is left of the group of `pid` (a zombie: its pid cannot have been reused), wait for
 * it, close its pidfd; called without the GIL. The waited pid or -1 (errno set). */
pid_t reap_task(pid_t pid, int pidfd, int *status, long long *usec)
{
    struct rusage usage;
    pid_t got;
    memset(&usage, 0, sizeof usage);
    killpg(pid, SIGKILL);   /* leftovers of the group; it may be empty */
    while ((got = wait4(pid, status, 0, &usage)) < 0 && errno == EINTR)
        ;
    int error = errno;
    if (pidfd >= 0)
        close(pidfd);
    errno = error;
    /* Whole microseconds, divided once by the caller: the double nearest a 6-decimal value, as
     * round(x, 6) gives it (the caller need not round; a float round in Python costs a formatting). */
    *usec = ((long long)usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) * 1000000LL
          + usage.ru_utime.tv_usec + usage.ru_stime.tv_usec;
    return got;
}

static PyObject *reap(PyObject *self, PyObject *args)
{
    (void)self;
    int pid, pidfd, status = 0;
    long long usec = 0;
    pid_t got;
    if (!PyArg_ParseTuple(args, "ii:reap", &pid, &pidfd))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    got = reap_task(pid, pidfd, &status, &usec);
    Py_END_ALLOW_THREADS
    if (got < 0)
        return PyErr_SetFromErrno(PyExc_ChildProcessError);
    return Py_BuildValue("(id)", status, (double)usec / 1e6);
}

static PyObject *close_range_usable(PyObject *self, PyObject *unused)
{
    (void)self, (void)unused;
    /* A range holding no descriptor: changes nothing, fails only where the call or flag is unknown. */
    return PyBool_FromLong(syscall(SYS_close_range, ~0U - 1, ~0U, PILOT_CLOSE_RANGE_CLOEXEC) == 0);
}

static PyMethodDef methods[] = {
    {"launch", launch, METH_VARARGS, "launch(program, argv, env, log, stdin_fd) -> (pid, pidfd)"},
    {"reap", reap, METH_VARARGS, "reap(pid, pidfd) -> (status, cpu_seconds)"},
    {"close_range_usable", close_range_usable, METH_NOARGS, "close_range_usable() -> bool"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "pilot._launch",
    "Start and reap task processes (see pilot/spawn.py).", -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__launch(void)
{
    if (PyType_Ready(&LaneType) < 0 || PyType_Ready(&EnvironType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Lane", (PyObject *)&LaneType) < 0 ||
        PyModule_AddObjectRef(m, "Environ", (PyObject *)&EnvironType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
