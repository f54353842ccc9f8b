/* ffi/blkdev.ts against linux/fs.h (block ioctls, fsxattr) and linux/magic.h (see abi.h).
 * ZFS and bcachefs are out of tree: their magics are in no UAPI header. */
#include <linux/fs.h>
#include <linux/magic.h>
#include "abi.h"

int main(void)
{
	abi_begin("ffi/blkdev.ts", "linux/fs.h, linux/magic.h");

	CONST(BLKGETSIZE64);
	CONST(BLKSSZGET);
	CONST(BLKPBSZGET);
	CONST(BLKRRPART);
	CONST(FS_IOC_FSGETXATTR);
	OFFSET("FSX_XFLAGS", struct fsxattr, fsx_xflags);
	SIZE("FSXATTR_SIZE", struct fsxattr);
	CONST(FS_XFLAG_REALTIME);

	CONST(EXT4_SUPER_MAGIC);
	CONST(XFS_SUPER_MAGIC);
	CONST(BTRFS_SUPER_MAGIC);
	CONST(TMPFS_MAGIC);
	CONST(RAMFS_MAGIC);
	CONST(OVERLAYFS_SUPER_MAGIC);
	CONST(NFS_SUPER_MAGIC);
	CONST(F2FS_SUPER_MAGIC);
#ifdef FUSE_SUPER_MAGIC
	CONST(FUSE_SUPER_MAGIC);
#else
	MISSING("FUSE_SUPER_MAGIC");
#endif
#ifdef BCACHEFS_SUPER_MAGIC
	CONST(BCACHEFS_SUPER_MAGIC);
#else
	MISSING("BCACHEFS_SUPER_MAGIC");
#endif
	MISSING("ZFS_SUPER_MAGIC");

	return abi_end();
}
