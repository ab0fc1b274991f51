/*
 * NullBox agent VM /init: PID 1 of the microVM, compiled static (cage/guestimage.py builds it into the guest
 * initramfs, alone but for the Debian kernel's modules).  It loads the few modules the VM needs (none with the
 * NullBox guest kernel, which has them built in), mounts the agent's read-only root image under a tmpfs overlay,
 * reads the per-boot config (command, working directory, environment - secrets included - and shares),
 * configures eth0, mounts the shares, runs the agent's command chrooted into its root, forwards the ACPI power
 * button to it as SIGTERM, reports its exit status on the console and powers off.
 *
 * Why C and not a shell script: under TCG every fork and exec of a shell init cost milliseconds, and the whole
 * script about 0.2 s of each agent's start; the busybox it needed also made the initramfs ten times bigger.
 *
 * Kernel command line (nothing secret: the guest's /proc/cmdline is readable by every process in it):
 *   nullbox.agent=NAME                the agent's name (for the console and $NULLBOX_AGENT)
 *   nullbox.net=ADDR/PREFIX,GATEWAY   eth0's address and default route; no eth0 configuration without it
 *   nullbox.dns=ADDR                  the nameserver written to the agent's /etc/resolv.conf
 *   nullbox.ctx=serial|vsock|none     how the agent reaches ctxgraph: the virtio-serial port
 *                                     /dev/virtio-ports/org.nullbox.ctxgraph, or vsock (host CID 2, port 7000)
 *   nullbox.onfail=poweroff|halt      after a fatal error: power off (default) or stay up with the message shown
 * The root disk: the only virtio disk (among several, the one with serial nullbox-root), the agent's root image
 * (SquashFS or ext4, mounted read-only).
 * The config, /nullbox-config in the initramfs (cage appends it to the initramfs at each start): the line
 * "nullbox-config 2", then NUL-terminated records up to the first empty one, each "env NAME=VALUE", "workdir PATH",
 * "share TAG:ro|rw:PATH" (parents first) or "arg WORD" (the command, in order); see cage/qemu.py config_bytes.  It
 * is removed once read and its bytes are wiped once the agent has its copy.
 * Every path in the agent's root is resolved inside that root (openat2 RESOLVE_IN_ROOT): a symlink in the agent's
 * image cannot point a mount at the initramfs.
 *
 * Console lines for the host (cage.qemu parses them; each written whole, in one write):
 *   nullbox-guest: ...                what init did (init started, shares mounted)
 *   NULLBOX-AGENT-START <uptime>s     just before the agent's command runs
 *   NULLBOX-POWER-BUTTON              the power button was pressed: the agent got SIGTERM
 *   NULLBOX-AGENT-EXIT <status>       its exit status (128+N for signal N)
 *   NULLBOX-GUEST-FAIL <message>      the VM could not run the agent
 *
 * Not PID 1 (a host test): "init --print-config FILE [AGENT [CTX]]" parses a config file as the guest would
 * and prints what the agent would get, as NUL-terminated fields: "env" NAME=VALUE (the whole environment),
 * "workdir" PATH, "share" TAG MODE PATH, "arg" WORD.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <linux/openat2.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define ROOT_SERIAL "nullbox-root"
#define CONFIG_FILE "/nullbox-config"
#define CONFIG_HEADER "nullbox-config 2\n"
#define MAX_CONFIG (1 << 20)
#define DISK_WAIT_S 30
#define NEWROOT "/newroot"
#define CTX_PORT "org.nullbox.ctxgraph"
#define SHARE_OPTIONS "trans=virtio,version=9p2000.L,msize=262144"
#define AGENT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define MAX_EVENT_DEVICES 8

extern char **environ;

static char agent[65] = "?";
static char net[64];
static char dns[64];
static char ctx[16] = "serial";
static int halt_on_failure;
static int is_pid1;

/* ------------------------------------------------------------------------------------------------ console */

