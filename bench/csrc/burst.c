/* Opens a file as fast as it can (or at a given rate): a burst of file
 * events for the throughput and violation-under-flood benchmarks.
 *
 *   burst -n N [-p PATH] [-a ALT] [-r RATE] [-x EXTRA] [-o OUTFILE]
 *
 * N opens of PATH (default /dev/null), each closed at once; with -a, every
 * other open is of ALT, so no two calls in a row are the same and the kernel
 * folds none into a repeat count (bpf/common.bpf.c); with -r, paced
 * to RATE opens per second; with -x, EXTRA is opened (read) once halfway
 * through (the violation in the flood). Prints one JSON line with the time
 * taken to OUTFILE (or stdout). Static, so the only other events are its exec
 * and exit, like tests/kernel/csrc/burst.c. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	long n = 100000;
	double rate = 0;
	const char *path = "/dev/null", *alt = NULL, *extra = NULL, *outfile = NULL;
	int c;
	while ((c = getopt(argc, argv, "n:p:a:r:x:o:")) != -1) {
		switch (c) {
		case 'n': n = atol(optarg); break;
		case 'p': path = optarg; break;
		case 'a': alt = optarg; break;
		case 'r': rate = atof(optarg); break;
		case 'x': extra = optarg; break;
		case 'o': outfile = optarg; break;
		default:
			fprintf(stderr, "usage: %s -n N [-p PATH] [-a ALT] [-r RATE] [-x EXTRA] [-o OUT]\n", argv[0]);
			return 2;
		}
	}
	int extra_ok = -1;
	double t0 = now_ns();
	for (long i = 0; i < n; i++) {
		if (extra && i == n / 2) {
			int fd = open(extra, O_RDONLY);
			extra_ok = fd >= 0;
			if (fd >= 0)
				close(fd);
		}
		int fd = open(alt && (i & 1) ? alt : path, O_RDONLY);
		if (fd >= 0)
			close(fd);
		if (rate > 0 && (i & 63) == 63) {
			/* pace: wait until i opens are due */
			double due = t0 + (i + 1) * 1e9 / rate;
			while (now_ns() < due)
				;
		}
	}
	double dt = now_ns() - t0;
	FILE *out = stdout;
	if (outfile && !(out = fopen(outfile, "w"))) {
		perror(outfile);
		return 1;
	}
	fprintf(out, "{\"n\": %ld, \"elapsed_ns\": %.0f, \"rate\": %.1f, \"extra_opened\": %d}\n",
		n, dt, n / (dt / 1e9), extra_ok);
	return fclose(out) ? 1 : 0;
}
