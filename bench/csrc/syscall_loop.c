/* Syscall micro-loops for the host-tax and syscall-storm benchmarks.
 *
 *   syscall_loop N [OUTFILE]
 *
 * Runs N x getppid() and N x (openat("/dev/null") + close), each after a
 * short warm-up, and prints one JSON line with the nanoseconds per iteration
 * to OUTFILE (or stdout). Static, so when it runs as an agent the only other
 * events are its exec and exit. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static double getppid_loop(long n)
{
	double t0 = now_ns();
	for (long i = 0; i < n; i++)
		syscall(SYS_getppid);   /* not the libc wrapper: never cached */
	return (now_ns() - t0) / n;
}

static double open_close_loop(long n)
{
	double t0 = now_ns();
	for (long i = 0; i < n; i++) {
		int fd = openat(AT_FDCWD, "/dev/null", O_RDONLY);
		if (fd >= 0)
			close(fd);
	}
	return (now_ns() - t0) / n;
}

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 1000000;
	if (n < 1)
		n = 1;
	long warm = n / 20 + 1;
	getppid_loop(warm);
	double g = getppid_loop(n);
	open_close_loop(warm / 4 + 1);
	double o = open_close_loop(n);
	FILE *out = stdout;
	if (argc > 2 && !(out = fopen(argv[2], "w"))) {
		perror(argv[2]);
		return 1;
	}
	fprintf(out, "{\"n\": %ld, \"getppid_ns\": %.2f, \"openclose_ns\": %.2f}\n", n, g, o);
	return fclose(out) ? 1 : 0;
}
