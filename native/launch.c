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

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#define PILOT_CLOSE_RANGE_CLOEXEC (1U << 2)

/* A NULL-terminated array of the C strings of `seq` (str encoded as os.fsencode does);
 * `owned` keeps the encoded objects alive. NULL with an exception set on error. */
static char **c_strings(PyObject *seq, PyObject **owned, const char *what)
{
    PyObject *fast = PySequence_Fast(seq, what);
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject *keep = PyList_New(n);
    char **out = PyMem_Calloc((size_t)n + 1, sizeof(char *));
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
        out[i] = PyBytes_AS_STRING(encoded);
        PyList_SET_ITEM(keep, i, encoded);
    }
    Py_DECREF(fast);
    *owned = keep;
    return out;
}

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

enum failure { NONE, OPEN_LOG, VFORK, EXEC, PIDFD };

static PyObject *launch(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *program_obj, *argv_obj, *env_obj, *log_obj, *program = NULL, *log = NULL;
    PyObject *argv_keep = NULL, *env_keep = NULL, *result = NULL;
    char **argv = NULL, **env = NULL;
    int stdin_fd;
    if (!PyArg_ParseTuple(args, "OOOOi:launch", &program_obj, &argv_obj, &env_obj, &log_obj, &stdin_fd))
        return NULL;
    if (!PyUnicode_FSConverter(program_obj, &program) || !PyUnicode_FSConverter(log_obj, &log))
        goto done;
    if ((argv = c_strings(argv_obj, &argv_keep, "argv must be a sequence")) == NULL)
        goto done;
    if (argv[0] == NULL) {
        PyErr_SetString(PyExc_ValueError, "empty command");
        goto done;
    }
    if ((env = c_strings(env_obj, &env_keep, "env must be a sequence")) == NULL)
        goto done;

    const char *program_c = PyBytes_AS_STRING(program), *log_c = PyBytes_AS_STRING(log);
    volatile int exec_errno = 0;
    enum failure failed = NONE;
    int error = 0, pidfd = -1;
    pid_t pid = -1;
    Py_BEGIN_ALLOW_THREADS
    int log_fd = open(log_c, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log_fd < 0) {
        failed = OPEN_LOG, error = errno;
    } else {
        pid = vfork_exec(program_c, argv, env, stdin_fd, log_fd, &exec_errno);
        error = errno;
        close(log_fd);
        if (pid < 0) {
            failed = VFORK;
        } else if (exec_errno) {
            failed = EXEC, error = exec_errno;
            while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
                ;
        } else if ((pidfd = (int)syscall(SYS_pidfd_open, pid, 0)) < 0) {
            failed = PIDFD, error = errno;   /* it could not be watched: not left running */
            kill(pid, SIGKILL);
            while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
                ;
        }
    }
    Py_END_ALLOW_THREADS
    errno = error;
    if (failed == OPEN_LOG)
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, log_obj);
    else if (failed == EXEC)
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, program_obj);
    else if (failed != NONE)
        PyErr_SetFromErrno(PyExc_OSError);
    else
        result = Py_BuildValue("(ii)", (int)pid, pidfd);
done:
    Py_XDECREF(program);
    Py_XDECREF(log);
    Py_XDECREF(argv_keep);
    Py_XDECREF(env_keep);
    PyMem_Free(argv);
    PyMem_Free(env);
    return result;
}

static PyObject *reap(PyObject *self, PyObject *args)
{
    (void)self;
    int pid, pidfd, status = 0;
    struct rusage usage;
    pid_t got;
    if (!PyArg_ParseTuple(args, "ii:reap", &pid, &pidfd))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    killpg(pid, SIGKILL);   /* leftovers of the group; it may be empty */
    while ((got = wait4(pid, &status, 0, &usage)) < 0 && errno == EINTR)
        ;
    if (pidfd >= 0)
        close(pidfd);
    Py_END_ALLOW_THREADS
    if (got < 0)
        return PyErr_SetFromErrno(PyExc_ChildProcessError);
    /* Whole microseconds, divided once: the double nearest a 6-decimal value, as round(x, 6)
     * gives it (the caller need not round; a float round in Python costs a formatting). */
    long long usec = ((long long)usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) * 1000000LL
                   + usage.ru_utime.tv_usec + usage.ru_stime.tv_usec;
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
    return PyModule_Create(&module);
}
