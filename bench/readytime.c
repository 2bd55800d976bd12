/* readytime.c — how long a daemon takes from exec to READY=1.
 *
 * Plays the service manager's part of Type=notify: binds a datagram socket, starts the command
 * with NOTIFY_SOCKET pointing at it, and times from just before the fork to the datagram that
 * carries READY=1; then stops the daemon with SIGTERM and waits for it. Repeats -n times and
 * prints each run and the median, as "READYTIME ..." lines.
 *
 * Usage: readytime [-n RUNS] [-t TIMEOUT_S] -- COMMAND [ARGS...]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double) ts.tv_sec * 1e3 + (double) ts.tv_nsec / 1e6;
}

static int cmp_double(const void *a, const void *b) {
        double x = *(const double *) a, y = *(const double *) b;

        return x < y ? -1 : x > y;
}

/* One start: the time to READY=1 in ms, or a negative value when it never came. */
static double one_run(char **cmd, double timeout_ms) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        char dir[] = "/tmp/readytime.XXXXXX";
        double t0, ready = -1;
        pid_t pid;
        int fd, status;

        if (!mkdtemp(dir)) {
                perror("readytime: mkdtemp");
                exit(2);
        }
        snprintf(sa.sun_path, sizeof sa.sun_path, "%s/notify", dir);
        fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *) &sa, sizeof sa) < 0) {
                perror("readytime: notify socket");
                exit(2);
        }

        t0 = now_ms();
        pid = fork();
        if (pid < 0) {
                perror("readytime: fork");
                exit(2);
        }
        if (pid == 0) {
                setenv("NOTIFY_SOCKET", sa.sun_path, 1);
                execvp(cmd[0], cmd);
                perror("readytime: exec");
                _exit(127);
        }
        while (ready < 0) {
                struct pollfd p = { .fd = fd, .events = POLLIN };
                double left = timeout_ms - (now_ms() - t0);
                char buf[4096];
                ssize_t n;

                if (left <= 0)
                        break;
                if (poll(&p, 1, (int) left + 1) <= 0)
                        continue;
                n = recv(fd, buf, sizeof buf - 1, 0);
                if (n <= 0)
                        continue;
                buf[n] = 0;
                if (strncmp(buf, "READY=1", 7) == 0 || strstr(buf, "\nREADY=1"))
                        ready = now_ms() - t0;
        }
        kill(pid, SIGTERM);
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
                ;
        close(fd);
        unlink(sa.sun_path);
        rmdir(dir);
        return ready;
}

int main(int argc, char **argv) {
        unsigned runs = 5;
        double timeout_ms = 30000, *times;
        unsigned ok = 0;
        int o;

        while ((o = getopt(argc, argv, "+n:t:")) != -1) {
                switch (o) {
                case 'n': runs = (unsigned) strtoul(optarg, NULL, 10); break;
                case 't': timeout_ms = atof(optarg) * 1000; break;
                default:
                        fprintf(stderr, "Usage: readytime [-n RUNS] [-t TIMEOUT_S] -- COMMAND [ARGS...]\n");
                        return 2;
                }
        }
        if (optind >= argc || runs == 0) {
                fprintf(stderr, "Usage: readytime [-n RUNS] [-t TIMEOUT_S] -- COMMAND [ARGS...]\n");
                return 2;
        }
        times = calloc(runs, sizeof *times);
        if (!times)
                return 2;
        for (unsigned i = 0; i < runs; i++) {
                double ms = one_run(argv + optind, timeout_ms);

                printf("READYTIME run=%u ms=%.2f\n", i + 1, ms);
                if (ms >= 0)
                        times[ok++] = ms;
        }
        if (ok == 0) {
                printf("READYTIME median_ms=-1 min_ms=-1 max_ms=-1 failed=%u\n", runs);
                return 1;
        }
        qsort(times, ok, sizeof *times, cmp_double);
        printf("READYTIME median_ms=%.2f min_ms=%.2f max_ms=%.2f failed=%u\n",
               times[ok / 2], times[0], times[ok - 1], runs - ok);
        return 0;
}
