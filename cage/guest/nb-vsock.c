/*
 * nb-vsock CID PORT: connect an AF_VSOCK stream to CID:PORT and relay stdin to it and it to stdout, like
 * `socat - VSOCK-CONNECT:CID:PORT`.  Exits 0 when the peer has closed and everything it sent was written, 1 when
 * the connection fails (with the reason on stderr), 2 on bad arguments.
 *
 * Why: an agent VM reaches ctxgraph at host CID 2, port 7000 when the appliance has vhost-vsock.  Python or Node
 * agents open AF_VSOCK sockets themselves; shell agents (busybox: no vsock in its nc) run this between two FIFOs.
 * Static, no libraries: it is copied into agent root filesystems as it is.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int parse(const char *text, unsigned long max, unsigned int *out)
{
	char *end;
	errno = 0;
	unsigned long value = strtoul(text, &end, 10);
	if (errno || *end || end == text || value > max)
		return -1;
	*out = (unsigned int)value;
	return 0;
}

/* Write all of buf to fd; -1 on error. */
static int write_all(int fd, const char *buf, ssize_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, (size_t)len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		buf += n;
		len -= n;
	}
	return 0;
}

int main(int argc, char **argv)
{
	unsigned int cid, port;
	if (argc != 3 || parse(argv[1], 0xffffffffUL, &cid) || parse(argv[2], 0xffffffffUL, &port)) {
		fprintf(stderr, "usage: nb-vsock CID PORT\n");
		return 2;
	}
	int sock = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (sock < 0) {
		fprintf(stderr, "nb-vsock: socket: %s\n", strerror(errno));
		return 1;
	}
	struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
	if (connect(sock, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		fprintf(stderr, "nb-vsock: connect to %u:%u: %s\n", cid, port, strerror(errno));
		return 1;
	}
	struct pollfd fds[2] = {{.fd = 0, .events = POLLIN}, {.fd = sock, .events = POLLIN}};
	char buf[65536];
	for (;;) {
		if (poll(fds, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return 1;
		}
		if (fds[0].revents) {
			ssize_t n = read(0, buf, sizeof(buf));
			if (n > 0) {
				if (write_all(sock, buf, n) < 0)
					return 1;
			} else if (n == 0 || errno != EINTR) {
				shutdown(sock, SHUT_WR); /* stdin ended: the peer sees end of input, its replies still come */
				fds[0].fd = -1;
			}
		}
		if (fds[1].revents) {
			ssize_t n = read(sock, buf, sizeof(buf));
			if (n > 0) {
				if (write_all(1, buf, n) < 0)
					return 1;
			} else if (n == 0) {
				return 0;
			} else if (errno != EINTR) {
				fprintf(stderr, "nb-vsock: read: %s\n", strerror(errno));
				return 1;
			}
		}
	}
}