/* One console line, written whole (the host parses lines; an agent writing at the same time must not split it). */
static void line(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void line(const char *fmt, ...)
{
	char buf[4096];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof buf - 2)
		n = sizeof buf - 2;
	buf[n++] = '\n';
	for (char *p = buf; n > 0;) {
		ssize_t w = write(is_pid1 ? STDOUT_FILENO : STDERR_FILENO, p, (size_t)n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return;
		p += w;
		n -= (int)w;
	}
}

static __attribute__((noreturn)) void power_off(void)
{
	sync();
	reboot(RB_POWER_OFF);
	reboot(RB_AUTOBOOT); /* QEMU runs with -no-reboot: a reboot ends it too */
	for (;;)
		pause();
}

static __attribute__((noreturn, format(printf, 1, 2))) void fail(const char *fmt, ...)
{
	char msg[2048];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	if (!is_pid1) {
		line("init: %s", msg);
		exit(1);
	}
	line("NULLBOX-GUEST-FAIL %s", msg);
	if (halt_on_failure)
		for (;;)
			pause();
	power_off();
}

/* "0.42s": the guest's uptime (CLOCK_BOOTTIME, what /proc/uptime shows, without opening it), for the console lines
 * the host times the boot by. */
static const char *uptime(void)
{
	static char buf[32];
	struct timespec now;
	clock_gettime(CLOCK_BOOTTIME, &now);
	snprintf(buf, sizeof buf, "%ld.%02lds", (long)now.tv_sec, now.tv_nsec / 10000000L);
	return buf;
}

/* ------------------------------------------------------------------------------------------------- files */

/* The whole of a small file into a fresh NUL-terminated buffer; NULL with errno set. */
static char *read_all(const char *path, size_t max, size_t *size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return NULL;
	char *buf = malloc(max + 1);
	size_t used = 0;
	while (buf != NULL && used < max) {
		ssize_t n = read(fd, buf + used, max - used);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			int err = errno;
			free(buf);
			close(fd);
			errno = err;
			return NULL;
		}
		if (n == 0)
			break;
		used += (size_t)n;
	}
	close(fd);
	if (buf == NULL) {
		errno = ENOMEM;
		return NULL;
	}
	buf[used] = '\0';
	if (size != NULL)
		*size = used;
	return buf;
}

/* A sysfs attribute's first line into buf; false when unreadable. */
static int read_attr(const char *path, char *buf, size_t size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, buf, size - 1);
	close(fd);
	if (n < 0)
		return 0;
	buf[n] = '\0';
	buf[strcspn(buf, "\n")] = '\0';
	return 1;
}

/* ------------------------------------------------------------------------------------------ command line */

static void set_param(char *dst, size_t size, const char *name, const char *value)
{
	if (strlen(value) >= size)
		fail("the kernel command line's %s is too long", name);
	strcpy(dst, value);
}

static void parse_cmdline(void)
{
	char *text = read_all("/proc/cmdline", 8192, NULL);
	if (text == NULL)
		fail("cannot read /proc/cmdline: %s", strerror(errno));
	for (char *save = NULL, *arg = strtok_r(text, " \t\n", &save); arg; arg = strtok_r(NULL, " \t\n", &save)) {
		if (strncmp(arg, "nullbox.agent=", 14) == 0)
			set_param(agent, sizeof agent, "nullbox.agent", arg + 14);
		else if (strncmp(arg, "nullbox.net=", 12) == 0)
			set_param(net, sizeof net, "nullbox.net", arg + 12);
		else if (strncmp(arg, "nullbox.dns=", 12) == 0)
			set_param(dns, sizeof dns, "nullbox.dns", arg + 12);
		else if (strncmp(arg, "nullbox.ctx=", 12) == 0)
			set_param(ctx, sizeof ctx, "nullbox.ctx", arg + 12);
		else if (strncmp(arg, "nullbox.onfail=", 15) == 0)
			halt_on_failure = strcmp(arg + 15, "halt") == 0;
	}
	free(text);
}

/* --------------------------------------------------------------------------------------------- modules */

/* insmod each module of lib/modules/<release>/LIST ("need PATH" or "want PATH" lines, dependencies first); a
 * "need" module that fails to load is fatal.  A kernel without module support (no /proc/modules: the NullBox
 * guest kernel) has everything built in, and its initramfs carries no lists. */
static void load_modules(const char *list)
{
	if (access("/proc/modules", F_OK) != 0)
		return;
	struct utsname uts;
	uname(&uts);
	char path[512];
	snprintf(path, sizeof path, "/lib/modules/%s/%s", uts.release, list);
	char *text = read_all(path, 1 << 20, NULL);
	if (text == NULL)
		fail("this initramfs has no modules for kernel %s (%s: %s)", uts.release, list, strerror(errno));
	for (char *save = NULL, *entry = strtok_r(text, "\n", &save); entry; entry = strtok_r(NULL, "\n", &save)) {
		int need = strncmp(entry, "need ", 5) == 0;
		if (!need && strncmp(entry, "want ", 5) != 0)
			fail("bad line in %s: %s", path, entry);
		char module[512];
		snprintf(module, sizeof module, "/lib/modules/%s/%s", uts.release, entry + 5);
		int fd = open(module, O_RDONLY | O_CLOEXEC);
		if (fd < 0 || (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST)) {
			if (need)
				fail("cannot load %s: %s", entry + 5, strerror(errno));
		}
		if (fd >= 0)
			close(fd);
	}
	free(text);
}

