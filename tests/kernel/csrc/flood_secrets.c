/* A benign flood with violations in it: for each PATH, N opens of /dev/null
 * and /dev/zero in turn (far more records than the bulk ring buffer holds;
 * in turn, so that the kernel folds none into a repeat), then one read-only open
 * of PATH. Static, so the only other records are its exec and exit.
 * Exits 0 when every PATH was opened. */
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 20000;
	int failed = 0;
	for (int p = 2; p < argc; p++) {
		for (long i = 0; i < n; i++) {
			int fd = open(i & 1 ? "/dev/zero" : "/dev/null", O_RDONLY);
			if (fd >= 0)
				close(fd);
		}
		int fd = open(argv[p], O_RDONLY);
		if (fd < 0)
			failed = 1;
		else
			close(fd);
	}
	return failed;
}
