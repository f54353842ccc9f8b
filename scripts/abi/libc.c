/* ffi/libc.ts against glibc's headers on x86_64 (the library it dlopens): open(2) flags, mmap,
 * eventfd, fallocate modes, and the struct stat / struct statfs that glibc's fstat and fstatfs
 * fill (see abi.h). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/prctl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <unistd.h>
#include "abi.h"

int main(void)
{
	abi_begin("ffi/libc.ts", "glibc fcntl.h, sys/mman.h, sys/stat.h, sys/statfs.h");

	CONST(O_RDONLY);
	CONST(O_WRONLY);
	CONST(O_RDWR);
	CONST(O_CREAT);
	CONST(O_EXCL);
	CONST(O_NOCTTY);
	CONST(O_TRUNC);
	CONST(O_APPEND);
	CONST(O_NONBLOCK);
	CONST(O_DSYNC);
	CONST(O_DIRECT);
	/* glibc defines O_LARGEFILE as 0 on 64-bit; the kernel's value is what the syscall sees. */
	VALUE("O_LARGEFILE", 0100000);
	CONST(O_DIRECTORY);
	CONST(O_NOFOLLOW);
	CONST(O_CLOEXEC);
	CONST(O_PATH);

	CONST(PROT_READ);
	CONST(PROT_WRITE);
	CONST(MAP_SHARED);
	CONST(MAP_PRIVATE);
	CONST(MAP_ANONYMOUS);
	CONST(MAP_POPULATE);
	CONST(EFD_NONBLOCK);
	CONST(EFD_CLOEXEC);
	CONST(FALLOC_FL_KEEP_SIZE);
	CONST(FALLOC_FL_PUNCH_HOLE);
	CONST(FALLOC_FL_ZERO_RANGE);
	CONST(POSIX_FADV_DONTNEED);
	VALUE("SYS_prctl", SYS_prctl);
	CONST(PR_SET_THP_DISABLE);
	VALUE("SYS_sched_setaffinity", SYS_sched_setaffinity);
	VALUE("PAGE_SIZE", sysconf(_SC_PAGESIZE));

	SIZE("STAT_SIZE", struct stat);
	OFFSET("STAT_DEV", struct stat, st_dev);
	OFFSET("STAT_INO", struct stat, st_ino);
	OFFSET("STAT_MODE", struct stat, st_mode);
	OFFSET("STAT_RDEV", struct stat, st_rdev);
	OFFSET("STAT_SIZE_FIELD", struct stat, st_size);
	OFFSET("STAT_BLKSIZE", struct stat, st_blksize);
	OFFSET("STAT_BLOCKS", struct stat, st_blocks);
	CONST(S_IFMT);
	CONST(S_IFREG);
	CONST(S_IFBLK);
	CONST(S_IFDIR);

	SIZE("STATFS_SIZE", struct statfs);
	OFFSET("STATFS_TYPE", struct statfs, f_type);
	OFFSET("STATFS_BSIZE", struct statfs, f_bsize);
	OFFSET("STATFS_FLAGS", struct statfs, f_flags);
	CONST(ST_RDONLY);

	return abi_end();
}
