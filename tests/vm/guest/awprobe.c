/*
 * awprobe: one attempt, reported as one JSON line on stdout.
 *
 *   awprobe [--cg CGROUP_DIR] OP ARG...
 *
 * With --cg it first moves itself into the cgroup v2 directory, so the
 * attempt runs there (awprobe itself was exec'd outside it). Built static so
 * that, in the cgroup, nothing but the attempt needs an executable mapping.
 *
 *   exec PATH [ARG...]   execv(PATH); prints only when execv fails
 *   open PATH            open(PATH, O_RDONLY) and read one byte
 *   connect PORT         TCP connect to 127.0.0.1:PORT
 *   mmapx PATH           mmap(PROT_READ|PROT_EXEC, MAP_PRIVATE) of PATH
 *   mprotect PATH        mmap(PROT_READ) of PATH, then mprotect(+PROT_EXEC)
 *   memfd PATH [ARG...]  copy PATH into a memfd and fexecve it
 *
 * Output: {"op":"...","ret":R,"errno":E}; exit status 0 when it printed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

static int report(const char *op, long ret, int err)
{
	printf("{\"op\":\"%s\",\"ret\":%ld,\"errno\":%d}\n", op, ret, ret < 0 ? err : 0);
	fflush(stdout);
	return 0;
}

static void join_cgroup(const char *dir)
{
	char path[4096], pid[32];
	snprintf(path, sizeof(path), "%s/cgroup.procs", dir);
	int fd = open(path, O_WRONLY);
	if (fd < 0) {
		perror(path);
		exit(2);
	}
	int n = snprintf(pid, sizeof(pid), "%d", getpid());
	if (write(fd, pid, n) != n) {
		perror("write cgroup.procs");
		exit(2);
	}
	close(fd);
}

int main(int argc, char **argv)
{
	int i = 1;
	if (argc > 2 && strcmp(argv[1], "--cg") == 0) {
		join_cgroup(argv[2]);
		i = 3;
	}
	if (argc - i < 2) {
		fprintf(stderr, "usage: awprobe [--cg DIR] OP ARG...\n");
		return 2;
	}
	const char *op = argv[i], *arg = argv[i + 1];
	if (strcmp(op, "exec") == 0) {
		execv(arg, &argv[i + 1]);
		return report(op, -1, errno);
	}
	if (strcmp(op, "open") == 0) {
		int fd = open(arg, O_RDONLY);
		if (fd < 0)
			return report(op, -1, errno);
		char c;
		long r = read(fd, &c, 1);
		return report(op, r < 0 ? -1 : fd, errno);
	}
	if (strcmp(op, "connect") == 0) {
		int s = socket(AF_INET, SOCK_STREAM, 0);
		if (s < 0)
			return report("socket", -1, errno);
		struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(arg))};
		sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		long r = connect(s, (struct sockaddr *)&sa, sizeof(sa));
		return report(op, r, errno);
	}
	if (strcmp(op, "kill") == 0) {         /* kill PID|self [SIG] (default 0: probe only) */
		pid_t target = strcmp(arg, "self") == 0 ? getpid() : atoi(arg);
		long r = kill(target, argc - i > 2 ? atoi(argv[i + 2]) : 0);
		return report(op, r, errno);
	}
	if (strcmp(op, "mmapx") == 0 || strcmp(op, "mprotect") == 0) {
		int fd = open(arg, O_RDONLY);
		if (fd < 0)
			return report("open", -1, errno);
		int exec_now = strcmp(op, "mmapx") == 0;
		void *p = mmap(NULL, 4096, PROT_READ | (exec_now ? PROT_EXEC : 0), MAP_PRIVATE, fd, 0);
		if (p == MAP_FAILED)
			return report(exec_now ? op : "mmap", -1, errno);
		if (exec_now)
			return report(op, 0, 0);
		long r = mprotect(p, 4096, PROT_READ | PROT_EXEC);
		return report(op, r, errno);
	}
	if (strcmp(op, "memfd") == 0) {
		int src = open(arg, O_RDONLY);
		if (src < 0)
			return report("open", -1, errno);
		int mfd = memfd_create("awprobe", MFD_CLOEXEC);
		if (mfd < 0)
			return report("memfd_create", -1, errno);
		char buf[65536];
		long n;
		while ((n = read(src, buf, sizeof(buf))) > 0)
			if (write(mfd, buf, n) != n)
				return report("write", -1, errno);
		extern char **environ;
		fexecve(mfd, &argv[i + 1], environ);
		return report(op, -1, errno);
	}
	fprintf(stderr, "awprobe: unknown op %s\n", op);
	return 2;
}
