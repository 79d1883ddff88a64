/* What native/launch.c shares with native/lane.c (one extension module, pilot._launch). */
#ifndef PILOT_LAUNCH_H
#define PILOT_LAUNCH_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sys/types.h>

enum failure { NONE, OPEN_LOG, VFORK, EXEC, PIDFD };

/* A launch's arguments in C: what the child is given, and the Python objects that own it. */
typedef struct {
    PyObject *keep;   /* program and log (bytes), the owners of argv's and env's strings, the base Environ */
    const char *program, *log;
    char **argv, **env;
} Prepared;

/* program, argv, env ("NAME=value" entries) and log as launch() takes them, and base (NULL or
 * None, or an Environ whose entries come first); 0, or -1 with an exception set. */
int prepare(PyObject *program, PyObject *argv, PyObject *env, PyObject *log, PyObject *base, Prepared *p);
void release(Prepared *p);

/* Open the log, vfork and exec, open the pidfd: without the GIL. On failure nothing is left
 * running or open and *error is the errno. */
enum failure spawn_task(const char *program, char **argv, char **env, const char *log,
                        int stdin_fd, pid_t *pid, int *pidfd, int *error);
/* Sets the OSError of a failed spawn_task; returns NULL. */
PyObject *spawn_error(enum failure failed, int error, PyObject *program, PyObject *log);

/* Kill the rest of the group of an ended child, wait for it, close its pidfd: without the GIL.
 * The pid waited for, or -1 with errno set; *usec is its user + system CPU. */
pid_t reap_task(pid_t pid, int pidfd, int *status, long long *usec);

extern PyTypeObject LaneType;

#endif