/* Sleep 10 ms: the poll interval of every wait for a device the kernel is still setting up. */
static void tick(void)
{
	struct timespec ten_ms = {0, 10 * 1000 * 1000};
	nanosleep(&ten_ms, NULL);
}

#define DEVICE_WAIT_TICKS 500 /* 5 s: a port, link or 9p channel of a module loaded a moment ago */

/* ---------------------------------------------------------------------------------------------- disks */

/* The /dev/vdX whose virtio serial is `serial`, waiting up to DISK_WAIT_S for it; false when none appears.  When
 * there is exactly one virtio disk (cage attaches only the root) it is taken without reading its serial: that read
 * is a request to the device, milliseconds under TCG; with several, only the one with that serial will do. */
static int find_disk(const char *serial, char *dev, size_t size)
{
	for (int tries = DISK_WAIT_S * 100; tries > 0; tries--) {
		char names[8][256];
		size_t n = 0;
		DIR *dir = opendir("/sys/block");
		struct dirent *entry;
		while (dir != NULL && (entry = readdir(dir)) != NULL)
			if (strncmp(entry->d_name, "vd", 2) == 0 && n < sizeof names / sizeof *names)
				snprintf(names[n++], sizeof *names, "%s", entry->d_name);
		if (dir != NULL)
			closedir(dir);
		for (size_t i = 0; i < n; i++) {
			char path[300], value[128];
			snprintf(path, sizeof path, "/sys/block/%s/serial", names[i]);
			if (n == 1 || (read_attr(path, value, sizeof value) && strcmp(value, serial) == 0)) {
				snprintf(dev, size, "/dev/%s", names[i]);
				return 1;
			}
		}
		tick();
	}
	return 0;
}

/* ---------------------------------------------------------------------------------------------- config */

struct share {
	const char *tag;
	int read_only;
	const char *path;
};

struct config {
	char *data; /* the file's bytes: every string below points into it */
	size_t size;
	const char *workdir;
	char **env; /* NAME=VALUE, from the file */
	size_t n_env;
	char **argv; /* NULL-terminated */
	size_t n_argv;
	struct share *shares;
	size_t n_shares;
};

