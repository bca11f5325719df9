/* Opens a file N times as fast as it can: a burst of file events.
 *   burst N [PATH [ALT]]
 * With ALT, every other open is of ALT: no two calls in a row are the same,
 * so the kernel folds none of them into a repeat count (bpf/common.bpf.c).
 * Static, so the only events are this loop, its exec and its exit. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 100000;
	const char *path = argc > 2 ? argv[2] : "/dev/null";
	const char *alt = argc > 3 ? argv[3] : path;
	for (long i = 0; i < n; i++) {
		int fd = open(i & 1 ? alt : path, O_RDONLY);
		if (fd >= 0)
			close(fd);
	}
	return 0;
}
