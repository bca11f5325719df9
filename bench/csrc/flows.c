/* Loopback TCP flows for the egress-guard benchmark (issue #16).
 *
 *   flows serve ADDR PORT
 *   flows client ADDR PORT HOST [-l N] [-b M] [-t SECONDS] [-c CONC] [-o OUTFILE]
 *
 * serve (outside the agent, until killed; PORT 0: any free port, printed as
 * "listening PORT"): one thread, epoll. Reads a
 * request head (up to the blank line); "GET /big" gets a 1 MiB body,
 * anything else a 2-byte one; Connection: close, and the server closes
 * after sending, as a short HTTP/1.0-style exchange does.
 *
 * client (the agent): every flow sends "GET ... Host: HOST", so that the
 * guard has a name to judge. First N flows one after the other, each timed
 * to connect() returning and to the first response byte (what an agent
 * waits for: through the guard connect() returns at once, the upstream
 * connect happens after the name is read); then M 1 MiB transfers one
 * after the other, each timed from socket() to the last byte and, as the
 * transfer itself (stream_mibps), from the first byte to the last; then as many
 * complete short flows as it can in SECONDS with CONC open at once (poll),
 * finishing those still open at the end (not counted in the rate).
 * Prints one JSON line to OUTFILE (or stdout). C rather than Python, so
 * that the client and server are not what limits the flow rate. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BIG (1 << 20)
#define HEAD_MAX 4096
#define MAX_CONC 1024

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void addr_of(struct sockaddr_in *sa, const char *addr, const char *port)
{
	memset(sa, 0, sizeof(*sa));
	sa->sin_family = AF_INET;
	sa->sin_port = htons(atoi(port));
	if (inet_pton(AF_INET, addr, &sa->sin_addr) != 1) {
		fprintf(stderr, "flows: bad address %s\n", addr);
		exit(2);
	}
}

/* -- server ---------------------------------------------------------------------------- */

struct conn {
	int fd;
	size_t got;
	const char *out;
	size_t left;
	char head[HEAD_MAX];
};

static char *big_resp, *small_resp;
static size_t big_len, small_len;

static char *response(size_t body, size_t *len)
{
	char hdr[128];
	int h = snprintf(hdr, sizeof(hdr), "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n", body);
	char *r = malloc(h + body);
	memcpy(r, hdr, h);
	memset(r + h, body == 2 ? 'k' : 'x', body);
	*len = h + body;
	return r;
}

static void drop(int ep, struct conn *c)
{
	epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	free(c);
}

/* write what is left; 1 when done, 0 to wait for POLLOUT, -1 on error */
static int flush_out(struct conn *c)
{
	while (c->left) {
		ssize_t w = write(c->fd, c->out, c->left);
		if (w < 0)
			return errno == EAGAIN ? 0 : -1;
		c->out += w;
		c->left -= w;
	}
	return 1;
}

static void on_ready(int ep, struct conn *c, unsigned events)
{
	if (!c->out) {
		ssize_t r = read(c->fd, c->head + c->got, HEAD_MAX - 1 - c->got);
		if (r < 0 && errno == EAGAIN)
			return;
		if (r <= 0) {
			drop(ep, c);
			return;
		}
		c->got += r;
		c->head[c->got] = 0;
		if (!strstr(c->head, "\r\n\r\n")) {
			if (c->got >= HEAD_MAX - 1)
				drop(ep, c);
			return;
		}
		int is_big = strncmp(c->head, "GET /big", 8) == 0;
		c->out = is_big ? big_resp : small_resp;
		c->left = is_big ? big_len : small_len;
	} else if (!(events & EPOLLOUT)) {
		return;
	}
	int done = flush_out(c);
	if (done) {             /* finished, or the client went away */
		drop(ep, c);
		return;
	}
	struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
	epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static int serve(const char *addr, const char *port)
{
	struct sockaddr_in sa;
	addr_of(&sa, addr, port);
	signal(SIGPIPE, SIG_IGN);
	big_resp = response(BIG, &big_len);
	small_resp = response(2, &small_len);
	int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(ls, (struct sockaddr *)&sa, sizeof(sa)) || listen(ls, 4096)) {
		perror("flows serve: bind/listen");
		return 1;
	}
	socklen_t sl = sizeof(sa);
	getsockname(ls, (struct sockaddr *)&sa, &sl);   /* PORT 0: the kernel picks one */
	int ep = epoll_create1(0);
	struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL}, evs[256];
	epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
	printf("listening %d\n", ntohs(sa.sin_port));
	fflush(stdout);
	for (;;) {
		int n = epoll_wait(ep, evs, 256, -1);
		for (int i = 0; i < n; i++) {
			struct conn *c = evs[i].data.ptr;
			if (c) {
				on_ready(ep, c, evs[i].events);
				continue;
			}
			int fd;
			while ((fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
				c = calloc(1, sizeof(*c));
				c->fd = fd;
				struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
				epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
			}
		}
	}
}

