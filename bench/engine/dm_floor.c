/*
 * dm_floor: the cost floor for device-mapper control calls, in plain C.
 *
 * Issues the raw DM ioctls with no library in between, the way dmd's engine
 * does them (same udev flags in event_nr, no udev waiting), so the Python
 * engine and dmsetup can be measured against it in the same boot.
 *
 *   dm_floor cycle  N PREFIX   create+load(zero)+resume N devices, then remove them
 *   dm_floor create N PREFIX   create+load(zero)+resume N devices
 *   dm_floor remove N PREFIX   remove PREFIX0000 .. PREFIX<N-1>
 *   dm_floor list   R          R DM_LIST_DEVICES calls (buffer grows, then is reused)
 *
 * Prints one line of key=value pairs (seconds measured inside the program,
 * CLOCK_MONOTONIC, without process start-up), e.g.
 *   create_s=0.012345 remove_s=0.006789 ioctls=800
 *
 * Build: gcc -O2 -Wall -o dm_floor dm_floor.c
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/dm-ioctl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

/* libdm's udev flags (libdevmapper.h), as dmd's engine sends them. */
#define DM_UDEV_DISABLE_LIBRARY_FALLBACK 0x0020
#define DM_UDEV_PRIMARY_SOURCE_FLAG 0x0040
#define DM_UDEV_FLAGS_SHIFT 16
#define UDEV_COOKIE \
	((uint32_t)(DM_UDEV_PRIMARY_SOURCE_FLAG | DM_UDEV_DISABLE_LIBRARY_FALLBACK) \
	 << DM_UDEV_FLAGS_SHIFT)

static int control_fd = -1;
static unsigned long ioctls;

static void die(const char *what, const char *name)
{
	fprintf(stderr, "dm_floor: %s %s: %s\n", what, name ? name : "", strerror(errno));
	exit(1);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void init_header(struct dm_ioctl *dmi, size_t size, const char *name)
{
	memset(dmi, 0, sizeof(*dmi));
	dmi->version[0] = 4; /* 4.0.0: accepted by every 4.x kernel */
	dmi->data_size = size;
	dmi->data_start = sizeof(struct dm_ioctl);
	if (name)
		snprintf(dmi->name, sizeof(dmi->name), "%s", name);
}

static void dm_ioctl_or_die(unsigned long request, struct dm_ioctl *dmi, const char *what)
{
	ioctls++;
	if (ioctl(control_fd, request, dmi) < 0)
		die(what, dmi->name);
}

static void create_one(const char *name)
{
	/* header + one dm_target_spec + "" params, 8-aligned */
	union {
		struct dm_ioctl dmi;
		unsigned char raw[sizeof(struct dm_ioctl) + sizeof(struct dm_target_spec) + 8];
	} buf;
	struct dm_target_spec *spec;

	init_header(&buf.dmi, sizeof(struct dm_ioctl), name);
	buf.dmi.event_nr = UDEV_COOKIE;
	dm_ioctl_or_die(DM_DEV_CREATE, &buf.dmi, "DM_DEV_CREATE");

	memset(&buf, 0, sizeof(buf));
	init_header(&buf.dmi, sizeof(buf), name);
	buf.dmi.target_count = 1;
	spec = (struct dm_target_spec *)(buf.raw + sizeof(struct dm_ioctl));
	spec->sector_start = 0;
	spec->length = 2048;
	spec->next = sizeof(struct dm_target_spec) + 8;
	strcpy(spec->target_type, "zero");
	dm_ioctl_or_die(DM_TABLE_LOAD, &buf.dmi, "DM_TABLE_LOAD");

	init_header(&buf.dmi, sizeof(struct dm_ioctl), name);
	buf.dmi.event_nr = UDEV_COOKIE; /* resume: DM_SUSPEND_FLAG not set */
	dm_ioctl_or_die(DM_DEV_SUSPEND, &buf.dmi, "DM_DEV_SUSPEND (resume)");
}

static void remove_one(const char *name)
{
	struct dm_ioctl dmi;

	init_header(&dmi, sizeof(dmi), name);
	dmi.event_nr = UDEV_COOKIE;
	dm_ioctl_or_die(DM_DEV_REMOVE, &dmi, "DM_DEV_REMOVE");
}

static void name_of(char *out, size_t len, const char *prefix, long i)
{
	snprintf(out, len, "%s%04ld", prefix, i);
}

/* One DM_LIST_DEVICES; the buffer grows x16 on DM_BUFFER_FULL and is kept. */
static long list_once(unsigned char **buf, size_t *size)
{
	struct dm_ioctl *dmi;
	struct dm_name_list *nl;
	long count = 0;

	for (;;) {
		dmi = (struct dm_ioctl *)*buf;
		init_header(dmi, *size, NULL);
		dm_ioctl_or_die(DM_LIST_DEVICES, dmi, "DM_LIST_DEVICES");
		if (!(dmi->flags & DM_BUFFER_FULL_FLAG))
			break;
		*size *= 16;
		free(*buf);
		*buf = calloc(1, *size);
		if (!*buf)
			die("calloc", NULL);
	}
	if (dmi->data_size <= dmi->data_start)
		return 0;
	nl = (struct dm_name_list *)(*buf + dmi->data_start);
	if (!nl->dev)
		return 0;
	for (;;) {
		count++;
		if (!nl->next)
			break;
		nl = (struct dm_name_list *)((unsigned char *)nl + nl->next);
	}
	return count;
}

int main(int argc, char **argv)
{
	char name[DM_NAME_LEN];
	double t0, t1, t2;
	long n, i;

	if (argc < 3) {
		fprintf(stderr, "usage: dm_floor cycle|create|remove N PREFIX | dm_floor list R\n");
		return 2;
	}
	n = strtol(argv[2], NULL, 10);
	control_fd = open("/dev/mapper/control", O_RDWR | O_CLOEXEC);
	if (control_fd < 0)
		die("open", "/dev/mapper/control");

	if (!strcmp(argv[1], "list")) {
		size_t size = 16 * 1024;
		unsigned char *buf = calloc(1, size);
		long devices = 0;

		if (!buf)
			die("calloc", NULL);
		t0 = now();
		devices = list_once(&buf, &size); /* cold: may grow the buffer */
		t1 = now();
		for (i = 0; i < n; i++)
			devices = list_once(&buf, &size);
		t2 = now();
		printf("devices=%ld cold_s=%.6f warm_per_call_s=%.9f buffer=%zu ioctls=%lu\n",
		       devices, t1 - t0, n ? (t2 - t1) / n : 0.0, size, ioctls);
		return 0;
	}

	if (argc < 4) {
		fprintf(stderr, "dm_floor: %s needs N and PREFIX\n", argv[1]);
		return 2;
	}
	t0 = now();
	if (!strcmp(argv[1], "cycle") || !strcmp(argv[1], "create"))
		for (i = 0; i < n; i++) {
			name_of(name, sizeof(name), argv[3], i);
			create_one(name);
		}
	t1 = now();
	if (!strcmp(argv[1], "cycle") || !strcmp(argv[1], "remove"))
		for (i = 0; i < n; i++) {
			name_of(name, sizeof(name), argv[3], i);
			remove_one(name);
		}
	t2 = now();
	printf("create_s=%.6f remove_s=%.6f ioctls=%lu\n", t1 - t0, t2 - t1, ioctls);
	return 0;
}
