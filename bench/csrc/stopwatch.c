/* Times a command from inside the agent, so the figure is the workload's own
 * wall time, without agentwatch's start-up and teardown.
 *
 *   stopwatch OUTFILE CMD [ARG...]
 *
 * Runs CMD, waits for it and writes {"elapsed_ns", "status", "user_s",
 * "sys_s"} (wall time, exit status, CPU time of CMD and its descendants) to
 * OUTFILE; exits with CMD's status. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s OUTFILE CMD [ARG...]\n", argv[0]);
		return 2;
	}
	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	pid_t pid = fork();
	if (pid < 0) {
		perror("fork");
		return 1;
	}
	if (pid == 0) {
		execvp(argv[2], argv + 2);
		perror(argv[2]);
		_exit(127);
	}
	int st = 0;
	struct rusage ru;
	while (wait4(pid, &st, 0, &ru) < 0)
		;
	clock_gettime(CLOCK_MONOTONIC, &b);
	int code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
	FILE *out = fopen(argv[1], "w");
	if (!out) {
		perror(argv[1]);
		return 1;
	}
	fprintf(out, "{\"elapsed_ns\": %.0f, \"status\": %d, \"user_s\": %.6f, \"sys_s\": %.6f}\n",
		(b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec), code,
		ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6,
		ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6);
	fclose(out);
	return code;
}
