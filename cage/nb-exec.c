/*
 * nb-exec UID GID GROUPS UMASK -- PROGRAM [ARG...]: run PROGRAM as UID and GID (real, effective and saved) with only
 * the supplementary groups GROUPS (comma-separated gids, or "-" for none) and the umask UMASK (octal), keeping every
 * open descriptor.  cage starts each agent's QEMU through it (cage/qemu.py Vm._popen).
 *
 * Why a helper: Python's subprocess forks (copying the whole daemon's page tables, about 15 ms in cage) instead of
 * vforking as soon as it has to change the child's uid, gid or groups itself.  Spawning this small static program
 * (vfork) and letting it drop the privileges before it execs QEMU takes a fraction of that.
 *
 * It never runs anything as root (uid or gid 0 is refused) and checks that every id really changed before the exec.
 * Exit status 126 when the privileges cannot be dropped (nothing runs), 127 when PROGRAM cannot be executed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_GROUPS 64

static unsigned long number(const char *text, int base, unsigned long max, const char *what)
{
	char *end = NULL;
	errno = 0;
	unsigned long value = strtoul(text, &end, base);
	if (text[0] == '\0' || text[0] == '-' || text[0] == '+' || *end != '\0' || errno != 0 || value > max) {
		fprintf(stderr, "nb-exec: bad %s %s\n", what, text);
		exit(126);
	}
	return value;
}

static unsigned long id(const char *text, const char *what)
{
	unsigned long value = number(text, 10, (unsigned long)UINT_MAX - 1, what);
	if (value == 0) {
		fprintf(stderr, "nb-exec: refusing %s 0 (root)\n", what);
		exit(126);
	}
	return value;
}

int main(int argc, char **argv)
{
	if (argc < 7 || strcmp(argv[5], "--") != 0) {
		fprintf(stderr, "usage: nb-exec UID GID GROUPS|- UMASK -- PROGRAM [ARG...]\n");
		return 126;
	}
	uid_t uid = (uid_t)id(argv[1], "uid");
	gid_t gid = (gid_t)id(argv[2], "gid");
	gid_t groups[MAX_GROUPS];
	size_t n_groups = 0;
	if (strcmp(argv[3], "-") != 0) {
		char *list = argv[3];
		for (char *save = NULL, *g = strtok_r(list, ",", &save); g; g = strtok_r(NULL, ",", &save)) {
			if (n_groups == MAX_GROUPS) {
				fprintf(stderr, "nb-exec: more than %d groups\n", MAX_GROUPS);
				return 126;
			}
			groups[n_groups++] = (gid_t)id(g, "group");
		}
	}
	mode_t mask = (mode_t)number(argv[4], 8, 0777, "umask");
	if (setgroups(n_groups, groups) != 0 || setresgid(gid, gid, gid) != 0 || setresuid(uid, uid, uid) != 0) {
		fprintf(stderr, "nb-exec: cannot become %u:%u: %s\n", (unsigned)uid, (unsigned)gid, strerror(errno));
		return 126;
	}
	uid_t r, e, s;
	gid_t rg, eg, sg;
	if (getresuid(&r, &e, &s) != 0 || getresgid(&rg, &eg, &sg) != 0 || r != uid || e != uid || s != uid ||
	    rg != gid || eg != gid || sg != gid || setuid(0) == 0) {
		fprintf(stderr, "nb-exec: the ids did not change as asked\n");
		return 126;
	}
	umask(mask);
	execvp(argv[6], argv + 6); /* QEMU by name, as cage's PATH finds it */
	fprintf(stderr, "nb-exec: cannot execute %s: %s\n", argv[6], strerror(errno));
	return 127;
}
