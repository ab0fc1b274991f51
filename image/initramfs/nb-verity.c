/*
 * nb-verity NAME SECTORS PARAMS: create the read-only device-mapper device NAME with one dm-verity target
 * "0 SECTORS verity PARAMS", activate it and print its node (/dev/dm-N, which devtmpfs creates).
 *
 * Why a program of our own: busybox has no dmsetup, and veritysetup/dmsetup would bring glibc's shared libraries,
 * libdevmapper, libselinux and libudev into an initramfs that otherwise holds one static busybox.  This is the three
 * ioctls dmsetup would make (DM_DEV_CREATE, DM_TABLE_LOAD, DM_DEV_SUSPEND to resume), nothing else; the table's
 * numbers and root hash come from the initramfs (image/verity.py computed them at build time).  On any failure
 * the half-made device is removed and the kernel's error is printed.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/dm-ioctl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define CONTROL "/dev/mapper/control"
#define BUFFER 16384

static union {
	struct dm_ioctl io;
	char bytes[BUFFER];
} buffer;

static void header(const char *name, unsigned int flags)
{
	memset(&buffer, 0, sizeof(buffer));
	buffer.io.version[0] = DM_VERSION_MAJOR;
	buffer.io.version[1] = 0;
	buffer.io.version[2] = 0;
	buffer.io.data_size = sizeof(buffer);
	buffer.io.data_start = sizeof(struct dm_ioctl);
	buffer.io.flags = flags;
	strncpy(buffer.io.name, name, sizeof(buffer.io.name) - 1);
}

static int call(int control, unsigned long request, const char *what, const char *name)
{
	if (ioctl(control, request, &buffer) == 0)
		return 0;
	fprintf(stderr, "nb-verity: %s %s: %s\n", what, name, strerror(errno));
	return -1;
}

static void remove_device(int control, const char *name)
{
	header(name, 0);
	ioctl(control, DM_DEV_REMOVE, &buffer);
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: nb-verity NAME SECTORS PARAMS\n");
		return 2;
	}
	const char *name = argv[1], *params = argv[3];
	char *end;
	errno = 0;
	unsigned long long sectors = strtoull(argv[2], &end, 10);
	if (errno || *end || !sectors) {
		fprintf(stderr, "nb-verity: bad sector count %s\n", argv[2]);
		return 2;
	}
	if (strlen(name) >= DM_NAME_LEN || strlen(params) + 1 > BUFFER - sizeof(struct dm_ioctl) -
	    sizeof(struct dm_target_spec)) {
		fprintf(stderr, "nb-verity: name or parameters too long\n");
		return 2;
	}
	int control = open(CONTROL, O_RDWR | O_CLOEXEC);
	if (control < 0) {
		fprintf(stderr, "nb-verity: %s: %s (a kernel without device-mapper?)\n", CONTROL, strerror(errno));
		return 1;
	}

	header(name, DM_READONLY_FLAG);
	if (call(control, DM_DEV_CREATE, "create", name))
		return 1;

	header(name, DM_READONLY_FLAG);
	buffer.io.target_count = 1;
	struct dm_target_spec *target = (struct dm_target_spec *)(buffer.bytes + sizeof(struct dm_ioctl));
	target->sector_start = 0;
	target->length = sectors;
	strncpy(target->target_type, "verity", sizeof(target->target_type) - 1);
	char *text = (char *)(target + 1);
	strcpy(text, params);
	target->next = 0;
	if (call(control, DM_TABLE_LOAD, "load the verity table of", name)) {
		remove_device(control, name);
		return 1;
	}

	header(name, 0); /* DM_DEV_SUSPEND without DM_SUSPEND_FLAG: resume, i.e. activate the loaded table */
	if (call(control, DM_DEV_SUSPEND, "activate", name)) {
		remove_device(control, name);
		return 1;
	}
	unsigned long long dev = buffer.io.dev;
	unsigned int minor = (unsigned int)((dev & 0xff) | ((dev >> 12) & 0xfff00));
	printf("/dev/dm-%u\n", minor);
	return 0;
}