/* -- client ---------------------------------------------------------------------------- */

static struct sockaddr_in target;
static char req_small[512], req_big[512];

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static double pct(double *xs, int n, double p)
{
	if (n == 0)
		return -1;
	int i = (int)(p * (n - 1) + 0.5);
	return xs[i];
}

/* One flow, blocking: returns bytes received (-1 on error); t_conn and
 * t_first are the seconds from socket() to connect() returning and to the
 * first response byte. */
static long one_flow(const char *req, double *t_conn, double *t_first)
{
	static char buf[1 << 16];
	double t0 = now_s();
	long total = 0;
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&target, sizeof(target)))
		goto fail;
	*t_conn = now_s() - t0;
	if (write(fd, req, strlen(req)) != (ssize_t)strlen(req))
		goto fail;
	for (;;) {
		ssize_t r = read(fd, buf, sizeof(buf));
		if (r < 0)
			goto fail;
		if (r == 0)
			break;
		if (total == 0)
			*t_first = now_s() - t0;
		total += r;
	}
	close(fd);
	return total;
fail:
	if (fd >= 0)
		close(fd);
	return -1;
}

struct slot {
	int fd;
	int sent;
	long got;
};

static int start_flow(struct slot *s)
{
	s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	s->sent = 0;
	s->got = 0;
	if (s->fd < 0)
		return -1;
	if (connect(s->fd, (struct sockaddr *)&target, sizeof(target)) && errno != EINPROGRESS) {
		close(s->fd);
		s->fd = -1;
		return -1;
	}
	return 0;
}

/* Flows flat out for secs seconds, conc open at once. Then the flows still
 * open are finished (for at most 5 s more) rather than cut off, since one
 * closed before it named its destination is a refusal to the guard:
 * *done counts the flows completed within secs, *drained those after. */
static void flood(double secs, int conc, long *done, long *drained, long *errors)
{
	static struct slot slots[MAX_CONC];
	static struct pollfd pfd[MAX_CONC];
	static char buf[4096];
	double end = now_s() + secs, t;
	size_t rlen = strlen(req_small);
	for (int i = 0; i < conc; i++)
		slots[i].fd = -1;
	while ((t = now_s()) < end + 5) {
		int open = 0;
		for (int i = 0; i < conc; i++) {
			if (t < end && slots[i].fd < 0 && start_flow(&slots[i]))
				(*errors)++;    /* fd -1: poll skips it; tried again next round */
			pfd[i].fd = slots[i].fd;
			pfd[i].events = slots[i].sent ? POLLIN : POLLOUT;
			open += slots[i].fd >= 0;
		}
		if (t >= end && !open)
			break;
		if (poll(pfd, conc, 100) < 0)
			break;
		for (int i = 0; i < conc; i++) {
			struct slot *s = &slots[i];
			int ok = 1, finished = 0;
			if (!pfd[i].revents || s->fd < 0)
				continue;
			if (!s->sent) {
				int err = 0;
				socklen_t el = sizeof(err);
				getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &el);
				ok = !err && write(s->fd, req_small, rlen) == (ssize_t)rlen;
				s->sent = 1;
			} else {
				ssize_t r = read(s->fd, buf, sizeof(buf));
				if (r < 0 && errno == EAGAIN)
					continue;
				if (r > 0)
					s->got += r;
				else {
					ok = r == 0 && s->got > 0;
					finished = ok;
				}
			}
			if (ok && !finished)
				continue;
			close(s->fd);
			s->fd = -1;
			if (!finished)
				(*errors)++;
			else if (now_s() < end)
				(*done)++;
			else
				(*drained)++;
		}
	}
	for (int i = 0; i < conc; i++)
		if (slots[i].fd >= 0)
			close(slots[i].fd);
}

