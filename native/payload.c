/*
 * payload: a precise test task for pilot.
 *
 *   payload [--mem MB] [--ramp SECONDS] [--cpu SECONDS | --sleep SECONDS]
 *           [--child-mem MB] [--record FILE] [--marker FILE]
 *           [--exit CODE] [--signal SIGNUM]
 *
 * --mem MB        allocate and touch MB megabytes (all at once, or over --ramp seconds)
 * --ramp S        touch the memory gradually over S seconds (then the hold phase follows)
 * --cpu S         burn S seconds of CPU after allocating
 * --sleep S       sleep S seconds after allocating
 * --child-mem MB  fork a child that allocates and touches MB megabytes and lives as long as the parent works
 * --record FILE   append "task node attempt start end pid memory_mb" to FILE with one write
 *                 (times in epoch seconds; task, node, attempt and memory from PILOT_TASK_ID,
 *                 PILOT_NODE, PILOT_ATTEMPT and PILOT_MEMORY_MB)
 * --marker FILE   write "pid pgid child_pid" to FILE once the work starts
 * --exit CODE     exit with CODE (default 0)
 * --signal S      die by signal S at the end (e.g. 11 for a segfault)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MB (1024L * 1024L)

struct opts {
    long mem_mb, child_mem_mb;
    double ramp_s, cpu_s, sleep_s;
    const char *record, *marker;
    int exit_code, signum;
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void sleep_for(double s) {
    if (s <= 0) return;
    struct timespec ts = {(time_t)s, (long)((s - (time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {}
}

/* Allocate and touch mb megabytes, spreading the touching over ramp_s seconds. */
static char *allocate(long mb, double ramp_s) {
    if (mb <= 0) return NULL;
    char *buf = malloc((size_t)mb * MB);
    if (!buf) { perror("payload: malloc"); exit(120); }
    for (long i = 0; i < mb; i++) {
        memset(buf + i * MB, (int)(i & 0xff) | 1, MB);
        if (ramp_s > 0) sleep_for(ramp_s / mb);
    }
    return buf;
}

static void burn(double cpu_s) {
    double end = cpu_now() + cpu_s;
    volatile double x = 1.0;
    while (cpu_now() < end)
        for (int i = 0; i < 100000; i++) x = x * 1.0000001 + 1e-9;
}

static void work(const struct opts *o) {
    if (o->cpu_s > 0) burn(o->cpu_s);
    sleep_for(o->sleep_s);
}

static pid_t start_child(const struct opts *o) {
    if (o->child_mem_mb <= 0) return 0;
    pid_t pid = fork();
    if (pid < 0) { perror("payload: fork"); exit(121); }
    if (pid == 0) {
        char *buf = allocate(o->child_mem_mb, o->ramp_s);
        /* Lives until the parent is done (or killed with it). */
        sleep_for(o->sleep_s + o->cpu_s + 1.0);
        free(buf);
        _exit(0);
    }
    return pid;
}

static void write_file(const char *path, const char *text, int flags) {
    int fd = open(path, O_WRONLY | O_CREAT | flags, 0644);
    if (fd < 0) { perror(path); exit(122); }
    size_t len = strlen(text);
    if (write(fd, text, len) != (ssize_t)len) { perror(path); exit(122); }
    close(fd);
}

static const char *env_or(const char *name, const char *fallback) {
    const char *v = getenv(name);
    return (v && *v) ? v : fallback;
}

static void record(const struct opts *o, double start, double end) {
    if (!o->record) return;
    char line[1024];
    snprintf(line, sizeof line, "%s %s %s %.6f %.6f %d %s\n", env_or("PILOT_TASK_ID", "-"),
             env_or("PILOT_NODE", "-"), env_or("PILOT_ATTEMPT", "0"), start, end, (int)getpid(),
             env_or("PILOT_MEMORY_MB", "0"));
    write_file(o->record, line, O_APPEND);
}

static void marker(const struct opts *o, pid_t child) {
    if (!o->marker) return;
    char text[128];
    snprintf(text, sizeof text, "%d %d %d\n", (int)getpid(), (int)getpgrp(), (int)child);
    write_file(o->marker, text, O_TRUNC);
}

static void parse(int argc, char **argv, struct opts *o) {
    static const struct option longopts[] = {
        {"mem", required_argument, 0, 'm'},       {"ramp", required_argument, 0, 'r'},
        {"cpu", required_argument, 0, 'c'},       {"sleep", required_argument, 0, 's'},
        {"child-mem", required_argument, 0, 'M'}, {"record", required_argument, 0, 'R'},
        {"marker", required_argument, 0, 'k'},    {"exit", required_argument, 0, 'e'},
        {"signal", required_argument, 0, 'S'},    {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 'm': o->mem_mb = atol(optarg); break;
        case 'r': o->ramp_s = atof(optarg); break;
        case 'c': o->cpu_s = atof(optarg); break;
        case 's': o->sleep_s = atof(optarg); break;
        case 'M': o->child_mem_mb = atol(optarg); break;
        case 'R': o->record = optarg; break;
        case 'k': o->marker = optarg; break;
        case 'e': o->exit_code = atoi(optarg); break;
        case 'S': o->signum = atoi(optarg); break;
        default: fprintf(stderr, "usage: see the comment at the top of payload.c\n"); exit(2);
        }
    }
}

int main(int argc, char **argv) {
    struct opts o = {0};
    parse(argc, argv, &o);
    double start = now();
    pid_t child = start_child(&o);
    marker(&o, child);
    char *buf = allocate(o.mem_mb, o.ramp_s);
    work(&o);
    if (child > 0) { kill(child, SIGTERM); waitpid(child, NULL, 0); }
    free(buf);
    /* From the record on, no signal: a kill arriving between the record and the exit (a drain
       stops every running task) would make a task that recorded its completion look interrupted,
       and it would run again. */
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, NULL);
    record(&o, start, now());
    if (o.signum > 0) {
        sigset_t one;
        sigemptyset(&one);
        sigaddset(&one, o.signum);
        signal(o.signum, SIG_DFL);
        sigprocmask(SIG_UNBLOCK, &one, NULL);
        raise(o.signum);
    }
    _exit(o.exit_code);
}