static int valid_env_name(const char *entry)
{
	const char *eq = strchr(entry, '=');
	if (eq == NULL || eq == entry)
		return 0;
	for (const char *p = entry; p < eq; p++) {
		int alpha = (*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || *p == '_';
		if (!alpha && !(p > entry && *p >= '0' && *p <= '9'))
			return 0;
	}
	return 1;
}

/* Absolute, and no empty, "." or ".." component (the host normalises; the guest checks anyway). */
static int normal_path(const char *path)
{
	if (path[0] != '/')
		return 0;
	for (const char *p = path + 1; *p != '\0';) {
		size_t len = strcspn(p, "/");
		if (len == 0 || (len == 1 && p[0] == '.') || (len == 2 && p[0] == '.' && p[1] == '.'))
			return 0;
		p += len;
		if (*p == '/' && *++p == '\0')
			return 0;
	}
	return 1;
}

static void parse_share(char *spec, struct share *out, const char *source)
{
	char *mode = strchr(spec, ':');
	char *path = mode == NULL ? NULL : strchr(mode + 1, ':');
	if (mode == NULL || path == NULL || mode == spec)
		fail("%s: bad share record %s", source, spec);
	*mode++ = '\0';
	*path++ = '\0';
	if (strcmp(mode, "ro") != 0 && strcmp(mode, "rw") != 0)
		fail("%s: share %s has mode %s (ro or rw)", source, spec, mode);
	if (!normal_path(path))
		fail("%s: share %s has a bad path %s", source, spec, path);
	out->tag = spec;
	out->read_only = mode[0] == 'r' && mode[1] == 'o';
	out->path = path;
}

static struct config read_config(const char *path)
{
	struct config c = {0};
	size_t header = strlen(CONFIG_HEADER);
	c.data = read_all(path, MAX_CONFIG, &c.size);
	if (c.data == NULL)
		fail("cannot read the config %s: %s", path, strerror(errno));
	if (c.size < header || memcmp(c.data, CONFIG_HEADER, header) != 0)
		fail("%s is not a nullbox config (version 2)", path);
	size_t records = 0;
	for (size_t i = header; i < c.size; i++)
		records += c.data[i] == '\0';
	c.env = calloc(records + 1, sizeof *c.env);
	c.argv = calloc(records + 1, sizeof *c.argv);
	c.shares = calloc(records + 1, sizeof *c.shares);
	if (c.env == NULL || c.argv == NULL || c.shares == NULL)
		fail("out of memory reading the config");
	c.workdir = "/";
	int ended = 0;
	for (size_t at = header; at < c.size;) {
		char *record = c.data + at;
		size_t len = strnlen(record, c.size - at);
		if (at + len == c.size)
			fail("%s: the config's last record is not terminated", path);
		at += len + 1;
		if (len == 0) {
			ended = 1;
			break;
		}
		if (strncmp(record, "env ", 4) == 0) {
			if (!valid_env_name(record + 4))
				fail("%s: bad environment record (variable %.64s)", path, record + 4);
			c.env[c.n_env++] = record + 4;
		} else if (strncmp(record, "arg ", 4) == 0 && record[4] != '\0') {
			c.argv[c.n_argv++] = record + 4;
		} else if (strncmp(record, "workdir ", 8) == 0) {
			if (!normal_path(record + 8))
				fail("%s: bad working directory %.256s", path, record + 8);
			c.workdir = record + 8;
		} else if (strncmp(record, "share ", 6) == 0) {
			parse_share(record + 6, &c.shares[c.n_shares++], path);
		} else {
			fail("%s: unknown config record %.16s", path, record);
		}
	}
	if (!ended)
		fail("%s: the config has no end record", path);
	if (c.n_argv == 0)
		fail("%s: the config names no command", path);
	return c;
}

/* The agent's environment: a clean one (HOME, TERM, NULLBOX_AGENT, NULLBOX_CTX, PATH), then the config's, which
 * replaces a default of the same name. */
static char **agent_environment(const struct config *c)
{
	static char agent_var[96], ctx_var[32];
	snprintf(agent_var, sizeof agent_var, "NULLBOX_AGENT=%s", agent);
	snprintf(ctx_var, sizeof ctx_var, "NULLBOX_CTX=%s", ctx);
	char *defaults[] = {"HOME=/", "TERM=dumb", agent_var, ctx_var, "PATH=" AGENT_PATH};
	size_t n_defaults = sizeof defaults / sizeof *defaults;
	char **env = calloc(n_defaults + c->n_env + 1, sizeof *env);
	if (env == NULL)
		fail("out of memory building the agent's environment");
	size_t n = 0;
	for (size_t i = 0; i < n_defaults; i++) {
		size_t name = strcspn(defaults[i], "=") + 1;
		int replaced = 0;
		for (size_t j = 0; j < c->n_env && !replaced; j++)
			replaced = strncmp(c->env[j], defaults[i], name) == 0;
		if (!replaced)
			env[n++] = defaults[i];
	}
	for (size_t j = 0; j < c->n_env; j++) {
		size_t name = strcspn(c->env[j], "=") + 1;
		int later = 0; /* a name given twice: the last one counts, as with sh's export */
		for (size_t k = j + 1; k < c->n_env && !later; k++)
			later = strncmp(c->env[k], c->env[j], name) == 0;
		if (!later)
			env[n++] = c->env[j];
	}
	return env;
}

/* ----------------------------------------------------------------------------------- the agent's root */

static int root_fd = -1; /* NEWROOT, once the overlay is mounted */

/* `path` (absolute, in the agent's root) opened O_PATH as a directory, resolved inside that root; -1 with errno. */
static int open_in_root(const char *path, int create)
{
	struct open_how how = {.flags = O_PATH | O_DIRECTORY | O_CLOEXEC, .resolve = RESOLVE_IN_ROOT};
	int fd = (int)syscall(SYS_openat2, root_fd, path, &how, sizeof how);
	if (fd >= 0 || !create || errno != ENOENT)
		return fd;
	/* mkdir -p, one component at a time, each resolved inside the root */
	char partial[4096];
	size_t len = strlen(path);
	if (len >= sizeof partial) {
		errno = ENAMETOOLONG;
		return -1;
	}
	for (size_t i = 1; i <= len; i++) {
		if (path[i] != '/' && path[i] != '\0')
			continue;
		memcpy(partial, path, i);
		partial[i] = '\0';
		char *slash = strrchr(partial, '/');
		*slash = '\0';
		int parent = (int)syscall(SYS_openat2, root_fd, partial[0] ? partial : "/", &how, sizeof how);
		if (parent < 0)
			return -1;
		int made = mkdirat(parent, slash + 1, 0755);
		int err = errno;
		close(parent);
		if (made != 0 && err != EEXIST) {
			errno = err;
			return -1;
		}
	}
	return (int)syscall(SYS_openat2, root_fd, path, &how, sizeof how);
}

/* mount(source, the agent's `path`, ...), the mount point resolved (and made, when missing) inside its root. */
static int mount_in_root(const char *source, const char *path, const char *type, unsigned long flags,
			 const char *data)
{
	int fd = open_in_root(path, 1);
	if (fd < 0)
		return -1;
	char target[64];
	snprintf(target, sizeof target, "/proc/self/fd/%d", fd);
	int done = mount(source, target, type, flags, data);
	int err = errno;
	close(fd);
	errno = err;
	return done;
}

/* ------------------------------------------------------------------------------------------- the resolver */

/* The agent's /etc/resolv.conf names nullbox.dns, replacing the image's. */
static void write_resolver(int etc)
{
	unlinkat(etc, "resolv.conf", 0);
	int fd = openat(etc, "resolv.conf", O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
	char text[96];
	int n = snprintf(text, sizeof text, "nameserver %s\n", dns);
	if (fd < 0 || write(fd, text, (size_t)n) != n)
		fail("cannot write the agent's /etc/resolv.conf: %s", strerror(errno));
	close(fd);
}

/* Before the overlay is mounted: the resolver written into its upper layer, in an /etc with the mode and owner of
 * the image's, which the mounted root then merges with the image's /etc.  Writing through the mounted root instead
 * costs a copy-up of /etc and a whiteout (about 3 ms of every start under TCG).  False when the image's /etc is
 * not a directory (a symlink, say): mount_root() then writes through the mounted root, following it inside. */
static int resolver_in_upper(void)
{
	if (dns[0] == '\0')
		return 1;
	struct in_addr server;
	if (inet_pton(AF_INET, dns, &server) != 1)
		fail("bad nullbox.dns=%s", dns);
	struct stat image = {.st_mode = S_IFDIR | 0755}; /* no /etc in the image: root's 0755, as mkdir -p makes it */
	if (lstat("/lower/etc", &image) != 0 && errno != ENOENT)
		fail("cannot look at the image's /etc: %s", strerror(errno));
	if (!S_ISDIR(image.st_mode))
		return 0;
	if (mkdir("/overlay/upper/etc", 0700) != 0 || chown("/overlay/upper/etc", image.st_uid, image.st_gid) != 0 ||
	    chmod("/overlay/upper/etc", image.st_mode & 07777) != 0)
		fail("cannot make the overlay's /etc: %s", strerror(errno));
	int etc = open("/overlay/upper/etc", O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (etc < 0)
		fail("cannot open the overlay's /etc: %s", strerror(errno));
	write_resolver(etc);
	close(etc);
	return 1;
}

/* The agent's root: its image read-only on /lower, a tmpfs overlay on top (writes vanish with the VM). */
static void mount_root(const char *dev)
{
	/* SquashFS first, silently (no console line when it is not one): its superblock is read once, by the mount */
	if (mount(dev, "/lower", "squashfs", MS_RDONLY | MS_NODEV | MS_SILENT, NULL) != 0) {
		int err = errno;
		if (err != EINVAL)
			fail("cannot mount the root image %s (squashfs): %s", dev, strerror(err));
		load_modules("nullbox.load-ext4");
		if (mount(dev, "/lower", "ext4", MS_RDONLY | MS_NODEV, NULL) != 0)
			fail("cannot mount the root image %s: neither SquashFS nor ext4 (%s)", dev, strerror(errno));
	}
	if (mount("tmpfs", "/overlay", "tmpfs", 0, "mode=0755") != 0)
		fail("cannot mount the overlay tmpfs: %s", strerror(errno));
	if ((mkdir("/overlay/upper", 0755) != 0 && errno != EEXIST) ||
	    (mkdir("/overlay/work", 0755) != 0 && errno != EEXIST))
		fail("cannot make the overlay's directories: %s", strerror(errno));
	int resolver_done = resolver_in_upper();
	if (mount("overlay", NEWROOT, "overlay", 0, "lowerdir=/lower,upperdir=/overlay/upper,workdir=/overlay/work") != 0)
		fail("cannot mount the overlay root: %s", strerror(errno));
	root_fd = open(NEWROOT, O_PATH | O_DIRECTORY | O_CLOEXEC);
	if (root_fd < 0)
		fail("cannot open the agent's root: %s", strerror(errno));
	/* init's own /proc, /sys and /dev, bound (same namespaces, same view; a bind keeps their nosuid, nodev and
	 * noexec): a fresh proc instance costs about 1 ms more than a bind under TCG */
	static const struct {
		const char *path, *source, *type;
		unsigned long flags;
		const char *data;
	} api[] = {
		{"/proc", "/proc", NULL, MS_BIND, NULL},
		{"/sys", "/sys", NULL, MS_BIND, NULL},
		{"/dev", "/dev", NULL, MS_BIND, NULL},
		{"/tmp", "tmpfs", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"},
		{"/run", "tmpfs", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"},
	};
	for (size_t i = 0; i < sizeof api / sizeof *api; i++)
		if (mount_in_root(api[i].source, api[i].path, api[i].type, api[i].flags, api[i].data) != 0)
			fail("cannot mount %s in the agent's root: %s", api[i].path, strerror(errno));
	int etc = open_in_root("/etc", 1); /* resolved inside the root, made when the image has none */
	if (etc < 0)
		fail("cannot create /etc in the agent's root: %s", strerror(errno));
	if (!resolver_done)
		write_resolver(etc);
	close(etc);
}

/* The shares the config lists, in its order (a parent before what sits inside it). */
static void mount_shares(const struct config *c)
{
	if (c->n_shares == 0)
		return;
	load_modules("nullbox.load-9p");
	for (size_t i = 0; i < c->n_shares; i++) {
		const struct share *s = &c->shares[i];
		unsigned long flags = MS_NOSUID | MS_NODEV | (s->read_only ? MS_RDONLY : 0);
		int done, tries = DEVICE_WAIT_TICKS;
		while ((done = mount_in_root(s->tag, s->path, "9p", flags, SHARE_OPTIONS)) != 0 && errno == ENOENT &&
		       --tries > 0)
			tick(); /* no channel with that tag yet: its 9pnet_virtio device is still being set up */
		if (done != 0)
			fail("cannot mount share %s (%s) at %s: %s", s->tag, s->read_only ? "ro" : "rw", s->path,
			     strerror(errno));
		line("nullbox-guest: share %s mounted at %s (%s)", s->tag, s->path, s->read_only ? "ro" : "rw");
	}
}

/* /dev/virtio-ports/<name> links, as udev would make them (the agent's /dev is a bind of this one). */
static int virtio_ports(void)
{
	int found_ctx = 0;
	DIR *dir = opendir("/sys/class/virtio-ports");
	struct dirent *entry;
	while (dir != NULL && (entry = readdir(dir)) != NULL) {
		if (entry->d_name[0] == '.')
			continue;
		char path[300], name[128], link[300], target[300];
		snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", entry->d_name);
		if (!read_attr(path, name, sizeof name) || name[0] == '\0' || name[0] == '.' || strchr(name, '/'))
			continue;
		mkdir("/dev/virtio-ports", 0755);
		snprintf(link, sizeof link, "/dev/virtio-ports/%s", name);
		snprintf(target, sizeof target, "../%s", entry->d_name);
		unlink(link);
		if (symlink(target, link) == 0 && strcmp(name, CTX_PORT) == 0)
			found_ctx = 1;
	}
	if (dir != NULL)
		closedir(dir);
	return found_ctx;
}

/* ------------------------------------------------------------------------------------------------ network */

static void interface_up(int sock, const char *name)
{
	struct ifreq ifr = {0};
	strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
	int tries = DEVICE_WAIT_TICKS; /* Debian's virtio_net was loaded a moment ago */
	while (ioctl(sock, SIOCGIFFLAGS, &ifr) != 0 && errno == ENODEV && --tries > 0)
		tick();
	if (ioctl(sock, SIOCGIFFLAGS, &ifr) != 0)
		fail("no %s%s%s: %s", name, net[0] ? " for nullbox.net=" : "", net, strerror(errno));
	ifr.ifr_flags |= IFF_UP;
	if (ioctl(sock, SIOCSIFFLAGS, &ifr) != 0)
		fail("cannot bring %s up: %s", name, strerror(errno));
}

static void set_sockaddr(struct sockaddr *out, struct in_addr address)
{
	struct sockaddr_in in = {.sin_family = AF_INET, .sin_addr = address};
	memcpy(out, &in, sizeof in);
}

static void network(void)
{
	int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (sock < 0)
		fail("no IPv4 socket: %s", strerror(errno));
	interface_up(sock, "lo");
	if (net[0] == '\0') {
		close(sock);
		return;
	}
	char spec[sizeof net];
	strcpy(spec, net);
	char *gateway = strchr(spec, ',');
	if (gateway != NULL)
		*gateway++ = '\0';
	char *slash = strchr(spec, '/');
	char *end = NULL;
	long prefix = slash == NULL ? -1 : strtol(slash + 1, &end, 10);
	if (slash != NULL)
		*slash = '\0';
	struct in_addr address, gw;
	if (slash == NULL || *end != '\0' || prefix < 1 || prefix > 32 || inet_pton(AF_INET, spec, &address) != 1 ||
	    (gateway != NULL && inet_pton(AF_INET, gateway, &gw) != 1))
		fail("bad nullbox.net=%s (ADDRESS/PREFIX,GATEWAY)", net);
	struct ifreq ifr = {0};
	strncpy(ifr.ifr_name, "eth0", IFNAMSIZ - 1);
	set_sockaddr(&ifr.ifr_addr, address);
	if (ioctl(sock, SIOCSIFADDR, &ifr) != 0)
		fail("cannot give eth0 the address %s/%ld: %s", spec, prefix, strerror(errno));
	struct in_addr mask = {htonl(prefix == 32 ? 0xffffffffu : ~(0xffffffffu >> prefix))};
	set_sockaddr(&ifr.ifr_netmask, mask);
	if (ioctl(sock, SIOCSIFNETMASK, &ifr) != 0)
		fail("cannot give eth0 the prefix /%ld: %s", prefix, strerror(errno));
	interface_up(sock, "eth0");
	if (gateway != NULL) {
		struct rtentry route = {0};
		struct in_addr any = {INADDR_ANY};
		set_sockaddr(&route.rt_dst, any);
		set_sockaddr(&route.rt_genmask, any);
		set_sockaddr(&route.rt_gateway, gw);
		route.rt_flags = RTF_UP | RTF_GATEWAY;
		route.rt_dev = "eth0";
		if (ioctl(sock, SIOCADDRT, &route) != 0)
			fail("cannot route through %s: %s", gateway, strerror(errno));
	}
	close(sock);
}

/* ----------------------------------------------------------------------------------------------- the agent */

/* The power button's input devices (ACPI button + evdev): cage's polite stop, QMP system_powerdown. */
static size_t open_power_buttons(int *fds, size_t max)
{
	size_t n = 0;
	DIR *dir = opendir("/dev/input");
	struct dirent *entry;
	while (dir != NULL && n < max && (entry = readdir(dir)) != NULL) {
		if (strncmp(entry->d_name, "event", 5) != 0)
			continue;
		char path[300];
		snprintf(path, sizeof path, "/dev/input/%s", entry->d_name);
		int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
		unsigned long keys[KEY_MAX / (8 * sizeof(unsigned long)) + 1] = {0};
		if (fd < 0)
			continue;
		if (ioctl(fd, EVIOCGBIT(EV_KEY, sizeof keys), keys) >= 0 &&
		    keys[KEY_POWER / (8 * sizeof(unsigned long))] & (1UL << (KEY_POWER % (8 * sizeof(unsigned long)))))
			fds[n++] = fd;
		else
			close(fd);
	}
	if (dir != NULL)
		closedir(dir);
	return n;
}

static int power_pressed(int fd)
{
	struct input_event events[16];
	int pressed = 0;
	ssize_t n;
	while ((n = read(fd, events, sizeof events)) > 0)
		for (size_t i = 0; i < (size_t)n / sizeof *events; i++)
			pressed |= events[i].type == EV_KEY && events[i].code == KEY_POWER && events[i].value == 1;
	return pressed;
}

/* The agent's process after vfork: it borrows init's memory until the exec (copying init's page tables for a
 * fork costs milliseconds under TCG), so it only makes system calls, writes into its own stack frame and sets
 * `environ` (which init no longer reads), and ends in exec or _exit. */
static __attribute__((noreturn)) void exec_agent(const struct config *c, char **env, const sigset_t *old)
{
	sigprocmask(SIG_SETMASK, old, NULL);
	setsid();
	int null = open("/dev/null", O_RDONLY);
	if (null < 0 || dup2(null, STDIN_FILENO) < 0)
		_exit(126);
	if (null != STDIN_FILENO)
		close(null);
	if (chroot(NEWROOT) != 0 || chdir("/") != 0) {
		line("nullbox-guest: cannot enter the agent's root: %s", strerror(errno));
		_exit(126);
	}
	if (chdir(c->workdir) != 0) {
		line("nullbox-guest: cannot change to the working directory %s: %s", c->workdir, strerror(errno));
		_exit(126);
	}
	environ = env; /* execvp searches the agent's PATH */
	execvp(c->argv[0], c->argv);
	int err = errno;
	line("nullbox-guest: cannot run %s: %s", c->argv[0], strerror(err));
	_exit(err == ENOENT ? 127 : 126);
}

/* Start the agent, forward the power button, reap every child; returns the agent's status (128+N: signal N). */
static int run_agent(struct config *c, char **env)
{
	int buttons[MAX_EVENT_DEVICES];
	size_t n_buttons = open_power_buttons(buttons, MAX_EVENT_DEVICES);
	if (n_buttons == 0)
		line("nullbox-guest: warning: no power button: the power button is ignored (stop will end the VM "
		     "without asking)");
	sigset_t chld, old;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, &old);
	int sigfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
	if (sigfd < 0)
		fail("signalfd: %s", strerror(errno));
	line("NULLBOX-AGENT-START %s", uptime());
	pid_t child = vfork();
	if (child < 0)
		fail("cannot start the agent: %s", strerror(errno));
	if (child == 0)
		exec_agent(c, env, &old);
	explicit_bzero(c->data, c->size); /* the secrets now live in the agent's environment only */
	struct pollfd fds[MAX_EVENT_DEVICES + 1];
	fds[0] = (struct pollfd){.fd = sigfd, .events = POLLIN};
	for (size_t i = 0; i < n_buttons; i++)
		fds[i + 1] = (struct pollfd){.fd = buttons[i], .events = POLLIN};
	for (;;) {
		if (poll(fds, n_buttons + 1, -1) < 0 && errno != EINTR)
			fail("poll: %s", strerror(errno));
		for (size_t i = 1; i <= n_buttons; i++)
			if ((fds[i].revents & POLLIN) && power_pressed(fds[i].fd)) {
				line("NULLBOX-POWER-BUTTON");
				kill(child, SIGTERM);
			}
		struct signalfd_siginfo info;
		while (read(sigfd, &info, sizeof info) > 0)
			;
		int status;
		pid_t pid;
		while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
			if (pid == child)
				return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
	}
}

/* ------------------------------------------------------------------------------------------------------ main */

static int print_config(int argc, char **argv)
{
	if (argc < 3 || argc > 5) {
		line("usage: init --print-config FILE [AGENT [CTX]]  (as PID 1 it boots an agent VM)");
		return 2;
	}
	if (argc > 3)
		set_param(agent, sizeof agent, "agent", argv[3]);
	if (argc > 4)
		set_param(ctx, sizeof ctx, "ctx", argv[4]);
	struct config c = read_config(argv[2]);
	char **env = agent_environment(&c);
	for (char **e = env; *e; e++)
		printf("env%c%s%c", 0, *e, 0);
	printf("workdir%c%s%c", 0, c.workdir, 0);
	for (size_t i = 0; i < c.n_shares; i++)
		printf("share%c%s%c%s%c%s%c", 0, c.shares[i].tag, 0, c.shares[i].read_only ? "ro" : "rw", 0,
		       c.shares[i].path, 0);
	for (size_t i = 0; i < c.n_argv; i++)
		printf("arg%c%s%c", 0, c.argv[i], 0);
	return fflush(stdout) == 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
	is_pid1 = getpid() == 1;
	if (!is_pid1) {
		if (argc > 1 && strcmp(argv[1], "--print-config") == 0)
			return print_config(argc, argv);
		line("init: not PID 1 (as a host tool: init --print-config FILE [AGENT [CTX]])");
		return 2;
	}
	umask(022);
	if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0 ||
	    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0 ||
	    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755") != 0)
		fail("cannot mount /proc, /sys and /dev: %s", strerror(errno));
	parse_cmdline();
	struct utsname uts;
	uname(&uts);
	line("nullbox-guest: agent %s: init started, kernel %s (%s)", agent, uts.release, uptime());
	load_modules("nullbox.load");
	if (strcmp(ctx, "vsock") == 0)
		load_modules("nullbox.load-vsock");
	struct config c = read_config(CONFIG_FILE);
	unlink(CONFIG_FILE);
	char root[300];
	if (!find_disk(ROOT_SERIAL, root, sizeof root))
		fail("no root disk (virtio serial %s)", ROOT_SERIAL);
	mount_root(root);
	int need_port = strcmp(ctx, "serial") == 0, tries = DEVICE_WAIT_TICKS;
	while (!virtio_ports() && need_port && --tries > 0)
		tick(); /* the host adds a port a moment after the device's probe */
	if (need_port && tries == 0)
		fail("no virtio-serial port %s", CTX_PORT);
	network();
	mount_shares(&c);
	int status = run_agent(&c, agent_environment(&c));
	line("NULLBOX-AGENT-EXIT %d", status);
	power_off();
}
