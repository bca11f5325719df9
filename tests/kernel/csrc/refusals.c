/* Tries, one raw syscall at a time, each thing a layer of agentwatch's
 * sandbox refuses, and a few it allows (tests/kernel/test_refusals.py):
 *
 *   refusals WS RO OUTSIDE TCP_PORT ABSTRACT_NAME
 *
 * WS is writable, RO readable only, OUTSIDE neither; TCP_PORT a loopback
 * port the policy does not allow; ABSTRACT_NAME an abstract unix socket
 * listening outside the run. One line per attempt, flushed at once:
 *
 *   ATTEMPT <name> <ok | errno name>
 *
 * Static and raw (syscall(2)), so each attempt is exactly the call named and
 * the only other events are the exec, the forks and the exits. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/sysmacros.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <unistd.h>

#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif

static char buf[4096];

static const char *at(const char *dir, const char *name)
{
	static char paths[8][512];
	static int next;
	char *p = paths[next++ % 8];
	snprintf(p, 512, "%s/%s", dir, name);
	return p;
}

static void report(const char *name, long ret)
{
	const char *what = "ok";
	if (ret < 0) {
		int e = errno;
		switch (e) {
		case EACCES: what = "EACCES"; break;
		case EPERM: what = "EPERM"; break;
		case EROFS: what = "EROFS"; break;
		case EXDEV: what = "EXDEV"; break;
		case EBUSY: what = "EBUSY"; break;
		case EAGAIN: what = "EAGAIN"; break;
		case ENOENT: what = "ENOENT"; break;
		case ENOSYS: what = "ENOSYS"; break;
		case ENOTTY: what = "ENOTTY"; break;
		case ECONNREFUSED: what = "ECONNREFUSED"; break;
		default: snprintf(buf, sizeof(buf), "E%d", e); what = buf;
		}
	}
	printf("ATTEMPT %s %s\n", name, what);
	fflush(stdout);
}

static long closing(long fd)
{
	if (fd >= 0)
		close(fd);
	return fd;
}

#define TRY(name, call) report(name, closing(call))
#define TRY_NOCLOSE(name, call) report(name, (call))

static int fork_until_refused(void)
{
	pid_t kids[256];
	int n = 0;
	long ret = 0;
	while (n < 256) {
		ret = syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
		if (ret == 0) {
			pause();
			_exit(0);
		}
		if (ret < 0)
			break;
		kids[n++] = ret;
	}
	report("clone-pids-limit", ret < 0 ? -1 : 0);
	for (int i = 0; i < n; i++) {
		kill(kids[i], SIGKILL);
		waitpid(kids[i], NULL, 0);
	}
	return n;
}

int main(int argc, char **argv)
{
	if (argc < 6) {
		fprintf(stderr, "usage: refusals WS RO OUTSIDE TCP_PORT ABSTRACT_NAME\n");
		return 2;
	}
	const char *ws = argv[1], *ro = argv[2], *out = argv[3];
	int port = atoi(argv[4]);
	const char *abstract = argv[5];

	/* allowed: none of these may be reported */
	TRY("allowed-open-ws", syscall(SYS_openat, AT_FDCWD, at(ws, "mine"), O_WRONLY | O_CREAT, 0644));
	TRY("allowed-mkdir-ws", syscall(SYS_mkdir, at(ws, "d"), 0755));
	TRY("allowed-rename-ws", syscall(SYS_rename, at(ws, "mine"), at(ws, "mine2")));
	TRY("allowed-mknod-fifo-ws", syscall(SYS_mknodat, AT_FDCWD, at(ws, "fifo"), S_IFIFO | 0644, 0));
	TRY("allowed-read-ro", syscall(SYS_openat, AT_FDCWD, at(ro, "file"), O_RDONLY));
	TRY("allowed-socket-inet", syscall(SYS_socket, AF_INET, SOCK_DGRAM, 0));

	/* Landlock: files */
	TRY("landlock-open-read", syscall(SYS_openat, AT_FDCWD, at(out, "secret"), O_RDONLY));
	TRY("landlock-open-legacy", syscall(SYS_open, at(out, "secret2"), O_RDONLY));
	TRY("landlock-open-write", syscall(SYS_openat, AT_FDCWD, at(ro, "file"), O_WRONLY));
	TRY("landlock-creat", syscall(SYS_creat, at(ro, "new"), 0644));
	TRY("landlock-truncate", syscall(SYS_truncate, at(ro, "t"), 0));
	TRY("landlock-unlink", syscall(SYS_unlink, at(ro, "u")));
	TRY("landlock-rmdir", syscall(SYS_rmdir, at(ro, "dir")));
	TRY("landlock-mkdir", syscall(SYS_mkdir, at(ro, "newdir"), 0755));
	TRY("landlock-mknod-fifo", syscall(SYS_mknodat, AT_FDCWD, at(ro, "fifo"), S_IFIFO | 0644, 0));
	TRY("landlock-mknod-char", syscall(SYS_mknodat, AT_FDCWD, at(ws, "null"), S_IFCHR | 0666,
					   makedev(1, 3)));
	TRY("landlock-symlink", syscall(SYS_symlinkat, "x", AT_FDCWD, at(ro, "link")));
	TRY("landlock-link", syscall(SYS_linkat, AT_FDCWD, at(ws, "mine2"), AT_FDCWD, at(ro, "hard"), 0));
	TRY("landlock-rename", syscall(SYS_renameat2, AT_FDCWD, at(ro, "r"), AT_FDCWD,
				       at(ws, "stolen"), 0));
	{
		char *const av[] = {"prog", NULL};
		TRY_NOCLOSE("landlock-exec", syscall(SYS_execve, at(ro, "prog"), av, NULL));
	}
	{
		int fd = syscall(SYS_openat, AT_FDCWD, "/dev/zero", O_RDONLY);
		int n;
		TRY_NOCLOSE("landlock-ioctl-dev", syscall(SYS_ioctl, fd, FIONREAD, &n));
		close(fd);
	}

	/* Landlock: TCP port (ABI 4) and abstract unix scope (ABI 6) */
	{
		int s = socket(AF_INET, SOCK_STREAM, 0);
		struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
		a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		TRY_NOCLOSE("landlock-tcp-connect", syscall(SYS_connect, s, &a, sizeof(a)));
		close(s);
	}
	{
		int s = socket(AF_UNIX, SOCK_STREAM, 0);
		struct sockaddr_un a = {.sun_family = AF_UNIX};
		size_t n = strlen(abstract);
		memcpy(a.sun_path + 1, abstract, n);
		TRY_NOCLOSE("landlock-abstract-unix", syscall(SYS_connect, s, &a,
					offsetof(struct sockaddr_un, sun_path) + 1 + n));
		close(s);
	}

	/* cgroup BPF egress */
	{
		int s = socket(AF_INET, SOCK_DGRAM, 0);
		struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(53)};
		a.sin_addr.s_addr = inet_addr("192.0.2.1");
		TRY_NOCLOSE("egress-udp-sendto", syscall(SYS_sendto, s, "x", 1, 0, &a, sizeof(a)));
		a.sin_addr.s_addr = inet_addr("192.0.2.2");
		TRY_NOCLOSE("egress-udp-connect", syscall(SYS_connect, s, &a, sizeof(a)));
		close(s);
	}

	/* seccomp */
	TRY_NOCLOSE("seccomp-ptrace", syscall(SYS_ptrace, 0 /* PTRACE_TRACEME */, 0, 0, 0));
	TRY_NOCLOSE("seccomp-unshare", syscall(SYS_unshare, CLONE_NEWUSER));
	{
		long pid = syscall(SYS_clone, CLONE_NEWNS | SIGCHLD, 0, 0, 0, 0);
		if (pid == 0)
			_exit(0);
		if (pid > 0)
			waitpid(pid, NULL, 0);
		report("seccomp-clone-newns", pid);
	}
	TRY("seccomp-socket-vsock", syscall(SYS_socket, AF_VSOCK, SOCK_STREAM, 0));
	{
		char c = 'x';
		TRY_NOCLOSE("seccomp-ioctl-tiocsti", syscall(SYS_ioctl, 0, TIOCSTI, &c));
	}
	TRY_NOCLOSE("seccomp-mount", syscall(SYS_mount, "none", ws, "tmpfs", 0, 0));

	/* the mount namespace: a pinned directory, a read-only mask */
	TRY_NOCLOSE("mount-pinned-rename", syscall(SYS_rename, at(ws, ".git"), at(ws, "git2")));
	TRY("mount-masked-create", syscall(SYS_openat, AT_FDCWD, at(ws, ".git/hooks/pre-commit"),
					   O_WRONLY | O_CREAT, 0755));

	/* pids limit */
	fork_until_refused();
	printf("DONE\n");
	return 0;
}
