/* ffi/fiemap.ts against linux/fiemap.h and linux/fs.h (see abi.h). */
#include <linux/fs.h>
#include <linux/fiemap.h>
#include "abi.h"

int main(void)
{
	abi_begin("ffi/fiemap.ts", "linux/fiemap.h");

	CONST(FS_IOC_FIEMAP);
	OFFSET("FM_START", struct fiemap, fm_start);
	OFFSET("FM_LENGTH", struct fiemap, fm_length);
	OFFSET("FM_FLAGS", struct fiemap, fm_flags);
	OFFSET("FM_MAPPED_EXTENTS", struct fiemap, fm_mapped_extents);
	OFFSET("FM_EXTENT_COUNT", struct fiemap, fm_extent_count);
	OFFSET("FIEMAP_SIZE", struct fiemap, fm_extents);
	OFFSET("FE_LOGICAL", struct fiemap_extent, fe_logical);
	OFFSET("FE_PHYSICAL", struct fiemap_extent, fe_physical);
	OFFSET("FE_LENGTH", struct fiemap_extent, fe_length);
	OFFSET("FE_FLAGS", struct fiemap_extent, fe_flags);
	SIZE("FIEMAP_EXTENT_SIZE", struct fiemap_extent);
	CONST(FIEMAP_MAX_OFFSET);
	CONST(FIEMAP_FLAG_SYNC);
	CONST(FIEMAP_FLAG_XATTR);
	CONST(FIEMAP_FLAG_CACHE);
	CONST(FIEMAP_EXTENT_LAST);
	CONST(FIEMAP_EXTENT_UNKNOWN);
	CONST(FIEMAP_EXTENT_DELALLOC);
	CONST(FIEMAP_EXTENT_ENCODED);
	CONST(FIEMAP_EXTENT_DATA_ENCRYPTED);
	CONST(FIEMAP_EXTENT_NOT_ALIGNED);
	CONST(FIEMAP_EXTENT_DATA_INLINE);
	CONST(FIEMAP_EXTENT_DATA_TAIL);
	CONST(FIEMAP_EXTENT_UNWRITTEN);
	CONST(FIEMAP_EXTENT_MERGED);
	CONST(FIEMAP_EXTENT_SHARED);

	return abi_end();
}
