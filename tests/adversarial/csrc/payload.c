/* The "forbidden binary" of tests/adversarial: if it ever runs inside the
 * sandbox it leaves evidence. payload MARKER [SECONDS LATER_MARKER]: writes
 * MARKER at once, and LATER_MARKER after SECONDS (so a test can tell "ran,
 * then was killed" from "never ran"). Built static (memfd, copied binary)
 * and dynamic (run through the dynamic loader), and as a shared library
 * (-DAW_PRELOAD) whose constructor writes $AW_PAYLOAD_MARKER when the
 * dynamic loader maps it into a program (LD_PRELOAD). */
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void mark(const char *path)
{
	static const char msg[] = "PAYLOAD-RAN\n";
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd >= 0) {
		(void)!write(fd, msg, sizeof(msg) - 1);
		close(fd);
	}
}

#ifdef AW_PRELOAD
__attribute__((constructor)) static void preloaded(void)
{
	const char *m = getenv("AW_PAYLOAD_MARKER");
	if (m)
		mark(m);
}
#endif

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	mark(argv[1]);
	if (argc > 3) {
		sleep((unsigned)atoi(argv[2]));
		mark(argv[3]);
	}
	return 0;
}