static int client(int argc, char **argv)
{
	int n = 200, m = 10, conc = 32;
	double secs = 3;
	const char *outfile = NULL;
	addr_of(&target, argv[0], argv[1]);
	const char *host = argv[2];
	for (int i = 3; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "-l"))
			n = atoi(argv[i + 1]);
		else if (!strcmp(argv[i], "-b"))
			m = atoi(argv[i + 1]);
		else if (!strcmp(argv[i], "-t"))
			secs = atof(argv[i + 1]);
		else if (!strcmp(argv[i], "-c"))
			conc = atoi(argv[i + 1]);
		else if (!strcmp(argv[i], "-o"))
			outfile = argv[i + 1];
	}
	if (conc < 1 || conc > MAX_CONC)
		conc = 32;
	signal(SIGPIPE, SIG_IGN);
	snprintf(req_small, sizeof(req_small), "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", host);
	snprintf(req_big, sizeof(req_big), "GET /big HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", host);

	double *tc = calloc(n + 1, sizeof(double)), *tf = calloc(n + 1, sizeof(double));
	int ok = 0, lat_err = 0;
	for (int i = 0; i < n; i++) {
		double c = 0, f = 0;
		if (one_flow(req_small, &c, &f) > 0) {
			tc[ok] = c * 1e6;
			tf[ok] = f * 1e6;
			ok++;
		} else {
			lat_err++;
		}
	}
	qsort(tc, ok, sizeof(double), cmp_double);
	qsort(tf, ok, sizeof(double), cmp_double);

	double *mibps = calloc(m + 1, sizeof(double)), *stream = calloc(m + 1, sizeof(double));
	int bulk_ok = 0, bulk_err = 0;
	for (int i = 0; i < m; i++) {
		double c = 0, f = 0, t0 = now_s();
		long got = one_flow(req_big, &c, &f);
		double dt = now_s() - t0;
		if (got >= BIG && dt > f) {
			stream[bulk_ok] = (got / (double)BIG) / (dt - f);
			mibps[bulk_ok++] = (got / (double)BIG) / dt;
		} else {
			bulk_err++;
		}
	}

	long done = 0, drained = 0, errors = 0;
	if (secs > 0)
		flood(secs, conc, &done, &drained, &errors);

	FILE *out = outfile ? fopen(outfile, "w") : stdout;
	if (!out) {
		perror("flows: output file");
		return 1;
	}
	fprintf(out, "{\"latency_n\": %d, \"latency_errors\": %d, "
		"\"connect_us\": {\"p50\": %.1f, \"p90\": %.1f, \"p99\": %.1f}, "
		"\"ttfb_us\": {\"p50\": %.1f, \"p90\": %.1f, \"p99\": %.1f, \"max\": %.1f}, "
		"\"bulk_errors\": %d, \"bulk_mibps\": [",
		ok, lat_err, pct(tc, ok, .5), pct(tc, ok, .9), pct(tc, ok, .99),
		pct(tf, ok, .5), pct(tf, ok, .9), pct(tf, ok, .99), pct(tf, ok, 1), bulk_err);
	for (int i = 0; i < bulk_ok; i++)
		fprintf(out, "%s%.1f", i ? ", " : "", mibps[i]);
	fprintf(out, "], \"stream_mibps\": [");
	for (int i = 0; i < bulk_ok; i++)
		fprintf(out, "%s%.1f", i ? ", " : "", stream[i]);
	fprintf(out, "], \"flows\": %ld, \"flows_drained\": %ld, \"flow_errors\": %ld, "
		"\"flow_seconds\": %.3f, \"flows_per_s\": %.1f, \"conc\": %d}\n",
		done, drained, errors, secs, secs > 0 ? done / secs : 0, conc);
	return outfile ? fclose(out) != 0 : 0;
}

int main(int argc, char **argv)
{
	if (argc >= 4 && !strcmp(argv[1], "serve"))
		return serve(argv[2], argv[3]);
	if (argc >= 5 && !strcmp(argv[1], "client"))
		return client(argc - 2, argv + 2);
	fprintf(stderr, "usage: flows serve ADDR PORT | flows client ADDR PORT HOST "
		"[-l N] [-b M] [-t SECONDS] [-c CONC] [-o OUTFILE]\n");
	return 2;
}
